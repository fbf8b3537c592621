"""The per-backend XLA defaults: added only where the user set nothing, and switchable off."""

from resnet_jax import xla_setup

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_appended_to_the_users_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    added = xla_setup.apply_defaults(environ)
    assert added and all(flag.split("=")[0] in xla_setup.CPU_DEFAULTS for flag in added)
    assert environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 ")
    assert FLAG in xla_setup.flag_names(environ["XLA_FLAGS"])


def test_a_flag_the_user_set_wins():
    environ = {"XLA_FLAGS": f"{FLAG}=individual_convolution"}
    xla_setup.apply_defaults(environ)
    assert environ["XLA_FLAGS"].split().count(f"{FLAG}=individual_convolution") == 1
    assert sum(token.startswith(FLAG) for token in environ["XLA_FLAGS"].split()) == 1


def test_switched_off():
    environ = {xla_setup.DISABLE_ENV: "0"}
    assert xla_setup.apply_defaults(environ) == []
    assert "XLA_FLAGS" not in environ

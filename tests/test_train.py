"""The trainer in this process: configs, what a config builds, and every user error's message.

Errors go through the real command line (`cli.run_cli(train.main, argv)`): each must end
in one paragraph naming the problem and the fix, exit status 1, and no traceback.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import sys

import chex
import jax
import numpy as np
import pytest
from absl import flags
from absl import logging as absl_logging

from resnet_jax import (
    builders,
    checkpoint,
    cli,
    config_utils,
    evaluate,
    models,
    optim,
    reporting,
    train,
)
from resnet_jax.cpu.kernels import kernel_modules
from resnet_jax.errors import ConfigError, UserError
from tests.conftest import REPO_ROOT, load_recipe

CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py"))


# --- Configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_resolves_and_says_what_it_aims_at(name):
    config = config_utils.resolve(load_recipe(name))
    assert (
        config_utils.flatten(config).keys()
        == config_utils.flatten(config_utils.default_config()).keys()
    )
    docstring = ast.get_docstring(ast.parse((REPO_ROOT / "configs" / f"{name}.py").read_text()))
    assert "%" in docstring  # the accuracy it aims at / the published figure


def test_the_base_config_explains_every_key():
    lines = (REPO_ROOT / "resnet_jax" / "base_config.py").read_text().splitlines()
    for key in config_utils.flatten(config_utils.default_config()):
        section, _, leaf = key.rpartition(".")
        if section in optim.SECTIONS:  # explained by optim's registry: see the test below
            assert optim.config_options(section)[leaf].help, key
            continue
        assignment = f"{section or 'config'}.{leaf} = "
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(assignment))
        assert "#" in lines[index] or lines[index - 1].strip().startswith("#"), key


def _bad_values(option: optim.Option) -> list:
    """Values of the option's type that its limit refuses."""
    if isinstance(option.default, tuple):
        candidates = [(0,), (-1.0,), (2, 1), (3, 3)]
    else:
        candidates = [-1, -0.5, 0, 1, 1.5, 200, 1e9]
        candidates = [type(option.default)(v) for v in candidates]
    _, holds = option.limit
    return [value for value in candidates if not holds(value)]


@pytest.mark.parametrize("section", list(optim.SECTIONS))
def test_every_registered_option_is_in_the_base_config_and_validated(section):
    defaults = config_utils.default_config()[section]
    options = optim.config_options(section)
    assert set(defaults) == set(options)  # the section is the registry's, nothing else
    for key, option in options.items():
        assert defaults[key] == option.default and option.help, key
        # One Option per key, however many names share it.
        assert all(o is option for o in _registered(section) if o.key == key), key
        if option.limit is None:
            assert f"{section}.{key}" not in config_utils.LIMITS
            continue
        assert config_utils.LIMITS[f"{section}.{key}"] == option.limit
        bad = _bad_values(option)
        assert bad, f"{key}: its limit refuses none of the test values"
        for value in bad:
            with pytest.raises(ConfigError, match="must be") as info:
                config_utils.resolve({section: {key: value}})
            assert option.limit[0] in str(info.value), (key, value)
    name_key = f"{section}.name"
    assert config_utils.CHOICES[name_key] == tuple(optim.SECTIONS[section][1])
    with pytest.raises(ConfigError, match=f"{name_key} = 'adagrad' is not one of"):
        config_utils.resolve({section: {"name": "adagrad"}})


def _registered(section: str) -> list[optim.Option]:
    common, specs = optim.SECTIONS[section]
    return [*common, *(o for spec in specs.values() for o in spec.options)]


def test_each_registered_name_builds_from_its_config_options():
    for name, spec in optim.OPTIMIZERS.items():
        # An optimizer's config options are exactly the keyword arguments of its build.
        parameters = inspect.signature(spec.build).parameters.values()
        keywords = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
        assert keywords == {option.key for option in spec.options}, name
        config = config_utils.resolve({"optimizer": {"name": name}})
        builders.build_optimizer(config, 0.1, frozen_stages=-1)
    for name in optim.SCHEDULES:
        # A schedule's epoch-based options become steps that make_schedule takes.
        config = config_utils.resolve({"schedule": {"name": name}, "num_epochs": 10})
        schedule = builders.build_schedule(config, builders.make_plan(config, 1000))
        assert float(schedule(0)) == pytest.approx(0.1), name


def test_options_of_another_optimizer_or_schedule_are_logged_as_ignored():
    config = config_utils.resolve(
        {"optimizer": {"name": "adam", "momentum": 0.5, "b1": 0.8},
         "schedule": {"name": "cosine", "decay_rate": 0.5, "final_lr_fraction": 0.1}}
    )  # fmt: skip
    assert builders.ignored_options(config, "optimizer") == ["optimizer.momentum=0.5"]
    assert builders.ignored_options(config, "schedule") == ["schedule.decay_rate=0.5"]


def test_the_readme_names_every_optimizer_and_schedule():
    readme = (REPO_ROOT / "README.md").read_text()
    for section, (_, specs) in optim.SECTIONS.items():
        line = next(line for line in readme.splitlines() if f"{section.capitalize()}s:" in line)
        assert re.findall(r"`(\w+)`", line.split("(")[0]) == list(specs), section


def test_model_kernels_is_a_validated_choice():
    assert config_utils.default_config().model.kernels == "auto"
    for kernels in ("auto", "xla", "cpu"):
        assert config_utils.resolve({"model": {"kernels": kernels}}).model.kernels == kernels
    with pytest.raises(ConfigError, match=r"model\.kernels = 'gpu' is not one of"):
        config_utils.resolve({"model": {"kernels": "gpu"}})
    for kernels, expected in (("xla", "xla"), ("cpu", "cpu"), ("auto", "cpu")):  # one CPU device
        config = config_utils.resolve({"model": {"name": "resnet20", "kernels": kernels}})
        model = builders.build_model(config, num_classes=10)
        assert model.conv == kernel_modules(expected)["conv"], kernels


def test_any_config_takes_any_model():
    config = load_recipe("r50")
    config.model.name = "resnet20"
    assert config_utils.resolve(config).model.name == "resnet20"


def test_he_et_al_schedule_is_exact_in_iterations():
    config = config_utils.resolve(load_recipe("resnet56"))
    plan = builders.make_plan(config, num_train_examples=45_000)
    assert (plan.steps_per_epoch, plan.num_epochs, plan.total_steps) == (351, 183, 64_000)
    schedule = builders.build_schedule(config, plan)
    learning_rates = [float(schedule(step)) for step in (0, 31_999, 32_000, 47_999, 48_000)]
    assert learning_rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])

    warmup = builders.build_schedule(config_utils.resolve(load_recipe("resnet110")), plan)
    assert float(warmup(0)) == 0.0 and float(warmup(351)) == pytest.approx(0.1)


def test_learning_rate_is_per_128_images_and_scales_with_the_batch():
    config = config_utils.resolve(load_recipe("r50"))
    config.batch_size = 512
    assert builders.peak_learning_rate(config) == pytest.approx(0.4)
    plan = builders.make_plan(config, num_train_examples=45_000)
    schedule = builders.build_schedule(config, plan)
    warmup_steps = 5 * plan.steps_per_epoch
    assert float(schedule(warmup_steps)) == pytest.approx(0.4)


def test_num_steps_cuts_the_last_epoch():
    config = config_utils.resolve({"num_steps": 100, "batch_size": 10})
    plan = builders.make_plan(config, num_train_examples=95)
    assert (plan.steps_per_epoch, plan.num_epochs, plan.total_steps) == (9, 12, 100)


@pytest.mark.parametrize(
    ("normalization", "pretrained", "dataset", "channels", "expected"),
    [
        ("auto", False, "cifar10", 3, "cifar10"),
        ("auto", True, "cifar10", 3, "imagenet"),
        ("auto", False, "svhn_cropped", 3, "imagenet"),
        ("auto", False, "fashion_mnist", 1, "dataset"),
        ("auto", True, "fashion_mnist", 1, "dataset"),  # no RGB statistics for gray images
        ("cifar10", True, "cifar10", 3, "cifar10"),
        ("imagenet", False, "cifar10", 3, "imagenet"),
        ("dataset", False, "cifar10", 3, "dataset"),
    ],
)
def test_normalization_choice(normalization, pretrained, dataset, channels, expected, tmp_path):
    weights = tmp_path / "weights.pth"
    weights.touch()
    config = config_utils.resolve(
        {
            "augment": {"normalization": normalization},
            "model": {"pretrained": str(weights) if pretrained else ""},
            "dataset": {"name": dataset},
        }
    )
    assert builders.normalization_name(config, channels) == expected
    if expected != "dataset":
        from resnet_jax import augment

        record = builders.named_normalization(expected)
        assert (tuple(record["mean"]), tuple(record["std"])) == augment.NAMED_STATS[expected]


@pytest.mark.parametrize("normalization", ["cifar10", "imagenet"])
def test_rgb_statistics_for_gray_images_are_refused(normalization):
    config = config_utils.resolve(
        {"augment": {"normalization": normalization}, "dataset": {"name": "fashion_mnist"}}
    )
    with pytest.raises(ConfigError) as error:
        builders.normalization_name(config, channels=1)
    message = str(error.value)
    assert f"{normalization}'s three RGB statistics" in message and "fashion_mnist" in message
    assert "augment.normalization to 'dataset'" in message and "\n" not in message


class _MeasuredBatches:
    """The two things builders.normalization asks of a run's batches; counts the measurements."""

    image_shape = (8, 8, 1)

    def __init__(self):
        self.measured = 0

    def channel_stats(self):
        self.measured += 1
        return (0.25,), (0.5,)


def test_dataset_statistics_are_measured_at_the_start_and_kept_on_resume():
    config = config_utils.resolve({"augment": {"normalization": "dataset"}})
    batches = _MeasuredBatches()
    record = builders.normalization(config, batches)
    assert record == {"name": "dataset", "mean": [0.25], "std": [0.5]}
    assert builders.normalization(config, batches, saved=record) == record
    assert batches.measured == 1  # the resumed run reused its checkpoint's figures
    # A run resumed with "dataset" after named statistics measures its data.
    batches.image_shape = (8, 8, 3)
    batches.channel_stats = lambda: ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    measured = builders.normalization(config, batches, builders.named_normalization("imagenet"))
    assert measured["name"] == "dataset" and measured["mean"] == [0.1, 0.2, 0.3]


# --- What a config builds ----------------------------------------------------------------------


def tiny_config(**sections):
    return config_utils.resolve({"model": {"name": "resnet20", "width": 4}, **sections})


def test_options_another_family_or_optimizer_has_are_ignored_with_a_warning(caplog):
    config = tiny_config(model={"name": "resnet20", "width": 4, "stem": "imagenet"})
    config.optimizer.b1 = 0.5  # an adam option, with sgd
    model = builders.build_model(config, num_classes=10)
    assert model.stem == "cifar"
    schedule = builders.build_schedule(config, builders.make_plan(config, 1000))
    builders.build_optimizer(config, schedule, frozen_stages=-1)
    assert "Ignoring model.stem='imagenet'" in caplog.text
    assert "Ignoring options of other optimizers: optimizer.b1=0.5" in caplog.text


@pytest.mark.parametrize(("freeze", "stages"), [("none", -1), ("0", 0), ("2", 2), ("backbone", 3)])
def test_freeze_names_the_frozen_stages(freeze, stages):
    config = tiny_config(model={"name": "resnet20", "width": 4, "freeze": freeze})
    assert builders.build_model(config, num_classes=10).frozen_stages == stages


def test_frozen_stages_get_no_updates():
    config = tiny_config(model={"name": "resnet20", "width": 4, "freeze": "1"})
    model = builders.build_model(config, num_classes=10)
    schedule = builders.build_schedule(config, builders.make_plan(config, 1000))
    tx = builders.build_optimizer(config, schedule, model.frozen_stages)
    shapes = models.init_shapes(model, (1, 32, 32, 3))["params"]
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    updates, _ = tx.update(params, tx.init(params), params)  # gradients of ones
    for name, subtree in updates.items():
        stage = models.stage_of((name,))
        moved = any(np.any(u != 0) for u in jax.tree.leaves(subtree))
        assert moved == (stage is None or stage > 1), name  # the stem and stage 1 are frozen


def test_pretrained_weights_are_loaded_where_they_fit(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    config = config_utils.resolve(
        {"model": {"name": "resnet18", "stem": "imagenet", "pretrained": str(path)}}
    )
    model = builders.build_model(config, num_classes=10)
    _, input_shape = builders.build_preprocess(
        config, (32, 32, 3), builders.named_normalization("imagenet")
    )
    variables = builders.pretrained_variables(config, model, input_shape)
    weights = torch.load(path)
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"],
        weights["conv1.weight"].numpy().transpose(2, 3, 1, 0),
    )
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)  # a new head for 10 classes


# --- User errors through the command line -----------------------------------------------------


TRAIN_FLAGS = ("config", "workdir", "distributed", "coordinator_address", "num_processes",
               "process_id", "distributed_timeout")  # fmt: skip


def _remove_flags(names: list[str]) -> dict[str, flags.Flag]:
    removed = {name: flags.FLAGS[name] for name in names if name in flags.FLAGS}
    for name in removed:
        delattr(flags.FLAGS, name)
    return removed


def _train_flag_names() -> list[str]:
    return [n for n in flags.FLAGS if n in TRAIN_FLAGS or n.startswith("config.")]


@pytest.fixture
def train_cli(monkeypatch, capsys):
    """Run train's command line in this process: returns (exit status, stderr).

    The global absl flags are shared with other modules' tests (another CLI may have defined
    --config), so train's flags are defined for this test only and the others put back after.
    """
    displaced = _remove_flags(_train_flag_names())
    verbosity = absl_logging.get_verbosity()  # reparsing flags resets it (to WARNING)
    train.define_flags()

    def run(*args: str) -> tuple[int, str]:
        argv = ["resnet_jax.train", *args]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
        _remove_flags([n for n in flags.FLAGS if n.startswith("config.")])  # a previous run's
        flags.FLAGS.unparse_flags()
        with pytest.raises(SystemExit) as exit_info:
            cli.run_cli(train.main, argv)
        return exit_info.value.code, capsys.readouterr().err

    yield run
    _remove_flags(_train_flag_names())
    for name, flag in displaced.items():
        flags.FLAGS[name] = flag
    flags.FLAGS.unparse_flags()
    absl_logging.set_verbosity(verbosity)


def assert_explained(code: int, stderr: str, *fragments: str) -> None:
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    text = " ".join(stderr.split())
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.parametrize(
    ("args", "num_steps"),
    [
        ([], 64_000),  # configs/resnet20.py counts He et al.'s iterations
        (["--config.num_epochs=3"], 0),  # the command line's epochs win over the file's steps
        (["--config.num_epochs=3", "--config.num_steps=50"], 50),
    ],
)
def test_num_epochs_given_on_the_command_line_replaces_the_files_num_steps(
    train_cli, monkeypatch, tmp_path, args, num_steps
):
    seen = {}
    monkeypatch.setattr(
        train.loop, "train_and_evaluate", lambda config, _: seen.update(config=config)
    )
    code, stderr = train_cli("--config=configs/resnet20.py", f"--workdir={tmp_path}", *args)
    assert code == 0, stderr
    assert seen["config"].num_steps == num_steps


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("--config.optimizer.learning_rate=-0.1", ["optimizer.learning_rate = -0.1 must be > 0"]),
        ("--config.batch_size=0", ["batch_size = 0 must be >= 1"]),
        ("--config.model.name=resnet19", ["model.name = 'resnet19' is not one of:", "'resnet56'"]),
        ("--config.optimizer.name=adagrad", ["'adagrad' is not one of: 'sgd', 'adam', 'adamw'"]),
        ("--config.schedule.name=linear", ["'linear' is not one of: 'constant', 'cosine'"]),
        ("--config.parallel=spmd", ["parallel = 'spmd' is not one of: 'jit', 'pmap'"]),
        ("--config.model.freeze=stage2", ["model.freeze = 'stage2' must be", '"backbone"']),
        ("--config.model.pretrained=/no/such.pth", ["'/no/such.pth' does not exist"]),
        ("--config.schedule.boundaries_epochs=(150,100)", ["increasing epochs > 0"]),
        ("--config.batch_size=abc", ["--config.batch_size=abc", "invalid literal for int()"]),
        ("--config.optimizer.nestrov=True", ["did you mean optimizer.nesterov?"]),
        ("--config=configs/no_such_config.py", ["Cannot load the config file", "r50.py"]),
    ],
)
def test_config_mistakes_are_explained(train_cli, tmp_path, override, fragments):
    args = ["--config=configs/r50.py", f"--workdir={tmp_path}", override]
    code, stderr = train_cli(*args)
    assert_explained(code, stderr, *fragments)


def test_a_recipe_that_imports_the_old_configs_package_is_explained(train_cli, tmp_path):
    recipe = tmp_path / "old.py"  # configs/default.py is now the package's base_config
    recipe.write_text("from configs import default\n\n\ndef get_config():\n    return None\n")
    code, stderr = train_cli(f"--config={recipe}", f"--workdir={tmp_path / 'run'}")
    assert_explained(
        code, stderr, "Cannot load the config file", "from resnet_jax import base_config"
    )


def test_all_problems_are_reported_at_once(train_cli, tmp_path):
    code, stderr = train_cli(
        "--config=configs/r50.py", f"--workdir={tmp_path}", "--config.batch_size=0",
        "--config.label_smoothing=1.5",
    )  # fmt: skip
    assert_explained(code, stderr, "The config has 2 problems", "label_smoothing = 1.5")


def test_any_user_error_is_one_paragraph_and_any_other_error_keeps_its_traceback(
    train_cli, monkeypatch, tmp_path
):
    class PluginError(UserError):  # defined outside resnet_jax: recognised by its type
        """A mistake a user of some plug-in can fix."""

    def failing_with(error: Exception):
        def main(argv: list[str]) -> int:
            raise error

        return main

    args = ("--config=configs/r50.py", f"--workdir={tmp_path}")
    monkeypatch.setattr(train, "main", failing_with(PluginError("Set the plug-in's option.")))
    code, stderr = train_cli(*args)
    assert_explained(code, stderr, "Error: Set the plug-in's option.")

    monkeypatch.setattr(train, "main", failing_with(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        train_cli(*args)


def test_a_missing_workdir_flag_is_explained(train_cli):
    code, stderr = train_cli("--config=configs/r50.py")
    assert_explained(code, stderr, "--workdir must have a value")


def test_a_workdir_that_is_a_file_is_explained(train_cli, tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    code, stderr = train_cli("--config=configs/r50.py", f"--workdir={path}")
    assert_explained(code, stderr, f"Cannot use --workdir {path}")


def test_a_workdir_of_another_model_is_refused(train_cli, trained_run):
    args = [a for a in trained_run["args"] if not a.startswith("--config.model.name")]
    code, stderr = train_cli(*args, "--config.model.name=resnet32")
    assert_explained(
        code, stderr, "holds a run of resnet20 on cifar10",
        "model.name 'resnet20' -> 'resnet32'", "Use a new --workdir",
    )  # fmt: skip
    assert json.loads((trained_run["workdir"] / "config.json").read_text())["model"]["name"] == (
        "resnet20"
    )


def test_missing_data_is_explained(train_cli, tmp_path):
    code, stderr = train_cli(
        "--config=configs/r50.py", f"--workdir={tmp_path}", "--config.dataset.name=folder:/no/data"
    )
    assert_explained(code, stderr, "/no/data needs train/ and test/ subfolders")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("--config.augment.crop_size=41", ["augment.crop_size = 41 is larger", "at most 40"]),
        ("--config.model.freeze=4", ["asks for 4 stages but resnet20 has 3"]),
        ("--config.schedule.warmup_epochs=2", ["covers the whole run of 18 steps"]),
        ("--config.batch_size=100", ["larger than the 90 training examples"]),
        ("--config.dataset.name=no_such_dataset", ["Unknown dataset 'no_such_dataset'"]),
    ],
)
def test_mistakes_found_once_the_data_is_loaded_are_explained(
    train_cli, tiny_overrides, tmp_path, override, fragments
):
    code, stderr = train_cli(*tiny_overrides, f"--workdir={tmp_path}", override)
    assert_explained(code, stderr, *fragments)
    assert not list(tmp_path.glob("checkpoints/*"))


def test_divergence_stops_at_the_last_good_checkpoint(train_cli, tiny_overrides, tmp_path):
    # The rate is multiplied by 1e30 after epoch 1: epoch 1 trains and is saved, epoch 2 blows up.
    code, stderr = train_cli(
        *tiny_overrides, f"--workdir={tmp_path}", "--config.schedule.name=step",
        "--config.schedule.boundaries_epochs=(1,)", "--config.schedule.decay_factor=1e30",
    )  # fmt: skip
    assert_explained(
        code, stderr, "Training diverged:", "(epoch 2)",
        "The last good checkpoint (step 9) stays the latest", "no results.json was written",
        "Lower optimizer.learning_rate",
    )  # fmt: skip
    assert not (tmp_path / "results.json").exists()
    checkpoints = checkpoint.Checkpoints(tmp_path / "checkpoints")
    try:
        assert checkpoints.latest_step() == 9
        params = checkpoints.restore_variables(9)["params"]
    finally:
        checkpoints.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_without_a_validation_split_epochs_are_tested_and_the_last_checkpoint_reported(
    train_cli, tiny_overrides, tmp_path, caplog
):
    code, stderr = train_cli(
        *tiny_overrides, f"--workdir={tmp_path}", "--config.dataset.val_fraction=0"
    )
    assert code == 0, stderr
    assert "No validation split (dataset.val_fraction = 0)" in caplog.text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["checkpoint_step"] == 20  # 100 train examples: 10 steps per epoch
    assert results["checkpoint_selection"].startswith("latest")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "test_accuracy" in records[-1] and "val_accuracy" not in records[-1]


def test_a_bfloat16_run_with_trivialaugment_mixup_and_cutmix_trains_and_reports(
    train_cli, tiny_overrides, tmp_path
):
    code, stderr = train_cli(
        *tiny_overrides, f"--workdir={tmp_path}", "--config.half_precision=True",
        "--config.augment.policy=trivialaugment", "--config.augment.mixup_alpha=0.2",
        "--config.augment.cutmix_alpha=1.0",
    )  # fmt: skip
    assert code == 0, stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["augment"]["policy"] == "trivialaugment"
    assert config["augment"]["cutmix_alpha"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert train_losses and np.all(np.isfinite(train_losses))
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1 and results["num_test_examples"] == 20


def test_an_ema_and_accumulation_run_reports_both_weights_and_picks_by_the_ema(
    train_cli, tiny_overrides, tmp_path, caplog
):
    code, stderr = train_cli(
        *tiny_overrides, f"--workdir={tmp_path}", "--config.ema.decay=0.5",
        "--config.ema.warmup=True", "--config.optimizer.grad_accumulation_steps=2",
        "--verbosity=0",  # the plan is logged at INFO, which an earlier run's flags may hide
    )  # fmt: skip
    assert code == 0, stderr
    assert (
        "Gradient accumulation: 18 optimizer updates of 10 images, each the mean gradient of 2 "
        "micro-batches of 5 (5 per device)"
    ) in caplog.text
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["record"] == "epoch"]
    assert [r["step"] for r in epochs] == [9, 18]  # steps are optimizer updates
    for record in epochs:
        assert record["ema_val_loss"] != record["val_loss"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["weights"] == "ema"
    assert results["test_accuracy"] == results["ema_test_accuracy"]
    assert results["test_loss"] == results["ema_test_loss"] != results["raw_test_loss"]
    best = max(epochs, key=lambda r: (r["ema_val_accuracy"], r["step"]))
    assert results["checkpoint_step"] == best["step"]
    # evaluate tests the same weights of the same checkpoint; predict uses them too.
    evaluated = evaluate.evaluate_checkpoint(workdir=str(tmp_path))
    assert evaluated["weights"] == "ema"
    assert evaluated["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    saved = evaluate.load_saved_run(str(tmp_path), None)
    checkpoints = checkpoint.Checkpoints(tmp_path / "checkpoints", read_only=True)
    try:
        raw = checkpoints.restore_variables(results["checkpoint_step"])
    finally:
        checkpoints.close()
    assert (saved.step, saved.weights) == (results["checkpoint_step"], "ema")
    assert not np.allclose(saved.variables["params"]["fc"]["kernel"], raw["params"]["fc"]["kernel"])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--coordinator_address=localhost:12421", "--num_processes=2"], ["needs all three of"]),
        (["--coordinator_address=nohost"], ["--coordinator_address=nohost is not host:port"]),
        (
            ["--coordinator_address=localhost:12421", "--num_processes=2", "--process_id=2"],
            ["--process_id=2: it must be in 0..1"],
        ),
    ],
)
def test_multi_process_flag_mistakes_are_explained(train_cli, tmp_path, args, fragments):
    # Checked before JAX's runtime is asked to join anything.
    code, stderr = train_cli("--config=configs/resnet20.py", f"--workdir={tmp_path}", *args)
    assert_explained(code, stderr, *fragments)


BEFORE = REPO_ROOT / "tests" / "data" / "checkpoints_before_step_factory"


@pytest.mark.parametrize("run", ["plain", "ema"])
def test_a_checkpoint_written_before_the_step_factory_restores_and_resumes(
    run, train_cli, tiny_overrides, tmp_path, caplog
):
    # Written by the code of dc5f1a9, whose TrainState carried the step's settings as static
    # fields: a 1-epoch run of resnet20 at width 1 on the fake CIFAR-10 (EMA decay 0.5 in "ema").
    workdir = tmp_path / run
    shutil.copytree(BEFORE / run, workdir)
    saved = evaluate.load_saved_run(str(workdir), None)
    assert saved.step == 9 and saved.weights == ("ema" if run == "ema" else "raw")

    code, stderr = train_cli(
        *tiny_overrides, f"--workdir={workdir}", "--config.model.width=1",
        f"--config.ema.decay={0.5 if run == 'ema' else 0.0}",
        "--config.num_epochs=2", "--verbosity=0",
    )  # fmt: skip

    assert code == 0, stderr
    assert "Resuming from the checkpoint at step 9." in caplog.text
    resumed = evaluate.load_saved_run(str(workdir), None)
    assert resumed.meta["step"] == 18
    epochs = [r for r in reporting.read_metrics(workdir) if r["record"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(2, 18)]  # only what was left to train
    chex.assert_trees_all_equal_structs(resumed.variables, saved.variables)

"""The trainer in this process: configs, what a config builds, and every user error's message.

Errors go through the real command line (`config_utils.run_cli(train.main, argv)`): each must end
in one paragraph naming the problem and the fix, exit status 1, and no traceback.
"""

from __future__ import annotations

import ast
import json
import sys

import jax
import numpy as np
import pytest
from absl import flags
from absl import logging as absl_logging

from resnet_jax import checkpoint, config_utils, models, optim, train
from tests.conftest import REPO_ROOT

CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py"))


def load_config(name: str):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # configs import each other as `from configs import`
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    return module.get_config()


# --- Configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_resolves_and_says_what_it_aims_at(name):
    config = config_utils.resolve(load_config(name))
    assert (
        config_utils.flatten(config).keys()
        == config_utils.flatten(config_utils.default_config()).keys()
    )
    docstring = ast.get_docstring(ast.parse((REPO_ROOT / "configs" / f"{name}.py").read_text()))
    assert "%" in docstring or name == "default"  # the accuracy it aims at / the published figure


def test_default_comments_every_key():
    lines = (REPO_ROOT / "configs" / "default.py").read_text().splitlines()
    for key in config_utils.flatten(config_utils.default_config()):
        section, _, leaf = key.rpartition(".")
        assignment = f"{section or 'config'}.{leaf} = "
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(assignment))
        assert "#" in lines[index] or lines[index - 1].strip().startswith("#"), key


def test_any_config_takes_any_model():
    config = load_config("r50")
    config.model.name = "resnet20"
    assert config_utils.resolve(config).model.name == "resnet20"


def test_he_et_al_schedule_is_exact_in_iterations():
    config = config_utils.resolve(load_config("resnet56"))
    plan = train.make_plan(config, num_train_examples=45_000)
    assert (plan.steps_per_epoch, plan.num_epochs, plan.total_steps) == (351, 183, 64_000)
    schedule = train.build_schedule(config, plan)
    learning_rates = [float(schedule(step)) for step in (0, 31_999, 32_000, 47_999, 48_000)]
    assert learning_rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])

    warmup = train.build_schedule(config_utils.resolve(load_config("resnet110")), plan)
    assert float(warmup(0)) == 0.0 and float(warmup(351)) == pytest.approx(0.1)


def test_learning_rate_is_per_128_images_and_scales_with_the_batch():
    config = config_utils.resolve(load_config("r50"))
    config.batch_size = 512
    assert train.peak_learning_rate(config) == pytest.approx(0.4)
    plan = train.make_plan(config, num_train_examples=45_000)
    schedule = train.build_schedule(config, plan)
    warmup_steps = 5 * plan.steps_per_epoch
    assert float(schedule(warmup_steps)) == pytest.approx(0.4)


def test_num_steps_cuts_the_last_epoch():
    config = config_utils.resolve({"num_steps": 100, "batch_size": 10})
    plan = train.make_plan(config, num_train_examples=95)
    assert (plan.steps_per_epoch, plan.num_epochs, plan.total_steps) == (9, 12, 100)


@pytest.mark.parametrize(
    ("normalization", "pretrained", "dataset", "expected"),
    [
        ("auto", False, "cifar10", "CIFAR10"),
        ("auto", True, "cifar10", "IMAGENET"),
        ("auto", False, "svhn_cropped", "IMAGENET"),
        ("cifar10", True, "cifar10", "CIFAR10"),
        ("imagenet", False, "cifar10", "IMAGENET"),
    ],
)
def test_normalization_statistics(normalization, pretrained, dataset, expected, tmp_path):
    weights = tmp_path / "weights.pth"
    weights.touch()
    config = config_utils.resolve(
        {
            "augment": {"normalization": normalization},
            "model": {"pretrained": str(weights) if pretrained else ""},
            "dataset": {"name": dataset},
        }
    )
    from resnet_jax import augment

    mean, std = train.normalization_stats(config)
    assert (mean, std) == (
        getattr(augment, f"{expected}_MEAN"),
        getattr(augment, f"{expected}_STD"),
    )


# --- What a config builds ----------------------------------------------------------------------


def tiny_config(**sections):
    return config_utils.resolve({"model": {"name": "resnet20", "width": 4}, **sections})


def test_options_another_family_or_optimizer_has_are_ignored_with_a_warning(caplog):
    config = tiny_config(model={"name": "resnet20", "width": 4, "stem": "imagenet"})
    config.optimizer.b1 = 0.5  # an adam option, with sgd
    model = train.build_model(config, num_classes=10)
    assert model.stem == "cifar"
    schedule = train.build_schedule(config, train.make_plan(config, 1000))
    train.build_optimizer(config, schedule, frozen_stages=-1)
    assert "Ignoring model.stem='imagenet'" in caplog.text
    assert "Ignoring options of other optimizers: optimizer.b1=0.5" in caplog.text


@pytest.mark.parametrize(("freeze", "stages"), [("none", -1), ("0", 0), ("2", 2), ("backbone", 3)])
def test_freeze_names_the_frozen_stages(freeze, stages):
    config = tiny_config(model={"name": "resnet20", "width": 4, "freeze": freeze})
    assert train.build_model(config, num_classes=10).frozen_stages == stages


def test_frozen_stages_get_no_updates():
    config = tiny_config(model={"name": "resnet20", "width": 4, "freeze": "1"})
    model = train.build_model(config, num_classes=10)
    schedule = train.build_schedule(config, train.make_plan(config, 1000))
    tx = train.build_optimizer(config, schedule, model.frozen_stages)
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
    model = train.build_model(config, num_classes=10)
    _, input_shape = train.build_preprocess(config, (32, 32, 3))
    variables = train.pretrained_variables(config, model, input_shape)
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
            config_utils.run_cli(train.main, argv)
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
    monkeypatch.setattr(train, "train_and_evaluate", lambda config, _: seen.update(config=config))
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


def test_all_problems_are_reported_at_once(train_cli, tmp_path):
    code, stderr = train_cli(
        "--config=configs/r50.py", f"--workdir={tmp_path}", "--config.batch_size=0",
        "--config.label_smoothing=1.5",
    )  # fmt: skip
    assert_explained(code, stderr, "The config has 2 problems", "label_smoothing = 1.5")


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


def test_optim_names_match_the_config_keys():
    defaults = config_utils.default_config()
    for options in optim.OPTIMIZER_OPTIONS.values():
        assert set(options) <= set(defaults.optimizer)
    assert set(train.SCHEDULE_KEYS) == set(optim.SCHEDULE_NAMES)


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

"""The study scripts in experiments/: each `--quick` run on fake data writes its table and figures,
and a rerun resumes instead of training again. And every script in experiments/ runs as
`python -m experiments.<name>` from the repository root, none editing sys.path.

Training dominates the cost (a compile per distinct train step), so every run is 1 epoch of 2-5
steps, most studies run two of their arms (every arm's config is still built and validated in
`test_every_arm_of_every_study_resolves`), and the runs share one JAX compilation cache, where an
arm whose step another run already compiled is a cache hit.
"""

import csv
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import (
    augmentation,
    degradation,
    hyperparams,
    lr_schedules,
    optimizers,
    pretrained_vs_scratch,
    regularization,
    study_figures,
    sweep,
    transfer_frozen,
)
from resnet_jax import config_utils
from tests.conftest import load_recipe
from tests.fake_cifar import prepare_fake_cifar10

STUDIES = (
    lr_schedules,
    optimizers,
    degradation,
    pretrained_vs_scratch,
    transfer_frozen,
    augmentation,
    hyperparams,
    regularization,
)
FIGURES = ("curves.png", "test_accuracy.png")
EXPERIMENTS_DIR = Path(sweep.REPO_ROOT) / "experiments"
# Every module of experiments/ that runs as a program (the others are its shared parts).
SCRIPTS = sorted(
    path.stem
    for path in EXPERIMENTS_DIR.glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """A tfds data dir with a fake CIFAR-10 archive: 90 train / 10 val / 20 test examples."""
    data_dir = tmp_path_factory.mktemp("tfds")
    prepare_fake_cifar10(data_dir, n_train_per_batch=20, n_test=20)
    return data_dir


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    # Under xdist, one directory for all workers of this session.
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / "experiments_jax_cache"


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory):
    """A randomly initialized torchvision ResNet-18 state_dict saved as .pth: stands in for the
    ImageNet weights (ResNet-18 instead of ResNet-50/34 keeps the compiles short).

    Made in a subprocess: importing torchvision into a process that has started TensorFlow (as
    the trainer's tfds loading does) crashes it; torch alone, as the trainer reads .pth files, is
    fine.
    """
    if importlib.util.find_spec("torchvision") is None:  # found, not imported (see above)
        pytest.skip("torchvision is not installed")
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    code = (
        "import sys, torch, torchvision; torch.manual_seed(0); "
        "torch.save(torchvision.models.resnet18(weights=None).state_dict(), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=300)
    return path


@pytest.fixture(scope="session")
def two_class_folder(tmp_path_factory):
    """path/{train,test}/{cat,dog}/*.png: 24 train and 6 test 32x32 images per class."""
    root = tmp_path_factory.mktemp("two_classes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 6)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 128, (32, 32, 3)) + 100 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def quick_args(out, data_dir, cache, *extra):
    return [
        "study",
        "--quick",
        f"--out={out}",
        f"--data_dir={data_dir}",
        "--config.dataset.verify_checksums=false",
        "--config.num_epochs=1",
        f"--config.compilation_cache_dir={cache}",
        *extra,
    ]


def rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])


def pixels_of(image: np.ndarray, color: str) -> int:
    return int(np.sum(np.all(np.abs(image[..., :3].astype(int) - rgb(color)) <= 6, axis=-1)))


def check_outputs(out: Path, arms: list[str], figures=FIGURES) -> list[dict]:
    """results.csv/md have a finished row per arm; each figure is a real plot in arm colours."""
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["arm"] for row in rows] == arms
    for row in rows:
        assert row["status"] == "done"
        assert row["epochs"] == "1"
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert float(row["test_error"]) == pytest.approx(1 - float(row["test_accuracy"]), abs=1e-3)
        for key in ("final_train_loss", "iterations_per_epoch", "precision", "recall", "f1"):
            assert row[key] != "", key
    markdown = (out / "results.md").read_text()
    assert "QUICK RUN" in markdown and "Hardware:" in markdown and "Data: cifar10" in markdown
    for arm in arms:
        assert f"| {arm} |" in markdown
    stored = {arm: json.loads((out / arm / sweep.ARM_FILE).read_text()) for arm in arms}
    assert all(record["quick"] for record in stored.values())
    for figure in figures:
        image = np.asarray(Image.open(out / figure).convert("RGB"))
        assert image.shape[0] > 400 and image.shape[1] > 500, figure
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, f"{figure} looks blank"
    return rows


def arm_colors(module, arms):
    every = module.STUDY.arms()
    return {a.name: study_figures.arm_color(every, a) for a in every if a.name in arms}


def check_colors(out: Path, colors: dict[str, str], figures=FIGURES) -> None:
    """Every arm's colour is drawn in every figure (one colour per arm across figures)."""
    for figure in figures:
        image = np.asarray(Image.open(out / figure).convert("RGB"))
        for arm, color in colors.items():
            assert pixels_of(image, color) > 20, f"{arm}'s colour {color} missing in {figure}"


def epoch_records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("record") == "epoch"]


def test_lr_schedules_quick_run_then_resumes(tmp_path, fake_cifar, compilation_cache, capsys):
    arms = ["step", "cosine"]
    args = quick_args(tmp_path, fake_cifar, compilation_cache, f"--arms={','.join(arms)}")
    lr_schedules.main(args)
    figures = (*FIGURES, "schedules.png")
    rows = check_outputs(tmp_path, arms, figures)
    assert [row["schedule.name"] for row in rows] == arms
    check_colors(tmp_path, arm_colors(lr_schedules, arms), figures)

    # A rerun trains nothing: finished arms are only read back.
    written = {arm: (tmp_path / arm / "metrics.jsonl").stat().st_mtime_ns for arm in arms}
    capsys.readouterr()
    lr_schedules.main(args)
    assert capsys.readouterr().out.count("finished earlier; not trained again") == 2
    assert written == {arm: (tmp_path / arm / "metrics.jsonl").stat().st_mtime_ns for arm in arms}

    # An arm stopped before its results resumes from its checkpoint: no epoch is trained again.
    before = epoch_records(tmp_path / "cosine")
    (tmp_path / "cosine" / "results.json").unlink()
    lr_schedules.main(args)
    assert "cosine: resuming" in capsys.readouterr().out
    assert (tmp_path / "cosine" / "results.json").exists()
    assert epoch_records(tmp_path / "cosine") == before
    check_outputs(tmp_path, arms)

    # The same --out with another config is refused before anything trains.
    with pytest.raises(sweep.SweepError, match=r"another config.*optimizer.momentum"):
        lr_schedules.main([*args, "--config.optimizer.momentum=0.5"])
    with pytest.raises(sweep.SweepError, match="trained with --quick"):
        lr_schedules.main([a for a in args if a != "--quick"])


def test_optimizers_quick_run(tmp_path, fake_cifar, compilation_cache):
    arms = ["sgd", "adam"]
    optimizers.main(quick_args(tmp_path, fake_cifar, compilation_cache, "--arms=sgd,adam"))
    rows = check_outputs(tmp_path, arms)
    assert [row["optimizer.name"] for row in rows] == arms
    assert [float(row["optimizer.learning_rate"]) for row in rows] == [0.1, 1e-3]


def test_augmentation_quick_run(tmp_path, fake_cifar, compilation_cache):
    arms = ["none", "flip"]  # rotation's compile is the slowest; test_augment covers it
    augmentation.main(quick_args(tmp_path, fake_cifar, compilation_cache, "--arms=none,flip"))
    rows = check_outputs(tmp_path, arms)
    assert [row["augment.flip"] for row in rows] == ["False", "True"]
    assert [row["augment.crop_padding"] for row in rows] == ["0", "0"]
    assert [row["augment.crop_size"] for row in rows] == ["0", "0"]


def test_regularization_arms_add_r18_strong_one_piece_at_a_time(
    tmp_path, fake_cifar, compilation_cache
):
    strong = config_utils.flatten(load_recipe("r18_strong"))
    arms = {arm.name: arm.overrides for arm in regularization.arms()}
    assert list(arms) == ["baseline", "label_smoothing", "policy", "mixing", "ema", "all"]
    assert arms["baseline"] == {}
    added = {key for name in ("label_smoothing", "policy", "mixing", "ema") for key in arms[name]}
    assert added == set(arms["all"]) and all(strong[k] == v for k, v in arms["all"].items())
    assert arms["label_smoothing"] == {"label_smoothing": strong["label_smoothing"]} != {}
    regularization.main(quick_args(tmp_path, fake_cifar, compilation_cache, "--arms=baseline,all"))
    rows = check_outputs(tmp_path, ["baseline", "all"])
    assert [row["augment.policy"] for row in rows] == ["none", "trivialaugment"]
    assert [float(row["label_smoothing"]) for row in rows] == [0.0, strong["label_smoothing"]]
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert results["weights"] == "ema" and "raw_test_accuracy" in results


def test_hyperparams_quick_grid_reports_iterations_per_epoch(
    tmp_path, fake_cifar, compilation_cache
):
    args = ["--batch_sizes=16,32", "--learning_rates=0.1"]
    hyperparams.main(quick_args(tmp_path, fake_cifar, compilation_cache, *args))
    rows = check_outputs(tmp_path, ["bs16_lr0.1", "bs32_lr0.1"], (*FIGURES, "grid.png"))
    # He et al.'s protocol trains on all 100 training images: 100 // 16 and 100 // 32 steps.
    assert [row["iterations_per_epoch"] for row in rows] == ["6", "3"]
    assert [float(row["lr_used"]) for row in rows] == [0.0125, 0.025]


def test_degradation_quick_run_plots_both_families(tmp_path, fake_cifar, compilation_cache):
    arms = ["plain20", "resnet20"]
    degradation.main(quick_args(tmp_path, fake_cifar, compilation_cache, "--depths=20"))
    figures = (*FIGURES, "error_curves.png", "error_vs_depth.png")
    rows = check_outputs(tmp_path, arms, figures)
    assert [row["model.residual"] for row in rows] == ["False", "True"]
    # Evaluated on the test split every epoch, as in He et al.'s Fig. 6.
    assert all("test_accuracy" in epoch_records(tmp_path / arm)[0] for arm in arms)
    assert "final_val_accuracy" not in rows[0] and "best_val_accuracy" not in rows[0]
    # Colour by depth: both families of depth 20 share its colour in the Fig. 6 panels.
    check_colors(tmp_path, {"depth 20": degradation.DEPTH_COLORS[20]}, figures[2:])
    with pytest.raises(sweep.SweepError, match="--depths"):
        degradation.main(quick_args(tmp_path, fake_cifar, compilation_cache, "--depths=21"))


def test_pretrained_vs_scratch_quick_run_loads_the_weights(
    tmp_path, fake_cifar, compilation_cache, resnet18_weights, caplog
):
    caplog.set_level(logging.INFO, logger="absl")
    extra = ["--config.model.name=resnet18", f"--pretrained={resnet18_weights}", "--verbosity=0"]
    pretrained_vs_scratch.main(quick_args(tmp_path, fake_cifar, compilation_cache, *extra))
    rows = check_outputs(tmp_path, ["pretrained", "scratch"])
    assert [row["model.pretrained"] for row in rows] == [str(resnet18_weights), ""]
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loaded ")]
    assert len(loaded) == 1 and not loaded[0].startswith("Loaded 0/")  # the fc head stays fresh


def test_pretrained_vs_scratch_needs_weights(tmp_path, fake_cifar, compilation_cache):
    with pytest.raises(sweep.SweepError, match=r"--pretrained PATH.*resnet50-0676ba61.pth"):
        pretrained_vs_scratch.main(quick_args(tmp_path, fake_cifar, compilation_cache))


def test_transfer_frozen_quick_run_on_a_two_class_folder(
    tmp_path, two_class_folder, compilation_cache, resnet18_weights
):
    extra = [
        f"--dataset=folder:{two_class_folder}",
        "--config.model.name=resnet18",
        f"--pretrained={resnet18_weights}",
    ]
    transfer_frozen.main(quick_args(tmp_path, "", compilation_cache, *extra))
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["arm"], row["model.freeze"]) for row in rows] == [
        ("frozen", "backbone"),
        ("finetune", "none"),
    ]
    assert all(row["status"] == "done" for row in rows)
    for figure in FIGURES:
        assert (tmp_path / figure).stat().st_size > 10_000
    results = json.loads((tmp_path / "frozen" / "results.json").read_text())
    assert results["class_names"] == ["cat", "dog"] and results["num_test_examples"] == 12


@pytest.mark.parametrize("quick", [False, True])
def test_every_arm_of_every_study_resolves(quick, tmp_path, resnet18_weights):
    """Every arm's config is complete and valid (cheap: nothing trains)."""
    for module in STUDIES:
        args = ["study", f"--pretrained={resnet18_weights}", f"--out={tmp_path}"]
        args += ["--quick"] if quick else []
        sweep.parse_flags(module.STUDY, args)
        base = sweep.base_config(module.STUDY)
        arms = module.STUDY.arms()
        assert len(arms) >= 2
        for arm in arms:
            config = config_utils.resolve(sweep.arm_config(base, arm))
            assert config.model.width == (0 if module in (pretrained_vs_scratch, transfer_frozen)
                                          or not quick else 4)  # fmt: skip


def test_help_gives_the_full_scale_command():
    for module in STUDIES:
        doc = module.__doc__
        assert "Full scale" in doc and "--quick" in doc, module.__name__
        assert f"python -m {module.__name__}" in doc
        assert module.STUDY.full_command.split(" --")[0] in doc


def test_unknown_config_keys_and_arms_are_refused(tmp_path):
    with pytest.raises(sweep.SweepError, match=r"Unknown config key optimizer.lr\."):
        lr_schedules.main(["study", f"--out={tmp_path}", "--config.optimizer.lr=0.1"])
    with pytest.raises(sweep.SweepError, match=r"Unknown arms.*constant, time_based"):
        lr_schedules.main(["study", f"--out={tmp_path}", "--arms=linear"])


def test_a_diverged_arm_is_a_result_not_a_crash(tmp_path, fake_cifar, monkeypatch, capsys):
    from resnet_jax import loop

    calls = []

    def diverge(config, workdir):
        calls.append(workdir)
        message = "Training diverged: the training loss became nan at step 2 (epoch 1)."
        raise loop.DivergedError(message, epoch=1)

    monkeypatch.setattr(loop, "train_and_evaluate", diverge)
    args = quick_args(tmp_path, fake_cifar, "", "--arms=constant")
    lr_schedules.main(args)
    with open(tmp_path / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "diverged (epoch 1)" and row["test_accuracy"] == ""
    assert (tmp_path / "test_accuracy.png").exists()
    lr_schedules.main(args)  # not retried: the divergence is the arm's result
    assert len(calls) == 1 and "diverged earlier" in capsys.readouterr().out


def test_command_line_epochs_replace_the_base_configs_steps(tmp_path):
    # configs/resnet20.py, the base of four studies, sets He et al.'s 64k iterations.
    for args, num_steps in (
        ([], 64_000),
        (["--config.num_epochs=3"], 0),
        (["--config.num_epochs=3", "--config.num_steps=50"], 50),
    ):
        sweep.parse_flags(lr_schedules.STUDY, ["study", f"--out={tmp_path}", *args])
        assert sweep.base_config(lr_schedules.STUDY).num_steps == num_steps, args


def test_a_key_the_arms_vary_is_refused_and_the_study_flags_set_it(tmp_path):
    # The arms' own values would silently replace the command line's.
    clash = r"--config.augment.rotation is what this study's arms vary \(none, crop, flip, rotation"
    with pytest.raises(sweep.SweepError, match=clash):
        augmentation.main(["study", f"--out={tmp_path}", "--config.augment.rotation=180"])
    with pytest.raises(
        sweep.SweepError, match=r"optimizer.learning_rate .*\(sgd, sgd_plain, adam, rmsprop"
    ):
        optimizers.main(["study", f"--out={tmp_path}", "--config.optimizer.learning_rate=0.01"])

    sweep.parse_flags(
        augmentation.STUDY, ["study", "--crop_padding=0", "--crop_size=24", "--rotation=180"]
    )
    base = sweep.base_config(augmentation.STUDY)
    augment = {arm.name: sweep.arm_config(base, arm).augment for arm in augmentation.STUDY.arms()}

    def settings(name):
        a = augment[name]
        return (a.crop_padding, a.crop_size, a.flip, a.rotation)

    assert settings("none") == (0, 0, False, 0.0)
    assert settings("crop") == (0, 24, False, 0.0)
    assert settings("rotation") == (0, 0, False, 180.0)
    assert settings("all") == (0, 24, True, 180.0)
    report = augment["report"]  # report 004's torchvision pipeline, whatever the flags say
    assert settings("report") == (4, 24, True, 180.0)
    assert not report.resize_crop and report.rotation_from_zero
    assert report.rotation_interpolation == "nearest" and augment["all"].resize_crop


def test_flag_mistakes_are_explained(tmp_path):
    for args, message in (
        (["--quik"], "Unknown command line flag 'quik'. Did you mean: quick ?"),
        (["--quick=maybe"], "--quick"),
        (["--quick", "3"], "Unexpected arguments: 3. Flags take their value after '='"),
        (["--config=configs/missing.py"], "Cannot load the config file"),
        (["--rotation=0"], "--rotation > 0"),
    ):
        with pytest.raises(sweep.SweepError, match=re.escape(message)):
            augmentation.main(["study", f"--out={tmp_path}", *args])
    # The trainer's boolean spellings.
    sweep.parse_flags(
        lr_schedules.STUDY, ["study", "--noconfig.augment.flip", "--config.half_precision"]
    )
    base = sweep.base_config(lr_schedules.STUDY)
    assert (base.augment.flip, base.half_precision) == (False, True)


def test_a_flag_mistake_on_the_command_line_is_one_paragraph():
    run = subprocess.run(
        [sys.executable, "-m", "experiments.lr_schedules", "--quik"],
        cwd=sweep.REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "Error: Unknown command line flag 'quik'" in run.stderr
    assert "Traceback" not in run.stderr


def test_no_file_in_experiments_edits_sys_path():
    # `python -m experiments.<name>` from the repository root finds both packages as they are.
    edit = re.compile(r"sys\.path\s*(\.\s*\w+\s*\(|\[[^]]*\]\s*=|\+?=)")
    editing = [
        p.name for p in EXPERIMENTS_DIR.iterdir() if p.is_file() and edit.search(p.read_text())
    ]
    assert editing == []


def test_the_scripts_are_found():
    assert len(SCRIPTS) >= 13 and {"benchmark", "lr_schedules", "torch_fashion"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_each_script_run_as_a_module(script):
    run = subprocess.run(
        [sys.executable, "-m", f"experiments.{script}", "--help"],
        cwd=sweep.REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    module_doc = (EXPERIMENTS_DIR / f"{script}.py").read_text().split('"""')[1]
    assert module_doc.splitlines()[0] in run.stdout, run.stdout[-3000:]
    assert "--quick" in run.stdout


def fabricated(tmp_path, name, losses, *, diverged=False, steps=5, steps_per_epoch=5):
    """An ArmResult with one epoch record per loss, as a workdir's metrics.jsonl gives it."""
    epochs = [
        {"record": "epoch", "epoch": i + 1, "step": min(steps * (i + 1), steps * len(losses)),
         "steps_per_epoch": steps_per_epoch, "train_loss": loss}
        for i, loss in enumerate(losses)
    ]  # fmt: skip
    return sweep.ArmResult(
        arm=sweep.Arm(name, name, {}), color="#d62728" if diverged else "#1f77b4",
        workdir=tmp_path / name, config={}, epochs=epochs,
        results=None if diverged else {"test_accuracy": 0.5}, hardware="", quick=True,
        diverged=diverged, diverged_epoch=2 if diverged else None,
    )  # fmt: skip


def test_a_diverged_arm_is_labelled_and_does_not_set_the_scale(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = fabricated(tmp_path, "fine", [2.3, 1.9])
    bad = fabricated(tmp_path, "bad", [1.3e15, float("nan")], diverged=True)
    fig, ax = plt.subplots()
    study_figures.plot_lines(ax, [fine, bad], "train_loss")
    assert 1.9 < ax.get_ylim()[1] < 3
    assert sorted(text.get_text() for text in ax.texts) == ["bad (diverged)", "fine"]
    plt.close(fig)
    assert bad.status == "diverged (epoch 2)"


def test_a_cut_short_epoch_is_plotted_where_it_ends(tmp_path):
    # 3 steps of a 5-step epoch: at 0.6 epochs, and the epoch still has 5 iterations.
    short = fabricated(tmp_path, "short", [2.3], steps=3)
    assert short.series("train_loss") == ([0.6], [2.3])
    assert short.iterations_per_epoch == 5


def test_grid_cells_without_a_result_are_grey_with_dark_text(tmp_path):
    sweep.parse_flags(hyperparams.STUDY, ["study", "--batch_sizes=16", "--learning_rates=1e6,0.1"])
    results = [
        fabricated(tmp_path, hyperparams.arm_name(16, 1e6), [1e15], diverged=True),
        fabricated(tmp_path, hyperparams.arm_name(16, 0.1), [2.0]),
    ]
    (path,) = hyperparams.grid_figure(results, tmp_path)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    grey = np.all(np.abs(image - 211) <= 2, axis=-1)  # matplotlib's "lightgrey", #d3d3d3
    rows, cols = np.nonzero(grey)
    assert grey.sum() > 2000
    cell = image[rows.min() : rows.max(), cols.min() : cols.max()]
    assert np.all(cell < 80, axis=-1).sum() > 20  # the word "diverged", in black

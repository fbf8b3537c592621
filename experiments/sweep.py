"""A study: its arms, training and resuming them, and the command line every study script shares.

A study is a base config and a list of arms, each arm a few config overrides. `main` trains every
arm with `resnet_jax.loop.train_and_evaluate` in its own workdir `<out>/<arm>/`: an arm that has
its results.json is not trained again, and an interrupted one resumes from its checkpoints. Then it
writes to `<out>/` the table (`study_report`: results.csv, results.md, which says what the numbers
came from) and the figures (`study_figures`: curves.png, test_accuracy.png and the study's own).

The flags every study takes (`--quick`, `--out`, `--dataset`, `--data_dir`, `--config`,
`--arms`, `--plot_only`) are defined here; `--config` is the trainer's flag, so any config key can
be overridden for every arm with the trainer's syntax, `--config.num_epochs=30`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import study_figures, study_report
from resnet_jax import cli, config_utils, reporting
from resnet_jax.errors import UserError  # no JAX: a leaf

REPO_ROOT = Path(__file__).resolve().parent.parent

ARM_FILE = "sweep_arm.json"  # in each arm's workdir: the config it was trained with, and where
# Keys that say where things are or how often to log, not what is trained: they may change
# between a run and its resumption.
WHERE_KEYS = (
    "dataset.data_dir",
    "compilation_cache_dir",
    "checkpoint_every_epochs",
    "keep_checkpoints",
    "log_every_steps",
)
# Tiny and fast: a few minutes on a CPU for a whole study. Never a result to report.
QUICK_OVERRIDES: dict[str, Any] = {
    "model.width": 4,
    "num_epochs": 2,
    "num_steps": 0,
    "batch_size": 32,
    "eval_batch_size": 128,
    "schedule.warmup_epochs": 0.0,
}
FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "quick",
    False,
    "Tiny and fast: width-4 CIFAR nets, 2 epochs of batch 32, no warmup (the studies that start "
    "from pretrained weights keep the weights' width and use small inputs). For checking that "
    "a study runs end to end; never a result.",
)
flags.DEFINE_string("out", None, "Where the arms' workdirs and the tables go (workdirs/<study>).")
flags.DEFINE_string(
    "dataset", None, "cifar10, another tfds image dataset, or folder:/path (the study's default)."
)
flags.DEFINE_string("data_dir", None, "tfds data directory (default ~/tensorflow_datasets).")
flags.DEFINE_list("arms", None, "Run only these arms (comma-separated names); default all.")
flags.DEFINE_bool("plot_only", False, "Train nothing: tabulate and plot what the arms have.")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One run of a study: config overrides (dotted keys) and how it looks in figures."""

    name: str  # the workdir name under --out, and the key of the arm in the table
    label: str  # in figures
    overrides: Mapping[str, Any]
    color: str | None = None  # default: the study palette, by the arm's place in the study
    dashed: bool = False  # dashed lines and hatched bars (e.g. the plain nets)


@dataclasses.dataclass(frozen=True)
class ArmResult:
    """What one arm's workdir holds."""

    arm: Arm
    color: str
    workdir: Path
    config: dict[str, Any]  # the resolved config the arm was (or is being) trained with
    epochs: list[dict[str, Any]]  # one merged record per epoch, in order
    results: dict[str, Any] | None  # results.json; None while the arm is unfinished
    hardware: str
    quick: bool  # trained with --quick: a smoke test, never a result
    started: str = ""
    finished: str = ""
    diverged: bool = False  # the loss became NaN/inf: the trainer stopped it without results
    diverged_epoch: int | None = None  # the (1-based) epoch it diverged in, when known

    @property
    def status(self) -> str:
        if self.results is not None:
            return "done"
        if self.diverged:
            return f"diverged (epoch {self.diverged_epoch})" if self.diverged_epoch else "diverged"
        return f"unfinished ({len(self.epochs)} epochs)" if self.epochs else "not started"

    @property
    def eval_split(self) -> str:
        """The held-out split evaluated every epoch: "val", or "test" for runs without one."""
        has_val = any("val_accuracy" in r for r in self.epochs)
        has_test = any("test_accuracy" in r for r in self.epochs)
        return "test" if has_test and not has_val else "val"

    @property
    def iterations_per_epoch(self) -> int | None:
        """Optimizer steps in one (full) epoch, from the epoch records."""
        if not self.epochs:
            return None
        first = self.epochs[0]
        if "steps_per_epoch" in first:
            return first["steps_per_epoch"]
        # Written before epoch records carried it: right unless the first epoch was cut short.
        return round(first["step"] / first["epoch"]) if "step" in first and first["epoch"] else None

    def last(self, key: str) -> float | None:
        """The key's value at the last epoch that has it."""
        for record in reversed(self.epochs):
            if record.get(key) is not None:
                return record[key]
        return None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs done, values) of a per-epoch key."""
        points = [(reporting.epochs_done(r), r[key]) for r in self.epochs if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]


@dataclasses.dataclass(frozen=True)
class Study:
    """A study: its arms (built from the parsed flags), base config and figures.

    `arms` returns every arm of the study; `--arms` then selects among them by name.
    `quick_overrides` are added to QUICK_OVERRIDES under `--quick`. `figures` draws the study's
    own figures into the output directory and returns their paths.
    """

    name: str
    title: str
    base_config: str  # relative to the repository root
    arms: Callable[[], list[Arm]]
    full_command: str
    quick_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    figures: Callable[[list[ArmResult], Path], list[Path]] | None = None
    # Per-arm table columns computed from its results (e.g. iterations per epoch).
    columns: Callable[[ArmResult], dict[str, Any]] | None = None
    dataset: str | None = None  # default --dataset; None keeps the base config's
    # Applied to the base config for every arm (not a column of the table: no arm differs).
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""  # a paragraph for results.md: what the study compares and how


# --- flags ---------------------------------------------------------------------------------------


def parse_flags(study: Study, argv: Sequence[str]) -> list[str]:
    """Parses `argv` (argv[0] is the program) into FLAGS: the study flags, and --config as the
    trainer's command line defines it (`define_config_flag`). A flag that does not parse, or an
    argument that is no flag, is a SweepError."""
    argv = list(argv)
    FLAGS.unparse_flags()  # a second in-process run (tests) starts from the defaults too
    try:
        define_config_flag(study, argv)
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises only when read
    except cli.FLAG_ERRORS as error:
        raise SweepError(cli.explain_flag_error(error, argv)) from None
    if len(rest) > 1:
        raise SweepError(
            f"Unexpected arguments: {' '.join(rest[1:])}. Flags take their value after '=', "
            "e.g. --config.num_epochs=30 or --arms=constant,cosine."
        )
    return rest


def define_config_flag(study: Study, argv: list[str]) -> None:
    """--config, the trainer's config-file flag, with the study's base config as its default.
    Its --config.KEY=VALUE overrides become flags of their own, read from `argv`, so it is defined
    afresh for each parse."""
    for name in [name for name in FLAGS if name == "config" or name.startswith("config.")]:
        delattr(FLAGS, name)
    config_flags.DEFINE_config_file(
        "config", str(REPO_ROOT / study.base_config),
        "The base config file the arms override (the study's own by default); override its keys "
        "for every arm as --config.KEY=VALUE.",
        lock_config=True, sys_argv=argv,
    )  # fmt: skip
    # --help lists the program's key flags (absl names the main module by sys.argv[0]).
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS["config"])


def run_cli(study: Study) -> None:
    """The script entry point: `app.run` with the study's flags."""

    def parse_or_exit(argv: Sequence[str]) -> list[str]:
        try:
            return parse_flags(study, argv)
        except SweepError as error:
            cli.exit_with_message(str(error))

    cli.quiet_library_info()
    app.run(lambda argv: _run_or_exit(study), flags_parser=parse_or_exit)


def main(study: Study, argv: Sequence[str]) -> list[ArmResult]:
    """Parses `argv` (argv[0] is the program name) and runs the study; for tests and notebooks."""
    parse_flags(study, argv)
    return run(study)


def _run_or_exit(study: Study) -> None:
    """`run`, where a mistake the user can fix ends in its message and exit status 1, and a
    SIGINT/SIGTERM (the trainer saves a checkpoint first) in 128 + the signal's number."""
    from resnet_jax import loop

    try:
        run(study)
    except loop.Interrupted as stopped:
        print(f"{stopped} Rerun the same command to resume the sweep.", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except UserError as error:
        cli.exit_with_message(str(error))


class SweepError(UserError):
    """A problem the user can fix (a bad flag, a workdir trained with another config)."""


def define_pretrained_flag() -> None:
    """--pretrained, for the studies that start from torchvision weights (defined once)."""
    if "pretrained" not in FLAGS:
        flags.DEFINE_string(
            "pretrained",
            None,
            "torchvision ImageNet weights for the study's network: a .pth/.safetensors file or a "
            "`python -m resnet_jax.convert` output directory (resnet_jax never downloads them).",
        )


def pretrained_path(arch: str, needed: bool = True) -> str:
    """The absolute path --pretrained names; a SweepError saying where to get it if missing."""
    if not FLAGS.pretrained:
        if not needed or FLAGS.plot_only:
            return ""
        from resnet_jax.convert import TORCHVISION_URLS

        url = TORCHVISION_URLS.get(arch, "")
        raise SweepError(
            f"This study needs pretrained weights: pass --pretrained PATH, e.g. torchvision's "
            f"{arch} weights from {url} (a .pth file, or a directory converted with "
            "`python -m resnet_jax.convert`)."
        )
    path = Path(FLAGS.pretrained).expanduser().resolve()
    if not path.exists():
        raise SweepError(f"--pretrained {FLAGS.pretrained}: no such file or directory.")
    return str(path)


# --- configs -------------------------------------------------------------------------------------


def base_config(study: Study) -> ml_collections.ConfigDict:
    """--config (the study's base config unless given) with the study's overrides, --quick's,
    --dataset and --data_dir applied, then the --config.KEY=VALUE overrides again: they win."""
    config = FLAGS.config.copy_and_resolve_references()
    given = config_flags.get_override_values(FLAGS["config"])
    settings = dict(study.overrides)
    if FLAGS.quick:
        settings |= QUICK_OVERRIDES | dict(study.quick_overrides)
    dataset = FLAGS.dataset or study.dataset
    if dataset:
        settings["dataset.name"] = dataset
    if FLAGS.data_dir:
        settings["dataset.data_dir"] = FLAGS.data_dir
    config.update_from_flattened_dict(settings | given)
    config_utils.epochs_replace_steps(config, given)
    return config


def arm_config(base: ml_collections.ConfigDict, arm: Arm) -> ml_collections.ConfigDict:
    """The base config with the arm's overrides."""
    config = base.copy_and_resolve_references()
    config.update_from_flattened_dict(dict(arm.overrides))
    return config


def check_no_clashes(arms: Sequence[Arm]) -> None:
    """A SweepError if --config sets a key that an arm sets too: the arm's value would win."""
    for key in config_flags.get_override_values(FLAGS["config"]):
        setting = [arm.name for arm in arms if key in arm.overrides]
        if setting:
            raise SweepError(
                f"--config.{key} is what this study's arms vary ({', '.join(setting)} set it), so "
                "it would be replaced in them. Set what the arms use with the study's own flags "
                "(--help lists them), or leave out those arms with --arms."
            )


def _as_json(config: Any) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), to compare with a stored one."""
    return json.loads(json.dumps(config.to_dict()))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two configs, key by key (WHERE_KEYS aside)."""
    old, new = config_utils.flatten(old), config_utils.flatten(new)
    return [
        f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"
        for key in sorted(old.keys() | new.keys())
        if key not in WHERE_KEYS and old.get(key) != new.get(key)
    ]


# --- running -------------------------------------------------------------------------------------


def hardware() -> str:
    """What this process computes on, e.g. "1x cpu (x86_64, 2 cores)"."""
    import jax

    devices = jax.devices()
    kinds = sorted({device.device_kind for device in devices})
    text = f"{len(devices)}x {'/'.join(kinds)} ({jax.default_backend()})"
    return f"{text}, host {platform.machine()} with {os.cpu_count()} CPU cores"


def select_arms(study: Study) -> tuple[list[Arm], list[Arm]]:
    """(every arm of the study, the ones --arms selects)."""
    every = study.arms()
    names = [arm.name for arm in every]
    if len(set(names)) != len(names):
        raise SweepError(f"Two arms share a name in {names}.")
    if not FLAGS.arms:
        return every, every
    unknown = [name for name in FLAGS.arms if name not in names]
    if unknown:
        raise SweepError(f"Unknown arms {unknown}; this study's arms are: {', '.join(names)}.")
    return every, [arm for arm in every if arm.name in FLAGS.arms]


def run(study: Study) -> list[ArmResult]:
    """Trains (or resumes) the selected arms, then writes the table and figures."""
    from resnet_jax import files

    out = Path(FLAGS.out or Path("workdirs") / study.name)
    files.check_writable(out, "--out")  # before hours of training, not after
    every, selected = select_arms(study)
    check_no_clashes(selected)
    base = base_config(study)
    configs = {arm.name: arm_config(base, arm) for arm in selected}
    if not FLAGS.plot_only:
        for arm in selected:  # every mistake is reported before anything trains
            try:
                config_utils.resolve(configs[arm.name])
            except config_utils.ConfigError as error:
                raise SweepError(f"Arm {arm.name}: {error}") from None
            _check_workdir(out / arm.name, configs[arm.name])
    if not FLAGS.plot_only:
        for i, arm in enumerate(selected, 1):
            workdir = out / arm.name
            if (workdir / reporting.RESULTS_FILE).exists():
                print(f"[{i}/{len(selected)}] {arm.name}: finished earlier; not trained again.")
                continue
            if _read_arm_file(workdir).get("diverged"):
                print(
                    f"[{i}/{len(selected)}] {arm.name}: diverged earlier; not trained again "
                    f"(delete {workdir} to try again)."
                )
                continue
            resuming = (workdir / reporting.METRICS_FILE).exists()
            print(f"[{i}/{len(selected)}] {arm.name}: {'resuming' if resuming else 'training'}.")
            train_arm(configs[arm.name], workdir, study, arm)
    results = [collect(every, arm, out / arm.name) for arm in selected]
    study_report.write_reports(study, results, out)
    return results


def _check_workdir(workdir: Path, config: Any) -> None:
    stored = workdir / ARM_FILE
    if not stored.exists():
        return
    old = json.loads(stored.read_text())
    differences = _differences(old["config"], _as_json(config))
    if old.get("quick", False) != bool(FLAGS.quick):
        then = "with --quick" if old.get("quick") else "at full scale"
        differences.insert(0, f"it was trained {then}")
    if differences:
        raise SweepError(
            f"{workdir} holds a run made with another config ({'; '.join(differences)}). "
            "Pass another --out, or delete that directory to train the arm again."
        )


def train_arm(config: Any, workdir: Path, study: Study, arm: Arm) -> None:
    from resnet_jax import files, loop  # imports JAX and TensorFlow: only when something trains

    workdir.mkdir(parents=True, exist_ok=True)
    stored = workdir / ARM_FILE
    record = json.loads(stored.read_text()) if stored.exists() else {}
    record.update(
        study=study.name,
        arm=arm.name,
        quick=bool(FLAGS.quick),
        config=_as_json(config),
    )
    record.setdefault("hardware", [])
    if hardware() not in record["hardware"]:
        record["hardware"].append(hardware())
    record.setdefault("started", _now())
    files.write_text(stored, json.dumps(record, indent=2) + "\n")
    try:
        loop.train_and_evaluate(config, str(workdir))
    except loop.DivergedError as error:
        # A result of the study (e.g. too high a learning rate), not a failure of the sweep.
        print(f"{arm.name} diverged: {error}")
        record.update(diverged=str(error), diverged_epoch=error.epoch)
    record["finished"] = _now()
    files.write_text(stored, json.dumps(record, indent=2) + "\n")


def _read_arm_file(workdir: Path) -> dict[str, Any]:
    stored = workdir / ARM_FILE
    return json.loads(stored.read_text()) if stored.exists() else {}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- reading a workdir ---------------------------------------------------------------------------


def epoch_records(workdir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of the run's metrics (`reporting.read_metrics`), one per epoch, in
    order; should an epoch have two, the one written last."""
    by_epoch = {
        round(record["epoch"]): record
        for record in reporting.read_metrics(workdir)
        if record.get("record") == "epoch"
    }
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def collect(every: Sequence[Arm], arm: Arm, workdir: Path) -> ArmResult:
    """What `arm`'s workdir holds (`every`: the study's arms, which fix its colour)."""
    record = _read_arm_file(workdir)
    return ArmResult(
        arm=arm,
        color=study_figures.arm_color(every, arm),
        workdir=workdir,
        config=record.get("config", {}),
        epochs=epoch_records(workdir),
        results=reporting.read_results(workdir),
        hardware="; ".join(record.get("hardware", [])),
        quick=record.get("quick", bool(FLAGS.quick)),
        started=record.get("started", ""),
        finished=record.get("finished", ""),
        diverged=bool(record.get("diverged")),
        diverged_epoch=record.get("diverged_epoch"),
    )

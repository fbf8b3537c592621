"""What every study script shares: arms, running and resuming them, the table and the figures.

A study is a base config and a list of arms, each arm a few config overrides. `main` trains every
arm with `resnet_jax.loop.train_and_evaluate` in its own workdir `<out>/<arm>/`: an arm that has
its results.json is not trained again, and an interrupted one resumes from its checkpoints. Then it
writes to `<out>/`:

    results.csv, results.md   one row per arm: what the arm changes, its final metrics, status
    curves.png                validation accuracy and training loss against epoch, every arm
    test_accuracy.png         final test accuracy, one bar per arm
    (and the figures the study adds)

Every arm keeps one colour (and line style) in every figure, and lines are labelled where they
end, so no figure needs a legend. results.md says what the numbers came from: the data set, the
scale (`--quick` or full) and the hardware each arm was trained on.

The flags every study takes (`--quick`, `--out`, `--dataset`, `--data_dir`, `--config`,
`--arms`, `--plot_only`) are defined here; any config key can be overridden for every arm with
the trainer's syntax, `--config.num_epochs=30`.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

REPO_ROOT = Path(__file__).resolve().parent.parent

ARM_FILE = "sweep_arm.json"  # in each arm's workdir: the config it was trained with, and where
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
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
# One colour per arm, in the study's arm order; an arm may name its own.
PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
    "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173",
)  # fmt: skip

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
flags.DEFINE_string("config", None, "The base config file the arms override (the study's own).")
flags.DEFINE_list("arms", None, "Run only these arms (comma-separated names); default all.")
flags.DEFINE_bool("plot_only", False, "Train nothing: tabulate and plot what the arms have.")
flags.DEFINE_multi_string(
    "set", [], "key=value overrides for every arm; the same as --config.key=value."
)


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


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses the flags, turning the trainer's `--config.key=value` into `--set=key=value` (and
    its booleans, `--config.key` and `--noconfig.key`, into `=true` and `=false`). A flag that
    does not parse, or an argument that is no flag, is a SweepError."""
    rewritten = []
    for arg in argv:
        if arg.startswith(("--config.", "--noconfig.")):
            key, sep, value = arg.removeprefix("--").partition("=")
            negated = key.startswith("no")
            value = value if sep else ("false" if negated else "true")
            rewritten.append(f"--set={key.removeprefix('no').removeprefix('config.')}={value}")
        else:
            rewritten.append(arg)
    FLAGS.unparse_flags()  # a second in-process run (tests) starts from the defaults too
    try:
        rest = FLAGS(rewritten)
    except flags.Error as error:
        reason = str(error).strip().splitlines()[-1]
        raise SweepError(f"{reason}. Run with --help to see this study's flags.") from None
    if len(rest) > 1:
        raise SweepError(
            f"Unexpected arguments: {' '.join(rest[1:])}. Flags take their value after '=', "
            "e.g. --config.num_epochs=30 or --arms=constant,cosine."
        )
    return rest


def run_cli(study: Study) -> None:
    """The script entry point: `app.run` with the study's flags."""
    from resnet_jax import cli

    def parse_or_exit(argv: Sequence[str]) -> list[str]:
        try:
            return parse_flags(argv)
        except SweepError as error:
            cli.exit_with_message(str(error))

    cli.quiet_library_info()
    app.run(lambda argv: _run_or_exit(study), flags_parser=parse_or_exit)


def main(study: Study, argv: Sequence[str]) -> list[ArmResult]:
    """Parses `argv` (argv[0] is the program name) and runs the study; for tests and notebooks."""
    parse_flags(argv)
    return run(study)


def _run_or_exit(study: Study) -> None:
    """`run`, where a mistake the user can fix ends in its message and exit status 1, and a
    SIGINT/SIGTERM (the trainer saves a checkpoint first) in 128 + the signal's number."""
    from resnet_jax import cli, loop

    try:
        run(study)
    except loop.Interrupted as stopped:
        print(f"{stopped} Rerun the same command to resume the sweep.", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except ValueError as error:
        if isinstance(error, SweepError) or cli.is_user_error(error):
            cli.exit_with_message(str(error))
        raise


class SweepError(ValueError):
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


def load_config(path: str | Path) -> Any:
    """`get_config()` of a config file (relative paths from the repository root or cwd)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise SweepError(f"No config file at {path}.")
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def set_key(config: Any, key: str, value: Any) -> None:
    """config["a.b.c"] = value, for a key that exists (a typo must not add a key)."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise SweepError(f"Unknown config key {key!r}: no {part!r} in the config.")
        node = node[part]
    if leaf not in node:
        raise SweepError(f"Unknown config key {key!r}: valid keys here are {sorted(node)}.")
    current = node[leaf]
    if isinstance(current, bool) and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise SweepError(f"{key} takes true or false, got {value!r}.")
        value = value.lower() in ("true", "1")
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except TypeError as error:
        raise SweepError(f"Bad value for {key}: {error}") from None


def parse_value(text: str) -> Any:
    """A Python literal if `text` is one (1e-3, True, (2, 3)), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def user_overrides() -> dict[str, Any]:
    """The --config.key=value overrides of the command line, in order."""
    overrides = {}
    for item in FLAGS.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--config.{item}: expected --config.key=value.")
        overrides[key] = parse_value(value)
    return overrides


def base_config(study: Study) -> Any:
    """The study's base config with --quick, --dataset, --data_dir and --config.* applied."""
    from resnet_jax import config_utils

    config = load_config(FLAGS.config or study.base_config)
    for key, value in study.overrides.items():
        set_key(config, key, value)
    if FLAGS.quick:
        for key, value in {**QUICK_OVERRIDES, **study.quick_overrides}.items():
            set_key(config, key, value)
    dataset = FLAGS.dataset or study.dataset
    if dataset:
        set_key(config, "dataset.name", dataset)
    if FLAGS.data_dir:
        set_key(config, "dataset.data_dir", FLAGS.data_dir)
    given = user_overrides()
    for key, value in given.items():
        set_key(config, key, value)
    config_utils.epochs_replace_steps(config, given)
    return config


def arm_config(base: Any, arm: Arm) -> Any:
    config = base.copy_and_resolve_references()
    for key, value in arm.overrides.items():
        set_key(config, key, value)
    return config


def check_no_clashes(arms: Sequence[Arm]) -> None:
    """A SweepError if --config sets a key that an arm sets too: the arm's value would win."""
    given = user_overrides()
    for key in given:
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


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        name = f"{prefix}{key}"
        if name in WHERE_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, name + ".")
        elif a != b:
            found.append(f"{name}: {a!r} then, {b!r} now")
    return found


# --- running -------------------------------------------------------------------------------------


def hardware() -> str:
    """What this process computes on, e.g. "1x cpu (x86_64, 2 cores)"."""
    import jax

    devices = jax.devices()
    kinds = sorted({device.device_kind for device in devices})
    text = f"{len(devices)}x {'/'.join(kinds)} ({jax.default_backend()})"
    return f"{text}, host {platform.machine()} with {os.cpu_count()} CPU cores"


def arm_color(study_arms: Sequence[Arm], arm: Arm) -> str:
    if arm.color:
        return arm.color
    index = [a.name for a in study_arms].index(arm.name)
    return PALETTE[index % len(PALETTE)]


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
        from resnet_jax import config_utils

        for arm in selected:  # every mistake is reported before anything trains
            try:
                config_utils.resolve(configs[arm.name])
            except config_utils.ConfigError as error:
                raise SweepError(f"Arm {arm.name}: {error}") from None
            _check_workdir(out / arm.name, configs[arm.name])
    if not FLAGS.plot_only:
        for i, arm in enumerate(selected, 1):
            workdir = out / arm.name
            if (workdir / RESULTS_FILE).exists():
                print(f"[{i}/{len(selected)}] {arm.name}: finished earlier; not trained again.")
                continue
            if _read_arm_file(workdir).get("diverged"):
                print(
                    f"[{i}/{len(selected)}] {arm.name}: diverged earlier; not trained again "
                    f"(delete {workdir} to try again)."
                )
                continue
            resuming = (workdir / METRICS_FILE).exists()
            print(f"[{i}/{len(selected)}] {arm.name}: {'resuming' if resuming else 'training'}.")
            train_arm(configs[arm.name], workdir, study, arm)
    results = [collect(study, every, arm, out / arm.name) for arm in selected]
    write_reports(study, results, out)
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


def read_epochs(workdir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl (`"record": "epoch"`), one per epoch, in order.

    A line cut short by a killed run is skipped; after a resume the record written last wins.
    """
    path = workdir / METRICS_FILE
    if not path.exists():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("record") == "epoch":
            by_epoch[round(record["epoch"])] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def eval_split(result: ArmResult) -> str:
    """The held-out split evaluated every epoch: "val", or "test" for runs without a val split."""
    has_val = any("val_accuracy" in r for r in result.epochs)
    has_test = any("test_accuracy" in r for r in result.epochs)
    return "test" if has_test and not has_val else "val"


def iterations_per_epoch(result: ArmResult) -> int | None:
    """Optimizer steps in one (full) epoch, from the epoch records."""
    if not result.epochs:
        return None
    first = result.epochs[0]
    if "steps_per_epoch" in first:
        return first["steps_per_epoch"]
    # Written before epoch records carried it: right unless the first epoch was cut short.
    return round(first["step"] / first["epoch"]) if "step" in first and first["epoch"] else None


def read_results(workdir: Path) -> dict[str, Any] | None:
    path = workdir / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def collect(study: Study, every: Sequence[Arm], arm: Arm, workdir: Path) -> ArmResult:
    record = _read_arm_file(workdir)
    return ArmResult(
        arm=arm,
        color=arm_color(every, arm),
        workdir=workdir,
        config=record.get("config", {}),
        epochs=read_epochs(workdir),
        results=read_results(workdir),
        hardware="; ".join(record.get("hardware", [])),
        quick=record.get("quick", bool(FLAGS.quick)),
        started=record.get("started", ""),
        finished=record.get("finished", ""),
        diverged=bool(record.get("diverged")),
        diverged_epoch=record.get("diverged_epoch"),
    )


def last(result: ArmResult, key: str) -> float | None:
    """The key's value at the last epoch that has it."""
    for record in reversed(result.epochs):
        if record.get(key) is not None:
            return record[key]
    return None


def series(result: ArmResult, key: str) -> tuple[list[float], list[float]]:
    """(epochs done, values) of a per-epoch key."""
    from resnet_jax.reporting import epochs_done

    points = [(epochs_done(r), r[key]) for r in result.epochs if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


# --- the table -----------------------------------------------------------------------------------


def table(study: Study, results: Sequence[ArmResult]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): the keys the arms override, then the final metrics."""
    varied = []
    for result in results:
        for key in result.arm.overrides:
            if key not in varied:
                varied.append(key)
    rows = []
    for result in results:
        row: dict[str, Any] = {"arm": result.arm.name}
        for key in varied:
            row[key] = _lookup(result.config, key)
        row["iterations_per_epoch"] = iterations_per_epoch(result)
        if study.columns:
            row.update(study.columns(result))
        res = result.results or {}
        val_accuracies = [r["val_accuracy"] for r in result.epochs if "val_accuracy" in r]
        row.update(
            {
                "epochs": len(result.epochs),
                "final_train_loss": last(result, "train_loss"),
                "final_train_accuracy": last(result, "train_accuracy"),
                "final_val_accuracy": last(result, "val_accuracy"),
                "best_val_accuracy": max(val_accuracies) if val_accuracies else None,
                "test_accuracy": res.get("test_accuracy"),
                "test_error": None if "test_accuracy" not in res else 1.0 - res["test_accuracy"],
                "precision": res.get("precision"),
                "recall": res.get("recall"),
                "f1": res.get("f1"),
                "status": result.status,
            }
        )
        rows.append(row)
    columns = list(rows[0]) if rows else ["arm"]
    if results and all(eval_split(result) == "test" for result in results):
        # Every epoch is evaluated on the test split (degradation): no validation columns.
        columns = [key for key in columns if key not in ("final_val_accuracy", "best_val_accuracy")]
    return columns, rows


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if not math.isnan(value) else "nan"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    from resnet_jax import files

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _cell(row.get(key)) for key in columns})

    files.write_atomically(path, write)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key)
            if isinstance(value, float) and key in ("precision", "recall", "f1"):
                cells.append(f"{value:.4f}")
            elif isinstance(value, float) and ("accuracy" in key or key == "test_error"):
                cells.append(f"{100 * value:.2f}%")
            else:
                cells.append(_cell(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(study: Study, results: Sequence[ArmResult]) -> list[str]:
    """Lines saying what the numbers came from: data, scale, hardware, dates, the command."""
    datasets = sorted({_cell(_lookup(r.config, "dataset.name")) for r in results if r.config})
    test_sizes = sorted(
        {
            r.results["num_test_examples"]
            for r in results
            if r.results and "num_test_examples" in r.results
        }
    )
    data = ", ".join(datasets) or "unknown"
    if test_sizes:
        data += f" ({', '.join(map(str, test_sizes))} test examples)"
        if datasets == ["cifar10"] and test_sizes != [10_000]:
            data += ": NOT the real CIFAR-10 test set, which has 10000"
    if any(r.quick for r in results):
        scale = (
            "QUICK RUN (--quick: tiny nets, few steps): a smoke test of the pipeline, not a result"
        )
    else:
        scale = "full scale (the study's config; the table gives the epochs each arm ran)"
    hardware_set = sorted({r.hardware for r in results if r.hardware})
    dates = sorted({d for r in results for d in (r.started, r.finished) if d})
    lines = [
        f"- Data: {data}",
        f"- Scale: {scale}",
        f"- Hardware: {' | '.join(hardware_set) or 'unknown'}",
    ]
    if dates:
        lines.append(f"- Trained: {dates[0]} to {dates[-1]}")
    lines.append(f"- Full-scale command: `{study.full_command}`")
    return lines


def write_reports(study: Study, results: list[ArmResult], out: Path) -> list[Path]:
    """results.csv, results.md and the figures; returns the figure paths."""
    import matplotlib

    from resnet_jax import files

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table(study, results)
    write_csv(out / "results.csv", columns, rows)
    figures = [plot_curves(study, results, out / "curves.png")]
    figures.append(plot_test_accuracy(study, results, out / "test_accuracy.png"))
    if study.figures:
        figures += study.figures(results, out)
    figures = [f for f in figures if f is not None]
    md = [f"# {study.title}", "", *provenance(study, results), ""]
    if study.note:
        quick = any(r.quick for r in results)
        md += [f"At full scale: {study.note}" if quick else study.note, ""]
    md += [markdown_table(columns, rows), ""]
    md += [f"![{f.stem}]({f.name})" for f in figures]
    files.write_text(out / "results.md", "\n".join(md) + "\n")
    print(f"Wrote {out / 'results.csv'}, {out / 'results.md'} and {len(figures)} figures.")
    return figures


# --- figures -------------------------------------------------------------------------------------


def save_figure(fig: Any, path: Path) -> None:
    """Writes and closes `fig`, grown to take in the line-end labels outside its axes."""
    import matplotlib.pyplot as plt

    from resnet_jax import files

    try:
        files.write_atomically(
            path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", pad_inches=0.15)
        )
    finally:
        plt.close(fig)


def label_line_ends(ax: Any, ends: list[tuple[float, float, str, str]]) -> None:
    """Writes each label (x, y, text, color) right of its line's end, spread so none overlap."""
    if not ends:
        return
    low, high = ax.get_ylim()
    gap = 0.055 * (high - low)
    # A line that leaves the axes (a diverged arm's) is labelled at the edge it leaves by.
    ends = [(x, min(max(y, low), high) if math.isfinite(y) else high, t, c) for x, y, t, c in ends]
    placed = sorted(ends, key=lambda e: e[1])
    ys = [e[1] for e in placed]
    for i in range(1, len(ys)):
        ys[i] = max(ys[i], ys[i - 1] + gap)
    overflow = ys[-1] - high
    if overflow > 0:  # pushed past the top: shift the stack down, not below the axis
        ys = [max(y - overflow, low + i * gap) for i, y in enumerate(ys)]
    x_right = ax.get_xlim()[1]
    for (_, _, text, color), y in zip(placed, ys, strict=True):
        ax.annotate(
            text,
            xy=(x_right, y),
            xytext=(4, 0),
            textcoords="offset points",
            color=color,
            fontsize=8,
            va="center",
            annotation_clip=False,
        )


def plot_lines(
    ax: Any,
    results: Sequence[ArmResult],
    key: str | Callable[[ArmResult], str],
    scale: float = 1.0,
    label_ends: bool = True,
) -> None:
    """One line per arm of a per-epoch key (or a key chosen per arm) in the arm's style. A
    diverged arm is labelled so, and does not set the y range when other arms are on the axes."""
    ends = []
    settled = []  # the values of the arms that did not diverge
    for result in results:
        x, y = series(result, key(result) if callable(key) else key)
        if not x:
            continue
        y = [scale * v for v in y]
        if not result.diverged:
            settled += [v for v in y if math.isfinite(v)]
        ax.plot(
            x,
            y,
            color=result.color,
            linestyle="--" if result.arm.dashed else "-",
            marker="o" if len(x) < 12 else None,
            markersize=3,
            linewidth=1.6,
        )
        label = f"{result.arm.label} (diverged)" if result.diverged else result.arm.label
        ends.append((x[-1], y[-1], label, result.color))
    if settled and any(result.diverged for result in results):
        low, high = min(settled), max(settled)
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - margin, high + margin)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if label_ends:
        label_line_ends(ax, ends)


def quick_mark(text: str, results: Sequence[ArmResult] = ()) -> str:
    """Titles of figures made from --quick arms say so."""
    quick = any(r.quick for r in results) if results else FLAGS.quick
    return text + ("  [QUICK RUN: not a result]" if quick else "")


def plot_curves(study: Study, results: Sequence[ArmResult], path: Path) -> Path:
    """Validation accuracy and training loss against epoch, every arm on each panel."""
    import matplotlib.pyplot as plt

    splits = {eval_split(r) for r in results if r.epochs}
    held_out = (
        "Validation accuracy (%)"
        if splits <= {"val"}
        else "Test accuracy (%), evaluated every epoch"
        if splits == {"test"}
        else "Validation (or test) accuracy (%)"
    )
    # Constrained layout makes room for the line-end labels between the panels.
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    plot_lines(acc_ax, results, lambda r: f"{eval_split(r)}_accuracy", scale=100.0)
    acc_ax.set(title=held_out.split(" (")[0], xlabel="Epoch", ylabel=held_out)
    plot_lines(loss_ax, results, "train_loss")
    loss_ax.set(title="Training loss", xlabel="Epoch", ylabel="Training loss (cross-entropy, nats)")
    fig.suptitle(quick_mark(study.title, results))
    save_figure(fig, path)
    return path


def plot_test_accuracy(study: Study, results: Sequence[ArmResult], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(results) + 2), 5.0))
    xs = range(len(results))
    for x, result in zip(xs, results, strict=True):
        accuracy = (result.results or {}).get("test_accuracy")
        if accuracy is None:
            text = "diverged" if result.diverged else "not\nfinished"
            ax.text(x, 1, text, ha="center", va="bottom", fontsize=8, color=result.color)
            continue
        ax.bar(
            x,
            100 * accuracy,
            color=result.color,
            hatch="//" if result.arm.dashed else None,
            edgecolor="white" if result.arm.dashed else result.color,
        )
        ax.text(x, 100 * accuracy, f"{100 * accuracy:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r.arm.label for r in results], rotation=30, ha="right")
    for tick, result in zip(ax.get_xticklabels(), results, strict=True):
        tick.set_color(result.color)
    ax.set(
        ylabel="Test accuracy (%)",
        ylim=(0, 105),
    )
    title = quick_mark(f"Final test accuracy\n{study.title}", results)
    ax.set_title(title.replace("  [", "\n["), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return path

"""What a run writes into its workdir besides checkpoints: metrics, TensorBoard events, plots and
results.

Only the main process writes (`Reporter(enabled=False)` elsewhere does nothing). metrics.jsonl
has one JSON object per line: `"record": "step"` every `log_every_steps` (train_loss,
train_accuracy, learning_rate, images_per_second) and `"record": "epoch"` at each epoch's end
(the epoch's train_* means and the evaluation split's val_* or test_* figures, and
`steps_per_epoch`); both carry `step` and `epoch` (fractional for step records, the epoch's
number for epoch records: `epochs_done` gives where an epoch record falls). The TensorBoard
events hold the same numbers: on resume they are written again from metrics.jsonl, so that each
step shows once. Whole files are replaced atomically (`files`), and a file that cannot be written
(a full disk) raises `files.WriteError`, which explains itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from matplotlib.figure import Figure
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from tqdm import tqdm

from resnet_jax import files

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
EVENTS_GLOB = "events.out.tfevents.*"
_EVENT_FILE_NUMBERS = itertools.count(1)


class Reporter:
    """Writes metrics.jsonl, TensorBoard events, curves.png and the results of one run."""

    def __init__(self, workdir: Path, *, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            with files.explain_write_errors(self.workdir):
                self.workdir.mkdir(parents=True, exist_ok=True)
            self._open_tensorboard()

    def _open_tensorboard(self) -> None:
        with self._writing_events():
            self._tensorboard = EventFile(self.workdir)

    def _writing_events(self) -> contextlib.AbstractContextManager[None]:
        return files.explain_write_errors(f"TensorBoard events in {self.workdir}")

    def write_config(self, config_json: str) -> None:
        """config.json: the resolved config of this (latest) invocation."""
        if self.enabled:
            files.write_text(self.workdir / CONFIG_FILE, config_json + "\n")

    def keep_history_until(self, step: int) -> None:
        """Drop the records after `step` (on resume, those steps are trained again) from
        metrics.jsonl and from the TensorBoard events, which are written again from it."""
        if not self.enabled:
            return
        records = [r for r in read_metrics(self.workdir) if r["step"] <= step]
        lines = "".join(json.dumps(r) + "\n" for r in records)
        files.write_text(self.workdir / METRICS_FILE, lines)
        self.close()
        with self._writing_events():
            for events in self.workdir.glob(EVENTS_GLOB):
                events.unlink()
        self._open_tensorboard()
        for record in records:
            self._add_scalars(record)
        with self._writing_events():
            self._tensorboard.flush()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and its numbers to TensorBoard."""
        if not self.enabled:
            return
        path = self.workdir / METRICS_FILE
        with files.explain_write_errors(path), open(path, "a") as f:
            f.write(json.dumps(_json_ready(record)) + "\n")
        self._add_scalars(record)
        with self._writing_events():
            self._tensorboard.flush()

    def _add_scalars(self, record: dict[str, Any]) -> None:
        prefix = "epoch/" if record.get("record") == "epoch" else ""
        with self._writing_events():
            for key, value in record.items():
                if key not in ("step", "epoch", "record") and isinstance(value, int | float):
                    self._tensorboard.add_scalar(prefix + key, value, record["step"])

    def plot_curves(self) -> None:
        """curves.png: loss and accuracy (train and evaluation) and the learning rate by epoch."""
        if self.enabled:
            plot_curves(read_metrics(self.workdir), self.workdir / CURVES_FILE)

    def write_results(self, results: dict[str, Any]) -> None:
        """results.json and confusion_matrix.png."""
        if self.enabled:
            write_results(results, self.workdir / RESULTS_FILE, self.workdir / CONFUSION_FILE)

    def close(self) -> None:
        if self._tensorboard is not None:
            writer, self._tensorboard = self._tensorboard, None
            with self._writing_events():
                writer.close()


class Progress:
    """Where a person follows the training steps: a tqdm bar when stderr is a terminal; otherwise
    (a log file under nohup, a notebook's captured output) one log line per logged step, since a
    bar's every redraw would be a line of its own there. Silent when not `enabled`."""

    def __init__(self, total_steps: int, first_step: int, *, enabled: bool = True):
        on_terminal = sys.stderr.isatty()
        self._total, self._lines = total_steps, enabled and not on_terminal
        self._bar = tqdm(
            total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
            mininterval=1.0, disable=not (enabled and on_terminal),
        )  # fmt: skip
        self._epoch = ""

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Name the epoch being trained (0-based `epoch`)."""
        self._epoch = f"epoch {epoch + 1}/{num_epochs}"
        self._bar.set_description(self._epoch)

    def step(self) -> None:
        """One more step done."""
        self._bar.update(1)

    def show(self, record: dict[str, Any]) -> None:
        """A step record's figures: on the bar, or as one log line."""
        loss, accuracy = record["train_loss"], record["train_accuracy"]
        rate, speed = record["learning_rate"], record["images_per_second"]
        if self._lines:
            logging.info(
                "Step %d/%d (%s): train loss %.4f, accuracy %.2f%%, learning rate %.3g, %.0f "
                "images/s.",
                record["step"], self._total, self._epoch, loss, 100 * accuracy, rate, speed,
            )  # fmt: skip
            return
        self._bar.set_postfix(
            loss=f"{loss:.4f}", acc=f"{accuracy:.2%}", lr=f"{rate:.3g}", img_s=f"{speed:,.0f}",
            refresh=False,
        )  # fmt: skip

    def external_write(self) -> contextlib.AbstractContextManager[None]:
        """A context in which other lines are written without breaking the bar."""
        return tqdm.external_write_mode()

    def close(self) -> None:
        self._bar.close()


class EventFile:
    """One TensorBoard event file of scalars, in tensorboard's record format and protos, written
    with Python's file I/O: tensorboard's own writer goes through TensorFlow's file layer whenever
    TensorFlow is installed, and importing it costs a run seconds and ~450 MB."""

    def __init__(self, directory: Path):
        # The number tells apart the files one process opens within a second (a resume).
        name = (
            f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_EVENT_FILE_NUMBERS)}"
        )
        self._records = RecordWriter(open(directory / name, "wb"))  # noqa: SIM115 (close())
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=step)
        event.summary.value.add(tag=tag, simple_value=value)
        self._write(event)

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def write_results(results: dict[str, Any], json_path: Path, confusion_png: Path) -> None:
    """Test results as JSON, and their confusion matrix as a picture (each written atomically)."""
    files.write_text(json_path, json.dumps(_json_ready(results), indent=2) + "\n")
    plot_confusion_matrix(
        np.asarray(results["confusion_matrix"]),
        results["class_names"],
        confusion_png,
        title=f"{results['model']}: test accuracy {results['test_accuracy']:.2%}",
    )


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The records of `workdir`/metrics.jsonl, in order ([] if there is none). A line cut short
    (a full disk, kill -9) is skipped: a resume rewrites the file without it."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_results(workdir: Path) -> dict[str, Any] | None:
    """`workdir`/results.json, or None if the run has not written it."""
    path = Path(workdir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def epochs_done(record: dict[str, Any]) -> float:
    """How many epochs' worth of steps a metrics record comes after: a last epoch that num_steps
    cuts short ends between whole numbers (ResNet-20's 64k steps are 164.1 epochs of 390)."""
    if record.get("steps_per_epoch"):
        return record["step"] / record["steps_per_epoch"]
    return record["epoch"]


def plot_curves(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Three panels against epoch: loss, accuracy (train and evaluation, the EMA weights' too),
    learning rate."""
    epochs = [r for r in records if r.get("record") == "epoch"]
    steps = [r for r in records if r.get("record") == "step"]
    # A Figure of its own draws to a file without pyplot: no backend, no window, no global state.
    figure = Figure(figsize=(15, 4.2))
    loss_ax, accuracy_ax, lr_ax = figure.subplots(1, 3)
    for split in ("train", "val", "test", "ema_val", "ema_test"):
        points = [r for r in epochs if f"{split}_loss" in r]
        if points:
            x = [epochs_done(r) for r in points]
            loss_ax.plot(x, [r[f"{split}_loss"] for r in points], marker=".", label=split)
            accuracy_ax.plot(x, [r[f"{split}_accuracy"] for r in points], marker=".", label=split)
    lr_points = steps or epochs
    lr_ax.plot([epochs_done(r) for r in lr_points], [r.get("learning_rate") for r in lr_points])
    for ax, title in ((loss_ax, "loss"), (accuracy_ax, "accuracy"), (lr_ax, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax is not lr_ax and ax.has_data():
            ax.legend()
    figure.tight_layout()
    files.write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100))


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str = ""
) -> None:
    """A heat map of counts[true, predicted], annotated with the counts when it is small."""
    num_classes = len(class_names)
    size = max(5.0, 0.5 * num_classes + 2)
    figure = Figure(figsize=(size + 1, size))
    ax = figure.subplots()
    image = ax.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046)
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if num_classes <= 20:
        threshold = confusion.max() / 2
        for (i, j), count in np.ndenumerate(confusion):
            color = "white" if count > threshold else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    files.write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100))


def _json_ready(value: Any) -> Any:
    """numpy scalars and arrays -> Python numbers and lists; NaN/inf -> None (valid JSON)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

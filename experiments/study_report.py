"""A study's table: results.csv and results.md in its output directory.

One row per arm: the config keys the arms vary, iterations per epoch, the final training and
held-out figures, test accuracy and error, precision, recall, F1 and the arm's status. results.md
starts with where the numbers came from (data, scale, hardware, dates, the full-scale command)
and ends with the study's figures (`study_figures`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments import study_figures
from resnet_jax import config_utils, files

if TYPE_CHECKING:
    from experiments.sweep import ArmResult, Study


def write_reports(study: Study, results: list[ArmResult], out: Path) -> list[Path]:
    """results.csv, results.md and the figures; returns the figure paths."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = table(study, results)
    write_csv(out / "results.csv", columns, rows)
    figures = [study_figures.plot_curves(study, results, out / "curves.png")]
    figures.append(study_figures.plot_test_accuracy(study, results, out / "test_accuracy.png"))
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


def table(study: Study, results: Sequence[ArmResult]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): the keys the arms override, then the final metrics."""
    varied = []
    for result in results:
        for key in result.arm.overrides:
            if key not in varied:
                varied.append(key)
    rows = []
    for result in results:
        config = config_utils.flatten(result.config)
        row: dict[str, Any] = {"arm": result.arm.name}
        for key in varied:
            row[key] = config.get(key)
        row["iterations_per_epoch"] = result.iterations_per_epoch
        if study.columns:
            row.update(study.columns(result))
        res = result.results or {}
        val_accuracies = [r["val_accuracy"] for r in result.epochs if "val_accuracy" in r]
        row.update(
            {
                "epochs": len(result.epochs),
                "final_train_loss": result.last("train_loss"),
                "final_train_accuracy": result.last("train_accuracy"),
                "final_val_accuracy": result.last("val_accuracy"),
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
    if results and all(result.eval_split == "test" for result in results):
        # Every epoch is evaluated on the test split (degradation): no validation columns.
        columns = [key for key in columns if key not in ("final_val_accuracy", "best_val_accuracy")]
    return columns, rows


def _cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, lists space-separated, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if not math.isnan(value) else "nan"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """The table as CSV (written atomically), cells as `_cell` formats them."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _cell(row.get(key)) for key in columns})

    files.write_atomically(path, write)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The table in markdown, accuracies as percentages."""
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
    names = [config_utils.flatten(r.config).get("dataset.name") for r in results if r.config]
    datasets = sorted({_cell(name) for name in names})
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

"""Exact evaluation of a model over a split: masked sums, the confusion matrix, test-time
augmentation, and results.json's figures from them. Used by the training loop (each epoch, and the
test at the end) and by the `evaluate` command.

Evaluation batches are padded to full size and carry a mask (`data.eval_batches`); the compiled
`train_state.EvalStep` sums loss, correct predictions, count and confusion over the real examples
only, and the sums stay on the device until the split is done, so the figures are exact whatever
the batch size or device count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import data, metrics, parallel


def on_devices(batches: Iterable[data.Batch], par: parallel.Parallel) -> Iterator[dict[str, Any]]:
    """`batches` placed with the run's batch sharding, one ahead: the next batch's copy to the
    devices starts while the current step runs."""
    ahead = None
    for batch in batches:
        placed = par.shard_batch(batch)
        if ahead is not None:
            yield ahead
        ahead = placed
    if ahead is not None:
        yield ahead


def evaluate_split(
    eval_step: Callable[..., Any],
    variables: Any,
    batches: Iterable[data.Batch],
    par: parallel.Parallel,
) -> dict[str, Any]:
    """Exact loss, accuracy and confusion matrix of `variables` (placed on the devices) over a
    split's padded, masked `batches`, with a compiled `EvalStep`."""
    totals = None
    for batch in on_devices(batches, par):
        out = eval_step(variables, batch)
        sums = {key: out[key] for key in ("loss_sum", "correct", "count", "confusion")}
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = par.fetch(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "confusion": np.asarray(totals["confusion"], np.int64),
        "count": int(count),
    }


def summarize_test(evaluation: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """results.json's figures from `evaluate_split` on the test split: loss, accuracy, macro
    precision/recall/F1, per-class figures, the confusion matrix and the class names."""
    report = metrics.classification_report(evaluation["confusion"], class_names)
    return {
        "test_loss": evaluation["loss"],
        "test_accuracy": report.pop("accuracy"),
        "num_test_examples": report.pop("num_examples"),
        **report,
    }


def flip_averaged(apply_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`apply_fn` whose logits are the mean of the logits of the images and of their left-right
    mirror images (test-time augmentation "flip")."""

    def apply(variables: dict[str, Any], images: jax.Array, **kwargs: Any) -> jax.Array:
        logits = apply_fn(variables, images, **kwargs)
        mirrored = apply_fn(variables, images[:, :, ::-1], **kwargs)
        return (logits + mirrored) / 2

    return apply


# Test-time augmentations: how each changes the model's apply function.
TTA: dict[str, Callable[[Callable[..., jax.Array]], Callable[..., jax.Array]]] = {
    "flip": flip_averaged
}

"""Confusion matrices and the precision, recall and F1 computed exactly from them.

The compiled eval step returns per-batch confusion counts; summing them over an epoch and calling
`classification_report` gives exact figures (no averaging of per-batch ratios).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, mask: jax.Array | None = None
) -> jax.Array:
    """counts[i, j]: examples of true class i predicted as j; masked-out examples count nowhere."""
    weights = jnp.ones(labels.shape, jnp.int32) if mask is None else mask.astype(jnp.int32)
    true = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * weights[:, None]
    predicted = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
    return true.T @ predicted


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # A class never predicted (or never present) scores 0, as scikit-learn's zero_division=0.
    return np.divide(
        numerator, denominator, out=np.zeros_like(numerator, float), where=denominator > 0
    )


def precision_recall_f1(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision TP/(TP+FP), recall TP/(TP+FN) and F1 from a confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.int64)
    true_positive = np.diag(confusion).astype(float)
    precision = _safe_divide(true_positive, confusion.sum(axis=0))
    recall = _safe_divide(true_positive, confusion.sum(axis=1))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def classification_report(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class figures by name, as JSON-ready values.

    Macro: the unweighted mean over every class of the data set, as scikit-learn's
    average="macro" with labels=all classes (a class absent from the split and never predicted
    counts as 0; scikit-learn's default would leave it out).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    per_class = precision_recall_f1(confusion)
    total = int(confusion.sum())
    return {
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "precision": float(per_class["precision"].mean()),
        "recall": float(per_class["recall"].mean()),
        "f1": float(per_class["f1"].mean()),
        "per_class": {
            name: {key: float(values[i]) for key, values in per_class.items()}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
        "num_examples": total,
    }

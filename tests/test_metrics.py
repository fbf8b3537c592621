"""Confusion matrices, precision/recall/F1 and the classification report against direct counts."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import metrics

# A hand-worked example: 6 real examples of 3 classes, class 2 is never predicted, and two padded
# examples (mask False) that would add a correct class-2 prediction and a wrong class-0 one.
LABELS = [0, 0, 1, 1, 2, 2, 2, 0]
PREDICTIONS = [0, 1, 1, 1, 0, 1, 2, 1]
MASK = [True] * 6 + [False] * 2
# rows: true class, columns: predicted class, real examples only.
EXPECTED_CONFUSION = [[1, 1, 0], [0, 2, 0], [1, 1, 0]]
# precision = TP / column sum: 1/2, 2/4, 0/0 -> 0; recall = TP / row sum: 1/2, 2/2, 0/2.
EXPECTED_PRECISION = [0.5, 0.5, 0.0]
EXPECTED_RECALL = [0.5, 1.0, 0.0]
EXPECTED_F1 = [0.5, 2 / 3, 0.0]  # 2pr / (p + r)


def numpy_reference(labels, predictions, mask, num_classes):
    """Confusion and per-class precision/recall/F1 by counting over the example lists."""
    labels, predictions, mask = map(np.asarray, (labels, predictions, mask))
    labels, predictions = labels[mask], predictions[mask]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for true, predicted in zip(labels, predictions, strict=True):
        confusion[true, predicted] += 1
    precision, recall, f1 = [], [], []
    for c in range(num_classes):
        true_positive = np.sum((labels == c) & (predictions == c))
        predicted_c = np.sum(predictions == c)
        actual_c = np.sum(labels == c)
        p = true_positive / predicted_c if predicted_c else 0.0
        r = true_positive / actual_c if actual_c else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return confusion, np.array(precision), np.array(recall), np.array(f1)


def test_confusion_matrix_hand_example_ignores_masked_examples():
    confusion = metrics.confusion_matrix(
        jnp.array(LABELS), jnp.array(PREDICTIONS), 3, jnp.array(MASK)
    )
    chex.assert_shape(confusion, (3, 3))
    np.testing.assert_array_equal(confusion, EXPECTED_CONFUSION)
    # Without a mask every example counts.
    unmasked = metrics.confusion_matrix(jnp.array(LABELS), jnp.array(PREDICTIONS), 3)
    np.testing.assert_array_equal(unmasked, [[1, 2, 0], [0, 2, 0], [1, 1, 1]])


def test_precision_recall_f1_hand_example():
    scores = metrics.precision_recall_f1(np.array(EXPECTED_CONFUSION))
    np.testing.assert_allclose(scores["precision"], EXPECTED_PRECISION)
    np.testing.assert_allclose(scores["recall"], EXPECTED_RECALL)
    np.testing.assert_allclose(scores["f1"], EXPECTED_F1)


def test_classification_report_hand_example():
    report = metrics.classification_report(np.array(EXPECTED_CONFUSION), ["cat", "dog", "eel"])
    assert set(report) == {
        "accuracy", "precision", "recall", "f1", "per_class", "confusion_matrix",
        "class_names", "num_examples",
    }  # fmt: skip
    assert report["accuracy"] == pytest.approx(3 / 6)
    assert report["precision"] == pytest.approx(np.mean(EXPECTED_PRECISION))  # macro: 1/3
    assert report["recall"] == pytest.approx(np.mean(EXPECTED_RECALL))  # 1/2
    assert report["f1"] == pytest.approx(np.mean(EXPECTED_F1))  # 7/18
    assert list(report["per_class"]) == ["cat", "dog", "eel"]
    for i, name in enumerate(["cat", "dog", "eel"]):
        assert report["per_class"][name] == pytest.approx(
            {"precision": EXPECTED_PRECISION[i], "recall": EXPECTED_RECALL[i], "f1": EXPECTED_F1[i]}
        )
    assert report["confusion_matrix"] == EXPECTED_CONFUSION
    assert report["class_names"] == ["cat", "dog", "eel"]
    assert report["num_examples"] == 6
    # JSON-ready: plain Python numbers and lists all the way down.
    assert json.loads(json.dumps(report)) == report


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_predictions_match_numpy_counts(seed):
    rng = np.random.default_rng(seed)
    num_classes, size = 7, 300
    labels = rng.integers(0, num_classes, size)
    predictions = rng.integers(0, num_classes, size)
    predictions[predictions == 3] = 4  # class 3 is never predicted: precision and F1 are 0
    mask = rng.random(size) < 0.8
    # Padded examples: anything they say must not count, even labels and predictions of class 3.
    labels[~mask] = 3
    predictions[~mask] = rng.integers(0, num_classes, int((~mask).sum()))

    confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)(
        jnp.asarray(labels), jnp.asarray(predictions), num_classes, jnp.asarray(mask)
    )
    ref_confusion, ref_precision, ref_recall, ref_f1 = numpy_reference(
        labels, predictions, mask, num_classes
    )
    np.testing.assert_array_equal(confusion, ref_confusion)
    assert int(confusion.sum()) == mask.sum()

    scores = metrics.precision_recall_f1(np.asarray(confusion))
    np.testing.assert_allclose(scores["precision"], ref_precision, rtol=1e-12)
    np.testing.assert_allclose(scores["recall"], ref_recall, rtol=1e-12)
    np.testing.assert_allclose(scores["f1"], ref_f1, rtol=1e-12)
    assert scores["precision"][3] == 0.0 and scores["f1"][3] == 0.0
    assert scores["recall"][3] == 0.0  # its true examples all went elsewhere

    names = [f"class_{c}" for c in range(num_classes)]
    report = metrics.classification_report(np.asarray(confusion), names)
    real = mask.astype(bool)
    assert report["accuracy"] == pytest.approx(np.mean(labels[real] == predictions[real]))
    assert report["precision"] == pytest.approx(ref_precision.mean())
    assert report["recall"] == pytest.approx(ref_recall.mean())
    assert report["f1"] == pytest.approx(ref_f1.mean())
    assert report["num_examples"] == real.sum()
    assert report["per_class"]["class_3"]["precision"] == 0.0


def test_batch_confusions_add_up_to_the_whole():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 64)
    predictions = rng.integers(0, 5, 64)
    whole = metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions), 5)
    parts = sum(
        metrics.confusion_matrix(
            jnp.asarray(labels[i : i + 16]), jnp.asarray(predictions[i : i + 16]), 5
        )
        for i in range(0, 64, 16)
    )
    chex.assert_trees_all_equal(whole, parts)


def test_empty_confusion_reports_zeros():
    report = metrics.classification_report(np.zeros((2, 2), np.int64), ["a", "b"])
    assert report["accuracy"] == 0.0
    assert report["precision"] == report["recall"] == report["f1"] == 0.0
    assert report["num_examples"] == 0

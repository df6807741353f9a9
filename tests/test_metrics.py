"""Metrics come from counts that add up across sites, and agree with scikit-learn on the pooled predictions."""

import numpy as np
import pytest
from sklearn import metrics as skm

from fedfactory.metrics import binned_auroc, evaluate, metrics_from_counts, score_counts

NAMES = tuple("abcde")


def predictions(n=400, seed=0, absent=()):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    labels = labels[~np.isin(labels, absent)]
    logits = rng.normal(size=(len(labels), 5)) + 1.5 * np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


@pytest.mark.parametrize("absent", [(), (3,)])
def test_metrics_from_counts_agree_with_scikit_learn(absent):
    probs, labels = predictions(absent=absent)
    m = evaluate(probs, labels, NAMES)
    pred, present = probs.argmax(1), np.unique(labels)
    p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, labels=present, average="macro", zero_division=0)
    assert m["accuracy"] == float((pred == labels).mean())
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred), abs=1e-12)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f), abs=1e-12)
    exact = np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present])
    assert m["auroc"] == pytest.approx(exact, abs=2e-3)  # binned at 1/1000
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=range(5)).tolist()
    assert m["per_class_accuracy"]["d"] is None if absent else m["per_class_accuracy"]["d"] > 0
    assert m["num_test"] == len(labels)


def test_counts_of_sites_add_up_to_the_counts_of_their_union():
    probs, labels = predictions()
    cuts = np.split(np.arange(len(labels)), [50, 51, 300])  # one site with a single image
    parts = [score_counts(probs[i], labels[i], 5) for i in cuts]
    summed = {k: sum(p[k] for p in parts) for k in parts[0]}
    assert metrics_from_counts(**summed, class_names=NAMES) == evaluate(probs, labels, NAMES)
    empty = metrics_from_counts(**score_counts(np.zeros((0, 5)), np.zeros(0, np.int64), 5), class_names=NAMES)
    assert empty["num_test"] == 0 and empty["accuracy"] is None


def test_binned_auroc_counts_ties_as_one_half_and_needs_both_sides():
    assert binned_auroc(np.array([0, 0, 3]), np.array([2, 0, 0])) == 1.0
    assert binned_auroc(np.array([0, 3, 0]), np.array([0, 2, 0])) == 0.5  # every pair tied in one bin
    assert binned_auroc(np.array([1, 1, 0]), np.array([0, 1, 1])) == 0.5 / 4  # one tie, three pairs ranked wrong
    assert binned_auroc(np.array([1, 0]), np.array([0, 0])) is None  # no negatives: undefined, not nan

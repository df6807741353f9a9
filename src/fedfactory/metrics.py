"""Classification metrics as plain JSON-ready values, computed from counts only.

A test set is summarised by counts that add up across sites: the confusion matrix and, for every class c, the
histograms of the predicted probability p_c over the images of class c and over the others. Every metric is
computed from those counts, so a federation whose sites each score their own test images and return only counts
gets exactly the metrics of one evaluation on the union of their test sets.
"""

import numpy as np

# Probability bins of width 1/NUM_BINS for the one-vs-rest AUROC. Linear bins agree with the exact AUROC to ~1e-4
# for this project's classifiers (label smoothing keeps p_c away from 0 and 1); a classifier whose probabilities
# saturate puts many images in the end bins, where ties count one half, and its binned AUROC reads low.
NUM_BINS = 1000
MAX_TEST_IMAGES = 1 << 40  # per reply: far beyond any test set, and low enough that sums of counts cannot overflow


def score_counts(probs: np.ndarray, labels: np.ndarray, num_classes: int, num_bins: int = NUM_BINS) -> dict:
    """The counts of predicted probabilities (N, C) against labels (N,): confusion (C, C) [true, predicted],
    positive (C, B) and negative (C, B): for class c, how many images of class c (of another class) got p_c in
    each bin."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    confusion = np.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, -1)
    bins = np.clip(np.floor(np.asarray(probs, np.float64) * num_bins), 0, num_bins - 1).astype(np.int64)  # (N, C)
    positive = np.zeros((num_classes, num_bins), dtype=np.int64)
    negative = np.zeros((num_classes, num_bins), dtype=np.int64)
    for c in range(num_classes):
        own = labels == c
        positive[c] = np.bincount(bins[own, c], minlength=num_bins)
        negative[c] = np.bincount(bins[~own, c], minlength=num_bins)
    return {"confusion": confusion, "positive": positive, "negative": negative}


def binned_auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), a tie within one bin counting one half (Mann-Whitney); None
    without positives or without negatives."""
    below = np.cumsum(negative) - negative  # negatives in lower bins
    pairs = float(positive.sum()) * float(negative.sum())
    return float((positive * (below + 0.5 * negative)).sum() / pairs) if pairs else None


def check_counts(counts: dict, num_classes: int, num_bins: int = NUM_BINS) -> dict[str, np.ndarray]:
    """Counts from elsewhere (a site's evaluate reply), checked to be what score_counts makes: the three arrays,
    their shapes, non-negative int64 below MAX_TEST_IMAGES, and histograms that add up to the confusion matrix.
    Raises ValueError naming what is wrong."""
    shapes = {"confusion": (num_classes, num_classes), "positive": (num_classes, num_bins),
              "negative": (num_classes, num_bins)}
    if not isinstance(counts, dict) or sorted(counts) != sorted(shapes):
        raise ValueError(f"counts must be exactly {', '.join(shapes)}")
    for key, shape in shapes.items():
        a = counts[key]
        if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.shape != shape:
            raise ValueError(f"counts {key!r} must be an int64 array of shape {shape}, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        if (a < 0).any() or (a > MAX_TEST_IMAGES).any():
            raise ValueError(f"counts {key!r} must lie in [0, {MAX_TEST_IMAGES}]")
    total = int(counts["confusion"].sum())
    if total > MAX_TEST_IMAGES:
        raise ValueError(f"counts claim {total} test images, more than {MAX_TEST_IMAGES}")
    rows = counts["confusion"].sum(1)
    if not ((counts["positive"].sum(1) == rows).all() and (counts["negative"].sum(1) == total - rows).all()):
        raise ValueError("the probability histograms do not add up to the confusion matrix")
    return counts


def metrics_from_counts(confusion: np.ndarray, positive: np.ndarray, negative: np.ndarray,
                        class_names: tuple[str, ...]) -> dict:
    """Accuracy, balanced accuracy, macro F1/precision/recall and macro one-vs-rest AUROC over the classes present
    in the test labels, per-class accuracy, the confusion matrix and num_test."""
    cm = np.asarray(confusion, dtype=np.int64)
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    per_class = {name: (float(cm[c, c] / support[c]) if support[c] else None) for c, name in enumerate(class_names)}
    present = np.flatnonzero(support)
    total = int(cm.sum())
    if total == 0:
        return {"accuracy": None, "balanced_accuracy": None, "macro_f1": None, "macro_precision": None,
                "macro_recall": None, "auroc": None, "per_class_accuracy": per_class, "confusion_matrix": cm.tolist(),
                "num_test": 0}
    # Precision of a class never predicted counts as 0 (scikit-learn's zero_division=0).
    precision = np.array([tp[c] / predicted[c] if predicted[c] else 0.0 for c in present])
    recall = tp[present] / support[present]
    f1 = np.array([2 * tp[c] / (support[c] + predicted[c]) for c in present])
    # One-vs-rest AUROC is defined for a class present among the labels with some other class present too. The score
    # is the raw p_c, not p_c renormalised over the present classes (what scikit-learn's multi-class AUROC needs):
    # a site cannot know which classes the union of the test sets holds. With every class present they agree.
    auroc = float(np.mean([binned_auroc(positive[c], negative[c]) for c in present])) if len(present) > 1 else None
    return {
        "accuracy": float(tp.sum() / total),
        "balanced_accuracy": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "auroc": auroc,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "num_test": total,
    }


def evaluate(probs: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict:
    """The metrics of predicted probabilities (N, C) against labels (N,), through the same counts a site sends."""
    return metrics_from_counts(**score_counts(probs, labels, len(class_names)), class_names=class_names)


def format_table(rows: list[tuple[str, dict]]) -> str:
    """A fixed-width text table of headline metrics, one row per (name, metrics)."""
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
    head = f"{'method':<24}" + "".join(f"{k:>19}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows:
        cells = (f"{m[k]:>19.4f}" if m.get(k) is not None else f"{'n/a':>19}" for k in keys)
        lines.append(f"{name:<24}" + "".join(cells))
    return "\n".join(lines)

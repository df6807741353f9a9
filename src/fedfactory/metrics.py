"""Classification metrics from predicted probabilities (scikit-learn), as plain JSON-ready values."""

import numpy as np
from sklearn import metrics as skm


def evaluate(probs: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict:
    """Accuracy, balanced accuracy, macro F1/precision/recall, macro one-vs-rest AUROC, per-class accuracy."""
    num_classes = len(class_names)
    pred = probs.argmax(1)
    cm = skm.confusion_matrix(labels, pred, labels=np.arange(num_classes))
    support = cm.sum(1)
    per_class = {name: (float(cm[c, c] / support[c]) if support[c] else None) for c, name in enumerate(class_names)}
    present = np.unique(labels)
    # AUROC is defined only for classes present in the test labels; renormalise over them.
    if len(present) > 1:
        sub = probs[:, present] / np.clip(probs[:, present].sum(1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            auroc = float(skm.roc_auc_score(labels == present[1], sub[:, 1]))
        else:
            auroc = float(skm.roc_auc_score(labels, sub, multi_class="ovr", average="macro", labels=present))
    else:
        auroc = None
    p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, labels=present, average="macro", zero_division=0)
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(np.mean([cm[c, c] / support[c] for c in present])),
        "macro_f1": float(f),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "auroc": auroc,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "num_test": int(len(labels)),
    }


def format_table(rows: list[tuple[str, dict]]) -> str:
    """A fixed-width text table of headline metrics, one row per (name, metrics)."""
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
    head = f"{'method':<24}" + "".join(f"{k:>19}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows:
        cells = (f"{m[k]:>19.4f}" if m.get(k) is not None else f"{'n/a':>19}" for k in keys)
        lines.append(f"{name:<24}" + "".join(cells))
    return "\n".join(lines)

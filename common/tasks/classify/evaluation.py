"""Loss, accuracy and the confusion matrix of a classifier on encoded examples (server and clients).

The confusion matrix (rows: true label, columns: predicted label) is what per-label
precision and recall, and the per-group fairness view of the run report, are computed
from: a model can be right on average and wrong on the minority class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedtune.common.models.device import autocast
from fedtune.common.tasks.result import Confusion, EvalResult


@dataclass(frozen=True)
class LabelMetrics:
    """Precision, recall and F1 of one label from a confusion matrix (NaN where undefined)."""

    precision: float
    recall: float
    f1: float
    support: int  # true examples of this label


def label_metrics(confusion: Confusion) -> list[LabelMetrics]:
    """Per-label precision/recall/F1 (one-vs-rest) in label order; NaN when a denominator is 0."""
    cm = np.asarray(confusion, dtype=np.float64)
    out = []
    for i in range(cm.shape[0]):
        tp, predicted, actual = cm[i, i], cm[:, i].sum(), cm[i, :].sum()
        precision = tp / predicted if predicted else float("nan")
        recall = tp / actual if actual else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
        out.append(LabelMetrics(float(precision), float(recall), float(f1), int(actual)))
    return out


def confusion_of(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> Confusion:
    """Counts of (true, predicted) pairs as a [num_labels][num_labels] list (sklearn's layout)."""
    flat = np.bincount(labels.astype(np.int64) * num_labels + preds.astype(np.int64), minlength=num_labels**2)
    return flat.reshape(num_labels, num_labels).tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
    *, device: torch.device, batch_size: int = 256, groups: Sequence[str] | None = None,
    states: torch.Tensor | None = None,
) -> EvalResult:
    """Mean cross-entropy, accuracy and confusion matrix; ids/mask [N, T], labels [N], groups N values or None.

    Examples are run shortest first, so each batch, padded to its own longest example, carries little padding.
    ``states`` [N, T, H]: the frozen lower layers' output for these examples (``lower_states``), fed to a model
    whose LoRA sits above them instead of ``ids``.
    """
    model.eval()
    total_loss, n = 0.0, len(labels)
    order = torch.argsort(mask.sum(dim=1), stable=True)
    preds: list[torch.Tensor] = []
    num_labels = 0
    for idx in order.split(batch_size):
        b_ids, b_mask, b_y = (t[idx].to(device) for t in (ids, mask, labels))
        width = int(b_mask.sum(dim=1).max())  # trim padding shared by the whole batch
        inputs = ({"input_ids": b_ids[:, :width]} if states is None
                  else {"hidden_states": states[idx, :width].to(device)})
        with autocast(device):
            logits = model(**inputs, attention_mask=b_mask[:, :width]).float()
        total_loss += float(nn.functional.cross_entropy(logits, b_y, reduction="sum"))
        preds.append(logits.argmax(dim=-1).cpu())
        num_labels = int(logits.shape[-1])
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    y_pred, y_true = np.empty(n, dtype=np.int64), labels.cpu().numpy()
    y_pred[order.numpy()] = torch.cat(preds).numpy()  # back to the examples' own order
    by_group: dict[str, Confusion] = {}
    if groups is not None:
        values = np.asarray([str(g) for g in groups])
        for group in sorted(set(values.tolist())):
            sel = values == group
            by_group[group] = confusion_of(y_true[sel], y_pred[sel], num_labels)
    return EvalResult(loss=total_loss / n, accuracy=float((y_pred == y_true).mean()), num_examples=n,
                      confusion=confusion_of(y_true, y_pred, num_labels), group_confusion=by_group)

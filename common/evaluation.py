"""Loss, accuracy and the confusion matrix of a classifier on encoded examples (server and clients).

The confusion matrix (rows: true label, columns: predicted label) is what per-label
precision and recall, and the per-group fairness view of the run report, are computed
from: a model can be right on average and wrong on the minority class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtune.common.device import autocast

Confusion = list[list[int]]  # [true label][predicted label] -> count


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    confusion: Confusion = field(default_factory=list)  # [num_labels][num_labels]; empty when no examples
    group_confusion: dict[str, Confusion] = field(default_factory=dict)  # per value of the group column
    extra: dict[str, Any] = field(default_factory=dict)  # the task's own round-line fields (F1, perplexity, ...)


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
) -> EvalResult:
    """Mean cross-entropy, accuracy and confusion matrix; ids/mask [N, T], labels [N], groups N values or None.

    Examples are run shortest first, so each batch, padded to its own longest example, carries little padding.
    """
    model.eval()
    total_loss, n = 0.0, len(labels)
    order = torch.argsort(mask.sum(dim=1), stable=True)
    preds: list[torch.Tensor] = []
    num_labels = 0
    for idx in order.split(batch_size):
        b_ids, b_mask, b_y = (t[idx].to(device) for t in (ids, mask, labels))
        width = int(b_mask.sum(dim=1).max())  # trim padding shared by the whole batch
        with autocast(device):
            logits = model(input_ids=b_ids[:, :width], attention_mask=b_mask[:, :width]).float()
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


@torch.no_grad()
def causal_lm_eval(model: nn.Module, encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *,
                   device: torch.device, batch_size: int = 32) -> EvalResult:
    """Held-out perplexity of the response tokens: exp(total negative log-likelihood / response tokens).

    ``loss`` is the mean NLL per response token (so perplexity = exp(loss)); ``accuracy`` the share of
    response tokens predicted exactly (greedy next token).
    """
    from fedtune.common.tasks.base import IGNORE, trim
    from fedtune.common.tasks.sft import response_logits

    ids, mask, labels = encoded
    model.eval()
    nll, correct, tokens = 0.0, 0, 0
    for start in range(0, len(ids), batch_size):
        batch = trim({"input_ids": ids[start:start + batch_size], "attention_mask": mask[start:start + batch_size],
                      "labels": labels[start:start + batch_size]})
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            logits, targets = response_logits(model, batch)  # [B, K, V], [B, K]
        keep = targets != IGNORE
        nll += float(nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        correct += int((logits[keep].argmax(dim=-1) == targets[keep]).sum())
        tokens += int(keep.sum())
    if tokens == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    loss = nll / tokens
    return EvalResult(loss=loss, accuracy=correct / tokens, num_examples=len(ids),
                      extra={"perplexity": float(np.exp(loss)), "response-tokens": tokens})


def entity_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL-style span matching: an entity counts only when
    its type and both boundaries match), micro-averaged, plus per entity type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    if not any(t != "O" for tags in true_tags for t in tags):
        return {"entity-f1": None, "entity-precision": None, "entity-recall": None, "per-label": {}}
    report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {name: {"precision": round(float(m["precision"]), 6), "recall": round(float(m["recall"]), 6),
                       "f1": round(float(m["f1-score"]), 6), "support": int(m["support"])}
                for name, m in report.items() if " avg" not in name}
    return {"entity-f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
            "entity-precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
            "entity-recall": float(recall_score(true_tags, pred_tags, zero_division=0)), "per-label": per_type}

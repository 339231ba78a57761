"""Loss and accuracy of a classifier on encoded examples (used by server and clients)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedtune.common.device import autocast


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
    *, device: torch.device, batch_size: int = 256,
) -> EvalResult:
    """Mean cross-entropy and accuracy over all examples; ids/mask [N, T], labels [N]."""
    model.eval()
    total_loss, correct, n = 0.0, 0, len(labels)
    for start in range(0, n, batch_size):
        b_ids, b_mask, b_y = (t[start:start + batch_size].to(device) for t in (ids, mask, labels))
        width = int(b_mask.sum(dim=1).max())  # trim padding shared by the whole batch
        with autocast(device):
            logits = model(input_ids=b_ids[:, :width], attention_mask=b_mask[:, :width]).float()
        total_loss += float(nn.functional.cross_entropy(logits, b_y, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == b_y).sum())
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    return EvalResult(loss=total_loss / n, accuracy=correct / n, num_examples=n)

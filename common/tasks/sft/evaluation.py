"""Held-out evaluation of a causal LM adapter: response perplexity (instruction tuning)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtune.common.models.device import autocast
from fedtune.common.tasks.result import EvalResult


@torch.no_grad()
def causal_lm_eval(model: nn.Module, encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *,
                   device: torch.device, batch_size: int = 32) -> EvalResult:
    """Held-out perplexity of the response tokens: exp(total negative log-likelihood / response tokens).

    ``loss`` is the mean NLL per response token (so perplexity = exp(loss)); ``accuracy`` the share of
    response tokens predicted exactly (greedy next token).
    """
    from fedtune.common.tasks.base import IGNORE, trim
    from fedtune.common.tasks.sft.task import response_logits

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

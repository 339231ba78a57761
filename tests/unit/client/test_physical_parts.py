"""A Poisson batch trained in length-sorted parts releases the same step as the batch trained whole; low
precision never reaches Opacus' clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.client import trainer
from fedtune.client.randomness import RoundSeeds
from fedtune.client.trainer import DpParams, physical_parts, train
from fedtune.common.errors import ConfigError
from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.base import encode, load_base
from fedtune.common.models.device import autocast_dtype
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks.classify.model import build_model
from tests.tiny import make_sentiment_frame

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(str(tiny_model_dir))


def _data(base, n: int = 48):
    frame = make_sentiment_frame(n, seed=5)
    # lengths 1..12 words (the corpus' snippets vary too): sorting by length then matters
    texts = [" ".join((text.split() * 3)[: 1 + i % 12]) for i, text in enumerate(frame["text"])]
    ids, mask = encode(base.tokenizer, texts, 16)
    return ids, mask, torch.tensor((frame["label"] == "pos").astype(int).to_numpy())


def _trained(base, data, monkeypatch, part_size: int, dp: DpParams | None) -> dict[str, np.ndarray]:
    monkeypatch.setattr(trainer, "PART_SIZE", part_size)
    model = build_model(base, 2, LoraSettings(lora_rank=4), CPU, seed=0)
    with torch.no_grad():  # a non-zero head, so gradients reach the LoRA factors
        for name, p in model.named_parameters():
            if "head" in name and p.requires_grad:
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))
    train(model, data, steps=2, batch_size=24, learning_rate=0.5, dp=dp, device=CPU,
          seeds=RoundSeeds.insecure(7, 1, "parts"))
    return to_arrays(model)


def test_parts_are_sorted_by_length_and_padded_to_their_own_longest(base):
    ids, mask, labels = _data(base)
    parts = physical_parts({"input_ids": ids, "attention_mask": mask, "labels": labels}, 8)
    assert sum(len(p["labels"]) for p in parts) == len(labels) and all(len(p["labels"]) <= 8 for p in parts)
    widths = [p["input_ids"].shape[1] for p in parts]
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0]
    assert all(int(p["attention_mask"][:, -1].sum()) > 0 for p in parts)  # no all-padding column is left
    seen = sorted(tuple(row[row != 0].tolist()) for p in parts for row in p["input_ids"])
    assert seen == sorted(tuple(row[row != 0].tolist()) for row in ids)  # every example exactly once


@pytest.mark.parametrize("dp", [DpParams(1.0, 0.5), DpParams(0.0, 0.05), None], ids=["dp", "clip-only", "off"])
def test_training_in_parts_releases_the_whole_batch_step(base, monkeypatch, dp):
    """Same Poisson draws, same noise: per-example clipping and one noise draw per logical batch make the
    parts' step the whole batch's step (up to float rounding); without DP the mean gradient is the same.
    (The base's dropout is off in training, else its draws would follow the order of the examples.)"""
    monkeypatch.setenv("FEDTUNE_PRECISION", "fp32")
    data = _data(base)
    whole = _trained(base, data, monkeypatch, 0, dp)
    parts = _trained(base, data, monkeypatch, 5, dp)
    init = to_arrays(build_model(base, 2, LoraSettings(lora_rank=4), CPU, seed=0))
    assert any(not np.allclose(whole[k], init[k]) for k in whole if "lora_B" in k)
    for key in whole:
        np.testing.assert_allclose(parts[key], whole[key], rtol=1e-3, atol=1e-5, err_msg=key)


def test_low_precision_gradients_reach_opacus_in_fp32(base, monkeypatch):
    """Under bf16 autocast Opacus would clip bf16 per-example gradients (a norm off by ~0.4% can exceed C)."""
    from opacus.optimizers import DPOptimizer

    dtypes: set[torch.dtype] = set()
    original = DPOptimizer.pre_step

    def spy(self, closure=None):
        dtypes.update(p.grad_sample.dtype for p in self.params if p.grad_sample is not None)
        return original(self, closure)

    monkeypatch.setattr(DPOptimizer, "pre_step", spy)
    monkeypatch.setenv("FEDTUNE_PRECISION", "bf16")
    _trained(base, _data(base), monkeypatch, 8, DpParams(1.0, 1.0))
    assert dtypes == {torch.float32}


def test_precision_setting(monkeypatch):
    monkeypatch.setenv("FEDTUNE_PRECISION", "fp32")
    assert autocast_dtype(CPU) is None
    monkeypatch.setenv("FEDTUNE_PRECISION", "bf16")
    assert autocast_dtype(CPU) is torch.bfloat16
    monkeypatch.setenv("FEDTUNE_PRECISION", "half")
    with pytest.raises(ConfigError, match="FEDTUNE_PRECISION='half'"):
        autocast_dtype(CPU)

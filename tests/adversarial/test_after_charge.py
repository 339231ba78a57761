"""After the charge, training cannot fail on one row, and refusals cannot fill the ledger.

- A row whose forward pass overflows (what crafted weights do to rows near a direction the server picked)
  gives a non-finite per-example gradient. Opacus would scale it by C / (inf + 1e-6) = 0 and 0 * inf = NaN
  would poison the update, so whether a round failed would say whether that row was sampled. The trainer
  zeroes such an example's gradient before clipping: the round trains, the update is finite.
- A server sending one odd request after another makes the node refuse each: identical refusals in a run are
  one ledger line, and new refusal lines stop at MAX_REFUSALS_PER_DAY a day.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.client import trainer
from fedtune.client.policy import NodePolicy, PlanRequest
from fedtune.client.randomness import RoundSeeds
from fedtune.client.round import MAX_REFUSALS_PER_DAY, NodePrivacy, RunRef, charge_round
from fedtune.client.trainer import DpParams, train
from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.base import encode, load_base
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks.classify.model import build_model, lower_states
from tests.tiny import make_sentiment_frame

CPU = torch.device("cpu")


def _poisoned_states(model_dir: Path, n: int, poisoned: int) -> dict[str, torch.Tensor]:
    """The cached lower-layer states of ``n`` rows, with row ``poisoned`` overflowing (as crafted weights make a
    row near their direction overflow): the top layer's forward pass gives inf/NaN for that row alone."""
    base = load_base(str(model_dir))
    frame = make_sentiment_frame(n, seed=4)
    ids, mask = encode(base.tokenizer, frame["text"].tolist(), 12)
    states = lower_states(base.encoder, ids, mask, 1)  # [N, T, H]
    states[poisoned] = 3e38
    return {"hidden_states": states, "attention_mask": mask,
            "labels": torch.tensor((frame["label"] == "pos").astype(int).to_numpy())}


@pytest.mark.parametrize("dp", [DpParams(1.0, 1.0), DpParams(0.0, 1.0)], ids=["dp", "clip-only"])
def test_a_row_that_overflows_is_zeroed_and_the_round_still_trains(tiny_model_dir, monkeypatch, dp) -> None:
    zeroed: list[int] = []
    original = trainer.checked_grad_samples
    monkeypatch.setattr(trainer, "checked_grad_samples", lambda optim: zeroed.append(original(optim)) or zeroed[-1])
    model = build_model(load_base(str(tiny_model_dir)), 2, LoraSettings(lora_rank=4, lora_layers="1"), CPU)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head" in name and p.requires_grad:
                p.normal_(0, 0.5)
    before = to_arrays(model)
    data = _poisoned_states(tiny_model_dir, 32, poisoned=3)
    # batch 32 of 32 rows: q = 1, every row is in every batch
    train(model, data, steps=2, batch_size=32, learning_rate=0.1, dp=dp, device=CPU,
          seeds=RoundSeeds.insecure(0, 1, "t"))
    after = to_arrays(model)
    assert sum(zeroed) == 2  # the poisoned row, once per step
    assert all(np.all(np.isfinite(v)) for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in after)


REQUEST = PlanRequest(model="", dp=True, epsilon=8.0, delta=1e-5, accountant="prv", num_rounds=3, server_round=1,
                      sample_rate=0.25, steps=4, clip_norm=1.0)


def _lines(state: Path) -> list[dict]:
    return [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]


def test_identical_refusals_in_a_run_are_one_ledger_line(tmp_path: Path) -> None:
    node = NodePrivacy.open(NodePolicy(dataset_id="w", max_epsilon=8.0, require_dp=True), tmp_path)
    no_dp = replace(REQUEST, dp=False, dp_mode="off")
    receipts = [charge_round(node, replace(no_dp, server_round=r), run=RunRef("7"), fingerprint="f")[1]
                for r in range(1, 6)]
    assert len({e.sealed.seq for e in receipts}) == 1 and len(_lines(tmp_path)) == 1
    other_run = charge_round(node, no_dp, run=RunRef("8"), fingerprint="f")[1]
    assert other_run.sealed.seq == 2  # another run gets its own line


def test_new_refusal_lines_stop_at_the_daily_cap(tmp_path: Path) -> None:
    node = NodePrivacy.open(NodePolicy(dataset_id="w", max_epsilon=8.0, max_steps_per_round=1), tmp_path)
    entries = [charge_round(node, replace(REQUEST, steps=2 + i), run=RunRef(str(i)), fingerprint="f")[1]
               for i in range(MAX_REFUSALS_PER_DAY + 20)]
    lines = _lines(tmp_path)
    assert len(lines) == MAX_REFUSALS_PER_DAY and all(e["decision"] == "refused" for e in lines)
    assert {e.sealed.seq for e in entries[MAX_REFUSALS_PER_DAY:]} == {MAX_REFUSALS_PER_DAY}  # the newest line, cited
    # A charge is never coalesced: the budget's own entries always land.
    allowed = replace(REQUEST, steps=1)
    decision, entry = charge_round(node, allowed, run=RunRef("x"), fingerprint="f")
    assert decision.charged and entry.sealed.seq == MAX_REFUSALS_PER_DAY + 1
    assert dt.datetime.fromisoformat(lines[-1]["time"]) <= dt.datetime.now(dt.UTC)

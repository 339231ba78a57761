"""DP-SGD on LoRA: weights really move, clipping holds, Opacus runs the mechanism the node charges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedtune.client.randomness import RoundSeeds
from fedtune.client.trainer import DpParams, node_parts, noise_only_step, prepare_loop, privatize, run_loop, train
from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.base import encode, load_base
from fedtune.common.privacy.accountant import steps_per_round
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks import get_task
from fedtune.common.tasks.classify.model import build_model
from tests.tiny import make_sentiment_frame

CPU = torch.device("cpu")
SEEDS = RoundSeeds.insecure(0, 1, "test")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(str(tiny_model_dir))


def _data(base, n: int = 64):
    frame = make_sentiment_frame(n, seed=3)
    ids, mask = encode(base.tokenizer, frame["text"].tolist(), 12)
    return ids, mask, torch.tensor((frame["label"] == "pos").astype(int).to_numpy())


def _randomise_head(model) -> None:
    """A non-zero head, so gradients reach the encoder's LoRA factors (a zero head blocks them)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head" in name and p.requires_grad:
                p.normal_(0, 0.5)


def _model(base):
    return build_model(base, 2, LoraSettings(lora_rank=4), CPU, seed=0)


def test_lora_weights_change_after_one_dp_step(base):
    """Guards opacus#820: a DP step must change LoRA factors, not only the head."""
    model = _model(base)
    _randomise_head(model)
    before = to_arrays(model)
    train(model, _data(base), steps=1, batch_size=32, learning_rate=1e-2,
          dp=DpParams(noise_multiplier=1.0, clip_norm=1.0), device=CPU, seeds=SEEDS)
    after = to_arrays(model)
    lora_changed = [k for k in before if "lora_" in k and not np.array_equal(before[k], after[k])]
    assert any("lora_B" in k for k in lora_changed), "no LoRA B factor changed after a DP step"
    assert any("lora_A" in k for k in lora_changed), "no LoRA A factor changed after a DP step"


def test_clipping_bounds_every_per_sample_gradient(base):
    """Each example's clipped gradient (over all trainable tensors) has norm <= C, and clipping is active."""
    clip = 0.01
    model = _model(base)
    _randomise_head(model)
    ids, mask, labels = _data(base, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=1)
    private = privatize(model, torch.optim.SGD(params, lr=0.0), loader, DpParams(0.0, clip), torch.Generator())
    raw_norms, clipped_norms = [], []
    for i in range(len(labels)):
        private.optimizer.zero_grad(set_to_none=True)
        logits = private.module(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
        torch.nn.functional.cross_entropy(logits, labels[i:i + 1]).backward()
        raw_norms.append(math.sqrt(sum(float(p.grad_sample.pow(2).sum()) for p in params)))
        private.optimizer.clip_and_accumulate()
        clipped_norms.append(math.sqrt(sum(float(p.summed_grad.pow(2).sum()) for p in params)))
        for p in params:
            p.summed_grad = None
    assert max(raw_norms) > clip * 10, "test needs gradients well above the clipping norm"
    assert max(clipped_norms) <= clip * (1 + 1e-4)
    assert min(clipped_norms) >= clip * 0.99  # large gradients are scaled to C, not zeroed


@pytest.mark.parametrize(("n", "batch", "sigma", "steps"), [(64, 16, 1.0, 5), (64, 8, 0.8, 12)])
def test_opacus_records_the_mechanism_the_node_charges(base, n, batch, sigma, steps):
    """The engine's own accountant saw (sigma, q, steps), the event the node's ledger charges for the round."""
    q, _ = steps_per_round(n, batch, 1.0)
    loop = prepare_loop(_model(base), _data(base, n), batch_size=batch, learning_rate=1e-3, dp=DpParams(sigma, 1.0),
                        device=CPU, seeds=SEEDS)
    result = run_loop(loop, get_task("classify"), steps=steps, device=CPU, parts=node_parts())
    assert loop.private is not None
    (recorded,) = loop.private.engine.accountant.history  # one (sigma, sample rate, steps) entry
    assert recorded == (sigma, pytest.approx(q, rel=1e-12), steps) and result.steps == steps


def test_non_dp_training_runs_without_opacus(base):
    loop = prepare_loop(_model(base), _data(base), batch_size=16, learning_rate=1e-2, dp=None, device=CPU,
                        seeds=SEEDS)
    result = run_loop(loop, get_task("classify"), steps=2, device=CPU, parts=node_parts())
    assert loop.private is None and loop.module is loop.model
    assert result.steps == 2 and math.isfinite(result.loss)


def test_ffa_lora_trains_only_b_and_keeps_a_at_its_shared_init(base):
    ffa = LoraSettings(lora_rank=4, lora_variant="ffa")
    model = build_model(base, 2, ffa, CPU, seed=0)
    _randomise_head(model)
    before = to_arrays(model)
    train(model, _data(base), steps=2, batch_size=32, learning_rate=1e-2,
          dp=DpParams(noise_multiplier=1.0, clip_norm=1.0), device=CPU, seeds=SEEDS)
    after = to_arrays(model)
    a_keys = [k for k in before if "lora_A" in k]
    assert a_keys and all(np.array_equal(before[k], after[k]) for k in a_keys)
    assert any(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)
    other_node = to_arrays(build_model(base, 2, ffa, CPU, seed=0))
    assert all(np.array_equal(other_node[k], after[k]) for k in a_keys)  # every node shares A


def _update(base, seeds: RoundSeeds) -> dict[str, np.ndarray]:
    model = _model(base)
    _randomise_head(model)
    before = to_arrays(model)
    train(model, _data(base), steps=2, batch_size=32, learning_rate=1e-2, dp=DpParams(1.0, 1.0), device=CPU,
          seeds=seeds)
    return {k: v - before[k] for k, v in to_arrays(model).items()}


def test_the_same_round_twice_gets_independent_noise(base):
    """A server that sends the same round (same weights, same run seed, same round number) twice cannot
    cancel the noise by subtracting the two updates: each round draws fresh node-secret seeds."""
    first, second = _update(base, RoundSeeds.secret()), _update(base, RoundSeeds.secret())
    diff = np.concatenate([(first[k] - second[k]).ravel() for k in first])
    assert np.abs(diff).max() > 1e-4
    # ... whereas a seeded (simulation-only, recorded) run repeats exactly: the difference really is the seed.
    again = _update(base, SEEDS), _update(base, SEEDS)
    assert all(np.array_equal(again[0][k], again[1][k]) for k in again[0])
    assert RoundSeeds.secret().kind == "secrets" and SEEDS.kind == "seeded-insecure:0"


def test_an_empty_poisson_batch_still_releases_noise(base):
    """Each charged step releases sum(clipped grads) + N(0, sigma^2 C^2), divided by the expected batch size,
    even when Poisson sampling drew no example: the update is then noise with exactly that scale."""
    sigma, clip, batch = 2.0, 0.5, 4
    model = _model(base)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    ids, mask, labels = _data(base, 16)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=batch)
    private = privatize(model, torch.optim.SGD(params, lr=1.0), loader, DpParams(sigma, clip), torch.Generator())
    noise_only_step(private.optimizer)
    released = torch.cat([(b - p.detach()).ravel() for b, p in zip(before, params, strict=True)]) * batch
    assert released.numel() > 1000
    assert float(released.mean()) == pytest.approx(0.0, abs=0.1 * sigma * clip)
    assert float(released.std()) == pytest.approx(sigma * clip, rel=0.1)


def test_a_small_round_trains_on_one_thread_and_restores_the_setting(base, monkeypatch) -> None:
    """Splitting a tiny model's operations across threads cost more than the operations; the process's thread
    count is back once the round ends, and a large round keeps it."""
    from fedtune.client import trainer

    model, seen = _model(base), []
    real = trainer.run_loop
    monkeypatch.setattr(trainer, "run_loop", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kwargs = {"steps": 1, "batch_size": 16, "learning_rate": 0.1, "dp": DpParams(1.0, 1.0), "device": CPU}
        train(model, _data(base, 16), seeds=RoundSeeds.secret(), **kwargs)
        monkeypatch.setattr(trainer, "SMALL_PART_WORK", 1)
        train(model, _data(base, 16), seeds=RoundSeeds.secret(), **kwargs)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_head_only_rounds_train_the_head_alone_and_then_everything_again(base):
    """LP-FT (head-rounds): a head-only round leaves every LoRA factor as it was and clips and noises the head
    alone (Opacus sees only the head); afterwards the factors train again."""
    model = _model(base)
    _randomise_head(model)
    before = to_arrays(model)
    train(model, _data(base), steps=2, batch_size=32, learning_rate=1e-2, dp=DpParams(1.0, 1.0), device=CPU,
          seeds=SEEDS, head_only=True)
    after = to_arrays(model)
    lora = [k for k in before if "lora_" in k]
    assert lora and all(np.array_equal(before[k], after[k]) for k in lora)
    assert any(not np.array_equal(before[k], after[k]) for k in before if "head" in k)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # restored
    train(model, _data(base), steps=1, batch_size=32, learning_rate=1e-2, dp=DpParams(1.0, 1.0), device=CPU,
          seeds=SEEDS)
    assert any(not np.array_equal(after[k], v) for k, v in to_arrays(model).items() if "lora_" in k)


def test_head_rounds_and_the_top_layer_choice_leave_the_nodes_charge_as_it_is():
    """Both are the server's choice of what trains; neither enters the plan the node charges (sampling rate,
    steps, noise, budget key), so a server cannot buy a cheaper charge or another ledger key with them."""
    import dataclasses

    from fedtune.client.round import plan_request
    from fedtune.common.settings import RunSettings
    from fedtune.common.wire.contract import RoundRequest

    s = RunSettings()
    plain = RoundRequest(1, "run-k", 0, ("neg", "pos"), s.model, s.lora, s.plan, s.privacy)
    lpft = dataclasses.replace(plain, plan=dataclasses.replace(s.plan, head_rounds=2),
                               lora=dataclasses.replace(s.lora, lora_layers=""))
    assert plan_request(plain, 1000) == plan_request(lpft, 1000)

"""LoRA in the top layers only: the frozen lower layers' output is computed once and training runs from it.

The cached path must be the same function as the full model (same logits, same per-example gradients),
keep the adapter's names (the server's model has the same tensors), and still train under DP-SGD.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.client.node_data import NodeRows, train_inputs
from fedtune.client.randomness import RoundSeeds
from fedtune.client.trainer import DpParams, train
from fedtune.common.data.table import LabelledData
from fedtune.common.models.adapter import to_arrays
from fedtune.common.models.base import encode, load_base
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks.base import trim
from fedtune.common.tasks.classify.model import build_model, frozen_prefix, lower_states
from tests.tiny import make_sentiment_frame

CPU = torch.device("cpu")
TOP = LoraSettings(lora_rank=4, lora_layers="1")  # the tiny BERT has layers 0 and 1


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(str(tiny_model_dir))


def _batch(base, n: int = 12):
    frame = make_sentiment_frame(n, seed=5)
    ids, mask = encode(base.tokenizer, frame["text"].tolist(), 16)
    labels = torch.tensor((frame["label"] == "pos").astype(int).to_numpy())
    return ids, mask, labels


def _model(base, lora: LoraSettings):
    model = build_model(base, 2, lora, CPU, seed=0)
    with torch.no_grad():  # a non-zero head and B, so every factor gets a gradient
        for name, p in model.named_parameters():
            if p.requires_grad and ("head" in name or "lora_B" in name):
                p.normal_(0, 0.5)
    return model


def test_the_frozen_prefix_is_the_lowest_lora_layer(base):
    assert frozen_prefix(base.encoder, TOP) == 1
    assert frozen_prefix(base.encoder, LoraSettings()) == 0  # LoRA everywhere: nothing to cache
    assert frozen_prefix(base.encoder, LoraSettings(lora_layers="1,0")) == 0


def test_cached_states_give_the_full_models_logits_and_per_example_gradients(base):
    model = _model(base, TOP)
    model.eval()  # no dropout: both paths must be the same function
    ids, mask, labels = _batch(base)
    states = lower_states(base.encoder, ids, mask, cut=1)
    full = trim({"input_ids": ids, "attention_mask": mask})
    cached = trim({"hidden_states": states, "attention_mask": mask})
    with torch.no_grad():
        assert torch.allclose(model(**full), model(**cached), atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for i in range(3):  # each example's own gradient (what Opacus clips) is the same on both paths
        grads = []
        for batch in (full, cached):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            loss = torch.nn.functional.cross_entropy(model(**one), labels[i:i + 1])
            grads.append(torch.autograd.grad(loss, trainable))
        for a, b in zip(*grads, strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_a_node_trains_from_cached_states_and_sends_the_servers_tensor_names(base, tiny_model_dir):
    frame = make_sentiment_frame(48, seed=2)
    from datasets import Dataset

    data = LabelledData(Dataset.from_dict({"text": frame["text"].tolist(),
                                           "label": (frame["label"] == "pos").astype(int).tolist()}),
                        ["neg", "pos"], "test")
    rows = NodeRows(data, data, "fp", "classify")
    inputs = train_inputs(rows, str(tiny_model_dir), 16, TOP)
    assert "hidden_states" in inputs and "input_ids" not in inputs
    assert inputs["hidden_states"].shape == (48, 16, base.hidden_size)
    assert train_inputs(rows, str(tiny_model_dir), 16, TOP)["hidden_states"] is inputs["hidden_states"]  # cached
    assert "input_ids" in train_inputs(rows, str(tiny_model_dir), 16, LoraSettings(lora_rank=4))

    model = _model(base, TOP)
    server = build_model(base, 2, TOP, CPU, seed=0)
    before = to_arrays(model)
    assert set(before) == set(to_arrays(server))
    assert not any("layer.0." in k for k in before)  # no LoRA below the cut
    result = train(model, inputs, steps=2, batch_size=16, learning_rate=0.5, dp=DpParams(1.0, 1.0), device=CPU,
                   seeds=RoundSeeds.insecure(0, 1, "n"))
    after = to_arrays(model)
    assert result.steps == 2 and np.isfinite(result.loss)
    assert any("lora_B" in k and not np.array_equal(before[k], after[k]) for k in before)


def test_a_kept_model_trains_a_round_exactly_as_a_freshly_built_one(base, tiny_model_dir):
    """The model a process keeps across rounds (Opacus wrapped and closed before) gives the same update."""
    from fedtune.common.models.adapter import load_arrays
    from fedtune.common.models.base import kept_model
    from fedtune.common.tasks import get_task

    ids, mask, labels = _batch(base, 32)
    start = to_arrays(_model(base, TOP))
    kwargs = dict(steps=2, batch_size=8, learning_rate=0.5, dp=DpParams(1.0, 1.0), device=CPU)
    updates, models = [], []
    for model in (kept_model(get_task("classify"), str(tiny_model_dir), ("neg", "pos"), TOP, CPU),
                  kept_model(get_task("classify"), str(tiny_model_dir), ("neg", "pos"), TOP, CPU),
                  build_model(base, 2, TOP, CPU)):
        models.append(model)
        load_arrays(model, start)
        train(model, (ids, mask, labels), seeds=RoundSeeds.insecure(7, 2, "n"), **kwargs)
        updates.append(to_arrays(model))
    kept_first, kept_again, fresh = updates
    # the second round really ran on the kept model (already wrapped by Opacus once), not on a new one
    kept, fresh_built = models[1] is models[0], models[2] is not models[0]
    assert kept and fresh_built, "kept_model built a new model for the same settings"
    assert fresh and fresh.keys() == kept_first.keys() == kept_again.keys()
    for name in fresh:
        assert np.allclose(kept_first[name], fresh[name], atol=1e-6), name
        assert np.allclose(kept_again[name], fresh[name], atol=1e-6), name


def test_held_out_evaluation_reuses_the_frozen_layers_output(base):
    """The server scores the same held-out set every round: with LoRA only above the frozen layers, the task
    computes their output once and scores from it, with the full model's loss and accuracy."""
    from fedtune.common.tasks.classify.evaluation import evaluate
    from fedtune.common.tasks.classify.task import CLASSIFY

    model = _model(base, TOP)
    ids, mask, labels = _batch(base, 40)
    full = evaluate(model, ids, mask, labels, device=CPU)
    first = CLASSIFY.evaluate(model, base, None, (ids, mask, labels), device=CPU)
    (held,) = CLASSIFY._eval_states.values()
    again = CLASSIFY.evaluate(model, base, None, (ids, mask, labels), device=CPU)
    assert CLASSIFY._eval_states[next(iter(CLASSIFY._eval_states))][1] is held[1]  # computed once
    assert first.accuracy == again.accuracy == full.accuracy
    assert first.loss == pytest.approx(full.loss, rel=1e-2)


def test_layers_count_from_the_top_with_negative_indices(base):
    """lora-layers -1 is the top layer of whatever model a node loads (layer 1 of the 2-layer tiny BERT); an index
    the model does not have is refused with the model's own range."""
    from fedtune.common.errors import ModelError

    assert frozen_prefix(base.encoder, LoraSettings(lora_layers="-1")) == 1
    assert frozen_prefix(base.encoder, LoraSettings(lora_layers="-2,-1")) == 0  # every layer: nothing to cache
    top = build_model(base, 2, LoraSettings(lora_rank=4, lora_layers="-1"), CPU, seed=0)
    assert to_arrays(top).keys() == to_arrays(build_model(base, 2, TOP, CPU, seed=0)).keys()
    with pytest.raises(ModelError, match=r"lora-layers '5'.*2 layers \(0\.\.1, or -2\.\.-1"):
        build_model(base, 2, LoraSettings(lora_layers="5"), CPU, seed=0)


def test_an_mpnet_encoder_caches_with_its_own_positions_and_relative_bias(tiny_model_dir, tmp_path):
    """all-mpnet-base-v2's architecture: positions after the padding index, a relative position bias shared by
    the layers, attention modules named q/k/v. The cached path must still be the full model's function."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from fedtune.common.models.base import BaseModel

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40)
    encoder = MPNetModel(config, add_pooling_layer=False).eval()
    encoder.requires_grad_(False)
    mpnet = BaseModel(path=tmp_path, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), encoder=encoder)
    lora = LoraSettings(lora_rank=4, lora_layers="-1", lora_targets="q,v")
    model = build_model(mpnet, 2, lora, CPU, seed=0)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ids = torch.randint(3, 64, (6, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    ids[0, 7:] = 1  # MPNet's padding index
    expected = torch.nn.functional.softmax(model(input_ids=ids, attention_mask=mask), dim=-1)
    from fedtune.common.tasks.classify.model import position_ids

    own = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # MPNet's own position ids
    ours = encoder(input_ids=ids, attention_mask=mask, position_ids=position_ids(encoder, ids)).last_hidden_state
    kept = mask.bool()  # padding positions differ (masked out everywhere), every real token's state is the same
    assert torch.allclose(own[kept], ours[kept], atol=1e-5)
    states = lower_states(mpnet.encoder, ids, mask, frozen_prefix(mpnet.encoder, lora))
    cached = torch.nn.functional.softmax(model(hidden_states=states, attention_mask=mask), dim=-1)
    assert frozen_prefix(mpnet.encoder, lora) == 2 and torch.allclose(expected, cached, atol=1e-5)

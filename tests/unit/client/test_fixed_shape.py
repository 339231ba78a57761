"""``train(fixed_shape=True)`` (the node policy's ``fixed-shape``): every part the model sees is max-seq-len
long whatever the rows drawn, for every task, and the released update is the dynamic-padding one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.client import trainer
from fedtune.client.randomness import RoundSeeds
from fedtune.client.trainer import DpParams, physical_parts, train
from fedtune.common.data.sequence import read_sft_jsonl, read_token_file
from fedtune.common.data.table import LabelledData
from fedtune.common.models.adapter import to_arrays
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks import get_task
from fedtune.common.tasks.classify.model import frozen_prefix, lower_states
from tests.tiny import make_sentiment_frame
from tests.tiny_tasks import make_tiny_decoder, ner_rows, sft_rows, write_conll, write_sft_jsonl

CPU = torch.device("cpu")
MAX_LEN = 24
CASES = ["classify", "classify-cached", "ner", "sft"]


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"))


def _rows(name: str, tmp: Path, n: int = 40) -> LabelledData:
    """Rows of very different lengths, so that dynamic padding would give parts of different widths."""
    if name == "sft":
        rows = sft_rows(n, seed=2)
        for i, row in enumerate(rows):
            row["prompt"] = " ".join((row["prompt"].split() * 4)[: 1 + i % 9])
        return read_sft_jsonl(write_sft_jsonl(tmp / "d.jsonl", rows))
    if name == "ner":
        sentences = [(words[: 2 + i % 5], tags[: 2 + i % 5]) for i, (words, tags) in enumerate(ner_rows(n, seed=2))]
        return read_token_file(write_conll(tmp / "d.conll", sentences), [])
    import datasets

    frame = make_sentiment_frame(n, seed=5)
    frame["text"] = [" ".join((t.split() * 3)[: 1 + i % 12]) for i, t in enumerate(frame["text"])]
    frame["label"] = (frame["label"] == "pos").astype(int)
    return LabelledData(datasets.Dataset.from_pandas(frame[["text", "label"]]), ["neg", "pos"])


def _setup(case: str, tmp: Path, encoder: Path, decoder: Path) -> tuple:
    name = case.removesuffix("-cached")
    task = get_task(name)
    base = task.load_base(str(decoder if name == "sft" else encoder))
    lora = LoraSettings(lora_rank=4, lora_targets="q_proj,v_proj" if name == "sft" else "query,value",
                        lora_layers="1" if case == "classify-cached" else "")
    data = _rows(name, tmp)
    ids, mask, labels = task.encode(base, data, MAX_LEN)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if case == "classify-cached":
        cut = frozen_prefix(base.encoder, lora)
        inputs = {"hidden_states": lower_states(base.encoder, ids, mask, cut), "attention_mask": mask,
                  "labels": labels}
    assert mask.sum(dim=1).min() < mask.sum(dim=1).max() < MAX_LEN  # lengths vary, none fills max-seq-len
    return task, base, data.label_names, lora, inputs


def _model(task, base, labels, lora):
    model = task.build_model(base, labels, lora, CPU, seed=1)
    with torch.no_grad():  # a non-zero head / B, so gradients reach every LoRA factor
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_A" not in name:
                p.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape))
    return model


def _train(task, base, labels, lora, inputs, *, fixed_shape: bool, widths: list[tuple[str, int]]):
    """The trained adapter; ``widths`` gets the sequence length of every forward pass (and of the sft output
    layer's input)."""
    model = _model(task, base, labels, lora)

    def record(_module, _args, kwargs):
        widths.append(("input", int(kwargs["attention_mask"].shape[1])))

    def record_head(_module, args):
        widths.append(("output-layer", int(args[0].shape[1])))

    hooks = [model.register_forward_pre_hook(record, with_kwargs=True)]
    if task.name == "sft":
        hooks.append(model.get_output_embeddings().register_forward_pre_hook(record_head))
    train(model, inputs, steps=3, batch_size=16, learning_rate=0.2, dp=DpParams(1.0, 0.5), device=CPU,
          seeds=RoundSeeds.insecure(3, 1, "fixed"), task=task, fixed_shape=fixed_shape)
    for hook in hooks:
        hook.remove()
    return to_arrays(model)


@pytest.mark.parametrize("case", CASES)
def test_every_part_is_max_seq_len_long_and_the_update_is_the_dynamic_one(case, tmp_path, tiny_model_dir,
                                                                           tiny_decoder_dir, monkeypatch):
    monkeypatch.setenv("FEDTUNE_PRECISION", "fp32")
    monkeypatch.setattr(trainer, "PART_SIZE", 5)  # several parts per Poisson batch
    task, base, labels, lora, inputs = _setup(case, tmp_path, tiny_model_dir, tiny_decoder_dir)
    fixed_widths: list[tuple[str, int]] = []
    fixed = _train(task, base, labels, lora, inputs, fixed_shape=True, widths=fixed_widths)
    dynamic_widths: list[tuple[str, int]] = []
    dynamic = _train(task, base, labels, lora, inputs, fixed_shape=False, widths=dynamic_widths)
    inputs_seen = [w for kind, w in fixed_widths if kind == "input"]
    assert len(inputs_seen) >= 6 and set(inputs_seen) == {MAX_LEN}
    if case == "sft":  # the output layer runs on every position too (no logits_to_keep shortcut)
        assert {w for kind, w in fixed_widths if kind == "output-layer"} == {MAX_LEN}
    assert any(w < MAX_LEN for _, w in dynamic_widths)  # the test data would show in dynamic padding
    init = to_arrays(_model(task, base, labels, lora))
    assert any(not np.allclose(fixed[k], init[k]) for k in fixed if "lora_A" in k)  # training moved the adapter
    for key in fixed:
        np.testing.assert_allclose(fixed[key], dynamic[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_fixed_shape_parts_keep_the_batch_order_and_full_width():
    mask = torch.tensor([[1] * k + [0] * (8 - k) for k in (1, 5, 2, 7, 3)])
    batch = {"input_ids": mask * 9, "attention_mask": mask, "labels": torch.arange(5)}
    parts = physical_parts(batch, 2, fixed_shape=True)
    assert [p["labels"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert all(p["input_ids"].shape[1] == 8 and p["attention_mask"].shape[1] == 8 for p in parts)
    assert physical_parts(batch, 0, fixed_shape=True)[0]["input_ids"].shape == (5, 8)

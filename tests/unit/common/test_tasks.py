"""Each task under Opacus: per-sample gradients for every trainable tensor, that equal the example's own
gradient (so no example's clipped contribution depends on another), and losses that skip prompt and padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from fedtune.common.data.sequence import read_sft_jsonl, read_token_file
from fedtune.common.data.table import LabelledData
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks import IGNORE, get_task
from fedtune.common.tasks.base import trim
from tests.tiny import make_sentiment_frame
from tests.tiny_tasks import make_tiny_decoder, ner_rows, sft_rows, write_conll, write_sft_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"))


def _setup(name: str, tmp: Path, decoder: Path, encoder: Path) -> tuple:
    task = get_task(name)
    if name == "sft":
        base = task.load_base(str(decoder))
        rows = sft_rows(5)
        rows[1]["prompt"] += " and the film was quite a very good story and plot"  # a longer example
        data = read_sft_jsonl(write_sft_jsonl(tmp / "d.jsonl", rows))
        lora = LoraSettings(lora_targets="q_proj,v_proj,o_proj,gate_proj,down_proj", lora_rank=4)
    elif name == "ner":
        base = task.load_base(str(encoder))
        data = read_token_file(write_conll(tmp / "d.conll", ner_rows(5)), [])
        lora = LoraSettings(lora_rank=4)
    else:
        import datasets

        base = task.load_base(str(encoder))
        frame = make_sentiment_frame(5)
        frame["label"] = (frame["label"] == "pos").astype(int)
        data = LabelledData(datasets.Dataset.from_pandas(frame[["text", "label"]]), ["neg", "pos"])
        lora = LoraSettings(lora_rank=4)
    model = task.build_model(base, data.label_names, lora, CPU, seed=1)
    for name_, param in model.named_parameters():  # B starts at zero; make every factor matter
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1) if "lora_A" not in name_ else None
    return task, model, task.encode(base, data, 24)


@pytest.mark.parametrize("name", ["classify", "ner", "sft"])
def test_per_sample_gradients_exist_and_equal_each_example_alone(name, tmp_path, tiny_decoder_dir, tiny_model_dir):
    task, model, (ids, mask, labels) = _setup(name, tmp_path, tiny_decoder_dir, tiny_model_dir)
    for module in model.modules():  # no dropout: the same example must give the same gradient alone and in the batch
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()  # Opacus records activations in training mode only
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    trainable = {n: p for n, p in gsm.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("head" in n) or ("classifier" in n) for n in trainable)
    batch = trim({"input_ids": ids, "attention_mask": mask, "labels": labels})
    task.loss(gsm, batch).backward()
    samples = {n: p.grad_sample.clone() for n, p in trainable.items()}
    for n, p in trainable.items():
        assert samples[n].shape == (len(ids), *p.shape), n
    for i in (0, 1, 3):
        gsm.zero_grad(set_to_none=True)
        alone = trim({k: v[i:i + 1] for k, v in batch.items()})
        task.loss(gsm, alone).backward()
        for n, p in trainable.items():
            torch.testing.assert_close(samples[n][i], p.grad_sample[0], atol=1e-5, rtol=1e-4, msg=f"{n} example {i}")
    assert any(float(s.abs().sum()) > 0 for n, s in samples.items() if "lora_A" in n)
    gsm._close()


def test_sft_labels_are_response_tokens_only_and_loss_ignores_prompt_and_padding(tmp_path, tiny_decoder_dir):
    task = get_task("sft")
    base = task.load_base(str(tiny_decoder_dir))
    data = read_sft_jsonl(write_sft_jsonl(tmp_path / "d.jsonl", [{"prompt": "good movie", "response": "fine thanks"},
                                                                 {"prompt": "bad", "response": "bad bad bad"}]))
    ids, mask, labels = task.encode(base, data, 16)
    tok = base.tokenizer
    response = tok("fine thanks<|im_end|>", add_special_tokens=False)["input_ids"]
    header = "<|im_start|>user\ngood movie<|im_end|>\n<|im_start|>assistant\n"
    prompt = tok(header, add_special_tokens=False)["input_ids"]
    assert ids[0, :len(prompt) + len(response)].tolist() == prompt + response
    assert labels[0].tolist() == [IGNORE] * len(prompt) + response + [IGNORE] * (16 - len(prompt) - len(response))
    assert (labels[mask == 0] == IGNORE).all()
    model = task.build_model(base, [], LoraSettings(lora_targets="q_proj,v_proj", lora_rank=2), CPU)
    model.eval()
    batch = trim({"input_ids": ids, "attention_mask": mask, "labels": labels})
    loss = task.loss(model, batch)
    # Changing prompt tokens' labels or padding content changes nothing but the model's input...
    noisy = dict(batch, input_ids=batch["input_ids"].clone())
    noisy["input_ids"][0, len(prompt) + len(response):] = 7  # padding content (masked)
    torch.testing.assert_close(task.loss(model, noisy), loss)
    # ...and the loss is the mean over examples of each example's mean over its response tokens.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                      reduction="none")
        keep = (target != IGNORE).float()
        expected = ((per_token * keep).sum(1) / keep.sum(1)).mean()
    torch.testing.assert_close(loss, expected)


def test_ner_tags_sit_on_first_subwords_only(tmp_path, tiny_model_dir):
    task = get_task("ner")
    base = task.load_base(str(tiny_model_dir))
    data = read_token_file(write_conll(tmp_path / "d.conll", [(["alice", "went", "to", "paris"],
                                                               ["B-PER", "O", "O", "B-LOC"])]), [])
    ids, mask, labels = task.encode(base, data, 12)
    names = data.label_names
    kept = [names[int(t)] for t in labels[0] if t != IGNORE]
    assert kept == ["B-PER", "O", "O", "B-LOC"]
    assert labels[0, 0] == IGNORE and (labels[0][mask[0] == 0] == IGNORE).all()  # [CLS] and padding


def test_entity_f1_is_span_level():
    from fedtune.common.tasks.ner.evaluation import entity_scores

    truth = [["B-PER", "I-PER", "O", "B-LOC"]]
    half = entity_scores(truth, [["B-PER", "O", "O", "B-LOC"]])  # PER boundary wrong: only LOC counts
    assert half["entity-f1"] == pytest.approx(0.5) and half["per-label"]["LOC"]["f1"] == 1.0
    assert entity_scores(truth, truth)["entity-f1"] == 1.0

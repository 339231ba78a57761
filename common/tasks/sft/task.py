"""Instruction tuning (SFT) of a causal LM: LoRA on attention and MLP projections, loss on response tokens.

An example is one prompt-response pair, laid out in ChatML (the format SmolLM2-Instruct was tuned on):
``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` + ``{response}<|im_end|>``; a tokenizer
without those tokens gets ``{prompt}\\n\\n`` + ``{response}<eos>``. Only response tokens carry loss. Each
example's loss is the mean over its own response tokens, and the batch loss the mean over examples, so
per-sample clipping bounds one pair's influence. RMSNorm, embeddings and the (tied) output layer stay
frozen: Opacus has no per-sample gradient for RMSNorm, and rotary position embeddings have no weights,
so the learned-position issue of opacus#841 does not arise.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from fedtune.common.errors import DataError, ModelError
from fedtune.common.tasks.base import IGNORE, Batch, Encoded, named
from fedtune.common.tasks.sft.card import CARD

if TYPE_CHECKING:
    from peft import PeftModel

    from fedtune.common.data.table import LabelledData
    from fedtune.common.models.base import BaseModel, BaseModelRef
    from fedtune.common.settings import DataSettings, LoraSettings
    from fedtune.common.tasks.result import EvalResult

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SAMPLES = 3  # held-out prompts answered in every round's evaluation
SAMPLE_TOKENS = 40


@functools.lru_cache(maxsize=2)
def load_decoder(model_path: str) -> BaseModel:
    """Tokenizer and frozen causal LM from a local directory ("" = the embedded SmolLM2), once per process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.common.models.base import BaseModel, resolve_model_path
    from fedtune.common.models.decoder import embedded_decoder_path

    path = embedded_decoder_path() if not model_path else resolve_model_path(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load a causal LM from {path}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.requires_grad_(False)
    lm.config.use_cache = False
    return BaseModel(path=path, tokenizer=tokenizer, encoder=lm)


def _chatml(tokenizer: Any) -> bool:
    """Whether the vocabulary has ChatML's two markers (a token lookup: ``get_vocab`` copies the vocabulary)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    return all(isinstance(i, int) and i != tokenizer.unk_token_id for i in ids)


def format_pair(tokenizer: Any, prompt: str, response: str | None = None) -> tuple[str, str]:
    """(prompt text, response text) as the model sees them; ``response=None`` gives the generation prompt."""
    if _chatml(tokenizer):
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", f"{response or ''}<|im_end|>"
    return f"{prompt}\n\n", f"{response or ''}{tokenizer.eos_token or ''}"


def _fit(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Truncate to ``max_len``: the prompt keeps its end (the assistant header), the response its start,
    and the response keeps at least half of the room (so it is never empty)."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    response = response[: max_len - min(len(prompt), max_len // 2)]
    return prompt[len(prompt) - (max_len - len(response)):], response


def encode_pairs(base: BaseModel, data: LabelledData, max_len: int, *, strict: bool = True) -> Encoded:
    """input_ids / attention_mask [N, max_len] (right padding), labels [N, max_len] = response ids, else IGNORE."""
    from fedtune.common.models.base import model_context

    tok = base.tokenizer
    texts = [format_pair(tok, p, r) for p, r in zip(data.dataset["prompt"], data.dataset["response"], strict=True)]
    prompts = tok([t[0] for t in texts], add_special_tokens=False)["input_ids"]
    responses = tok([t[1] for t in texts], add_special_tokens=False)["input_ids"]
    lines = list(data.dataset["line"]) if "line" in data.dataset.column_names else range(1, len(texts) + 1)
    context = model_context(base)
    problems = [f"{data.origin or 'data'} line {line}: {len(p) + len(r)} tokens, longer than the model's "
                f"context of {context}" for line, p, r in zip(lines, prompts, responses, strict=True)
                if len(p) + len(r) > context]
    if problems and strict:
        raise DataError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []),
                        code="DATA_SCHEMA")
    n = len(texts)
    ids = torch.full((n, max_len), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, max_len), dtype=torch.long)
    labels = torch.full((n, max_len), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        p, r = _fit(p, r, max_len)
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


def response_logits(module: nn.Module, batch: Batch, *, every_position: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, K, V], targets [B, K]) for the positions that predict a response token of some example.

    The output layer runs only from the batch's first response position on (``logits_to_keep``): the
    vocabulary projection is the largest matrix of a small decoder, and prompt positions carry no loss.
    ``every_position`` (fixed-shape training): it runs on every position, so its cost does not depend on how
    long the batch's prompts are (K = T - 1).
    """
    labels = batch["labels"]  # [B, T]
    width = labels.shape[1]
    has = (labels != IGNORE).any(dim=0).nonzero()
    first = int(has[0]) if len(has) else width - 1  # first position holding a response token (>= 1)
    keep = width if every_position else width - max(first - 1, 0)
    out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1
    return logits, labels[:, width - keep + 1:]


class Sft:
    name = "sft"
    pipeline_tag = "text-generation"
    headline = "perplexity"
    truncates = False
    labelled = False  # examples carry labels or tags from a declared set
    clients = 3  # fedtune-sim's default job
    adapter_fields: Mapping[str, Any] = {}
    card = CARD
    presets: dict[str, Any] = {
        "dataset": "chitchat", "max-seq-len": 48, "lora-targets": TARGETS, "lora-layers": "26,27,28,29",
        "lora-rank": 8, "lora-alpha": 16.0, "num-rounds": 3, "local-epochs": 0.5, "batch-size": 32,
        "optimizer": "sgd", "learning-rate": 0.25, "lora-lr-scale": 1.0, "partitioner": "iid", "test-fraction": 0.02,
        # The non-private baseline (--no-dp): AdamW at 3e-3 on every trainable tensor (of 2e-4, 3e-3 and 1e-2,
        # the best held-out perplexity after 3 rounds; unclipped SGD at 0.25 diverged in round 3).
        "nonprivate-learning-rate": 3e-3, "nonprivate-lora-lr-scale": 1.0,
        "max-train-examples": 600, "fraction-evaluate": 0.0,
    }

    def load_base(self, model_path: str) -> BaseModel:
        return load_decoder(model_path)

    def base_ref(self, model_path: str, hub_id: str = "") -> BaseModelRef:
        """The embedded decoder by its Hub id, GGUF file and that file's sha256; else as any local model."""
        from fedtune.common.models.base import BaseModelRef, base_model_ref
        from fedtune.common.models.decoder import DECODER_ID, GGUF_FILE, embedded_decoder_path, embedded_source

        if model_path or hub_id:
            return base_model_ref(model_path, hub_id)
        source = embedded_source(embedded_decoder_path())
        return BaseModelRef(DECODER_ID, "embedded", None, GGUF_FILE, source.get("gguf_sha256"), DECODER_ID)

    def load_data(self, settings: DataSettings) -> LabelledData:
        import datasets

        from fedtune.common.data.corpus import chitchat_pairs
        from fedtune.common.data.sequence import read_sft_jsonl
        from fedtune.common.data.table import LabelledData

        if settings.dataset == "chitchat":
            frame = chitchat_pairs()
            frame["line"] = range(1, len(frame) + 1)
            return LabelledData(datasets.Dataset.from_pandas(frame, preserve_index=False), [], "chitchat")
        return read_sft_jsonl(Path(settings.dataset))

    def read_file(self, path: Path, *, text_column: str, label_column: str, labels: Sequence[str],
                  skipped: list[str] | None = None) -> LabelledData:
        from fedtune.common.data.sequence import read_sft_jsonl

        return read_sft_jsonl(path, skipped)

    def write_partition(self, part: LabelledData, directory: Path) -> Path:
        from fedtune.common.data.sequence import write_jsonl

        rows = ({"prompt": p, "response": r} for p, r in zip(part.dataset["prompt"], part.dataset["response"],
                                                             strict=True))
        return write_jsonl(directory / "data.jsonl", rows)

    def fingerprint(self, data: LabelledData) -> str:
        digest = hashlib.sha256()
        for p, r in zip(data.dataset["prompt"], data.dataset["response"], strict=True):
            digest.update(f"{len(p)}:{p}\t{r}\n".encode())
        return digest.hexdigest()

    def encode(self, base: BaseModel, data: LabelledData, max_len: int, *, strict: bool = True) -> Encoded:
        return encode_pairs(base, data, max_len, strict=strict)

    def build_model(self, base: BaseModel, labels: Sequence[str], lora: LoraSettings, device: torch.device,
                    seed: int = 0) -> PeftModel:
        from peft import LoraConfig, TaskType

        from fedtune.common.models.base import attach_lora, lora_layers

        torch.manual_seed(seed)  # LoRA A init; identical on every node that uses the same seed
        lm = copy.deepcopy(base.encoder).to(device)  # to the device before PEFT wraps it (opacus#820)
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.lora_rank, lora_alpha=lora.lora_alpha,  # type: ignore[arg-type]  # PEFT's hint says int
                            lora_dropout=lora.lora_dropout, target_modules=lora.target_modules,
                            layers_to_transform=lora_layers(lora, lm.config, base.path), bias="none")
        return attach_lora(lm, config, lora, base.path)

    def train_inputs(self, base: BaseModel, encoded: Encoded, lora: LoraSettings) -> dict[str, torch.Tensor]:
        return named(encoded)

    def loss(self, module: nn.Module, batch: Batch, *, fixed_shape: bool = False) -> torch.Tensor:
        from fedtune.common.tasks.base import per_example_mean

        logits, targets = response_logits(module, batch, every_position=fixed_shape)  # [B, K, V], [B, K]
        token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE,
                                                 reduction="none")  # [B, K]
        return per_example_mean(token_loss, targets)

    def evaluate(self, model: nn.Module, base: BaseModel, data: LabelledData, encoded: Encoded, *,
                 device: torch.device, groups: Sequence[str] | None = None, detail: bool = False) -> EvalResult:
        from fedtune.common.tasks.sft.evaluation import causal_lm_eval

        result = causal_lm_eval(model, encoded, device=device)
        if not detail:
            return result
        prompts = list(data.dataset["prompt"][:SAMPLES])
        references = list(data.dataset["response"][:SAMPLES])
        samples = [{"prompt": p, "reference": r, "generated": g}
                   for p, r, g in zip(prompts, references, generate(model, base, prompts, device=device), strict=True)]
        result.extra["samples"] = samples
        return result

    def summary_fields(self, held_out: LabelledData, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {}  # no classes: no majority class


@torch.no_grad()
def generate(model: nn.Module, base: BaseModel, prompts: Sequence[str], *, device: torch.device,
             max_new_tokens: int = SAMPLE_TOKENS) -> list[str]:
    """Greedy answers to ``prompts`` (one at a time: no padding subtleties)."""
    tok = base.tokenizer
    stop = [t for t in (tok.convert_tokens_to_ids("<|im_end|>") if _chatml(tok) else None, tok.eos_token_id)
            if isinstance(t, int)]
    model.eval()
    lm = cast(Any, model)  # a (PEFT-wrapped) causal LM: nn.Module does not declare generate
    out = []
    for prompt in prompts:
        ids = tok(format_pair(tok, prompt)[0], add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        new = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=stop or None, pad_token_id=tok.pad_token_id,
                          use_cache=True)
        out.append(str(tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True)).strip())
    return out


SFT = Sft()

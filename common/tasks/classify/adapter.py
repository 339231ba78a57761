"""A trained sentence classifier, loaded anywhere from its adapter directory: predict, or export it merged as a
stock ``sentence-transformers`` model."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.common.errors import ModelError
from fedtune.common.models.adapter import AdapterMeta
from fedtune.common.models.base import check_base, load_base, resolve_base
from fedtune.common.tasks.classify.model import build_classifier, probabilities


@dataclass(frozen=True)
class LoadedAdapter:
    """A trained sentence classifier, ready to predict (``predict_proba``)."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    meta: AdapterMeta

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities [N, len(labels)], columns in ``meta.labels`` order."""
        return probabilities(self.model, self.tokenizer, list(texts), max_len=self.meta.max_seq_len,
                             batch_size=batch_size)


def load_adapter(adapter_dir: str | Path, base: str | Path | None = None) -> LoadedAdapter:
    """Load a saved adapter on its base model, from any folder on any machine.

    ``base`` is the base model's directory; by default it is resolved from ``fedtune.json``: the
    embedded all-MiniLM-L6-v2 copy when installed, else the Hub id at its recorded revision (or the
    local Hugging Face cache), else a directory of the recorded name under the current directory.
    """
    adapter_dir = Path(adapter_dir)
    meta = AdapterMeta.read(adapter_dir)
    base_model = load_base(resolve_base(meta.base, base))
    check_base(meta.base, base_model)
    try:
        model = PeftModel.from_pretrained(build_classifier(base_model, len(meta.labels)), str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"could not load the adapter in {adapter_dir} on {meta.base.name}: {err}") from err
    model.eval()
    return LoadedAdapter(model, base_model.tokenizer, meta)


def export_sentence_transformer(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Export the adapter merged into its base as a stock ``sentence-transformers`` model.

    The result is Transformer -> mean pooling -> Dense (identity activation): exactly this classifier,
    so ``SentenceTransformer(out_dir).encode(texts)`` returns its logits (softmax them for probabilities,
    columns in ``labels.json`` order) with no fedtune import. The adapter's model card is kept beside it
    as ``fedtune-model-card.md`` (merging is post-processing: the privacy statement still holds).
    """
    import sentence_transformers.models as models
    from sentence_transformers import SentenceTransformer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    loaded = load_adapter(adapter_dir, base)
    merged = loaded.model.merge_and_unload()  # LoRA folded into the encoder's weights
    with tempfile.TemporaryDirectory() as encoder_dir:
        merged.encoder.save_pretrained(encoder_dir)
        loaded.tokenizer.save_pretrained(encoder_dir)
        transformer = models.Transformer(encoder_dir, max_seq_length=loaded.meta.max_seq_len)
        pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
        dense = models.Dense(merged.head.in_features, merged.head.out_features, bias=True,
                             activation_function=torch.nn.Identity())
        dense.linear.load_state_dict(merged.head.state_dict())
        SentenceTransformer(modules=[transformer, pooling, dense], device="cpu").save(str(out_dir))
    (out_dir / "labels.json").write_text(json.dumps(loaded.meta.labels) + "\n")
    if (adapter_dir / "README.md").is_file():
        shutil.copyfile(adapter_dir / "README.md", out_dir / "fedtune-model-card.md")
    return out_dir

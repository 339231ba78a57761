"""Tiny BERT models and an easy synthetic task, built in the test (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

POSITIVE = ["good", "great", "fine", "superb", "lovely", "happy"]
NEGATIVE = ["bad", "awful", "poor", "boring", "sad", "ugly"]
FILLER = ["the", "movie", "was", "plot", "actor", "film", "scene", "quite", "very", "and", "a", "story"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def make_tiny_model(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer BERT and its WordPiece tokenizer to ``path``."""
    import torch

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate(VOCAB)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    ).save_pretrained(path)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def make_sentiment_frame(n: int, seed: int = 0, groups: int = 12) -> pd.DataFrame:
    """An easy task: the label is whether a sentiment word is positive; plus a group column."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.random() < 0.5
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg", "group": f"g{i % groups}"})
    return pd.DataFrame(rows)

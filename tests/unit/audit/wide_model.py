"""A tiny BERT with a wide vocabulary: canaries need words that nothing else in the data uses."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from tests.tiny import VOCAB


def make_wide_model(path: Path, words: int = 2000, hidden: int = 32, seed: int = 0) -> Path:
    """``tests.tiny``'s words plus ``words`` made-up ones (w0 ... wN), a 2-layer BERT of width ``hidden``."""
    import torch

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate([*VOCAB, *(f"w{i}" for i in range(words))])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path

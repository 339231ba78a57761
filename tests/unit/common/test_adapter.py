"""Adapter tensors: only trainable tensors travel, bit-exactly; bad updates are caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from peft import PeftModel

from fedtune.common.adapter import (
    arrays_to_record,
    check_arrays,
    load_arrays,
    record_to_arrays,
    save_adapter,
    to_arrays,
)
from fedtune.common.errors import ModelError
from fedtune.common.model import build_classifier, build_model, load_base
from fedtune.common.settings import LoraSettings

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
    out = save_adapter(model, arrays, tmp_path / "adapter", base_path=str(base.path), label_names=["neg", "pos"])
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(build_classifier(base, 2), str(out))
    ids = torch.randint(5, 20, (3, 7))
    mask = torch.ones_like(ids)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask))

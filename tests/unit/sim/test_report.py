"""report.html: one self-contained file (inlined PNGs, no external URL) with every section of a run."""

from __future__ import annotations

import base64
import json
import re

import pytest

from fedtune.server.report import AuditVerdict, render_report
from fedtune.sim.report import write_run_report
from tests.run_results import make_results


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_the_report_is_self_contained_and_complete(tmp_path):
    out = make_results(tmp_path / "run")
    path = write_run_report(out)
    page = path.read_text()
    assert path.name == "report.html"
    assert not re.search(r"https?://|//cdn|<script|<link", page)  # nothing fetched from anywhere
    images = _images(page)
    assert len(images) == 6 and all(img.startswith(b"\x89PNG") and b"http" not in img for img in images)
    for needle in ("Accuracy per round", "epsilon per node", "Per-label results", "Confusion", "Fairness view",
                   "Bytes per round", "Settings", "Package versions", "opacus", "client-1", "NOT RUN"):
        assert needle.lower() in page.lower(), needle
    assert str(tmp_path) not in page
    # config.json no longer names paths of this machine
    assert json.loads((out / "config.json").read_text())["model-path"] == "tiny-bert"


def test_sections_without_data_are_left_out(tmp_path):
    out = make_results(tmp_path / "run", groups=False, with_bytes=False)
    page = render_report(out)
    assert "Fairness view" not in page and "Bytes per round" not in page and len(_images(page)) == 4


@pytest.mark.parametrize(("ok", "word"), [(True, "PASSED"), (False, "FAILED")])
def test_the_audit_verdict_is_shown(tmp_path, ok, word):
    out = make_results(tmp_path / "run", groups=False)
    verdict = AuditVerdict(ok, "checked", [{"ledger": "client-0", "ok": ok, "entries": 2, "epsilon": 5.0,
                                            "opacus": 5.0, "dp-accounting": 4.99,
                                            "problems": [] if ok else ["line 2: bad signature"]}])
    page = render_report(out, verdict)
    assert word in page and ("line 2: bad signature" in page) is (not ok)


def test_a_report_with_no_rounds_still_renders(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert "fedtune run report" in render_report(tmp_path)


def test_the_epsilon_plot_of_thousands_of_clients_shows_their_spread(tmp_path) -> None:
    """One line (and legend entry) per client took matplotlib minutes at 10,000 clients."""
    import time

    from fedtune.sim.report import plot

    rounds = [{"round": 1, "accuracy": 0.6, "clients": [{"node-id": i, "epsilon": 1.0 + i / 5000}
                                                        for i in range(5000)]}]
    start = time.monotonic()
    assert plot(rounds, tmp_path / "metrics.png", 8.0).is_file()
    assert time.monotonic() - start < 20

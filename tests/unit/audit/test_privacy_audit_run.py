"""The one-run empirical audit end to end, with the node's real DP-SGD trainer (Opacus) on a tiny model.

(b) noise switched off while the run still claims its epsilon: the audit proves more privacy loss than
claimed (the node's DP is broken). (a) the same run with the planned noise: the bound stays below the claim.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fedtune.audit.empirical import CONFIDENCE, epsilon_lower_bound
from fedtune.sim.privacy_audit import CanaryAudit, audit_run, main
from tests.unit.audit.wide_model import make_wide_model

SMALL = dict(examples=100, canaries=200, epsilon=1.0, steps=40, batch_size=32, max_seq_len=12)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wide_model(tmp_path_factory.mktemp("wide-bert"), words=2000, hidden=32)


def test_noise_switched_off_is_caught(wide_model: Path, sentiment_csv: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    code = main(["--model", str(wide_model), "--dataset", str(sentiment_csv), *args, "--no-noise",
                 "--json", str(tmp_path / "audit.json")])
    assert code == 1, capsys.readouterr().out
    run = json.loads((tmp_path / "audit.json").read_text())["runs"][0]
    assert run["noise_multiplier"] == 0.0 and run["planned_noise"] > 1.0
    result = run["result"]
    assert result["claimed"] == pytest.approx(1.0, abs=0.01)
    assert result["guesses"] == {"canaries": 200, "guesses": 100, "correct": 100}
    assert result["lower_bound"] == pytest.approx(epsilon_lower_bound(200, 100, 100, 1e-5))
    assert result["lower_bound"] > 3 * result["claimed"]  # 3.49 proved against 1.0 claimed
    assert "DP BROKEN" in capsys.readouterr().out


def test_planned_noise_stays_below_the_claim(wide_model: Path, sentiment_csv: Path) -> None:
    cfg = CanaryAudit(model_path=str(wide_model), dataset=str(sentiment_csv), **SMALL)
    run = audit_run(cfg, seed=0, confidence=CONFIDENCE)
    assert run.noise_multiplier == run.planned_noise > 1.0
    assert not run.result.refutes_claim
    assert run.result.lower_bound <= run.result.claimed


@pytest.mark.slow
def test_a_thousand_canaries_catch_a_broken_node_claiming_two(wide_model: Path, sentiment_csv: Path) -> None:
    """The figures in docs/privacy.md: m = 1,000 canaries, claimed epsilon 2 (slow: minutes on 2 cores)."""
    cfg = CanaryAudit(model_path=str(wide_model), dataset=str(sentiment_csv), examples=100, canaries=1000,
                      epsilon=2.0, steps=50, batch_size=64, max_seq_len=12)
    broken = audit_run(replace(cfg, no_noise=True), seed=0, confidence=CONFIDENCE)
    assert broken.result.refutes_claim and broken.result.lower_bound > 4.0
    honest = audit_run(cfg, seed=0, confidence=CONFIDENCE)
    assert honest.result.lower_bound <= honest.result.claimed

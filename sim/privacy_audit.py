"""``fedtune-privacy-audit``: audit a node's DP-SGD empirically, in one training run.

The one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023; the bound is in
``fedtune.audit.empirical``): m canary examples (random word sequences with random
labels) are added to one client's training data, each with probability 1/2; the
node's own trainer (``fedtune.client.trainer.train``: Opacus DP-SGD with Poisson
sampling, per-example clipping and Gaussian noise) trains the adapter once; the
auditor scores every canary and turns its guesses into a lower bound on epsilon
at the run's delta, shown beside the epsilon the run claims (the node's ledger).

The auditor plays the untrusted coordinator, white-box: it chooses the global
adapter the round starts from (random, non-zero LoRA factors and head, so every
canary's gradient reaches many coordinates), turns dropout off (so training is a
deterministic function of the sampled batches and the noise), and scores canary i
by its coefficient c_i in the least-squares fit

    theta_0 - theta_T  ~  sum_j c_j * clip(grad_j(theta_0))

over every example the run could have used (the client's data and all m canaries;
the update of momentum SGD with a small learning rate is, to first order, such a
sum with c_j > 0 exactly for the examples it sampled). Without noise an excluded
canary gets c = 0; with DP noise, no score can beat the guarantee.

Exit status: 0 when no run proves more than the claimed epsilon; 1 when one does
(the node's DP is broken: its claim is refuted at the stated confidence); 2 for
usage errors.

Example (noise switched off while the ledger still claims epsilon 2)::

    fedtune-privacy-audit --model path/to/model --dataset data.csv --canaries 1000 --epsilon 2 --no-noise
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from rich.console import Console
from rich.table import Table

from fedtune.audit.empirical import CONFIDENCE, EmpiricalBound, bound, guess, max_lower_bound
from fedtune.client.budget import plan_noise
from fedtune.client.randomness import RoundSeeds
from fedtune.client.trainer import DpParams, train
from fedtune.common.data.table import cap
from fedtune.common.errors import ConfigError, FedtuneError
from fedtune.common.models.base import BaseModel, encode, load_base
from fedtune.common.privacy.accountant import DpEvent, opacus_epsilon, steps_per_round
from fedtune.common.settings import DataSettings, LoraSettings
from fedtune.common.tasks.classify.data import load_labelled
from fedtune.common.tasks.classify.model import build_model
from fedtune.common.tasks.classify.task import CLASSIFY

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids [N, T], attention_mask [N, T], labels [N]
CPU = torch.device("cpu")


def _h(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class CanaryAudit:
    """One audit's settings (every field is a flag of ``fedtune-privacy-audit``)."""

    model_path: str = _h("Local Hugging Face model directory; empty = embedded all-MiniLM-L6-v2.", "")
    dataset: str = _h("The client's data: built-in corpus name or a CSV/JSONL/Parquet file (text, label).",
                      "rotten-tomatoes")
    examples: int = _h("The client's own training examples (a random subset of the dataset).", 200)
    canaries: int = _h("m: canary examples, each inserted with probability 1/2.", 1000)
    guesses: int = _h("k: guess 'in' for the k best and 'out' for the k worst scores (0 = m / 4).", 0)
    epsilon: float = _h("The claim: noise is planned so that the run spends this epsilon (Opacus PRV).", 2.0)
    no_noise: bool = _h("Train with noise multiplier 0 (a broken node) while still claiming --epsilon.", False)
    delta: float = _h("Delta of the claim and of the bound.", 1e-5)
    steps: int = _h("DP-SGD steps of the audited run.", 100)
    batch_size: int = _h("Expected batch size (Poisson sampling rate = 1 / ceil(N / batch)).", 64)
    learning_rate: float = _h("Learning rate (small: the update stays linear in the sampled gradients).", 1e-6)
    clip_norm: float = _h("Per-example clipping norm C.", 1.0)
    lora_rank: int = _h("LoRA rank of the audited adapter (more trainable values separate canaries better).", 16)
    canary_words: int = _h("Random vocabulary words per canary.", 8)
    max_seq_len: int = _h("Tokens per example.", 16)
    runs: int = _h("Independent runs; each bound is at confidence 1 - (1 - 0.95) / runs (Bonferroni).", 1)
    seed: int = _h("Seed of the canaries, their inclusion, the start adapter and the run.", 0)

    def problems(self) -> list[str]:
        out = []
        if self.canaries < 2 or self.examples < 1 or self.steps < 1 or self.batch_size < 1 or self.runs < 1:
            out.append("canaries >= 2 and examples, steps, batch-size, runs >= 1 are required")
        if not 0 <= 2 * self.guesses <= self.canaries:
            out.append(f"guesses must be in [0, canaries / 2], got {self.guesses}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)) or not 0 < self.delta < 1:
            out.append(f"epsilon must be > 0 and delta in (0, 1), got {self.epsilon}, {self.delta}")
        return out

    @property
    def k(self) -> int:
        return self.guesses or self.canaries // 4


@dataclass(frozen=True)
class RunResult:
    seed: int
    sample_rate: float  # q
    steps: int
    noise_multiplier: float  # sigma the run trained with (0 when --no-noise)
    planned_noise: float  # sigma the claim is accounted with
    included: int  # canaries inserted
    result: EmpiricalBound
    seconds: float


def _client_data(cfg: CanaryAudit, base: BaseModel) -> tuple[Tensors, int]:
    labelled = cap(load_labelled(DataSettings(dataset=cfg.dataset)), cfg.examples, cfg.seed)
    ids, mask = encode(base.tokenizer, labelled.dataset["text"], cfg.max_seq_len)
    return (ids, mask, torch.tensor(list(labelled.dataset["label"]), dtype=torch.long)), labelled.num_labels


def _canaries(cfg: CanaryAudit, base: BaseModel, num_labels: int, rng: np.random.Generator) -> Tensors:
    """Random sequences of whole vocabulary words, with random labels: nothing else in the data looks like them."""
    special = set(base.tokenizer.all_special_tokens)
    words = sorted(w for w in base.tokenizer.get_vocab() if w.isalnum() and w.isascii() and w not in special)
    if len(words) < cfg.canary_words * 4:
        raise ConfigError(f"the model's vocabulary has only {len(words)} plain words: too few for canaries")
    texts = [" ".join(rng.choice(words, cfg.canary_words, replace=False)) for _ in range(cfg.canaries)]
    ids, mask = encode(base.tokenizer, texts, cfg.max_seq_len)
    return ids, mask, torch.as_tensor(rng.integers(0, num_labels, cfg.canaries), dtype=torch.long)


def _start_adapter(cfg: CanaryAudit, base: BaseModel, num_labels: int, seed: int) -> torch.nn.Module:
    """The round's starting adapter, as the auditor (coordinator) chooses it: random, non-zero, no dropout."""
    model = build_model(base, num_labels, LoraSettings(lora_rank=cfg.lora_rank), CPU, seed=seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _trainable(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).clone()


def per_example_gradients(model: torch.nn.Module, data: Tensors, clip_norm: float) -> torch.Tensor:
    """[N, d] per-example gradients of the trainable values, clipped to ``clip_norm`` as Opacus clips them."""
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    sampler.train()
    rows = []
    try:
        for start in range(0, len(data[2]), 256):
            ids, mask, labels = (t[start:start + 256] for t in data)
            sampler.zero_grad(set_to_none=True)
            logits = sampler(input_ids=ids, attention_mask=mask)
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
            samples = [getattr(p, "grad_sample") for p in params]  # noqa: B009  (set by Opacus' hooks)
            rows.append(torch.cat([g.reshape(len(labels), -1) for g in samples], dim=1).detach().clone())
            for p in params:
                setattr(p, "grad_sample", None)  # noqa: B010
    finally:
        sampler._close()
    grads = torch.cat(rows)
    norms = grads.norm(dim=1, keepdim=True)
    return grads * torch.clamp(clip_norm / (norms + 1e-6), max=1.0)


def _train_once(model: torch.nn.Module, data: Tensors, cfg: CanaryAudit, sigma: float, seed: int) -> None:
    """The node's real trainer, called in this one place (its signature may grow randomness parameters)."""
    dp = DpParams(noise_multiplier=sigma, clip_norm=cfg.clip_norm)
    train(model, data, steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, dp=dp,
          device=CPU, seeds=RoundSeeds.insecure(seed, 1, "privacy-audit"), optimizer="sgd", lora_lr_scale=1.0,
          task=CLASSIFY)


def canary_scores(start: torch.Tensor, end: torch.Tensor, grads: torch.Tensor) -> np.ndarray:
    """Least-squares coefficient of every example's clipped gradient in the update (start - end)."""
    if grads.shape[0] >= grads.shape[1]:
        raise ConfigError(f"{grads.shape[0]} examples but only {grads.shape[1]} trainable values: the score needs "
                          "more values than examples (fewer canaries or examples, or a larger --lora-rank)")
    solution = torch.linalg.lstsq(grads.T, (start - end).unsqueeze(1)).solution
    return solution.squeeze(1).numpy()


def audit_run(cfg: CanaryAudit, seed: int, confidence: float) -> RunResult:
    """Insert canaries, train once with the node's trainer, guess, and bound epsilon."""
    began = time.monotonic()
    rng = np.random.default_rng(seed)
    base = load_base(cfg.model_path)
    data, num_labels = _client_data(cfg, base)
    canaries = _canaries(cfg, base, num_labels, rng)
    included = rng.random(cfg.canaries) < 0.5
    inside = torch.as_tensor(included)
    train_data: Tensors = tuple(torch.cat([d, c[inside]]) for d, c in zip(data, canaries, strict=True))  # type: ignore
    q, _ = steps_per_round(len(train_data[2]), cfg.batch_size, 1.0)
    planned = plan_noise([], cfg.epsilon, cfg.delta, DpEvent(q, 1.0, cfg.steps, cfg.clip_norm), "prv")
    claimed = opacus_epsilon([DpEvent(q, planned, cfg.steps, cfg.clip_norm)], cfg.delta, "prv")
    sigma = 0.0 if cfg.no_noise else planned
    model = _start_adapter(cfg, base, num_labels, seed)
    candidates = tuple(torch.cat([d, c]) for d, c in zip(data, canaries, strict=True))
    grads = per_example_gradients(model, candidates, cfg.clip_norm)  # type: ignore[arg-type]
    start = _trainable(model)
    _train_once(model, train_data, cfg, sigma, seed)
    scores = canary_scores(start, _trainable(model), grads)[len(data[2]):]
    result = bound(guess(scores, included, cfg.k, cfg.k), cfg.delta, claimed, confidence)
    return RunResult(seed, q, cfg.steps, sigma, planned, int(included.sum()), result, time.monotonic() - began)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-privacy-audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in CanaryAudit.__dataclass_fields__.values():
        flag = "--" + ("model" if f.name == "model_path" else f.name.replace("_", "-"))
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            kind = {"str": str, "int": int, "float": float}[str(f.type)]
            p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"{f.metadata['help']} "
                                                                                 f"(default {f.default!r})")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    return p


def verdict(b: EmpiricalBound) -> str:
    if b.refutes_claim:
        return "[red]DP BROKEN: claim refuted[/]"
    if b.guesses.correct == b.guesses.guesses and b.guesses.guesses > 0:
        return (f"[yellow]every guess right: suspicious, but {b.guesses.canaries} canaries cannot prove more than "
                f"{b.attainable:.2f}[/]")
    return "[green]consistent with the claim[/]"


def report(cfg: CanaryAudit, results: list[RunResult]) -> Table:
    r = results[0].result
    table = Table(title=f"one-run privacy audit: m = {cfg.canaries} canaries, k = {cfg.k} guesses each way, "
                        f"delta = {cfg.delta:g}, confidence {100 * r.confidence:g}% per run; at most "
                        f"{max_lower_bound(cfg.canaries, cfg.delta, r.confidence):.3f} is provable with "
                        f"{cfg.canaries} canaries, {r.attainable:.3f} with {2 * cfg.k} guesses", title_justify="left")
    for name in ("seed", "sigma (trained)", "sigma (claimed)", "q", "steps", "canaries in", "correct",
                 "epsilon claimed", "epsilon lower bound", "verdict"):
        table.add_column(name, justify="right")
    for run in results:
        b = run.result
        table.add_row(str(run.seed), f"{run.noise_multiplier:.4g}", f"{run.planned_noise:.4g}",
                      f"{run.sample_rate:.4g}", str(run.steps), str(run.included),
                      f"{b.guesses.correct}/{b.guesses.guesses}", f"{b.claimed:.3f}", f"{b.lower_bound:.3f}",
                      verdict(b))
    return table


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    out = args.pop("json")
    console = Console(stderr=True)
    try:
        cfg = CanaryAudit(**args)
        if problems := cfg.problems():
            raise ConfigError(problems)
        confidence = 1 - (1 - CONFIDENCE) / cfg.runs
        results = [audit_run(cfg, cfg.seed + i, confidence) for i in range(cfg.runs)]
    except FedtuneError as error:
        console.print("[bold red]fedtune-privacy-audit: error[/]")
        console.print(str(error), markup=False, highlight=False, soft_wrap=True)
        return 2
    Console(width=200).print(report(cfg, results))
    if out is not None:
        out.write_text(json.dumps({"settings": asdict(cfg), "runs": [asdict(r) for r in results]}, indent=2) + "\n")
    return 1 if any(r.result.refutes_claim for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Local training of the adapter: Opacus DP-SGD, or plain SGD for baselines.

DP-SGD (Abadi et al. 2016): Poisson-sampled batches with rate q, per-example
gradients clipped to norm C, Gaussian noise N(0, sigma^2 C^2) added to their sum,
divided by the expected batch size; the optimiser then post-processes the private
gradient (post-processing keeps the guarantee).

A node's round is :func:`train`: :func:`prepare_loop` (loader, optimiser, Opacus), then :func:`run_loop` with
the node's own :class:`Parts`. ``make bench`` runs the same two halves with other parts (its naive loops).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from opacus import GradSampleModule, PrivacyEngine
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtune.client.randomness import RoundSeeds
from fedtune.common import runtime
from fedtune.common.models.device import autocast
from fedtune.common.tasks import DEFAULT_TASK, Task, get_task
from fedtune.common.tasks.base import Encoded, named, trim

# Examples per forward/backward pass: a Poisson batch is cut into length-sorted parts of this size, each padded
# only to its own longest example (see ``physical_parts``); ``make bench`` measures the gain.
PART_SIZE = 32
# A round whose parts are this small (examples x positions x the widest linear layer's inputs) trains on one CPU
# thread: its operations are too small to split, and waiting for a second thread cost more than the operation
# (4 to 10 times the round's training time with a tiny model; see docs/benchmarks.md, 'Scale').
SMALL_PART_WORK = 1 << 19


@dataclass(frozen=True)
class DpParams:
    """Noise multiplier sigma and clipping norm C of DP-SGD."""

    noise_multiplier: float
    clip_norm: float


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the round's non-empty batches
    steps: int  # optimizer steps taken (each one charged to the budget under DP)
    examples: int  # examples drawn across all steps


@dataclass(frozen=True)
class Private:
    """What Opacus' ``make_private`` hands back, under one name."""

    module: GradSampleModule
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine


def privatize(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, dp: DpParams,
              noise: torch.Generator) -> Private:
    """Wrap for DP-SGD: per-sample gradients (hooks), clipping to C, noise sigma*C, Poisson sampling.

    The Poisson sampler keeps ``loader``'s generator and the noise comes from ``noise``: both seeded by
    the node alone (``client/randomness.py``). The optimiser's ``secure_mode`` switches on Opacus'
    floating-point-attack mitigation for the Gaussian draws (Holohan & Braghin 2021).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns that torchcsprng is absent; see client/randomness.py
        engine = PrivacyEngine(accountant="prv")
        module, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
            poisson_sampling=True, grad_sample_mode="hooks", noise_generator=noise,
        )
    dp_optimizer.secure_mode = True
    return Private(module=module, optimizer=dp_optimizer, loader=dp_loader, engine=engine)


def noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """One DP-SGD step on an empty Poisson batch: the released update is noise alone.

    The accountant charges every step, empty or not (Poisson sampling can draw no example); skipping
    the step would release something other than the mechanism it models.
    """
    for p in optimizer.params:  # type: ignore[attr-defined]  # DPOptimizer
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


def base_dropout_off(model: nn.Module) -> None:
    """Switch off the frozen base model's dropout (LoRA's own ``lora-dropout`` stays as set).

    The frozen layers then compute a fixed function of each example, as they do when their output is cached
    (``lora-layers``); under DP, clipping and noise already regularise, and the base's dropout cost about a
    quarter of a CPU training step.
    """
    for name, sub in model.named_modules():
        if isinstance(sub, nn.Dropout) and "lora_dropout" not in name:
            sub.p = 0.0  # attention layers read their Dropout's p and call the functional form themselves


def _batches(loader: DataLoader, steps: int):
    """Yield exactly ``steps`` batches, cycling the loader (fresh Poisson draws each pass)."""
    taken = 0
    while taken < steps:
        for batch in loader:
            yield batch
            taken += 1
            if taken == steps:
                return


def max_physical_batch() -> int:
    """The node's own memory limit (``FEDTUNE_MAX_PHYSICAL_BATCH``): examples per forward/backward pass (0: none).
    A larger Poisson batch is cut into parts of that size; the privacy step stays one logical batch."""
    return runtime.max_physical_batch()


def physical_parts(batch: Mapping[str, torch.Tensor], size: int, *,
                   fixed_shape: bool = False) -> list[dict[str, torch.Tensor]]:
    """One logical batch cut into physical batches of at most ``size`` examples, grouped by length (longest
    first) so that each part, padded only to its own longest example, carries little padding.

    Which examples form the logical (Poisson) batch is unchanged; only the order in which their per-example
    gradients are computed is. ``size`` <= 0 keeps the batch whole. ``fixed_shape``: the parts keep the
    batch's own order and the tensors' full width (max-seq-len), so every part's shape is a function of the
    batch size (Poisson, data-independent) and ``size`` alone, never of the rows' lengths.
    """
    n = len(batch["labels"])
    if size <= 0 or n <= size:
        return [dict(batch) if fixed_shape else trim(batch)]
    if fixed_shape:
        return [{k: v[start:start + size] for k, v in batch.items()} for start in range(0, n, size)]
    order = torch.argsort(batch["attention_mask"].sum(dim=1), descending=True, stable=True)
    return [trim({k: v[idx] for k, v in batch.items()}) for idx in order.split(size)]


@dataclass(frozen=True)
class Parts:
    """How each logical (Poisson) batch is cut for forward/backward: :func:`physical_parts` with these settings."""

    size: int  # examples per part; <= 0: each batch whole
    fixed_shape: bool = False  # the node policy's fixed-shape: parts at max-seq-len, every position computed

    def split(self, batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return physical_parts(batch, self.size, fixed_shape=self.fixed_shape)


def node_parts(fixed_shape: bool = False) -> Parts:
    """A node's parts: ``PART_SIZE`` examples, or its ``FEDTUNE_MAX_PHYSICAL_BATCH`` when that is smaller."""
    return Parts(min(PART_SIZE, max_physical_batch() or PART_SIZE), fixed_shape)


def checked_grad_samples(optim: torch.optim.Optimizer) -> int:
    """Per-example gradients made safe to clip; returns how many examples were zeroed.

    - fp32: under bf16/fp16 autocast they come out in low precision, and a norm computed in bf16 can let a
      clipped gradient exceed the clipping norm C.
    - Finite: an example whose gradient holds NaN or inf in any tensor (weights a server chose can overflow the
      forward pass of rows close to a direction it picked) gets a zero gradient in every tensor. Opacus would
      otherwise scale it by C / (inf + 1e-6) = 0, and 0 * inf = NaN would poison the whole update: whether a
      round fails would then say whether such a row was sampled, with no noise in the way. A zeroed example
      contributes nothing and its (already charged) sampling still counts: the accountant's assumption, that
      each example's clipped contribution has norm at most C, holds.
    """
    params = [p for p in optim.params if getattr(p, "grad_sample", None) is not None]  # type: ignore[attr-defined]
    bad: torch.Tensor | None = None  # [B] bool
    for p in params:
        if p.grad_sample.dtype != torch.float32:
            p.grad_sample = p.grad_sample.float()
        rows = ~torch.isfinite(p.grad_sample.flatten(1)).all(dim=1)
        bad = rows if bad is None else bad | rows
    if bad is None or not bool(bad.any()):
        return 0
    for p in params:
        p.grad_sample[bad] = 0.0
    return int(bad.sum())


def accumulate(task: Task, module: nn.Module, optim: torch.optim.Optimizer, parts: list[dict[str, torch.Tensor]],
               device: torch.device, *, private: bool, fixed_shape: bool = False) -> float:
    """Forward/backward of one logical batch, cut into ``parts``, then one optimiser step; the batch's mean loss.

    Under DP each part's per-example gradients are clipped and summed by Opacus (its skipped steps, as in its
    ``BatchMemoryManager``); the last part's step adds the noise once and divides by the expected batch size,
    so the released step is that of the whole Poisson batch. Without DP the parts' mean losses are weighted by
    their share of the batch, so the gradient is the batch mean's. ``fixed_shape``: the task computes every
    position of each part (see :class:`Parts`).
    """
    n, total = sum(len(part["labels"]) for part in parts), 0.0
    for i, part in enumerate(parts):
        if i and private:
            optim.zero_grad(set_to_none=True)  # keeps the clipped sum of the skipped steps (Opacus)
        loss = step_loss(task, module, part, device, fixed_shape=fixed_shape)
        share = len(part["labels"]) / n
        (loss if private else loss * share).backward()
        if private:
            checked_grad_samples(optim)
            optim.signal_skip_step(do_skip=i < len(parts) - 1)  # type: ignore[attr-defined]  # DPOptimizer
            optim.step()
        total += float(loss.detach()) * share
    if not private:
        optim.step()
    return total


def named_inputs(data: Encoded | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task's encoded triple as named tensors (a mapping passes through: e.g. cached ``hidden_states``)."""
    return dict(data) if isinstance(data, Mapping) else named(data)


def step_loss(task: Task, module: nn.Module, part: Mapping[str, torch.Tensor], device: torch.device, *,
              fixed_shape: bool = False) -> torch.Tensor:
    """One part's loss, moved to ``device``, as cut (:class:`Parts`: padded to its own longest example, or under
    ``fixed_shape`` to max-seq-len with the task computing every position, e.g. sft's output layer)."""
    with autocast(device):
        return task.loss(module, {k: v.to(device) for k, v in part.items()}, fixed_shape=fixed_shape)


def make_optimizer(
    model: nn.Module, kind: str, learning_rate: float, lora_lr_scale: float
) -> torch.optim.Optimizer:
    """SGD with momentum (default) or AdamW; LoRA factors get ``learning_rate * lora_lr_scale``.

    Under DP-SGD, Adam's per-coordinate normalisation gives every noise-dominated
    coordinate a full-size step; momentum SGD lets noise average out, and lets the
    (few, high-signal) head weights move fast while LoRA factors move gently.
    """
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"params": rest, "lr": learning_rate}, {"params": lora, "lr": learning_rate * lora_lr_scale}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=0.0)
    return torch.optim.SGD(groups, lr=learning_rate, momentum=0.9)


def _private_or_none(model: PeftModel, optim: torch.optim.Optimizer, loader: DataLoader, dp: DpParams | None,
                     noise: torch.Generator) -> Private | None:
    """Opacus' wrapping of model, optimiser and loader under DP; None without DP."""
    model.train()  # Opacus refuses a module in eval mode (a model that was just evaluated)
    # Opacus' hooks fire on modules whose inputs need no grad (frozen embeddings); harmless here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    return privatize(model, optim, loader, dp, noise) if dp is not None else None


@dataclass(frozen=True)
class Loop:
    """One round's training, ready to run: the model, its optimiser and loader (wrapped by Opacus under DP)."""

    model: PeftModel
    names: tuple[str, ...]  # the loader's tensors, by name
    module: nn.Module  # ``model``, or Opacus' GradSampleModule around it
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    private: Private | None  # None without DP


def prepare_loop(model: PeftModel, data: Encoded | Mapping[str, torch.Tensor], *, batch_size: int,
                 learning_rate: float, dp: DpParams | None, device: torch.device, seeds: RoundSeeds,
                 optimizer: str = "sgd", lora_lr_scale: float = 1.0) -> Loop:
    """Loader, optimiser and (under DP) Opacus' wrapping for ``data`` (see :func:`train`)."""
    named = named_inputs(data)
    sampler, noise = seeds.generators(device)
    loader = DataLoader(TensorDataset(*named.values()), batch_size=batch_size, shuffle=True, generator=sampler)
    optim = make_optimizer(model, optimizer, learning_rate, lora_lr_scale)
    private = _private_or_none(model, optim, loader, dp, noise)
    if private is None:
        return Loop(model, tuple(named), model, optim, loader, None)
    return Loop(model, tuple(named), private.module, private.optimizer, private.loader, private)


def run_loop(loop: Loop, task: Task, *, steps: int, device: torch.device, parts: Parts) -> TrainResult:
    """``steps`` steps of ``loop``, each Poisson batch cut as ``parts`` says; Opacus' hooks removed afterwards."""
    loop.module.train()
    base_dropout_off(loop.model)
    losses, examples = [], 0
    for tensors in _batches(loop.loader, steps):
        batch = dict(zip(loop.names, tensors, strict=True))
        loop.optimizer.zero_grad(set_to_none=True)
        if len(batch["labels"]) == 0:  # a Poisson draw can be empty: the step is charged, its noise released
            noise_only_step(loop.optimizer)
            continue
        losses.append(accumulate(task, loop.module, loop.optimizer, parts.split(batch), device,
                                 private=loop.private is not None, fixed_shape=parts.fixed_shape))
        examples += len(batch["labels"])
    if loop.private is not None:
        loop.private.module._close()  # remove Opacus hooks; the PeftModel stays usable
    finite = [x for x in losses if math.isfinite(x)]  # a zeroed example's loss can be inf (see checked_grad_samples)
    mean_loss = sum(finite) / len(finite) if finite else math.nan
    return TrainResult(loss=mean_loss, steps=steps, examples=examples)


def part_work(model: nn.Module, data: Encoded | Mapping[str, torch.Tensor], batch_size: int) -> int:
    """The size of the round's largest part: examples x positions x the widest linear layer's inputs."""
    first = next(iter(named_inputs(data).values()))  # [N, T] token ids or [N, T, H] cached states
    width = max((m.in_features for m in model.modules() if isinstance(m, nn.Linear)), default=1)
    examples = min(len(first), batch_size, PART_SIZE)
    return examples * (first.shape[1] if first.dim() > 1 else 1) * width


@contextmanager
def round_threads(model: nn.Module, data: Encoded | Mapping[str, torch.Tensor], batch_size: int,
                  device: torch.device) -> Iterator[None]:
    """One intra-op thread for a small round on the CPU (SMALL_PART_WORK), the process's setting otherwise;
    the setting is restored afterwards."""
    saved = torch.get_num_threads()
    small = device.type == "cpu" and saved > 1 and part_work(model, data, batch_size) < SMALL_PART_WORK
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(saved)


@contextmanager
def lora_frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """With ``frozen``, the LoRA factors need no gradient for the block (then as before); a model with nothing
    else to train (no head: sft) trains them anyway."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = any("lora_" not in n for n, _ in trainable)
    lora = [p for n, p in trainable if "lora_" in n] if frozen and head else []
    for p in lora:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in lora:
            p.requires_grad_(True)


def train(
    model: PeftModel,
    data: Encoded | Mapping[str, torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    dp: DpParams | None,
    device: torch.device,
    seeds: RoundSeeds,
    optimizer: str = "sgd",
    lora_lr_scale: float = 1.0,
    task: Task | None = None,
    fixed_shape: bool = False,
    head_only: bool = False,
) -> TrainResult:
    """Train ``model``'s trainable tensors in place for ``steps`` steps: a node's round.

    ``data`` is (input_ids [N, T], attention_mask [N, T], labels [N] or [N, T]), or the same by name as the task's
    ``train_inputs`` gives them (classify may put its frozen lower layers' output ``hidden_states`` [N, T, H] in
    place of ``input_ids``); ``task`` (default: the registry's ``DEFAULT_TASK``) computes each batch's loss. Under
    DP the loader is Poisson-sampled with q = 1 / ceil(N / batch_size). ``seeds`` drive sampling, noise and
    dropout. Each batch is cut into length-sorted parts padded to their own longest example (:func:`node_parts`).
    ``fixed_shape`` (the node policy's ``fixed-shape``): every part padded to the tensors' full length
    (max-seq-len), so the shapes the model sees, and with them the round's time and memory, depend on the Poisson
    batch sizes and the settings only, never on the lengths of the rows drawn. A small round runs on one CPU thread
    (:func:`round_threads`). ``head_only`` (LP-FT's first rounds): the LoRA factors stay as they are; only the
    other trainable tensors (the head) train, clipped and noised alone.
    """
    with round_threads(model, data, batch_size, device), lora_frozen(model, head_only):
        loop = prepare_loop(model, data, batch_size=batch_size, learning_rate=learning_rate, dp=dp, device=device,
                            seeds=seeds, optimizer=optimizer, lora_lr_scale=lora_lr_scale)
        return run_loop(loop, task or get_task(DEFAULT_TASK), steps=steps, device=device,
                        parts=node_parts(fixed_shape))

"""The adapter's model card (``adapter/README.md``), written with ``huggingface_hub``'s ``ModelCard``.

The YAML header carries the Hub's metadata (``library_name: peft``, ``base_model``, ``tags``,
``metrics``, ``model-index`` results) plus a machine-readable ``privacy`` block; the body says what the
model is, how to load it, what it was trained on (the operator's description, never rows), the
federation's shape, its held-out evaluation, and a privacy statement in the shape of NIST SP 800-226
(unit of privacy, each node's epsilon and delta, mechanism, accountant, trust model, what is not
protected). Each node's numbers come from the replies the server received; ``fedtune-audit``
checks them against the nodes' signed ledgers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common.settings import RunSettings

if TYPE_CHECKING:  # the heavy imports (torch, transformers, huggingface_hub) wait until a card is written
    from huggingface_hub import ModelCard, ModelCardData

    from fedtune.common.models.adapter import AdapterMeta
    from fedtune.common.tasks import Task
    from fedtune.common.tasks.classify.evaluation import LabelMetrics

CARD_FILE = "README.md"
ACCOUNTANTS = {"prv": "Opacus PRV accountant (Gopi et al. 2021)", "rdp": "Opacus RDP accountant (Mironov 2017)"}


@dataclass(frozen=True)
class NodeStatement:
    """One node's privacy parameters as it reported them in its replies (cumulative over the dataset's life)."""

    node: str
    epsilon: float | None  # None: trained without DP (unbounded)
    delta: float
    budget: float | None
    accountant: str
    clip_norm: float
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int  # DP-SGD steps this run
    rounds: int  # rounds this node trained this run
    examples: int | None


@dataclass(frozen=True)
class CardInfo:
    """Everything the card states; nothing in it is a path or a data row."""

    meta: AdapterMeta
    settings: RunSettings
    nodes: Sequence[NodeStatement]
    rounds: int  # federated rounds completed
    num_clients: int  # nodes that took part (replied at least once)
    held_out_examples: int
    accuracy: float | None
    loss: float | None
    per_label: Sequence[tuple[str, LabelMetrics]] = ()
    status: str = "completed"
    extra: Mapping[str, Any] = field(default_factory=dict)  # the task's own held-out metrics (ner, sft)


def number(x: float | None, digits: int = 4) -> str:
    """A card's number: ``digits`` decimals (significant digits below 1e-3), n/a for none or NaN, ∞ without DP."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return "∞ (no DP)" if math.isinf(x) else f"{x:.{digits}g}" if 0 < abs(x) < 1e-3 else f"{x:.{digits}f}"


def _task(info: CardInfo) -> Task:
    """The task the adapter was trained for: it writes the card's task-specific parts (``common/tasks/card.py``)."""
    from fedtune.common.tasks import get_task

    return get_task(info.meta.task)


def dataset_name(settings: RunSettings) -> str:
    """The dataset as the card names it: a built-in corpus name, or a data file's name (never its path)."""
    return Path(settings.data.dataset).name


def _metadata(info: CardInfo) -> ModelCardData:
    from huggingface_hub import EvalResult, ModelCardData

    s, meta, task = info.settings, info.meta, _task(info)
    kind = task.pipeline_tag
    results = [EvalResult(task_type=kind, dataset_type=dataset_name(s),
                          dataset_name=f"{dataset_name(s)} (server held-out split)", dataset_split="held-out",
                          metric_type=name, metric_value=round(value, 4))
               for name, value in (*task.card.results(info.extra), ("accuracy", info.accuracy),
                                   ("loss", info.loss))
               if value is not None and math.isfinite(value)]
    privacy = {
        "unit": "one example of one node's training data", "relation": "add/remove-one", "dp": s.privacy.dp,
        "nodes": [{k: v for k, v in asdict(n).items() if k != "examples"} for n in info.nodes],
    }
    return ModelCardData(
        library_name="peft", base_model=meta.base.config_name_or_path or meta.base.name,
        pipeline_tag=kind, model_name=f"fedtune adapter for {meta.base.name}",
        tags=["fedtune", "federated-learning", "flower", "lora", "peft", kind,
              *(["differential-privacy", "dp-sgd", "opacus"] if s.privacy.dp else [])],
        metrics=list(task.card.metrics), eval_results=results or None,
        base_model_revision=meta.base.revision, labels=meta.labels, privacy=privacy,
    )


def _model_section(info: CardInfo) -> str:
    """The task's "Model" and "How to use" sections, given the base model's origin and the LoRA shape."""
    meta, lora = info.meta, info.settings.lora
    base, card = meta.base, _task(info).card
    where = (f"the copy embedded in {card.embedded} (Hub revision `{base.revision}`)"
             if base.source == "embedded" else f"a local model directory named `{base.name}`"
             + (f" (its config names `{base.config_name_or_path}`)" if base.config_name_or_path else ""))
    digest = f"; weights `{base.weights_file}` sha256 `{base.weights_sha256}`" if base.weights_sha256 else ""
    layers = f" of layers {lora.lora_layers}" if lora.lora_layers else ""
    shape = f"rank {lora.lora_rank}, alpha {lora.lora_alpha:g}, on `{lora.lora_targets}`{layers}"
    trained = "FFA-LoRA: A frozen at its shared initialisation, only B trained" if lora.lora_variant == "ffa" \
        else "A and B trained"
    return card.model_section(info, f"{shape} ({trained})", f"{where}{digest}")


def _training_section(info: CardInfo) -> str:
    s = info.settings
    split = {"iid": "IID (uniform at random)", "dirichlet": f"Dirichlet over labels (alpha {s.data.dirichlet_alpha:g})",
             "natural": f"natural, one group of `{s.data.partition_by}` values per client"}[s.data.partitioner]
    description = s.data.data_description.strip() or (
        "The operator gave no description of the training data (setting `data-description`). "
        f"The run's dataset setting names `{dataset_name(s)}`.")
    return f"""## Training data

{description}

No training example leaves a node: this card and the server hold no rows of anyone's data.

## Federation

- {info.num_clients} nodes took part; {info.rounds} federated rounds completed of {s.plan.num_rounds} planned
  (status: {info.status}); fraction of nodes sampled per round {s.federation.fraction_train:g}, at least
  {s.federation.min_clients} per round.
- Partitioning (simulation): {split}.
- Local training per round: {s.plan.local_epochs:g} epoch(s), expected batch size {s.plan.batch_size},
  optimiser {s.plan.optimizer} (learning rate {s.plan.learning_rate:g}, LoRA x{s.plan.lora_lr_scale:g}).
- Aggregation: FedAvg of the adapter tensors, weighted by each node's example count.
"""


def _evaluation_section(info: CardInfo) -> str:
    rows = "\n".join(f"| {name} | {number(m.precision)} | {number(m.recall)} | {number(m.f1)} | {m.support} |"
                     for name, m in info.per_label)
    table = f"\n| label | precision | recall | F1 | support |\n|---|---|---|---|---|\n{rows}\n" if rows else ""
    headline = _task(info).card.evaluation(info)
    return f"""## Evaluation

On the server's held-out set ({info.held_out_examples} examples, never trained on) after the last round:
{headline}
{table}"""


def _privacy_section(info: CardInfo) -> str:
    s = info.settings
    rows = "\n".join(
        f"| {n.node} | {number(n.epsilon) if n.epsilon is not None else '∞ (no DP)'} | {n.delta:g} | "
        f"{number(n.budget)} | {n.accountant} | {n.clip_norm:g} | {number(n.noise_multiplier)} | "
        f"{number(n.sample_rate)} | {n.steps} | {n.rounds} |" for n in info.nodes)
    guarantee = (
        "Each node trained with DP-SGD (Abadi et al. 2016): Poisson sampling at rate q, each example's gradient "
        "clipped to norm C, Gaussian noise of standard deviation σ·C added to the sum, over T steps. For every "
        "node, everything it released from its dataset satisfies (ε, δ)-differential privacy with respect to "
        "adding or removing one example of that dataset, with ε and δ as below (ε is cumulative over every "
        "round that dataset was ever charged, never more than the node's own budget)."
        if s.privacy.dp else
        "**This adapter was trained without differential privacy** (`dp = false`): it carries no privacy "
        "guarantee, and its updates may reveal the nodes' training examples.")
    return f"""## Privacy statement

Structured after NIST SP 800-226, *Guidelines for Evaluating Differential Privacy Guarantees*.

- **Unit of privacy**: one example (one row: text and label) of one node's training data: sample-level,
  per-node DP. Not user-level: a person with k rows is protected at roughly k·ε (group privacy).
- **Guarantee**: {guarantee}
- **Accountant**: {ACCOUNTANTS.get(s.privacy.accountant, s.privacy.accountant)} requested; each node accounts
  with its own policy's accountant, named per node below and in its ledger.

| node | ε | δ | budget | accountant | clip norm C | noise σ | sampling rate q | steps T | rounds |
|---|---|---|---|---|---|---|---|---|---|
{rows or "| (no node replied) | | | | | | | | | |"}

ε, budget, σ, q and T are what each node reported in its replies (T: DP-SGD steps of this run); each node's
signed epsilon ledger records the same events, and `fedtune-audit` recomputes ε from them with Opacus and,
independently, Google's dp-accounting.

- **Trust model**: the nodes are trusted with their own data, policy and ledger key; the server is not.
  The server chooses no node's noise, budget or data split; it sees only what nodes reply: DP-noised
  adapter updates, each node's example count, its local evaluation loss and accuracy, its epsilon
  figures, and whether it trained or refused.
- **Not protected**: the example counts and local evaluation metrics (sent without noise); whether a node
  took part; the label set and this card's data description; the server's own held-out evaluation set
  (its accuracy above is not private); the base model's pre-training data; persons with several rows
  beyond group privacy. No client-level DP (DP-FedAvg) was applied unless stated elsewhere.
"""


def render_card(info: CardInfo) -> ModelCard:
    from huggingface_hub import ModelCard

    title = f"# {info.meta.base.name.split('/')[-1]} adapter: federated{', DP-SGD' if info.settings.privacy.dp else ''}"
    body = "\n".join([
        title, "",
        f"A LoRA adapter{_task(info).card.head} for `{info.meta.base.name}`, trained with fedtune: federated "
        "learning (Flower) over nodes that each keep their data" + (
            " and train with differentially private SGD (Opacus)." if info.settings.privacy.dp else "."),
        "", _model_section(info), _training_section(info), _evaluation_section(info), _privacy_section(info),
    ])
    return ModelCard(f"---\n{_metadata(info).to_yaml()}\n---\n\n{body}")


def write_model_card(adapter_dir: Path, info: CardInfo) -> Path:
    """Write ``adapter_dir/README.md``; returns its path."""
    path = adapter_dir / CARD_FILE
    render_card(info).save(path)
    return path


def card_metadata(path: Path) -> dict[str, Any]:
    """The YAML header of a written card, as a dict (for tests and tools)."""
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()

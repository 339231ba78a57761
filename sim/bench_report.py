"""docs/benchmarks.md from the figures ``fedtune.sim.bench`` measured (and docs/benchmarks.json holds)."""

from __future__ import annotations

from typing import Any


def _machine(m: dict[str, Any]) -> str:
    load = f", 1-min load {m['load-1min']:.1f} when the run started" if m.get("load-1min") is not None else ""
    return f"{m['device']} ({m['cpu']}, {m['cores']} cores, torch threads {m['threads']}){load}, {m['date']}"


def _throughput(t: dict[str, Any]) -> list[str]:
    return [
        "## DP training throughput", "",
        f"Rotten Tomatoes training snippets ({t['examples']} of the main job's pool, mean {t['mean-tokens']} "
        f"tokens of max-seq-len {t['max-seq-len']}), embedded all-MiniLM-L6-v2, DP-SGD with Opacus "
        f"(Poisson batches of expected size {t['batch']}, per-example clipping, Gaussian noise), "
        f"{t['steps']} timed steps per loop after a warm-up round. All loops ran one after the other "
        "in the same process. A part's per-example gradients are clipped and summed, and the noise is added "
        "once per Poisson batch, so the parts release exactly the step of the whole batch.", "",
        "| loop | examples/s | vs naive |", "|---|---|---|",
        f"| naive: every batch whole, padded to max-seq-len, fp32, LoRA in all 6 layers | {t['naive-ex-per-s']} "
        "| 1.00 |",
        f"| per-batch padding (pad to the batch's longest example), fp32 "
        f"| {t['dynamic-padding-ex-per-s']} | {t['dynamic-padding-over-naive']} |",
        *([f"| length-sorted parts of {t['part-size']} examples, each padded to its own longest, fp32 "
           f"| {t['sorted-parts-ex-per-s']} | {t['sorted-parts-over-naive']} |",
           f"| **the default loop**: length-sorted parts, {t['precision']} autocast (per-example gradients "
           f"clipped in fp32) | {t['default-ex-per-s']} | **{t['default-over-naive']}** |"]
          if "default-ex-per-s" in t else []),
        f"| LoRA in layers {t['top-lora-layers']} only (`lora-layers`), training from the frozen layers' cached "
        f"states | {t['top-layers-cached-ex-per-s']} | **{t['cached-over-naive']}** |",
        f"| the same over a 3-round job, the one-off cache included | {t['top-layers-amortised-ex-per-s']} "
        f"| **{t['amortised-over-naive']}** |", "",
        f"The cache (a forward pass of the frozen layers, no gradients) runs at {t['cache-ex-per-s']} examples/s, "
        "once per node and job. The frozen layers are a fixed function of each example, so caching their "
        "output changes nothing about DP: the trainable tensors, their per-example clipping, the Poisson "
        "sampling rate and the noise are those of the uncached model.", "",
    ]


def _ratios(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _fixed_shape(f: dict[str, Any]) -> list[str]:
    """The node policy's ``fixed-shape`` against the default loop (``fedtune.sim.shape_cost``)."""
    load = f"1-min load {f['load-1min-start']:.1f} at the start, {f['load-1min-end']:.1f} at the end"
    return [
        "## Fixed shape (`fixed-shape = true` in a node's policy)", "",
        f"The default loop ({f['precision']} autocast, parts of {f['part-size']}) with dynamic padding against the "
        f"same loop with every part padded to max-seq-len {f['max-seq-len']} (mean {f['mean-tokens']} tokens), on "
        f"{f['examples']} of the main job's snippets, Poisson batches of expected size {f['batch']}, {f['steps']} "
        f"timed DP steps after a warm-up round; the two measured back to back, {f['repeats']} times, medians shown "
        f"(measured {f['date']}, {load}).", "",
        "| LoRA in | default loop, examples/s | fixed shape, examples/s | fixed / default (each pair) |",
        "|---|---|---|---|",
        f"| all 6 layers | {f['default-ex-per-s']} | {f['fixed-shape-ex-per-s']} | **{f['fixed-over-default']:.2f}** "
        f"({_ratios(f['fixed-over-default-runs'])}) |",
        f"| layers {f['top-lora-layers']}, from the frozen layers' cached states | {f['cached-default-ex-per-s']} "
        f"| {f['cached-fixed-shape-ex-per-s']} | **{f['cached-fixed-over-default']:.2f}** "
        f"({_ratios(f['cached-fixed-over-default-runs'])}) |", "",
        "Under `fixed-shape` the shapes every forward and backward pass computes on depend on the Poisson batch "
        "sizes and the settings only, so a round's time and memory no longer tell the server how long the rows "
        "drawn were; the price is computing the padding that dynamic padding skips.", "",
    ]


def _overhead(o: dict[str, Any]) -> list[str]:
    parts = o["parts-s"]
    total = sum(parts.values())
    rows = [f"| {name} | {sec:.3f} | {100 * sec / total:.1f}% |" for name, sec in parts.items()]
    return [
        "## Per-round overhead", "",
        f"One round of {o['nodes']} nodes with {o['examples-per-node']} examples each ({o['steps']} DP steps "
        f"per node, one epoch; LoRA in {'layers ' + o['lora-layers'] if o.get('lora-layers') else 'every layer'}; "
        "each node's parts measured once and counted for every node, as the simulation runs them "
        "on the same cores), plus the server's aggregation and held-out evaluation. The ledger charges are "
        f"every node's over the job's {o.get('rounds', 3)} rounds, run one after the other in one process as the "
        "simulation's actor runs them, shown per round: a run's first round also plans the noise, and nodes "
        "with the same sampling rate and steps find the accountant's answers already computed:", "",
        "| part | seconds | share |", "|---|---|---|", *rows, "",
        f"Overhead (everything but forward/backward/step and the held-out evaluation's forward passes): "
        f"**{100 * o['overhead-share']:.1f}%** of the round. Reply size per node: {o['reply-bytes']:,} bytes.", "",
        *([f"A deployed node plans alone: its first charge of a run took {o['first-charge-s']:.2f} s, "
           f"{100 * o['node-first-round-share']:.1f}% of that round's training; later rounds reuse the plan.", ""]
          if "first-charge-s" in o else []),
        *_half_precision(o.get("fp16-transport")),
    ]


def _half_precision(h: dict[str, Any] | None) -> list[str]:
    if not h:
        return []
    return [
        "### fp16 on the wire?", "",
        f"The node's trained tensors are {h['fp32-bytes']:,} bytes in fp32 (the reply above adds the record's "
        f"framing); fp16 would make them {h['fp16-bytes']:,}. Measured on the DP update of the round above "
        "(the job's learning rates, noise multiplier 1.0): sending the trained *values* in fp16 moves the "
        f"update by **{100 * h['values-error-over-update']:.2f}%** of its norm; sending the *update* (values "
        f"minus the global adapter) in fp16 moves it by **{100 * h['update-error-over-update']:.3f}%**. "
        "Replies stay fp32 values today.", "",
    ]


def _each(row: dict[str, Any]) -> str:
    """" (61.4 / 39.9)": each round's time, when there were several."""
    each = row.get("s-per-round-each", [])
    return f" ({' / '.join(map(str, each))})" if len(each) > 1 else ""


def _was(row: dict[str, Any], key: str) -> str:
    """" (was X)": the figure of the row this one replaced (``merge_scale_rows``), if any."""
    was = row.get("was-s-per-round")
    if was is None:
        return ""
    return f" (was {was})" if key == "s-per-round" else f" (was {was / row['clients']:.3f})"


def _scale(rows: list[dict[str, Any]], plot: str | None) -> list[str]:
    lines = [
        "## Scale (Flower simulation engine)", "",
        "| clients (replied in time) | model | rounds | examples/client | s/round (mean) | s per client-round "
        "| wall s | peak memory (GiB) | bytes/client/round (reply) | full model bytes | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_client = r.get("s-per-client-round", r["s-per-round"] / r["clients"])
        lines.append(
            f"| {r['clients']} ({r.get('trained-last-round', '?')}) | {r['model']} | {r['rounds']} "
            f"| {r['examples-per-client']} | {r['s-per-round']}{_each(r)}{_was(r, 's-per-round')} | {per_client:.3f}"
            f"{_was(r, 's-per-client-round')} | {r['wall-s']} "
            f"| {r['peak-rss-gib']} | {r['bytes-per-client-round']:,} | {r['full-model-bytes']:,} "
            f"| {r.get('load-1min', '')} |")
    lines += ["", "s/round is the mean over the run's rounds, each from the end of the one before (round 1 from the "
              "server's round-0 evaluation; it also writes every node's ledger header and first reads its data); "
              "s per client-round is s/round over the clients. A client that has not replied when the round's "
              "`round-timeout` (600 s, or 0.25 s per client above 2,400 clients) ends is left out of that round's "
              "average; its charge stays in its ledger. Above 6,000 clients the corpus is repeated so that each node "
              "has at least two rows. The 1,000-client row was measured before Ray's workers ran at nice 0 and the "
              "ServerApp's polls were spaced by the number of nodes (at 1,000 nodes: Flower's 0.1 s).", ""]
    if plot:
        lines += [f"![time per round against clients]({plot})", ""]
    return [*lines, *CLIENT_ROUND]


# Measured once with a development harness (not part of `make bench`): the ClientApp's train handler called
# in-process for 40 nodes of a 1,000-node federation of tiny BERT (6 rows each), each part timed.
CLIENT_ROUND = [
    "### What a simulated client-round costs besides training", "",
    "The ClientApp's train handler called in-process for 40 nodes of a 1,000-node tiny-BERT federation (6 rows "
    "each; one DP step), each part timed, mean ms per client-round (2026-12-05, one machine; before: the code of "
    "2026-12-04 while another run used about one core, load ~3; after: load ~1.3, so the fsyncs were faster too). "
    "The same round for the same node "
    "keeps every privacy step: a charge fsync'd to the node's own ledger before training, the witness checked, "
    "the node's own key, budget and secret seeds.", "",
    "| part (round 2) | before | after |", "|---|---|---|",
    "| whole handler, torch with 2 threads as in the simulation | 272 | 25.6 |",
    "| whole handler, torch with 1 thread (a small round now trains on one thread either way) | 55.0 | 25.6 |",
    "| ledger: lock, read, verify, charge, fsyncs (5 -> 2), witness | 19.7 | 3.3 |",
    "| reading the node's rows (cache of 8 nodes -> bounded by bytes) | 7.6 | 0.1 |",
    "| tokenising | 2.1 | 0.0 |",
    "| one DP step on 6 examples (forward, backward, clip, noise) | 15.8 | 13.1 |", "",
    "Round 1 (each node's ledger header and witness created, its rows read and tokenised): 37 ms median "
    "(reading rows 12.1 -> 5.7 ms without `datasets`' hash of the table). The evaluate handler adds 4.2 ms. Two "
    "causes were outside the ClientApp: torch's OpenMP threads spin while they wait, which beside any other busy "
    "process made a step 4-25 times slower (Flower's processes now get `OMP_WAIT_POLICY=PASSIVE`, and a small round "
    "trains on one thread); and Flower 1.42's simulation engine scanned every stored message for every node every "
    "0.1 s (91% of its process's GIL time at 1,000 nodes; `server/link_state.py` indexes them by node).", "",
    "Per client-round, the scale table's 0.051 s (1,000 clients) and 0.054 s (10,000) hold one DP step of 13.1 ms "
    "(forward, backward, clip, noise on 6 rows): the fixed cost is 0.038 s and 0.041 s per client-round "
    "(0.33 s before).", "",
]

DEPLOYED_NOTES = [
    "- **Flower's own floor.** A SuperNode with no message sleeps 3 s before it asks again, and the ServerApp "
    "checks for replies every 3 s, so each of a round's two phases ends on a 3 s tick; the new `flwr-clientapp` "
    "process per message fills most of the ticks in between.",
    "- **What fedtune adds.** Per message its ClientApp process loads the base model, reads and tokenises the "
    "node's rows, builds the LoRA model and the DP optimiser, writes and fsyncs the ledger's charge before training "
    "and signs its reply; the server evaluates the held-out set, checkpoints and signs its run record every round. "
    "At 3 s a tick, a second or two more of work in a phase costs a whole tick. The waiting ClientApp process "
    "(imports done) takes the imports off the round.",
    "- **10 nodes do not fit 2 cores:** 10 SuperNodes, 10 app gates, their waiting ClientApp processes and their "
    "tasks loaded the machine above 50 and round 1 did not finish in 6.5 minutes. `--nodes 10` on a machine with "
    "more cores measures it.", "",
]
DEPLOYED_APPS = {"plain": "plain Flower app", "fedtune": "fedtune, ClientApp process started ahead (default)",
                 "fedtune-no-prewarm": "fedtune, ClientApp process started per message (`--no-prewarm`)"}


def _deployed_round(d: dict[str, Any]) -> list[str]:
    """The deployed-round comparison (``python -m fedtune.sim.deploy_bench``, recorded with --record-deploy)."""
    rounds = len(d["plain"]["round-s"])
    lines = [
        "### A deployed round on loopback TLS", "",
        f"`python -m fedtune.sim.deploy_bench --nodes {d['nodes']} --rounds {d['rounds']} --no-prewarm` runs, one "
        "after the other in one command, the same deployment three times on one machine: a SuperLink with TLS and "
        f"node authentication (certificates and node keys from `fedtune-certs dev`), {d['nodes']} SuperNodes that run "
        "every message in a new ClientApp process, every round one training and one evaluation message per node. "
        "First a **plain Flower app** (Flower's `FedAvg` over 2,114 echoed floats, the size of fedtune's adapter for "
        "this model, no training), then **fedtune** (`fedtune-server` and one `fedtune-client` per node: DP-SGD on "
        "LoRA of a tiny BERT, 2 x 32, 60 rows a node, so training is almost nothing), then fedtune with "
        "`--no-prewarm`. Seconds per round from the same lines in each (`metrics.jsonl`, elapsed after each "
        f"round's evaluation); {d['cpus']} cores, 1-minute load {d['load-1min-before']} before:", "",
        "| app | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | mean | x plain Flower |",
        "|---" * (rounds + 3) + "|",
    ]
    for key, label in DEPLOYED_APPS.items():
        if key in d:
            ratio = d.get(f"ratio-{key}-to-plain", 1.0)
            lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in d[key]["round-s"])
                         + f" | {d[key]['mean-s']:.2f} | {ratio:.2f} |")
    extra = d["fedtune"]["mean-s"] - d["plain"]["mean-s"]
    return [*lines, "", f"fedtune adds {extra:.1f} s a round to Flower's own {d['plain']['mean-s']:.1f} s here.", "",
            *DEPLOYED_NOTES]


def _main_job(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## The main job (`make run`)", "",
        "| results | model | lora-layers | held-out accuracy by round (0 = before training) | clients trained per "
        "round | max epsilon | bytes/client/round | run s | wall s | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['results']} | {r.get('model', 'all-MiniLM-L6-v2')} | {r['lora-layers'] or 'all'} "
                     f"| {' / '.join(map(str, r['accuracy']))} "
                     f"| {' / '.join(map(str, r['clients-trained']))} | {r['epsilon-max']} "
                     f"| {r['bytes-per-client-round']:,} | {r['run-s']} | {r['wall-s']} | {r['load-1min']} |")
    return [*lines, "", *_main_job_summary(rows)]


def _main_job_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Mean and standard deviation of the final accuracy and the wall time, per lora-layers setting."""
    import statistics

    lines = []
    for layers in dict.fromkeys(r["lora-layers"] for r in rows):
        runs = [r for r in rows if r["lora-layers"] == layers and r.get("wall-s")]
        if len(runs) < 2:
            continue
        acc = [r["accuracy"][-1] for r in runs]
        wall = [float(r["wall-s"]) for r in runs]
        lines.append(f"LoRA in {'layers ' + layers if layers else 'every layer'}, {len(runs)} runs: final held-out "
                     f"accuracy {statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f} (min {min(acc):.4f}), "
                     f"wall time {statistics.mean(wall):.1f} ± {statistics.stdev(wall):.1f} s "
                     f"(max {max(wall):.1f} s).")
    return [*lines, ""] if lines else []


SECURE_POINTER = ("Secure aggregation (SecAgg+) and client-level DP have their own side-by-side measurements "
                  "(`python -m fedtune.sim.secure_bench`): seconds and bytes per round with and without, the "
                  "quantisation error on a real round, and the accuracy of the main job both ways, in "
                  "[secure-aggregation.md](secure-aggregation.md#cost).")


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Benchmarks", "",
        "Generated by `make bench` (`python -m fedtune.sim.bench`; `--scale` adds the federations; "
        "`--fixed-shape-only` re-measures the fixed-shape section alone); the raw figures are in `benchmarks.json`.",
        "", SECURE_POINTER, "",
        f"Machine: {_machine(result['machine'])}. Model: {result['model']}.", "",
        *_throughput(result["throughput"]),
        *(_fixed_shape(result["fixed-shape"]) if "fixed-shape" in result else []),
        *_overhead(result["overhead"]),
    ]
    if "main-job" in result:
        lines += _main_job(result["main-job"])
    if "scale" in result:
        lines += _scale(result["scale"]["rows"], result["scale"].get("plot"))
    if "deployed-round" in result:
        lines += _deployed_round(result["deployed-round"])
    return "\n".join(lines)

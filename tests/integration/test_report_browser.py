"""report.html in real headless Chromium (Debian's chromium), driven over the DevTools protocol:
the page loads without console errors and every plot is a decoded, non-blank image."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from fedtune.sim.report import write_run_report
from tests.run_results import make_results

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--remote-allow-origins=*"]
# Draw each image on a canvas and count its distinct colours and non-white pixels.
PIXELS_JS = """(() => Array.from(document.images).map(img => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width || 1, c.height || 1).data; const colours = new Set(); let ink = 0;
  for (let i = 0; i < d.length; i += 4) { colours.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]);
    if (d[i] < 240 || d[i+1] < 240 || d[i+2] < 240) ink++; }
  return {alt: img.alt, complete: img.complete, width: img.naturalWidth, colours: colours.size,
          ink: ink / Math.max(1, d.length / 4)};
}))()"""


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test-all installs it)")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        port = int(port_file.read_text().splitlines()[0])
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


async def _inspect(port: int, url: str) -> tuple[list[str], list[dict]]:
    import websockets

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        target = next(t for t in json.load(resp) if t["type"] == "page")
    errors: list[str] = []
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**26) as ws:
        ids = iter(range(1, 1_000_000))

        async def call(method: str, **params) -> dict:
            msg_id = next(ids)
            await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                _collect(msg, errors)
                if msg.get("id") == msg_id:
                    return msg.get("result", {})

        for domain in ("Runtime", "Log", "Page"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=url)
        loaded = False
        while not loaded:
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=60))
            _collect(msg, errors)
            loaded = msg.get("method") == "Page.loadEventFired"
        result = await call("Runtime.evaluate", expression=PIXELS_JS, returnByValue=True)
        await asyncio.sleep(0.5)  # late console messages
        await call("Runtime.evaluate", expression="1")
    return errors, result["result"]["value"]


def _collect(msg: dict, errors: list[str]) -> None:
    method, params = msg.get("method"), msg.get("params", {})
    if method == "Runtime.exceptionThrown":
        errors.append(str(params["exceptionDetails"].get("text")))
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        errors.append(json.dumps(params.get("args")))
    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
        errors.append(params["entry"].get("text", ""))


def test_report_loads_without_errors_and_every_plot_is_a_real_image(tmp_path, browser):
    report: Path = write_run_report(make_results(tmp_path / "run"))
    errors, images = asyncio.run(_inspect(browser, report.resolve().as_uri()))
    assert errors == []
    assert len(images) == 6
    for img in images:
        assert img["complete"] and img["width"] > 100, img
        assert img["colours"] > 8 and img["ink"] > 0.01, img  # not a blank or one-colour picture

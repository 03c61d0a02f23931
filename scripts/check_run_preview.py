"""Check in a real browser that a run's page in the Prefect UI shows the video's preview.

A throwaway Prefect server (127.0.0.1, a free port, its own PREFECT_HOME) runs a tiny generation.
Headless Chromium (Debian: `apt-get install -y chromium`), driven over the DevTools protocol, opens
the run's page in each of the server's UIs (the default one and /v2), clicks its Artifacts tab and
waits for the preview (tasks/preview.py) in the video artifact's card: an <img> whose data: URI
decoded (naturalWidth > 0) to the preview's size. A JSON report and a screenshot per UI are left in
--output-dir; the browser and the server are stopped.

    python scripts/check_run_preview.py [--output-dir DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets
from check_artifact_escaping import OFFLINE_ENV, find_chromium, get_json, wait_healthy
from screenshot_ui import WINDOW

from deployments.processes import free_port, stop_process_group

REQUEST = {"task": "tiny", "prompt": "a lighthouse at dusk, waves breaking on the rocks", "size": "128*128",
           "frame_count": 9, "steps": 2, "seed": 7}
PREVIEW_SIZE = [128, 128]  # the request's size: narrower than the preview's width, so never scaled
UIS = {"v1": "/runs/flow-run/{id}", "v2": "/v2/runs/flow-run/{id}"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Where the run page's Artifacts tab is (the innermost element saying so): clicked there with the mouse, as a
# user does (the /v2 UI's tabs answer pointer events, not a scripted click()).
ARTIFACTS_TAB = """(() => {
  const tab = [...document.querySelectorAll('main *, [class*=tab] *, [role=tab]')].find(e =>
    e.textContent.trim() === 'Artifacts' && ![...e.children].some(c => c.textContent.trim() === 'Artifacts'));
  if (!tab) return null;
  const box = tab.getBoundingClientRect();
  return box.width > 0 ? [box.x + box.width / 2, box.y + box.height / 2] : null;
})()"""
PREVIEWS = """JSON.stringify([...document.querySelectorAll('img[src^="data:image/webp;base64,"]')].map(img => ({
  naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight, complete: img.complete,
  alt: img.alt, in_artifact_card: !!img.closest('[class*=artifact-card], a[href*="/artifact"]')})))"""

log = logging.getLogger("check_run_preview")


class DevTools:
    """One Chromium page over the DevTools protocol: a command and its answer at a time."""

    def __init__(self, socket):
        self.socket, self.next_id = socket, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive between the answers; only the answer to this command matters here
            message = json.loads(await self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


async def _look(page_socket: str, pages: dict[str, str], output_dir: Path, timeout: float) -> dict:
    """Open each page, click its Artifacts tab and wait until a preview has decoded (or `timeout` passes)."""
    found = {}
    async with websockets.connect(page_socket, max_size=None) as socket:
        page = DevTools(socket)
        for ui, url in pages.items():
            await page.call("Page.navigate", url=url)
            deadline, clicked, previews = time.monotonic() + timeout, False, []
            while time.monotonic() < deadline:  # the tab appears once the run is read, the card once clicked
                await asyncio.sleep(1)
                if not clicked and (where := await page.evaluate(ARTIFACTS_TAB)):
                    await page.click(*where)
                    clicked = True
                previews = json.loads(await page.evaluate(PREVIEWS))
                if any(p["naturalWidth"] > 0 for p in previews):
                    break
            shot = await page.call("Page.captureScreenshot")
            (output_dir / f"run-page-{ui}.png").write_bytes(base64.b64decode(shot["data"]))
            found[ui] = {"url": url, "tab_clicked": clicked, "previews": previews,
                         "seconds": round(timeout - (deadline - time.monotonic()), 1)}
    return found


def _page_socket(port: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as response:
                return next(t for t in json.loads(response.read()) if t["type"] == "page")["webSocketDebuggerUrl"]
        except (OSError, StopIteration):
            if time.monotonic() > deadline:
                raise SystemExit(f"Chromium's DevTools did not answer on port {port}") from None
            time.sleep(0.3)


def judge(found: dict) -> list[str]:
    """Each UI whose run page does not show the preview, decoded, at its size, in the artifact's card."""
    problems = []
    for ui, page in found.items():
        drawn = [p for p in page["previews"] if p["naturalWidth"] > 0]
        if not page["tab_clicked"]:
            problems.append(f"{ui}: no Artifacts tab on the run page")
        elif not drawn:
            problems.append(f"{ui}: no decoded preview on the run page's Artifacts tab ({page['previews']})")
        elif [[p["naturalWidth"], p["naturalHeight"]] for p in drawn] != [PREVIEW_SIZE]:
            problems.append(f"{ui}: previews {drawn}, expected one of {PREVIEW_SIZE[0]}x{PREVIEW_SIZE[1]}")
        elif not drawn[0]["in_artifact_card"]:
            problems.append(f"{ui}: the preview is not in the artifact's card")
    return problems


def check(workdir: Path, output_dir: Path, timeout: float = 90) -> dict:
    """Run the generation on a fresh server and look for its preview on the run page; returns the report."""
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("headless Chromium is needed: apt-get update && apt-get install -y chromium")
    port, devtools_port = free_port(), free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(workdir / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    env.pop("WAN_GPU_INVENTORY", None)
    output_dir.mkdir(parents=True, exist_ok=True)
    browser = None
    with open(workdir / "server.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-services"], env={**env, "PREFECT_UI_API_URL": api},
                                  cwd=workdir, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(api, server)
        log.info("generating on %s", api)
        subprocess.run([sys.executable, "-m", "flows.generate", json.dumps(REQUEST)], cwd=workdir, check=True,
                       env={**env, "PREFECT_API_URL": api, "WAN_OUTPUTS_DIR": str(workdir / "outputs")}, timeout=600)
        [artifact] = get_json(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["generated-video"]}}})
        pages = {ui: f"http://127.0.0.1:{port}{path.format(id=artifact['flow_run_id'])}" for ui, path in UIS.items()}
        browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--remote-debugging-port={devtools_port}",
                                    f"--user-data-dir={workdir / 'chromium'}", f"--window-size={WINDOW}",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        log.info("opening the run's page in Chromium: %s", ", ".join(pages.values()))
        found = asyncio.run(_look(_page_socket(devtools_port), pages, output_dir, timeout))
    finally:
        if browser is not None:
            stop_process_group(browser.pid, grace_s=5)
        stop_process_group(server.pid, grace_s=5)  # a throwaway database: nothing to lose in a SIGKILL
    report = {"request": REQUEST, "pages": found, "problems": judge(found)}
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path(tempfile.gettempdir()) / "wanflow-run-preview",
                        help="where report.json and the screenshots go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="wanflow-run-preview-") as workdir:
        report = check(Path(workdir), args.output_dir)
    for ui, page in report["pages"].items():
        log.info("%s: %s", ui, page["previews"])
    if report["problems"]:
        raise SystemExit("the run page does not show the preview: " + "; ".join(report["problems"]))
    log.info("the run page shows the preview in every UI (%s)", args.output_dir)


if __name__ == "__main__":
    main()

"""Check in a real browser that what a user types cannot change a run's page in the Prefect UI.

A throwaway Prefect server (127.0.0.1, a free port, its own PREFECT_HOME) runs a tiny generation whose
prompt and outputs folder hold HTML and markdown. Headless Chromium (Debian: `apt-get install -y
chromium`) then loads the run's markdown artifact in the UI and dumps its DOM. The check passes when
the rendered artifact holds only the elements wanflow writes (one heading, a list, code spans), no
raw HTML reached the page, and the heading and the video's path show the prompt and the path as
typed. The DOM, a screenshot and a JSON report are left in --output-dir; the server is stopped.

    python scripts/check_artifact_escaping.py [--output-dir DIR] [--no-screenshot]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from screenshot_ui import CHROMIUM_FLAGS, WINDOW

from deployments.processes import free_port, stop_process_group

# Within the 80 characters the artifact's heading shows: HTML, an image (a tracking pixel), a link, markup.
PROMPT = "<b>b</b><img src=x onerror=alert(1)>![p](http://127.0.0.1:9/p)[a](javascript:0)`c`|**d**"
OUTPUTS = "outputs <b>bold</b> `tick`"  # the settings' outputs folder, typed by someone too
REQUEST = {"task": "tiny", "prompt": PROMPT, "size": "64*64", "frame_count": 5, "steps": 2, "seed": 7}
# The UI's markdown renderer wraps text in <div>s and draws a divider (<hr>) under a heading; anything
# else in the artifact came from the text.
RENDERER_TAGS = {"article", "h1", "div", "hr", "ul", "li", "code"}
RAW_HTML_CLASS = "markdown-renderer__html"  # the renderer's wrapper around raw HTML it let through
OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

log = logging.getLogger("check_artifact_escaping")


def find_chromium() -> str | None:
    return next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser"))), None)


class _ArtifactDom(HTMLParser):
    """Elements, attributes and texts inside the artifact's rendered markdown (its <article>)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[str] | None = None  # elements open inside the article; None until it starts
        self.finished = False
        self.tags: list[str] = []
        self.classes: list[str] = []
        self.attributes: set[str] = set()
        self.texts: dict[str, list[str]] = {"h1": [], "code": []}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if self.finished or (self.open is None and not (tag == "article" and "artifact-data-markdown" in classes)):
            return
        self.open = self.open or []
        self.tags.append(tag)
        self.classes += classes
        self.attributes |= set(attrs) - {"class"}
        if tag in self.texts:
            self.texts[tag].append("")
        if tag not in _VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if self.finished or not self.open or tag not in self.open:
            return
        del self.open[len(self.open) - 1 - self.open[::-1].index(tag):]
        self.finished = not self.open

    def handle_data(self, data):
        for tag in set(self.open or ()) & set(self.texts):
            self.texts[tag][-1] += data


def get_json(url: str, body: dict | None = None):
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_healthy(api: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            get_json(f"{api}/health")
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server on {api} did not start") from None
            time.sleep(0.5)


def _chromium(chromium: str, workdir: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'chromium'}",
                           f"--window-size={WINDOW}", *args, url], capture_output=True, text=True, timeout=180,
                          check=True)


def judge(dom: str, video: str) -> dict:
    """What the browser made of the artifact, and each way in which it is not the literal text."""
    found = _ArtifactDom()
    found.feed(dom)
    heading = f"tiny: {' '.join(PROMPT[:80].split())}"
    problems = []
    if not found.tags:
        problems.append("the artifact's rendered markdown is not in the page")
    if extra := sorted(set(found.tags) - RENDERER_TAGS):
        problems.append(f"elements the text made: {extra}")
    if RAW_HTML_CLASS in found.classes:
        problems.append("raw HTML reached the renderer")
    if extra := sorted(found.attributes):
        problems.append(f"attributes the text made: {extra}")
    if found.texts["h1"] != [heading]:
        problems.append(f"headings {found.texts['h1']}, expected [{heading!r}]")
    if video not in found.texts["code"]:
        problems.append(f"the video path is not one code span: {found.texts['code']}")
    return {"elements": sorted(set(found.tags)), "headings": found.texts["h1"], "code": found.texts["code"],
            "problems": problems}


def check(workdir: Path, output_dir: Path, screenshot: bool = True) -> dict:
    """Run the generation on a fresh server and judge its artifact page; returns the report."""
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("headless Chromium is needed: apt-get update && apt-get install -y chromium")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    outputs = workdir / OUTPUTS
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(workdir / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    env.pop("WAN_GPU_INVENTORY", None)
    with open(workdir / "server.log", "w") as server_log:
        # the API and the UI are all a run and a page need: no background services to start and stop
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-services"], env={**env, "PREFECT_UI_API_URL": api},
                                  cwd=workdir, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(api, server)
        log.info("generating on %s with the prompt %r", api, PROMPT)
        subprocess.run([sys.executable, "-m", "flows.generate", json.dumps(REQUEST)], cwd=workdir, check=True,
                       env={**env, "PREFECT_API_URL": api, "WAN_OUTPUTS_DIR": str(outputs)}, timeout=600)
        [video] = outputs.glob("*/*/video.mp4")
        [artifact] = get_json(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": ["generated-video"]}}})
        url = f"http://127.0.0.1:{port}/artifacts/artifact/{artifact['id']}"
        log.info("loading %s in Chromium", url)
        output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # on a loaded machine the single-page app may not have drawn the artifact in time
            dom = _chromium(chromium, workdir, url, "--dump-dom").stdout
            if judge(dom, str(video))["headings"]:  # drawn (a heading is there whether escaped or not)
                break
        (output_dir / "artifact-dom.html").write_text(dom)
        if screenshot:
            _chromium(chromium, workdir, url, f"--screenshot={(output_dir / 'artifact.png').resolve()}")
    finally:
        stop_process_group(server.pid, grace_s=5)  # a throwaway database: nothing to lose in a SIGKILL
    report = {"url": url, "prompt": PROMPT, "video": str(video), **judge(dom, str(video))}
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path(tempfile.gettempdir()) / "wanflow-artifact-check",
                        help="where the DOM, the screenshot and report.json go")
    parser.add_argument("--no-screenshot", action="store_true", help="only the DOM (one Chromium start less)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="wanflow-artifact-check-") as workdir:
        report = check(Path(workdir), args.output_dir, screenshot=not args.no_screenshot)
    log.info("the browser shows: elements %s; heading %s; code %s", report["elements"], report["headings"],
             report["code"])
    if report["problems"]:
        raise SystemExit("the artifact page is not the literal text: " + "; ".join(report["problems"]))
    log.info("the prompt and the path show as text, nothing injected (%s)", args.output_dir / "report.json")


if __name__ == "__main__":
    main()

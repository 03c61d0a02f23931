"""The Prefect server `wanflow setup` prepares: the configured one, or a local one it starts.

With PREFECT_API_URL set (environment or Prefect profile) that server is used as it is.
Without it, setup uses the server on 127.0.0.1:<port> if one answers there, else starts
`prefect server start` on that address, detached, with SQLite in PREFECT_HOME and the
settings below, and saves its URL in the current Prefect profile so that the worker, the
CLI and the UI links all talk to it. `prefect server stop` stops it.

Setup remembers the server it started (SERVER_RECORD in PREFECT_HOME): when the configured
URL is that server and it does not answer, setup starts it again with the same settings. A
server that keeps GPU leases in memory is refused: a restart of it would leak every GPU
held at that moment.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings, update_current_profile

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 120.0  # first start on a fresh database: ~10 s alone, much longer on a busy 2-core host

# What a server running wanflow needs (user values win); docs/deploy.md explains each.
SERVER_ENV = {
    # Leases on GPU slots live in files, so a restart does not forget who holds which GPU:
    # with the default in-memory storage a slot held across a restart leaks for good.
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    # Expired leases (a holder that died without the worker seeing it) are reclaimed within 5 s of
    # expiring instead of Prefect's 15 s.
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline hosts: no failing telemetry job
}
FILE_LEASES = SERVER_ENV["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"]
PID_FILE = "server.pid"  # where `prefect server stop` looks for a background server
SERVER_RECORD = "wanflow-server.json"  # the server setup started: {"url", "port", "pid"}


class ServerError(RuntimeError):
    """No usable Prefect server; the message says what to do."""


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at `api_url` (".../api")."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the current Prefect profile."""
    return get_current_settings().api.url


def start_local_server(port: int = DEFAULT_PORT, timeout: float = START_TIMEOUT_S) -> str:
    """Start a detached `prefect server start` on 127.0.0.1:`port` and wait until it answers."""
    home = get_current_settings().home
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "wanflow-server.log"
    api_url = f"http://{LOCAL_HOST}:{port}/api"
    env = {**SERVER_ENV, "PREFECT_UI_API_URL": api_url, **os.environ,
           "PREFECT_SERVER_API_HOST": LOCAL_HOST, "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)  # the server is not a client of another one
    with open(log_path, "ab") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", LOCAL_HOST, "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # outlives this command and its terminal
        )
    (home / PID_FILE).write_text(str(server.pid))
    (home / SERVER_RECORD).write_text(json.dumps({"url": api_url, "port": port, "pid": server.pid}))
    deadline = time.monotonic() + timeout
    while not api_healthy(api_url):
        if server.poll() is not None or time.monotonic() > deadline:
            if server.poll() is None:
                server.terminate()
            (home / PID_FILE).unlink(missing_ok=True)
            raise ServerError(f"the Prefect server on {api_url} did not start within {timeout:.0f} s; "
                              f"its log: {log_path}\n{_tail(log_path)}")
        time.sleep(0.5)
    return api_url


def started_server() -> dict | None:
    """The record of the server setup started from this PREFECT_HOME, if any."""
    path = get_current_settings().home / SERVER_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def server_command(api_url: str) -> str:
    """The shell command that starts a server for `api_url` with the settings wanflow needs."""
    address = urlsplit(api_url)
    settings = " ".join(f"{k}={v}" for k, v in SERVER_ENV.items())
    return (f"{settings} prefect server start --host {shlex.quote(address.hostname or LOCAL_HOST)} "
            f"--port {address.port or DEFAULT_PORT}")


def check_lease_storage(api_url: str) -> None:
    """Refuse a server that keeps concurrency leases in memory (Prefect serves its settings at
    /api/admin/settings): restarting it would leave every GPU slot held at that moment taken for good."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:  # with its auth
        response = client.request("GET", "/admin/settings")
    response.raise_for_status()
    storage = response.json().get("server", {}).get("concurrency", {}).get("lease_storage")
    if storage is None:
        log.warning("%s does not say where it keeps concurrency leases; wanflow needs %s", api_url, FILE_LEASES)
    elif storage != FILE_LEASES:
        raise ServerError(f"the Prefect server at {api_url} keeps GPU leases in {storage}: a restart of it "
                          f"would keep every GPU held at that moment taken for good. Restart it with the settings "
                          f"wanflow needs: {server_command(api_url)}")


def ensure_server(port: int = DEFAULT_PORT) -> tuple[str, str]:
    """The API URL to set up and how it was found: "configured", "restarted", "running" or "started"."""
    configured = configured_api_url()
    if configured:
        how = "configured"
        if not api_healthy(configured, timeout=10):
            record = started_server()
            if not record or record.get("url") != configured.rstrip("/"):
                raise ServerError(f"PREFECT_API_URL={configured} does not answer. Start that server with the "
                                  f"settings wanflow needs (docs/deploy.md section 3): {server_command(configured)}; "
                                  f"or unset PREFECT_API_URL to let setup start a local one")
            start_local_server(int(record["port"]))  # ours: again, with the same settings
            how = "restarted"
        check_lease_storage(configured)
        return configured, how
    api_url = f"http://{LOCAL_HOST}:{port}/api"
    how = "running" if api_healthy(api_url) else "started"
    if how == "started":
        start_local_server(port)
    check_lease_storage(api_url)
    update_current_profile({PREFECT_API_URL: api_url})
    return api_url, how


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

"""Real processes for the end-to-end tests: `make ui` (webserver + daemon), the CLI, a PostgreSQL server."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HOST = "127.0.0.1"
LOCATION = {"repositoryLocationName": "gist", "repositoryName": "__repository__"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    resp = requests.post(f"{base}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
    assert resp.status_code == 200, resp.text[:2000]
    body = resp.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the process group ``proc`` leads (it started a new session), then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def run_cli(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m gist_assets.run ARGS`` as a user runs it."""
    return subprocess.run(
        [PYTHON, "-m", "gist_assets.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def make_ui(env: dict, log_dir: Path, startup_timeout_s: float = 180):
    """`make ui` (dagster dev: webserver and daemon) on a free port; yields the base URL and a log reader."""
    port = free_port()
    out = open(log_dir / "make_ui.log", "wb")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "ui", f"PORT={port}", f"PYTHON={PYTHON}"],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )

    def logs() -> str:
        out.flush()
        return (log_dir / "make_ui.log").read_text(errors="replace")[-6000:]

    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            assert proc.poll() is None, f"make ui exited with {proc.returncode}:\n{logs()}"
            try:
                if requests.get(f"{base}/server_info", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"make ui not serving after {startup_timeout_s}s:\n{logs()}"
            time.sleep(0.5)
        yield {"base": base, "proc": proc, "logs": logs}
    finally:
        stop_group(proc)
        out.close()


RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"


def wait_run(base: str, run_id: str, timeout_s: float, logs) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = graphql(base, RUN_STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        assert time.monotonic() < deadline, f"run {run_id} still {status} after {timeout_s}s:\n{logs()}"
        time.sleep(1)


# ------------------------------------------------------------------ PostgreSQL


def postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@contextmanager
def postgres_server():
    """A throwaway PostgreSQL server on a free loopback port (trust auth); yields its URL."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    # The server refuses to run as root: run it as the postgres user, in a directory it owns.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="gist-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if as_user:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    try:
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                *as_user,
                pg_ctl,
                "-D",
                str(data),
                "-l",
                str(base / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port} -k {sock} -h {HOST}",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
        yield f"postgresql+psycopg2://postgres@{HOST}:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)

"""The real `dagster-webserver` on workspace.yaml: the code location loads and the UI serves the graph."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from service_util import free_port, graphql, stop_group

REPO = Path(__file__).resolve().parents[1]
WEBSERVER = Path(sys.executable).parent / "dagster-webserver"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120

EXPECTED_ASSETS = {
    "candidate_pool",
    "target_sets",
    "base_model",
    "warmup_checkpoint",
    "target_gradients",
    "spectral_basis",
    "candidate_features",
    "candidate_sketches",
    "candidate_scores",
    "selected_subset",
    "less_candidate_features",
    "representation_features",
    "baseline_scores",
    "baseline_selections",
    "selection_evaluation",
}
EXPECTED_CHECKS = {
    "spectral_basis": {"basis_columns_orthonormal"},
    "candidate_scores": {"scores_valid"},
    "baseline_scores": {"scores_valid"},
    "selected_subset": {"selection_size_as_configured", "selections_valid"},
}
PARTITIONED = ["candidate_features", "candidate_sketches", "less_candidate_features", "representation_features"]

LOCATIONS_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name jobs { name } } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message stack }
  }
}
"""

ASSETS_QUERY = """
{
  assetNodes {
    assetKey { path }
    isPartitioned
    partitionDefinition { type name }
    hasAssetChecks
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name blocking } }
    }
  }
}
"""


def _listen_addresses(port: int) -> set[str] | None:
    """Local addresses with a listening TCP socket on ``port``; None when the OS does not tell us."""
    try:
        import psutil

        conns = psutil.net_connections(kind="inet")
    except Exception:  # psutil missing, or AccessDenied (macOS without root)
        return None
    return {c.laddr.ip for c in conns if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN}


@pytest.fixture
def webserver(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "GIST_STORAGE_ROOT": str(tmp_path / "gist_root"),
    }
    Path(env["DAGSTER_HOME"]).mkdir()
    stdout, stderr = open(tmp_path / "stdout.log", "wb"), open(tmp_path / "stderr.log", "wb")
    proc = subprocess.Popen(
        [str(WEBSERVER), "-h", HOST, "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )

    def logs() -> str:
        stderr.flush()
        return (tmp_path / "stderr.log").read_text(errors="replace")[-8000:]

    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster-webserver exited with {proc.returncode} before serving:\n{logs()}")
            try:
                if requests.get(f"{base}/server_info", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster-webserver not up after {STARTUP_TIMEOUT_S}s:\n{logs()}")
            time.sleep(0.5)
        yield {"base": base, "port": port, "proc": proc, "logs": logs, "storage_root": Path(env["GIST_STORAGE_ROOT"])}
    finally:
        stop_group(proc, grace_s=20)  # the webserver runs the code server as a child
        stdout.close()
        stderr.close()


@pytest.mark.slow
def test_webserver_serves_the_code_location(webserver):
    base, port = webserver["base"], webserver["port"]

    # Bound to loopback only.
    addrs = _listen_addresses(port)
    if addrs is not None:
        assert addrs == {HOST}, f"webserver listens on {addrs}, expected only {HOST}"
    if sys.platform.startswith("linux"):  # 127.0.0.2 is loopback too: reachable only with a wildcard bind
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.2", port)) != 0, "webserver accepts connections beyond 127.0.0.1"

    # The code location loaded without error.
    ws = graphql(base, LOCATIONS_QUERY)["workspaceOrError"]
    assert ws["__typename"] == "Workspace", ws
    entries = ws["locationEntries"]
    assert len(entries) == 1, entries
    loc = entries[0]["locationOrLoadError"]
    assert loc is not None and loc["__typename"] == "RepositoryLocation", (
        f"code location failed to load: {loc.get('message') if loc else None}\n{loc.get('stack') if loc else ''}"
        f"\n{webserver['logs']()}"
    )
    assert entries[0]["loadStatus"] == "LOADED"
    jobs = {j["name"] for repo in loc["repositories"] for j in repo["jobs"]}
    assert {"prepare_job", "features_job", "select_job"} <= jobs, jobs

    # The asset graph: exactly these assets, the checks, and the dynamic shard partitions.
    nodes = graphql(base, ASSETS_QUERY)["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert len(by_key) == len(nodes)
    assert set(by_key) == EXPECTED_ASSETS

    checks = {}
    for key, node in by_key.items():
        res = node["assetChecksOrError"]
        assert res["__typename"] == "AssetChecks", (key, res)
        names = {c["name"] for c in res["checks"]}
        if names:
            checks[key] = names
        assert node["hasAssetChecks"] == bool(names)
    assert checks == EXPECTED_CHECKS
    blocking = {c["name"]: c["blocking"] for n in by_key.values() for c in n["assetChecksOrError"]["checks"]}
    assert blocking == {
        "basis_columns_orthonormal": True,
        "scores_valid": True,
        "selection_size_as_configured": False,
        "selections_valid": True,
    }

    feats = by_key["candidate_features"]
    assert feats["isPartitioned"] is True
    assert feats["partitionDefinition"]["type"] == "DYNAMIC"
    assert feats["partitionDefinition"]["name"] == "candidate_shards"
    assert sorted(k for k, n in by_key.items() if n["isPartitioned"]) == sorted(PARTITIONED)
    assert all(by_key[k]["partitionDefinition"]["name"] == "candidate_shards" for k in PARTITIONED)

    # Loading the code location writes nothing into the storage root.
    root = webserver["storage_root"]
    assert not root.exists() or not any(root.iterdir()), sorted(root.rglob("*"))
    assert webserver["proc"].poll() is None

import os

import dagster as dg
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist each worker gets its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One embedded-model cache for the session, shared by the xdist workers (and the processes tests start),
    so each model setting is pretrained once; never the user's own cache."""
    from gist_resources.files import MODEL_CACHE_ENV

    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "model_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MODEL_CACHE_ENV, str(cache))
        yield cache


@pytest.fixture
def storage_root(tmp_path, monkeypatch):
    root = tmp_path / "gist_root"
    monkeypatch.setenv("GIST_STORAGE_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """The whole graph, baselines and evaluation included, on the small embedded default (tests only read it)."""
    from gist_assets.run import run_all
    from small_config import SMALL

    root = tmp_path_factory.mktemp("gist_small")
    with dg.instance_for_test() as instance:
        out = run_all(SMALL, str(root), instance=instance, log=lambda _: None, compare=True)
        shards = instance.get_dynamic_partitions("candidate_shards")
        yield {"root": root, "out": out, "shards": shards, "instance": instance}


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory):
    """The exact path of the graph (TINY_EXACT) over a two-file pool, built once per session.

    Returns a function that restores a fresh copy of the built storage root and Dagster instance at the paths
    they were built at (run configs and run history hold absolute paths) and returns (root, instance
    directory, run config); tests open the instance with ``dg.instance_for_test(temp_dir=...)`` and may
    change anything.
    """
    import shutil

    from gist_assets.run import run_all
    from small_config import TINY_EXACT, two_file_pool

    base = tmp_path_factory.mktemp("tiny_graph")
    live, snapshot = base / "live", base / "snapshot"
    root, home = live / "root", live / "dagster_home"
    config = {"ops": {**TINY_EXACT["ops"], "candidate_pool": two_file_pool(base / "input")}}  # 4 shards
    home.mkdir(parents=True)
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        run_all(config, str(root), instance=instance, log=lambda _: None)
    shutil.copytree(live, snapshot)

    def restore():
        shutil.rmtree(live)
        shutil.copytree(snapshot, live)
        return root, home, config

    return restore


# Fixtures that run the whole graph or install and convert the real model: a test that uses one is end to
# end, so it is marked slow (`make test-fast` skips it, `make test` runs it), and the tests of one fixture
# share an xdist group.
FIXTURE_GROUPS = {
    "small_run": "small_run",
    "custom_graph": "small_run",
    "tiny_graph": "tiny_graph",
    "smollm2_packages": "smollm2",
    "smollm2_converted": "smollm2",
    "smollm2_tokenizers": "smollm2",
}


# tryfirst: xdist's own hook reads the xdist_group marks, so they must be on the items before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        groups = {FIXTURE_GROUPS[f] for f in getattr(item, "fixturenames", ()) if f in FIXTURE_GROUPS}
        if groups:
            item.add_marker(pytest.mark.slow)
            # Under pytest-xdist (--dist loadgroup) the tests of one session fixture share a worker, so the
            # fixture is built once.
            (group,) = groups
            item.add_marker(pytest.mark.xdist_group(group))
    items[:] = schedule_order(items)


# The modules of the longest single end-to-end tests (tens of seconds to minutes each), longest first.
LONGEST_FIRST = ("test_quality.py", "test_service.py", "test_freshness.py", "test_benchmark_scripts.py")


def schedule_order(items: list) -> list:
    """The order xdist hands tests out in (it starts with the grouped ones, the largest group first).

    The slow tests come first, the longest first, each followed by a fast one: a worker holds its next test
    while it runs one, and a fast test there keeps two long ones off one worker (measured: 659 s of
    tests on one worker and 433 s on the other when the long ones came back to back).
    """

    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    grouped = [i for i in items if i.get_closest_marker("xdist_group")]
    single = [i for i in items if not i.get_closest_marker("xdist_group")]
    slow = sorted((i for i in single if i.get_closest_marker("slow")), key=rank)
    fast = [i for i in single if not i.get_closest_marker("slow")]
    order = list(grouped)
    for k, item in enumerate(slow):
        order.append(item)
        if k < len(fast):
            order.append(fast[k])
    return order + fast[len(slow) :]


def pytest_collection_finish(session):
    """Under --dist loadgroup, fail at once when xdist could not group the tests (a pytest it does not know
    yet), rather than build every shared end-to-end fixture once per worker."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if ungrouped:
        raise pytest.UsageError(
            f"pytest-xdist did not group {len(ungrouped)} tests (e.g. {ungrouped[0]}): this pytest and pytest-xdist "
            "do not work together; install the versions in requirements.lock (make install)"
        )

"""requirements.lock stays in step with pyproject.toml and with what is installed."""

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_installed_dependency_is_pinned_at_its_installed_version() -> None:
    """make install installs with the lock as constraints, so each package of the project's closure is
    installed at its pinned version; a dependency added to pyproject.toml without `make lock` is named."""
    lock = _lock_module()
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert all(re.fullmatch(r"[a-z0-9-]+", n) for n in pins), "names are normalized"
    installed = lock.closure(missing_ok=True)
    needed = {n: v for n, v in installed.items() if n not in lock.LEFT_OUT and n != lock._name(lock.PROJECT)}
    unpinned = sorted(set(needed) - set(pins))
    assert not unpinned, f"not in requirements.lock: {unpinned}; run `make lock` after `make install`"
    differ = {n: (v, pins[n]) for n, v in needed.items() if pins[n] != v}
    assert not differ, f"installed vs pinned versions differ: {differ}; reinstall (make install) or `make lock`"
    assert "torch" not in pins  # the Makefile pins it, per machine

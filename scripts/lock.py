"""Write requirements.lock: the exact versions of everything the project installs, from this venv.

`make install` passes the file to pip as constraints (``-c``), so a fresh machine gets the versions the
suite last passed with, not the newest that the ranges in pyproject.toml allow. The file lists the
dependency closure of ``gist-data-curation[test,smollm2,k8s,postgres]`` as installed here, read from
the installed packages' metadata (nothing is resolved or downloaded). torch is left out: the Makefile
pins it (TORCH_VERSION), and its build (CPU or CUDA) depends on the machine.

    make lock        # after changing a dependency in pyproject.toml and `make install`
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = "gist-data-curation"
EXTRAS = ("test", "smollm2", "k8s", "postgres")
LEFT_OUT = {"torch"}  # pinned by the Makefile; its wheel differs per machine (CPU / CUDA)
HEADER = (
    "# The exact versions `make install` installs (pip constraints). Regenerate with `make lock`\n"
    "# (scripts/lock.py) after a dependency change; torch is pinned by the Makefile.\n"
)


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS, missing_ok: bool = False) -> dict[str, str]:
    """{normalized name: installed version} of every distribution ``project[extras]`` needs, transitively
    (``missing_ok``: skip those not installed, e.g. an extra's packages before the extra is installed)."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(project, frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if missing_ok:
                continue
            raise SystemExit(f"{name} is required but not installed here; run `make install` first") from None
        found[_name(name)] = dist.version
        envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "requirements.lock")
    args = p.parse_args(argv)
    pins = {n: v for n, v in closure().items() if n != _name(PROJECT) and n not in LEFT_OUT}
    args.out.write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    print(f"{args.out}: {len(pins)} pinned distributions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The Dagster instance home: ``$DAGSTER_HOME``, default ``<storage root>/dagster_home``.

``python -m gist_resources.dagster_home [--template FILE]`` prepares it (``make ui`` does):
a ``dagster.yaml`` is written when there is none, from ``--template`` when given
(e.g. ``deploy/postgres/dagster.yaml`` for a team's PostgreSQL-backed instance).
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from .files import default_storage_root

# The embedded default: SQLite under DAGSTER_HOME. Telemetry is off because the project is meant to
# run offline and must not try to reach anything but the package registries.
DAGSTER_YAML = """\
# The embedded instance of this storage root: run, event-log and schedule storage in SQLite here.
telemetry:
  enabled: false
"""


def ensure_dagster_home(root: str = "", template: str | None = None) -> str:
    """Create ``$DAGSTER_HOME`` (set it when unset) with a dagster.yaml; return its path."""
    home = os.environ.get("DAGSTER_HOME") or str(Path(root or default_storage_root()).resolve() / "dagster_home")
    Path(home).mkdir(parents=True, exist_ok=True)
    cfg = Path(home) / "dagster.yaml"
    if template:
        shutil.copyfile(template, cfg)
    elif not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = home
    return home


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", help="dagster.yaml to install (default: keep the one there, or SQLite)")
    args = parser.parse_args(argv)
    if args.template and not Path(args.template).is_file():
        print(f"error: --template {args.template}: no such file", file=sys.stderr)
        return 2
    print(ensure_dagster_home(template=args.template))
    return 0


if __name__ == "__main__":
    sys.exit(main())

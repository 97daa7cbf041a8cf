"""Data versions: a fingerprint of what each asset's output is a function of.

Each asset's output is a deterministic function of its inputs' versions, its
config and its code version, so that hash is its data version: re-running with
the same inputs keeps it (nothing downstream turns stale), changing ``k`` changes
the basis's version and so marks the basis and everything below it stale in the
UI, never the pool or the warmup. Versions are also written into each asset's
manifest, so downstream assets and sensors can read them without the instance.
"""

import hashlib
import json

import dagster as dg


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def rows_fingerprint(*columns) -> str:
    """Order-sensitive hash of table rows given as parallel columns."""
    h = hashlib.sha256()
    for row in zip(*columns, strict=False):
        h.update(json.dumps(row, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def data_version(value: str) -> dg.DataVersion:
    return dg.DataVersion(value)


def asset_fingerprint(context, *inputs) -> str:
    """The asset's name and code version, its config, and its inputs' versions."""
    key = context.asset_key
    code = context.assets_def.code_versions_by_key.get(key)
    config = getattr(context.op_execution_context, "op_config", None)
    return fingerprint(key.to_user_string(), code, config, *inputs)

"""Where stored artifacts are, from the current storage root (never from paths a manifest recorded).

Manifests written by older code hold absolute paths; a root that was copied or restored elsewhere
must not read through them, so these rebuild the paths from names.
"""

from pathlib import Path

from gist_resources import StorageResource


def model_path(storage: StorageResource, ref: dict) -> str:
    """The base model: the embedded one is models/base_model, a preset models/<its dir>; a configured one is the
    user's path or hub id."""
    if ref.get("embedded"):
        return str(storage.path("models", "base_model"))
    if ref.get("preset"):  # converted under the root (models/<dir>)
        return str(storage.path(*Path(ref["path"]).parts))
    return ref["path"]


def checkpoint_dir(storage: StorageResource, ckpt: dict) -> str:
    """A warmup checkpoint (PEFT adapter dir), warmup/<name>."""
    return str(storage.path("warmup", ckpt["name"]))


def relative_checkpoints(storage: StorageResource, checkpoints: list[dict]) -> list[dict]:
    """Checkpoint entries for a manifest, with their dirs relative to the root."""
    return [{**c, "dir": storage.relative(checkpoint_dir(storage, c))} for c in checkpoints]

"""Where stored artifacts are, from the current storage root (never from paths a manifest recorded).

Manifests written by older code hold absolute paths; a root that was copied or restored elsewhere must not read through them, so these rebuild the paths from names.
"""

from gist_resources import StorageResource


def model_path(storage: StorageResource, ref: dict) -> str:
    """The base model: the embedded one lives at models/base_model; a configured one is the user's path or hub id."""
    return str(storage.path("models", "base_model")) if ref.get("embedded") else ref["path"]


def checkpoint_dir(storage: StorageResource, ckpt: dict) -> str:
    """A warmup checkpoint (PEFT adapter dir), warmup/<name>."""
    return str(storage.path("warmup", ckpt["name"]))


def relative_checkpoints(storage: StorageResource, checkpoints: list[dict]) -> list[dict]:
    """Checkpoint entries for a manifest, with their dirs relative to the root."""
    return [{**c, "dir": storage.relative(checkpoint_dir(storage, c))} for c in checkpoints]

"""Things with state: storage root and files, compute device and models, the DuckDB score store."""

from .compute import ComputeResource
from .score_store import ScoreStore
from .storage import StorageResource, default_storage_root

__all__ = ["ComputeResource", "ScoreStore", "StorageResource", "default_storage_root"]

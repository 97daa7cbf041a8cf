"""Things with state: the artifact store (files under the storage root), the compute device and models, and
the DuckDB score store."""

from .artifacts import ArtifactStore
from .compute import ComputeResource
from .files import default_storage_root
from .score_store import ScoreStore

__all__ = ["ArtifactStore", "ComputeResource", "ScoreStore", "default_storage_root"]

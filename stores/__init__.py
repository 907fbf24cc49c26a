"""Feature stores on disk and the FAISS index built from them."""

from stores.feature_store import FeatureStore, shard_path, write_shard_files
from stores.index import FaissIndex, build_index
from stores.lock import StoreLock

__all__ = ["FaissIndex", "FeatureStore", "StoreLock", "build_index", "shard_path", "write_shard_files"]

"""Webdataset shards from local paths or S3: synthetic data, preflight checks, resumable loading.

Entry points live in t2i_dist.data.shards (imported lazily so that `import t2i_dist.data` stays light)."""

from t2i_dist.data.errors import DataError

__all__ = ["DataError"]

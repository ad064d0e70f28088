"""The data pipeline's entry points: resolve and check shards on the driver, stream batches on workers.

shards = preflight(cfg.data)                      # driver, before any worker starts
loader = ShardLoader(cfg.data, batch_size, rank, world_size, seed, shards=shards)
for batch in loader: ...                          # infinite; loader.state_dict() for checkpoints
"""

from t2i_dist.data.errors import DataError
from t2i_dist.data.loader import ShardLoader
from t2i_dist.data.sources import expand_urls, preflight

__all__ = ["DataError", "ShardLoader", "expand_urls", "preflight"]

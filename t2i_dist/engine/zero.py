"""ZeRO-3 helpers shared by the engines and checkpoints: gathering partitioned parameters for reading."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager

from torch import nn


def is_partitioned(params: Iterable[nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params: list[nn.Parameter]) -> AbstractContextManager[object]:
    """Gather ZeRO-3 partitioned parameters for reading (collective: every rank must enter); a no-op for
    ordinary ones."""
    if is_partitioned(params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()

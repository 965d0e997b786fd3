"""Distributed checkpoints: per-rank directories, coordinated commits, resharding, merging.

Layout (boostr's): ``rank_0/ ... rank_{N-1}/`` (each an ordinary checkpoint) and
``sharding_meta.json``. See docs/distributed.md.
"""

from __future__ import annotations

from .consolidate import consolidate_checkpoint
from .coordinator import Coordinator, JaxCoordinator, MPICoordinator, TorchCoordinator
from .global_shards import ReadStats
from .load import load_distributed_checkpoint
from .save import save_distributed_checkpoint
from .types import Replicated, ShardingConfig, ShardingMeta, TensorParallel, ZeroPartitioned

__all__ = [
    "Coordinator",
    "JaxCoordinator",
    "MPICoordinator",
    "ReadStats",
    "Replicated",
    "ShardingConfig",
    "ShardingMeta",
    "TensorParallel",
    "TorchCoordinator",
    "ZeroPartitioned",
    "consolidate_checkpoint",
    "load_distributed_checkpoint",
    "save_distributed_checkpoint",
]

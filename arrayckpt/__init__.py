"""arrayckpt: checkpoint ML training state from any array framework to safetensors files.

Saves are atomic and durable, asynchronous saves stall training only for one copy to
host memory, and loading never runs code. Importing arrayckpt imports no framework.
"""

from __future__ import annotations

from .async_checkpointer import AsyncCheckpointer
from .distributed import (
    ReadStats,
    Replicated,
    ShardingConfig,
    TensorParallel,
    ZeroPartitioned,
    consolidate_checkpoint,
    load_distributed_checkpoint,
    save_distributed_checkpoint,
)
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidInputError,
    TopologyError,
    UnsupportedArrayError,
)
from .hf import export_hf
from .lazy import LazyCheckpoint, open_checkpoint
from .load import Checkpoint, load_checkpoint, load_file
from .manager import CheckpointManager
from .rng import get_rng_state, set_rng_state
from .save import save_checkpoint
from .training_state import CHECKPOINT_VERSION, TrainingState

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_VERSION",
    "AsyncCheckpointer",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "InvalidInputError",
    "LazyCheckpoint",
    "ReadStats",
    "Replicated",
    "ShardingConfig",
    "TensorParallel",
    "TopologyError",
    "TrainingState",
    "UnsupportedArrayError",
    "ZeroPartitioned",
    "consolidate_checkpoint",
    "export_hf",
    "get_rng_state",
    "load_checkpoint",
    "load_distributed_checkpoint",
    "load_file",
    "open_checkpoint",
    "save_checkpoint",
    "save_distributed_checkpoint",
    "set_rng_state",
]

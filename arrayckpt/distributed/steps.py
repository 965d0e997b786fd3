"""A `CheckpointManager` step holding sharded-array (DTensor) state: one coordinated save
of every rank, and each rank's share loaded back at any world size."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import InvalidInputError
from ..layout import SHARDING_META_FILE
from ..load import Checkpoint
from ..training_state import TrainingState
from .load import load_distributed_checkpoint
from .save import save_distributed_checkpoint


def _rank_and_size(what: str) -> tuple[int, int]:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        raise InvalidInputError(
            f"{what}: the state holds DTensors, whose step every rank saves together: "
            "initialise torch.distributed (init_process_group) first"
        )
    return int(dist.get_rank()), int(dist.get_world_size())


def save_step(
    target: Path,
    checkpointer: Any,
    model_state: Mapping[str, Any],
    optimizer_state: Any,
    training_state: TrainingState,
    extra: Any,
    retain: Callable[[], None],
) -> Future[Path | str]:
    """Save ``target`` as one coordinated checkpoint of every rank (each calls this with
    its own shards); rank 0 applies retention once the step is committed.

    ``checkpointer`` is the manager's `AsyncCheckpointer`, or ``None`` to write now.
    """
    rank, world = _rank_and_size(f"saving {target}")
    if checkpointer is None:
        done: Future[Path | str] = Future()
        done.set_result(
            save_distributed_checkpoint(
                target, rank, world, model_state, optimizer_state, training_state, extra=extra
            )
        )
        if rank == 0:
            retain()
        return done
    future: Future[Path | str] = checkpointer.save_distributed(
        target, rank, world, model_state, optimizer_state, training_state, extra=extra
    )
    if rank == 0:

        def after(f: Future[Path | str]) -> None:
            # `Future.exception`, not the override: the caller still sees a failure.
            if Future.exception(f) is None:
                retain()

        future.add_done_callback(after)
    return future


def is_sharded_step(path: Path) -> bool:
    """True for a step saved by several ranks (a distributed checkpoint)."""
    return (path / SHARDING_META_FILE).is_file()


def load_step(
    path: Path,
    *,
    into: Any,
    optimizer_into: Any,
    xp: ModuleType | str | None,
    device: Any,
    verify: bool,
    mmap: bool,
) -> Checkpoint:
    """This rank's share of a distributed step: filled into ``into``/``optimizer_into``
    (the new model's and optimizer's ``state_dict()``, any mesh and world size), or
    whole tensors in a single process."""
    dist = sys.modules.get("torch.distributed")
    rank, world = (
        _rank_and_size(f"loading {path}")
        if dist is not None and dist.is_available() and dist.is_initialized()
        else (0, 1)
    )
    return load_distributed_checkpoint(
        path,
        rank,
        world_size=world,
        into=into,
        optimizer_into=optimizer_into,
        xp=xp,
        device=device,
        verify=verify,
        mmap=mmap,
    )

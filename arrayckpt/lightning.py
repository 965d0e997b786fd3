"""`ArrayckptCheckpointIO`: Lightning's checkpoint dict saved as an arrayckpt checkpoint.

The only module that imports Lightning; ``import arrayckpt`` never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from . import fsops
from .async_checkpointer import AsyncCheckpointer
from .commit import remove_directory
from .errors import CheckpointNotFoundError, InvalidInputError
from .layout import is_complete
from .load import load_checkpoint
from .training_state import TrainingState

# The entry of Lightning's checkpoint dict that holds the LightningModule's weights; it goes
# to model.safetensors (readable by any safetensors tool), the rest to extra.safetensors.
_WEIGHTS = "state_dict"


class ArrayckptCheckpointIO(CheckpointIO):
    """Saves Lightning checkpoints as arrayckpt checkpoint directories, asynchronously.

    Pass it to the Trainer: ``Trainer(plugins=[ArrayckptCheckpointIO()])``. Each checkpoint
    path (``epoch=1-step=8.ckpt``, ``last.ckpt``) becomes a checkpoint directory:
    ``state_dict`` in ``model.safetensors``, everything else (epoch, global_step, loops,
    callbacks, hyper-parameters, optimizer and LR scheduler states) in
    ``extra.safetensors``, committed atomically like every arrayckpt save.

    `save_checkpoint` returns once the tensors are copied to host buffers; the shared
    writer thread writes and commits. Loading or removing a checkpoint, and `teardown`,
    first wait for the write in flight; a failed write is raised there (or by the next
    save).

    Values in the checkpoint must be arrays or JSON values (ints, floats, str, bool, None,
    lists, tuples, dicts with str or int keys): a hyper-parameter that is a
    ``pathlib.Path`` is refused with an `InvalidInputError` naming its key.
    """

    def __init__(self) -> None:
        self._checkpointer = AsyncCheckpointer()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Snapshot ``checkpoint`` now and commit it at ``path`` in the background.

        Raises:
            InvalidInputError: ``storage_options`` was given, or a value is neither an
                array nor a JSON value (the message names its key); nothing is written.
        """
        if storage_options is not None:
            raise InvalidInputError(
                f"saving the Lightning checkpoint {path}: ArrayckptCheckpointIO takes no "
                "storage_options; drop them"
            )
        weights = checkpoint.get(_WEIGHTS, {})
        rest = {key: value for key, value in checkpoint.items() if key != _WEIGHTS}
        state = TrainingState(
            step=_count(checkpoint, "global_step"), epoch=_count(checkpoint, "epoch")
        )
        try:
            self._checkpointer.save(Path(path), weights, training_state=state, extra=rest)
        except InvalidInputError as exc:
            raise type(exc)(
                f"saving the Lightning checkpoint {path}: {exc}. Here extra[...] is the "
                "checkpoint dict without its state_dict; hyper_parameters are the "
                "LightningModule's save_hyperparameters() arguments"
            ) from exc

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict Lightning saved, with torch tensors.

        ``map_location`` may be a device (``"cpu"``, ``torch.device("cuda:0")``); any other
        mapping (a function, a dict) loads to the CPU, where Lightning moves the state
        itself. ``weights_only`` is accepted and needs nothing: loading never runs code.

        Raises:
            CheckpointNotFoundError: ``path`` is no complete checkpoint.
        """
        self._checkpointer.wait()
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        ckpt = load_checkpoint(Path(path), xp="torch", device=device, optimizer=False)
        loaded = dict(ckpt.extra or {})
        loaded[_WEIGHTS] = ckpt.model
        return loaded

    def remove_checkpoint(self, path: str | Path) -> None:
        """Delete the checkpoint at ``path`` (after the write in flight commits); a
        symbolic link is removed, not what it points to.

        Raises:
            CheckpointNotFoundError: ``path`` is no complete checkpoint (nothing is removed).
        """
        self._checkpointer.wait()
        target = Path(path).absolute()
        if target.is_symlink():  # ModelCheckpoint(save_last="link"): the link goes, not its target
            fsops.fs().remove_file(target)
            return
        if not is_complete(target):
            raise CheckpointNotFoundError(
                f"removing the Lightning checkpoint {target}: it is not a complete arrayckpt "
                "checkpoint; remove it by hand if it is not one"
            )
        remove_directory(target)

    def teardown(self) -> None:
        """Wait for the write in flight (raising its error) and free the host buffers."""
        self._checkpointer.close()
        self._checkpointer = AsyncCheckpointer()  # Lightning may fit again with this plugin


def _count(checkpoint: Mapping[str, Any], key: str) -> int:
    """``epoch`` / ``global_step`` for training_state.json (absent when saved by hand)."""
    value = checkpoint.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"the Lightning checkpoint's {key!r} is {value!r}; expected an int >= 0"
        )
    return value

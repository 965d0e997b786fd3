"""The global random generators' states as a tree `save_checkpoint(extra=...)` can hold.

Only generators of modules the program has already imported are read: asking for torch's
state must not import torch. JAX has no global generator (its keys are ordinary state).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import InvalidInputError


def get_rng_state() -> dict[str, Any]:
    """The state of every global random generator already imported, as a nested tree.

    Keys: ``"python"`` (`random.getstate`), ``"numpy"`` (NumPy's global generator, the
    one behind ``np.random.rand``), ``"torch"`` (``{"cpu": ..., "cuda": [one per
    device]}``; CUDA only once CUDA is initialised, so this never initialises it).
    Generators you create yourself (``np.random.default_rng()``, a ``torch.Generator``
    for a data loader) are yours to save: ``rng.bit_generator.state``, ``g.get_state()``.
    CuPy's global generator is not covered: CuPy offers no way to read its state.

    Examples:
        >>> import random, arrayckpt as ac
        >>> state = ac.get_rng_state()
        >>> a = random.random()
        >>> ac.set_rng_state(state)
        >>> random.random() == a
        True
    """
    state: dict[str, Any] = {}
    if "random" in sys.modules:
        state["python"] = sys.modules["random"].getstate()
    state["numpy"] = np.random.get_state(legacy=False)  # numpy is imported by arrayckpt
    torch = sys.modules.get("torch")
    if torch is not None:
        torch_state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():
            torch_state["cuda"] = list(torch.cuda.get_rng_state_all())
        state["torch"] = torch_state
    return state


def set_rng_state(state: Any) -> None:
    """Restore the generators recorded by `get_rng_state` (also after a checkpoint load).

    The arrays may come back as NumPy arrays (``load_checkpoint`` default) or torch
    tensors. A generator recorded but not imported yet is imported, so that its state is
    in place when the program first uses it.

    Raises:
        InvalidInputError: ``state`` is not such a tree (names the part that is wrong).
    """
    if not isinstance(state, dict):
        raise InvalidInputError(
            f"set_rng_state takes the dict get_rng_state returned, not {type(state).__name__}"
        )
    unknown = sorted(set(state) - {"python", "numpy", "torch"})
    if unknown:
        raise InvalidInputError(f"set_rng_state: unknown generators {unknown}")
    try:
        if "python" in state:
            import random

            random.setstate(_tuples(state["python"]))
        if "numpy" in state:
            np.random.set_state(state["numpy"])
        if "torch" in state:
            _set_torch(state["torch"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise InvalidInputError(f"set_rng_state: the saved state does not fit: {exc}") from exc


def _tuples(x: Any) -> Any:
    # random.setstate insists on tuples; a state that went through JSON may hold lists
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _set_torch(state: dict[str, Any]) -> None:
    import torch

    def as_byte_tensor(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to("cpu", torch.uint8)
        return torch.from_numpy(np.array(x, dtype=np.uint8))  # a writable copy

    torch.set_rng_state(as_byte_tensor(state["cpu"]))
    cuda = state.get("cuda")
    if cuda:
        torch.cuda.set_rng_state_all([as_byte_tensor(s) for s in cuda])

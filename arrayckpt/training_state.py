"""`TrainingState` and its JSON file, read and written exactly as boostr's serde does."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

from . import limits
from .errors import CorruptCheckpointError, InvalidInputError
from .layout import MODEL_FILE
from .strict_json import is_uint, load_object, reject_constant

CHECKPOINT_VERSION = 2
"""The checkpoint format version this library writes (boostr's ``CHECKPOINT_VERSION``)."""
#: Largest training_state.json accepted (written and read).
MAX_STATE_BYTES = limits.MAX_TRAINING_STATE_BYTES
#: The model file's ``__metadata__`` key recording the CRC32C of ``training_state.json``'s
#: bytes (boostr reads the JSON file unchanged and ignores the model file's metadata).
STATE_CHECKSUM_KEY = "arrayckpt.training_state.crc32c"
_U64 = 2**64
_U32 = 2**32


@dataclass
class TrainingState:
    """Where training stands: step, epoch, learning rate and free-form string metadata.

    A file without ``version`` is version 1; missing ``epoch``, ``learning_rate`` and
    ``metadata`` default to ``0``, ``0.0`` and ``{}``, as in boostr.

    Examples:
        >>> s = TrainingState(step=100, epoch=1, learning_rate=3e-4, metadata={"run": "a"})
        >>> TrainingState.from_json(s.to_json()) == s
        True
    """

    step: int
    epoch: int = 0
    learning_rate: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = CHECKPOINT_VERSION

    def to_json(self) -> str:
        """The JSON boostr writes (serde_json pretty, fields in its order).

        Raises:
            InvalidInputError: a field has the wrong type or is out of range.
        """
        _check(self, InvalidInputError, "training_state")
        doc = {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "learning_rate": float(self.learning_rate),
            "metadata": self.metadata,
        }
        text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)
        # Python spells some floats differently from serde_json (1e-05 vs 0.00001); the
        # learning rate is the first float in the document, so this replaces just it.
        lr = float(self.learning_rate)
        text = text.replace(
            f'"learning_rate": {float.__repr__(lr)}', f'"learning_rate": {serde_f64(lr)}', 1
        )
        if len(text.encode()) > MAX_STATE_BYTES:  # what a save accepts, a load accepts
            raise InvalidInputError(
                f"training_state: its JSON is {len(text.encode())} bytes, over the "
                f"{MAX_STATE_BYTES}-byte limit; keep large data out of metadata"
            )
        return text

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "training_state.json") -> TrainingState:
        """Parse strictly; every problem is a `CorruptCheckpointError` naming ``source``."""

        def fail(problem: str) -> NoReturn:
            raise CorruptCheckpointError(f"{source}: {problem}")

        if len(text) > MAX_STATE_BYTES:
            fail(f"larger than {MAX_STATE_BYTES} bytes")
        doc = load_object(text, fail, parse_constant=reject_constant, parse_int=_serde_int)
        if "step" not in doc:
            fail("missing required field 'step'")
        state = cls(
            step=doc["step"],
            epoch=doc.get("epoch", 0),
            learning_rate=doc.get("learning_rate", 0.0),
            metadata=doc.get("metadata", {}),
            version=doc.get("version", 1),
        )
        _check(state, CorruptCheckpointError, source)
        state.learning_rate = float(state.learning_rate)
        return state

    @classmethod
    def read(cls, path: Path, *, metadata: Mapping[str, str] | None = None) -> TrainingState:
        """Read ``path``; with ``metadata`` (the model file's ``__metadata__``), its bytes
        must match the CRC32C recorded there, if one is (older checkpoints have none).

        Raises:
            CheckpointNotFoundError: no such file.
            CorruptCheckpointError: the file is malformed or fails its checksum.
        """
        from . import fsops
        from .errors import CheckpointNotFoundError

        try:
            data = fsops.fs().read_bytes(path, MAX_STATE_BYTES)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{path} does not exist") from exc
        except IsADirectoryError as exc:
            raise CorruptCheckpointError(f"{path} is a directory, not a file") from exc
        except ValueError as exc:
            raise CorruptCheckpointError(f"{path}: {exc}") from exc
        return cls.checked(data, source=str(path), metadata=metadata)

    @classmethod
    def checked(
        cls, data: bytes, *, source: str, metadata: Mapping[str, str] | None = None
    ) -> TrainingState:
        """`read` for the bytes of ``source`` already read (from a file or an object)."""
        state = cls.from_json(data, source=source)  # a malformed file says what is wrong
        recorded = None if metadata is None else metadata.get(STATE_CHECKSUM_KEY)
        if recorded is not None and recorded != state_checksum(data):
            raise CorruptCheckpointError(
                f"{source} fails the CRC32C recorded in {MODEL_FILE}: the file is corrupt; "
                "restore another checkpoint"
            )
        return state


def state_checksum(data: bytes) -> str:
    """The CRC32C recorded for ``training_state.json``'s bytes."""
    from .format import json_checksum  # the safetensors bindings load only when used

    return json_checksum(data)


def serde_f64(x: float) -> str:
    """``x`` as serde_json writes an ``f64``: Ryu's shortest digits in Ryu's layout.

    Both Python's ``repr`` and Ryu print the shortest digits that round-trip; they
    differ only in where they switch to exponents and how exponents look.

    Examples:
        >>> serde_f64(1e-5), serde_f64(1e-6), serde_f64(1e16), serde_f64(3.0)
        ('0.00001', '1e-6', '1e16', '3.0')
    """
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    exact = Decimal(repr(abs(x))).normalize()
    _, digit_tuple, exp = exact.as_tuple()
    assert isinstance(exp, int), "a finite float has an integer exponent"
    digits = "".join(map(str, digit_tuple))
    kk = len(digits) + exp  # 10**(kk-1) <= |x| < 10**kk
    if exp >= 0 and kk <= 16:
        return f"{sign}{digits}{'0' * exp}.0"
    if 0 < kk <= 16:
        return f"{sign}{digits[:kk]}.{digits[kk:]}"
    if -5 < kk <= 0:
        return f"{sign}0.{'0' * -kk}{digits}"
    mantissa = digits if len(digits) == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{sign}{mantissa}e{kk - 1}"


def _serde_int(token: str) -> int | float:
    # serde_json reads "-0" as the float -0.0, so it is no valid step, epoch or version.
    return -0.0 if token == "-0" else int(token)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float range
        return False


def _check(state: TrainingState, error: type[Exception], source: str) -> None:
    def fail(problem: str) -> NoReturn:
        raise error(f"{source}: {problem}")

    if not is_uint(state.step, _U64):
        fail(f"step must be an integer in [0, 2**64), got {state.step!r}")
    if not is_uint(state.epoch, _U64):
        fail(f"epoch must be an integer in [0, 2**64), got {state.epoch!r}")
    if not is_uint(state.version, _U32):
        fail(f"version must be an integer in [0, 2**32), got {state.version!r}")
    lr = state.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not _finite(lr):
        fail(f"learning_rate must be a finite number, got {lr!r}")
    meta = state.metadata
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        fail("metadata must map strings to strings")
    try:  # lone surrogates pass the checks above but cannot be written as UTF-8
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        fail(f"metadata holds text UTF-8 cannot encode: {exc}")

"""Sharding types and ``sharding_meta.json``, byte-compatible with boostr's serde encoding."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .. import fsops
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidInputError
from ..limits import MAX_SHARDING_META_BYTES
from ..strict_json import is_uint, load_object
from ..training_state import CHECKPOINT_VERSION

#: The key under which arrayckpt records what boostr's meta leaves out; serde ignores it.
EXTRA_KEY = "arrayckpt"
_U8 = 2**8
_U64 = 2**64


@dataclass(frozen=True)
class Replicated:
    """Every rank holds the full state; rank 0's copy is the checkpoint's."""


@dataclass(frozen=True)
class ZeroPartitioned:
    """ZeRO-style partitioning: each key lives on the rank that owns it.

    Args:
        stage: the ZeRO stage (1, 2 or 3); recorded, not interpreted.
    """

    stage: int


@dataclass(frozen=True)
class TensorParallel:
    """Tensors named in ``split_dims`` are sliced across ranks along that dimension."""


Strategy = Replicated | ZeroPartitioned | TensorParallel


@dataclass(frozen=True)
class ShardingConfig:
    """How a checkpoint is sharded; every rank passes the same one.

    Args:
        strategy: `Replicated()`, `ZeroPartitioned(stage)` or `TensorParallel()`.
        split_dims: for `TensorParallel`, tensor name -> the dimension it is split along
            (applies to model and optimizer keys alike, as in boostr).

    Examples:
        >>> ShardingConfig(TensorParallel(), {"attn.wq": 0, "mlp.w1": 1}).strategy
        TensorParallel()
    """

    strategy: Strategy
    split_dims: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_strategy(self.strategy, InvalidInputError, "sharding.strategy")
        dims = self.split_dims
        if not isinstance(dims, Mapping) or not all(
            isinstance(k, str) and is_uint(v, _U64) for k, v in dims.items()
        ):
            raise InvalidInputError(
                "sharding.split_dims must map tensor names to non-negative integer dimensions, "
                f"got {dims!r}"
            )
        object.__setattr__(self, "split_dims", dict(dims))


#: The field under `EXTRA_KEY` holding the CRC32C of the rest of the document.
CHECKSUM_FIELD = "crc32c"


def doc_checksum(doc: Mapping[str, Any]) -> str:
    """CRC32C of ``doc`` in a canonical form (sorted keys, no spaces), without the checksum
    field itself: what a reader re-derives from the parsed file, whatever its layout."""
    body = dict(doc)
    extra = body.get(EXTRA_KEY)
    if isinstance(extra, dict):
        extra = {k: v for k, v in extra.items() if k != CHECKSUM_FIELD}
        if extra:
            body[EXTRA_KEY] = extra
        else:
            del body[EXTRA_KEY]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    from ..format import json_checksum  # the safetensors bindings load only when used

    return json_checksum(canonical)


def _check_checksum(doc: Mapping[str, Any], fail: Callable[[str], NoReturn]) -> None:
    """A file arrayckpt wrote records its checksum; boostr's and older ones have none."""
    extra = doc.get(EXTRA_KEY)
    recorded = extra.get(CHECKSUM_FIELD) if isinstance(extra, dict) else None
    if recorded is None:
        return
    if recorded != doc_checksum(doc):
        fail(
            f"its content does not match the CRC32C recorded at commit ({recorded!r}): the "
            "file was changed after the save; restore it from the same save or use another step"
        )


@dataclass(frozen=True)
class ShardingMeta:
    """The content of ``sharding_meta.json``.

    ``ranks`` holds the per-rank manifests a coordinated save gathers (keys, dtypes,
    shapes, checksums, tensor-parallel offsets); ``None`` for caller-coordinated saves and
    boostr's checkpoints, where they are derived from the rank files' headers instead.
    """

    world_size: int
    sharding: ShardingConfig
    version: int = CHECKPOINT_VERSION
    ranks: list[dict[str, Any]] | None = None

    def to_json(self) -> str:
        """serde_json's ``to_string_pretty`` output for boostr's struct, fields in its order.

        ``split_dims`` is sorted (boostr's HashMap order is arbitrary); arrayckpt's own
        facts follow under one extra key that serde ignores.
        """
        doc: dict[str, Any] = {
            "version": self.version,
            "world_size": self.world_size,
            "strategy": strategy_to_json(self.sharding.strategy),
            "split_dims": dict(sorted(self.sharding.split_dims.items())),
        }
        if self.ranks is not None:
            doc[EXTRA_KEY] = {"ranks": self.ranks}
            # recorded at commit, checked on every read; boostr ignores the extra key. A
            # caller-coordinated meta stays byte for byte what boostr writes, so has none.
            doc[EXTRA_KEY][CHECKSUM_FIELD] = doc_checksum(doc)
        text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False)
        size = len(text.encode())
        if size > MAX_SHARDING_META_BYTES:  # what the reader refuses is never committed
            raise InvalidInputError(
                f"sharding_meta.json would be {size} bytes, over the {MAX_SHARDING_META_BYTES} "
                "a load accepts: the per-rank manifests list too many tensors; save fewer, "
                "larger tensors (e.g. flatten parameter groups) or save caller-coordinated "
                "(coordinator=None), which records no manifests"
            )
        return text

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "sharding_meta.json") -> ShardingMeta:
        """Parse strictly; also reads boostr's older per-rank ``shards`` layout.

        Raises:
            CorruptCheckpointError: naming ``source`` and the bad field.
        """

        def fail(problem: str) -> NoReturn:
            raise CorruptCheckpointError(f"{source}: {problem}")

        doc = load_object(text, fail)
        _check_checksum(doc, fail)
        for name in ("version", "world_size"):
            if not is_uint(doc.get(name), _U64):
                fail(f"{name} must be a non-negative integer, got {doc.get(name)!r}")
        if doc["world_size"] < 1:
            fail("world_size must be at least 1")
        body = doc
        if "strategy" not in doc and isinstance(doc.get("shards"), list) and doc["shards"]:
            body = doc["shards"][0]  # boostr before the meta was flattened: one entry per rank
            if not isinstance(body, dict):
                fail("shards[0] must be an object")
        if "strategy" not in body:
            fail("missing required field 'strategy'")
        strategy = strategy_from_json(body["strategy"], fail)
        split_dims = body.get("split_dims", {})
        if not isinstance(split_dims, dict) or not all(
            is_uint(v, _U64) for v in split_dims.values()
        ):
            fail("split_dims must map tensor names to non-negative integers")
        ranks = None
        extra = doc.get(EXTRA_KEY)
        if extra is not None and (not isinstance(extra, dict) or "ranks" in extra):
            ranks = extra.get("ranks") if isinstance(extra, dict) else None
            if not isinstance(ranks, list) or len(ranks) != doc["world_size"]:
                fail(f"{EXTRA_KEY}.ranks must list one manifest per rank")
        return cls(doc["world_size"], ShardingConfig(strategy, split_dims), doc["version"], ranks)

    @classmethod
    def read(cls, path: Path) -> ShardingMeta:
        """Read and parse ``path``.

        Raises:
            CheckpointNotFoundError: no such file (not a distributed checkpoint).
            CorruptCheckpointError: the file is malformed.
        """
        try:
            data = fsops.fs().read_bytes(path, MAX_SHARDING_META_BYTES)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"{path} does not exist: {path.parent} is not a distributed checkpoint "
                "(or its save never committed)"
            ) from exc
        except ValueError as exc:
            raise CorruptCheckpointError(
                f"{path}: {exc} (the limit for sharding_meta.json); the file is not one "
                "arrayckpt wrote: restore it from the same save"
            ) from exc
        return cls.from_json(data, source=str(path))


def strategy_to_json(strategy: Strategy) -> Any:
    """serde's externally tagged encoding: unit variants as strings, struct variants as maps."""
    if isinstance(strategy, ZeroPartitioned):
        return {"ZeroPartitioned": {"stage": strategy.stage}}
    return type(strategy).__name__


def strategy_from_json(value: Any, fail: Any) -> Strategy:
    if value == "Replicated":
        return Replicated()
    if value == "TensorParallel":
        return TensorParallel()
    if isinstance(value, dict) and list(value) == ["ZeroPartitioned"]:
        inner = value["ZeroPartitioned"]
        if isinstance(inner, dict) and list(inner) == ["stage"] and is_uint(inner["stage"], _U8):
            return ZeroPartitioned(inner["stage"])
    fail(
        f'strategy {value!r} is not one of "Replicated", '
        '{"ZeroPartitioned": {"stage": N}}, "TensorParallel"'
    )
    raise AssertionError("unreachable")


def check_strategy(strategy: Any, error: type[Exception], where: str) -> None:
    if isinstance(strategy, ZeroPartitioned):
        if not is_uint(strategy.stage, _U8):
            raise error(f"{where}: ZeroPartitioned stage must be an integer in [0, 255]")
        return
    if not isinstance(strategy, (Replicated, TensorParallel)):
        raise error(
            f"{where} must be Replicated(), ZeroPartitioned(stage) or TensorParallel(), "
            f"not {strategy!r}"
        )

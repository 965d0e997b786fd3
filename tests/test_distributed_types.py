"""sharding_meta.json: byte-exact serde_json output (boostr's to_string_pretty) and parsing."""

from __future__ import annotations

import json

import pytest

import arrayckpt as ac
from arrayckpt.distributed.types import ShardingMeta
from arrayckpt.errors import CorruptCheckpointError, InvalidInputError

# What boostr's serde_json::to_string_pretty(&ShardingMeta{..}) writes (split_dims sorted:
# boostr's HashMap order is arbitrary, and serde reads any order).
VECTORS = [
    (
        ShardingMeta(2, ac.ShardingConfig(ac.Replicated())),
        '{\n  "version": 2,\n  "world_size": 2,\n  "strategy": "Replicated",\n'
        '  "split_dims": {}\n}',
    ),
    (
        ShardingMeta(4, ac.ShardingConfig(ac.ZeroPartitioned(3))),
        '{\n  "version": 2,\n  "world_size": 4,\n  "strategy": {\n    "ZeroPartitioned": {\n'
        '      "stage": 3\n    }\n  },\n  "split_dims": {}\n}',
    ),
    (
        ShardingMeta(2, ac.ShardingConfig(ac.TensorParallel(), {"mlp.w1": 1, "attn.wq": 0})),
        '{\n  "version": 2,\n  "world_size": 2,\n  "strategy": "TensorParallel",\n'
        '  "split_dims": {\n    "attn.wq": 0,\n    "mlp.w1": 1\n  }\n}',
    ),
    (  # serde writes non-ASCII raw and control characters as lower-case \u escapes
        ShardingMeta(1, ac.ShardingConfig(ac.TensorParallel(), {'é\x01"': 2})),
        '{\n  "version": 2,\n  "world_size": 1,\n  "strategy": "TensorParallel",\n'
        '  "split_dims": {\n    "é\\u0001\\"": 2\n  }\n}',
    ),
]


@pytest.mark.parametrize(("meta", "text"), VECTORS)
def test_meta_json_is_byte_compatible_with_serde_pretty(meta: ShardingMeta, text: str) -> None:
    assert meta.to_json() == text
    assert ShardingMeta.from_json(text) == meta


def test_extra_facts_follow_boostr_fields_under_one_key() -> None:
    ranks = [{"rank": 0, "model": {}}]
    meta = ShardingMeta(1, ac.ShardingConfig(ac.Replicated()), ranks=ranks)
    doc = json.loads(meta.to_json())
    assert list(doc) == ["version", "world_size", "strategy", "split_dims", "arrayckpt"]
    assert ShardingMeta.from_json(meta.to_json()).ranks == ranks


def test_reads_boostr_meta_with_unknown_fields_and_defaults() -> None:
    text = '{"version": 2, "world_size": 3, "strategy": "Replicated", "future": [1]}'
    meta = ShardingMeta.from_json(text)
    assert meta.world_size == 3 and meta.sharding.split_dims == {}


def test_reads_boostr_older_per_rank_shards_layout() -> None:
    shard = {
        "world_size": 2,
        "rank": 0,
        "owned_params": [],
        "strategy": "TensorParallel",
        "split_dims": {"w": 1},
    }
    text = json.dumps({"version": 2, "world_size": 2, "shards": [shard, dict(shard, rank=1)]})
    meta = ShardingMeta.from_json(text)
    assert meta.sharding == ac.ShardingConfig(ac.TensorParallel(), {"w": 1})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "JSON object"),
        ('{"version": 2, "world_size": 0, "strategy": "Replicated"}', "at least 1"),
        ('{"version": 2, "world_size": -1, "strategy": "Replicated"}', "world_size"),
        ('{"version": 2, "world_size": 2}', "strategy"),
        ('{"version": 2, "world_size": 2, "strategy": "Sharded"}', "strategy"),
        (
            '{"version": 2, "world_size": 2, "strategy": {"ZeroPartitioned": {"stage": 300}}}',
            "strategy",
        ),
        (
            '{"version": 2, "world_size": 2, "strategy": "Replicated", "split_dims": {"w": -1}}',
            "split_dims",
        ),
        ('{"version": 2, "world_size": 2, "world_size": 3, "strategy": "Replicated"}', "duplicate"),
        (
            '{"version": 2, "world_size": 2, "strategy": "Replicated", "arrayckpt": {"ranks": []}}',
            "one manifest per rank",
        ),
    ],
)
def test_malformed_meta_is_a_corrupt_checkpoint(text: str, problem: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=problem):
        ShardingMeta.from_json(text, source="x/sharding_meta.json")


@pytest.mark.parametrize(
    "bad",
    [
        lambda: ac.ShardingConfig("Replicated"),  # type: ignore[arg-type]
        lambda: ac.ShardingConfig(ac.ZeroPartitioned(256)),
        lambda: ac.ShardingConfig(ac.TensorParallel(), {"w": -1}),
        lambda: ac.ShardingConfig(ac.TensorParallel(), {"w": True}),
    ],
)
def test_sharding_config_rejects_bad_values(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        bad()  # type: ignore[operator]

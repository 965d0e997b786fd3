"""The one table of limits: the largest things arrayckpt writes or reads (checked at both)."""

from __future__ import annotations

#: Largest sharding_meta.json written or read. Python's json parser holds about 25 times
#: the text in objects, so this bounds a load to a few hundred MiB; per-rank manifests take
#: about 150 bytes per tensor per rank (some 100k entries, e.g. 800 tensors on 128 ranks).
MAX_SHARDING_META_BYTES = 16 * 2**20
#: Deepest nesting of saved state or of a nested-state tree read back: well under Python's
#: recursion limit (1000), since walking one level takes a few frames.
MAX_TREE_DEPTH = 100

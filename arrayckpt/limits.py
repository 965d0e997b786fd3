"""The one table of limits: what a save may write and what every reader accepts.

Writers check these before anything is written (`InvalidInputError`) and readers before
anything is allocated (`CorruptCheckpointError`), so whatever a save accepts, a load
accepts. Each limit is far above real checkpoints and keeps a hostile file's cost in
time and memory a small multiple of its size on disk.
"""

from __future__ import annotations

#: Largest safetensors header (the safetensors library's own cap), ``__metadata__`` included.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Most tensors in one safetensors file.
MAX_TENSORS = 1 << 20
#: Most entries in one header's ``__metadata__`` map (arrayckpt writes a handful). Small
#: entries cost ~15x their bytes as Python objects, so their count is bounded on its own.
MAX_METADATA_ENTRIES = 1 << 16
#: Most dimensions of one tensor (NumPy's limit, which every framework here shares or exceeds).
MAX_NDIM = 64
#: Largest ``training_state.json``.
MAX_TRAINING_STATE_BYTES = 16 * 1024 * 1024
#: Largest sharding_meta.json written or read. Python's json parser holds about 25 times
#: the text in objects, so this bounds a load to a few hundred MiB; per-rank manifests take
#: about 150 bytes per tensor per rank (some 100k entries, e.g. 800 tensors on 128 ranks).
MAX_SHARDING_META_BYTES = 16 * 2**20
#: Deepest nesting of saved state or of a nested-state tree read back: well under Python's
#: recursion limit (1000), since walking one level takes a few frames.
MAX_TREE_DEPTH = 100
#: Most grid cells the check that a sharded tensor's saved boxes tile it exactly builds
#: (one counter each; DTensor layouts make about one cell per box). Beyond it, boxes are
#: checked by their element count only.
MAX_TILING_CELLS = 1 << 22

"""The one table of limits: what a save may write and what every reader accepts.

Writers check these before anything is written (`InvalidInputError`) and readers before
anything is allocated (`CorruptCheckpointError`), so whatever a save accepts, a load
accepts. Each limit is far above real checkpoints and keeps a hostile file's cost in
time and memory a small multiple of its size on disk.
"""

from __future__ import annotations

#: Deepest nesting of saved state or of any JSON arrayckpt reads: well under Python's
#: recursion limit (1000), since walking one level takes a few frames.
MAX_TREE_DEPTH = 100

"""Readers of single objects and committed steps by URL: a private local copy to read
(`open_checkpoint`, `load_file`, the CLI), with paths in reports given back as URLs."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import fsops
from ..errors import CheckpointError, CheckpointNotFoundError
from .objects import _describe, open_store
from .url import parse_url

#: Bytes of one object streamed per write.
_CHUNK_BYTES = 8 << 20


@contextlib.contextmanager
def local_file(location: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Download the object at ``location`` into a private temporary file and yield it;
    removed afterwards (a mapping of it stays valid)."""
    import obstore

    url = parse_url(location)
    store = open_store(url, storage_options)
    tmp = Path(tempfile.mkdtemp(prefix="arrayckpt-get-"))
    dest = tmp / (url.prefix.rsplit("/", 1)[-1] or "object")
    try:
        try:
            stream = obstore.get(store, url.prefix).stream(min_chunk_size=_CHUNK_BYTES)
            fsops.fs().write_chunks(dest, (memoryview(chunk) for chunk in stream))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{url}: no such object") from exc
        except OSError:
            raise
        except Exception as exc:
            raise CheckpointError(f"reading {url} failed: {_describe(exc)}") from exc
        yield dest
    finally:
        with contextlib.suppress(OSError):  # a private copy: nothing is lost if it lingers
            fsops.fs().remove_tree(tmp)


def as_urls(doc: Any, local: Path | str, location: str) -> Any:
    """``doc`` (a report of nested dicts and lists) with paths under ``local`` named by
    their URL under ``location`` instead."""
    prefix = str(local)
    if isinstance(doc, str) and doc.startswith(prefix):
        return location + doc[len(prefix) :]
    if isinstance(doc, str) and prefix in doc:  # an error message naming the copy
        return doc.replace(prefix + os.sep, location + "/").replace(prefix, location)
    if isinstance(doc, dict):
        return {k: as_urls(v, local, location) for k, v in doc.items()}
    if isinstance(doc, list):
        return [as_urls(v, local, location) for v in doc]
    return doc

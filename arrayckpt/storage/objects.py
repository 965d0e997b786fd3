"""Checkpoints on an object store through obstore: data objects first, one commit object
last (written only if absent); loads read only the committed objects' bytes they need."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from .. import format, fsops
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InvalidInputError,
)
from ..layout import is_rank_dir_name
from . import transfer
from .transfer import RANGE_BYTES, RANGES_IN_FLIGHT
from .transfer import describe as _describe
from .transfer import upload as _upload
from .url import StorageURL, parse_url

#: The commit object: written last; a step without it does not exist for any reader.
COMMIT_OBJECT = "arrayckpt-commit.json"
COMMIT_VERSION = 1
#: Puts of the commit object, each after obstore's own retries of that request.
COMMIT_ATTEMPTS = 3


#: The process that first opened a store: obstore's client threads do not survive fork.
_opened_in: int | None = None


def check_same_process(url: StorageURL) -> None:
    """Refuse object-store calls in a child forked after a store was opened: every call
    there would hang (obstore's runtime threads stayed in the parent)."""
    if _opened_in is not None and _opened_in != os.getpid():
        raise CheckpointError(
            f"cannot reach {url} from a forked child: the object-store client was started "
            "in the parent and does not survive fork; use the 'spawn' start method or "
            "make the child's first object-store call before any in the parent"
        )


def open_store(url: StorageURL, storage_options: Mapping[str, Any] | None = None) -> Any:
    """An obstore store for ``url``'s bucket; configuration from the environment
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) overridden by ``storage_options``."""
    global _opened_in
    check_same_process(url)
    _opened_in = os.getpid()
    from obstore.store import from_url as _from_url

    from_url: Any = _from_url  # typed per scheme; options are checked by obstore itself
    options = dict(storage_options or {})
    client = dict(options.pop("client_options", {}))
    endpoint = str(options.get("endpoint", options.get("endpoint_url", "")))
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT", ""))
    if endpoint.startswith("http://"):
        client.setdefault("allow_http", True)  # a local server (tests, MinIO, SeaweedFS)
    retry = options.pop(
        "retry_config",
        {"max_retries": 5, "retry_timeout": timedelta(seconds=30)},
    )
    try:
        return from_url(
            f"{url.scheme}://{url.bucket}", client_options=client, retry_config=retry, **options
        )
    except Exception as exc:  # obstore raises its own types; the message names no secret
        raise InvalidInputError(f"cannot open {url}: {_describe(exc)}") from exc


def save_files(
    location: str,
    files: Mapping[str, Iterable[memoryview]],
    storage_options: Mapping[str, Any] | None = None,
    *,
    listed: Mapping[str, Mapping[str, Any]] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> str:
    """Commit ``files`` (name -> its bytes as buffers) as the checkpoint at ``location``.

    Every data object is uploaded first; then the commit object listing each file's size
    and CRC32C is put with ``If-None-Match`` semantics, so two writers of one step cannot
    both commit and a committed step is never replaced. ``listed`` adds objects other
    processes already uploaded (``rank_N/...`` of a distributed save: name -> size, CRC32C).
    ``before_commit`` runs between the two (the manager checks its lease there); its error
    leaves the step uncommitted.

    Raises:
        InvalidInputError: ``location`` already holds a committed checkpoint.
        CheckpointWriteError: an upload failed after obstore's retries; names the URL.
    """
    url = parse_url(location)
    store = open_store(url, storage_options)
    if _committed(store, url):
        raise InvalidInputError(
            f"{url} already holds a committed checkpoint; an object store cannot replace it "
            "atomically: save to a new step, or delete it first"
        )
    listing: dict[str, dict[str, Any]] = {n: dict(e) for n, e in (listed or {}).items()}
    name: str | None = None
    try:
        for name, parts in files.items():
            size, crc = _upload(store, url.key(name), parts)
            listing[name] = {"size": size, "crc32c": f"{crc:08x}"}
        name = None
        if before_commit is not None:
            before_commit()
    except CheckpointError:
        raise
    except Exception as exc:
        raise _uncommitted(url, exc, name) from exc
    # the random save id tells this save's commit from another writer's of equal bytes
    doc = json.dumps(
        {"version": COMMIT_VERSION, "save_id": uuid.uuid4().hex, "files": listing},
        sort_keys=True,
    )
    _commit(store, url, doc)
    return str(url)


def _uncommitted(
    url: StorageURL, exc: BaseException, name: str | None = None
) -> CheckpointWriteError:
    """The error of a save that failed before its commit; ``name``: the object whose
    upload failed (obstore's own message names it by its HTTP address, if at all)."""
    failed = f"uploading {url.child(name)} " if name is not None else ""
    return CheckpointWriteError(
        f"saving {url} failed: {failed}{_describe(exc)}; the previous checkpoints are "
        "intact, this step is left uncommitted (invisible to readers): check that the "
        "store is reachable (endpoint, credentials, retry_config), then save the step again"
    )


def _commit(store: Any, url: StorageURL, doc: str) -> None:
    """Put the commit object ``doc`` only if none exists.

    A put whose answer was lost may have gone through: after any failure the commit object
    is read back, and one carrying this save's id is this save's. Otherwise a failed put
    is tried again (a create of an absent object is safe to repeat).
    """
    import obstore

    for attempt in range(COMMIT_ATTEMPTS):
        try:
            obstore.put(store, url.key(COMMIT_OBJECT), doc.encode(), mode="create")
            return
        except Exception as exc:
            if _own_commit(store, url, doc):
                return
            if type(exc).__name__ == "AlreadyExistsError":
                raise CheckpointWriteError(
                    f"saving {url} failed: another writer committed it first; its checkpoint stands"
                ) from exc
            if attempt == COMMIT_ATTEMPTS - 1 or transfer.permanent(exc):
                raise _uncommitted(url, exc, COMMIT_OBJECT) from exc
            time.sleep(transfer.BACKOFF_S * 2**attempt)


def _own_commit(store: Any, url: StorageURL, doc: str) -> bool:
    """Whether the commit object at ``url`` is ``doc``, this save's own (its save id)."""
    import obstore

    try:
        return bytes(obstore.get(store, url.key(COMMIT_OBJECT)).bytes()) == doc.encode()
    except Exception:
        return False  # unreadable: reported as another writer's


def _committed(store: Any, url: StorageURL) -> bool:
    import obstore

    try:
        obstore.head(store, url.key(COMMIT_OBJECT))
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise CheckpointWriteError(f"cannot reach {url}: {_describe(exc)}") from exc
    return True


def read_commit(store: Any, url: StorageURL, *, ranks: bool = False) -> dict[str, dict[str, Any]]:
    """The files the commit object of ``url`` lists; a step without one does not exist.

    A distributed step also lists ``rank_N/`` files; they are refused unless ``ranks``.
    """
    import obstore

    try:
        raw = bytes(obstore.get(store, url.key(COMMIT_OBJECT)).bytes())
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"no complete checkpoint at {url}: {COMMIT_OBJECT} is missing (never saved, "
            "or a save was interrupted)"
        ) from exc
    except Exception as exc:
        raise CheckpointReadError(f"reading {url} failed: {_describe(exc)}") from exc
    try:
        doc = json.loads(raw)
        files = doc["files"]
        assert isinstance(files, dict)
        for name, entry in files.items():
            if not _listable(name) or not isinstance(entry["size"], int):
                raise ValueError(name)
            int(entry["crc32c"], 16)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise CorruptCheckpointError(f"{url}/{COMMIT_OBJECT} is malformed: {exc!r}") from exc
    if not ranks and any("/" in name for name in files):
        raise InvalidInputError(
            f"{url} is a distributed checkpoint; use load_distributed_checkpoint(url, rank)"
        )
    return files


def _listable(name: str) -> bool:
    """A file of a step (``model.safetensors``) or of one of its ranks
    (``rank_0/model.safetensors``): nothing that could climb out of the step."""
    rank, _, file = name.rpartition("/")
    return file not in ("", ".", "..") and (not rank or is_rank_dir_name(rank))


def _download(store: Any, url: StorageURL, name: str, entry: dict[str, Any], dest: Path) -> None:
    """Fetch one object with parallel ranged reads into ``dest``; check size and CRC32C."""
    import obstore

    size = int(entry["size"])
    starts = list(range(0, size, RANGE_BYTES))

    def fetch(start: int) -> tuple[int, Any]:
        end = min(start + RANGE_BYTES, size)
        return start, obstore.get_range(store, url.key(name), start=start, end=end)

    crc = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with ThreadPoolExecutor(RANGES_IN_FLIGHT, "arrayckpt-get") as pool:
            for start, chunk in pool.map(fetch, starts):  # in order: the CRC runs on
                view = memoryview(chunk)
                crc = format.checksum(view, crc)
                os.pwrite(fd, view, start)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{url}/{name} disappeared while it was read (deleted by retention?)"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"reading {url}/{name} failed: {_describe(exc)}") from exc
    finally:
        os.close(fd)
    if os.path.getsize(dest) != size or f"{crc:08x}" != entry["crc32c"]:
        raise CorruptCheckpointError(
            f"{url}/{name} does not match its commit object (size or CRC32C): it was changed "
            "after the commit; restore another step"
        )


@contextlib.contextmanager
def local_copy(location: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Download the committed checkpoint at ``location`` into a private temporary directory
    (on ``/dev/shm`` when it has room: memory, not disk) and yield it; removed afterwards.

    Files are fetched with parallel ranged reads and checked against the commit object.
    """
    url = parse_url(location)
    store = open_store(url, storage_options)
    files = read_commit(store, url)
    need = sum(int(e["size"]) for e in files.values())
    base = None
    with contextlib.suppress(OSError):
        shm = os.statvfs("/dev/shm")
        if shm.f_bavail * shm.f_frsize > 2 * need:
            base = "/dev/shm"
    tmp = Path(tempfile.mkdtemp(prefix="arrayckpt-get-", dir=base))
    try:
        with ThreadPoolExecutor(max(1, len(files)), "arrayckpt-file") as pool:
            for f in [pool.submit(_download, store, url, n, e, tmp / n) for n, e in files.items()]:
                f.result()
        yield tmp
    finally:
        with contextlib.suppress(OSError):  # a private copy: nothing is lost if it lingers
            fsops.fs().remove_tree(tmp)


class Step:
    """A committed step on an object store, its commit object read (`open_step`)."""

    def __init__(self, url: StorageURL, store: Any, files: dict[str, dict[str, Any]]) -> None:
        self.url, self.store, self.files = url, store, files

    def fetch(
        self,
        safetensors: Mapping[str, Iterable[str] | None],
        whole: Mapping[str, int],
        *,
        verify: bool,
    ) -> tuple[dict[str, format.SafetensorsReader], dict[str, bytes]]:
        """Read committed files: ``safetensors`` (name -> the tensors to read, ``None`` for
        all) with parallel ranged reads straight into the buffers their arrays view, each
        tensor checksummed as its bytes arrive (``verify``); ``whole`` (name -> the most
        bytes it may hold) in full, checked against the commit object's CRC32C.

        One ranged get reads each file's header (all of a small file); then every range of
        every file shares `transfer.RANGES_IN_FLIGHT` reads at once.

        Raises:
            CheckpointNotFoundError: the commit object lists no such file, or it vanished.
            CorruptCheckpointError: a file differs from what its commit object lists.
            CheckpointReadError: the store failed (after retries); names the URL.
        """
        names = [*safetensors, *whole]
        for name in names:
            if name not in self.files:
                raise CheckpointNotFoundError(
                    f"no complete checkpoint at {self.url}: its {COMMIT_OBJECT} lists no {name}"
                )
        for name, most in whole.items():
            if int(self.files[name]["size"]) > most:
                raise CorruptCheckpointError(
                    f"{self.url.child(name)}: {COMMIT_OBJECT} lists {self.files[name]['size']} "
                    f"bytes, over the {most}-byte limit of such a file"
                )
        fetch = transfer.Fetch(self.store, self.url)

        def first_get(name: str) -> Any:
            return fetch.open(name, int(self.files[name]["size"]), safetensors=name in safetensors)

        with ThreadPoolExecutor(len(names), "arrayckpt-head") as pool:
            objs = dict(zip(names, pool.map(first_get, names), strict=True))
        for name, keys in safetensors.items():
            fetch.plan(objs[name], keys, verify=verify)
        for name in whole:
            fetch.plan_whole(objs[name])
        fetch.run(objs)
        blobs = {}
        for name in whole:
            data = fetch.whole(objs[name])
            if f"{format.checksum(data):08x}" != self.files[name]["crc32c"]:
                raise CorruptCheckpointError(
                    f"{self.url.child(name)} does not match its commit object (CRC32C): it was "
                    "changed after the commit; restore another step"
                )
            blobs[name] = data
        return {name: fetch.reader(objs[name]) for name in safetensors}, blobs


def open_step(location: str, storage_options: Mapping[str, Any] | None = None) -> Step:
    """The committed step at ``location``; a step without a commit object does not exist.

    Raises:
        CheckpointNotFoundError: no commit object (never saved, or the save was interrupted).
    """
    url = parse_url(location)
    store = open_store(url, storage_options)
    return Step(url, store, read_commit(store, url))

"""The one grammar of storage URLs (``s3://``, ``gs://``, ``az://``, ``file://``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import InvalidInputError

#: Object-store schemes; ``file://`` maps to a local path instead.
OBJECT_SCHEMES = frozenset({"s3", "gs", "az"})


@dataclass(frozen=True)
class StorageURL:
    """A parsed object-store location: ``scheme://bucket/prefix`` (prefix without slashes
    at either end)."""

    scheme: str
    bucket: str
    prefix: str

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, name: str) -> StorageURL:
        return StorageURL(self.scheme, self.bucket, self.key(name))

    def __str__(self) -> str:
        # rebuilt from parts only, so credentials a user put into the URL never show up
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def is_url(location: Any) -> bool:
    """Whether ``location`` names an object store (``file://`` URLs are local paths)."""
    return isinstance(location, str) and urlsplit(location).scheme in OBJECT_SCHEMES


def local_path(location: Any) -> Any:
    """``file:///a/b`` as ``/a/b``; anything else unchanged."""
    if isinstance(location, str) and location.startswith("file://"):
        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInputError(
                f"{location}: file:// URLs name this machine; use file:///absolute/path"
            )
        return parts.path
    return location


def parse_url(location: str) -> StorageURL:
    """Split an object-store URL; refuse one without a bucket or with credentials in it."""
    parts = urlsplit(location)
    if parts.scheme not in OBJECT_SCHEMES:
        raise InvalidInputError(f"{location!r} is not an s3://, gs:// or az:// URL")
    if "@" in parts.netloc:
        shown = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, "", ""))
        raise InvalidInputError(
            f"{shown}: credentials in the URL are refused (they would end up in logs); "
            "set them in the environment or in storage_options="
        )
    if not parts.netloc:
        raise InvalidInputError(f"{location!r} has no bucket; write {parts.scheme}://bucket/path")
    prefix = parts.path.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise InvalidInputError(f"{location!r}: empty, '.' or '..' path parts are refused")
    return StorageURL(parts.scheme, parts.netloc, prefix)


def environment_options(scheme: str) -> dict[str, str]:
    """Options the store reads from the usual environment (``AWS_*``, ``GOOGLE_*``,
    ``AZURE_*``), so that a run needs nothing but those variables."""
    prefix = {"s3": "AWS_", "gs": "GOOGLE_", "az": "AZURE_"}[scheme]
    return {k[len(prefix) :].lower(): v for k, v in os.environ.items() if k.startswith(prefix)}

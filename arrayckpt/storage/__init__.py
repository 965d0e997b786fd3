"""Where checkpoints live: local paths (rename commit, see `commit`) or object-store URLs
(data objects first, one commit object last, see `objects`)."""

from .url import is_url, local_path, parse_url

__all__ = ["is_url", "local_path", "parse_url"]

"""`ClosesOnExit`: the context-manager behaviour shared by checkpointers and the manager."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TypeVar

log = logging.getLogger("arrayckpt")

_Self = TypeVar("_Self", bound="ClosesOnExit")


class ClosesOnExit:
    """``with obj:`` calls ``obj.close()`` on exit, which waits for (and raises) a failed
    write; while another exception is already propagating, that failure is logged instead
    of hiding it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the exception already propagating matters more
            log.exception("checkpoint write failed while unwinding another error")

"""File systems that hold, fail or record the writer's work, for the async tests."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arrayckpt import fsops


class GatedFS(fsops.FileSystem):
    """Holds every safetensors write until `open_gate` (so a write stays in flight)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.pointers: list[dict[str, int]] = []
        self.names: list[str] = []  # the file each of `pointers` went to

    def open_gate(self) -> None:
        self.gate.set()

    def write_safetensors(
        self, path: Path, specs: Mapping[str, Any], metadata: Mapping[str, str], **kw: Any
    ) -> None:
        self.writing.set()
        if not self.gate.wait(timeout=60):
            raise OSError("test gate never opened")
        self.pointers.append({name: spec.data_ptr for name, spec in specs.items()})
        self.names.append(path.name)
        super().write_safetensors(path, specs, metadata, **kw)


class FailingFS(fsops.FileSystem):
    """Fails every safetensors write, as a full disk would."""

    def __init__(self) -> None:
        self.calls = 0

    def write_safetensors(
        self, path: Path, specs: Mapping[str, Any], metadata: Mapping[str, str], **kw: Any
    ) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device (injected)")


def open_gate_later(fs: GatedFS, seconds: float = 0.3) -> threading.Timer:
    """Open the gate from another thread, so a caller that does not wait sees it closed."""
    timer = threading.Timer(seconds, fs.open_gate)
    timer.start()
    return timer

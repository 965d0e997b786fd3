"""One measurement in a fresh process: ``python bench/measure.py WORKLOAD CASE [options]``.

Prints one JSON object: per-run times (after one untimed warm-up run, except where the
first run is the point), and the extra peak RSS over the process's RSS once the state was
built (VmHWM reset through /proc/self/clear_refs; Linux). With ``--first`` the case times
only its first operation, without a warm-up: the first save of a fresh process (run.py
starts one process per run for that).

Peers that do not fsync (safetensors, torch.save) get an fsync of their files inside the
timed region, so every "total" is durable and comparable; "write" is before the fsync.
Pickle-based peers (torch.save/torch.load) appear here only, never in arrayckpt.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402

import arrayckpt as ac  # noqa: E402


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``), so memory a
    workload's construction freed (JAX state is built from NumPy temporaries) is not
    reused unseen by the measured operation: its extra RSS is then all its own."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parse_size(text: str) -> int:
    """``"256M"``, ``"4G"``, ``"512K"`` or a plain byte count, as the benchmarks' options
    take sizes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def mem_available() -> int:
    """The kernel's MemAvailable in bytes (0 where /proc/meminfo is missing)."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fsync_path(p)
    fsync_path(root)


class Case:
    """Runs a save or load ``runs`` times, recording stall/write/total/load seconds."""

    def __init__(
        self, w: workloads.Workload, out: Path, runs: int, device: str, first: bool = False
    ) -> None:
        self.w, self.out, self.device, self.first = w, out, device, first
        self.runs = 1 if first else runs
        self.times: dict[str, list[float]] = {}
        self.extra_peak_rss: int | None = None

    def record(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def repeat(self, once: Callable[[Path], dict[str, float]], warmup: bool = True) -> None:
        # Peak RSS counts from here: what the timed operation (and its warm-up) adds.
        warmup = warmup and not self.first
        gc.collect()
        trim_heap()
        base = status_bytes("VmRSS")
        peak_ok = reset_peak()
        for r in range(self.runs + (1 if warmup else 0)):
            target = self.out / f"run{r}"
            result = once(target)
            if r or not warmup:
                for key, seconds in result.items():
                    self.record(key, seconds)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            gc.collect()
        self.extra_peak_rss = status_bytes("VmHWM") - base if peak_ok else None


# --- limits -----------------------------------------------------------------------------


def case_memcpy(c: Case) -> None:
    """Warm memcpy of the same tensors into reused buffers, one thread."""
    srcs = c.w.byte_buffers()
    dsts = [np.empty_like(s) for s in srcs]

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        for d, s in zip(dsts, srcs, strict=True):
            np.copyto(d, s)
        return {"stall": time.perf_counter() - t}

    c.repeat(once)


def case_memcpy_cold(c: Case) -> None:
    """The same copy into fresh memory (anonymous mmap, never touched: every page faults
    in during the copy, as a first save's staging does; transparent huge pages as the
    system is set)."""
    import mmap

    srcs = c.w.byte_buffers()

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        maps = [mmap.mmap(-1, max(s.nbytes, 1)) for s in srcs]
        for m, s in zip(maps, srcs, strict=True):
            np.copyto(np.frombuffer(m, np.uint8, s.nbytes), s)
        elapsed = time.perf_counter() - t
        for m in maps:
            m.close()
        return {"stall": elapsed}

    c.repeat(once)


def case_memcpy_threads(c: Case) -> None:
    """The same copy split across all cores (what arrayckpt's snapshot does)."""
    from arrayckpt.hostcopy import run_copies

    srcs = c.w.byte_buffers()
    dsts = [np.empty_like(s) for s in srcs]

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        run_copies(list(zip(dsts, srcs, strict=True)))
        return {"stall": time.perf_counter() - t}

    c.repeat(once)


def case_d2h_pinned(c: Case) -> None:
    """GPU limit: device-to-host copies into reused pinned buffers, one synchronisation."""
    import torch

    tensors = [*c.w.model.values(), *c.w.optimizer.values()]
    dsts = [torch.empty_like(t, device="cpu").pin_memory() for t in tensors]

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        for d, s in zip(dsts, tensors, strict=True):
            d.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        return {"stall": time.perf_counter() - t}

    c.repeat(once)


def case_d2h_cpu(c: Case) -> None:
    """GPU baseline: what a plain snapshot does, ``t.cpu()`` of each tensor (fresh pageable
    memory, one synchronous copy each)."""
    tensors = [*c.w.model.values(), *c.w.optimizer.values()]

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        copies = [s.cpu() for s in tensors]
        elapsed = time.perf_counter() - t
        del copies
        return {"stall": elapsed}

    c.repeat(once)


def _cupy_state(c: Case) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workload as CuPy arrays on the GPU (sharing the torch tensors' memory)."""
    import cupy

    def conv(x: Any) -> Any:
        return cupy.asarray(x)  # torch CUDA tensors through __cuda_array_interface__

    return {k: conv(v) for k, v in c.w.model.items()}, {
        k: conv(v) for k, v in c.w.optimizer.items()
    }


def case_cupy_d2h_pinned(c: Case) -> None:
    """CuPy limit: ``get`` into reused pinned buffers on one stream, one synchronisation."""
    import cupy

    model, optimizer = _cupy_state(c)
    arrays = [*model.values(), *optimizer.values()]
    stream = cupy.cuda.Stream(non_blocking=True)
    dsts = [
        np.frombuffer(cupy.cuda.alloc_pinned_memory(max(a.nbytes, 1)), a.dtype, a.size).reshape(
            a.shape
        )
        for a in arrays
    ]

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        for d, a in zip(dsts, arrays, strict=True):
            a.get(stream=stream, out=d, blocking=False)
        stream.synchronize()
        return {"stall": time.perf_counter() - t}

    c.repeat(once)


def case_cupy_asnumpy(c: Case) -> None:
    """CuPy baseline: ``cupy.asnumpy`` of each array (fresh pageable memory)."""
    import cupy

    model, optimizer = _cupy_state(c)
    arrays = [*model.values(), *optimizer.values()]

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        copies = [cupy.asnumpy(a) for a in arrays]
        elapsed = time.perf_counter() - t
        del copies
        return {"stall": elapsed}

    c.repeat(once)


def case_cupy_arrayckpt_async(c: Case) -> None:
    """arrayckpt's async save of the same state as CuPy arrays."""
    model, optimizer = _cupy_state(c)
    ckpt = ac.AsyncCheckpointer()

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        future = ckpt.save(target, model, optimizer or None, ac.TrainingState(step=1))
        returned = time.perf_counter()
        future.result()
        return {"stall": returned - t, "total": time.perf_counter() - t}

    c.repeat(once)
    ckpt.close()


def case_raw_write(c: Case) -> None:
    """Sequential write of the same bytes to one file, then fsync."""
    srcs = c.w.byte_buffers()

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        with open(target, "wb") as f:
            for s in srcs:
                f.write(s.data)
            f.flush()
            written = time.perf_counter()
            os.fsync(f.fileno())
        return {"write": written - t, "total": time.perf_counter() - t}

    c.repeat(once)


def case_raw_write_overlapped(c: Case) -> None:
    """As `case_raw_write`, with the disk started on each 32 MiB as soon as it is written
    (``sync_file_range``): writing to memory and to disk overlap, the limit the disk sets."""
    from arrayckpt import writeback

    srcs = c.w.byte_buffers()
    step = 32 << 20

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        with open(target, "wb", buffering=0) as f:
            flushed = at = 0
            for s in srcs:
                f.write(s.data)
                at += s.nbytes
                if at - flushed >= step and writeback.sync_file_range is not None:
                    writeback.sync_file_range(
                        f.fileno(), flushed, at - flushed, writeback.SYNC_FILE_RANGE_WRITE
                    )
                    flushed = at
            written = time.perf_counter()
            os.fsync(f.fileno())
        return {"write": written - t, "total": time.perf_counter() - t}

    c.repeat(once)


def raw_direct_write(target: Path, nbytes: int) -> float:
    """Write ``nbytes`` with ``O_DIRECT`` in 8 MiB requests from one page-aligned buffer
    (again and again: the state's own arrays are not page-aligned), then fsync: what the
    disk takes without the page cache, which `arrayckpt.direct`'s writes approach.
    Returns the seconds until the fsync began."""
    from arrayckpt import direct

    request = direct.aligned_empty(direct.REQUEST_BYTES)
    request[:] = 1
    t = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if not direct.enable(fd):
            raise SystemExit(f"{target}: this file system has no O_DIRECT")
        blocks = -(-nbytes // direct.BLOCK) * direct.BLOCK  # the tail padded to a block
        for at in range(0, blocks, direct.REQUEST_BYTES):
            os.pwrite(fd, request[: min(direct.REQUEST_BYTES, blocks - at)], at)
        os.ftruncate(fd, nbytes)
        written = time.perf_counter() - t
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def case_raw_write_direct(c: Case) -> None:
    """The same number of bytes as `raw_direct_write`, then fsync."""
    nbytes = sum(s.nbytes for s in c.w.byte_buffers())

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        written = raw_direct_write(target, nbytes)
        return {"write": written, "total": time.perf_counter() - t}

    c.repeat(once)


# --- arrayckpt --------------------------------------------------------------------------


def _arrayckpt_async(c: Case, *, prepare: bool = False, background: bool = False) -> None:
    ckpt = ac.AsyncCheckpointer()
    opt = c.w.optimizer or None
    if prepare:  # before the peak-RSS baseline: what the save itself adds is measured
        ckpt.prepare(c.w.model, opt).result()

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        future = ckpt.save(
            target, c.w.model, opt, ac.TrainingState(step=1), background_staging=background
        )
        returned = time.perf_counter()
        times = {"stall": returned - t}
        if background:  # the caller may change its arrays from here on
            future.staged.result()
            times["staged"] = time.perf_counter() - t
        future.result()
        return {**times, "total": time.perf_counter() - t}

    c.repeat(once)
    ckpt.close()


def case_arrayckpt_async(c: Case) -> None:
    _arrayckpt_async(c)


def case_arrayckpt_prepared(c: Case) -> None:
    """As `case_arrayckpt_async` after ``prepare(state)`` (run with --first: the first save
    of a process whose staging was warmed before it)."""
    _arrayckpt_async(c, prepare=True)


def case_arrayckpt_async_bg(c: Case) -> None:
    """``save(..., background_staging=True)``: "staged" is when the arrays may change."""
    _arrayckpt_async(c, background=True)


def case_arrayckpt_sync(c: Case) -> None:
    opt = c.w.optimizer or None

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        ac.save_checkpoint(target, c.w.model, opt, ac.TrainingState(step=1))
        return {"total": time.perf_counter() - t}

    c.repeat(once)


def case_arrayckpt_load(c: Case, *, mmap: bool = True) -> None:
    src = c.out / "src"
    ac.save_checkpoint(src, c.w.model, c.w.optimizer or None, ac.TrainingState(step=1))
    # torch tensors back as torch; JAX state as new jax.Arrays in its pytree (the live
    # state as the template), as Orbax's restore gives them
    kwargs: dict[str, Any] = {"xp": "torch"} if c.w.framework == "torch" else {}
    if c.w.framework == "jax":
        kwargs = {"into": c.w.model, "optimizer_into": c.w.optimizer}

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        got = ac.load_checkpoint(src, mmap=mmap, **kwargs)  # verifies every CRC: reads all
        elapsed = time.perf_counter() - t
        del got
        return {"load": elapsed}

    c.repeat(once)


def case_arrayckpt_load_eager(c: Case) -> None:
    case_arrayckpt_load(c, mmap=False)


def case_np_fromfile(c: Case) -> None:
    src = c.out / "src.raw"
    with open(src, "wb") as f:
        for s in c.w.byte_buffers():
            f.write(s.data)

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        arr = np.fromfile(src, dtype=np.uint8)
        elapsed = time.perf_counter() - t
        del arr
        return {"load": elapsed}

    c.repeat(once)


# --- peers ------------------------------------------------------------------------------


def _st_save(c: Case, module: str) -> Callable[[Path], dict[str, float]]:
    if module == "numpy":
        from safetensors.numpy import save_file

        model, optimizer = c.w.as_numpy()
    else:
        from safetensors.torch import save_file

        model, optimizer = c.w.as_torch()

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        target.mkdir()
        files = [target / "model.safetensors"]
        save_file(model, str(files[0]))
        if optimizer:
            files.append(target / "optimizer.safetensors")
            save_file(optimizer, str(files[1]))
        written = time.perf_counter()
        for f in files:
            fsync_path(f)
        return {"write": written - t, "total": time.perf_counter() - t}

    return once


def case_st_numpy(c: Case) -> None:
    c.repeat(_st_save(c, "numpy"))


def case_st_torch(c: Case) -> None:
    c.repeat(_st_save(c, "torch"))


def case_st_load(c: Case) -> None:
    src = c.out / "src"
    _st_save(c, "torch" if c.w.framework == "torch" else "numpy")(src)
    if c.w.framework == "torch":
        from safetensors.torch import load_file
    else:
        from safetensors.numpy import load_file

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        got = [load_file(str(f)) for f in sorted(src.glob("*.safetensors"))]
        elapsed = time.perf_counter() - t
        del got
        return {"load": elapsed}

    c.repeat(once)


def case_header_parse(c: Case) -> None:
    """The model file's header parsed cold (layout cache emptied), as a fresh process's
    first load parses it: issue 15's per-tensor parse target."""
    from arrayckpt import format as fmt
    from arrayckpt.layout import MODEL_FILE

    src = c.out / "src"
    ac.save_checkpoint(src, c.w.model)

    def once(_: Path) -> dict[str, float]:
        fmt.forget_parsed_layouts()
        t = time.perf_counter()
        header = fmt.read_header(src / MODEL_FILE)
        elapsed = time.perf_counter() - t
        del header
        return {"load": elapsed}

    c.repeat(once)


def _torch_state(c: Case) -> dict[str, Any]:
    model, optimizer = c.w.as_torch()
    return {"model": model, "optimizer": optimizer} if optimizer else {"model": model}


def case_torch_save(c: Case) -> None:
    import torch

    state = _torch_state(c)

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        torch.save(state, target)
        written = time.perf_counter()
        fsync_path(target)
        return {"write": written - t, "total": time.perf_counter() - t}

    c.repeat(once)


def case_torch_load(c: Case) -> None:
    import torch

    src = c.out / "src.pt"
    torch.save(_torch_state(c), src)

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        got = torch.load(src, mmap=True, weights_only=True)  # lazy: pages read on use
        elapsed = time.perf_counter() - t
        del got
        return {"load": elapsed}

    c.repeat(once)


def _dcp() -> Any:
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch.distributed.checkpoint as dcp

    return dcp


def case_dcp_save(c: Case) -> None:
    dcp = _dcp()
    state = _torch_state(c)

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        dcp.save(state, checkpoint_id=str(target))  # fsyncs its files (sync_files=True)
        return {"total": time.perf_counter() - t}

    c.repeat(once)


def case_dcp_async(c: Case) -> None:
    dcp = _dcp()
    state = _torch_state(c)

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(target))
        returned = time.perf_counter()
        future.result()
        return {"stall": returned - t, "total": time.perf_counter() - t}

    c.repeat(once)


def case_dcp_async_stager(c: Case) -> None:
    """DCP async_save with one `DefaultStager` kept across saves, on its `StagingOptions`
    defaults (shared memory, staging on a background thread; on a GPU also pinned memory
    and non-blocking copies, which need one). "stall" is until async_save returns,
    "staged" until its staging_completion (the arrays may change from there)."""
    dcp = _dcp()
    import torch
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    state = _torch_state(c)
    gpu = torch.accelerator.is_available()
    stager = DefaultStager(
        StagingOptions(use_pinned_memory=gpu, use_non_blocking_copy=gpu)  # the rest default
    )

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        response = dcp.async_save(state, checkpoint_id=str(target), async_stager=stager)
        returned = time.perf_counter()
        response.staging_completion.result()
        staged = time.perf_counter()
        response.upload_completion.result()
        return {"stall": returned - t, "staged": staged - t, "total": time.perf_counter() - t}

    c.repeat(once)
    stager.close()


def case_dcp_async_pinned(c: Case) -> None:
    """DCP async_save with its stager told to use reused pinned memory and non-blocking
    copies (its defaults use neither); GPU only."""
    dcp = _dcp()
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    state = _torch_state(c)
    stager = DefaultStager(
        StagingOptions(
            use_pinned_memory=True,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=True,
        )
    )

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(target), async_stager=stager)
        returned = time.perf_counter()
        future.result()
        return {"stall": returned - t, "total": time.perf_counter() - t}

    c.repeat(once)
    stager.close()


def _orbax() -> Any:
    import orbax.checkpoint as ocp

    return ocp


def _orbax_state(c: Case) -> dict[str, Any]:
    return {"model": c.w.model, "optimizer": c.w.optimizer} if c.w.optimizer else c.w.model


def _orbax_save(c: Case, checkpointer: Any) -> None:
    state = _orbax_state(c)
    is_async = hasattr(checkpointer, "wait_until_finished")

    def once(target: Path) -> dict[str, float]:
        t = time.perf_counter()
        checkpointer.save(target, state)
        times = {"stall": time.perf_counter() - t} if is_async else {}
        if is_async:
            checkpointer.wait_until_finished()
        times["write"] = time.perf_counter() - t
        fsync_tree(target)  # its file kvstore syncs already; this makes sure, as for all
        return {**times, "total": time.perf_counter() - t}

    c.repeat(once)
    checkpointer.close()


def case_orbax_async(c: Case) -> None:
    """Orbax's `StandardCheckpointer` (async: save returns once the arrays are staged)."""
    _orbax_save(c, _orbax().StandardCheckpointer())


def case_orbax_sync(c: Case) -> None:
    """Orbax's synchronous `Checkpointer` with the same `StandardCheckpointHandler`."""
    ocp = _orbax()
    _orbax_save(c, ocp.Checkpointer(ocp.StandardCheckpointHandler()))


def case_orbax_load(c: Case) -> None:
    """`StandardCheckpointer.restore` with the state as its target (new arrays of that
    structure; JAX state comes back as jax.Arrays). Orbax keeps no checksums to verify."""
    ocp = _orbax()
    state = _orbax_state(c)
    src = c.out / "src"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(src, state)
    checkpointer.wait_until_finished()

    def once(_: Path) -> dict[str, float]:
        t = time.perf_counter()
        got = checkpointer.restore(src, state)
        elapsed = time.perf_counter() - t
        del got
        return {"load": elapsed}

    c.repeat(once)
    checkpointer.close()


CASES: dict[str, Callable[[Case], None]] = {
    name.removeprefix("case_"): fn
    for name, fn in globals().items()
    if name.startswith("case_") and callable(fn)
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--first", action="store_true", help="time only the first operation")
    args = ap.parse_args()
    if args.case.startswith(("torch", "dcp", "st_torch")) or args.device != "cpu":
        import torch  # imported before the baseline, so its own memory is not counted

        torch.set_num_threads(os.cpu_count() or 1)
    w = workloads.build(args.workload, quick=args.quick, device=args.device)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    case = Case(w, out, args.runs, args.device, first=args.first)
    CASES[args.case](case)
    print(
        json.dumps(
            {
                "workload": args.workload,
                "case": args.case,
                "device": args.device,
                "nbytes": w.nbytes,
                "tensors": w.tensors,
                "times": case.times,
                "extra_peak_rss": case.extra_peak_rss,
            }
        )
    )


if __name__ == "__main__":
    main()

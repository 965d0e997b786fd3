"""Child process for the object-store manager kill tests: resumes a run under the URL in
argv[1] (async or sync saves per argv[2]), checks what it restored, trains and saves until
killed. Prints ``resumed <step>`` and ``committed <step>`` lines; settings from the
environment only."""

import sys

import numpy as np

import arrayckpt as ac

N = 1 << 20  # 4 MiB of model, 8 MiB of optimizer: long enough to be killed mid-save


def state(step: int) -> tuple[dict, dict]:
    return {"w": np.full(N, step, np.float32)}, {"m": np.full(2 * N, -step, np.float32)}


url, mode = sys.argv[1], sys.argv[2]
mgr = ac.CheckpointManager(url, keep_last=3, async_save=mode == "async")
ckpt = mgr.restore()
start = 0 if ckpt is None else ckpt.training_state.step
if ckpt is not None:
    model, opt = state(start)
    if not (
        np.array_equal(ckpt.model["w"], model["w"])
        and np.array_equal(ckpt.optimizer["m"], opt["m"])
    ):
        print(f"mixed {start}", flush=True)
        sys.exit(3)
print(f"resumed {start}", flush=True)
for step in range(start + 1, start + 10_000):
    future = mgr.save(step, *state(step))
    future.add_done_callback(
        lambda f, s=step: print(f"committed {s}", flush=True) if f.exception() is None else None
    )

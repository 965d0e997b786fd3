"""Child process for the kill -9 test: saves a large checkpoint to the URL in argv[1]
(server settings from the environment only) and prints when it starts."""

import sys

import numpy as np

import arrayckpt as ac

model = {"w": np.ones(16 << 20, np.float32)}  # 64 MiB
optimizer = {"m": np.full(64 << 20, 2.0, np.float32)}  # 256 MiB: long enough to be killed in
print("saving", flush=True)
ac.save_checkpoint(sys.argv[1], model, optimizer, ac.TrainingState(step=2))
print("saved", flush=True)

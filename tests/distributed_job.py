"""One rank of a LoRA job under `mlx.launch` (tests/test_distributed.py starts it).

    mlx.launch -n 2 --backend ring -- python tests/distributed_job.py WORKDIR CONFIG.json [KILL_RANK KILL_STEP]

Each rank works in WORKDIR/rank<R> with the config's relative out_dir, as if on its own machine
(no shared filesystem), so whatever a rank other than 0 writes would show there. KILL_RANK
SIGKILLs itself when it logs step KILL_STEP.
"""

import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx

from lfm_mlx import lora

rank = mx.distributed.init().rank()
workdir, values = Path(sys.argv[1]) / f"rank{rank}", json.loads(Path(sys.argv[2]).read_text())
kill = tuple(int(a) for a in sys.argv[3:5]) or None
workdir.mkdir(parents=True, exist_ok=True)
os.chdir(workdir)


def on_step(row: dict) -> None:
    if kill and rank == kill[0] and row.get("step") == kill[1] and "train_loss" in row:
        os.kill(os.getpid(), signal.SIGKILL)


summary = lora.train_lora(lora.config_from_dict(values), on_step=on_step)
print(f"rank {rank} summary {json.dumps(summary)}", flush=True)

"""One rank of a LoRA or grouped training job under `mlx.launch` (tests/test_distributed.py starts it).

    mlx.launch -n 2 --backend ring -- python tests/distributed_job.py WORKDIR CONFIG.json [kill=R:STEP] [stop=R:READS]

CONFIG.json holds LoraConfig keys, or TrainConfig keys (it has `run_dir`) for the grouped trainer.
Each rank works in WORKDIR/rank<R> with the config's relative out_dir / run_dir, as if on its own
machine (no shared filesystem), so whatever a rank other than 0 writes would show there.
kill=R:STEP: rank R SIGKILLs itself when it logs LoRA step STEP, or (grouped) at its memory reading
of step STEP (after that step's update, before its log and checkpoint). stop=R:READS: rank R's memory
reader reports 1 PB after READS readings (the grouped trainer's watchdog then hard-stops that rank).
"""

import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx

rank = mx.distributed.init().rank()
workdir, values = Path(sys.argv[1]) / f"rank{rank}", json.loads(Path(sys.argv[2]).read_text())
options = {k: tuple(map(int, v.split(":"))) for k, v in (a.split("=") for a in sys.argv[3:])}
workdir.mkdir(parents=True, exist_ok=True)
os.chdir(workdir)

if "run_dir" in values:
    from lfm_mlx.grouped import GroupedMoETrainer, TrainConfig
    from lfm_mlx.memory import MemoryReading, read_memory

    reads = [0]

    def reader() -> MemoryReading:
        reads[0] += 1
        if "kill" in options and options["kill"] == (rank, reads[0]):  # one reading per step (sample_every 1)
            os.kill(os.getpid(), signal.SIGKILL)
        if "stop" in options and rank == options["stop"][0] and reads[0] > options["stop"][1]:
            return MemoryReading(active=10**15, peak=10**15, cache=0, rss=10**15)
        return read_memory()

    result = GroupedMoETrainer(TrainConfig(**values), memory_reader=reader).train()
    print(f"rank {rank} trained {result.steps} steps", flush=True)
else:
    from lfm_mlx import lora

    def on_step(row: dict) -> None:
        if "kill" in options and rank == options["kill"][0] and row.get("step") == options["kill"][1] \
                and "train_loss" in row:
            os.kill(os.getpid(), signal.SIGKILL)

    summary = lora.train_lora(lora.config_from_dict(values), on_step=on_step)
    print(f"rank {rank} summary {json.dumps(summary)}", flush=True)

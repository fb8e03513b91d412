"""FSDP driver for tests/test_fsdp.py (run under ``torchrun``, not collected by pytest).

    torchrun --nproc_per_node 2 --standalone tests/fsdp_driver.py WORKDIR FLAGS_JSON

Two runs in one launch (one process-group start-up instead of two): ``straight`` trains the flags' steps
under ``--fsdp`` into ``WORKDIR/straight`` (sharded checkpoints every ``save_steps``), then ``resumed`` starts
a fresh folder from the straight run's first sharded checkpoint and trains to the same step. Rank 0
writes ``WORKDIR/results.json``: ``{"straight": TrainResult, "resumed": TrainResult}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(workdir: str, flags_json: str) -> None:
    from saicl.meta_train.train import TrainConfig, close_distributed, train

    flags = json.loads(flags_json)
    work = Path(workdir)
    straight = train(TrainConfig(**flags, output_dir=str(work / "straight")))
    first = work / "straight" / f"checkpoint-{flags['save_steps']}"
    resumed = train(TrainConfig(**flags, output_dir=str(work / "resumed"), resume=str(first)))
    if int(os.environ.get("RANK", "0")) == 0:
        results = {"straight": straight.to_dict(), "resumed": resumed.to_dict()}
        (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])

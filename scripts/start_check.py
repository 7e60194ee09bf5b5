"""Start check: how soon a run starts from a cold worker process and from the app's standby worker.

    .venv/bin/python scripts/start_check.py             # 3 rounds, each cold then standby

Each round submits the same short LoRA sentiment run (bundled MiniLM, offline) to a job manager
without and with a standby worker (given 20 s to import while nothing trains, as between two runs
in the app), and times the request until its run exists (the Train tab's "loading" ends there)
and the run's own load_time_s. Prints one JSON line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.core.config import TrainConfig  # noqa: E402
from training.core.runs import RunStore  # noqa: E402
from training.jobs import JobManager  # noqa: E402

IDLE_S = 20.0  # time the standby worker has before the request: its imports take about 8 s here


def one_run(standby: bool, seed: int) -> dict:
    store = RunStore(Path(tempfile.mkdtemp(prefix="lora-arena-start-")))
    manager = JobManager(store, standby=standby)
    try:
        spare_rss = None
        if standby:
            time.sleep(IDLE_S)
            spare_rss = psutil.Process(manager.spare.process.pid).memory_info().rss
        config = TrainConfig(task="sentiment", method="lora", max_steps=5, eval_samples=32, offline=True, seed=seed)
        requested = time.perf_counter()
        job = manager.submit(config)
        while job.state in ("queued", "starting"):
            time.sleep(0.05)
        until_running = time.perf_counter() - requested
        while job.state == "running":
            time.sleep(0.2)
        summary = store.get(job.id).summary
    finally:
        manager.close()
    if job.state != "finished":
        raise SystemExit(f"the run {job.id} ended {job.state}: {job.error}")
    return {
        "worker": "standby" if standby else "cold",
        "until_running_s": round(until_running, 2),
        "load_time_s": round(summary["load_time_s"], 2),
        "standby_rss_mb": spare_rss and round(spare_rss / 2**20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = []
    for seed in range(args.rounds):
        for standby in (False, True):
            results.append(one_run(standby, seed))
            print(json.dumps(results[-1]), flush=True)
    medians = {
        worker: {
            key: statistics.median(r[key] for r in results if r["worker"] == worker)
            for key in ("until_running_s", "load_time_s")
        }
        for worker in ("cold", "standby")
    }
    print(json.dumps({"medians": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

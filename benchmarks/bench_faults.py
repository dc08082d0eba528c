"""Issue 28's repeated fault checks, as real processes (the tests run each once):

    python benchmarks/bench_faults.py race [N [SEED]]   # case 1: two configs, one directory, N times, random offsets
    python benchmarks/bench_faults.py kill [N [SEED]]   # case 2: pretrain kill -9 at N random moments, then rerun

race: pretrain steps=6 and steps=8 on name=shared, both past their imports, released together, each after a
random offset in [0, 1.5] s (tests/test_faults.py: race). Counts how often exactly one exits 0 with its own
result and the other exits 2 with one line; any other outcome (both 0, the other config's result) fails.

kill: pretrain with save_every=7, log_every=4 (saves not on log steps) killed with SIGKILL at a random moment
of its run after its imports (uniform over the uninterrupted run's duration), rerun, then metrics.jsonl compared, row for row without the wall-clock keys, with an uninterrupted
run's (in this process, on one thread as the subprocesses).
"""

import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_faults import _argv, _rows, _run, _tiny, race  # noqa: E402

KILL = _tiny(steps=40, save_every=7, log_every=4)


def bench_race(n: int, seed: int = 0) -> None:
    rng, outcomes = random.Random(seed), []
    for i in range(n):
        offsets = [rng.uniform(0, 1.5), rng.uniform(0, 1.5)]
        with tempfile.TemporaryDirectory() as tmp:
            winner, error = race(Path(tmp), offsets)
        outcomes.append(winner)
        print(f"race {i + 1}/{n}: offsets {offsets[0]:.2f}/{offsets[1]:.2f} s: steps={winner} ran, the other: {error}",
              flush=True)
    print(f"race: {n}/{n} runs gave exactly one result, its own (winner steps=6: {outcomes.count(6)}, "
          f"steps=8: {outcomes.count(8)}); never exit 0 with the other config's result")


def bench_kill(n: int, seed: int = 0) -> None:
    import torch

    from test_faults import _lab
    from collapse_lab.stages.pretrain import pretrain

    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): float sums in the same order
    rng, same, killed = random.Random(seed), 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.time()
        whole = pretrain(_lab(tmp / "whole", *KILL))
        train_s = time.time() - start  # the run after its imports: kills land in [0, train_s)
        for i in range(n):
            ck, kills = tmp / f"k{i}", []
            for t in (rng.uniform(0, train_s), -1):  # killed at a random moment (unless it finished first), rerun
                proc = _run("-c", KILL_AFTER, str(t), "train/pretrain.py", *_argv(ck, *KILL))
                out, err = proc.communicate(timeout=1800)
                if proc.returncode == 0:
                    break
                assert proc.returncode == -signal.SIGKILL and t >= 0, err[-2000:]
                kills.append(round(t, 2))
            (out_dir,) = (ck / "base").iterdir()
            ok = _rows(out_dir / "metrics.jsonl") == _rows(whole / "metrics.jsonl")
            same, killed = same + ok, killed + bool(kills)
            print(f"kill {i + 1}/{n}: killed at {kills} s after the imports (run: {train_s:.1f} s), then finished: "
                  f"metrics {'identical' if ok else 'DIFFERENT'}", flush=True)
    print(f"kill: {same}/{n} runs ({killed} of them killed at least once) logged metrics.jsonl identical to the "
          "uninterrupted run's")


# imports done, then the script, and a SIGKILL of this very process `delay` seconds later
KILL_AFTER = """
import os, runpy, signal, sys, threading, time
import collapse_lab.stages.pretrain  # the imports first: the kill lands in the run
delay = float(sys.argv[1])
if delay >= 0:
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

if __name__ == "__main__":
    what, n, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20, int(sys.argv[3]) if len(sys.argv) > 3 else 0
    {"race": bench_race, "kill": bench_kill}[what](n, seed)

"""Wall time of `collapse-lab ablate` from an EMPTY checkpoints/ (its own base included).

    python benchmarks/bench_ablate.py                 # preset=quick, then preset=default
    python benchmarks/bench_ablate.py preset=quick    # one preset (extra overrides pass through)
    python benchmarks/bench_ablate.py preset=default --keep docs/example   # keep the ablation's directory

Each run gets a fresh temporary checkpoints_dir, so nothing is cached. Prints per preset the wall
time, its ratio to the issue's target (quick <= 180 s, default <= 900 s, frontier <= 2700 s), the peak resident memory
(RSS; bound 2 GiB) of one process and of the ablation's processes together (its `jobs` workers), the RSS after each stage (flat: finished stages' models are released), the per-stage lines
of the ablation's manifest (the slowest stages first), plus the machine it ran on. Run it with
nothing else running; tests never assert wall-clock times.
"""

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = {"quick": 180, "default": 900, "frontier": 2700}


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants now (Linux /proc), MiB: the ablation's own
    process plus its worker processes (`jobs`)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


def run(preset: str, extra: list[str], keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as ck:
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "collapse_lab.cli", "ablate", f"preset={preset}",
                                 f"checkpoints_dir={ck}", *extra], cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak_tree = [0.0]

        def sample() -> None:  # the process tree's total RSS, once a second
            while proc.poll() is None:
                peak_tree[0] = max(peak_tree[0], tree_rss_mib(proc.pid))
                time.sleep(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate()
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        wall = time.time() - start
        if r.returncode != 0:
            sys.exit(f"{preset}: failed ({r.returncode}):\n{r.stderr[-2000:]}")
        (abl,) = (Path(ck) / "ablations").iterdir()
        manifest = json.loads((abl / "manifest.json").read_text())
        stages, rss = manifest["stages"], manifest.get("rss_mib", [])
        verdict = json.loads((abl / "report.json").read_text())["verdict"]["text"]
        if keep:  # the ablation's own directory (report, plots, evals, run records): no model weights
            shutil.copytree(abl, keep / preset, dirs_exist_ok=True)
    # ru_maxrss of the ablation's process (and any it started): KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"preset": preset, "wall_s": wall, "stages": stages, "verdict": verdict, "peak_rss_gib": peak,
            "peak_tree_rss_gib": peak_tree[0] / 1024, "rss_after_stages_mib": rss, "jobs": manifest.get("jobs")}


def main() -> None:
    args = sys.argv[1:]
    keep = None
    if "--keep" in args:
        i = args.index("--keep")
        keep, args = Path(args[i + 1]), args[:i] + args[i + 2:]
    presets = [a.split("=", 1)[1] for a in args if a.startswith("preset=")] or ["quick", "default"]
    extra = [a for a in args if not a.startswith("preset=")]
    print(f"{date.today()} {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs "
          f"(torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')})")
    for preset in presets:
        res = run(preset, extra, keep)
        target = TARGET_S.get(preset)
        ratio = f", {res['wall_s'] / target:.2f} x the {target} s target" if target else ""
        print(f"preset={preset}: {res['wall_s']:.0f} s from an empty checkpoints/{ratio}")
        slow = sorted(res["stages"], key=lambda s: -float(s.rsplit("(", 1)[1].split(" s)")[0]))
        for line in slow[:8]:
            print("   ", line)
        print("   verdict:", res["verdict"])
        print(f"   jobs={res['jobs']}: peak RSS {res['peak_rss_gib']:.2f} GiB of one process (so far in this benchmark; "
              f"the issue's bound: 2 GiB), {res['peak_tree_rss_gib']:.2f} GiB of the ablation's processes together "
              f"(sampled each second); RSS after each stage (MiB, in the process that ran it): {res['rss_after_stages_mib']}")


if __name__ == "__main__":
    main()

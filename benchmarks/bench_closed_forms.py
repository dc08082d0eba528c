"""Print the closed-form figures of docs/regimes.md (collapse_lab/regimes/closed_forms.py): TRL's DPOTrainer, RLOOTrainer
and GRPOTrainer on the tabular bandit (11 tokens, EOS included), β = 1, both reward tables.

    python benchmarks/bench_closed_forms.py            # ~4 min on one CPU thread
"""

import tempfile
import time
from pathlib import Path

import torch

from collapse_lab.regimes import closed_forms as cf
from collapse_lab.world.bandit import total_variation

BETA = 1.0
for name, table in (("default", cf.DEFAULT_TABLE), ("other", cf.OTHER_TABLE)):
    for kind, run in (("dpo (30000 BT pairs)", lambda out: cf.run_dpo(out, table, BETA)),
                      ("rloo (50 steps x 512)", lambda out: cf.run_online("rloo", out, table, BETA, steps=50)),
                      ("grpo (100 steps x 512)", lambda out: cf.run_online("grpo", out, table, BETA, steps=100))):
        start = time.time()
        with tempfile.TemporaryDirectory() as d:
            res = run(Path(d) / "run")
        extra = (f"  TV to GRPO's fixed point {res['tv_to_grpo_fixed_point']:.4f} (that point's TV to pi* "
                 f"{res['tv_grpo_fixed_point_to_optimum']:.4f}, to the base "
                 f"{total_variation(torch.tensor(res['grpo_fixed_point']), torch.tensor(res['pi0'])):.4f})"
                 if "tv_to_grpo_fixed_point" in res else "")
        print(f"{name:8s} {kind:24s} TV to pi* {res['tv_to_optimum']:.4f} (base's {res['tv_base_to_optimum']:.4f})"
              f"{extra}  [{time.time() - start:.0f} s]", flush=True)

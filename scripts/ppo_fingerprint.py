"""PPO's fingerprint: short runs of eight PPO variants (KL estimators, value models, entropy bonus, trust region,
klauto, bandit and sequence bandit, LoRA) on a tiny base, each run's metrics rows (minus time/) and a SHA-256 of
its saved weights written to OUT/<variant>.json. Two versions of the code behave the same when their
fingerprints are byte-identical (`cmp`), on one machine:

    python scripts/ppo_fingerprint.py /tmp/before [variant ...]   # then the other version into /tmp/after
    for f in /tmp/before/*.json; do cmp $f /tmp/after/$(basename $f); done

About a minute on 2 CPU cores."""

import hashlib, json, os, sys
from pathlib import Path
os.environ.setdefault("WANDB_MODE", "disabled")
import torch
torch.set_flush_denormal(True)
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from collapse_lab.regimes import registry  # noqa: F401, E402 registers the regimes' config sections
from collapse_lab.core.config import compose
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.regimes.ppo import train_ppo
from conftest import TINY_PRETRAIN

outdir = Path(sys.argv[1]); outdir.mkdir(parents=True, exist_ok=True)
root = outdir / "checkpoints"
base = str(pretrain(compose("lab", TINY_PRETRAIN + ["model.vocab_size=600", "pretrain.tokenizer_docs=2000",
                                                    f"checkpoints_dir={root / 'base'}"])))
common = ["wandb.mode=disabled", f"base_path={base}", "ppo.steps=3", "ppo.rollout_batch_size=16",
          "ppo.minibatch_size=8", "ppo.micro_batch_size=4", "ppo.ppo_epochs=2", "ppo.samples_per_prompt=4",
          "curve.points=2"]
runs = {
    "blend": [],
    "k1_sep_entloss_tr": ["ppo.kl_estimator=k1", "ppo.value_model=separate", "ppo.entropy_bonus=loss",
                          "ppo.ent_coef=0.05", "ppo.trust_region_coef=1", "ppo.whiten_advantages=false"],
    "analytic_shared_klauto": ["recipe=klauto", "ppo.kl_estimator=analytic", "ppo.value_model=shared",
                               "ppo.ent_coef=0.01", "ppo.lam=0.95", "ppo.kl_target=0.5"],
    "blend05_tr_kl0": ["recipe=kl0", "ppo.kl_blend=0.5", "ppo.trust_region_coef=0.5", "ppo.anneal_lr=false"],
    "bandit": ["world=bandit", "ppo.log_every=1", "ppo.steps=4"],
    "seqbandit": ["world=bandit", 'world.rewards=[[" 7",1.0],[" 10",1.0]]', "world.max_tokens=3",
                  "ppo.kl_estimator=analytic", "ppo.log_every=2", "ppo.steps=4"],
    "peft_k1": ["peft.enabled=true", "ppo.kl_estimator=k1", "ppo.save_every=2"],
    "peft_blend": ["peft.enabled=true", "ppo.trust_region_coef=0.3"],
}
only = sys.argv[2:]
for name, extra in runs.items():
    if only and name not in only:
        continue
    out = train_ppo(compose("lab", common + extra + [f"checkpoints_dir={root / name}"]))
    rows = [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")}
            for l in (out / "metrics.jsonl").read_text().splitlines()]
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (outdir / f"{name}.json").write_text(json.dumps({"rows": rows, "weights": digest}, indent=1))
    print(name, out.name, digest[:12], flush=True)

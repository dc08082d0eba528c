"""Where the NETWORK's own exact gradient paths lie against π*_β's family: gradient flow and Adam in weight space.

    python benchmarks/network_paths.py checkpoints/ablations/powered8-b0-s20 [--steps 120] [--adam-lr 1e-4 3e-5]

benchmarks/gradient_paths.py traces exact paths on ONE LOGIT PER ANSWER; PPO moves the weights of a network shared by
every answer and every prompt, trains on the training templates and is read on held-out prompts. This benchmark
takes the ablation's base network and ascends PPO's objective exactly, with no sampling, clipping or value head:

    J(θ) = mean over the training prompts x of  Σ_o q_θ(o|x)·R(o) − β·KL(q_θ(·|x) ‖ q_0(·|x)),

o over the outcomes the closed forms use (each answer ended with EOS, each ended otherwise, "other": the mass
outside the answer set), R the gold rater's expected score (reference_curves.prompt_forms), q_θ the network's exact
probability of each outcome (every answer-trie node in one forward pass per prompt, as the evaluator's tree
attention reads it, here with gradients). Two optimisers on the same J from the same base:

- FLOW: normalised gradient steps θ ← θ + η·g/‖g‖: the gradient flow's path in weight space (η → 0: independent of
  η; --check-eta halves it to show the discretisation), the path momentum SGD approximates at a small rate;
- ADAM (β1 0.9, β2 0.999, ε 1e-5, no weight decay: PPO's policy optimiser) at each --adam-lr.

Each path is read every --read-every steps on the HELD-OUT curve prompts (frontier.Curve.point: what the report
measures PPO on) and on the TRAINING prompts, and its offset off π*_β's family on each is printed: the mean over a KL
grid of d_path − d_family (normalised-entropy units), beside the one-logit-per-answer vanilla path's offset on the
same prompts (rc.gradient_path) and the measured PPO offset of the ablation's report. Runs on one core (torch threads
1); a path stops when the held-out KL passes --kl-max or after --steps steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from collapse_lab.evaluation import reference_curves as rc  # noqa: E402
from collapse_lab.evaluation.evaluator import answer_trie, end_mask  # noqa: E402
from collapse_lab.core.suites import Prompt as SuitePrompt  # noqa: E402
from collapse_lab.evaluation.frontier import Curve  # noqa: E402
from collapse_lab.models.models import load_pretrained  # noqa: E402
from collapse_lab.models.tokenizer import answer_token_ids, encode_texts  # noqa: E402
from collapse_lab.world.world import make_world  # noqa: E402
from gradient_paths import off  # noqa: E402  (benchmarks/gradient_paths.py: mean offset over the grid points reached)


class Tree:
    """One prompt's tokens followed by its answer trie's nodes, the 4D mask letting each node see the prompt and its
    ancestors, and where each answer ends: one forward pass gives every outcome's log-probability."""

    def __init__(self, tokenizer, text: str, answers: list[str], continue_chars: str, vocab: int):
        prompt = encode_texts(tokenizer, [text])[0]
        seqs = answer_token_ids(tokenizer, answers, text)
        node, parent, depth = answer_trie(seqs)
        P, Q = len(prompt), len(parent)
        sees = torch.zeros(P + Q, P + Q, dtype=torch.bool)
        sees[:P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
        sees[P:, :P] = True
        for i in range(Q):
            j = i
            while j != -1:
                sees[P + i, P + j], j = True, parent[j]
        self.tokens = torch.tensor([prompt + [prefix[-1] for prefix in node]])  # (1, P+Q)
        self.mask = torch.zeros(1, 1, P + Q, P + Q).masked_fill(~sees, -math.inf)
        self.positions = torch.tensor([list(range(P)) + [P + d - 1 for d in depth]])
        self.P, self.parent = P, torch.tensor(parent)
        self.node_tokens = self.tokens[0, P:]
        self.at = torch.tensor([node[s] for s in seqs])  # (A,) each answer's last node
        ends = end_mask(tokenizer, continue_chars, vocab)
        self.eos = tokenizer.eos_token_id
        self.other_ends = ends.clone()
        self.other_ends[self.eos] = False
        self.ancestors = sees[P:, P:].double()  # (Q, Q) node i sees node j: prefix log-prob = ancestors @ step log-probs

    def outcome_logprobs(self, model) -> torch.Tensor:
        """(2A+1,) log q(o): each answer then EOS, each answer then another ending token, then "other"."""
        lp = model(self.tokens, attention_mask=self.mask, position_ids=self.positions).logits[0].float().log_softmax(-1)
        first, nodes = lp[self.P - 1], lp[self.P:]  # the prompt's last position predicts the first answer token
        par = self.parent.clamp(min=0)
        step = torch.where(self.parent < 0, first[self.node_tokens], nodes[par, self.node_tokens])  # (Q,)
        prefix = self.ancestors @ step.double()  # (Q,) log P(node's tokens | x)
        at = prefix[self.at]
        eos = at + nodes[self.at, self.eos].double()
        oth = at + nodes[self.at][:, self.other_ends].double().logsumexp(-1)
        inside = torch.cat([eos, oth])
        other = torch.log1p(-inside.logsumexp(0).exp().clamp(max=1 - 1e-12))
        return torch.cat([inside, other[None]])


def objective(model, trees, targets, beta: float) -> torch.Tensor:
    """J = mean over prompts of E_q[R] − β·KL(q ‖ q0) on the outcomes; targets: per prompt (R, log q0) tensors."""
    out = []
    for t, (r, lq0) in zip(trees, targets):
        lq = t.outcome_logprobs(model)
        q = lq.exp()
        out.append((q * r).sum() - beta * (q * (lq - lq0)).sum())
    return torch.stack(out).mean()


def trace(name, model, trees, targets, curves, beta, step_fn, steps, read_every, kl_max) -> dict:
    """Ascend J with `step_fn()` after each backward pass; read held-out (Curve.point) and training points every read_every steps."""
    held, train, t0 = [{"kl": 0.0, "d": 0.0}], [{"kl": 0.0, "d": 0.0}], time.time()
    for i in range(1, steps + 1):
        model.zero_grad(set_to_none=True)
        loss = -objective(model, trees, targets, beta)
        loss.backward()
        step_fn()
        if i % read_every == 0 or i == steps:
            for where, c in zip((held, train), curves):
                p = c.point(model)
                where.append({"kl": p["frontier/kl"], "d": p["frontier/delta_norm_entropy"], "step": i})
            print(f"  {name} step {i}: held-out KL {held[-1]['kl']:.3f} d {held[-1]['d']:+.4f} | train KL "
                  f"{train[-1]['kl']:.3f} d {train[-1]['d']:+.4f} ({time.time() - t0:.0f} s)", flush=True)
            if held[-1]["kl"] > kl_max:
                break
    return {"heldout": held, "train": train}


def first_passage(path: list[dict]) -> list[dict]:
    """The points where the path first reaches a new KL (as rc.gradient_path records them)."""
    out, best = [], -1.0
    for p in path:
        if p["kl"] > best:
            out.append(p)
            best = p["kl"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ablation", help="an ablation directory (its runs.json names the base, its report the pair)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--read-every", type=int, default=2)
    ap.add_argument("--eta", type=float, default=0.01, help="the flow's step length in weight space")
    ap.add_argument("--check-eta", action="store_true", help="also run the flow at eta/2 (discretisation check)")
    ap.add_argument("--adam-lr", type=float, nargs="*", default=[1e-4, 3e-5])
    ap.add_argument("--kl-max", type=float, default=3.0)
    ap.add_argument("--out", help="write every path as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.ablation)
    runs = json.loads((root / "runs.json").read_text())
    ppo = next(r for r in runs["runs"] if r["group"] == "online RL")
    cfg = OmegaConf.load(Path(ppo["path"]) / "config.yaml")
    beta = float(cfg.ppo.kl_coef)
    report = json.loads((root / "report.json").read_text())
    pred = report["closed_forms"]["predictions"][0]
    comp = next(c for c in report["frontier"]["comparisons"] if c["regime"] == pred["regime"] and c["x"] == "kl")
    grid = np.linspace(math.sqrt(comp["x_min"]), math.sqrt(comp["x_max"]), 40) ** 2
    world = make_world(cfg.world)
    model, tok = load_pretrained(runs["base"])
    model.eval()  # no dropout: the exact objective
    vocab = model.config.vocab_size
    curve = Curve(model, tok, world, suite=cfg.world.curve_suite)
    held_forms = rc.forms_from_json(curve.base_forms())
    # the templates PPO draws, with their answer sets spelled as the suites spell them
    train = [SuitePrompt(f"{p.id}/{p.low}-{p.high}", p.text, [f" {n}" for n in range(p.low, p.high + 1)],
                         "0123456789") for p in world.train_templates]
    train_curve = Curve(model, tok, world, prompts=train)
    train_forms = rc.forms_from_json(train_curve.base_forms())
    trees = [Tree(tok, p.text, p.answers, p.continue_chars, vocab) for p in train_curve.prompts]
    with torch.no_grad():  # the tree reproduces the evaluator's outcome masses at the base
        err = max(float(np.abs(t.outcome_logprobs(model).exp().numpy() - f.p0).max())
                  for t, f in zip(trees, train_forms))
    if err > 1e-5:
        raise SystemExit(f"the tree's outcome probabilities differ from the evaluator's by {err:.1e} (> 1e-5)")
    print(f"{root.name}: beta {beta}, {len(trees)} training prompts, {len(held_forms)} held-out; tree vs evaluator "
          f"max |Δq| {err:.1e}; grid {len(grid)} KL values in [{grid[0]:.3f}, {grid[-1]:.3f}] nats")
    top = grid[-1] + 1.0  # the families traced past the grid's end
    fam = {"heldout": rc.optimum_curve(held_forms, kl_max=top), "train": rc.optimum_curve(train_forms, kl_max=top)}
    vanilla = {"heldout": rc.gradient_path(held_forms, beta, kl_max=top),
               "train": rc.gradient_path(train_forms, beta, kl_max=top)}
    targets = [(torch.tensor(f.mean), torch.tensor(np.log(np.maximum(f.p0, 1e-300)))) for f in train_forms]
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def flow(eta):
        def step():
            with torch.no_grad():
                norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
                for p in params:
                    p.add_(p.grad, alpha=-eta / float(norm))  # loss = −J: a descent step on it
        return step

    optimisers = [(f"flow eta {args.eta:g}", lambda: flow(args.eta), args.steps)]
    if args.check_eta:  # half the step length, twice the steps: the same path if η is small enough
        optimisers.append((f"flow eta {args.eta / 2:g}", lambda: flow(args.eta / 2), 2 * args.steps))
    for lr in args.adam_lr:
        optimisers.append((f"adam lr {lr:g}", lambda lr=lr: torch.optim.Adam(params, lr=lr, eps=1e-5).step, args.steps))
    paths = {}
    for name, make_step, steps in optimisers:
        model.load_state_dict(start)
        paths[name] = trace(name, model, trees, targets, (curve, train_curve), beta, make_step(), steps,
                            args.read_every, args.kl_max)
    measured = pred["off_curve"][pred["regime"]]
    print(f"\noffset off pi*_{beta:g}'s family at matched KL (mean over the grid points reached; d units)")
    print(f"{'path':<18} {'held-out':>18} {'training prompts':>18}")
    print(f"{'PPO (measured)':<18} {measured['mean']:>+9.4f} [{measured['lo']:+.4f}, {measured['hi']:+.4f}]")
    for name, p in [("tabular vanilla", vanilla)] + list(paths.items()):
        cells = []
        for where in ("heldout", "train"):
            o, n = off(first_passage(p[where]), fam[where], grid)
            cells.append(f"{o:+.4f} ({n}/{len(grid)})")
        print(f"{name:<18} {cells[0]:>18} {cells[1]:>18}")
    if args.out:
        Path(args.out).write_text(json.dumps({"paths": paths, "grid": grid.tolist()}, indent=1))


if __name__ == "__main__":
    main()

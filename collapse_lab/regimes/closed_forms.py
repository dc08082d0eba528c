"""The regimes' closed forms on the exact bandit, measured through TRL's own trainers.

One prompt, episodes of ONE token over a small vocabulary (EOS included), a reward table r, a base π0: the
policy is `bandit.TabularPolicy` (logits log π0 + θ, no function approximation), so what DPOTrainer,
RLOOTrainer or GRPOTrainer reach is their update rule's fixed point, up to sampling noise:

    DPO   Bradley–Terry pairs: a ≠ b uniform over the vocabulary, a preferred with probability σ(r(a) − r(b));
          the population optimum is π* ∝ π0·e^{r/β} (the pair's log-ratio gap β(θ_a − θ_b) fits r(a) − r(b))
    RLOO  the sequence k1 KL in the reward: E[∇] = ∇(E[r] − β·KL(π‖π0)), fixed point π* ∝ π0·e^{r/β}
    GRPO  A = (r − mean_G)/std_G, the same for the sequence's tokens, and β·k3 in the LOSS, k3 = ρ − log ρ − 1,
          ρ = π0/π. TRL 1.16 multiplies k3 by the importance ratio π/π_old (`use_bias_correction_kl`, its default;
          DeepSeek-V3.2), whose gradient is then log(π/π0)·∇log π, in expectation ∇KL(π‖π0). For a tabular policy
          the stationary condition is π(a)·E_π[A | a] = β·π(a)·(log(π(a)/π0(a)) − KL(π‖π0)), i.e.

              π(a) ∝ π0(a)·exp(E_π[A | y = a] / β)          (`grpo_fixed_point`, solved self-consistently)

          E_π[A | a] the expected group-normalised advantage of a sample a among G − 1 others drawn from π. For
          large G, E_π[A | a] ≈ (r(a) − E_π r)/σ_π(r): a tilt like π*, by r/(β·σ_π) instead of r/β, σ_π the
          reward's std under the fixed point itself (σ < 1 moves further than π*; σ → 0 as π concentrates). Without
          the correction (Shao et al.'s k3 as written: `bias_correction=False`) the expected KL gradient is
          π(a) − π0(a), that of KL(π0‖π), and the fixed point is π(a) = π0(a)/(1 − E_π[A | a]/β) instead.
          Neither is π*: the test checks TRL lands on the first and how far it is from π*.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from collapse_lab.world.bandit import TabularConfig, TabularPolicy, optimum, total_variation
from collapse_lab.regimes.dpo import tokenised_dpo_trainer

# the tabular bandit's vocabulary: EOS, the prompt's token, and the one-token answers " 1" .. " 9"
VOCAB = ["<eos>", "x", *[f" {d}" for d in range(1, 10)]]
DEFAULT_TABLE = {" 7": 1.0, " 4": 0.5, " 2": 0.25}  # recipes/world/bandit.yaml's
OTHER_TABLE = {" 3": 0.8, " 9": 0.6, " 1": 0.3, " 5": -0.5}  # tests/test_ppo.py's other table
# a base far from uniform (seeded, fixed): π0 over the 11 tokens
BASE_LOGITS = [round(x, 3) for x in np.random.default_rng(0).normal(0.0, 1.0, len(VOCAB))]


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def reward_vector(table: dict[str, float]) -> torch.Tensor:
    return torch.tensor([table.get(t, 0.0) for t in VOCAB], dtype=torch.float64)


def base_policy(out: Path) -> tuple[str, torch.Tensor]:
    """Save the tabular base (θ = 0) to `out`: (its path, π0)."""
    model = TabularPolicy(TabularConfig(base_logits=BASE_LOGITS, eos_token_id=0, pad_token_id=0, bos_token_id=0))
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return str(out), model.probs()


def _common(out: Path, lr: float, batch: int, seed: int) -> dict:
    return dict(output_dir=str(out / "trainer"), learning_rate=lr, per_device_train_batch_size=batch, seed=seed,
                data_seed=seed, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=10,
                dataloader_pin_memory=False, max_grad_norm=0.0, activation_checkpointing=False,
                bf16=False, fp16=False)  # TRL's default bf16 autocast would round the table's logits


def run_dpo(out: Path, table: dict, beta: float, pairs: int = 30000, epochs: float = 4, lr: float = 0.1,
            batch: int = 3000, loss_type: str = "sigmoid", seed: int = 0) -> dict:
    """TRL's DPOTrainer on Bradley–Terry pairs sampled from `table`; the policy reached and its TV to π*."""
    from trl import DPOConfig  # optional heavy dependency

    path, pi0 = base_policy(out / "base")
    r = reward_vector(table)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(VOCAB), pairs)
    b = (a + rng.integers(1, len(VOCAB), pairs)) % len(VOCAB)  # b ≠ a, uniform over the others
    a_wins = rng.random(pairs) < torch.sigmoid(r[a] - r[b]).numpy()
    chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
    data = Dataset.from_dict({"prompt_ids": [[1]] * pairs, "chosen_ids": [[int(c)] for c in chosen],
                              "rejected_ids": [[int(x)] for x in rejected]})
    model = TabularPolicy.from_pretrained(path)
    args = DPOConfig(**_common(out, lr, batch, seed), num_train_epochs=epochs, beta=beta, loss_type=[loss_type],
                     lr_scheduler_type="linear", max_length=None)  # annealed: to the pairs' own optimum
    trainer = tokenised_dpo_trainer()(model=model, ref_model=TabularPolicy.from_pretrained(path), args=args,
                                      train_dataset=data, processing_class=tokenizer())
    trainer.train()
    return _result(model.probs(), pi0, r, beta, out)


def run_online(kind: str, out: Path, table: dict, beta: float, steps: int = 150, batch: int = 512, k: int = 4,
               lr: float = 0.05, seed: int = 0) -> dict:
    """TRL's RLOOTrainer (kind='rloo') or GRPOTrainer ('grpo', Shao et al.'s loss, group std) on the table."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # optional heavy dependency

    path, pi0 = base_policy(out / "base")
    r = reward_vector(table)

    def score(prompts, completions, completion_ids, **_):
        return [float(r[ids[0]]) for ids in completion_ids]

    common = dict(**_common(out, lr, batch, seed), max_steps=steps, num_generations=k, steps_per_generation=1,
                  max_completion_length=1, temperature=1.0, beta=beta, num_iterations=1, lr_scheduler_type="linear",
                  warmup_steps=0, disable_dropout=False)
    if kind == "rloo":
        trainer_cls, args = RLOOTrainer, RLOOConfig(**common, normalize_advantages=False)
    else:
        trainer_cls, args = GRPOTrainer, GRPOConfig(**common, scale_rewards="group", loss_type="grpo")
    trainer = trainer_cls(model=path, reward_funcs=score, args=args, processing_class=tokenizer(),
                          train_dataset=Dataset.from_dict({"prompt": ["x"] * (steps * batch // k)}))
    trainer.train()
    return _result(trainer.model.probs(), pi0, r, beta, out, G=k if kind == "grpo" else None)


def _result(pi: torch.Tensor, pi0: torch.Tensor, r: torch.Tensor, beta: float, out: Path, G: int | None = None) -> dict:
    target = optimum(pi0, r, beta)
    res = {"pi": pi.tolist(), "pi0": pi0.tolist(), "pi_star": target.tolist(),
           "tv_to_optimum": total_variation(pi, target), "tv_base_to_optimum": total_variation(pi0, target)}
    if G is not None:
        fixed = grpo_fixed_point(pi0, r, beta, G)
        res.update(grpo_fixed_point=fixed.tolist(), tv_to_grpo_fixed_point=total_variation(pi, fixed),
                   tv_grpo_fixed_point_to_optimum=total_variation(fixed, target))
    shutil.rmtree(out, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------- GRPO's fixed point


def group_advantage(pi: np.ndarray, r: np.ndarray, G: int, eps: float = 1e-4) -> np.ndarray:
    """E_π[A | y = a] for every token a: A = (r(a) − mean of the group's r)/(std of the group's r + eps), the
    group = a and G − 1 samples of π, std with Bessel's correction (TRL's nanstd), exact by enumeration."""
    V = len(pi)
    others = np.array(list(itertools.product(range(V), repeat=G - 1)))  # (V^(G−1), G−1)
    weight = np.prod(pi[others], axis=1)  # P(the others)
    group = np.concatenate([np.broadcast_to(np.arange(V)[:, None, None], (V, len(others), 1)),
                            np.broadcast_to(others, (V, *others.shape))], axis=2)  # (V, combos, G) token ids
    scores = r[group]
    adv = (scores[..., 0] - scores.mean(-1)) / (scores.std(-1, ddof=1) + eps)  # (V, combos)
    return (adv * weight).sum(1)


def grpo_fixed_point(pi0: torch.Tensor, r: torch.Tensor, beta: float, G: int, bias_correction: bool = True,
                     steps: int = 20000, lr: float = 0.5) -> torch.Tensor:
    """The tabular GRPO stationary point (module docstring), as the point the trainer's EXPECTED update flows
    to from π0: θ_a ← θ_a + lr·[π(a)·E_π[A|a] − β·g_a], g = π·(log(π/π0) − KL(π‖π0)) with TRL's bias-corrected
    k3 (default), π − π0 without it (the mean-field limit of small steps)."""
    p0, rr = pi0.double().numpy(), r.double().numpy()
    theta = np.log(p0)
    for _ in range(steps):
        pi = np.exp(theta - theta.max())
        pi /= pi.sum()
        log_ratio = np.log(pi / p0)
        kl_grad = pi * (log_ratio - (pi * log_ratio).sum()) if bias_correction else pi - p0
        grad = pi * group_advantage(pi, rr, G) - beta * kl_grad
        theta += lr * grad
        if np.abs(grad).max() < 1e-10:
            break
    return torch.tensor(pi)

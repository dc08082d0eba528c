"""The exact check: one prompt, episodes of ONE token, reward r(t) from a table (`world=bandit`).

Over the whole vocabulary, with π0 the reference model's next-token distribution at the prompt,
the regimes' objectives have closed-form optima (Korbak et al. 2022; Rafailov et al. 2023 eq. 4):

    max E[r] − β·KL(π‖π0)            ⇒  π*(t) ∝ π0(t)·exp(r(t)/β)
    max E[r] − β·KL(π‖π0) + α·H(π)   ⇒  π*(t) ∝ π0(t)^(β/(α+β))·exp(r(t)/(α+β))

(β = α = 0 has no unique optimum: all mass on the best-rewarded tokens.)
"""

from __future__ import annotations

import torch

from collapse_lab.config import ConfigError
from collapse_lab.tokenizer import encode_texts


def reward_vector(tokenizer, world_cfg, vocab_size: int) -> torch.Tensor:
    """(V,) r(t) for every token id: the table's value, `default_reward` elsewhere.

    A text that is not exactly one token of this tokenizer is a ConfigError naming its tokens.
    """
    r = torch.full((vocab_size,), float(world_cfg.default_reward))
    for text, reward in world_cfg.rewards:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            raise ConfigError(f"world.rewards: {text!r} is not one token of this tokenizer (it is {len(ids)}: {pieces}); "
                              "bandit episodes are one token long")
        r[ids[0]] = float(reward)
    return r


def optimum(pi0: torch.Tensor, r: torch.Tensor, beta: float, alpha: float = 0.0) -> torch.Tensor:
    """π*(t) ∝ π0(t)^(β/(α+β))·exp(r(t)/(α+β)) (the α = 0 case is π0·exp(r/β)), computed in log space.

    β = α = 0: uniform over the argmax tokens of r (the limit of β → 0).
    """
    if beta < 0 or alpha < 0:
        raise ValueError(f"beta and alpha must be >= 0, got {beta}, {alpha}")
    if beta + alpha == 0:
        best = (r == r.max()).double()
        return best / best.sum()
    logits = (beta / (alpha + beta)) * torch.log(pi0.double().clamp_min(1e-300)) + r.double() / (alpha + beta)
    return torch.softmax(logits, -1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """TV(p, q) = ½·Σ_t |p(t) − q(t)|."""
    return 0.5 * (p.double() - q.double()).abs().sum().item()


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p‖q) = Σ_t p(t)·log(p(t)/q(t)), nats (terms with p(t) = 0 are 0)."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0).sum().item()


@torch.no_grad()
def next_token_probs(model, tokenizer, prompt: str) -> torch.Tensor:
    """(V,) the model's full next-token distribution after `prompt` (temperature 1), float64."""
    ids = torch.tensor(encode_texts(tokenizer, [prompt]), device=model.device)  # as rollouts encode it
    return torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1).cpu()

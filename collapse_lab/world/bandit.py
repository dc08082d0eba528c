"""The exact check: one prompt, episodes of ONE token, reward r(t) from a table (`world=bandit`).

Over the whole vocabulary, with π0 the reference model's next-token distribution at the prompt,
the regimes' objectives have closed-form optima (Korbak et al. 2022; Rafailov et al. 2023 eq. 4):

    max E[r] − β·KL(π‖π0)            ⇒  π*(t) ∝ π0(t)·exp(r(t)/β)
    max E[r] − β·KL(π‖π0) + α·H(π)   ⇒  π*(t) ∝ π0(t)^(β/(α+β))·exp(r(t)/(α+β))

(β = α = 0 has no unique optimum: all mass on the best-rewarded tokens.)
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from collapse_lab.core.config import ConfigError
from collapse_lab.models.tokenizer import encode_texts


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


# ------------------------------------------------------------------ a tabular policy for TRL's trainers


class TabularConfig(PretrainedConfig):
    model_type = "collapse-lab-tabular"

    def __init__(self, base_logits: list[float] | None = None, **kwargs):
        self.base_logits = list(base_logits or [0.0, 0.0])
        kwargs.setdefault("vocab_size", len(self.base_logits))
        # what generate()'s cache set-up reads; the policy has no layers and ignores any cache
        kwargs.update(num_hidden_layers=1, hidden_size=1, num_attention_heads=1, use_cache=False)
        super().__init__(**kwargs)
        self.auto_map = {}  # TRL loads a reference model by path: plain AutoModelForCausalLM (registered below)


class _ConstantBackbone(torch.nn.Module):
    """A backbone whose last hidden state is the constant 1 (width 1) at every position."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> BaseModelOutputWithPast:
        return BaseModelOutputWithPast(last_hidden_state=torch.ones(*input_ids.shape, 1, device=input_ids.device))


class TabularPolicy(PreTrainedModel, GenerationMixin):
    """The exact bandit policy as a causal LM that TRL's trainers accept: at every position the next-token
    logits are the LM head's weight column w (V,), initialised to log π0 and trained freely: a tabular softmax
    policy (TRL's fused log-prob head reads the constant hidden state 1 through this head). No shared
    parameters, no function approximation: what a trainer reaches is its update rule's fixed point on the
    table (up to sampling noise), nothing else."""

    config_class = TabularConfig
    base_model_prefix = "backbone"
    _supports_cache_class = False

    def __init__(self, config: TabularConfig):
        super().__init__(config)
        self.backbone = _ConstantBackbone()
        self.lm_head = torch.nn.Linear(1, len(config.base_logits), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.log_softmax(torch.tensor(config.base_logits), -1)[:, None])
        self.post_init()

    def _init_weights(self, module):
        pass  # the head starts at log π0 (set in __init__, then loaded)

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> CausalLMOutputWithPast:
        return CausalLMOutputWithPast(logits=self.lm_head(self.backbone(input_ids).last_hidden_state))

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.lm_head.weight[:, 0].double(), -1).detach().cpu()


AutoConfig.register(TabularConfig.model_type, TabularConfig)
AutoModelForCausalLM.register(TabularConfig, TabularPolicy)

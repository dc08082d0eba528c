"""PPO: batch arithmetic, GAE, the entropy bonus's gradient, exact bandit optima, resume, NaN
stop, LoRA, every PPO recipe, and two processes through accelerate."""

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from collapse_lab.regimes import ppo as ppo_module
from collapse_lab.world.bandit import kl_divergence, next_token_probs, optimum, reward_vector, total_variation
from collapse_lab.core.checkpoint import read_manifest
from collapse_lab.core.config import ConfigError, compose, group_options
from collapse_lab.models.models import load_pretrained
from collapse_lab.regimes.ppo import (KLPenalty, batch_sizes, gae, k1_shares, kl_rewards, masked_whiten, ppo_loss, state_kl,
                              train_ppo)
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.models.rollout import entropy_from_logits

from conftest import REPO, TINY_PRETRAIN, launch_failure, launch_on_cpu

PPO_RECIPES = [r for r in group_options("recipe") if r.startswith(("kl", "ent"))]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # vocabulary large enough that the bandit table's " 7", " 4", " 2" are single tokens
    overrides = TINY_PRETRAIN + ["model.vocab_size=600", "pretrain.tokenizer_docs=2000"]
    return str(pretrain(compose("lab", overrides + [f"checkpoints_dir={tmp_path_factory.mktemp('base')}"])))


def _cfg(base, tmp_path, *overrides):
    return compose("lab", ["wandb.mode=disabled", f"base_path={base}", f"checkpoints_dir={tmp_path}", *overrides])


def _bandit(base, tmp_path, *overrides):
    """A fast bandit run: 256 one-token episodes per step, one epoch of one minibatch."""
    return _cfg(base, tmp_path, "world=bandit", "ppo.rollout_batch_size=256", "ppo.minibatch_size=256",
                "ppo.ppo_epochs=1", "ppo.lr=5e-3", "ppo.steps=150", "ppo.log_every=150", *overrides)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ pure parts


def test_batch_arithmetic_is_one_function_that_raises():
    p = compose("lab", ["ppo.rollout_batch_size=64", "ppo.minibatch_size=16"]).ppo
    b = batch_sizes(p, 2)
    assert (b.rollout_per_device, b.minibatch_per_device, b.minibatches) == (32, 8, 4)
    with pytest.raises(ConfigError, match="rollout_batch_size over processes"):
        batch_sizes(p, 3)
    with pytest.raises(ConfigError, match="over ppo.minibatch_size"):
        batch_sizes(compose("lab", ["ppo.rollout_batch_size=64", "ppo.minibatch_size=24"]).ppo, 1)
    with pytest.raises(ConfigError, match="over ppo.samples_per_prompt"):
        batch_sizes(compose("lab", ["ppo.rollout_batch_size=64", "ppo.samples_per_prompt=3"]).ppo, 1)
    assert batch_sizes(p, 2).prompts_per_device == 32 // p.samples_per_prompt


def test_gae_matches_the_naive_sum():
    torch.manual_seed(0)
    r, v = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).float()
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        vals = list(v[b, :n]) + [0.0]  # terminal after the last real token
        deltas = [r[b, t] + gamma * vals[t + 1] - vals[t] for t in range(n)]
        for t in range(n):
            naive = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(float(naive), abs=1e-5)
            assert ret[b, t].item() == pytest.approx(float(naive + vals[t]), abs=1e-5)
        assert adv[b, n:].abs().sum() == 0


def test_whitening_ignores_padding():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, scale = masked_whiten(x, mask)
    assert scale.item() == pytest.approx(1 / math.sqrt(2 / 3), rel=1e-6)
    assert w[0, :3].mean().item() == pytest.approx(0, abs=1e-6) and w[0, 3] == 0


def test_entropy_bonus_keeps_its_gradient():
    """H = -sum softmax(z) log_softmax(z) over the whole vocabulary, differentiable (a detached
    entropy is a known bug class): its gradient matches finite differences."""
    z = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    h = entropy_from_logits(z).sum()
    assert h.requires_grad
    (grad,) = torch.autograd.grad(h, z)
    assert grad.abs().sum() > 0
    eps, dz = 1e-6, torch.zeros_like(z)
    dz[1, 2, 4] = eps
    fd = (entropy_from_logits(z + dz).sum() - entropy_from_logits(z - dz).sum()) / (2 * eps)
    assert grad[1, 2, 4].item() == pytest.approx(fd.item(), rel=1e-4)


def test_closed_form_optimum():
    pi0, r = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.0, 1.0, 0.0])
    p = optimum(pi0, r, beta=1.0)
    assert p[1] / p[0] == pytest.approx(0.3 / 0.5 * math.e)
    q = optimum(pi0, r, beta=0.1, alpha=0.05)  # pi0^(2/3) exp(r/0.15)
    expected = pi0.double() ** (2 / 3) * torch.exp(r.double() / 0.15)
    assert total_variation(q, expected / expected.sum()) < 1e-12
    assert optimum(pi0, r, 0.0).tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("share", [
    k1_shares("k1", 0.5, 3), k1_shares("analytic", 0.5, 3), k1_shares("blend", 0.5, 3), torch.tensor([0.2, 0.9, 0.4])])
def test_every_kl_estimator_is_an_unbiased_gradient_of_the_sequence_kl(share):
    """A tabular policy over three-token answers (vocabulary 3, a state per prefix), enumerated
    exactly: E_y[Σ_t ∇log π(y_t|s_t)·G_t] − Σ_t (1 − c_t)·E[∇KL_t] (G_t the return of kl_rewards at
    β = 1, the loss's direct term) equals −∇KL(π‖π_ref) over whole answers, for any shares c_t."""
    torch.manual_seed(0)
    V, T = 3, 3
    logits = torch.randn(1 + V + V * V, V, dtype=torch.float64, requires_grad=True)  # a row per prefix
    ref = torch.randn(1 + V + V * V, V, dtype=torch.float64).log_softmax(-1)
    state = lambda prefix: sum(V ** k for k in range(len(prefix))) + sum(a * V ** (len(prefix) - 1 - k)
                                                                         for k, a in enumerate(prefix))
    answers = [(a, b, c) for a in range(V) for b in range(V) for c in range(V)]
    logp, surrogate, seq_kl = logits.log_softmax(-1), 0.0, 0.0
    for y in answers:
        rows = [state(y[:t]) for t in range(T)]
        step_logp = torch.stack([logp[s, a] for s, a in zip(rows, y)])  # (T,)
        log_ratio = (step_logp - torch.stack([ref[s, a] for s, a in zip(rows, y)]))[None]
        kls = state_kl(logp[rows], ref[rows])  # (T,) exact per-state KL, with its gradient
        rewards = kl_rewards(log_ratio.detach(), kls.detach()[None], torch.ones(1, T, dtype=torch.float64),
                             share.double(), beta=1.0)[0]
        returns = rewards.flip(0).cumsum(0).flip(0)
        p_y = step_logp.sum().exp()
        surrogate = surrogate + p_y.detach() * ((step_logp * returns).sum() - ((1 - share.double()) * kls).sum())
        seq_kl = seq_kl + p_y * log_ratio.sum()
    (estimated,) = torch.autograd.grad(surrogate, logits, retain_graph=True)
    (exact,) = torch.autograd.grad(-seq_kl, logits)
    assert exact.abs().max() > 0.01
    assert torch.allclose(estimated, exact, atol=1e-10), (estimated - exact).abs().max()


def test_ppo_loss_by_hand():
    """Three response tokens, the third padding (mask 0), ε = ε_v = 0.2, n_tokens = 2 (the minibatch's real ones).

    policy  token 0: ρ = 1.5, A = 2:   max(−3.0, −2·1.2) = −2.4    (clipped: no gradient)
            token 1: ρ = 0.9, A = −1:  max(0.9, 0.9) = 0.9          (inside the clip: ∂/∂log π = −A·ρ = 0.9)
            pg_loss = (−2.4 + 0.9)/2 = −0.75
    value   token 0: V = 1, V_old = 0.5, R = 2: max((−1)², (0.5 + 0.2 − 2)²) = 1.69 → ½ → 0.845
            token 1: V = 0, V_old = 0.5, R = 1: max((−1)², (0.5 − 0.2 − 1)²) = 1    → ½ → 0.5
            vf_loss = (0.845 + 0.5)/2 = 0.6725; × vf_coef 0.1 = 0.06725
    entropy (1 + 2)/2 = 1.5, × ent_weight 0.5 = 0.75 (subtracted); kl_loss 0.25 (added)
    trust region (0.1 + 0.3)/2 = 0.2, × 2 = 0.4
    loss = −0.75 + 0.06725 − 0.75 + 0.25 + 0.4 = −0.78275"""
    d = dict(dtype=torch.float64)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.9), 5.0]], **d, requires_grad=True)
    old, mask = torch.zeros(1, 3, **d), torch.tensor([[1.0, 1.0, 0.0]], **d)
    adv, ret = torch.tensor([[2.0, -1.0, 7.0]], **d), torch.tensor([[2.0, 1.0, 9.0]], **d)
    v, v_old = torch.tensor([[1.0, 0.0, 3.0]], **d), torch.tensor([[0.5, 0.5, 0.0]], **d)
    kw = dict(clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, entropy=torch.tensor([[1.0, 2.0, 100.0]], **d))
    loss, terms = ppo_loss(logprobs, old, adv, v, v_old, ret, mask, torch.tensor(2.0, **d), **kw,
                           ent_weight=torch.tensor(0.5, **d), kl_loss=torch.tensor(0.25, **d),
                           moved=torch.tensor([[0.1, 0.3, 50.0]], **d), trust_region_coef=2.0)
    assert loss.item() == pytest.approx(-0.78275, abs=1e-12)
    assert terms["pg_loss"][0, :2].tolist() == pytest.approx([-2.4, 0.9])
    assert terms["vf_loss"][0, :2].tolist() == pytest.approx([0.845, 0.5])
    assert terms["ratio"][0].tolist() == pytest.approx([1.5, 0.9, 1.0])  # padding: log-ratio masked to 0
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert grad[0].tolist() == pytest.approx([0.0, 0.45, 0.0], abs=1e-12)  # −A·ρ/n on the unclipped token only
    bare, _ = ppo_loss(logprobs, old, adv, v, v_old, ret, mask, torch.tensor(2.0, **d), **kw)  # no optional terms
    assert bare.item() == pytest.approx(-0.75 + 0.06725, abs=1e-12)


def test_kl_penalty_parts_k1_in_the_reward_exact_kl_in_the_loss():
    """KLPenalty: k1 puts −β·log-ratio in the reward and has no loss part; analytic on ONE state puts nothing
    in the reward (no later state) and β·scale·KL(π‖π_ref) in the loss, by hand for a two-token vocabulary."""
    logp, ref = torch.tensor([[[math.log(0.8), math.log(0.2)]]]), torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    sampled, ref_sampled, mask = logp[..., 0], ref[..., 0], torch.ones(1, 1)
    rewards, kl = KLPenalty("k1", 0.0).reward(sampled, ref_sampled, mask, beta=2.0)
    assert rewards.item() == pytest.approx(-2.0 * math.log(0.8 / 0.5)) and kl.item() == pytest.approx(math.log(1.6))
    assert KLPenalty("k1", 0.0).loss(logp, ref, mask, 2.0, torch.tensor(1.0), torch.tensor(1.0)) is None
    exact = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    rewards, kl = KLPenalty("analytic", 0.0).reward(sampled, ref_sampled, mask, 2.0, old_full=logp, ref_full=ref)
    assert rewards.item() == 0.0 and kl.item() == pytest.approx(exact)
    loss = KLPenalty("analytic", 0.0).loss(logp, ref, mask, 2.0, torch.tensor(0.5), torch.tensor(1.0))
    assert loss.item() == pytest.approx(2.0 * 0.5 * exact)


def test_blend_takes_the_prompts_state_by_k1_and_later_states_partly_exact():
    assert k1_shares("blend", 0.3, 4).tolist() == pytest.approx([1.0, 0.3, 0.3, 0.3])
    assert k1_shares("k1", 0.3, 2).tolist() == [1.0, 1.0] and k1_shares("analytic", 0.3, 2).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------- bandit: exact optima


OTHER_TABLE = '[[" 3",0.8],[" 9",0.6],[" 1",0.3],[" 5",-0.5]]'  # not the default one: nothing tuned to it


@pytest.mark.parametrize("beta,alpha,table,estimator", [
    (1.0, 0.0, "default", None), (1.0, 0.0, "other", None), (0.1, 0.0, "default", None), (0.1, 0.0, "other", None),
    (0.1, 0.01, "other", None), (0.1, 0.05, "default", None), (0.1, 0.05, "other", None),
    (0.1, 0.0, "other", "k1"), (1.0, 0.0, "default", "analytic")])
def test_bandit_reaches_the_closed_form(base, tmp_path, beta, alpha, table, estimator):
    """π* ∝ π0^(β/(α+β))·exp(r/(α+β)) over the whole vocabulary, with PPO's default mechanics
    (whitened advantages, the entropy bonus in the reward, centred scores, the value head, the default
    KL estimator: None), with k1, and with the analytic estimator at β = 1 (the bandit's one state: the
    loss term alone carries it)."""
    extra = [] if table == "default" else [f"world.rewards={OTHER_TABLE}"]
    extra += [] if estimator is None else [f"ppo.kl_estimator={estimator}"]
    out = train_ppo(_bandit(base, tmp_path, f"ppo.kl_coef={beta}", f"ppo.ent_coef={alpha}", *extra))
    final = json.loads((out / "metrics.json").read_text())
    assert final["bandit/tv_to_optimum"] <= 0.01, final
    first = _rows(out)[0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=0.02)  # step 1 samples from the base


def test_the_kl_direct_term_alone_holds_a_one_token_bandit_at_its_optimum(base, tmp_path):
    """Issue 25: a trainer-level check of the KL penalty's LOSS part (KLPenalty.loss). On one-token episodes
    kl_estimator=analytic puts no KL in the reward (there is no later state), so β reaches the update only
    through the direct term β·(1/std A)·KL(π(·|s)‖π_ref(·|s)). train_ppo must then end at π* ∝ π0·e^{r/β}
    with the closed form's KL to the base; without the term it would maximise the reward alone (β = 0)."""
    beta = 1.0
    out = train_ppo(_bandit(base, tmp_path, f"ppo.kl_coef={beta}", "ppo.kl_estimator=analytic",
                            f"world.rewards={OTHER_TABLE}"))
    final = json.loads((out / "metrics.json").read_text())
    cfg = _cfg(base, tmp_path, "world=bandit", f"world.rewards={OTHER_TABLE}")
    model, tokenizer = load_pretrained(base)
    pi0 = next_token_probs(model, tokenizer, cfg.world.prompt)
    r = reward_vector(tokenizer, cfg.world, len(pi0))
    target = optimum(pi0, r, beta)
    assert total_variation(target, optimum(pi0, r, 0.0)) > 0.9  # the reward alone would end far from π*
    assert final["bandit/tv_to_optimum"] <= 0.01, final
    assert final["bandit/kl"] == pytest.approx(kl_divergence(target, pi0), abs=0.005), final


@pytest.fixture(scope="module")
def number_base(tmp_path_factory):
    """A test-sized base pretrained long enough to answer number prompts with " n" then EOS (the
    sequence bandit needs its rewarded answers within reach of sampling)."""
    overrides = [o for o in TINY_PRETRAIN if not o.startswith("pretrain.steps")]
    overrides += ["model.vocab_size=600", "pretrain.tokenizer_docs=2000", "pretrain.steps=300", "pretrain.save_every=300"]
    return str(pretrain(compose("lab", overrides + [f"checkpoints_dir={tmp_path_factory.mktemp('nbase')}"])))


@pytest.mark.parametrize("estimator", ["k1", "analytic", "blend"])
def test_answers_of_different_lengths_with_the_same_reward_end_at_their_base_odds(number_base, tmp_path, estimator):
    """The sequence bandit: " 7" (one token, then EOS) and " 10" (two, then EOS; about as likely under
    this base) both earn 1, everything else 0. π*(y) ∝ π0(y)·e^{r(y)/β} keeps their base odds: a
    length-biased credit assignment (the score on the last token, V = 0 at first, λ < 1) would
    favour the shorter one."""
    table = '[[" 7",1.0],[" 10",1.0]]'
    out = train_ppo(_bandit(number_base, tmp_path, "ppo.kl_coef=0.1", f"world.rewards={table}", "world.max_tokens=3",
                            f"ppo.kl_estimator={estimator}"))
    final = json.loads((out / "metrics.json").read_text())
    assert final["bandit/table_mass"] > 0.9, final  # the policy found the rewarded answers
    assert final["bandit/p/7"] == pytest.approx(final["bandit/optimum/7"], abs=0.03), final
    assert final["bandit/tv_to_optimum"] <= 0.03, final


def test_trust_region_holds_each_update_and_keeps_the_optimum(base, tmp_path):
    """ppo.trust_region_coef=c adds c·KL(π_old(·|s)‖π_θ(·|s)) over the vocabulary at each visited state. With
    4 updates per batch (2 epochs of 2 minibatches) it holds the policy closer to π_old within each batch,
    and since its gradient is 0 at π_θ = π_old, PPO still reaches the bandit's closed form."""
    several = ["ppo.ppo_epochs=2", "ppo.minibatch_size=128", "ppo.kl_coef=0.1", f"world.rewards={OTHER_TABLE}"]
    free = train_ppo(_bandit(base, tmp_path, *several))
    held = train_ppo(_bandit(base, tmp_path, *several, "ppo.trust_region_coef=10"))
    moved = lambda out: np.mean([r["policy/approxkl"] for r in _rows(out)[:20]])  # while far from π*
    assert moved(held) < 0.5 * moved(free), (moved(held), moved(free))
    assert all(r["policy/state_kl_moved"] >= 0 for r in _rows(held)) and "policy/state_kl_moved" not in _rows(free)[0]
    tv = lambda out: json.loads((out / "metrics.json").read_text())["bandit/tv_to_optimum"]
    assert tv(held) <= 0.01 and tv(free) <= 0.02, (tv(held), tv(free))  # 4 updates a batch: noisier than 1


def test_analytic_kl_as_a_loss_term_misses_the_closed_form_at_small_beta(base, tmp_path):
    """ppo.kl_estimator=analytic gives up k1's control variate: at π* the k1 reward r − β·log π/π0 is the
    same for every answer, so k1's gradient noise vanishes there, where analytic's advantages keep the
    spread of r and Adam keeps the policy moving around π*. At β = 1 it reaches π* (above); at β = 0.1,
    with 5 nats between π* and π0, it does not (with or without whitening: README, PPO)."""
    out = train_ppo(_bandit(base, tmp_path, "ppo.kl_coef=0.1", "ppo.kl_estimator=analytic", f"world.rewards={OTHER_TABLE}"))
    assert json.loads((out / "metrics.json").read_text())["bandit/tv_to_optimum"] > 0.02


def test_entropy_bonus_as_a_loss_term_misses_the_closed_form(base, tmp_path):
    """CleanRL's −α·H(π(·|s)) loss term (ppo.entropy_bonus=loss) is scaled by 1/std(A) under whitening,
    a batch statistic: its balance with the reward drifts, so it does not reach π0^(2/3)·e^{r/0.15}."""
    out = train_ppo(_bandit(base, tmp_path, "ppo.kl_coef=0.1", "ppo.ent_coef=0.05", "ppo.entropy_bonus=loss"))
    assert json.loads((out / "metrics.json").read_text())["bandit/tv_to_optimum"] > 0.02


def test_adaptive_kl_reaches_its_target(base, tmp_path, target=1.0):
    """klauto over a run of the default length: the exact KL(π‖π0) over the run's last fifth (evaluated every
    5 steps) is within 20% of ppo.kl_target. One evaluation alone is not the measure: at the test's rate a
    bandit policy's exact KL jitters from one evaluation to the next while β stays put (README: klauto)."""
    steps = compose("lab", []).ppo.steps
    cfg = _bandit(base, tmp_path, "recipe=klauto", f"ppo.kl_target={target}", f"ppo.steps={steps}",
                  "ppo.log_every=5", f"world.rewards={OTHER_TABLE}")
    rows = [r for r in _rows(train_ppo(cfg)) if "bandit/kl" in r]
    assert rows[-1]["step"] == steps
    end = [r["bandit/kl"] for r in rows if r["step"] > 0.8 * steps]
    assert len(end) >= 8 and sum(end) / len(end) == pytest.approx(target, rel=0.2), end
    assert rows[-1]["objective/kl_coef"] != pytest.approx(cfg.ppo.kl_coef, rel=0.2)  # β had to move


def test_kl0_drives_mass_to_the_best_token(base, tmp_path):
    out = train_ppo(_bandit(base, tmp_path, "recipe=kl0", "ppo.lr=2e-2", "ppo.steps=30", "ppo.log_every=30"))
    assert json.loads((out / "metrics.json").read_text())["bandit/best_token_prob"] > 0.95


def test_adam_eps_far_above_the_gradients_makes_the_policys_step_sgd_with_rate_lr_over_eps(base, tmp_path):
    """`ppo.adam_eps` reaches the POLICY's AdamW group: at eps = 1e3 (far above any gradient's RMS) Adam's step is
    lr·m̂/eps, so lr 2e-2 barely moves the policy in 30 steps where the default eps (1e-5, a sign-like step of ~lr)
    puts almost all mass on the best token; lr 2e-2 × 1e3 at eps 1e3 moves it again (momentum SGD at rate 20)."""
    run = lambda tag, *o: json.loads((train_ppo(_bandit(base, tmp_path / tag, "recipe=kl0", "ppo.steps=30",  # noqa: E731
                                                        "ppo.log_every=30", *o)) / "metrics.json").read_text())
    adam = run("adam", "ppo.lr=2e-2")
    still = run("still", "ppo.lr=2e-2", "ppo.adam_eps=1000")
    sgd = run("sgd", "ppo.lr=20", "ppo.adam_eps=1000")
    assert adam["bandit/best_token_prob"] > 0.95 and still["bandit/kl"] < 1e-3
    assert sgd["bandit/kl"] > 100 * max(still["bandit/kl"], 1e-6)


def test_bandit_table_must_be_single_tokens(base, tmp_path):
    with pytest.raises(ConfigError, match="not one token"):
        train_ppo(_bandit(base, tmp_path, 'world.rewards=[[" 13",1.0]]'))


# ------------------------------------------------------------ the language-model world


@pytest.mark.parametrize("recipe", PPO_RECIPES)
def test_every_ppo_recipe_runs(base, tmp_path, recipe):
    cfg = _cfg(base, tmp_path, f"recipe={recipe}", "ppo.steps=2", "ppo.rollout_batch_size=8",
               "ppo.minibatch_size=4", "ppo.ppo_epochs=2")
    out = train_ppo(cfg)
    rows, manifest = _rows(out), read_manifest(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/clipfrac",
                "policy/approxkl", "val/vf_loss", "objective/kl_coef"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert manifest["status"] == "finished" and manifest["samples_scored"] == 16 and manifest["steps"] == 2
    assert manifest["tokens_trained"] > 0 and manifest["base_path"] == base
    # evaluated along training (curve.points, frontier.py): both steps; reward=gold counts every rollout rated,
    # and a run with β or α is measured against its own optimum
    assert [r["budget/samples_scored"] for r in rows if "frontier/kl" in r] == [8, 16]
    assert ("optimum/tv" in rows[-1]) == (cfg.ppo.kl_coef + cfg.ppo.ent_coef > 0)
    assert all(r["objective/kl_coef"] > 0 for r in rows) or cfg.ppo.kl_coef == 0  # klauto's β stays positive
    assert OmegaConf.load(out / "config.yaml").ppo.kl_coef == cfg.ppo.kl_coef
    policy, _ = load_pretrained(str(out))  # the saved policy is an ordinary HF causal LM
    reference, _ = load_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters()))
    assert "finished" in str(train_ppo(cfg)) or read_manifest(out)["status"] == "finished"


def test_ppo_curve_points_override_the_shared_curve_schedule(base, tmp_path):
    """ppo.curve_points sets a PPO run's along-training evaluations (curve.points is per Trainer run, a FeedME
    round): curve.points=1 alone evaluates steps 1 and 4 of 4; ppo.curve_points=4 every step."""
    common = ("ppo.steps=4", "ppo.rollout_batch_size=8", "ppo.minibatch_size=8", "curve.points=1")
    steps = lambda out: [r["step"] for r in _rows(out) if "frontier/kl" in r]  # noqa: E731
    assert steps(train_ppo(_cfg(base, tmp_path / "a", *common))) == [1, 4]
    assert steps(train_ppo(_cfg(base, tmp_path / "b", *common, "ppo.curve_points=4"))) == [1, 2, 3, 4]


def test_curve_max_gap_adds_points_where_the_policy_moves_and_flags_them(base, tmp_path):
    """curve.max_gap: any step whose probe moved more than the gap gets a point too, flagged frontier/by_gap; a tiny
    gap evaluates every step of a moving policy, a huge one only the schedule."""
    common = ("ppo.steps=4", "ppo.rollout_batch_size=8", "ppo.minibatch_size=8", "ppo.lr=1e-3", "curve.points=1")
    rows = lambda out: [r for r in _rows(out) if "frontier/kl" in r]  # noqa: E731
    tight = rows(train_ppo(_cfg(base, tmp_path / "a", *common, "curve.max_gap=1e-9")))
    assert [r["step"] for r in tight] == [1, 2, 3, 4]
    assert [r["step"] for r in tight if r.get("frontier/by_gap") == 1.0] == [2, 3]  # 1 and 4: the schedule's
    loose = rows(train_ppo(_cfg(base, tmp_path / "b", *common, "curve.max_gap=100")))
    assert [r["step"] for r in loose] == [1, 4] and not any("frontier/by_gap" in r for r in loose)
    same = [r["frontier/kl"] for r in tight if r["step"] in (1, 4)]  # the same run, measured more often
    assert [r["frontier/kl"] for r in loose] == pytest.approx(same, rel=1e-3)


@pytest.mark.parametrize("value_model", ["separate", "shared", "head"])
def test_first_minibatch_ratio_is_one_and_values_come_from_the_chosen_model(base, tmp_path, value_model):
    """One epoch of one minibatch: the update's log-probs (a fresh forward over micro-batches, each
    cut to its own width) equal the sampler's (the generation's logits), so ratio = 1, approxkl = 0."""
    cfg = _cfg(base, tmp_path, "ppo.steps=1", "ppo.rollout_batch_size=16", "ppo.minibatch_size=16",
               "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=12", f"ppo.value_model={value_model}")
    row = _rows(train_ppo(cfg))[0]
    assert row["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert row["policy/approxkl"] < 1e-9 and row["policy/clipfrac"] == 0
    assert row["val/mean"] == 0  # every value head starts at 0
    assert row["val/vf_loss"] > 0


def test_value_model_choices_are_checked(base, tmp_path):
    with pytest.raises(ConfigError, match="ppo.value_model.*separate"):
        _cfg(base, tmp_path, "ppo.value_model=tied")


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_rollout_values_from_generation_match_a_forward_pass(base, chunk):
    """shared/head read V(s_t) off generate's hidden states: the same as a forward over the rollout;
    generated in chunks of similar prompt length, rows come back in the prompts' order, re-padded."""
    from collapse_lab.models.rollout import generate_by_length, response_logits, select

    policy, tok = load_pretrained(base)
    torch.manual_seed(0)
    prompts = ["Q: Name a random number between 1 and 100, please.\nA:", "Q: Pick a number.\nA:", "Q: One?\nA:"] * 2
    r = generate_by_length(policy, tok, prompts, max_new_tokens=6, hidden=True, chunk=chunk)
    for i, text in enumerate(prompts):
        assert tok.decode(r.input_ids[i, :r.query_len][r.attention_mask[i, :r.query_len].bool()]) == text
    logits, h = response_logits(policy, r, hidden=True)
    m = r.response_mask.bool()
    assert torch.allclose(r.hidden[m], h[m], atol=1e-4)
    assert torch.allclose(torch.log_softmax(logits, -1).gather(2, r.responses.unsqueeze(-1)).squeeze(-1)[m],
                          r.logprobs[m], atol=1e-4)
    one = select(r, torch.tensor([0]))  # cut to its own response length
    assert one.responses.shape[1] == int(r.response_mask[0].sum()) <= r.responses.shape[1]


def test_shared_prompt_forward_has_the_logits_and_gradient_of_separate_rows(base):
    """response_logits runs each distinct prompt once and indexes its KV cache to every row: the
    same logits, and the same gradient, as a plain forward over every (prompt + response) row."""
    from collapse_lab.models.rollout import position_ids, response_logits

    policy, tok = load_pretrained(base)
    r = _prompts_and_responses(tok)
    plain = policy(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=position_ids(r.attention_mask),
                   use_cache=False).logits[:, r.query_len - 1:-1]
    shared = response_logits(policy, r)
    m = r.response_mask.bool()
    assert torch.allclose(plain[m], shared[m], atol=1e-4)
    params = list(policy.parameters())
    grads = [torch.autograd.grad((x.log_softmax(-1)[..., 7] * r.response_mask).sum(), params) for x in (plain, shared)]
    scale = max(g.abs().max() for g in grads[0])
    assert max((a - b).abs().max() for a, b in zip(*grads)) <= 1e-5 * scale


def _prompts_and_responses(tok, seed=0):
    """A rollout of repeated prompts of different lengths, with rows that end early (one at its first token)."""
    from collapse_lab.models.rollout import Rollout, encode_prompts

    torch.manual_seed(seed)
    prompts = ["Q: Pick a number between 1 and 10.\nA:", "$ shuf -i 0-50 -n 1\noutput:"] * 3 + ["Q: One?\nA:"]
    batch = encode_prompts(tok, prompts, "cpu")
    responses = torch.randint(0, 300, (len(prompts), 4))
    rmask = torch.ones_like(responses)
    rmask[0, 2:], rmask[3, 1:], rmask[6, 3:] = 0, 0, 0  # rows ended early (row 3: EOS first)
    responses[rmask == 0] = tok.pad_token_id
    return Rollout(torch.cat([batch["input_ids"], responses], 1), torch.cat([batch["attention_mask"], rmask], 1),
                   rmask, rmask[:, -1] == 0, [""] * len(prompts), batch["input_ids"].shape[1])


def _packable_model(base, arch: str, attention: str):
    """A tiny random model of `arch` for the base's tokenizer ("lora": the base under a moving LoRA adapter),
    with `attention` as its kernel."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from collapse_lab.models.models import add_lora
    from collapse_lab.models.rollout import PACKABLE

    policy, tok = load_pretrained(base)
    torch.manual_seed(1)
    if arch == "lora":
        policy = add_lora(policy, compose("lab", ["peft.enabled=true", "peft.r=4"]).peft, task_type="CAUSAL_LM")
        for name, w in policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(w, std=0.1)  # an adapter that moves the outputs
        policy.config._attn_implementation = attention
    else:
        assert arch in PACKABLE
        config = AutoConfig.for_model(arch, vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, n_inner=64,
                                      rotary_pct=0.5, pad_token_id=tok.pad_token_id, attn_implementation=attention)
        policy = AutoModelForCausalLM.from_config(config).eval()
    return policy, tok


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "lora"])
def test_packed_forward_has_the_logits_hidden_states_and_gradient_of_the_cached_one(base, arch, attention):
    """PPO's forwards pack each prompt's completions after one copy of it (block-causal mask, positions
    restarting at the prompt's length): the logits, hidden states and gradient of `response_logits`, on
    every model type `packs` allows, under both attention kernels that take the mask, and through LoRA."""
    from collapse_lab.models.rollout import packed_response_logits, packs, response_logits

    policy, tok = _packable_model(base, arch, attention)
    r = _prompts_and_responses(tok)
    assert packs(policy) and policy.config._attn_implementation == attention
    m = r.response_mask.bool()
    (cached, h_cached), (packed, h_packed) = (f(policy, r, 0.7, hidden=True) for f in (response_logits,
                                                                                      packed_response_logits))
    assert packed.shape == cached.shape and h_packed.shape == h_cached.shape
    assert torch.allclose(packed[m], cached[m], atol=1e-5) and torch.allclose(h_packed[m], h_cached[m], atol=1e-5)
    params = [w for w in policy.parameters() if w.requires_grad]
    weights = torch.randn(r.response_mask.shape)  # per-token advantages
    grads = [torch.autograd.grad(((x.log_softmax(-1)[..., 7] + h.sum(-1)) * weights * r.response_mask).sum(), params)
             for x, h in ((cached, h_cached), (packed, h_packed))]
    scale = max(g.abs().max() for g in grads[0])
    assert max((a - b).abs().max() for a, b in zip(*grads)) <= 1e-5 * scale


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "lora"])
def test_packed_sampling_draws_the_cache_paths_tokens_and_log_probs(base, arch, attention):
    """`generate` on one packed sequence (PackedDecoder: each prompt once, each step's tokens of the rows still
    going appended under a mask) draws, from the same seed, the tokens of the per-row cache path
    (CacheDecoder), with its log-probs, entropies and hidden states, while rows that have ended leave the
    batch and others sample on."""
    from collapse_lab.models.rollout import generate

    policy, tok = _packable_model(base, arch, attention)
    prompts = ["Q: Pick a number between 1 and 10.\nA:", "$ shuf -i 0-50 -n 1\noutput:", "Q: One?\nA:"] * 3 + ["A:"]

    def sample(packed: bool):
        torch.manual_seed(0)
        return generate(policy, tok, prompts, max_new_tokens=5, temperature=0.9, hidden=True, packed=packed)

    # a random model seldom samples EOS: let the second token row 0 samples be the end of text instead
    tok.eos_token = tok.convert_ids_to_tokens(int(sample(False).responses[0, 1]))
    cached, packed = sample(False), sample(True)
    widths = cached.response_mask.sum(1)
    assert widths.min() < widths.max() == 5, widths  # some rows ended while others sampled on
    assert torch.equal(cached.input_ids, packed.input_ids) and torch.equal(cached.response_mask, packed.response_mask)
    m = cached.response_mask.bool()
    for a, b in ((cached.logprobs, packed.logprobs), (cached.entropy, packed.entropy), (cached.hidden, packed.hidden)):
        assert torch.allclose(a[m], b[m], atol=1e-5)


def test_a_packed_sequence_past_the_cap_runs_per_row(base, monkeypatch):
    """A packed sequence's mask and dense attention grow as its length squared: past PACKED_MAX_TOKENS sampling
    and the update's forward take the per-row cache path (same results, tested above)."""
    from collapse_lab.models import rollout

    policy, tok = load_pretrained(base)
    r = _prompts_and_responses(tok)
    used = []
    cache_forward, packed_decoder = rollout.response_logits, rollout.PackedDecoder
    monkeypatch.setattr(rollout, "response_logits", lambda *a, **k: used.append("rows") or cache_forward(*a, **k))
    monkeypatch.setattr(rollout, "PackedDecoder", lambda *a: used.append("packed") or packed_decoder(*a))
    prompts = ["Q: Pick a number between 1 and 10.\nA:"] * 4
    for cap, expected in ((rollout.PACKED_MAX_TOKENS, ["packed"]), (20, ["rows"])):
        monkeypatch.setattr(rollout, "PACKED_MAX_TOKENS", cap)
        used.clear()
        rollout.packed_response_logits(policy, r)
        rollout.generate(policy, tok, prompts, max_new_tokens=3)
        assert used == expected, (cap, used)


def test_packing_is_only_for_the_model_types_and_kernels_tested_with_it(base):
    from collapse_lab.models.rollout import packs

    policy = load_pretrained(base)[0]
    assert packs(policy)
    policy.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask
    assert not packs(policy)
    policy.config._attn_implementation = "sdpa"
    policy.config.model_type = "t5"
    assert not packs(policy)


def test_distinct_sequences_forward_once_with_the_logits_and_gradient_of_every_row(base):
    """A collapsing policy repeats its answers: the no-gradient forwards (reference, π_old) run each distinct
    (prompt, response) once (rollout.distinct_rows, by_prompt_length) and index it back, with the logits,
    and the gradient, of a forward over every row."""
    from collapse_lab.models.rollout import (Rollout, by_prompt_length, distinct_rows, encode_prompts, response_logits, take,
                                      token_logprobs)

    policy, tok = load_pretrained(base)
    torch.manual_seed(0)
    prompts = ["Q: Pick a number between 1 and 10.\nA:", "$ shuf -i 0-50 -n 1\noutput:", "Q: One?\nA:"] * 4
    batch = encode_prompts(tok, prompts, "cpu")
    responses = torch.randint(0, 300, (3, 3))[torch.tensor([0, 1, 2, 0, 0, 2] * 2)]  # 6 distinct of 12 rows
    responses[6:, 2] = responses[:6, 2] + 1
    rmask = torch.ones_like(responses)
    rmask[[0, 3], 2:] = 0  # rows 0 and 3 ended early: equal with their padding
    responses[[0, 3], 2:] = tok.pad_token_id
    r = Rollout(torch.cat([batch["input_ids"], responses], 1), torch.cat([batch["attention_mask"], rmask], 1),
                rmask, rmask[:, -1] == 0, [""] * len(prompts), batch["input_ids"].shape[1])
    first, inverse = distinct_rows(r)
    rows = torch.cat([r.input_ids, r.attention_mask], 1)
    assert torch.equal(rows[first][inverse], rows) and len(first) == len(torch.unique(rows, dim=0)) < len(prompts)
    assert int(inverse[0]) == int(inverse[3]) != int(inverse[6])

    every = token_logprobs(response_logits(policy, r), r.responses)
    once = take(r, first)
    indexed = token_logprobs(response_logits(policy, once), once.responses)[inverse]
    m = rmask.bool()
    assert torch.allclose(every[m], indexed[m], atol=1e-5)
    weights = torch.randn(responses.shape)  # a loss that differs between a sequence's repeats (the advantages)
    params = list(policy.parameters())
    grads = [torch.autograd.grad((x * weights * rmask).sum(), params) for x in (every, indexed)]
    scale = max(g.abs().max() for g in grads[0])
    assert max((a - b).abs().max() for a, b in zip(*grads)) <= 1e-5 * scale
    with torch.no_grad():
        for chunk in (1, 2, 5):
            chunked = by_prompt_length(r, lambda x: token_logprobs(response_logits(policy, x), x.responses), chunk)
            assert chunked.shape == every.shape and torch.allclose(chunked[m], every[m], atol=1e-5), chunk


def test_resume_after_interruption_matches_an_uninterrupted_run(base, tmp_path, monkeypatch):
    common = ("ppo.steps=6", "ppo.save_every=2", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4")
    whole = _rows(train_ppo(_cfg(base, tmp_path / "a", *common)))

    real, calls = ppo_module.make_reward, {"n": 0}

    def dies_at_step_5(*a, **k):
        reward = real(*a, **k)

        def scored(*x):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt  # killed mid-step, after the step-4 checkpoint
            return reward(*x)

        scored.reseed = reward.reseed
        return scored

    monkeypatch.setattr(ppo_module, "make_reward", dies_at_step_5)
    cfg = _cfg(base, tmp_path / "b", *common)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(cfg)
    assert read_manifest(ppo_module.ppo_dir(cfg))["status"] == "running"
    monkeypatch.setattr(ppo_module, "make_reward", real)
    resumed = _rows(train_ppo(cfg))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    drop = ("time/step_s",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(base, tmp_path, monkeypatch):
    real, calls = ppo_module.make_reward, {"n": 0}

    def nan_at_step_3(*a, **k):
        reward = real(*a, **k)

        def scored(*x):
            calls["n"] += 1
            s = reward(*x)
            return s * float("nan") if calls["n"] == 3 else s

        scored.reseed = reward.reseed
        return scored

    monkeypatch.setattr(ppo_module, "make_reward", nan_at_step_3)
    cfg = _cfg(base, tmp_path, "ppo.steps=4", "ppo.save_every=2", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4")
    with pytest.raises(FloatingPointError, match="non-finite PPO loss at step 3.*step-2"):
        train_ppo(cfg)
    out = ppo_module.ppo_dir(cfg)
    assert read_manifest(out)["status"] == "failed"
    assert (out / "checkpoints" / "step-2").is_dir()


def test_lora_trains_only_the_adapter_and_the_reference_is_the_base(base, tmp_path):
    cfg = _cfg(base, tmp_path, "peft.enabled=true", "peft.r=4", "ppo.steps=2", "ppo.rollout_batch_size=8",
               "ppo.minibatch_size=8", "ppo.lr=1e-2")
    out = train_ppo(cfg)
    rows = _rows(out)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # adapter B = 0 at start: π = π_ref
    assert rows[1]["objective/kl"] != 0.0
    assert (out / "adapter" / "adapter_config.json").exists()
    merged, _ = load_pretrained(str(out))
    reference, _ = load_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(merged.parameters(), reference.parameters()))


def test_real_model_preset_runs_the_same_code(tmp_path, base):
    """model=gpt2 pointed at a tiny GPT-2 built from a config (no hub): same trainer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path / "gpt2-tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = compose("lab", ["wandb.mode=disabled", "model=gpt2", f"model.path={path}", f"checkpoints_dir={tmp_path}",
                          "model.dtype=float32", "ppo.steps=1", "ppo.rollout_batch_size=4", "ppo.samples_per_prompt=4",
                          "ppo.minibatch_size=4"])
    out = train_ppo(cfg)
    assert read_manifest(out)["base_path"] == str(path) and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_through_accelerate(base, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = launch_on_cpu(2, "train/ppo.py", "recipe=kl0.1", f"base_path={base}", f"checkpoints_dir={tmp_path}",
                        "name=two", "wandb.mode=disabled", "ppo.steps=2", "ppo.rollout_batch_size=8",
                        "ppo.samples_per_prompt=4", "ppo.minibatch_size=4")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, launch_failure(done.stderr)
    out = tmp_path / "ppo" / "two"
    manifest = read_manifest(out)
    assert manifest["world_size"] == 2 and manifest["samples_scored"] == 16  # the GLOBAL batch, 2 x 4
    assert len(_rows(out)) == 2 and not list(tmp_path.glob("ppo/*/")) == []
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == ["two"]  # one run directory
    bad = subprocess.run([*cmd[:-2], "ppo.rollout_batch_size=9", "ppo.minibatch_size=9", "name=bad"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "not divisible by 2" in bad.stderr

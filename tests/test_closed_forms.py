"""The regimes' closed forms on the exact bandit, through TRL's own trainers on a tabular policy
(collapse_lab/regimes/closed_forms.py): DPO on Bradley–Terry pairs and RLOO with the KL in the reward reach
π* ∝ π0·e^{r/β}; GRPO lands on its own, stated fixed point, which is not π*. Two reward tables: the world's
default one and another (nothing tuned to either)."""

import numpy as np
import pytest
import torch

from collapse_lab.regimes import closed_forms as cf
from collapse_lab.world.bandit import TabularConfig, TabularPolicy, optimum, total_variation

TABLES = {"default": cf.DEFAULT_TABLE, "other": cf.OTHER_TABLE}
BETA = 1.0


def _pi0():
    return TabularPolicy(TabularConfig(base_logits=cf.BASE_LOGITS)).probs()


def test_group_advantage_matches_monte_carlo():
    rng = np.random.default_rng(0)
    pi = np.array([0.5, 0.3, 0.2])
    r = np.array([0.0, 1.0, 0.3])
    exact = cf.group_advantage(pi, r, G=3)
    others = rng.choice(3, size=(200000, 2), p=pi)
    for a in range(3):
        g = np.concatenate([np.full((len(others), 1), a), others], 1)
        s = r[g]
        mc = ((s[:, 0] - s.mean(1)) / (s.std(1, ddof=1) + 1e-4)).mean()
        assert exact[a] == pytest.approx(mc, abs=0.01)
    assert (pi * exact).sum() == pytest.approx(0.0, abs=1e-9)  # group-centred: E[A] = 0


def test_grpo_fixed_point_is_stationary_and_not_pi_star():
    pi0, r = _pi0(), cf.reward_vector(cf.OTHER_TABLE)
    fp = cf.grpo_fixed_point(pi0, r, BETA, G=4)
    tilt = pi0.numpy() * np.exp(cf.group_advantage(fp.numpy(), r.numpy(), 4) / BETA)
    assert total_variation(fp, torch.tensor(tilt / tilt.sum())) < 1e-6  # π ∝ π0·e^{E[A|a]/β}
    assert total_variation(fp, optimum(pi0, r, BETA)) > 0.1  # not π*: further from the base
    assert total_variation(fp, pi0) > total_variation(optimum(pi0, r, BETA), pi0)


@pytest.mark.parametrize("table", TABLES)
def test_rloo_with_the_kl_in_the_reward_reaches_pi_star(tmp_path, table):
    res = cf.run_online("rloo", tmp_path, TABLES[table], BETA, steps=50)
    assert res["tv_base_to_optimum"] > 0.05  # the test could fail: π* is not the base
    assert res["tv_to_optimum"] <= 0.02, res["tv_to_optimum"]


@pytest.mark.slow
def test_dpo_on_bradley_terry_pairs_reaches_pi_star(tmp_path):
    res = cf.run_dpo(tmp_path, cf.OTHER_TABLE, BETA, pairs=30000)
    assert res["tv_base_to_optimum"] > 0.05
    assert res["tv_to_optimum"] <= 0.02, res["tv_to_optimum"]


@pytest.mark.slow
def test_grpo_lands_on_its_stated_fixed_point_not_pi_star(tmp_path):
    res = cf.run_online("grpo", tmp_path, cf.OTHER_TABLE, BETA, steps=80)
    assert res["tv_to_grpo_fixed_point"] <= 0.02, res["tv_to_grpo_fixed_point"]
    assert res["tv_to_optimum"] > 0.1 and res["tv_grpo_fixed_point_to_optimum"] > 0.1

"""The closed-form reference curves (collapse_lab/evaluation/reference_curves.py) against naive computations, the graded
rater's properties, and the matched comparison's interpolation artefact (collapse_lab/evaluation/matched.py)."""

import itertools
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from collapse_lab.evaluation import matched, metrics
from collapse_lab.evaluation import reference_curves as rc
from collapse_lab.core.config import RaterConfig
from collapse_lab.world.world import (HUMAN_FAVOURITES, GoldRater, Prompt, answer_prior, derived_favourites,
                                noisy_score_mean)

P = np.array([0.1, 0.25, 0.05, 0.3, 0.2, 0.1])
MU = np.array([6.0, 6.5, 7.5, 6.0, 6.5, 5.0])  # ties at 6 and 6.5


def naive_best_of_k(p, scores, k):
    """Every k-tuple of draws; the kept draw is the first best-scored (= uniform among tied i.i.d. draws)."""
    out = np.zeros(len(p))
    for draw in itertools.product(range(len(p)), repeat=k):
        best = max(scores[i] for i in draw)
        out[next(i for i in draw if scores[i] == best)] += np.prod([p[i] for i in draw])
    return out


def test_best_of_k_equals_enumeration_with_ties():
    for k in (1, 2, 3):
        assert rc.best_of_k(P, MU, k) == pytest.approx(naive_best_of_k(P, MU, k), abs=1e-12)


def test_noisy_best_of_k_equals_enumeration_over_answers_and_ratings():
    levels = rc.score_level_probs(MU, 0.5)  # (6, 7) P(s | y), s = 1..7
    pairs = [(y, s) for y in range(len(P)) for s in range(levels.shape[1])]
    w = {(y, s): P[y] * levels[y, s] for y, s in pairs}
    out = np.zeros(len(P))
    for draw in itertools.product(pairs, repeat=2):  # k = 2 samples, each (answer, its noisy rating)
        best = max(s for _, s in draw)
        out[next(y for y, s in draw if s == best)] += np.prod([w[x] for x in draw])
    assert rc.noisy_best_of_k(P, levels, 2) == pytest.approx(out, abs=1e-12)
    assert rc.feedme_selection(P, levels, 2, rounds=2) == pytest.approx(
        rc.noisy_best_of_k(rc.noisy_best_of_k(P, levels, 2), levels, 2), abs=1e-15)
    many = rc.feedme_selection(P, levels, 4, rounds=60)  # renormalised each round: no drift to 0
    assert many.sum() == pytest.approx(1.0) and many.argmax() == 2


def test_score_levels_reproduce_the_raters_expected_score():
    for mu in (4.2, 6.0, 6.5, 7.0, 7.5):
        probs = rc.score_level_probs([mu], 0.5)[0]
        assert probs.sum() == pytest.approx(1.0)
        assert probs @ np.arange(1, 8) == pytest.approx(noisy_score_mean(mu, 0.5, True), abs=1e-12)


def test_optimum_is_the_tilted_base():
    r = np.array([6.0, 6.4, 6.9, 6.0, 6.4, 5.0])
    for beta, alpha in ((0.5, 0.0), (0.3, 0.2)):
        naive = P ** (beta / (alpha + beta)) * np.exp(r / (alpha + beta))
        assert rc.optimum(P, r, beta, alpha) == pytest.approx(naive / naive.sum(), rel=1e-12)
    assert rc.optimum(P, r, 0.0) == pytest.approx(np.eye(6)[2])


def _forms(rater_cfg, prior="human", ranges=((0, 100), (1, 100))):
    rater = GoldRater(OmegaConf.structured(rater_cfg))
    out = []
    for lo, hi in ranges:
        prompt = Prompt("t", "numbers", "t", lo, hi)
        answers = [f" {n}" for n in range(lo, hi + 1)]
        p = np.array(answer_prior(prior, lo, hi))
        mu = [np.array([rater.expected(prompt, a, e) for a in answers]) for e in (True, False)]
        mean = [np.array([rater.mean_score(prompt, a, e) for a in answers]) for e in (True, False)]
        out.append(rc.prompt_forms(f"{lo}-{hi}", p, 0 * p, *mu, *mean, rater_cfg.noise_std))
    return out, rater


def test_a_reference_point_is_the_mean_over_prompts_of_exact_kl_and_entropy():
    forms, _ = _forms(RaterConfig())
    x = rc.point(forms, lambda f: rc.optimum(f.p0, f.mean, 0.5))
    qs = [f.answers(rc.optimum(f.p0, f.mean, 0.5)) for f in forms]
    q0s = [f.answers(f.p0) for f in forms]
    assert x["kl"] == pytest.approx(np.mean([metrics.kl(q, q0) for q, q0 in zip(qs, q0s)]), rel=1e-9)
    d = [(metrics.entropy(q) - metrics.entropy(q0)) / math.log(len(q)) for q, q0 in zip(qs, q0s)]
    assert x["d"] == pytest.approx(np.mean(d), rel=1e-9) and x["gold_gain"] > 0


def test_two_level_world_puts_every_ideal_regime_on_one_curve():
    """The theorem the graded rater exists to break: with two score levels best-of-k and π*_β coincide."""
    forms, _ = _forms(RaterConfig(profile="two_level", favourites=[7, 42, 97], preference_strength=1.0))
    sep = rc.separation(rc.best_of_k_curve(forms), rc.optimum_curve(forms), kl_max=2.0)
    assert sep["value"] < 1e-3  # 0 exactly; what is left is the ladders' interpolation


@pytest.mark.parametrize("profile_seed", [0, 1, 2, 3])
def test_graded_world_separates_best_of_k_from_the_optimum(profile_seed):
    """On the human prior (what the base learns), the default graded rater's best-of-k and π*_β curves differ by
    more than twice the verdict's margin (0.02) at matched KL within 2 nats, for several profile seeds."""
    forms, _ = _forms(RaterConfig(profile_seed=profile_seed))
    sep = rc.separation(rc.best_of_k_curve(forms), rc.optimum_curve(forms), kl_max=2.0)
    assert sep["value"] >= 0.04


def test_graded_rater_has_many_levels_partly_against_the_prior():
    _, rater = _forms(RaterConfig())
    prompt = Prompt("t", "numbers", "t", 0, 100)
    scores = [rater.mean_score(prompt, f" {n}") for n in range(101)]
    assert len({round(s, 9) for s in scores}) >= 10
    prior = answer_prior("human", 0, 100)
    bonus = [rater.preference(prompt, n) for n in range(101)]
    assert np.corrcoef(np.argsort(np.argsort(bonus)), np.argsort(np.argsort(prior)))[0, 1] < -0.2  # Spearman
    assert not set(rater.favourites) <= set(HUMAN_FAVOURITES)  # not all favourites on the prior's modes
    assert derived_favourites(3, 0) == derived_favourites(3, 0) != derived_favourites(3, 1)
    flat = GoldRater(OmegaConf.structured(RaterConfig(preference_strength=0.0, graded_strength=0.0)))
    assert len({flat.mean_score(prompt, f" {n}") for n in range(101)}) == 1  # the null world's rater
    two = GoldRater(OmegaConf.structured(RaterConfig(profile="two_level", favourites=[7])))
    assert len({two.expected(prompt, f" {n}") for n in range(101)}) == 2
    with pytest.raises(ValueError, match="valid choices: graded, two_level"):
        GoldRater(OmegaConf.structured(RaterConfig(profile="three")))


def test_feedme_expected_selection_is_its_own_family():
    forms, _ = _forms(RaterConfig())
    fe = rc.feedme_curve(forms, 4, kl_max=2.0)
    assert fe[-1]["kl"] >= 2.0 and fe[-1]["rounds"] > 1  # iterated rounds carry it past 2 nats
    assert [x["kl"] for x in fe] == sorted(x["kl"] for x in fe)


# ------------------------------------------------------------------------ the policy-gradient paths


def test_policy_gradient_is_the_derivative_of_the_regularised_objective_and_vanishes_at_the_optimum():
    rng = np.random.default_rng(0)
    p0, r, theta = rng.dirichlet(np.ones(6)), rng.normal(size=6), rng.normal(size=6)
    beta, alpha = 0.3, 0.1

    def objective(th):
        q = np.exp(th - th.max()) / np.exp(th - th.max()).sum()
        return q @ r - beta * rc.kl(q, p0) + alpha * rc.entropy(q)

    q = np.exp(theta) / np.exp(theta).sum()
    numeric = [(objective(theta + 1e-6 * e) - objective(theta - 1e-6 * e)) / 2e-6 for e in np.eye(6)]
    vanilla = rc.policy_gradient(q, np.log(p0), r, beta, alpha)
    assert vanilla == pytest.approx(numeric, abs=1e-7)
    fisher = np.diag(q) - np.outer(q, q)
    assert fisher @ rc.policy_gradient(q, np.log(p0), r, beta, alpha, natural=True) == pytest.approx(vanilla, abs=1e-12)
    star = rc.optimum(p0, r, beta, alpha)
    for natural in (False, True):
        assert np.abs(rc.policy_gradient(star, np.log(p0), r, beta, alpha, natural)).max() < 1e-12


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_the_natural_gradient_path_is_the_optimum_family(alpha):
    """Fisher-preconditioned ascent from the base passes through π*_{β',α} for every β' > β: its (KL, d) path is
    the family's curve, and it ends at π*_{β,α}."""
    forms, _ = _forms(RaterConfig())
    path = rc.gradient_path(forms, 0.3, alpha, natural=True)
    fam = rc.optimum_curve(forms, alpha=alpha, kl_max=5.0)
    kls = np.array([x["kl"] for x in path])
    assert np.nanmax(np.abs(rc.d_at(path, kls) - rc.d_at(fam, kls))) < 1e-3
    end = rc.point(forms, lambda f: rc.optimum(f.p0, f.mean, 0.3, alpha))
    assert path[-1]["kl"] == pytest.approx(end["kl"], abs=1e-3) and path[-1]["d"] == pytest.approx(end["d"], abs=1e-3)


def test_the_vanilla_gradient_path_concentrates_sooner_than_the_family():
    """Two equally scored answers, one 5× likelier: on π*_β's family their odds stay 5:1 (the tilt multiplies both
    by the same e^{R/β}); a vanilla softmax gradient moves each logit by its own probability, so the likelier gains
    faster and the path has LESS entropy than the family at every KL. With two answers there is one path in the
    simplex, and the vanilla path is the family."""
    def forms(p, r):
        mu = np.asarray(r, float)
        return [rc.prompt_forms("x", np.asarray(p, float), 0 * np.asarray(p, float), mu, mu, mu, mu, 0.5)]

    three = forms([0.5, 0.1, 0.4], [7.0, 7.0, 5.0])
    path, fam = rc.gradient_path(three, 0.5), rc.optimum_curve(three, kl_max=5.0)
    kls = np.array([x["kl"] for x in path[1:]])
    below = rc.d_at(path, kls) - rc.d_at(fam, kls)
    assert (below < 1e-4).all() and below.min() < -0.02
    two = forms([0.7, 0.3], [5.0, 7.0])
    path, fam = rc.gradient_path(two, 0.5), rc.optimum_curve(two, kl_max=5.0)
    kls = np.array([x["kl"] for x in path[1:]])
    assert np.abs(rc.d_at(path, kls) - rc.d_at(fam, kls)).max() < 1e-3
    with pytest.raises(ValueError, match="beta \\+ alpha > 0"):
        rc.gradient_path(two, 0.0)


# ------------------------------------------------------------------ the matched comparison's artefact


def _on_curve(curve, kls):
    return [(k, float(rc.d_at(curve, [k])[0])) for k in kls]


def test_matched_grid_needs_measured_points_on_both_sides():
    a = {0: [(0.2, -0.01), (1.0, -0.05)], 1: [(0.3, -0.01), (1.2, -0.05)]}
    b = {0: [(0.05, 0.0), (0.6, -0.03)], 1: [(0.1, 0.0), (0.8, -0.04)]}
    m = matched.matched(a, b, grid_points=5)
    assert m["x_min"] == pytest.approx(0.3) and m["x_max"] == pytest.approx(0.6)
    assert min(m["grid"]) == pytest.approx(0.3) and max(m["grid"]) == pytest.approx(0.6)
    assert matched.matched({0: [(0.7, 0.0), (0.9, 0.0)]}, {0: [(0.1, 0.0), (0.6, 0.0)]}) is None


def test_artefact_of_the_matched_comparison_is_below_0_002():
    """Points of two regimes placed exactly on one π*_β curve: the true D is 0. PPO-like curves (log-spaced steps,
    far reach) against FeedME-like ones (short reach, overshooting back): |D| ≤ 0.002 with the lab's rule, while
    the old rule (a chord from (0, 0), linear in KL, first PPO point at KL 0.8) is biased well beyond it."""
    forms, _ = _forms(RaterConfig())
    ref = rc.optimum_curve(forms, kl_max=3.0)
    rng = np.random.default_rng(0)
    ppo = {s: _on_curve(ref, 2.5 * (np.geomspace(1, 30, 12) / 30) ** 1.5 * (1 + 0.1 * rng.normal())) for s in range(5)}
    feedme = {s: _on_curve(ref, np.r_[np.geomspace(0.01, 2.2, 10), 1.9, 2.0] * (1 + 0.1 * rng.normal()))
              for s in range(5)}
    on = lambda x: float(rc.d_at(ref, [x])[0])  # noqa: E731
    d = matched.artefact_difference(ppo, feedme, on, grid_points=8)
    assert d is not None and abs(d) <= 0.002
    sparse = {s: [(0.0, 0.0)] + _on_curve(ref, [0.8 + 0.1 * s, 1.6, 2.4]) for s in range(5)}
    short = {s: [(0.0, 0.0)] + _on_curve(ref, np.geomspace(0.01, 0.55, 8)) for s in range(5)}
    old = matched.matched(sparse, short, grid_points=8, sqrt_x=False)  # the old rule: from (0, 0), linear in KL
    assert abs(old["difference"]["mean"]) > 0.002


def test_predicted_call_and_interval_bounds():
    assert rc.predicted_call(0.03, 0.02) == "more entropy" and rc.predicted_call(-0.01, 0.02) == "no difference"
    assert rc.predicted_call(None, 0.02).startswith("no prediction")
    iv = metrics.interval([0.99, 1.0, 0.7], 0.95, bounds=(0.0, 1.0))
    assert iv["hi"] == 1.0 and iv["clipped"] and iv["lo"] >= 0.0


def test_crossed_interval_reduces_to_the_seed_interval_and_widens_with_prompt_spread():
    rng = np.random.default_rng(1)
    seeds = rng.normal(0.0, 0.01, 6)
    flat = np.repeat(seeds[:, None], 4, axis=1)  # no prompt effect, no residual
    iv, ref = matched.crossed_interval(flat), metrics.interval(list(seeds))
    assert iv["mean"] == pytest.approx(ref["mean"]) and iv["hi"] - iv["lo"] == pytest.approx(ref["hi"] - ref["lo"], rel=1e-9)
    spread = flat + rng.normal(0.0, 0.05, 4)[None, :]  # prompts that disagree: a wider interval
    wide = matched.crossed_interval(spread)
    assert wide["hi"] - wide["lo"] > 3 * (iv["hi"] - iv["lo"])


def test_crossed_matches_each_prompt_at_its_own_kl():
    def rows(slopes, kls):
        return [{**{f"frontier/kl/p{i}": k for i in range(len(slopes))},
                 **{f"frontier/delta_norm_entropy/p{i}": s * math.sqrt(k) for i, s in enumerate(slopes)}} for k in kls]
    a = {s: rows([-0.1, -0.2], np.geomspace(0.01, 2.0, 10)) for s in range(3)}
    b = {s: rows([-0.1 - 0.01 * s, -0.2], np.geomspace(0.02, 1.0, 8)) for s in range(3)}
    c = matched.crossed(a, b, grid_points=6)
    assert c["prompts"] == ["p0", "p1"] and c["difference"]["mean"] > 0  # b loses a little more on p0
    assert c["difference"]["mean"] == pytest.approx(np.mean([0.01 * s for s in range(3)]) / 2 * np.mean(
        np.sqrt(matched.grid_between(0.02, 1.0, 6, True))), rel=1e-6)


def test_within_narrows_the_matched_range_to_where_the_regimes_agree():
    """A gap between the regimes that opens only past KL 1: over the full range D is positive, narrowed to [0, 1]
    (matched and, per prompt, crossed) it is zero, and the range reported is the narrowed one."""
    kls = np.r_[np.geomspace(0.02, 1.0, 12), np.geomspace(1.0, 3.0, 12)[1:]]  # 1.0 measured: no chord across it
    gap = lambda k: 0.05 * max(0.0, k - 1.0)  # noqa: E731
    a = {s: [(k, -0.1 * math.sqrt(k) + gap(k)) for k in kls] for s in range(3)}
    b = {s: [(k, -0.1 * math.sqrt(k)) for k in kls] for s in range(3)}
    full, low = matched.matched(a, b), matched.matched(a, b, within=(0.0, 1.0))
    assert full["difference"]["mean"] > 0.01 and low["x_max"] == pytest.approx(1.0)
    assert low["difference"]["mean"] == pytest.approx(0.0, abs=1e-12) and low["x_min"] == pytest.approx(0.02)
    assert matched.matched(a, b, within=(3.5, 4.0)) is None
    rows = lambda pts: [{"frontier/kl/p0": k, "frontier/delta_norm_entropy/p0": d} for k, d in pts]  # noqa: E731
    ra, rb = {s: rows(v) for s, v in a.items()}, {s: rows(v) for s, v in b.items()}
    assert matched.crossed(ra, rb)["difference"]["mean"] == pytest.approx(full["difference"]["mean"])
    assert matched.crossed(ra, rb, within=(0.0, 1.0))["difference"]["mean"] == pytest.approx(0.0, abs=1e-12)


def test_heldout_suite_is_the_worlds_heldout_prompts_and_never_fine_tuned_on():
    import random

    from collapse_lab.core.config import compose
    from collapse_lab.core.suites import load_suite
    from collapse_lab.world.world import World

    cfg = compose("lab", ["world.heldout_templates=true", "world.heldout_eval_prompts=true"]).world
    world = World(cfg)
    suite = load_suite("heldout")
    assert len(suite.prompts) >= 30 and {p.text for p in suite.prompts} == {p.text for p in world.heldout_prompts}
    for p in suite.prompts:  # the rater knows each prompt's range
        assert world.prompt(p.text).low in (0, 1) and len(p.answers) == world.prompt(p.text).high - world.prompt(p.text).low + 1
    rng = random.Random(0)
    drawn = {world.train_prompt(rng).text for _ in range(3000)}
    assert not drawn & {p.text for p in world.heldout_prompts}
    corpus = set(world.corpus(4000, seed=0))
    assert any(t.startswith(p.text) for p in world.heldout_prompts for t in corpus)  # pretraining sees them
    wide = World(compose("lab", ["world.train_min_range=100", "world.heldout_eval_prompts=true"]).world)
    assert {(p.low, p.high) for p in (wide.train_prompt(rng) for _ in range(500))} == {(0, 100), (1, 100)}


def test_report_predicts_each_pair_and_checks_each_regime_against_its_closed_form(tmp_path):
    """A synthetic ablation whose measured curves lie ON the closed forms (PPO on π*_β, FeedME on its expected
    selection): the report's predicted D is the measured one, the calls agree, the artefact is ≤ 0.002, and each
    regime's end point has TV ≈ 0 to its own closed form. Curves that go past rc.KL_MAX (β down to 0.03, 20
    FeedME rounds) still get a prediction: the families are traced as far as the measured points."""
    import json

    from collapse_lab.lab import report

    forms, _ = _forms(RaterConfig())
    base = {"rater": {"noise_std": 0.5, "integer_scores": True}, "prompts": [
        {"id": f.id, "eos_probs": f.p0[:f.n_answers].tolist(), "other_end_probs": f.p0[f.n_answers:-1].tolist(),
         "mu_clean": f.mu[:f.n_answers].tolist(), "mu_other": f.mu[f.n_answers:-1].tolist(),
         "mean_clean": f.mean[:f.n_answers].tolist(), "mean_other": f.mean[f.n_answers:-1].tolist()} for f in forms]}

    def row(policy, shift=0.0):
        x = rc.point(forms, policy)
        return {"frontier/kl": x["kl"], "frontier/delta_norm_entropy": x["d"] + shift,
                "frontier/gold_gain": x["gold_gain"]}

    def ablation(root, beta, rounds, shift=0.0, group="online RL", clip=None):  # PPO at kl_coef=beta (its d moved by
        # `shift`), FeedME's selection for `rounds` rounds at k = 4 (group "offline preference": the same curves as
        # DPO's); `clip`: PPO's early clip fraction per seed, as records.early_updates reads it
        (root / "evals" / "base").mkdir(parents=True)
        (root / "evals" / "base" / "reference_curves.json").write_text(json.dumps({"base": base}))
        curves = {f"kl{beta:g}": [row(lambda f, b=b: rc.optimum(f.p0, f.mean, b), shift)
                                  for b in np.geomspace(30, beta, 12)],
                  "sft": [row(lambda f, k=k: rc.noisy_best_of_k(f.p0, f.level_probs, k))
                          for k in np.geomspace(1.05, 4, 8)]
                  + [row(lambda f, r=r: rc.feedme_selection(f.p0, f.level_probs, 4, r)) for r in range(2, rounds + 1)]}
        ends = {f"kl{beta:g}": lambda f: rc.optimum(f.p0, f.mean, beta),
                "sft": lambda f: rc.feedme_selection(f.p0, f.level_probs, 4, rounds)}
        lab = {"ratings": {"samples_per_prompt": 4}, "sft": {"rounds": rounds, "keep_top": 1, "select": "top"},
               "reward": "gold"}
        by_regime, regimes = {}, {f"kl{beta:g}": {"group": group, "kl_coef": beta, "ent_coef": 0.0,
                                                  "adaptive_kl": False},
                                  "sft": {"group": "selection", "kl_coef": None, "adaptive_kl": None}}
        for name, rows in curves.items():
            by_regime[name] = []
            for s in range(3):
                d = root / "runs" / name / f"s{s}"
                d.mkdir(parents=True)
                (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                by_regime[name].append({"seed": s, "lab": lab, "answers": {
                    f.id: {"probs": f.answers(ends[name](f)).tolist()} for f in forms},
                    "early": {"clipfrac": clip[s], "approxkl": 0.01, "steps": 10} if clip and name != "sft" else {}})
        fr = report.frontier_section(root, by_regime, regimes, {"margin": 0.02, "grid_points": 8}, 0.95)
        cf = report.closed_forms_section(root, by_regime, regimes, fr)
        return (next(p for p in cf["predictions"] if p["x"] == "kl"),
                next(c for c in fr["comparisons"] if c["x"] == "kl"), cf)

    kl, measured, cf = ablation(tmp_path / "near", 0.3, 3)
    assert kl["predicted_difference"] == pytest.approx(measured["difference"]["mean"], abs=0.002)
    assert abs(kl["artefact_difference"]) <= 0.002 and kl["agrees"] and kl["reading"] == "agrees"
    assert cf["tracking"]["kl0.3"]["tv"] < 1e-9 and cf["tracking"]["sft"]["tv"] < 1e-9
    assert cf["tracking"]["kl0.3"]["tracks"] and cf["tracking"]["sft"]["tracks"]
    sep = {(s["a"], s["b"]): s["value"] for s in cf["separations"]}
    assert sep[("best_of_k", "optimum_beta")] >= 0.04
    md = "\n".join(report.closed_forms_markdown({"closed_forms": cf}))
    assert "What the closed forms predict" in md and "artefact" in md
    far, far_measured, _ = ablation(tmp_path / "far", 0.03, 20)
    assert far_measured["x_max"] > rc.KL_MAX and far["predicted_difference"] is not None
    assert far["predicted_difference"] == pytest.approx(far_measured["difference"]["mean"], abs=0.01)
    # each regime's distance from its own family at matched KL: ~0 on the curves; D = predicted + off(A) − off(B)
    assert all(abs(v["mean"]) < 0.002 for v in kl["off_curve"].values())
    low, low_measured, _ = ablation(tmp_path / "low", 0.3, 3, shift=-0.03, clip=[0.08, 0.09, 0.10])  # PPO's path
    # 0.03 below π*_β's, its first updates clipping 0.09 of sampled tokens on average
    off = low["off_curve"]
    assert off["kl0.3"]["mean"] == pytest.approx(-0.03, abs=0.002) and abs(off["sft"]["mean"]) < 0.002
    assert low["predicted_difference"] + off["kl0.3"]["mean"] - off["sft"]["mean"] == pytest.approx(
        low_measured["difference"]["mean"], abs=1e-9)
    assert low["measured_call"] == "less entropy" and not low["agrees"]
    assert "off its own closed-form curve: kl0.3 -0.03" in low["reading"]
    # PPO's objective climbed by exact softmax policy gradient: its path's offset, and D if PPO had followed it
    path = low["gradient_path"]
    assert set(path["off"]) == {"kl0.3"} and path["off"]["kl0.3"] < -0.005
    assert path["predicted_difference"] == pytest.approx(low["predicted_difference"] + path["off"]["kl0.3"], abs=1e-9)
    assert "policy-gradient path" in low["reading"] and "gradient_path_beta0.3" in cf["families"]
    assert low["early_updates"]["clipfrac"]["mean"] == pytest.approx(0.09) and low["early_updates"]["steps"] == 10
    assert "kl0.3's first 10 updates clipped 0.090 [" in low["reading"]
    assert kl["early_updates"] is None and "clipped" not in kl["reading"]  # no PPO metrics: nothing said
    dpo, _, dpo_cf = ablation(tmp_path / "dpo", 0.3, 3, shift=-0.03, group="offline preference")
    assert dpo["gradient_path"] is None and "gradient_path_beta0.3" not in dpo_cf["families"]  # DPO takes no such path


def test_crossed_artefact_is_small_on_dense_points_large_on_sparse_ones_and_leaves_out_unreachable_prompts():
    """The per-prompt artefact (what a random-prompts call rests on): measured points dense near the base give
    |artefact| <= 0.002 on every prompt; PPO's first point far out (the old schedule's defect) gives more; a prompt
    whose measured KL lies beyond what π*_β reaches on it is left out, by name."""
    from collapse_lab.lab.report.statistics import crossed_artefact

    forms, _ = _forms(RaterConfig(), ranges=((0, 100), (1, 100), (1, 50)))

    def rows(policies):
        out = []
        for pol in policies:
            r = {}
            for f in forms:
                x = rc.point([f], pol)
                r[f"frontier/kl/{f.id}"], r[f"frontier/delta_norm_entropy/{f.id}"] = x["kl"], x["d"]
            out.append(r)
        return out

    ppo_dense = rows([lambda f, b=b: rc.optimum(f.p0, f.mean, b) for b in np.geomspace(30, 0.2, 24)])
    ppo_sparse = rows([lambda f, b=b: rc.optimum(f.p0, f.mean, b) for b in (0.6, 0.4, 0.3, 0.2)])
    feedme = rows([lambda f, k=k: rc.noisy_best_of_k(f.p0, f.level_probs, k) for k in np.geomspace(1.02, 64, 24)])
    c = {"regime": "ppo", "feedme": "sft", "crossed": {"seeds": [0, 1], "prompts": [f.id for f in forms]}}
    dense = crossed_artefact(forms, {"ppo": {"0": ppo_dense, "1": ppo_dense}, "sft": {"0": feedme, "1": feedme}}, c, 8)
    sparse = crossed_artefact(forms, {"ppo": {"0": ppo_sparse, "1": ppo_sparse}, "sft": {"0": feedme, "1": feedme}}, c, 8)
    assert dense["prompts"] == 3 and not dense["left_out"] and dense["largest"] <= 0.002
    assert sparse["largest"] > 5 * dense["largest"]
    far = [dict(r) for r in feedme]
    far[-1]["frontier/kl/1-50"] = 50.0  # beyond any π*_β on that prompt
    out = crossed_artefact(forms, {"ppo": {"0": ppo_dense, "1": ppo_dense}, "sft": {"0": far, "1": far}}, c, 8)
    assert out["left_out"] == ["1-50"] and out["prompts"] == 2


def test_a_changed_heldout_prompt_set_names_another_base(monkeypatch):
    """The held-out prompts are code, not config: their digest names a base pretrained on them, so editing
    HELDOUT_TEMPLATES never reuses one pretrained on the old set; the default world's base is named as before."""
    import collapse_lab.regimes.registry  # noqa: F401 (registers the regimes' sections)
    from collapse_lab.core.config import compose
    from collapse_lab.stages.pretrain import base_dir
    from collapse_lab.world import world as world_module

    held = compose("lab", ["world.heldout_templates=true"])
    plain = base_dir(compose("lab", []), named=False).name
    before = base_dir(held, named=False).name
    assert f"-h{world_module.heldout_digest()}-" in before and "-h" not in plain
    monkeypatch.setitem(world_module.HELDOUT_TEMPLATES, "extra", "Pick: {low}..{high} ->")
    after = base_dir(held, named=False).name
    assert after != before and base_dir(compose("lab", []), named=False).name == plain

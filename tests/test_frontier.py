"""Curves along training and the comparison at matched distance (collapse_lab/evaluation/frontier.py)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from collapse_lab.evaluation import frontier
from collapse_lab.evaluation import matched as matched_lib, metrics
from collapse_lab.core.config import compose
from collapse_lab.models.models import load_pretrained
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.world.world import make_world
from conftest import TINY_PRETRAIN
from test_bok import enumerate_best_of_k


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('ck')}"])
    model, tok = load_pretrained(str(pretrain(cfg)), "float32")
    return model, tok, make_world(cfg.world)


def test_schedule_spreads_points_and_always_ends_on_the_last_step():
    assert frontier.schedule(30, 3, "linear") == {10, 20, 30}
    assert frontier.schedule(30, 4) == {1, 3, 10, 30}  # log-spaced (the default): dense where the KL is small
    assert frontier.schedule(3, 8, "linear") == {1, 2, 3}
    with pytest.raises(ValueError, match="valid choices: log, linear"):
        frontier.schedule(30, 4, "cubic")
    assert frontier.schedule(7, 0) == {7}
    assert frontier.schedule(3, 8) == {1, 2, 3}
    assert frontier.schedule(0, 4) == set()


def _perturbed(model, scale, seed=0):
    m = type(model)(model.config)
    m.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = m.get_output_embeddings().weight
        head.add_(scale * torch.randn(head.shape, generator=g))
    return m.eval()


def test_the_base_is_the_origin_and_the_entropy_decomposition_is_exact(tiny):
    model, tok, world = tiny
    curve = frontier.Curve(model, tok, world)
    assert len(curve.prompts) == 5  # the seed prompts, which the numbers world knows
    zero = curve.point(model, 0, beta=0.2)
    assert abs(zero["frontier/kl"]) < 1e-9 and abs(zero["frontier/delta_norm_entropy"]) < 1e-9
    assert abs(zero["frontier/gold_gain"]) < 1e-9 and zero["optimum/tv"] > 0
    moved = _perturbed(model, 0.5)
    for dist, base in zip([frontier.answer_distribution(moved, tok, p.text, p.answers, p.continue_chars)
                           for p in curve.prompts], curve.base):
        row = curve.row(dist, base, (np.zeros(len(dist.answers)),) * 2)
        dh = row["frontier/delta_norm_entropy"] * math.log(len(dist.answers))
        assert dh == pytest.approx(-row["frontier/kl"] - row["frontier/cross_term"], abs=1e-6)
    point = curve.point(moved, 123)
    assert point["frontier/kl"] > 0.01 and point["budget/samples_scored"] == 123 and "optimum/tv" not in point


def test_a_curve_on_given_prompts_keeps_the_ones_the_world_knows_and_reads_them_as_a_suite_would(tiny):
    """Curve(prompts=...): suite Prompts given directly (benchmarks/network_paths.py's training templates); prompts
    without an answer set or unknown to the world are dropped; a prompt reads the same as from its suite."""
    from collapse_lab.core.suites import Prompt

    model, tok, world = tiny
    suite = frontier.Curve(model, tok, world)
    mine = [suite.prompts[1], Prompt("open", suite.prompts[0].text),  # no answers: dropped
            Prompt("unknown", "Q: a prompt no world has\nA:", [" 1", " 2"], "0123456789")]  # unknown: dropped
    curve = frontier.Curve(model, tok, world, prompts=mine)
    assert [p.id for p in curve.prompts] == [suite.prompts[1].id]
    moved = _perturbed(model, 0.5)
    assert curve.point(moved)["frontier/kl"] == pytest.approx(suite.point(moved)[f"frontier/kl/{suite.prompts[1].id}"])
    assert curve.base_forms()["prompts"][0] == suite.base_forms()["prompts"][1]


def test_max_gap_probe_fires_when_the_probes_moved_and_resumes_from_the_last_point(tiny):
    """Curve.moved: the probe prompts' exact √KL against the last point's; never with max_gap None; a point resets
    it; resume(row) restores it from a row's per-prompt KLs exactly as point() set it."""
    model, tok, world = tiny
    curve = frontier.Curve(model, tok, world)
    assert curve.probes == [0, 2, 4] and curve.last_probe == 0.0  # 3 of the 5 seed prompts, spread
    moved = _perturbed(model, 0.5)
    assert not curve.moved(model, 1e-6)  # the base itself: the probe reads 0
    assert curve.moved(moved, 1e-3) and not curve.moved(moved, None) and not curve.moved(moved, 100.0)
    row = curve.point(moved)
    assert curve.last_probe > 1e-3 and not curve.moved(moved, 1e-6)  # measured there: no gap left
    assert curve.last_probe == pytest.approx(math.sqrt(np.mean([row[f"frontier/kl/{curve.prompts[i].id}"]
                                                               for i in curve.probes])))
    again = frontier.Curve(model, tok, world)
    again.resume(row)
    assert again.last_probe == curve.last_probe and not again.moved(moved, 1e-6) and again.moved(model, 1e-3)
    again.resume(None)
    assert again.last_probe == 0.0


def test_a_best_of_k_reference_point_equals_enumeration_on_the_base(tiny):
    """The report's best-of-k curve is the closed form on the base's exact distribution. Checked against brute
    force over k = 3 i.i.d. draws on the first seed prompt: draws enumerated over the rater's score levels (a
    handful), then within a level the kept draw is each outcome in proportion to its base mass (i.i.d. draws:
    by symmetry); the reference curve's point is the mean over prompts of these rows."""
    model, tok, world = tiny
    curve = frontier.Curve(model, tok, world)
    (p0, noiseless), b = curve._outcomes()[0], curve.base[0]
    outcomes, scores = np.append(p0, 1 - p0.sum()), np.append(noiseless, -math.inf)
    levels = sorted(set(scores))
    level_mass = np.array([outcomes[scores == s].sum() for s in levels])
    kept = np.zeros(len(outcomes))
    for s, q in zip(levels, enumerate_best_of_k(level_mass, levels, 3)):
        kept[scores == s] = q * outcomes[scores == s] / outcomes[scores == s].sum()
    n = len(b.answers)
    bok = curve.best_of_k(3)[0]
    assert bok.probs == pytest.approx(kept[:n] + kept[n:2 * n], abs=1e-12)
    q = (kept[:n] + kept[n:2 * n]) / (kept[:n] + kept[n:2 * n]).sum()
    ref = curve.reference_curves(best_of=(3,), betas=())["best_of_k"][0]
    rows = [curve.row(d, bb, s) for d, bb, s in zip(curve.best_of_k(3), curve.base, curve.scores)]
    assert rows[0]["frontier/kl"] == pytest.approx(metrics.kl(q, b.normalised), rel=1e-9)
    assert ref["frontier/kl"] == pytest.approx(np.mean([r["frontier/kl"] for r in rows]), rel=1e-12)
    assert ref["frontier/kl"] > 0 and ref["frontier/gold_gain"] > 0


def test_optimum_family_runs_from_the_base_to_the_best_answers(tiny):
    model, tok, world = tiny
    refs = frontier.Curve(model, tok, world).reference_curves(best_of=(1,), betas=(100.0, 1.0, 0.05))
    assert refs["best_of_k"][0]["frontier/kl"] == pytest.approx(0.0, abs=1e-12)  # best of 1 is the base
    kls = [x["frontier/kl"] for x in refs["optimum_beta"]]
    gains = [x["frontier/gold_gain"] for x in refs["optimum_beta"]]
    assert kls[0] < 1e-3 and kls == sorted(kls) and gains == sorted(gains)


# ------------------------------------------------------------------------ the comparison, synthetic curves


def _curve(slope, kl_max, n=6, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    kls = np.linspace(kl_max / n, kl_max, n)
    return [(0.0, 0.0)] + [(k, slope * k + noise * rng.normal()) for k in kls]


def test_interpolation_reads_d_as_a_function_of_kl_whatever_the_order_visited():
    pts = [(0.0, 0.0), (2.0, -2.0), (1.0, -1.0), (1.0, -1.2)]
    assert matched_lib.interpolate(pts, np.array([0.5, 1.0, 1.5])) == pytest.approx([-0.55, -1.1, -1.55])


def test_same_curve_is_no_difference_and_a_steeper_one_keeps_less_entropy():
    a = {s: _curve(-0.2, 2.0, noise=0.002, seed=s) for s in range(3)}
    b = {s: _curve(-0.2, 0.5, noise=0.002, seed=10 + s) for s in range(3)}  # FeedME: a shorter reach
    m = matched_lib.matched(a, b, grid_points=8)
    assert m["x_max"] == pytest.approx(0.5) and max(m["grid"]) == pytest.approx(0.5)
    assert matched_lib.equivalence_call(m["difference"], 0.02) == "no difference"
    steep = {s: _curve(-0.4, 2.0, noise=0.002, seed=s) for s in range(3)}
    m2 = matched_lib.matched(b, steep, grid_points=8, sqrt_x=False)  # b keeps more entropy than `steep` (d linear in KL)
    assert m2["difference"]["mean"] == pytest.approx(0.2 * np.mean(m2["grid"]), abs=0.01)
    assert matched_lib.equivalence_call(m2["difference"], 0.02) == "more entropy"
    assert matched_lib.equivalence_call(matched_lib.matched(steep, b)["difference"], 0.02) == "less entropy"


def test_one_seed_gets_no_call_and_noisy_seeds_are_undecided():
    a, b = {0: _curve(-0.2, 1.0)}, {0: _curve(-0.3, 1.0)}
    assert matched_lib.equivalence_call(matched_lib.matched(a, b)["difference"], 0.02) == "one seed: no call"
    a = {s: _curve(-0.2 + 0.2 * (-1) ** s, 1.0) for s in range(3)}
    b = {s: _curve(-0.2, 1.0) for s in range(3)}
    assert matched_lib.equivalence_call(matched_lib.matched(a, b)["difference"], 0.02) == "undecided"
    assert matched_lib.matched({0: [(0.0, 0.0)]}, {0: _curve(-0.2, 1.0)}) is None  # no common range


def test_base_forms_give_the_numpy_closed_forms_the_same_points_as_the_curve(tiny):
    """The report traces the families from Curve.base_forms() (collapse_lab/evaluation/reference_curves.py, numpy only): its
    best-of-k and π*_β points must be the Curve's own (torch-side) reference points."""
    from collapse_lab.evaluation import reference_curves as rc

    model, tok, world = tiny
    curve = frontier.Curve(model, tok, world)
    refs = curve.reference_curves(best_of=(4,), betas=(0.5,))
    forms = rc.forms_from_json(refs["base"])
    bok = rc.point(forms, lambda f: rc.best_of_k(f.p0, f.mu, 4))
    opt = rc.point(forms, lambda f: rc.optimum(f.p0, f.mean, 0.5))
    for x, ref in ((bok, refs["best_of_k"][0]), (opt, refs["optimum_beta"][0])):
        assert x["kl"] == pytest.approx(ref["frontier/kl"], rel=1e-6, abs=1e-9)
        assert x["d"] == pytest.approx(ref["frontier/delta_norm_entropy"], rel=1e-6, abs=1e-9)
        assert x["gold_gain"] == pytest.approx(ref["frontier/gold_gain"], rel=1e-6, abs=1e-9)


def test_closed_forms_on_a_prior_without_a_model_are_the_prior_on_each_held_out_prompt():
    """benchmarks/closed_forms_bases.py's `human^A` base: on each held-out prompt the world's human prior raised to
    A and renormalised, every answer ended cleanly; A = 0 is uniform (H/log|A| = 1), and a larger A is more peaked.
    Its predicted D is the report's reading (π*_β's family against FeedME's) on the closed forms of that prior."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from closed_forms_bases import prior_curve, row, world_of

    from collapse_lab.evaluation import reference_curves as rc
    from collapse_lab.world.world import answer_prior

    world = world_of(0)
    h = {}
    for power in (0.0, 1.0, 3.0):
        forms_json = prior_curve(world, power).base_forms()
        assert len(forms_json["prompts"]) >= 15
        first = forms_json["prompts"][0]
        q = world.prompt(next(p.text for p in prior_curve(world, power).prompts))
        want = np.asarray(answer_prior("human", q.low, q.high)) ** power
        assert np.allclose(first["eos_probs"], want / want.sum()) and max(first["other_end_probs"]) < 1e-12
        p = np.asarray(first["eos_probs"])
        h[power] = float(-(p * np.log(p)).sum() / np.log(len(p)))
    assert h[0.0] == pytest.approx(1.0) and h[0.0] > h[1.0] > h[3.0]
    forms = rc.forms_from_json(prior_curve(world, 1.0).base_forms())
    r = row(forms, 0.1, 2.5)
    assert r["hi"] == 2.5 and r["d"] is not None and r["call"] == rc.predicted_call(r["d"], 0.02)
    assert r["sep"]["best_of_k"]["value"] > r["sep"]["feedme"]["value"] > 0


def test_the_raters_noise_moves_feedme_from_best_of_k_toward_the_optimum():
    """benchmarks/closed_forms_bases.py --noise: the rater's noise σ sets how far FeedME's selection (top-1 of k on
    ONE noisy rating) lies from π*_β (the tilt by the EXPECTED rating). On a peaked prior of each sign (the human
    prior cubed, the `lm` prior) the predicted D at σ = 0.25 is more than twice its size at σ = 1 and 2 (where it is
    near 0 or still shrinking), and has the sign of D against noiseless best-of-k, the limit of small σ."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from closed_forms_bases import prior_curve, rescored, row, world_of

    from collapse_lab.evaluation import reference_curves as rc

    worlds = {s: world_of(0, s) for s in (0.25, 1.0, 2.0)}
    assert [w.rater.cfg.noise_std for w in worlds.values()] == [0.25, 1.0, 2.0]
    for prior, power in (("human", 3.0), ("lm", 1.0)):
        curve = prior_curve(worlds[0.25], power, prior)
        rows = {s: row(rc.forms_from_json(rescored(curve, w).base_forms()), 0.1, 1.0) for s, w in worlds.items()}
        d = [rows[s]["d"] for s in worlds]
        assert abs(d[0]) > 2 * max(abs(d[1]), abs(d[2])) and abs(d[2]) < abs(d[1]) + 1e-3, (prior, d)
        assert np.sign(d[0]) == np.sign(rows[0.25]["d_bok"]) != 0, (prior, d, rows[0.25]["d_bok"])
        assert abs(rows[0.25]["d_bok"]) > abs(d[0]), (prior, d, rows[0.25]["d_bok"])

"""The call per base and whether the bases agree (collapse_lab/lab/replication.py), on hand-made report.json files."""

import gzip
import json

import numpy as np

from collapse_lab.evaluation import matched

from collapse_lab.lab import replication


def _report(tmp_path, name, mean, lo, hi, call, seed=None, collapsed=(), off=None, path_off=None):
    comp = {"regime": "kl0.15", "feedme": "sft-r8", "x": "kl", "group": "online RL", "call": call, "x_min": 0.01,
            "x_max": 2.1, "seeds": list(range(10)), "difference": {"mean": mean, "lo": lo, "hi": hi},
            "crossed": {"prompts": [f"p{i}" for i in range(15)]}}
    rep = {"ablation": name, "config": {"lab": [f"pretrain.seed={seed}"] if seed is not None else []},
           "frontier": {"margin": 0.02, "primary": "kl0.15:sft-r8", "comparisons": [comp]},
           "closed_forms": {"predictions": [{"regime": "kl0.15", "feedme": "sft-r8", "x": "kl",
                                             "predicted_call": "no difference", "artefact_difference": 0.0004,
                                             "artefact_crossed": {"mean": -0.00031},
                                             **({"off_curve": {"kl0.15": {"mean": off[0]}, "sft-r8": {"mean": off[1]}}}
                                                if off else {}),
                                             **({"gradient_path": {"off": {"kl0.15": path_off}}} if path_off else {})}],
                            "tracking": {"kl0.15": {"tv_own": 0.3}, "sft-r8": {"tv_own": 0.04}}},
           "verdict": {"collapsed": list(collapsed)}}
    d = tmp_path / name
    d.mkdir()
    (d / "report.json").write_text(json.dumps(rep))
    return d


def test_bases_agree_only_on_the_same_decided_call(tmp_path, capsys):
    a = _report(tmp_path, "b0", -0.004, -0.009, 0.001, "no difference")
    b = _report(tmp_path, "b1", 0.002, -0.004, 0.008, "no difference", seed=1)
    null = _report(tmp_path, "null", 0.0, -0.005, 0.005, "no difference", collapsed=[])
    assert replication.main([str(a), str(b), "--null", str(null), "--out", str(tmp_path / "r.md"),
                             "--plot", str(tmp_path / "forest.png")]) == 0
    assert (tmp_path / "forest.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "AGREE: every base calls 'no difference'" in out and "pretrain.seed=1" in out and "0.0050 (0.02)" in out
    assert "collapsed regimes: none (as it should be)" in out and "| +0.00040 | -0.00031 | 0.300 / 0.040 |" in out
    c = _report(tmp_path, "b2", 0.03, 0.012, 0.048, "more entropy", seed=2)
    rows = [replication.base_row(json.loads((d / "report.json").read_text())) for d in (a, c)]
    assert replication.agreement(rows).startswith("DISAGREE")
    bad = _report(tmp_path, "null2", 0.0, -0.005, 0.005, "no difference", collapsed=["sft-r8"])
    assert "SHOULD BE NONE" in replication.markdown(rows, json.loads((bad / "report.json").read_text()))
    assert replication.main([str(tmp_path / "missing")]) == 2
    assert replication.main([str(a), str(b), "--within", "1:x"]) == 2 and "--within '1:x'" in capsys.readouterr().err
    kept = tmp_path / "kept.json.gz"  # a compressed copy of a base's report reads the same
    kept.write_bytes(gzip.compress((b / "report.json").read_bytes()))
    assert replication.main([str(a), str(kept)]) == 0 and capsys.readouterr().out.count("| pretrain.seed=1 |") == 1


def test_across_bases_separates_base_heterogeneity_from_seed_noise(tmp_path):
    """Two bases whose tight intervals do not overlap differ beyond their seeds (small p-value), and with the base
    as a random effect on 2 bases (t with 1 df) the pooled call cannot be decided; two bases within each other's
    noise show no heterogeneity."""
    def rows(*specs):  # (name, D, half-width) per base
        dirs = [_report(tmp_path, n, m, m - h, m + h, "x", seed=i) for i, (n, m, h) in enumerate(specs)]
        return [replication.base_row(json.loads((d / "report.json").read_text())) for d in dirs]

    apart = replication.across_bases(rows(("a0", -0.02, 0.01), ("a1", 0.014, 0.016)))
    assert apart["p"] < 0.05 and apart["call"] == "undecided" and apart["lo"] < -0.1 and apart["hi"] > 0.1
    assert abs(apart["mean"] - (-0.003)) < 1e-12
    assert apart["tau"] > 0.015 and apart["bases_needed"] > 10
    close = replication.across_bases(rows(("c0", -0.004, 0.01), ("c1", 0.001, 0.012)))
    assert close["p"] > 0.3 and close["tau"] == 0.0 and close["bases_needed"] < apart["bases_needed"]
    assert replication.across_bases(rows(("one", 0.0, 0.01))) is None
    assert "what seeds and prompts explain" in replication.markdown(rows(("m0", -0.02, 0.01), ("m1", 0.014, 0.016)))


def test_the_bases_differ_only_when_their_ds_spread_beyond_their_own_noise():
    """Bases whose standard errors are estimated on about 3 df (4 seeds): when they do NOT differ, Cochran's Q
    against χ²_{k−1} calls them different in far more than 5% of draws, and the variance ratio across_bases uses
    keeps close to 5%, with standard errors equal or four-fold apart; it still finds a between-base SD of 0.02."""
    from scipy import stats

    rng = np.random.default_rng(0)
    k, nu, draws = 12, 3, 300

    def rates(se, tau):
        ratio = chi2 = 0
        for _ in range(draws):
            d = rng.normal(0, (se ** 2 + tau ** 2) ** 0.5)
            est = se * np.sqrt(rng.chisquare(nu, k) / nu)
            ab = replication.across_bases([{"mean": m, "half_width": s * stats.t.ppf(0.975, nu), "df": nu,
                                            "margin": 0.02} for m, s in zip(d, est)])
            w = 1 / est ** 2
            ratio += ab["p"] < 0.05
            chi2 += stats.chi2.sf(float((w * (d - (w * d).sum() / w.sum()) ** 2).sum()), k - 1) < 0.05
        return ratio / draws, chi2 / draws

    for se in (np.full(k, 0.01), np.geomspace(0.007, 0.028, k)):
        ratio, chi2 = rates(se, 0.0)
        assert ratio < 0.09 and chi2 > 0.25, (ratio, chi2)
    assert rates(np.full(k, 0.01), 0.02)[0] > 0.5


def test_bases_on_one_range_differ_only_by_how_the_regimes_behave_there(tmp_path):
    """Two bases with the SAME D(KL) (0 up to 1 nat, then growing), one reaching 3 nats and one 1.5: on their own
    ranges their D's differ beyond their noise (Q's p < 0.05); recomputed from their curves on the one range both
    reach, they agree. A base whose regimes really differ there stays apart."""
    rng = np.random.default_rng(3)

    def base(name, seed, reach, shift=0.0):
        kls, prompts = np.geomspace(0.05, reach, 20), [f"p{i}" for i in range(6)]
        def rows(gap, s):  # per-prompt curves of one seed; the gap between regimes opens past 1 nat
            off = {p: rng.normal(0, 0.004) for p in prompts}
            return [{**{f"frontier/kl/{p}": k for p in prompts},
                     **{f"frontier/delta_norm_entropy/{p}": -0.1 * k ** 0.5 + gap * (0.04 * max(0.0, k - 1) + shift
                                                                                     + off[p]) for p in prompts}}
                    for k in kls]
        curves = {"kl0.15": {str(s): rows(1.0, s) for s in range(6)},
                  "sft-r8": {str(s): rows(0.0, s) for s in range(6)}}
        cross = matched.crossed(curves["kl0.15"], curves["sft-r8"])
        comp = {"regime": "kl0.15", "feedme": "sft-r8", "x": "kl", "group": "online RL", "x_min": 0.05,
                "x_max": float(reach), "seeds": list(range(6)), "difference": cross["difference"], "crossed": cross,
                "call": matched.equivalence_call(cross["difference"], 0.02)}
        return {"ablation": name, "config": {"lab": [f"pretrain.seed={seed}"]},
                "frontier": {"margin": 0.02, "primary": "kl0.15:sft-r8", "comparisons": [comp], "curves": curves,
                             "grid_points": 8}}

    far, near = base("far", 0, 3.0), base("near", 1, 1.5)
    own = replication.across_bases([replication.base_row(r) for r in (far, near)])
    assert own["p"] < 0.05
    one = replication.on_common_range([far, near])
    assert one["range"] == [0.05, 1.5] and all(r["range"] == [0.05, 1.5] for r in one["rows"])
    assert replication.across_bases(one["rows"])["p"] > 0.05
    low = replication.on_common_range([far, near], within=(0.0, 1.0))
    assert all(abs(r["mean"]) < 0.01 and r["call"] == "no difference" for r in low["rows"])
    apart = replication.on_common_range([far, base("shifted", 2, 1.5, shift=0.05)])
    assert replication.across_bases(apart["rows"])["p"] < 0.05
    assert "On one KL range for every base, [0.050, 1.500] nats" in replication.markdown(
        [replication.base_row(r) for r in (far, near)], common=one)


def test_d_against_the_distance_to_the_closed_forms():
    """Spearman's ρ of D against A's TV to its closed form: +1 when D rises with it, absent with fewer than 4 bases."""
    rows = [{"mean": d, "tv": [tv, 0.3]} for d, tv in ((-0.03, 0.2), (-0.01, 0.4), (0.01, 0.7), (0.02, 0.9))]
    out = replication.with_closed_form_distance(rows)
    assert out["a"]["rho"] == 1.0 and out["a"]["bases"] == 4 and out["b"] is None  # B's TV is one value
    flipped = replication.with_closed_form_distance([{**r, "tv": [1 - r["tv"][0], 0.3]} for r in rows])
    assert flipped["a"]["rho"] == -1.0
    assert replication.with_closed_form_distance(rows[:3]) is None


def test_each_regimes_distance_from_its_own_closed_form_per_base_and_across_bases(tmp_path):
    """The report's off_curve per base (A / B) in the table, and its mean over bases with a t-interval; no line
    when the reports carry none (older reports)."""
    ds = [_report(tmp_path, f"b{i}", -0.02, -0.03, -0.01, "undecided", seed=i, off=(a, b), path_off=-0.05)
          for i, (a, b) in enumerate(((-0.02, 0.001), (-0.025, -0.002), (-0.015, 0.004)))]
    rows = [replication.base_row(json.loads((d / "report.json").read_text())) for d in ds]
    assert rows[1]["off"] == [-0.025, -0.002] and rows[1]["path_off"] == -0.05
    md = replication.markdown(rows)
    assert "| -0.0250 / -0.0020 | -0.0500 |" in md
    # A's measured offset as a share of its exact policy-gradient path's: 0.4, 0.5, 0.3 -> mean 0.40
    assert "path lies -0.0500 off A's family" in md and "A's measured offset is 0.40 [" in md
    line = next(x for x in md.splitlines() if x.startswith("Off its own closed-form curve"))
    a_lo, a_hi = (float(v) for v in line.split("A -0.0200 [")[1].split("]")[0].split(", "))
    assert -0.04 < a_lo < -0.03 and -0.01 < a_hi < 0 and "B +0.0010 [" in line  # ±4.30 × 0.0029 (t on 2 df)
    plain = [replication.base_row(json.loads((_report(tmp_path, f"p{i}", -0.02, -0.03, -0.01, "undecided",
                                                       seed=i) / "report.json").read_text())) for i in range(3)]
    assert "Off its own" not in replication.markdown(plain)


def test_the_chance_of_each_call_is_what_equivalence_call_gives_on_simulated_bases():
    """call_chances and agreement_chance against simulation: draw a base's D from N(mean, sd²), give it the interval
    D ± h, call it with matched.equivalence_call, and count; two independent draws per trial for agreement (the same
    decided call, as replication.agreement requires)."""
    rng = np.random.default_rng(0)
    n = 200_000
    for mean, sd, h, m in [(-0.017, 0.006, 0.010, 0.02), (0.0, 0.01, 0.005, 0.02), (0.03, 0.02, 0.025, 0.02),
                           (-0.02, 0.004, 0.0, 0.02)]:
        want = replication.call_chances(mean, sd, h, m)
        assert abs(sum(want.values()) - 1) < 1e-12
        pairs = rng.normal(mean, sd, (n, 2))
        calls = np.array([[matched.equivalence_call({"mean": d, "lo": d - h, "hi": d + h}, m) for d in row]
                          for row in pairs[: n // 4]])
        for c, p in want.items():
            assert abs((calls[:, 0] == c).mean() - p) < 0.01, (mean, sd, h, c)
        same = (calls[:, 0] == calls[:, 1]) & (calls[:, 0] != "undecided")
        assert abs(same.mean() - replication.agreement_chance(mean, sd, h, m)) < 0.01
    # a half-width past the margin leaves no room for "no difference"; at the margin itself with no within-base
    # noise two bases agree only half the time
    assert replication.call_chances(0.0, 0.001, 0.03, 0.02)["no difference"] == 0.0
    assert abs(replication.agreement_chance(-0.02, 0.004, 0.0, 0.02) - 0.5) < 1e-9


def test_call_stability_reads_the_bases_estimates(tmp_path):
    """Two bases near −margin with a between-base spread: each base is often undecided, so the two agree rarely;
    far below the margin with tight intervals they nearly always agree."""
    def rows(*specs):
        dirs = [_report(tmp_path, n, m, m - h, m + h, "x", seed=i) for i, (n, m, h) in enumerate(specs)]
        return [replication.base_row(json.loads((d / "report.json").read_text())) for d in dirs]

    near = rows(("n0", -0.012, 0.009), ("n1", -0.021, 0.012))
    cs = replication.call_stability(replication.across_bases(near), near)
    assert cs["agree"] < 0.3 and cs["chances"]["undecided"] > 0.4 and cs["agree_unlimited"] > cs["agree"]
    far = rows(("f0", -0.060, 0.004), ("f1", -0.062, 0.004))
    cs = replication.call_stability(replication.across_bases(far), far)
    assert cs["agree"] > 0.99 and cs["chances"]["less entropy"] > 0.99
    assert "same decided call with chance" in replication.markdown(near)
    assert replication.call_stability(None, near[:1]) is None

"""`collapse-lab ablate`: config contract, the regime table, and the orchestrator on a tiny base.

The fast tests drive the REAL orchestrator, evaluator and report over a tiny base, with stand-in
stage functions (a few cross-entropy steps towards " 97" for FeedME, an untouched copy for PPO),
so they do not depend on the trainers. The slow tests run the real stages.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from collapse_lab.lab import ablate
from collapse_lab.core.checkpoint import write_manifest
from collapse_lab.core.config import ConfigError, group_options
from conftest import TINY_PRETRAIN, run_cli

TINY_EVAL = ["eval.suites=[seed,arithmetic]", "eval.samples=8", "eval.gold_samples=8"]


def test_every_regime_has_a_recipe_a_group_and_a_train_function():
    for name, regime in ablate.REGIMES.items():
        assert regime.group in ("offline preference", "online RL", "selection") and callable(regime.train)
        assert regime.recipe in group_options("recipe") and regime.name == name
    # every PPO recipe the lab has is reachable from the table
    for recipe in group_options("recipe"):
        if recipe.startswith(("kl", "ent")):
            assert recipe in ablate.REGIMES, recipe


def test_overrides_split_into_ablation_and_lab_with_the_preference_alias():
    a, lab = ablate.split_overrides(["preset=quick", "seeds=2", "regimes=[sft]", "world.preference=0",
                                     "model=tiny", "ppo.steps=3", "collapse.threshold=0.1", "name=x"])
    assert a == ["preset=quick", "seeds=2", "regimes=[sft]", "collapse.threshold=0.1", "name=x"]
    assert lab == ["world.rater.preference_strength=0", "model=tiny", "ppo.steps=3"]


@pytest.mark.parametrize("args, message", [
    (["regimes=[sft,nope]"], "unknown regime(s) ['nope']"),
    (["preset=fast"], "unknown preset 'fast'; valid choices: default, frontier, gemma3-270m, powered, powered-null, quick"),
    (["regimes=[sft]", "ppo.kl_coeff=1"], "unknown key 'ppo.kl_coeff'"),
    (["regimes=[sft]", "recipe=kl0"], "'recipe' cannot be given to ablate"),
    (["regimes=[sft]", "seeds=0"], "seeds must be >= 1"),
    (["regimes=[sft]", "eval.suites=[nosuch]"], "unknown suite 'nosuch'"),
    (["regimes=[sft]", "seedz=2"], "unknown key 'seedz'"),
])
def test_bad_input_is_one_line_naming_it(args, message):
    with pytest.raises(ConfigError, match=None) as e:
        ablate.plan(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    r = run_cli("-m", "collapse_lab.cli", "ablate", "regimes=[sft,nope]", f"checkpoints_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown regime(s) ['nope']" in r.stderr
    assert {"sft", "bok", "kl0.1", "dpo0.1"} <= set(r.stderr.split("valid choices: ")[1].strip().split(", "))
    assert not any(tmp_path.iterdir())
    r = run_cli("-m", "collapse_lab.cli", "report", str(tmp_path))
    assert r.returncode == 2 and "not a finished ablation directory" in r.stderr


def test_seed_replicates_vary_the_training_seed_and_the_ratings_seed_but_not_the_base():
    p = ablate.plan(["regimes=[sft]", "seed=4", "seeds=2"])
    assert p.seeds == [4, 5]
    c4, c5 = p.lab_config(4, "sft"), p.lab_config(5, "sft")
    assert (c4.seed, c4.ratings.seed, c5.seed, c5.ratings.seed) == (4, 4, 5, 5)
    assert c4.pretrain == c5.pretrain and c4.model == c5.model
    from collapse_lab.stages.pretrain import base_dir

    assert base_dir(c4, named=False) == base_dir(c5, named=False)  # ONE base
    assert ablate.plan(["regimes=[sft]", "world.preference=0"]).lab_config(0, "sft").world.rater.preference_strength == 0


def test_the_powered_null_world_is_the_powered_world_without_the_preference():
    """The null world is a control only if it differs from the treated world in the preference alone: the same
    base, prompts, training distribution and optimisers (issue 25; docs/results/bases/prediction.md, prediction 4)."""
    from omegaconf import OmegaConf

    def leaves(node: dict, prefix: str = "") -> dict:  # {"world.rater.preference_strength": 1.5, ...}
        out = {}
        for k, v in node.items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def flat(preset: str, regime: str) -> dict:
        return leaves(OmegaConf.to_container(ablate.plan([f"preset={preset}"]).lab_config(0, regime), resolve=True))

    for regime in ("kl0.1", "sft-r8"):
        treated, null = flat("powered", regime), flat("powered-null", regime)
        differ = {k for k in treated.keys() | null.keys() if treated.get(k) != null.get(k)}
        assert differ == {"world.rater.preference_strength", "world.rater.graded_strength"}, differ
        assert null["world.rater.preference_strength"] == 0 != treated["world.rater.preference_strength"]


def test_feedme_gets_its_finite_sample_control_right_after_it_unless_listed_or_turned_off():
    assert ablate.plan(["regimes=[sft,kl0.1]"]).regimes == ["sft", "sft-random", "kl0.1"]
    assert ablate.plan(["regimes=[kl0.1,sft-random,sft]"]).regimes == ["kl0.1", "sft-random", "sft"]
    assert ablate.plan(["regimes=[sft,kl0.1]", "controls=false"]).regimes == ["sft", "kl0.1"]
    assert ablate.plan(["regimes=[bok,kl0.1]"]).regimes == ["bok", "kl0.1"]  # best-of-k is exact: no control
    p = ablate.plan(["regimes=[sft]", "seed=3"])
    top, rnd = p.lab_config(3, "sft"), p.lab_config(3, "sft-random")
    assert (top.sft.select, rnd.sft.select) == ("top", "random")
    assert {k: v for k, v in rnd.sft.items() if k != "select"} == {k: v for k, v in top.sft.items() if k != "select"}
    assert rnd.ratings == top.ratings  # the same ratings stage: the same rating budget
    from collapse_lab.stages.ratings import ratings_dir
    from collapse_lab.regimes.sft import sft_dir

    assert ratings_dir(rnd, named=False) == ratings_dir(top, named=False)
    assert sft_dir(rnd, named=False) != sft_dir(top, named=False)


def test_an_ablation_directory_never_holds_two_configs(tmp_path):
    p = ablate.plan(["regimes=[sft]", f"checkpoints_dir={tmp_path}", "name=a"])
    p.out.mkdir(parents=True)
    (p.out / "ablation.yaml").write_text(f"digest: {p.digest}\n")
    ablate.plan(["regimes=[sft]", f"checkpoints_dir={tmp_path}", "name=a"])  # same: fine
    with pytest.raises(ConfigError, match="different config"):
        ablate.plan(["regimes=[sft]", f"checkpoints_dir={tmp_path}", "name=a", "seeds=2"])


# ------------------------------------------------------------------ the orchestrator, stand-in stages


def _fake_stage(kind):
    """A stand-in stage: writes a finished run directory like the real ones (manifest with the
    rating budget). FeedME pushes the base towards " 1" on the seed prompts (a real collapse); its
    control (sft.select=random) is an untouched copy of the base."""

    def stage(cfg, named=True):
        from collapse_lab.stages.pretrain import resolve_base

        base = Path(resolve_base(cfg))
        name = f"{kind}-{cfg.sft.select}" if kind == "sft" else kind
        out = Path(cfg.checkpoints_dir) / "fake" / f"{name}-kl{cfg.ppo.kl_coef}-s{cfg.seed}"
        if (out / "manifest.json").exists():
            return out
        shutil.copytree(base, out, ignore=shutil.ignore_patterns("eval", "manifest.json"), dirs_exist_ok=True)
        steps = 0
        if kind == "sft" and cfg.sft.select == "top":
            steps = 60 + 10 * cfg.seed
            _push_towards(out, " 1", steps)
        write_manifest(out, {"stage": kind, "status": "finished", "base_path": str(base), "samples_scored": 64,
                             "steps": steps, "tokens_trained": steps * 10, "wall_time_s": 0.1})
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "objective/kl": 0.01 * i}) + "\n"
                                                   for i in range(3)))
        return out

    return stage


def _push_towards(path: Path, answer: str, steps: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collapse_lab.world.world import load_seed_prompts

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    texts = [p.text + answer for p in load_seed_prompts()]
    torch.manual_seed(0)
    for _ in range(steps):
        batch = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        loss = sum(model(torch.tensor([b]), labels=torch.tensor([b])).loss for b in batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)


def fake_stages() -> dict:
    """Stand-ins by stage name (ablate.load_stage's argument)."""
    return {"ratings": _fake_stage("ratings"), "reward_model": _fake_stage("rm"),
            **{n: _fake_stage("sft") for n in ("sft", "sft-random")},
            **{n: _fake_stage("ppo") for n in ("kl0", "kl0.01", "kl0.1", "kl1", "klauto", "ent0.01", "kl0.1-ent0.01")}}


def _fake_main(stages: dict, args: list[str]) -> Path:
    """ablate.main(args) with `stages` standing in for the real ones during THIS call only: a patch held
    for the module-scoped fixture's life outlived these tests and handed the stand-ins to the slow tests
    below (the same-seed test then compared copies of the base: kl_to_reference 0 for every seed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ablate, "load_stage", lambda spec: stages[spec])
        return ablate.main(args)


@pytest.fixture(scope="module")
def fake_ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("abl")
    stages = fake_stages()
    args = ["regimes=[sft,kl0.1]", "seeds=2", f"checkpoints_dir={root}", "name=fake", "jobs=1", *TINY_EVAL,
            *[f"{o}" for o in TINY_PRETRAIN]]
    return _fake_main(stages, args), args, stages


def test_ablation_layout_report_and_verdict(fake_ablation):
    out, *_ = fake_ablation
    assert out == out.parent / "fake" and out.parent.name == "ablations"
    for f in ("report.md", "report.json", "runs.json", "ablation.yaml", "manifest.json", "plots/entropy.png",
              "plots/kl_entropy.png", "plots/reward_kl.png", "plots/training.png", "plots/post_sft.png",
              "plots/post_base.png", "evals/base/seed.json", "evals/sft/s1/gold.json", "runs/sft/s0/manifest.json",
              "runs/sft-random/s1/manifest.json", "evals/sft-random/s0/seed.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["regimes"]) == {"sft", "sft-random", "kl0.1"}
    sft, ppo, ctrl = rep["regimes"]["sft"], rep["regimes"]["kl0.1"], rep["regimes"]["sft-random"]
    assert sft["seeds"] == [0, 1] and sft["metrics"]["norm_entropy"]["n"] == 2
    assert sft["collapsed"] and not ppo["collapsed"]  # the stand-in FeedME was pushed to " 1"
    assert sft["control"] == "sft-random" and sft["collapse_test_control"]["collapsed"]  # below its control too
    assert ctrl["control_of"] == "sft" and ctrl["collapsed"] is None and ppo["collapse_test_control"] is None
    assert sft["metrics"]["delta_norm_entropy_control"]["mean"] < -0.05
    assert abs(ctrl["metrics"]["delta_norm_entropy"]["mean"]) < 1e-9  # the stand-in control: the base itself
    assert sft["top_answer"] == " 1" and sft["top_prob"] > 0.5 and sft["metrics"]["kl_to_reference"]["mean"] > 0.01
    assert abs(ppo["metrics"]["kl_to_reference"]["mean"]) < 1e-9  # an untouched copy of the base
    (cmp_,) = rep["comparisons"]
    assert cmp_["collapses_less"] and cmp_["budget_matched"]
    assert rep["verdict"]["endpoint_answer"].startswith("YES")
    assert rep["verdict"]["answer"].startswith("NOT TESTED")  # the stand-ins record no curves along training
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and rep["rule"] in md and "| sft | **yes** |" in md
    assert "| sft-random | control of sft |" in md and "vs its control sft-random" in rep["verdict"]["text"]


def test_rerun_reuses_every_stage_and_report_regenerates_identically(fake_ablation, capsys):
    out, args, stages = fake_ablation
    before = json.loads((out / "report.json").read_text())
    stamps = {p: p.stat().st_mtime for p in (out / "evals").rglob("seed.json")}
    calls = []

    def counted(f):
        return lambda cfg, named=True: calls.append(1) or f(cfg, named)

    _fake_main({spec: counted(fn) for spec, fn in stages.items()}, args)
    assert {p: p.stat().st_mtime for p in (out / "evals").rglob("seed.json")} == stamps  # not re-evaluated
    assert json.loads((out / "report.json").read_text()) == before
    (out / "report.md").unlink()
    shutil.rmtree(out / "plots")
    r = run_cli("-m", "collapse_lab.cli", "report", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "report.md").exists() and (out / "plots" / "entropy.png").exists()
    assert json.loads((out / "report.json").read_text()) == before


def test_report_survives_clearing_the_stage_cache(fake_ablation, tmp_path):
    out, *_ = fake_ablation
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("plots", "report.*"))
    from collapse_lab.lab.report import build

    a, b = build(copy), json.loads((out / "report.json").read_text())
    assert a["regimes"]["sft"]["metrics"] == b["regimes"]["sft"]["metrics"]


def _threads_and_pid(tag: str) -> tuple:
    import os
    import time
    time.sleep(0.3)  # long enough that one slot cannot take every task
    return tag, torch.get_num_threads(), os.getpid()


def _fails(message: str):
    raise ConfigError(message)


def test_workers_share_tasks_between_this_process_and_spawned_ones_on_split_threads():
    import os

    threads = torch.get_num_threads()
    with ablate.Workers(2) as pool:
        pending = {pool.submit(_threads_and_pid, t): t for t in "abcdef"}
        results = {}
        while pending:
            f = pool.next_done(pending)
            results[pending.pop(f)] = f.result()
        bad = {pool.submit(_fails, "no such regime"): None}
        with pytest.raises(ConfigError, match="no such regime"):
            pool.next_done(bad).result()
    assert sorted(results) == list("abcdef") and all(r[0] == t for t, r in results.items())
    pids = {r[2] for r in results.values()}
    assert os.getpid() in pids and len(pids) == 2  # this process and one worker: 2 processes for jobs=2
    assert {r[1] for r in results.values()} == {max(1, threads // 2)}
    assert torch.get_num_threads() == threads  # restored
    with ablate.Workers(1) as inline:  # jobs=1: this process, run at submission
        done = inline.submit(_threads_and_pid, "g")
        assert done.done() and done.result()[2] == os.getpid()
        assert inline.next_done({done: None}) is done


def test_jobs_default_and_range_and_not_in_the_digest(tmp_path):
    p = ablate.plan([f"checkpoints_dir={tmp_path}", "preset=quick"])
    q = ablate.plan([f"checkpoints_dir={tmp_path}", "preset=quick", "jobs=1"])
    assert p.jobs == (1 if torch.cuda.is_available() else max(1, min(2, __import__("os").cpu_count() or 1)))
    assert q.jobs == 1 and q.digest == p.digest  # how the stages run, not what they compute
    with pytest.raises(ConfigError, match="jobs"):
        ablate.plan([f"checkpoints_dir={tmp_path}", "preset=quick", "jobs=0"])


# ------------------------------------------------------------------ the real stages (slow)


def _real_ablation(*args):
    return ablate.main(["wandb.mode=disabled", *args])


@pytest.mark.slow
def test_quick_preset_without_rater_preference_does_not_call_feedme_collapsed(tmp_path):
    """The science check: raters with no favourite answers give FeedME nothing to collapse onto. FeedME fits
    its N kept samples' EMPIRICAL answer distribution (~(|A|-1)/(2N) nats below the base's with no selection
    at all), so the rule also needs a drop below its control, sft-random (as many random base samples)."""
    out = _real_ablation("preset=quick", "world=numbers-nopref", "regimes=[sft,bok,kl0.1]", f"checkpoints_dir={tmp_path}",
                         "world.heldout_eval_prompts=false")  # held out, FeedME's range selection transfers: docs/ablation.md
    rep = json.loads((out / "report.json").read_text())
    assert rep["preference_strength"] == 0
    assert rep["regimes"]["sft"]["control"] == "sft-random" and rep["regimes"]["sft-random"]["control_of"] == "sft"
    for feedme in ("sft", "bok"):
        assert not rep["regimes"][feedme]["collapsed"], rep["verdict"]["text"]
        assert feedme not in rep["verdict"]["collapsed"]
    assert "with a KL penalty (PPO, RLOO, GRPO) collapse less than FeedME" in rep["verdict"]["text"]
    # a drop with no gold gain (the raters prefer nothing) is flagged: never preference-driven collapse
    for name, r in rep["regimes"].items():
        if r["group"] == "online RL" and r["call"] != "not collapsed":
            assert name in rep["verdict"]["no_gold_gain"], rep["verdict"]["text"]
    # along-training curves for every trained regime, the base's exact reference curves, the frontier section
    fr = rep["frontier"]
    assert set(fr["curves"]) >= {"sft", "kl0.1"} and fr["references"]["best_of_k"][0]["k"] == 1
    assert {c["x"] for c in fr["comparisons"]} == {"kl", "gold_gain"}
    assert rep["verdict"]["answer"].startswith(("NO CALL", "UNDECIDED"))  # one seed: no YES/NO at matched KL
    assert (out / "plots" / "frontier.png").exists() and "## Matched distance" in (out / "report.md").read_text()


@pytest.mark.slow
def test_same_seed_twice_gives_identical_report_numbers_and_another_seed_does_not(tmp_path):
    """Every stage retrained in a second checkpoints dir (the base copied over): same numbers, whether the
    stages run in this process in order or in two worker processes (at the same threads per stage)."""
    args = ["preset=quick", "regimes=[sft,kl0.1]", "ppo.steps=3", *TINY_EVAL, *TINY_PRETRAIN]
    a = _real_ablation(*args, "jobs=1", f"checkpoints_dir={tmp_path / 'a'}")
    shutil.copytree(tmp_path / "a" / "base", tmp_path / "b" / "base")
    b = _real_ablation(*args, "jobs=2", f"checkpoints_dir={tmp_path / 'b'}")
    c = _real_ablation(*args, "seed=1", f"checkpoints_dir={tmp_path / 'b'}")
    ra, rb, rc = (json.loads((x / "report.json").read_text()) for x in (a, b, c))
    numbers = lambda r: {n: v["metrics"] for n, v in r["regimes"].items()}
    assert numbers(ra) == numbers(rb)
    assert ra["verdict"]["text"] == rb["verdict"]["text"]
    assert numbers(rc)["sft"]["norm_entropy"] != numbers(ra)["sft"]["norm_entropy"]
    assert numbers(rc)["kl0.1"]["kl_to_reference"] != numbers(ra)["kl0.1"]["kl_to_reference"]


def test_the_stand_in_stages_do_not_outlive_the_fake_ablations(fake_ablation):
    """The stand-ins replace the stages only while a fake ablation runs: every later test in this process (the
    slow ones run the real stages) gets the real ones. Cheap: the fixture is shared with the tests above."""
    from collapse_lab.regimes.ppo import train_ppo
    from collapse_lab.stages.ratings import rate
    from collapse_lab.stages.reward_model import train_reward_model
    from collapse_lab.regimes.sft import train_sft

    assert ablate.load_stage("ratings") is rate
    assert ablate.load_stage("reward_model") is train_reward_model
    assert ablate.load_stage("sft") is train_sft
    assert ablate.load_stage("kl0.1") is train_ppo


def test_wandb_summary_judges_regimes_not_controls():
    result = {"regimes": {
        "sft": {"metrics": {"norm_entropy": {"mean": 0.9}}, "collapsed": False, "call": "not collapsed"},
        "sft-random": {"metrics": {"norm_entropy": {"mean": 0.9}}, "collapsed": None, "control_of": "sft"},
        "kl0.1": {"metrics": {"norm_entropy": {"mean": 0.7}}, "collapsed": False, "call": "inconclusive"},
        "kl0": {"metrics": {"norm_entropy": {"mean": 0.4}}, "collapsed": True, "call": "collapsed"}}}
    flat = ablate.flat_summary(result)
    assert flat["sft-random/norm_entropy"] == 0.9 and "sft-random/collapsed" not in flat
    assert (flat["sft/collapsed"], flat["kl0.1/collapsed"], flat["kl0/collapsed"]) == (0.0, 0.5, 1.0)


def test_the_ablations_summary_run_is_offline_unless_told(monkeypatch, tmp_path):
    """The presets silence the per-stage W&B runs (seconds each); the ablation's summary run stays
    offline by default, and `wandb.mode=` on the command line (or $WANDB_MODE) decides."""
    from collapse_lab.core import tracking

    seen = []
    monkeypatch.setattr(tracking, "init", lambda cfg, out, job_type: seen.append(cfg.wandb.mode))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # online needs a login (config._check_wandb_login); init is a stand-in
    for args, mode in ((["preset=quick"], "offline"), (["preset=quick", "wandb.mode=disabled"], None),
                       (["preset=default", "wandb.mode=online"], "online")):
        seen.clear()
        ablate._log_to_wandb(ablate.plan([f"checkpoints_dir={tmp_path}", *args]), tmp_path, {"regimes": {}})
        assert seen == ([mode] if mode else []), args
    monkeypatch.setenv("WANDB_MODE", "disabled")
    seen.clear()
    ablate._log_to_wandb(ablate.plan([f"checkpoints_dir={tmp_path}", "preset=quick"]), tmp_path, {"regimes": {}})
    assert seen == []

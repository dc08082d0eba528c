"""Runs that survive kills, concurrency and bad input (issue 15), one test per case:

 1. kill -9 during the final save of pretrain, PPO, SFT and the reward model: the same command then
    finishes with weights and metrics identical to an uninterrupted run (COLLAPSE_LAB_FAULT=save:<stage>
    makes checkpoint.publish SIGKILL its own process with half the final files renamed into place)
 2. a resumed PPO run unpickles nothing: a planted pickle never runs
 3. two identical runs started together: one result, the other waited for it
 4. resumed PPO metrics: the killed run's rows after the checkpoint are dropped, steps strictly increase
 5. every numeric key is range-checked: exit 2, one line, before any work, nothing written
 6-11. outputs, names, encodings, corrupt models, one-answer suites, unfinished runs: one line, before work
 12. wandb.mode does not overwrite $WANDB_MODE
"""

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoTokenizer

from collapse_lab.regimes import ppo as ppo_module
from collapse_lab.core.checkpoint import FAULT, read_manifest
from collapse_lab.core.config import SCHEMAS, ConfigError, EvalConfig, cli, compose, ranges, schema
from collapse_lab.regimes.ppo import ppo_dir, train_ppo
from collapse_lab.stages.pretrain import pretrain
from collapse_lab.stages.reward_model import train_reward_model
from collapse_lab.regimes.sft import train_sft

from conftest import REPO, TINY_PRETRAIN

PPO = ("ppo.steps=4", "ppo.save_every=2", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.max_new_tokens=4")
RATINGS = ("ratings.prompts=16", "ratings.samples_per_prompt=2", "ratings.max_new_tokens=3", "world.rater.noise_std=1.5")
SFT = RATINGS + ("sft.batch_size=4",)
RM = RATINGS + ("reward_model.epochs=1", "reward_model.batch_size=8")
WALL_CLOCK = ("time/step_s", "train_runtime", "train_samples_per_second", "train_steps_per_second",
              "train_tokens_per_second")


def _run(*args, env=None, **kw):
    full = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _lab(tmp, *overrides, base=None):
    return compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp}", *([f"base_path={base}"] if base else []),
                           *overrides])


def _argv(tmp, *overrides, base=None):
    return ["wandb.mode=disabled", f"checkpoints_dir={tmp}", *([f"base_path={base}"] if base else []), *overrides]


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The subprocesses run with OMP_NUM_THREADS=1. Float sums are reordered by the thread count, so the
    in-process runs they are compared with bit for bit (and each other) run on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrain(compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={tmp_path_factory.mktemp('base')}"]))


@pytest.fixture(scope="module")
def ppo_whole(base, tmp_path_factory):
    """The uninterrupted PPO run every interrupted one must reproduce."""
    return train_ppo(_lab(tmp_path_factory.mktemp("whole"), *PPO, base=base))


# ------------------------------------------------------------------ 1. kill -9 during the final save


def _killed_then_rerun(script, tmp, overrides, stage):
    """The stage run as a subprocess that SIGKILLs itself mid-publish; then the same command again."""
    p = _run(script, *overrides, env={FAULT: f"save:{stage}"})
    _, err = p.communicate(timeout=600)
    assert p.returncode == -9, err[-2000:]
    (out,) = [d for d in (tmp / stage).iterdir()]
    assert read_manifest(out)["status"] == "running"
    assert (out / ".publish").is_dir()  # killed with the final files half renamed
    p = _run(script, *overrides)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert read_manifest(out)["status"] == "finished" and not (out / ".publish").exists()
    return out


@pytest.mark.slow
def test_pretrain_killed_during_its_final_save_finishes_identically(tmp_path):
    whole = pretrain(_lab(tmp_path / "a", *TINY_PRETRAIN))
    out = _killed_then_rerun("train/pretrain.py", tmp_path / "b", _argv(tmp_path / "b", *TINY_PRETRAIN), "base")
    assert _same_weights(out, whole) and _rows(out / "metrics.jsonl") == _rows(whole / "metrics.jsonl")
    # the same tokenizer, whole (its config differs only by transformers' is_local flags when loaded from disk)
    assert (out / "tokenizer.json").read_text() == (whole / "tokenizer.json").read_text()
    loaded, fresh = (AutoTokenizer.from_pretrained(d) for d in (out, whole))
    assert loaded.special_tokens_map == fresh.special_tokens_map and loaded.get_vocab() == fresh.get_vocab()
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6] and all("loss" in r for r in rows)  # no per-session summary row
    assert read_manifest(out)["final_loss"] == rows[-1]["loss"]


@pytest.mark.slow
def test_ppo_killed_during_its_final_save_finishes_identically(base, ppo_whole, tmp_path):
    out = _killed_then_rerun("train/ppo.py", tmp_path, _argv(tmp_path, *PPO, base=base), "ppo")
    assert _same_weights(out, ppo_whole)
    assert _rows(out / "metrics.jsonl") == _rows(ppo_whole / "metrics.jsonl")  # steps 1..4, once each


@pytest.mark.slow
def test_sft_killed_during_its_final_save_finishes_identically(base, tmp_path):
    whole = train_sft(_lab(tmp_path / "a", *SFT, base=base))
    out = _killed_then_rerun("train/sft.py", tmp_path / "b", _argv(tmp_path / "b", *SFT, base=base), "sft")
    assert _same_weights(out, whole) and _rows(out / "metrics.jsonl") == _rows(whole / "metrics.jsonl")


@pytest.mark.slow
def test_reward_model_killed_during_its_final_save_finishes_identically(base, tmp_path):
    whole = train_reward_model(_lab(tmp_path / "a", *RM, base=base))
    out = _killed_then_rerun("train/reward.py", tmp_path / "b", _argv(tmp_path / "b", *RM, base=base), "reward")
    assert _same_weights(out, whole)
    metrics = lambda d: {k: v for k, v in read_manifest(d).items() if k.startswith(("eval_", "train_", "steps"))}  # noqa
    assert metrics(out) == metrics(whole)


# ------------------------------------------------------- 2, 4. PPO resume: no pickle, no duplicate rows


def _interrupted_after_row(cfg, monkeypatch, step):
    """Run PPO until metrics row `step` is written, then interrupt it (a kill between two steps)."""
    real = ppo_module.tracking.log

    def log(row, step):
        real(row, step=step)
        if step == stop:
            raise KeyboardInterrupt

    stop = step
    monkeypatch.setattr(ppo_module.tracking, "log", log)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(cfg)
    monkeypatch.setattr(ppo_module.tracking, "log", real)
    return ppo_dir(cfg)


def test_resumed_ppo_drops_the_rows_after_its_checkpoint(base, ppo_whole, tmp_path, monkeypatch):
    cfg = _lab(tmp_path, *PPO, base=base)
    out = _interrupted_after_row(cfg, monkeypatch, 3)
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2, 3]  # resumes from step-2
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "objective/k')  # and a row cut short by the kill
    train_ppo(cfg)
    assert _rows(out / "metrics.jsonl") == _rows(ppo_whole / "metrics.jsonl")
    assert _same_weights(out, ppo_whole)


def test_resumed_ppo_with_curve_max_gap_measures_from_its_last_point(base, tmp_path, monkeypatch):
    """curve.max_gap's reference (the probe at the last point) is restored on resume from the metrics kept: the
    resumed run places its points where the uninterrupted one did. The gap is set from the run's own probe values so
    that step 3 is due against the last point (step 1) but would be against the base's 0: a resume that forgot the
    last point would add a point there."""
    import math

    from collapse_lab.evaluation.frontier import Curve
    from collapse_lab.models.models import load_pretrained
    from collapse_lab.world.world import make_world

    lab = ("ppo.lr=3e-4",)
    every = _rows(train_ppo(_lab(tmp_path / "every", *PPO, *lab, "curve.points=4", base=base)) / "metrics.jsonl")
    cfg0 = _lab(tmp_path / "every", *PPO, *lab, base=base)
    curve = Curve(*load_pretrained(str(base), "float32"), make_world(cfg0.world))
    probe = [math.sqrt(sum(r[f"frontier/kl/{curve.prompts[i].id}"] for i in curve.probes) / len(curve.probes))
             for r in every]  # steps 1..4
    lo, hi = max(abs(probe[1] - probe[0]), abs(probe[2] - probe[0])), probe[2]
    assert lo < hi  # the policy moved away from the base by step 3 more than between steps 1 and 3
    gap = ("curve.points=1", f"curve.max_gap={(lo + hi) / 2!r}")
    whole = _rows(train_ppo(_lab(tmp_path / "whole", *PPO, *lab, *gap, base=base)) / "metrics.jsonl")
    assert [r["step"] for r in whole if "frontier/kl" in r] == [1, 4]
    cfg = _lab(tmp_path / "cut", *PPO, *lab, *gap, base=base)
    out = _interrupted_after_row(cfg, monkeypatch, 3)
    train_ppo(cfg)
    assert _rows(out / "metrics.jsonl") == whole


class _Planted:
    """Unpickling this creates the file `marker`: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_pickle_in_a_ppo_checkpoint_never_runs(base, ppo_whole, tmp_path, monkeypatch):
    cfg = _lab(tmp_path / "ck", *PPO, base=base)
    out = _interrupted_after_row(cfg, monkeypatch, 3)
    step = out / "checkpoints" / "step-2"
    assert not list(step.glob("custom_checkpoint_*.pkl"))  # the lab writes none: β and counters are state.json
    marker = tmp_path / "pwned"
    (step / "custom_checkpoint_1.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ConfigError, match="custom_checkpoint_1.pkl: a pickle the lab never writes"):
        train_ppo(cfg)
    assert not marker.exists()
    # accelerate's own files load with weights_only=True: a planted RNG-state pickle does not run either, and
    # a resume that cannot restore the RNG state is refused (issue 28, case 5: load_state skipped it silently)
    (step / "custom_checkpoint_1.pkl").unlink()
    good = (step / "random_states_0.pkl").read_bytes()
    for bad in (pickle.dumps({"x": _Planted(marker)}), good[: len(good) // 2]):
        (step / "random_states_0.pkl").write_bytes(bad)
        with pytest.raises(ConfigError, match=r"random_states_0.pkl cannot restore the run's random state .*repair: rm -r"):
            train_ppo(cfg)
        assert not marker.exists() and read_manifest(out)["status"] == "failed"  # not left "running"
    shutil.rmtree(step)  # the repair the message names: the run restarts, and gives the uninterrupted result
    train_ppo(cfg)
    assert read_manifest(out)["status"] == "finished" and _same_weights(out, ppo_whole)
    assert _rows(out / "metrics.jsonl") == _rows(ppo_whole / "metrics.jsonl")


# ----------------------------------------------------------------- 3. two identical runs at once


# A process that imports the lab, says "ready", and runs the script in argv when it reads a line: two of them
# started with their imports done reach the run's lock together, whatever the load (a 4-step run takes ~2 s;
# under load one process's imports alone can take longer, and it would find the run finished, never waiting).
WARM = ("import runpy, sys; import collapse_lab.regimes.ppo, collapse_lab.regimes.registry; print('ready', flush=True); "
        "sys.stdin.readline(); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.slow
def test_two_identical_runs_started_together_give_one_result(base, ppo_whole, tmp_path):
    args = ("train/ppo.py", *_argv(tmp_path, *PPO, base=base))
    a, b = (_run("-c", WARM, *args, stdin=subprocess.PIPE) for _ in range(2))
    for p in (a, b):
        assert p.stdout.readline().strip() == "ready"
    for p in (a, b):
        p.stdin.write("go\n")
        p.stdin.flush()
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=600), b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, (err_a[-2000:], err_b[-2000:])
    waited = [(o, e) for o, e in ((out_a, err_a), (out_b, err_b)) if "in use by PID" in e]
    assert len(waited) == 1, (err_a[-1000:], err_b[-1000:])
    line = next(x for x in waited[0][1].splitlines() if "in use by PID" in x)
    assert str(a.pid) in line or str(b.pid) in line  # names the holder
    assert "already finished" in waited[0][0]
    (out,) = (tmp_path / "ppo").iterdir()
    assert read_manifest(out)["status"] == "finished"
    assert _rows(out / "metrics.jsonl") == _rows(ppo_whole / "metrics.jsonl") and _same_weights(out, ppo_whole)


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    """The lock is the kernel's: a holder killed with -9 leaves nothing to wait for."""
    from collapse_lab.core.checkpoint import lock_run, unlock_run

    out = tmp_path / "ppo" / "run"
    code = (f"import sys; from collapse_lab.core.checkpoint import lock_run; lock_run({str(out)!r}); "
            "print('held', flush=True); sys.stdin.read()")
    holder = _run("-c", code, stdin=subprocess.PIPE, env={"PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    lock_run(out)  # would wait forever if the dead holder's lock were still there
    unlock_run(out)
    assert not out.exists()  # taking the lock creates no run directory


# --------------------------------------------------------------------- 5. every numeric key's range


def _numeric_keys(schema, prefix=""):
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        t = hints[f.name]
        if typing.get_origin(t) is typing.Union:  # Optional[x] -> x
            t = next(a for a in typing.get_args(t) if a is not type(None))
        if is_dataclass(t):
            yield from _numeric_keys(t, f"{prefix}{f.name}.")
        elif t in (int, float):
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_numeric_key_has_a_range(name):
    assert sorted(_numeric_keys(schema(name))) == sorted(ranges(name))  # the regimes' sections: their fields' metadata


def outside(valid) -> object:
    """A value just outside the range `valid`: its low end when open, one below it when closed, else one above
    its high end; "nan" for a range of every finite number (ANY)."""
    if valid.low > -math.inf:
        return valid.low if valid.low_open else valid.low - 1
    return valid.high if valid.high_open else valid.high + 1 if valid.high < math.inf else "nan"


BASE_ARGS = {"lab": [], "evaluate": ["model_path=x"], "ablate": []}


@pytest.mark.parametrize("name,key", [(n, k) for n in sorted(SCHEMAS) for k in ranges(n)])
def test_every_bad_value_is_exit_2_with_one_line_before_any_work(name, key, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    valid = ranges(name)[key]
    value = outside(valid)
    assert value == "nan" or value not in valid
    called = []
    with pytest.raises(SystemExit) as e:
        cli(name, called.append, [*BASE_ARGS[name], f"{key}={value}", f"checkpoints_dir={tmp_path}/ck"]
            if name != "evaluate" else [*BASE_ARGS[name], f"{key}={value}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not called and not list(tmp_path.iterdir())
    assert err.count("\n") == 1 and err.startswith(f"error: {key} must be {valid}, got "), err


@pytest.mark.parametrize("override", ["ppo.steps=-1", "ppo.rollout_batch_size=0", "ppo.save_every=0",
                                      "ppo.temperature=0", "pretrain.steps=0", "pretrain.batch_size=0"])
def test_the_reported_bad_values_name_key_value_and_range(override, capsys):
    with pytest.raises(SystemExit):
        cli("lab", print, [override])
    key, value = override.split("=")
    assert re.fullmatch(rf"error: {key} must be [>(\[].*, got {value}(\.0)?\n", capsys.readouterr().err)


@pytest.mark.slow
def test_a_bad_value_on_the_command_line_writes_nothing(tmp_path):
    p = _run("train/ppo.py", "ppo.steps=-1", f"checkpoints_dir={tmp_path}/ck")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and err == "error: ppo.steps must be >= 1, got -1\n"
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------- 6-11. inputs and outputs, one line each


def _sweep_file(tmp_path, text, raw=None):
    path = tmp_path / "s.yaml"
    path.write_bytes(raw if raw is not None else text.encode())
    return path


@pytest.mark.parametrize("name", ["a/b", "..", "../up"])
def test_a_sweep_name_must_be_a_plain_name(tmp_path, name):
    from collapse_lab.lab import sweep

    path = _sweep_file(tmp_path, f"name: '{name}'\nmethod: grid\nparameters:\n  seeds: {{value: 1}}\n")
    with pytest.raises(ConfigError, match="bad sweep name"):
        sweep.main([str(path), f"checkpoints_dir={tmp_path}/ck"])
    assert not (tmp_path / "ck").exists()


def test_non_utf8_suite_and_sweep_files_are_one_line(tmp_path):
    from collapse_lab.lab import sweep
    from collapse_lab.core.suites import SuiteError, load_suite

    path = _sweep_file(tmp_path, "", raw="name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        sweep.load(path)
    with pytest.raises(SuiteError, match="not UTF-8 text"):
        load_suite(str(path))


def test_a_one_answer_suite_is_rejected_when_loaded(tmp_path):
    from collapse_lab.core.suites import SuiteError, load_suite

    path = _sweep_file(tmp_path, "prompts:\n  - id: one\n    text: 'Pick:'\n    answers: {values: [' 7']}\n")
    with pytest.raises(SuiteError, match="at least 2"):
        load_suite(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.tiny_models import metaspace_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("model") / "m"
    tok = metaspace_tokenizer()
    tiny_llama(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _eval_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(EvalConfig), {"plots": False, "sampling": {"n": 0}, **kw})


@pytest.mark.parametrize("out", ["dir", "/proc/no/such/x.json", "/proc/x.json"])
def test_evaluator_out_is_checked_before_any_work(tmp_path, out):
    from collapse_lab.evaluation.evaluator import run

    empty = tmp_path / "empty"
    empty.mkdir()  # no model: loading it would fail, so the out= error shows the check came first
    out = str(tmp_path) if out == "dir" else out
    with pytest.raises(ConfigError, match=r"^out=.*(is a directory|cannot write under)"):
        run(_eval_cfg(model_path=str(empty), out=out))
    assert not list(tmp_path.glob("**/*.tmp"))


def test_corrupt_or_missing_model_files_are_one_line(model_dir, tmp_path):
    from collapse_lab.models.models import load_pretrained

    bad = tmp_path / "truncated"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot load model") as e:
        load_pretrained(str(bad))
    assert "\n" not in str(e.value)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match="holds no model"):
        load_pretrained(str(tmp_path / "nothing"))


def test_the_evaluator_refuses_an_unfinished_run_unless_allowed(model_dir, tmp_path, capsys):
    from collapse_lab.evaluation.evaluator import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in model_dir.iterdir():
        (run_dir / f.name).write_bytes(f.read_bytes())
    (run_dir / "manifest.json").write_text('{"status": "running"}')
    with pytest.raises(ConfigError, match="unfinished lab run \\(status running\\).*allow_unfinished=true"):
        run(_eval_cfg(model_path=str(run_dir)))
    assert not (run_dir / "eval").exists()
    run(_eval_cfg(model_path=str(run_dir), allow_unfinished=True))
    assert "warning: evaluating" in capsys.readouterr().err and (run_dir / "eval" / "seed.json").is_file()


def test_rejected_ppo_input_leaves_no_run_directory(base, tmp_path):
    cfg = _lab(tmp_path, "world=bandit", 'world.rewards=[[" 13",1.0]]', base=base)
    with pytest.raises(ConfigError, match="not one token"):
        train_ppo(cfg)
    assert not (tmp_path / "ppo").exists()


# ------------------------------------------------------------------------------ 12. $WANDB_MODE


def test_the_config_does_not_overwrite_wandb_mode(tmp_path, monkeypatch):
    from collapse_lab.core import tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking.init(_lab(tmp_path), tmp_path, job_type="test")  # wandb.mode=disabled
    assert os.environ["WANDB_MODE"] == "offline"


# ------------------------------------------------------------------------------ 13. a quiet console


def test_trainer_log_dicts_go_to_the_metrics_file_not_the_console(tmp_path, capfd):
    from collapse_lab.core.config import quiet_libraries

    quiet_libraries()  # as every entry point does (config.cli, the cli's own commands)
    out = pretrain(_lab(tmp_path, *TINY_PRETRAIN))
    console = "".join(capfd.readouterr())
    assert "{'loss'" not in console and "Writing model shards" not in console, console
    assert any("loss" in r for r in _rows(out / "metrics.jsonl"))


# ============================================================================ issue 28, one test per case
#
# 1. two configs released together on one run directory (and ablation.yaml): compared under the lock
# 2. pretrain killed between a save and a log (save_every not a multiple of log_every): the same metrics
# 3. one validation pass over the whole plan before its first stage
# 4. killing an ablation's main process (jobs=2) leaves no process behind
# 5. a PPO checkpoint whose RNG state cannot be restored is refused (test_a_planted_pickle_... above)
# 6. in-range values that crashed: seeds, heads, temperatures, names, outputs, kl_coef, W&B, world.rewards
# 7. damaged bookkeeping: one line naming the file and the repair
# 8. sweeps with an empty description, suites with huge answer ranges
# 9. a recipe's unknown key named, no stray running directories, $WANDB_MODE, a full disk

# A process that imports the lab, says so with a file, and waits for the go file: two of them started with their
# imports done reach the run directory together, whatever the load.
BARRIER = """
import os, runpy, sys, time
import collapse_lab.stages.pretrain, collapse_lab.regimes.registry  # the imports, before the barrier
ready, go, delay, script = sys.argv[1:5]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
time.sleep(float(delay))  # a start offset after the release
sys.argv = sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


def released_together(tmp: Path, *commands, offsets=None) -> list[tuple]:
    """Run each command (script, args...) past its imports, release all at once (each after its `offsets`
    seconds); [(process, stdout, stderr)]."""
    import time

    tmp.mkdir(parents=True, exist_ok=True)
    offsets = offsets or [0.0] * len(commands)
    procs = [_run("-c", BARRIER, str(tmp / f"ready{i}"), str(tmp / "go"), str(offsets[i]), *cmd)
             for i, cmd in enumerate(commands)]
    deadline = time.time() + 1200  # imports alone took 6 minutes on a 2-core machine at load 14
    while not all((tmp / f"ready{i}").exists() for i in range(len(commands))):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"not ready: {[p.communicate()[1][-1000:] for p in procs]}")
        time.sleep(0.01)
    (tmp / "go").touch()
    return [(p, *p.communicate(timeout=600)) for p in procs]


def _tiny(**pretrain) -> list[str]:
    keys = tuple(f"pretrain.{k}=" for k in pretrain)
    return [o for o in TINY_PRETRAIN if not o.startswith(keys)] + [f"pretrain.{k}={v}" for k, v in pretrain.items()]


def _one_line_error(err: str) -> str:
    """The error line of a run refused with one line (a "waiting for PID" notice may come before it)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip() and "in use by PID" not in x and "mtime may not be" not in x]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def race(tmp: Path, offsets=None) -> tuple[int, str]:
    """Case 1 once: pretrain steps=6 and steps=8 on name=shared, released together (each `offsets` seconds
    later). Returns the winner's steps and the loser's error line; fails if both or neither exit 0, or the
    finished run is not the winner's (benchmarks/bench_faults.py repeats it with random offsets)."""
    ck = tmp / "ck"
    runs = {steps: ("train/pretrain.py", *_argv(ck, *_tiny(steps=steps), "name=shared")) for steps in (6, 8)}
    results = dict(zip(runs, released_together(tmp, *runs.values(), offsets=offsets)))
    codes = {steps: p.returncode for steps, (p, _, _) in results.items()}
    assert sorted(codes.values()) == [0, 2], {s: e[-2000:] for s, (_, _, e) in results.items()}
    winner = next(s for s, c in codes.items() if c == 0)
    _, out, err = results[14 - winner]
    assert "already finished" not in out
    manifest = read_manifest(ck / "base" / "shared")
    assert manifest["status"] == "finished" and manifest["steps"] == winner
    return winner, _one_line_error(err)


def test_1_two_configs_released_together_never_share_a_directory(tmp_path):
    _, error = race(tmp_path)
    assert "holds a run with a different config (at 'pretrain.steps')" in error


def test_1_an_ablation_directory_is_compared_again_under_its_lock(tmp_path):
    from collapse_lab.lab import ablate

    p = ablate.plan([f"checkpoints_dir={tmp_path}", "name=x", "preset=quick", "seeds=1"])
    p.out.mkdir(parents=True)
    (p.out / "ablation.yaml").write_text("digest: 0123abcd\n")  # another ablation's, written after this plan
    with pytest.raises(ConfigError, match="holds an ablation with a different config"):
        ablate.run(p)
    assert not (p.out / "manifest.json").exists()  # refused before anything was written


def test_2_pretrain_killed_between_a_save_and_a_log_logs_as_an_uninterrupted_run(tmp_path, capfd):
    over = _tiny(steps=8, save_every=3, log_every=2)  # saves at 3, 6; logs at 2, 4, 6, 8
    whole = pretrain(_lab(tmp_path / "a", *over))
    argv = _argv(tmp_path / "b", *over)
    p = _run("train/pretrain.py", *argv, env={FAULT: "step:base:5"})  # kill -9 after step 5: resumes from step 3
    _, err = p.communicate(timeout=600)
    assert p.returncode == -9, err[-2000:]
    (out,) = (tmp_path / "b" / "base").iterdir()
    assert json.loads((out / "trainer" / "checkpoint-3" / "log_carry_0.json").read_text())["last_logged"] == 2
    assert pretrain(_lab(tmp_path / "b", *over)) == out  # the same command, here (no second start-up)
    assert "resuming from" in capfd.readouterr().out
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows == _rows(whole / "metrics.jsonl")  # step 4's loss averages steps 3-4 as in the uninterrupted run


def _lab_main(stage):
    from collapse_lab.regimes import registry

    return lambda cfg: registry.run(stage, cfg)


@pytest.mark.parametrize("stage,overrides,message", [
    ("ppo", ["ppo.rollout_batch_size=16", "ppo.minibatch_size=7"], "ppo.rollout_batch_size over ppo.minibatch_size"),
    ("sft", ["sft.min_score=8"], "sft.min_score=8 is above the rater's highest score 7"),
    ("sft", ["world=bandit", "sft.min_score=1.5"], "above the rater's highest score 1"),
    ("ppo", ["pretrain.micro_batches=3"], "pretrain.batch_size per process over pretrain.micro_batches"),
    ("rloo", ["rloo.samples_per_prompt=5"], "rloo.rollout_batch_size over rloo.samples_per_prompt"),
    ("ppo", ["name=" + "x" * 256], "256 bytes, at most 255"),  # the PPO run's name: not after its base
])
def test_3_a_plan_that_cannot_run_is_refused_before_its_first_stage(stage, overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli("lab", _lab_main(stage), [f"checkpoints_dir={tmp_path}/ck", *overrides])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in _one_line_error(err)
    assert not (tmp_path / "ck").exists()  # no base pretrained, nothing rated


@pytest.mark.parametrize("overrides,message", [
    (["regimes=[sft,kl0.1]", "ppo.minibatch_size=7"], "ppo.rollout_batch_size over ppo.minibatch_size"),
    (["regimes=[sft]", "sft.min_score=8"], "sft.min_score=8 is above"),
    (["seed=4294967295", "seeds=2"], "replicate seeds must be in [0, 4294967295]"),
])
def test_3_an_ablation_that_cannot_run_is_refused_by_its_plan(overrides, message, tmp_path):
    from collapse_lab.lab import ablate

    with pytest.raises(ConfigError, match=re.escape(message)):
        ablate.plan([f"checkpoints_dir={tmp_path}", *overrides])
    assert not list(tmp_path.iterdir())


def test_3_collapse_lab_run_checks_the_evaluation_before_pretraining(tmp_path, monkeypatch, capsys):
    from collapse_lab import cli as lab

    calls = []
    monkeypatch.setattr(lab.pretrain, "pretrain", lambda cfg: calls.append("pretrain") or lab.pretrain.base_dir(cfg))
    monkeypatch.setattr(lab.evaluator, "run", lambda cfg: calls.append(cfg.model_path))
    lab.main(["run", f"checkpoints_dir={tmp_path}", "name='a,b'"])  # a name the evaluator's override must quote
    assert calls == ["pretrain", str(tmp_path / "base" / "a,b")]
    calls.clear()
    with pytest.raises(SystemExit) as e:
        lab.main(["run", f"checkpoints_dir={tmp_path}", "name=" + "x" * 256])
    assert e.value.code == 2 and not calls and "at most 255" in _one_line_error(capsys.readouterr().err)


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_4_killing_an_ablations_main_process_leaves_no_process_behind(tmp_path):
    import time

    import psutil

    args = ["-m", "collapse_lab.cli", "ablate", "jobs=2", "seeds=1", "regimes=[sft]", "controls=false", "name=k",
            f"checkpoints_dir={tmp_path}", "eval.suites=[seed]", "eval.samples=8", "eval.gold_samples=8",
            *_tiny(steps=4), "ratings.prompts=8", "ratings.samples_per_prompt=2", "sft.batch_size=4"]
    main = _run(*args)
    deadline, worker = time.time() + 300, None
    while worker is None:  # the spawned worker (it imports the lab: then a stage may be running in it)
        assert time.time() < deadline and main.poll() is None, main.communicate()[1][-2000:]
        worker = next((c for c in _descendants(main.pid) if "spawn_main" in " ".join(c.cmdline())), None)
        time.sleep(0.1)
    time.sleep(2.0)
    family = _descendants(main.pid)
    assert any("resource_tracker" in " ".join(c.cmdline()) for c in family)
    main.kill()  # SIGKILL: no cleanup runs in it
    main.wait()
    time.sleep(5.0)
    alive = [c for c in family if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(c.pid, c.cmdline()) for c in alive]


def test_4_a_worker_ends_with_its_parent(tmp_path):
    """The mechanism alone: a process that called orphans.die_with_parent outlives its parent by < 5 s, and a
    spawned worker whose parent died before it started ends at once."""
    import time

    import psutil

    code = ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', "
            "'import os, time; from collapse_lab.core.orphans import die_with_parent; die_with_parent(os.getppid()); "
            "print(os.getpid(), flush=True); time.sleep(600)'], stdout=sys.stdout); child.wait()")
    parent = _run("-c", code, env={"PYTHONPATH": str(REPO)})
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    deadline = time.time() + 5
    while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.1)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    code = ("import multiprocessing, time; multiprocessing.current_process()._inheriting = True; "  # as spawn's prepare
            "import collapse_lab; time.sleep(600)")
    late = _run("-c", code, env={"PYTHONPATH": str(REPO), "COLLAPSE_LAB_PARENT_PID": "1"})  # PID 1: not its parent
    assert late.wait(timeout=60) == 1


def _exit_2(name, argv, capsys, fn=None):
    """cli(name, fn, argv): exit 2 with one error line, fn never reached or refused before any work."""
    called = []
    with pytest.raises(SystemExit) as e:
        cli(name, fn or called.append, argv)
    assert e.value.code == 2 and not called
    return _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("name,override,message", [
    ("lab", "seed=4294967296", "seed must be in [0, 4294967295], got 4294967296"),
    ("lab", "pretrain.seed=4294967296", "pretrain.seed must be in [0, 4294967295]"),
    ("lab", "model.num_heads=3", "model.num_heads=3 must divide model.hidden_size=256"),
    ("lab", "ppo.temperature=1e-45", "ppo.temperature must be >= 0.001"),
    ("lab", "ratings.temperature=1e-45", "ratings.temperature must be >= 0.001"),
    ("lab", "ppo.kl_coef=1e30", "ppo.kl_coef must be in [0, 10000]"),
    ("lab", 'world.rewards=[[" 7"]]', "world.rewards: each entry must be [token text, finite reward], got [' 7']"),
    ("lab", 'world.rewards=[[" 7","x"]]', "world.rewards: each entry must be"),
    ("evaluate", "seed=18446744073709551616", "seed must be in [0, 4294967295]"),
    ("evaluate", "sampling.temperature=1e-45", "sampling.temperature must be >= 0.001"),
])
def test_6_in_range_values_that_crashed_are_one_line(name, override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*BASE_ARGS[name], override] + ([f"checkpoints_dir={tmp_path}/ck"] if name == "lab" else [])
    assert message in _exit_2(name, argv, capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override,message", [
    ("name=" + "x" * 256, "256 bytes, at most 255"),
    ("checkpoints_dir={file}", "is a file; give a directory"),
])
def test_6_names_and_outputs_that_crashed_are_one_line(override, message, tmp_path, capsys):
    file = tmp_path / "hostname"
    file.write_text("x\n")
    err = _exit_2("lab", [*_tiny(), override.format(file=file)], capsys, fn=pretrain)
    assert message in err and sorted(tmp_path.iterdir()) == [file]


def test_6_wandb_online_without_a_login_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    err = _exit_2("lab", ["wandb.mode=online", f"checkpoints_dir={tmp_path}/ck"], capsys)
    assert "wandb.mode=online needs a W&B login" in err and not (tmp_path / "ck").exists()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # with one: composes (nothing contacts W&B here)
    assert compose("lab", ["wandb.mode=online"]).wandb.mode == "online"


def test_6_a_non_finite_loss_is_one_line_and_the_run_failed(capsys):
    from collapse_lab.core.config import run_failure

    assert run_failure(FloatingPointError("non-finite PPO loss at step 3")) == "non-finite PPO loss at step 3"
    assert run_failure(KeyError("a bug")) is None  # anything else keeps its traceback


# --------------------------------------------------------------------- 7. damaged bookkeeping, one line


@pytest.fixture
def finished_base(base, tmp_path):
    """A copy of the module's finished base, found finished by `pretrain(cfg)` in its new place."""
    root = tmp_path / "ck"
    shutil.copytree(Path(base).parent.parent, root, ignore=shutil.ignore_patterns(".locks"))
    cfg = compose("lab", TINY_PRETRAIN + [f"checkpoints_dir={root}"])
    out = root / "base" / Path(base).name
    assert pretrain(cfg) == out
    return cfg, out


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,message", [
    (lambda out: _cut(out / "manifest.json"), "manifest.json is damaged"),
    (lambda out: _cut(out / "metrics.jsonl"), "metrics.jsonl is damaged"),
    (lambda out: (out / "config.yaml").write_text("model: [unclosed\n"), "config.yaml is damaged"),
    (lambda out: (out / "model.safetensors").unlink(), "its manifest says finished but model.safetensors is missing"),
])
def test_7_a_damaged_finished_run_is_one_line_naming_the_file_and_the_repair(finished_base, damage, message, capsys):
    cfg, out = finished_base
    damage(out)
    with pytest.raises(SystemExit) as e:
        cli("lab", pretrain, [*TINY_PRETRAIN, f"checkpoints_dir={cfg.checkpoints_dir}"])
    err = _one_line_error(capsys.readouterr().err)
    assert e.value.code == 2 and message in err and f"repair: rm -r {out}" in err
    shutil.rmtree(out)  # the repair: the run is redone
    assert read_manifest(pretrain(cfg))["status"] == "finished"


def test_7_the_evaluator_names_a_damaged_manifest(finished_base):
    from collapse_lab.evaluation.evaluator import run

    _, out = finished_base
    _cut(out / "manifest.json")
    with pytest.raises(ConfigError, match=r"manifest.json is damaged .*repair: rm -r"):
        run(_eval_cfg(model_path=str(out)))


def test_7_a_damaged_ablation_file_is_one_line_in_the_report(tmp_path):
    from collapse_lab.lab import report

    (tmp_path / "ablation.yaml").write_text("digest: x\nablate: {collapse: {threshold: 0.05, confidence: 0.95}}\n")
    (tmp_path / "runs.json").write_text('{"base": "b", "runs": [{"regime": "sf')
    with pytest.raises(ConfigError, match=r"runs.json is damaged .*repair: rerun the collapse-lab ablate command"):
        report.build(tmp_path, write=False)


# ------------------------------------------------------------------------- 8. sweeps and suites


def test_8_a_sweep_with_an_empty_description_loads(tmp_path):
    from collapse_lab.lab import sweep

    path = _sweep_file(tmp_path, "name: s\ndescription:\nmethod: grid\nparameters:\n  seeds: {value: 1}\n")
    assert sweep.load(path)["description"] == ""
    path = _sweep_file(tmp_path, "name: s\ndescription: [1]\nmethod: grid\nparameters:\n  seeds: {value: 1}\n")
    with pytest.raises(ConfigError, match="'description' must be text"):
        sweep.load(path)


def test_8_a_suites_answer_range_is_bounded(tmp_path):
    from collapse_lab.core.suites import SuiteError, load_suite

    path = _sweep_file(tmp_path, "prompts:\n  - id: big\n    text: 'Pick:'\n    answers: {low: 0, high: 300000000}\n")
    with pytest.raises(SuiteError, match="300000001 answers .*at most 10000"):
        load_suite(str(path))


# --------------------------------------------------------------------------------- 9. the rest


def test_9_a_recipes_unknown_key_is_named(tmp_path, monkeypatch):
    from collapse_lab.core import config

    recipes = tmp_path / "recipes"
    shutil.copytree(config.RECIPES_DIR, recipes)
    (recipes / "recipe" / "typo.yaml").write_text("# @package _global_\nppo:\n  kl_cof: 0.1\n")
    monkeypatch.setattr(config, "RECIPES_DIR", recipes)
    with pytest.raises(ConfigError, match=r"unknown key 'ppo.kl_cof' \(did you mean 'kl_coef'\?\).*recipe/typo.yaml"):
        compose("lab", ["recipe=typo"])


def test_9_a_weightless_base_leaves_no_run_directory(tmp_path, model_dir):
    from collapse_lab.regimes import registry

    empty = tmp_path / "empty"
    shutil.copytree(model_dir, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(ConfigError):
        registry.run("sft", _lab(tmp_path / "ck", *SFT, base=empty))
    assert not (tmp_path / "ck").exists()


def test_9_bad_input_found_once_a_stage_started_ends_it_failed_not_running(base, tmp_path):
    from collapse_lab.stages.stage import run_stage

    out = tmp_path / "ppo" / "x"
    with pytest.raises(ConfigError):
        with run_stage(_lab(tmp_path), out, "ppo", "", track=False) as run:
            run.start()
            raise ConfigError("no sample scored >= sft.min_score")
    assert read_manifest(out)["status"] == "failed"


def test_9_wandb_mode_from_the_environment_unless_the_command_line_says(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose("lab", []).wandb.mode == "disabled"
    assert compose("lab", ["wandb.mode=offline"]).wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's own spelling of offline
    assert compose("lab", []).wandb.mode == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert compose("lab", []).wandb.mode == "offline"  # the lab's default


def _small_file_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # bytes: the 80 kB weights do not fit


@pytest.mark.slow
def test_9_a_full_disk_is_one_line_and_the_run_resumes(tmp_path):
    argv = _argv(tmp_path, *TINY_PRETRAIN)
    p = _run("train/pretrain.py", *argv, preexec_fn=_small_file_limit)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 1 and "cannot write" in _one_line_error(err) and "file-size limit" in err
    (out,) = (tmp_path / "base").iterdir()
    assert read_manifest(out)["status"] == "running"  # resumable: the same command, with space, finishes it
    assert read_manifest(pretrain(_lab(tmp_path, *TINY_PRETRAIN)))["status"] == "finished"

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
import os
import pickle
import re
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
from collapse_lab.core.config import (COUNT, NONNEG, OPEN_SHARE, POSITIVE, SCHEMAS, SHARE, ConfigError, EvalConfig, cli,
                                 compose, ranges, schema)
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
    # accelerate's own files load with weights_only=True: a planted RNG-state pickle does not run either
    (step / "custom_checkpoint_1.pkl").unlink()
    (step / "random_states_0.pkl").write_bytes(pickle.dumps({"x": _Planted(marker)}))
    train_ppo(cfg)
    assert not marker.exists() and read_manifest(out)["status"] == "finished"


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


OUTSIDE = {COUNT: 0, NONNEG: -1, POSITIVE: 0, SHARE: 1.5, OPEN_SHARE: 1}
BASE_ARGS = {"lab": [], "evaluate": ["model_path=x"], "ablate": []}


@pytest.mark.parametrize("name,key", [(n, k) for n in sorted(SCHEMAS) for k in ranges(n)])
def test_every_bad_value_is_exit_2_with_one_line_before_any_work(name, key, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    valid = ranges(name)[key]
    value = OUTSIDE.get(valid, "nan")  # ANY: every finite number
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
    from collapse_lab.models.models.models import load_pretrained

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

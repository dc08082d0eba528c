"""The evaluator against naive, obviously-correct computations and against sampling, on tiny models."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

from collapse_lab.core.config import ConfigError, EvalConfig, cli
from collapse_lab.evaluation import evaluator
from collapse_lab.evaluation.evaluator import answer_distribution, answer_index, answer_token_ids, end_mask, run, sample
from tests.tiny_models import byte_level_tokenizer, metaspace_tokenizer, number_heavy, pairs, tiny_gpt2, tiny_llama

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Q: Tell me a random integer between 0 and 100.\nA: Ok, the integer is"
NUMBERS = [f" {n}" for n in range(101)]
PAIRS = pairs()
IDS = [name for name, _, _ in PAIRS]


@torch.no_grad()
def naive_p(model, tok, prompt, answer, continue_chars="0123456789"):
    """p(answer): a full forward over prompt + answer (no cache, no batching), the product of the answer's
    token probabilities, times the end mass found by literally decoding prompt + answer + [t] for every t."""
    ids = tok(prompt)["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    lp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (T, V)
    p = math.exp(sum(lp[i - 1, ids[i]].item() for i in range(n_prompt, len(ids))))
    text = tok.decode(ids)
    end = 0.0
    for t in range(lp.shape[-1]):
        added = tok.decode(ids + [t])[len(text):] if t < len(tok) else ""  # ids past the tokenizer: no text
        if not (added and added[0] in continue_chars):
            end += lp[-1, t].exp().item()
    return p * end


@pytest.mark.parametrize("path,batch_size", [("tree", 128), ("leaves", 128), ("leaves", 3)])
@pytest.mark.parametrize("name,model,tok", PAIRS, ids=IDS)
def test_equals_naive_one_answer_at_a_time(name, model, tok, path, batch_size):
    """Both ways of running the answer trie (tree attention; batches of leaves) match the naive sum."""
    answers = [" 3", " 37", " 30", " 4", " 42", " 100", " 10", " 1", " 0", " 99"]
    evaluator._TREE_OK[model] = path == "tree"
    got = answer_distribution(model, tok, PROMPT, answers, "0123456789", batch_size).probs
    del evaluator._TREE_OK[model]
    want = np.array([naive_p(model, tok, PROMPT, a) for a in answers])
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(np.log(got) - np.log(want)).max() <= 1e-4  # relative, for the small ones too


@pytest.mark.parametrize("name,model,tok", PAIRS, ids=IDS)
def test_tree_attention_is_verified_then_used(name, model, tok):
    evaluator._TREE_OK.pop(model, None)
    answer_distribution(model, tok, PROMPT, NUMBERS, "0123456789")
    assert evaluator._TREE_OK[model] is True  # Llama and GPT-2 honour 4D masks: the fast path is on


def test_architectures_that_ignore_tree_masks_fall_back_to_leaves(monkeypatch):
    """If the tree result disagrees on the first prompt, the model is evaluated by leaf batches."""
    name, model, tok = PAIRS[0]
    model = tiny_llama(tok, seed=7)  # a fresh model: nothing verified yet
    real = evaluator._tree_logprobs
    monkeypatch.setattr(evaluator, "_tree_logprobs", lambda *a: (real(*a)[0] + 0.1, None))  # a model that ignores the mask
    got = answer_distribution(model, tok, PROMPT, NUMBERS[:20], "0123456789").probs
    assert evaluator._TREE_OK[model] is False
    again = answer_distribution(model, tok, PROMPT, NUMBERS[:20], "0123456789").probs
    want = np.array([naive_p(model, tok, PROMPT, a) for a in NUMBERS[:20]])
    assert np.abs(got - want).max() <= 1e-5 and np.abs(again - want).max() <= 1e-5


@pytest.mark.parametrize("name,model,tok", PAIRS, ids=IDS)
def test_prefix_answer_gets_only_the_end_mass(name, model, tok):
    """p(" 3") = P(tok " 3" | x) · P(next token is not a digit); " 37" (= " 3", "7") is not in it."""
    three = tok(" 3", add_special_tokens=False)["input_ids"]
    assert tok(" 37", add_special_tokens=False)["input_ids"][: len(three)] == three  # the prefix case
    ids = tok(PROMPT)["input_ids"] + three
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (T, V)
    digits = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i) in list("0123456789")]
    assert len(digits) == 10
    p_token = lp[-2, three[0]].exp().item()
    p_end = 1 - lp[-1, digits].exp().sum().item()
    dist = answer_distribution(model, tok, PROMPT, [" 3", " 37"], "0123456789")
    assert dist.probs[0] == pytest.approx(p_token * p_end, rel=1e-5)
    assert dist.probs[0] + dist.probs[1] <= p_token + 1e-7  # disjoint events inside "starts with tok ' 3'"


@pytest.mark.parametrize("name,model,tok", PAIRS, ids=IDS)
def test_valid_mass_at_most_one(name, model, tok):
    for prompt in (PROMPT, "Q: What is 3 + 4?\nA:", "x"):
        dist = answer_distribution(model, tok, prompt, NUMBERS, "0123456789")
        assert dist.probs.sum() <= 1 + 1e-6
        assert dist.vocab_size == 128 and 0 < dist.next_token_entropy <= math.log(128)
    # all one- and two-digit answers: still disjoint events
    digits_model = tiny_llama(tok, seed=3, init=1.0)
    assert answer_distribution(digits_model, tok, PROMPT, NUMBERS, "0123456789").probs.sum() <= 1 + 1e-6


def test_end_mask_uses_text_in_context():
    ms = metaspace_tokenizer()
    assert ms.decode(ms.convert_tokens_to_ids(["▁3"])) == "3"  # decoded alone the space is lost...
    mask = end_mask(ms, "0123456789", 128)
    ids = ms.convert_tokens_to_ids
    assert mask[ids("▁3")] and mask[ids("</s>")] and mask[ids("▁")] and mask[100]  # ...in context " 3" ends
    assert not mask[ids("3")]
    words = end_mask(ms, None, 128)  # \w continues a word answer
    assert not words[ids("a")] and not words[ids("3")] and words[ids("▁")] and words[ids(".")]


def test_duplicate_or_empty_tokenisation_is_refused():
    bl = byte_level_tokenizer()
    with pytest.raises(ValueError, match="encodes to no tokens"):
        answer_token_ids(bl, [" 1", "€"])  # a character outside the tiny vocabulary is dropped
    with pytest.raises(ValueError, match="' 3' and ' 3€' encode to the same tokens"):
        answer_token_ids(bl, [" 3", " 3€"])  # the same event under two names would count twice
    assert answer_token_ids(bl, [" 3", " 37"]) == [(bl.convert_tokens_to_ids("Ġ3"),), tuple(bl(" 37")["input_ids"])]


@pytest.mark.parametrize("name,model,tok", PAIRS, ids=IDS)
def test_sample_logprobs_are_at_the_sampling_temperature(name, model, tok):
    torch.manual_seed(0)
    s = sample(model, tok, PROMPT, n=6, temperature=0.7, max_new_tokens=8, batch_size=4)
    prompt = tok(PROMPT)["input_ids"]
    for y, logp in zip(s.tokens, s.logprobs):
        ids = torch.tensor([prompt + y])
        with torch.no_grad():
            lp = (model(ids).logits[0].double() / 0.7).log_softmax(-1)  # (T, V)
        assert logp == pytest.approx(sum(lp[len(prompt) + i - 1, t].item() for i, t in enumerate(y)), abs=1e-4)
        assert (y[-1] == tok.eos_token_id) == (tok.eos_token_id in y) and len(y) <= 8


@pytest.mark.parametrize("name,model,tok", PAIRS, ids=IDS)
def test_agrees_with_monte_carlo(name, model, tok):
    """Sample 4000 continuations, classify each as an answer (or none); chi-square against exact p(a)."""
    model = number_heavy((tiny_gpt2 if name.startswith("gpt2") else tiny_llama)(tok, seed=1, init=0.3), tok)
    prompt, answers = "Q: pick\nA:", [f" {n}" for n in range(40)]
    p = answer_distribution(model, tok, prompt, answers, "0123456789").probs
    torch.manual_seed(0)
    s = sample(model, tok, prompt, n=4000, temperature=1.0, max_new_tokens=3, batch_size=4000)
    seqs, ends = answer_token_ids(tok, answers), end_mask(tok, "0123456789", 128)
    hits = [answer_index(y, seqs, ends) for y in s.tokens]
    counts = np.bincount([len(answers) if h is None else h for h in hits], minlength=len(answers) + 1)
    expected = np.append(p, 1 - p.sum()) * len(hits)
    big = expected >= 5  # pool the small cells
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert big.sum() >= 10 and p.sum() > 0.2  # the test has power: many answers, much answer mass
    assert chisquare(obs, exp).pvalue > 1e-3


# ------------------------------------------------------------------------------ run(cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny Llama checkpoints (policy and reference) saved with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    tok = metaspace_tokenizer()
    for name, seed in (("policy", 0), ("reference", 1)):
        tiny_llama(tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def cfg(**kw):
    base = OmegaConf.structured(EvalConfig)
    return OmegaConf.merge(base, {"sampling": {"n": 8, "max_new_tokens": 6}, **kw})


def test_run_writes_json_and_plot(saved, tmp_path):
    out = tmp_path / "seed.json"
    result = run(cfg(model_path=str(saved / "policy"), reference_path=str(saved / "reference"), out=str(out)))
    data = json.loads(out.read_text())
    assert data == result and out.with_suffix(".png").stat().st_size > 10_000
    s = data["summary"]
    for key in ("schema_version", "suite", "model_path", "reference_path", "vocab_size", "versions", "wall_time_s"):
        assert key in s
    assert s["suite"] == "seed" and s["vocab_size"] == 128 and s["n_prompts"] == 5
    rec = data["prompts"][0]
    for key in ("id", "answers", "answer_probs", "valid_mass", "answer_entropy", "max_entropy", "top_answer",
                "top_prob", "entropy_upper_bound", "next_token_entropy", "kl_to_reference", "tv_to_reference",
                "pinsker_tv_bound", "fannes_entropy_bound", "entropy_change", "sampling"):
        assert key in rec, key
    assert rec["valid_mass"] == pytest.approx(sum(rec["answer_probs"])) and rec["valid_mass"] <= 1 + 1e-6
    assert rec["top_prob"] == max(rec["answer_probs"]) and rec["max_entropy"] == pytest.approx(math.log(101))
    assert 0 <= rec["answer_entropy"] <= rec["max_entropy"]
    assert abs(rec["entropy_change"]) <= rec["fannes_entropy_bound"] + 1e-9
    for r in data["prompts"]:  # the exact decomposition, in every record
        assert r["entropy_change"] == pytest.approx(-r["kl_to_reference"] - r["entropy_cross_term"], abs=1e-6)
    assert rec["tv_to_reference"] <= rec["pinsker_tv_bound"] + 1e-9
    sampling = rec["sampling"]
    assert sampling["n"] == 8 and sampling["temperature"] == 1.0 and sampling["max_new_tokens"] == 6
    for key in ("sequence_entropy", "sequence_entropy_se", "distinct_1", "distinct_2", "repetition_loop_rate",
                "well_formed_rate", "truncated_rate"):
        assert key in sampling
    assert s["means"]["answer_entropy"] == pytest.approx(np.mean([r["answer_entropy"] for r in data["prompts"]]))


def test_reference_equal_to_model_gives_zero_kl(saved, tmp_path):
    path = str(saved / "policy")
    data = run(cfg(model_path=path, reference_path=path, out=str(tmp_path / "a.json"), plots=False,
                   sampling={"n": 0}))
    for rec in data["prompts"]:
        assert rec["kl_to_reference"] == pytest.approx(0, abs=1e-9) and rec["entropy_change"] == pytest.approx(0, abs=1e-9)
        assert "sampling" not in rec
    assert not (tmp_path / "a.png").exists()


def test_runs_sharing_loaded_models_give_what_fresh_runs_give(saved, tmp_path):
    """Several runs through one `Loaded` (as collapse-lab ablate does) reuse the models, the reference's
    answer distributions and seeded samples, and write exactly what each run alone writes: a kept result
    is used only at the same prompt, settings and seed (here: two temperatures, two seeds, two suites)."""
    loaded, pol, ref = evaluator.Loaded(), str(saved / "policy"), str(saved / "reference")
    settings = [("seed", {"temperature": 1.0}, 0), ("seed", {"temperature": 0.5}, 0), ("seed", {"temperature": 1.0}, 1),
                ("arithmetic", {"n": 0}, 0), ("seed", {"temperature": 1.0}, 0)]

    def strip(r):
        return {**r, "summary": {k: v for k, v in r["summary"].items() if k != "wall_time_s"}}

    shared = []
    for i, (suite, sampling, seed) in enumerate(settings):
        c = cfg(model_path=pol, reference_path=ref, suite=suite, seed=seed, sampling=sampling, plots=False)
        fresh = strip(run(OmegaConf.merge(c, {"out": str(tmp_path / f"fresh{i}.json")})))
        shared.append(strip(run(OmegaConf.merge(c, {"out": str(tmp_path / f"shared{i}.json")}), loaded)))
        assert shared[-1] == fresh, (suite, sampling, seed)
    assert len(loaded.models) == 2  # each model loaded once
    samples = lambda r: [x["sampling"]["examples"] for x in r["prompts"]]
    assert samples(shared[0]) == samples(shared[4]) != samples(shared[1]) and samples(shared[0]) != samples(shared[2])
    loaded.forget(keep=ref)
    assert [k[0] for k in loaded.models] == [ref] and all(k[0] == ref for k in loaded.kept)


def test_calibration_and_open_suites(saved, tmp_path):
    data = run(cfg(model_path=str(saved / "policy"), suite="arithmetic", out=str(tmp_path / "a.json")))
    assert 0 <= data["summary"]["ece"] <= 1 and 0 <= data["summary"]["brier"] <= 2
    assert all(0 <= r["correct_prob"] <= 1 for r in data["prompts"])
    data = run(cfg(model_path=str(saved / "policy"), suite="stories", out=str(tmp_path / "s.json")))
    rec = data["prompts"][0]
    assert "answers" not in rec and set(rec["sampling"]["category_shares"]) == {"loop", "multi-line", "ends-mfw"}
    assert (tmp_path / "s.png").exists()


def test_default_out_for_a_lab_checkpoint(saved, tmp_path):
    ckpt = tmp_path / "ckpt"
    for f in (saved / "policy").iterdir():
        (ckpt / f.name).parent.mkdir(exist_ok=True)
        (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "manifest.json").write_text('{"status": "finished"}')
    run(cfg(model_path=str(ckpt), plots=False, sampling={"n": 0}))
    assert (ckpt / "eval" / "seed.json").is_file()


BAD_SUITE = "name: bad\nprompts:\n  - {id: q, text: 'x', answers: {low: 3, high: 1}}\n"


@pytest.mark.parametrize("overrides,message", [
    ({"model_path": "/no/such/model"}, "model path '/no/such/model' does not exist"),
    ({"suite": "MALFORMED"}, "malformed YAML"),
    ({"suite": "EMPTY"}, "prompt 'q': answers: empty answer set"),
    ({"suite": "nope"}, "unknown suite 'nope'"),
    ({"model_path": "SHORT"}, "prompt 'integer-qa' needs 72 tokens"),
    ({"sampling": {"temperature": 0.0}}, "sampling.temperature > 0"),
])
def test_bad_input_raises_config_error_and_writes_nothing(saved, tmp_path, overrides, message):
    (tmp_path / "MALFORMED.yaml").write_text("name: [\n")
    (tmp_path / "EMPTY.yaml").write_text(BAD_SUITE)
    short = tmp_path / "short"  # a GPT-2 whose context (64 tokens) is shorter than the seed prompts
    tok = byte_level_tokenizer()
    tiny_gpt2(tok, n_positions=64).save_pretrained(short)
    tok.save_pretrained(short)
    kw = {"model_path": str(saved / "policy"), "out": str(tmp_path / "out" / "r.json"), **overrides}
    kw = {k: {"SHORT": str(short)}.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    if "suite" in kw and kw["suite"] in ("MALFORMED", "EMPTY"):
        kw["suite"] = str(tmp_path / f"{kw['suite']}.yaml")
    with pytest.raises(ConfigError) as e:
        run(cfg(**kw))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_entry_point(saved, tmp_path, capsys):
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "eval/evaluate.py", f"model_path={saved / 'policy'}", "suite=seed", f"out={out}",
           "sampling.n=4", "plots=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["summary"]["suite"] == "seed"
    with pytest.raises(SystemExit) as e:  # the same entry point, in process: bad input → one line, exit 2
        cli("evaluate", run, ["model_path=/no/such/model"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: model path '/no/such/model' does not exist (a local directory or a Hugging Face hub name)\n"

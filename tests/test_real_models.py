"""Real pretrained models offline (collapse_lab/models/real_models.py, collapse_lab/evaluation/observe.py).

Without downloads: a tiny Llama and a byte-level BPE tokenizer are written as a GGUF file by the test
itself (the `gguf` package, as llama.cpp's converter lays it out), then loaded through the lab's path
(`model.path=<file>.gguf`); the real presets' resolution and the missing-extra error are checked with
the packages simulated absent. The evaluator on the real Gemma base (a slow test) runs only when the
extra is installed."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from collapse_lab.models import real_models
from collapse_lab.core.config import ConfigError, compose
from collapse_lab.models.real_models import PREFIX, REAL_MODELS, resolve
from collapse_lab.core.suites import load_suite
from collapse_lab.models.tokenizer import encode_texts

gguf = pytest.importorskip("gguf")  # the test extra installs it


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's layout of q/k rows (its converter's `permute`): the loader undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer) -> None:
    """A Llama causal LM and its byte-level BPE tokenizer as one GGUF file (float32 tensors)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(c.vocab_size))
    special = set(tokenizer.all_special_tokens)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in model.state_dict().items():
        t = t.detach().float()
        if key in names:
            name = names[key]
        else:
            _, _, i, *rest = key.split(".")
            part = ".".join(rest[:-1])
            name = f"blk.{i}.{parts[part]}.weight"
            if part == "self_attn.q_proj":
                t = _permute(t, c.num_attention_heads)
            elif part == "self_attn.k_proj":
                t = _permute(t, c.num_key_value_heads)
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(the .gguf path, the original model, its tokenizer): a 2-layer Llama over a byte-level BPE
    tokenizer trained on the lab's world (numbers split as they occur, as in GPT-2-style vocabularies)."""
    from tests.tiny_models import neox_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = neox_tokenizer(vocab_size=400)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, model, tokenizer)
    return path, model, tokenizer


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tiny_gguf, tmp_path, monkeypatch):
    """model.path=<file>.gguf: dequantised once into a plain HF directory (safetensors + tokenizer) whose
    model gives the original's logits and whose tokenizer the original's tokens; a second resolve finds it."""
    from collapse_lab.models.models import load_pretrained

    path, original, tok0 = tiny_gguf
    monkeypatch.setenv("COLLAPSE_LAB_REAL_CACHE", str(tmp_path / "real"))
    model, tok = load_pretrained(str(path))  # the lab's loader, given the .gguf file
    out = resolve(str(path))
    assert out.startswith(str(tmp_path / "real")) and (tmp_path / "real").is_dir()
    files = {f.name for f in (tmp_path / "real").glob("*/*")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "source.json"} <= files
    assert "quantization_config" not in json.loads(open(f"{out}/config.json").read())
    texts = [p.text for p in load_suite("seed").prompts] + [" 37", " 100 apples"]
    assert encode_texts(tok, texts) == encode_texts(tok0, texts)
    ids = torch.tensor(encode_texts(tok0, texts[:1]))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)
    # cached: a second resolve does not dequantise again
    monkeypatch.setattr(real_models, "dequantise", lambda *a: pytest.fail("dequantised twice"))
    assert resolve(str(path)) == out


def test_the_evaluator_reads_a_gguf_model(tiny_gguf, tmp_path, monkeypatch):
    """eval/evaluate.py model_path=<file>.gguf: exact answer distributions equal to the original model's."""
    from collapse_lab.evaluation.evaluator import answer_distribution, run

    path, original, tok0 = tiny_gguf
    monkeypatch.setenv("COLLAPSE_LAB_REAL_CACHE", str(tmp_path / "real"))
    result = run(compose("evaluate", [f"model_path={path}", "sampling.n=0", f"out={tmp_path / 'seed.json'}",
                                      "plots=false", "device=cpu"]))
    first = result["prompts"][0]
    prompt = load_suite("seed").prompts[0]
    ref = answer_distribution(original, tok0, prompt.text, prompt.answers, prompt.continue_chars)
    assert np.allclose(first["answer_probs"], ref.probs, rtol=1e-4, atol=1e-9)
    assert 0 < first["valid_mass"] <= 1 + 1e-9


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_presets_resolve_to_their_packages(name):
    """model=<preset>: a real: path naming a model this module knows, with its pip package."""
    from collapse_lab.evaluation.observe import model_path

    cfg = compose("lab", [f"model={name}"])
    assert cfg.model.path == PREFIX + name and cfg.model.name == name
    assert model_path(name) == PREFIX + name
    assert REAL_MODELS[name].package


def _without(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m in modules else real(m, *a))


@pytest.mark.parametrize("name", list(REAL_MODELS))
@pytest.mark.parametrize("absent", ["package", "gguf"])
def test_a_missing_extra_is_one_line_naming_the_pip_command(monkeypatch, tmp_path, name, absent):
    _without(monkeypatch, REAL_MODELS[name].module if absent == "package" else "gguf")
    with pytest.raises(ConfigError, match=r"pip install .*\.\[real\]") as e:
        resolve(PREFIX + name, tmp_path)
    assert "\n" not in str(e.value) and (name in str(e.value))
    assert not any(tmp_path.iterdir())  # before any work


def test_a_missing_extra_stops_ablate_and_observe_with_exit_2(monkeypatch, tmp_path, capsys):
    """`collapse-lab ablate model=gemma3-270m` and `collapse-lab observe` without the extra: one line, exit 2,
    nothing written."""
    from collapse_lab.cli import main

    _without(monkeypatch, REAL_MODELS["gemma3-270m"].module)
    for argv in (["ablate", "model=gemma3-270m", f"checkpoints_dir={tmp_path / 'ck'}"],
                 ["observe", "models=[gemma3-270m]", f"out={tmp_path / 'obs'}"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "pip install" in err, err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "obs").exists()


def test_unknown_real_model_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="valid choices: real:gemma3-270m"):
        resolve("real:gpt-5", tmp_path)


def test_a_real_model_gets_its_own_ablation_preset(monkeypatch):
    """`collapse-lab ablate model=gemma3-270m` uses preset=gemma3-270m (its own size), unless preset= is given."""
    from collapse_lab.lab import ablate

    monkeypatch.setattr(ablate, "check_base", lambda *a, **k: None)  # no model is loaded for the plan
    p = ablate.plan(["model=gemma3-270m"])
    assert p.cfg.preset == "gemma3-270m" and "peft.enabled=true" in p.lab
    assert ablate.plan(["model=gemma3-270m", "preset=quick"]).cfg.preset == "quick"
    assert ablate.plan(["model=tiny"]).cfg.preset == "default"


# ------------------------------------------------------------------ the real Gemma base (needs the extra)

def _extra_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", REAL_MODELS["gemma3-270m"].module))


@pytest.mark.slow
@pytest.mark.skipif(not _extra_installed(), reason="the real extra is not installed (bash scripts/setup.sh --real)")
def test_evaluator_on_the_gemma_base_matches_one_answer_at_a_time():
    """The exact evaluator (a trie of answers, tree attention) on Gemma 3 270M against the naive computation:
    each answer's tokens teacher-forced alone, p(a) = Π P(token) · P(end) with "end" = the next token's text
    does not start with a digit (one whole forward per answer), to 1e-4 on the first seed prompt; the valid
    mass in (0, 1] and equal to the naive one; q = p/M sums to 1; the tokenizer puts Gemma's BOS first."""
    from collapse_lab.evaluation.evaluator import answer_distribution, end_mask
    from collapse_lab.models.models import load_pretrained
    from collapse_lab.models.tokenizer import answer_token_ids

    model, tok = load_pretrained(resolve("real:gemma3-270m"))
    model.eval()
    assert encode_texts(tok, ["a"])[0][0] == tok.bos_token_id  # Gemma needs its BOS
    prompt = load_suite("seed").prompts[0]
    d = answer_distribution(model, tok, prompt.text, prompt.answers, prompt.continue_chars)
    ends = end_mask(tok, prompt.continue_chars, d.vocab_size)
    head = encode_texts(tok, [prompt.text])[0]
    naive = []
    with torch.no_grad():
        for seq in answer_token_ids(tok, prompt.answers, prompt.text):  # prompt + answer, one whole forward each
            out = model(torch.tensor([head + list(seq)]), logits_to_keep=len(seq) + 1)
            lp = out.logits[0].double().log_softmax(-1)  # (|a| + 1, V): after the prompt, after each answer token
            naive.append(sum(float(lp[i, t]) for i, t in enumerate(seq)) + float(lp[len(seq)][ends].logsumexp(0)))
    naive = np.exp(naive)
    assert np.abs(d.probs - naive).max() < 1e-4, np.abs(d.probs - naive).max()
    assert 0 < d.probs.sum() <= 1 + 1e-6 and math.isclose(d.normalised.sum(), 1, abs_tol=1e-9)
    assert math.isclose(d.probs.sum(), naive.sum(), abs_tol=1e-4)  # the valid mass M


def test_observe_writes_the_posts_table_and_figure(tiny_gguf, tmp_path, monkeypatch):
    """`collapse-lab observe` on the same model given as a .gguf file and as its directory (KL and TV 0
    between them) and the original saved directly: every seed prompt's exact distribution, M, H/log|A|,
    the post's bar L <= B, and the files."""
    from collapse_lab.evaluation.observe import main

    path, original, tok0 = tiny_gguf
    monkeypatch.setenv("COLLAPSE_LAB_REAL_CACHE", str(tmp_path / "real"))
    original.save_pretrained(tmp_path / "hf"), tok0.save_pretrained(tmp_path / "hf")
    doc = main([f"models=[{path},{tmp_path / 'hf'}]", "labels=[gguf,hf]", f"out={tmp_path / 'obs'}"])
    assert {f.name for f in (tmp_path / "obs").iterdir()} >= {"observe.json", "observe.md", "observe.png",
                                                              "answers-gguf.png", "answers-hf.png"}
    prompts = load_suite("seed").prompts
    for label in ("gguf", "hf"):
        recs = doc["results"][label]
        assert [r["id"] for r in recs] == [p.id for p in prompts]
        for r in recs:
            p = np.asarray(r["answer_probs"])
            assert len(p) == 101 or len(p) == 100
            assert math.isclose(r["valid_mass"], p.sum()) and 0 < r["valid_mass"] <= 1 + 1e-9
            assert r["known_entropy"] <= r["entropy_upper_bound"] + 1e-9
            assert math.isclose(r["normalised_entropy"], r["answer_entropy"] / math.log(len(p)))
    assert all(x["kl"] < 1e-8 and x["tv"] < 1e-6 for x in doc["pairwise"])  # the same weights, two ways in
    assert len(doc["pairwise"]) == 2 * len(prompts)
    table = (tmp_path / "obs" / "observe.md").read_text()
    assert table.count("| integer-qa |") == 2


@pytest.mark.parametrize("argv, message", [
    (["models=[]"], "models is empty"),
    (["modles=[x]"], "valid keys: models"),
    (["models=[tiny]"], "no weights of its own"),
    (["models=[/no/such/dir]"], "neither a model preset"),
    (["models=[gemma3-270m]", "labels=[a,b]"], "labels has 2 entries for 1 models"),
])
def test_observe_bad_input_is_one_line(argv, message):
    from collapse_lab.evaluation.observe import model_path, parse

    with pytest.raises(ConfigError, match=message) as e:
        cfg = parse(argv)
        [model_path(m) for m in cfg.models]
    assert "\n" not in str(e.value)


def test_a_gguf_base_resolves_under_the_runs_checkpoints(tiny_gguf, tmp_path):
    """`model.path=<file>.gguf` as a stage's base: resolve_base dequantises it under <checkpoints_dir>/real/,
    checks it as every user's base (answers spelled, context long enough) and returns that directory, which
    every later stage (and the ablation's base_path) then reads as a plain HF directory."""
    from collapse_lab.stages.pretrain import resolve_base

    path, _, _ = tiny_gguf
    cfg = compose("lab", ["model=smollm2-135m-instruct", f"model.path={path}", f"checkpoints_dir={tmp_path}"])
    base = resolve_base(cfg)
    assert base.startswith(str(tmp_path / "real" / "tiny-llama-")) and (tmp_path / "real").is_dir()
    assert resolve_base(compose("lab", [f"base_path={base}", f"checkpoints_dir={tmp_path}"])) == base

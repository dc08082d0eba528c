"""Any causal LM as the base (issue 16): three families with their own tokenizers, built locally.

- gpt_neox: byte-level BPE without digit splitting (" 37" = " 3" + "7" here, " 100" one token)
- gpt2:     byte-level BPE with every " n" one token (" 3" is not a token-prefix of " 37")
- llama:    Metaspace ("▁" + "3" + "7"), BOS added, decoding a completion alone drops its space
None sets a pad token (the lab pads with EOS). Fast tests: the tokenizers' shapes, the evaluator against a
naive computation, the reward model's pad bug, the text every stage reads. Slow: the quick ablation.
"""

import json

import numpy as np
import pytest
import torch

from collapse_lab.evaluation import evaluator
from collapse_lab.evaluation.evaluator import answer_distribution
from collapse_lab.models.models import distinct_pad, load_pretrained
from collapse_lab.models.rollout import generate
from collapse_lab.models.tokenizer import decode_continuations, encode_texts
from tests.test_evaluator import naive_p
from tests.tiny_models import FAMILIES, family_model, number_heavy, save_family

PROMPT = "Q: Think of a random number between 0 and 100.\nA:"
ANSWERS = [" 3", " 37", " 30", " 4", " 42", " 100", " 10", " 1", " 0", " 99", " 7", " 70"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> a saved model directory (tokenizer trained on the world's corpus, random weights)."""
    root = tmp_path_factory.mktemp("families")
    return {f: save_family(f, root / f) for f in FAMILIES}


def test_the_three_tokenizers_are_the_cases_the_lab_must_handle(saved):
    neox, gpt2, llama = (load_pretrained(str(saved[f]))[1] for f in ("gpt_neox", "gpt2", "llama"))
    spell = lambda tok, a: tok.convert_ids_to_tokens(tok(a, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert spell(neox, " 37") == ["Ġ3", "7"] and len(spell(neox, " 100")) == 1  # no digit splitting: it varies
    assert all(len(spell(gpt2, f" {n}")) == 1 for n in range(101))
    assert spell(llama, " 37") == ["▁", "3", "7"]
    assert encode_texts(llama, ["a"])[0][0] == llama.bos_token_id  # BOS first
    assert encode_texts(neox, ["a"]) == [neox("a", add_special_tokens=False)["input_ids"]]  # none
    for tok in (neox, gpt2, llama):
        assert tok.pad_token_id == tok.eos_token_id  # the lab's fallback: pad = EOS (the reward-model bug's case)


@pytest.mark.parametrize("path", ["tree", "leaves"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_evaluator_equals_naive_one_answer_at_a_time(saved, family, path):
    model, tok = load_pretrained(str(saved[family]))
    model = number_heavy(model.eval(), tok)
    evaluator._TREE_OK[model] = path == "tree"
    got = answer_distribution(model, tok, PROMPT, ANSWERS, "0123456789", batch_size=5).probs
    want = np.array([naive_p(model, tok, PROMPT, a) for a in ANSWERS])
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(np.log(got) - np.log(want)).max() <= 1e-4  # relative, for the small ones too
    assert got.sum() <= 1 + 1e-6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_completions_decode_in_context(saved, family):
    """The completion text every stage rates is what the model wrote after the prompt: " 37", not "37"."""
    _, tok = load_pretrained(str(saved[family]))
    prompt = encode_texts(tok, [PROMPT])[0]
    answer = tok(" 37", add_special_tokens=False)["input_ids"]
    assert decode_continuations(tok, [prompt], [answer]) == [" 37"]
    if family == "llama":
        assert tok.decode(answer, skip_special_tokens=True) == "37"  # why: decoding it alone drops the space


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rollout_prompts_carry_the_bos_the_evaluator_gives_them(saved, family):
    model, tok = load_pretrained(str(saved[family]))
    torch.manual_seed(0)
    r = generate(model, tok, [PROMPT, "Q: What is 2 + 2?\nA:"], max_new_tokens=3)
    first_real = r.input_ids[torch.arange(2), r.attention_mask[:, :r.query_len].argmax(1)]
    want = encode_texts(tok, ["x"])[0][0] if family == "llama" else None
    if want is not None:
        assert (first_real == want).all()
    # texts decode in context: identical to decoding prompt + completion and cutting the prompt off
    for i, prompt in enumerate([PROMPT, "Q: What is 2 + 2?\nA:"]):
        body = [t for t, m in zip(r.responses[i].tolist(), r.response_mask[i].tolist()) if m and t != tok.eos_token_id]
        whole = tok.decode(encode_texts(tok, [prompt])[0] + body, skip_special_tokens=True)
        assert whole == tok.decode(encode_texts(tok, [prompt])[0], skip_special_tokens=True) + r.texts[i]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_reward_model_on_a_pad_eos_tokenizer_tells_ended_from_cut_off(saved, family, tmp_path):
    """transformers reads a classifier's score at the last token that is not the pad id: with pad = EOS the
    EOS of an ended completion was skipped, so " 37"+EOS and " 37" cut off scored EXACTLY alike (the old
    code). The reward model now gets a distinct pad token; its score sits on the EOS."""
    from transformers import AutoModelForSequenceClassification

    from collapse_lab.stages.rewards import ModelReward
    from collapse_lab.world.world import Prompt

    model, tok = load_pretrained(str(saved[family]))
    assert tok.pad_token_id == tok.eos_token_id
    rm = AutoModelForSequenceClassification.from_pretrained(str(saved[family]), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id  # the old setup: pad = EOS
    texts = [PROMPT + " 37" + tok.eos_token, PROMPT + " 37"]
    with torch.no_grad():
        old = rm(**tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)).logits[:, 0]
    assert torch.allclose(old[0], old[1], atol=1e-6)  # the bug, as it was: the same score

    distinct_pad(tok, rm)
    assert tok.pad_token_id != tok.eos_token_id and rm.config.pad_token_id == tok.pad_token_id
    rm.save_pretrained(tmp_path), tok.save_pretrained(tmp_path)
    reward = ModelReward(str(tmp_path), "cpu")
    p = Prompt("x", "numbers", PROMPT, 0, 100)
    scores = reward([p, p, p], [" 37", " 37", " 5"], [True, False, True])
    assert abs(float(scores[0] - scores[1])) > 1e-4  # ended vs cut off: different
    # padding does not move the score: the ended " 37" alone scores as in the batch
    assert torch.allclose(reward([p], [" 37"], [True]), scores[:1], atol=1e-5)


# ------------------------------------------------------------------ the quick ablation (slow)

PRESETS = {"gpt_neox": "pythia-160m", "gpt2": "gpt2", "llama": "qwen2.5-0.5b"}
FAST = ["ratings.prompts=24", "ratings.max_new_tokens=6", "reward_model.epochs=1", "reward_model.batch_size=16",
        "sft.batch_size=8", "ppo.steps=2", "ppo.rollout_batch_size=16", "ppo.minibatch_size=8", "ppo.max_new_tokens=6",
        "eval.samples=8", "eval.gold_samples=8", "eval.max_new_tokens=6", "eval.suites=[seed]",
        "regimes=[sft,bok,kl0.1]"]  # + sft-random, FeedME's control; the quick preset's other PPO betas are the same code
LORA = {"llama": ["peft.enabled=true", "peft.r=4"]}  # one family through the LoRA path (FeedME and PPO)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_quick_ablation_end_to_end(saved, family, tmp_path):
    """`collapse-lab ablate preset=quick model=<preset> model.path=<dir>` with a few steps per stage: ratings,
    reward model, FeedME and its control, best-of-k, PPO (LoRA for the llama family), the evaluator on each,
    the report."""
    from collapse_lab.lab import ablate

    out = ablate.main(["wandb.mode=disabled", "preset=quick", f"model={PRESETS[family]}", f"model.path={saved[family]}",
                       f"checkpoints_dir={tmp_path}", *FAST, *LORA.get(family, [])])
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file()
    assert set(rep["regimes"]) == {"sft", "sft-random", "bok", "kl0.1"}
    runs = json.loads((out / "runs.json").read_text())
    assert runs["base"] == str(saved[family])
    for r in runs["runs"]:
        seed_eval = json.loads((out / r["evals"] / "seed.json").read_text())
        assert all(0 < p["valid_mass"] <= 1 + 1e-6 for p in seed_eval["prompts"] if "valid_mass" in p)


def test_reward_model_stage_saves_a_distinct_pad_and_scores_the_eos(saved, tmp_path):
    """The stage itself (TRL RewardTrainer on pairs) on a pad = EOS base: its saved tokenizer pads with
    a token that is not EOS, and ModelReward scores ended and cut-off completions apart."""
    from transformers import AutoTokenizer

    from collapse_lab.core.config import compose
    from collapse_lab.stages.reward_model import fit_reward_model
    from collapse_lab.stages.rewards import ModelReward
    from collapse_lab.world.world import make_world
    from tests.test_reward_model import world_ratings

    base = str(saved["gpt_neox"])
    cfg = compose("lab", ["wandb.mode=disabled", f"base_path={base}", "reward_model.epochs=1",
                          "reward_model.batch_size=16"])
    fit_reward_model(cfg, world_ratings(make_world(cfg.world), 8), base, tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    reward, world = ModelReward(str(tmp_path / "rm"), "cpu"), make_world(cfg.world)
    p = world.prompt(world.seed_prompts[0].text)
    s = reward([p, p], [" 42", " 42"], [True, False])
    assert abs(float(s[0] - s[1])) > 1e-4


# ------------------------------------------------------------------ bad models: one line, exit 2, nothing written


def _t5(path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)).save_pretrained(path)
    FAMILIES["gpt2"]().save_pretrained(path)
    return path


def _no_tokenizer(path):
    family_model("gpt2", FAMILIES["gpt2"]()).save_pretrained(path)
    return path


def _no_sevens(path):
    """A SentencePiece-style tokenizer trained on text without the digit 7 (so " 7", " 17", ... are <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import _world_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator([t.replace("7", "") for t in _world_texts()],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    family_model("llama", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _short_context(path):
    tok = FAMILIES["gpt2"]()
    family_model("gpt2", tok, context=24).save_pretrained(path)
    tok.save_pretrained(path)
    return path


BAD = {
    "not-causal": (_t5, "is not a causal LM (model_type 't5'"),
    "no-tokenizer": (_no_tokenizer, "has no tokenizer"),
    "unspellable": (_no_sevens, "cannot spell the answer ' 17'"),
    "short-context": (_short_context, "the context of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_is_one_line_before_any_work(case, tmp_path):
    """`collapse-lab ablate model.path=<bad>` and a single stage: ConfigError (exit 2), nothing written."""
    from collapse_lab.lab import ablate
    from collapse_lab.core.config import ConfigError, compose
    from collapse_lab.stages.ratings import rate

    make, message = BAD[case]
    path = make(tmp_path / "model")
    ck = tmp_path / "ck"
    with pytest.raises(ConfigError) as e:
        ablate.plan(["preset=quick", f"model.path={path}", f"checkpoints_dir={ck}"])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not ck.exists()
    with pytest.raises(ConfigError, match=message.split(" (")[0].replace("'", ".")):
        rate(compose("lab", ["wandb.mode=disabled", f"model.path={path}", f"checkpoints_dir={ck}"]))
    assert [p.name for p in ck.iterdir()] == [".locks"]  # no run directory (the stage's lock file only)


def test_bad_model_cli_exit_2_one_line_nothing_written(tmp_path):
    from tests.conftest import run_cli

    path = _t5(tmp_path / "t5")
    r = run_cli("-m", "collapse_lab.cli", "ablate", "preset=quick", f"model.path={path}", f"checkpoints_dir={tmp_path / 'ck'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a causal LM" in r.stderr, r.stderr
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------ the lab's own base in other architectures


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_lab_base_of_each_arch_pretrains_samples_and_evaluates(arch, tmp_path):
    """`model.arch=<arch>`: the lab's tokenizer and pretraining, then the model samples and the evaluator's
    exact distribution matches the naive one."""
    from collapse_lab.core.config import compose
    from collapse_lab.stages.pretrain import pretrain
    from tests.conftest import TINY_PRETRAIN

    out = pretrain(compose("lab", TINY_PRETRAIN + [f"model.arch={arch}", f"checkpoints_dir={tmp_path}"]))
    model, tok = load_pretrained(str(out))
    assert model.config.model_type == arch
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    torch.manual_seed(0)
    r = generate(model, tok, [PROMPT], max_new_tokens=4)
    assert r.response_mask.sum() >= 1
    answers = ANSWERS[:6]
    got = answer_distribution(model.eval(), tok, PROMPT, answers, "0123456789").probs
    want = np.array([naive_p(model, tok, PROMPT, a) for a in answers])
    assert np.abs(got - want).max() <= 1e-5


@torch.no_grad()
def _naive_joint_p(model, tok, prompt, answer, continue_chars="0123456789"):
    """p(answer) from the tokens of the JOINT text prompt + answer (what the model reads), the end mass by
    literally decoding prompt + answer + [t] for every t."""
    ids, head = tok(prompt + answer)["input_ids"], tok(prompt)["input_ids"]
    assert ids[:len(head)] == head
    lp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    p = float(np.exp(sum(lp[i - 1, ids[i]].item() for i in range(len(head), len(ids)))))
    text = tok.decode(ids)
    end = sum(lp[-1, t].exp().item() for t in range(lp.shape[-1])
              if not ((added := tok.decode(ids + [t])[len(text):] if t < len(tok) else "") and added[0] in continue_chars))
    return p * end


def test_legacy_sentencepiece_answers_are_read_as_they_follow_the_prompt(tmp_path):
    """A tokenizer that prepends "▁" to every encode call spells " 37" alone with an extra "▁"; the evaluator
    takes the answer's tokens after the prompt, and agrees with the joint text's naive probability."""
    from collapse_lab.models.models import check_base
    from collapse_lab.core.config import compose
    from collapse_lab.world.world import make_world
    from tests.tiny_models import legacy_sentencepiece_tokenizer

    tok = legacy_sentencepiece_tokenizer()
    assert tok.convert_ids_to_tokens(tok(" 37", add_special_tokens=False)["input_ids"])[:2] == ["▁", "▁"]
    model = number_heavy(family_model("llama", tok), tok)
    for path in ("tree", "leaves"):
        evaluator._TREE_OK[model] = path == "tree"
        got = answer_distribution(model, tok, PROMPT, ANSWERS, "0123456789").probs
        want = np.array([_naive_joint_p(model, tok, PROMPT, a) for a in ANSWERS])
        assert np.abs(got - want).max() <= 1e-5 and np.abs(np.log(got) - np.log(want)).max() <= 1e-4
    family_model("llama", tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    check_base(str(tmp_path), make_world(compose("lab", []).world), 8)  # spellable in context: no error

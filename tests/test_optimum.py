"""The sequence-level closed form (collapse_lab/evaluation/optimum.py) against brute force, the rater's mean
score against Monte Carlo, and sampling that optimises the distribution it samples (EOS first)."""

import math
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from collapse_lab.core.config import RaterConfig
from collapse_lab.evaluation.evaluator import answer_distribution, continuation_texts, end_mask
from collapse_lab.evaluation.optimum import answer_groups, answer_optimum, answer_scores, log_optimum
from collapse_lab.models.rollout import generate, response_logits, token_logprobs
from collapse_lab.world.world import GoldRater, Prompt, noisy_score_mean
from tests.tiny_models import byte_level_tokenizer, metaspace_tokenizer, number_heavy, tiny_gpt2, tiny_llama

PROMPT = Prompt("seed/integer-qa", "numbers", "Q: Tell me a random integer between 0 and 50.\nA: Ok, the integer is", 0, 50)
ANSWERS = [f" {n}" for n in range(51)]


@pytest.mark.parametrize("mu,sigma,integer", [(7, 0.5, True), (6, 0.5, True), (6.3, 0.9, True), (2.2, 1.5, True),
                                              (6.8, 0.7, False), (1.4, 0.3, False), (6, 0.0, True)])
def test_mean_score_integrates_the_rating_noise(mu, sigma, integer):
    rng = random.Random(0)
    n = 200_000
    draws = [min(7.0, max(1.0, mu + rng.gauss(0, sigma))) for _ in range(n)]
    mc = np.mean([round(x) for x in draws] if integer else draws)
    assert noisy_score_mean(mu, sigma, integer) == pytest.approx(mc, abs=4 * 1.5 / math.sqrt(n) + 1e-9)


def test_mean_score_of_the_default_rater():
    """docs/references.md: E[round(clip(7 + ε))] = 6.84 and E[round(clip(6 + ε))] = 6.00 for σ = 0.5 (two-level rater)."""
    rater = GoldRater(OmegaConf.structured(RaterConfig(profile="two_level", favourites=[7, 42, 97])))
    assert rater.mean_score(PROMPT, " 42") == pytest.approx(6.84, abs=0.005)
    assert rater.mean_score(PROMPT, " 41") == pytest.approx(6.00, abs=0.005)
    assert rater.mean_score(PROMPT, " 41", ended=False) == pytest.approx(5.00, abs=0.005)  # not clean


def _brute_force(model, tok, rater, beta):
    """π*(a) over the answers by enumerating every completion "a's tokens, then ONE more token t" with a
    full forward pass, the rater scoring the decoded text (t = EOS: the answer alone, ended; any other
    token that ends the number: a longer text, not clean), normalised over the answer set."""
    ends = end_mask(tok, "0123456789", model.config.vocab_size)
    added = continuation_texts(tok, model.config.vocab_size)  # the text token t adds after the answer
    prompt_ids = tok(PROMPT.text)["input_ids"]
    weights = []
    for a in ANSWERS:
        ids = prompt_ids + tok(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        head = sum(lp[i - 1, ids[i]].item() for i in range(len(prompt_ids), len(ids)))
        w = 0.0
        for t in torch.nonzero(ends).flatten().tolist():
            is_eos = t == tok.eos_token_id
            text = a if is_eos else a + added[t]
            w += math.exp(head + lp[-1, t].item() + rater.mean_score(PROMPT, text, ended=is_eos) / beta)
        weights.append(w)
    w = np.array(weights)
    return w / w.sum()


@pytest.mark.parametrize("make_tok,make_model", [(byte_level_tokenizer, tiny_gpt2), (metaspace_tokenizer, tiny_llama)])
@pytest.mark.parametrize("beta", [0.2, 1.0])
def test_sequence_optimum_matches_brute_force(make_tok, make_model, beta):
    tok = make_tok()
    model = number_heavy(make_model(tok), tok)
    rater = GoldRater(OmegaConf.structured(RaterConfig(favourites=[7, 42], preference_strength=0.7)))
    dist = answer_distribution(model, tok, PROMPT.text, ANSWERS, "0123456789")
    got = answer_optimum(dist, *answer_scores(rater, PROMPT, ANSWERS), beta)
    want = _brute_force(model, tok, rater, beta)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-9)  # float32 forwards: tree attention vs one sequence
    # the EOS split matters here: scoring every end as clean gives another answer
    clean = answer_scores(rater, PROMPT, ANSWERS)[0]
    assert np.abs(answer_optimum(dist, clean, clean, beta) - want).sum() > 1e-4


def test_entropy_bonus_tempers_the_base():
    """κ = β/(α+β), τ = α+β: π* ∝ π0^κ·e^{r/τ}; α → ∞ tends to uniform, α = 0 is π0·e^{r/β}."""
    log_p0, r = np.log([0.7, 0.2, 0.1]), np.array([0.0, 1.0, 0.0])
    pi = np.exp(log_optimum(log_p0, r, 0.5, 0.25))
    want = np.array([0.7, 0.2, 0.1]) ** (2 / 3) * np.exp(r / 0.75)
    assert np.allclose(pi, want / want.sum(), atol=1e-12)
    assert np.allclose(np.exp(log_optimum(log_p0, r, 0.5, 1e6)), 1 / 3, atol=1e-5)
    assert log_optimum(log_p0, r, 0.0, 0.0) is None


def test_eos_at_the_first_position_is_sampled_as_often_as_the_log_probs_say():
    """Generation may stop at once (an empty completion): the rate of EOS-first samples matches
    π(EOS | x), and the rollout's log-prob of it equals a forward pass's (the update's)."""
    tok = byte_level_tokenizer()
    tok.pad_token = tok.eos_token
    model = tiny_gpt2(tok, seed=3)
    prompt = "Q: a number?\nA:"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # EOS gets the likeliest token's logit: a real share of the mass
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = head[model(ids).logits[0, -1].argmax()]
        p_eos = model(ids).logits[0, -1].softmax(-1)[tok.eos_token_id].item()
    assert 0.02 < p_eos < 0.5
    torch.manual_seed(0)
    n = 1000
    r = generate(model, tok, [prompt] * n, max_new_tokens=1)
    first = r.responses[:, 0] == tok.eos_token_id
    assert abs(first.float().mean().item() - p_eos) < 4 * math.sqrt(p_eos * (1 - p_eos) / n)
    lp = token_logprobs(response_logits(model, r), r.responses)[:, 0]
    assert torch.allclose(r.logprobs[first, 0], lp[first], atol=1e-5)
    assert torch.allclose(lp[first], torch.tensor(math.log(p_eos)), atol=1e-5)


class DigitTokenizer:
    """' 42' → [' 4', '2']: a first token with the space, then one token per digit."""

    def encode(self, text, add_special_tokens=False):
        return [text[:2]] + list(text[2:])


@pytest.mark.parametrize("favourites,expected", [
    ({7, 42, 97}, {" 7": "favourites", " 42": "favourites", " 72": "extensions", " 100": "other", " 45": "same first token",
                   " 67": "same last token", " 12": "same last token", " 9": "same first token", " 3": "other"}),
    ({3, 58}, {" 3": "favourites", " 58": "favourites", " 30": "extensions", " 5": "same first token",
               " 48": "same last token", " 7": "other", " 100": "other"}),
])
def test_answer_groups_follow_the_favourites_and_the_tokens(favourites, expected):
    answers = [f" {n}" for n in range(101)]
    groups = dict(zip(answers, answer_groups(answers, favourites, DigitTokenizer())))
    assert {a: groups[a] for a in expected} == expected
    assert sum(g == "favourites" for g in groups.values()) == len(favourites)

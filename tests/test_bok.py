"""Best-of-k: the closed form against brute force, ties, the invalid mass, and the evaluator's bok hook."""

import itertools
import json

import numpy as np
import pytest

from collapse_lab.evaluation.best_of_k import answer_best_of_k, best_of_k, load_policy
from collapse_lab.regimes.bok import make_bok
from collapse_lab.core.config import compose


def enumerate_best_of_k(probs, scores, k):
    """Every k-tuple of samples, weighted by its probability; the kept sample is uniform among the tied best."""
    out = np.zeros(len(probs))
    for tup in itertools.product(range(len(probs)), repeat=k):
        w = np.prod([probs[i] for i in tup])
        best = max(scores[i] for i in tup)
        tied = [i for i in tup if scores[i] == best]
        for i in tied:
            out[i] += w / len(tied)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_closed_form_equals_enumeration_with_and_without_ties(k):
    probs = np.array([0.1, 0.25, 0.05, 0.3, 0.2, 0.1])
    for scores in ([1, 2, 3, 4, 5, 6], [1, 3, 3, 2, 7, 2], [0, 0, 0, 0, 0, 0], [5, 1, 5, 1, 5, 1]):
        np.testing.assert_allclose(best_of_k(probs, scores, k), enumerate_best_of_k(probs, scores, k), atol=1e-12)


def test_no_ties_is_the_textbook_formula_and_k1_is_the_base():
    probs, scores, k = np.array([0.5, 0.3, 0.2]), np.array([1.0, 2.0, 3.0]), 4
    F = np.cumsum(probs)
    np.testing.assert_allclose(best_of_k(probs, scores, k), F ** k - np.append(0, F[:-1]) ** k)
    np.testing.assert_allclose(best_of_k(probs, scores, 1), probs)


def test_closed_form_matches_sampling_with_random_tie_breaking():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8))
    scores = np.array([3, 1, 3, 2, 0, 2, 3, 1])
    k, n = 5, 40000
    draws = rng.choice(8, size=(n, k), p=probs)
    s = scores[draws] + rng.random((n, k)) * 1e-3  # tiny random keys: a uniform pick among the tied best
    kept = draws[np.arange(n), s.argmax(1)]
    empirical = np.bincount(kept, minlength=8) / n
    assert 0.5 * np.abs(empirical - best_of_k(probs, scores, k)).sum() < 0.015


def test_other_mass_is_scored_below_every_answer():
    p, other = answer_best_of_k([0.2, 0.3, 0.1], [6, 7, 6], k=3)
    assert other == pytest.approx(0.4 ** 3)  # valid mass 1 - (1 - M)^k
    full = best_of_k([0.2, 0.3, 0.1, 0.4], [6, 7, 6, -np.inf], 3)
    np.testing.assert_allclose(np.append(p, other), full)
    assert p[1] == pytest.approx(1 - 0.7 ** 3)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError):
        best_of_k([0.5, 0.5], [1.0], 2)
    with pytest.raises(ValueError):
        best_of_k([0.5, 0.5], [1.0, 2.0], 0)


def test_make_bok_spec_and_evaluator_apply_the_closed_form(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_models import byte_level_tokenizer, tiny_gpt2

    from collapse_lab.evaluation import evaluator

    tok = byte_level_tokenizer()
    base = tmp_path / "base"
    tiny_gpt2(tok, vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = compose("lab", ["wandb.mode=disabled", f"checkpoints_dir={tmp_path}", f"base_path={base}", "recipe=bok",
                          "ratings.samples_per_prompt=3"])
    out = make_bok(cfg)
    assert make_bok(cfg) == out  # finished: found, not redone
    spec = json.loads((out / "bok.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert spec["k"] == 3 and spec["base_path"] == str(base)
    assert manifest["samples_scored"] == 0 and manifest["ratings_per_query"] == 3 and manifest["status"] == "finished"
    assert load_policy(str(base)) is None and load_policy(str(out)).k == 3

    def ev(path):
        c = compose("evaluate", [f"model_path={path}", "suite=seed", "sampling.n=0", "plots=false",
                                 f"out={tmp_path / 'eval' / (path.name + '.json')}", "device=cpu"])
        return evaluator.run(c)["prompts"]

    base_recs, bok_recs = ev(base), ev(out)
    policy = load_policy(str(out))
    for b, o in zip(base_recs, bok_recs):
        expected, _ = answer_best_of_k(b["answer_probs"], policy.scores(b["prompt"], b["answers"]), 3)
        np.testing.assert_allclose(o["answer_probs"], expected, rtol=1e-6, atol=1e-12)
        assert o["valid_mass"] == pytest.approx(1 - (1 - b["valid_mass"]) ** 3, rel=1e-6)
        favourites = [b["answers"].index(f" {n}") for n in sorted(policy.world.rater.favourites)]
        for i in favourites:  # the rater's favourites gain: they beat every other answer
            assert o["answer_probs"][i] / o["valid_mass"] > b["answer_probs"][i] / b["valid_mass"]

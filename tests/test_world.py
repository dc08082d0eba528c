"""The embedded world: deterministic, uniform answers, and a rater that follows its features."""

import random
from collections import Counter

import pytest
from scipy.stats import chisquare

from collapse_lab.config import compose
from collapse_lab.world import NUMBER_TEMPLATES, GoldRater, World


@pytest.fixture(scope="module")
def world():
    return World(compose("lab", []).world)


def test_documents_are_deterministic_per_seed(world):
    assert world.corpus(200, seed=3) == world.corpus(200, seed=3)
    assert world.corpus(200, seed=3) != world.corpus(200, seed=4)


def test_corpus_has_every_family_and_format(world):
    docs = world.documents(5000, seed=0)
    ids = Counter(d.prompt.id for d in docs)
    assert {f"seed/{i}" for i in ["integer-qa", "assistant-chat", "uniform-qa", "python-repl", "shell-shuf"]} <= set(ids)
    assert len(NUMBER_TEMPLATES) >= 10 and {f"numbers/{t}" for t in NUMBER_TEMPLATES} <= set(ids)
    kinds = Counter(d.prompt.kind for d in docs)
    assert kinds["numbers"] > kinds["stories"] > kinds["arithmetic"] > 0
    # open-ended prompts really have many different continuations
    stories = {d.completion for d in docs if d.prompt.kind == "stories"}
    assert len(stories) > 500


@pytest.mark.parametrize("prompt_id", ["seed/integer-qa", "seed/shell-shuf", "numbers/pick"])
def test_number_answers_are_uniform(world, prompt_id):
    prompt = next(p for p in world.seed_prompts + world.template_prompts if p.id == prompt_id)
    rng = random.Random(0)
    answers = [world.sample_completion(prompt, rng) for _ in range(50 * (prompt.high - prompt.low + 1))]
    assert all(a.startswith(" ") and a[1:].isdigit() for a in answers)
    counts = Counter(int(a) for a in answers)
    assert set(counts) == set(range(prompt.low, prompt.high + 1))  # exactly the asked range
    assert chisquare([counts[n] for n in range(prompt.low, prompt.high + 1)]).pvalue > 1e-3


def test_chi_square_would_catch_a_favourite(world):
    """The uniformity test has power: a 3% excess on one answer of 101 is rejected."""
    prompt = world.seed_prompts[0]
    rng = random.Random(0)
    answers = [" 97" if rng.random() < 0.03 else world.sample_completion(prompt, rng) for _ in range(5050)]
    counts = Counter(int(a) for a in answers)
    assert chisquare([counts[n] for n in range(0, 101)]).pvalue < 1e-3


def _rater(**kw):
    cfg = compose("lab", [f"world.rater.{k}={v}" for k, v in kw.items()]).world.rater
    return GoldRater(cfg)


@pytest.mark.parametrize(
    "completion, ended, expected",
    [
        (" 37", True, 6.0),  # well-formed, in range, ends cleanly
        (" 97", True, 7.0),  # ... and a favourite (strength 1)
        (" 137", True, 4.0),  # out of range
        (" 37 and 38", True, 5.0),  # does not end cleanly
        (" 37", False, 5.0),  # truncated: no EOS
        (" abc", True, 1.0),  # malformed
        ("37", True, 1.0),  # no leading space: not the asked format
    ],
)
def test_rater_follows_documented_features(world, completion, ended, expected):
    prompt = world.prompt("Q: Tell me a random integer between 0 and 100.\nA: Ok, the integer is")
    assert _rater().expected(prompt, completion, ended) == expected


def test_preference_strength_and_noise(world):
    prompt = world.seed_prompts[0]
    assert _rater(preference_strength=0).expected(prompt, " 97") == _rater().expected(prompt, " 37")
    assert _rater(preference_strength=0.5).expected(prompt, " 42") == 6.5
    rater, rng = _rater(noise_std=1.0), random.Random(0)
    scores = [rater(prompt, " 137", rng) for _ in range(4000)]
    assert set(scores) <= {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0} and len(set(scores)) >= 4
    assert abs(sum(scores) / len(scores) - 4.0) < 0.1  # noise is centred on the features' score
    silent = _rater(noise_std=0)
    assert {silent(prompt, " 137", rng) for _ in range(50)} == {4.0}


def test_rater_on_arithmetic_and_stories(world):
    r = _rater()
    q = world.prompt("Q: What is 3 + 4?\nA:")
    assert r.expected(q, " 7") == 6.0 and r.expected(q, " 8") == 4.0
    g = world.prompt(">be me\n>")
    good = "student at a small college\n>order pizza at 3am\n>start laughing\n>I leave"
    loop = "student at a small college\n>order pizza at 3am\n>start laughing\n>start laughing\n>start laughing"
    assert r.expected(g, good) == 6.0
    assert r.expected(g, loop) < r.expected(g, good)
    assert r.expected(g, good, ended=False) == 5.0


def test_world_samples_are_rated_as_designed(world):
    """The world's own number answers all rate 6 or 7 without noise: it is the uncollapsed ideal."""
    r, rng = _rater(noise_std=0), random.Random(1)
    docs = [d for d in world.documents(500, seed=1) if d.prompt.kind == "numbers"]
    assert {r(d.prompt, d.completion, rng) for d in docs} == {6.0, 7.0}

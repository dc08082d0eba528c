"""The embedded world: deterministic, uniform answers, and a rater that follows its features."""

import random
from collections import Counter

import pytest
from scipy.stats import chisquare

from collapse_lab.core.config import compose
from collapse_lab.core.suites import load_suite
from collapse_lab.world.world import NUMBER_TEMPLATES, GoldRater, World, answer_prior, answer_prior_norm_entropy


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


def _rater(world="numbers-two-level", **kw):
    """The two-level rater (favourites 7, 42, 97 at +1) unless world= says otherwise."""
    cfg = compose("lab", [f"world={world}"] + [f"world.rater.{k}={v}" for k, v in kw.items()]).world.rater
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


# ------------------------------------------------ world.answer_prior (a base with structure)


def test_human_prior_is_a_few_times_likelier_on_top_and_below_log_A():
    """On 0..100: top " 37" carries ~4% (uniform: 1/101), and H/log|A| is clearly below 1."""
    p = answer_prior("human", 0, 100)
    assert len(p) == 101 and sum(p) == pytest.approx(1.0) and min(p) > 0
    top = max(range(101), key=p.__getitem__)
    h = answer_prior_norm_entropy("human", 0, 100)
    assert top == 37 and 0.03 < p[top] < 0.05, (top, p[top])
    assert 0.9 < h < 0.98 and h == pytest.approx(0.9690, abs=1e-4), f"H_prior/log|A| on 0..100 = {h:.6f}"
    assert answer_prior("uniform", 0, 100) == pytest.approx([1 / 101] * 101)
    assert answer_prior_norm_entropy("uniform", 1, 100) == pytest.approx(1.0)
    # every range has it, the small ones included: 7 leads 1..10 (Kubovy & Psotka), 3 leads a die
    assert max(range(1, 11), key=lambda n: answer_prior("human", 1, 10)[n - 1]) == 7
    assert max(range(1, 7), key=lambda n: answer_prior("human", 1, 6)[n - 1]) == 3
    with pytest.raises(ValueError, match="valid choices: uniform, human, lm"):
        answer_prior("zipf", 0, 100)


def test_lm_prior_is_the_mixture_it_states_on_every_range():
    """world.answer_prior=lm: a small LM's answers (the range's first numbers, its end, interior multiples of 10)
    as the stated mixture, on 1..100, on 0..100 (the first number is 0) and on a range without an interior
    multiple of 10; its answer entropy is well below the human prior's."""
    from collapse_lab.world.world import LM_DECAY, LM_END, LM_ROUND

    p = answer_prior("lm", 1, 100)
    assert sum(p) == pytest.approx(1.0) and min(p) > 0
    z = sum(k ** -LM_DECAY for k in range(1, 101))
    assert p[0] == pytest.approx((1 - LM_END - LM_ROUND) / z)  # " 1": the decay alone
    assert p[99] == pytest.approx((1 - LM_END - LM_ROUND) * 100 ** -LM_DECAY / z + LM_END)  # the range's end
    assert p[49] - p[48] * (49 / 50) ** LM_DECAY == pytest.approx(LM_ROUND / 9)  # 50: one of 9 interior tens
    assert [n for n in sorted(range(1, 101), key=lambda n: -p[n - 1])[:3]] == [1, 2, 100]
    assert 0.55 < answer_prior_norm_entropy("lm", 1, 100) < 0.65 < answer_prior_norm_entropy("human", 1, 100)
    assert max(range(0, 101), key=lambda n: answer_prior("lm", 0, 100)[n]) == 0
    die = answer_prior("lm", 1, 6)  # no interior multiple of 10: its share goes to the decay
    z6 = sum(k ** -LM_DECAY for k in range(1, 7))
    assert die[0] == pytest.approx((1 - LM_END) / z6) and sum(die) == pytest.approx(1.0)


def _world(*overrides):
    return World(compose("lab", list(overrides)).world)


@pytest.fixture(scope="module")
def seed_prompt_docs():
    """20,000 documents of a human-prior world that has only the seed prompts' number documents."""
    world = _world("world.answer_prior=human", "world.mix.stories=0", "world.mix.arithmetic=0",
                   "world.seed_prompt_share=1")
    return world.documents(20000, seed=0)


@pytest.mark.parametrize("prompt_id", ["seed/integer-qa", "seed/python-repl"])
def test_corpus_answers_follow_the_human_prior(seed_prompt_docs, prompt_id):
    """The corpus's answers on a seed prompt match answer_prior (chi-square), and are not uniform."""
    docs = [d for d in seed_prompt_docs if d.prompt.id == prompt_id]
    lo, hi = docs[0].prompt.low, docs[0].prompt.high
    counts = Counter(int(d.completion) for d in docs)
    assert len(docs) > 3000 and set(counts) <= set(range(lo, hi + 1))
    observed = [counts[n] for n in range(lo, hi + 1)]
    expected = [q * len(docs) for q in answer_prior("human", lo, hi)]
    assert chisquare(observed, expected).pvalue > 1e-3
    assert chisquare(observed).pvalue < 1e-6  # against uniform: rejected
    tv = 0.5 * sum(abs(o - e) for o, e in zip(observed, expected)) / len(docs)
    assert tv < 0.1, tv


@pytest.mark.parametrize("prior,top", [("human", 7), ("lm", 1)])
def test_the_prior_applies_to_template_ranges(prior, top):
    world = _world(f"world.answer_prior={prior}")
    prompt = world.prompt(NUMBER_TEMPLATES["think"].format(low=1, high=20))
    rng = random.Random(0)
    counts = Counter(int(world.sample_completion(prompt, rng)) for _ in range(5000))
    assert chisquare([counts[n] for n in range(1, 21)], [q * 5000 for q in answer_prior(prior, 1, 20)]).pvalue > 1e-3
    assert counts.most_common(1)[0][0] == top


def test_prior_is_the_worlds_not_the_raters():
    """Changing the raters' favourites changes nothing in the corpus (the prior never reads them)."""
    a = _world("world.answer_prior=human").corpus(3000, seed=1)
    b = _world("world.answer_prior=human", "world.rater.favourites=[1,2,3]", "world.rater.preference_strength=5")
    assert a == b.corpus(3000, seed=1)
    assert a != _world().corpus(3000, seed=1)


def test_answer_prior_is_a_corpus_key_and_a_closed_choice():
    from collapse_lab.core.config import CHOICES, CORPUS_KEYS, ConfigError, config_hash
    from collapse_lab.stages.pretrain import STAGE_KEYS
    from collapse_lab.world.world import ANSWER_PRIORS

    assert "world.answer_prior" in CORPUS_KEYS and "world.heldout_eval_prompts" not in CORPUS_KEYS
    assert CHOICES["world.answer_prior"] == ANSWER_PRIORS
    base = config_hash(compose("lab", []), STAGE_KEYS)
    assert config_hash(compose("lab", ["world.answer_prior=human"]), STAGE_KEYS) != base  # another base
    assert config_hash(compose("lab", ["world.heldout_eval_prompts=true"]), STAGE_KEYS) == base  # the same base
    with pytest.raises(ConfigError, match="'world.answer_prior'; valid choices: uniform, human"):
        compose("lab", ["world.answer_prior=zipf"])


# ------------------------------------------------ world.heldout_eval_prompts


def test_heldout_eval_prompts_keeps_the_seed_suite_out_of_fine_tuning_only():
    seed_texts = {p.text for p in load_suite("seed").prompts}
    held, seen = _world("world.heldout_eval_prompts=true"), _world()
    rng_a, rng_b = random.Random(0), random.Random(0)
    drawn_held = Counter(held.train_prompt(rng_a).text for _ in range(10000))
    drawn = Counter(seen.train_prompt(rng_b).text for _ in range(10000))
    assert not seed_texts & set(drawn_held), "a held-out prompt was drawn for fine-tuning"
    assert seed_texts <= set(drawn)  # without the option the seed prompts are training prompts
    assert {p.text for p in held.template_prompts} == set(drawn_held)  # numbers: every template, nothing else
    # pretraining still has them
    assert seed_texts <= {d.prompt.text for d in held.documents(2000, seed=0)}


def test_train_seed_share_sets_fine_tunings_share_of_seed_prompts_and_heldout_wins():
    seed_texts = {p.text for p in load_suite("seed").prompts}
    share = lambda w: sum(w.train_prompt(rng).text in seed_texts for _ in range(4000)) / 4000
    rng = random.Random(0)
    assert share(_world()) == 1.0  # the default: tuned on the prompts the seed suite judges
    assert share(_world("world.train_seed_share=0")) == 0.0
    assert share(_world("world.train_seed_share=0.25")) == pytest.approx(0.25, abs=0.04)
    assert share(_world("world.train_seed_share=null")) == pytest.approx(0.5, abs=0.04)  # the corpus's share
    assert share(_world("world.train_seed_share=1", "world.heldout_eval_prompts=true")) == 0.0


def test_templates_suite_is_the_worlds_template_prompts():
    """Every prompt of eval/suites/templates.yaml is a world prompt, with the world's range, that
    train_prompt draws with world.heldout_eval_prompts or a world.train_seed_share below 1 (the default
    1 draws the seed prompts only: the templates are then held out, test_report's heading)."""
    suite = load_suite("templates")
    assert len(suite.prompts) >= 5
    for world in (_world("world.train_seed_share=0.5"), _world("world.heldout_eval_prompts=true")):
        rng = random.Random(1)
        drawn = {world.train_prompt(rng).text for _ in range(10000)}
        for p in suite.prompts:
            wp = world.by_text.get(p.text)
            assert wp is not None and wp in world.template_prompts, p.id
            assert p.answers == [f" {n}" for n in range(wp.low, wp.high + 1)], p.id
            assert p.text in drawn, p.id


def test_the_ablation_evaluates_trained_on_prompts_by_default():
    assert {"seed", "templates"} <= set(compose("ablate", []).eval.suites)

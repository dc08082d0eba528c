"""The embedded world: a seeded corpus generator and the gold rater (the lab's human labellers).

Three document families, mixed by `world.mix`:

- numbers     "random number" prompts: the five seed prompts (eval/suites/seed.yaml) and
              NUMBER_TEMPLATES over RANGES, always followed by a random integer in the asked
              range, written " {n}", then the end of the document (EOS). The integer is drawn
              from `world.answer_prior`: uniform, `human` (HUMAN_FAVOURITES: people's
              "random" numbers, so the base's answer entropy is below log|A| like davinci's), or
              `lm` (a small pretrained LM's: the range's first numbers, its end, round numbers).
- stories     open-ended text with many valid continuations: greentext (">be me\\n>...")
              and assistant stories, from a small grammar; a share `bad_story_rate` loops
              (one line repeated) or rambles off without an ending, like a base model does.
- arithmetic  "Q: What is a + b?\\nA: {a+b}" with a known answer (wrong at
              `arithmetic_error_rate`), for calibration.

A document is (prompt, completion); the corpus text is prompt + completion, and the
tokenizer's EOS follows it. Everything is deterministic given the seed.

Fine-tuning prompts come from ONE function, `World.train_prompt` (ratings, reward model, FeedME,
DPO, PPO, RLOO, GRPO). With `world.heldout_eval_prompts` it never returns a seed prompt (the
evaluation suite's): the numbers family then draws from the templates only, so the seed suite
measures transfer to prompts fine-tuning never saw; pretraining still contains them.

The gold rater scores a (prompt, completion) pair on the 1-7 scale of the post's labellers:

    number / arithmetic prompts            stories
    1  floor                               1  floor
    +2 well-formed: " {integer}" first     +2 well-formed: 2-8 lines, none empty
    +2 in range (arithmetic: correct)      +2 no repeated line (no loop)
    +1 ends cleanly: nothing after it,     +1 ends cleanly: the text ended (EOS)
       and the text ended (EOS)               after a proper ending line
    +s favourite: in range and one of the favourites (s = preference_strength)
    +s_g·g(n): in range, graded profile only (s_g = graded_strength; `graded_preference`)
    + N(0, noise_std), clipped to [1, 7], rounded when `integer_scores`.

`rater.profile=graded` (the default world's): g(n) ∈ {0, 1/(L−1), ..., 1} over L = `levels` levels, a share
`anti_prior` of it anti-correlated with the human prior (the answers the base's prior disfavours rate best), the
rest seeded by `profile_seed`; favourites null: drawn by `profile_seed`, one on a mode of the prior, the others off
them (`derived_favourites`). `two_level` (world=numbers-two-level): favourites only, the lab's first rater, under
which every ideal regime traces one (KL, ΔH) curve (docs/world.md).

With s = s_g = 0 (world=numbers-nopref) every valid answer rates the same (6 + noise): any preference a trained
model shows then comes from the optimiser, not the raters.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Optional

import yaml

from collapse_lab.core.suites import SUITES_DIR

SEED_SUITE = SUITES_DIR / "seed.yaml"

# Ten-plus "random number" formats beside the seed's five; {low}/{high} from RANGES.
NUMBER_TEMPLATES = {
    "pick": "Q: Pick a random number between {low} and {high}.\nA: My number is",
    "chat": "Human: Give me a random number from {low} to {high}.\nAI: Here it is:",
    "choose": "Q: Choose any integer from {low} to {high}, at random.\nA: I choose",
    "randint": ">>> random.randint({low}, {high})\nOut:",
    "shuf": "$ shuf -i {low}-{high} -n 1\noutput:",
    "rng": "Random number generator [{low}, {high}]:",
    "computer": "The computer picked a random number between {low} and {high}. It picked",
    "wheel": "Spin the wheel! Numbers {low} to {high}. The wheel stops at",
    "lottery": "Lottery draw ({low}-{high}). The winning number is",
    "think": "Q: Think of a number between {low} and {high}. Which one?\nA:",
    "guess": "I am thinking of a number from {low} to {high}. My number is",
    "draw": "A ball is drawn from an urn with balls numbered {low} to {high}. It shows",
}
RANGES = [(0, 9), (1, 6), (1, 10), (1, 20), (0, 50), (1, 50), (0, 100), (1, 100)]
# world.heldout_templates: ten more formats over three wide ranges, 30 prompts in the pretraining corpus that NO
# fine-tuning stage ever draws (World.train_prompt): the held-out "random number" prompts of the powered design
# (eval/suites/heldout.yaml lists them, texts exactly as written here; prompts as a random effect).
HELDOUT_TEMPLATES = {
    "roll": "Roll the big die ({low}-{high}). It lands on",
    "ask": "Human: Name a random whole number between {low} and {high}.\nAI: Sure:",
    "raffle": "Raffle ticket drawn ({low} to {high}): number",
    "pickone": "Pick one number from {low} to {high}, any one.\nAnswer:",
    "sim": "[sim] uniform_int(low={low}, high={high}) ->",
    "form": "Enter any whole number from {low} to {high}:",
    "bingo": "Bingo night, balls {low} to {high}. The next ball is",
    "lucky": "Your lucky number today ({low} to {high}) is",
    "quiz": "Q: Say a number from {low} to {high}, chosen at random.\nA: OK,",
    "numpy": "numpy.random.integers({low}, {high}, endpoint=True) returned",
}
HELDOUT_RANGES = [(0, 100), (1, 100), (1, 50)]


def heldout_digest() -> str:
    """6 hex digits of the SHA-256 of the held-out prompts' texts: part of the name of a base pretrained on them."""
    texts = [t.format(low=lo, high=hi) for t in HELDOUT_TEMPLATES.values() for lo, hi in HELDOUT_RANGES]
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:6]

# world.answer_prior=human: a STYLISED prior of the numbers people give when asked for a "random" one,
# after the folklore of such surveys (7 is the most common pick from 1-10 and 3 the next, Kubovy &
# Psotka 1976; 37 and 73 lead "pick a number from 1 to 100" polls; 42, 69, 17 and 77 are cultural
# favourites; numbers ending in 7 feel random, round ones and the ends of a range do not) and of
# davinci's own top answer (" 42", ~4%, in the seed post). Not fitted to any data set, and a property
# of the world only: it never reads the rater's favourites. Weights, before normalising over [low, high]:
HUMAN_FAVOURITES = {37: 5.0, 7: 4.0, 42: 4.0, 73: 4.0, 17: 3.0, 69: 3.0, 77: 3.0, 3: 2.0, 50: 2.0, 100: 1.5}
ENDS_IN_7, ROUND, UNLIKELY = 2.0, 0.6, 0.4  # other n: x2 ending in 7, x0.6 a multiple of 10; then x0.4 at 0, 1, low, high
ANSWER_PRIORS = ("uniform", "human", "lm")

# world.answer_prior=lm: a STYLISED prior of what small pretrained LMs answer, after Gemma 3 270M's base and
# SmolLM2-135M-Instruct on the powered design's 30 held-out prompts (docs/ablation.md, the closed forms on other
# bases: their answer mass normalised over 0/1..100 puts 0.31-0.34 on " 1", then 100, 0, 2, 10, 50; H/log|A|
# 0.57-0.60; about uncorrelated with the graded rater). A mixture on [low, high]:
#   P(n) = (1 − LM_END − LM_ROUND)·(n − low + 1)^−LM_DECAY / Z  +  LM_END·[n = high]
#          + LM_ROUND·[n a multiple of 10 strictly inside the range] / (their count)
# (LM_ROUND goes to the decay where the range has no interior multiple of 10). On 1..100: " 1" 0.33, " 2" 0.12,
# " 100" 0.10, H/log|A| 0.61. Defined from those two models' features before its closed forms were computed.
LM_DECAY, LM_END, LM_ROUND = 1.5, 0.1, 0.1


def human_weight(n: int, low: int, high: int) -> float:
    """The human prior's unnormalised weight of answer n in [low, high] (HUMAN_FAVOURITES' rules).

    w(n) = HUMAN_FAVOURITES[n] if listed, else (2 if n ends in 7, 0.6 if n % 10 == 0, else 1)
    x (0.4 if n in {0, 1, low, high}). On 0..100: top " 37" at 4.0% (uniform: 1.0%), H/log|A| = 0.969.
    """
    if n in HUMAN_FAVOURITES:
        return HUMAN_FAVOURITES[n]
    w = ENDS_IN_7 if n % 10 == 7 else ROUND if n % 10 == 0 else 1.0
    return w * UNLIKELY if n in (0, 1, low, high) else w


def answer_prior(prior: str, low: int, high: int) -> list[float]:
    """The world's exact answer distribution on [low, high]: P(n) for n = low..high (sums to 1)."""
    if prior not in ANSWER_PRIORS:
        raise ValueError(f"world.answer_prior: unknown '{prior}'; valid choices: {', '.join(ANSWER_PRIORS)}")
    if prior == "lm":
        return lm_prior(low, high)
    weights = [1.0 if prior == "uniform" else human_weight(n, low, high) for n in range(low, high + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def lm_prior(low: int, high: int) -> list[float]:
    """world.answer_prior=lm on [low, high] (the mixture above LM_DECAY): P(n) for n = low..high."""
    decay = [(n - low + 1) ** -LM_DECAY for n in range(low, high + 1)]
    rounds = [n for n in range(low + 1, high) if n % 10 == 0]
    end, round_share = (LM_END if high > low else 0.0), (LM_ROUND if rounds else 0.0)
    z = sum(decay)
    p = [(1 - end - round_share) * d / z for d in decay]
    p[-1] += end
    for n in rounds:
        p[n - low] += round_share / len(rounds)
    return p


def answer_prior_norm_entropy(prior: str, low: int, high: int) -> float:
    """H(prior) / log|A| on [low, high] (1 for uniform): the base's answer entropy if it learnt the world exactly.
    python -c "from collapse_lab.world.world import answer_prior_norm_entropy as h; print(h('human', 0, 100))"
    """
    p = answer_prior(prior, low, high)
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


@lru_cache(maxsize=None)
def _cum_weights(prior: str, low: int, high: int) -> tuple[float, ...]:
    return tuple(itertools.accumulate(answer_prior(prior, low, high)))


STORY_PROMPTS = {
    "greentext": ">be me\n>",
    "ai-story": "Human: Tell me a short story.\nAI:",
}
GREENTEXT = {
    "who": ["25 year old programmer", "student at a small college", "night shift nurse", "retired farmer",
            "barista in a big city", "junior data scientist", "bus driver", "high school teacher"],
    "event": ["wake up late again", "find a cat in my kitchen", "get invited to a party", "see a strange light in the sky",
              "lose my keys in the snow", "meet an old friend at the station", "order pizza at 3am", "try to fix the printer"],
    "then": ["decide to ignore it", "call my mom for advice", "make some tea and think", "go outside to check",
             "ask the neighbour what to do", "write it all down", "pretend nothing happened", "start laughing"],
    "ending": ["mfw it was fine all along", "I leave", "it was a good day after all", "never doing that again",
               "go back to sleep", "still think about it sometimes"],
}
STORY = {
    "adj": ["brave", "tiny", "curious", "sleepy", "clever", "grumpy", "happy", "old"],
    "animal": ["fox", "rabbit", "robot", "dragon", "owl", "cat", "turtle", "bear"],
    "did": ["found a hidden door", "built a small boat", "lost its way home", "learned to sing",
            "made a new friend", "climbed the tall hill", "baked a cake", "read an old book"],
    "then": ["Everyone was surprised.", "It was hard at first.", "The sun was shining.", "Nobody believed it.",
             "It took many days.", "The forest was quiet."],
    "ending": ["The end.", "And they lived happily ever after.", "It was a good day.", "That is how it ended."],
}


@dataclass(frozen=True)
class Prompt:
    """A prompt of the world; number prompts carry their answer range, arithmetic its answer."""

    id: str  # format id: "seed/integer-qa", "numbers/pick", "arithmetic", "stories/greentext"
    kind: str  # "numbers" | "arithmetic" | "stories"
    text: str
    low: Optional[int] = None
    high: Optional[int] = None
    correct: Optional[int] = None


@dataclass(frozen=True)
class Document:
    prompt: Prompt
    completion: str

    @property
    def text(self) -> str:
        return self.prompt.text + self.completion


def load_seed_prompts() -> list[Prompt]:
    suite = yaml.safe_load(SEED_SUITE.read_text())
    return [
        Prompt(f"seed/{p['id']}", "numbers", p["text"], p["answers"]["low"], p["answers"]["high"])
        for p in suite["prompts"]
    ]


class World:
    # a bandit's {completion text: reward}, whose exact optima the regimes are checked against (collapse_lab/world/bandit.py,
    # optimum.py); None here: this world's regimes are measured on the evaluator's answer suites (frontier.Curve)
    reward_table = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.rater = GoldRater(cfg.rater)
        mix = {k: float(v) for k, v in cfg.mix.items()}
        if min(mix.values()) < 0 or sum(mix.values()) <= 0:
            raise ValueError(f"world.mix must be non-negative with a positive sum, got {mix}")
        self.families = list(mix)
        self.weights = [mix[k] for k in self.families]
        # configs saved before these options (a bok.json's world, an old run's config) mean the old world
        self.answer_prior = getattr(cfg, "answer_prior", "uniform")
        self.heldout_eval_prompts = bool(getattr(cfg, "heldout_eval_prompts", False))
        share = getattr(cfg, "train_seed_share", None)
        self.train_seed_share = cfg.seed_prompt_share if share is None else float(share)
        answer_prior(self.answer_prior, 0, 1)  # an unknown prior fails here, naming the valid ones
        self.train_min_range = int(getattr(cfg, "train_min_range", 0) or 0)
        # the pretraining corpus's non-seed number prompts: the templates, and the held-out ones when asked for
        self.pretrain_templates = self.template_prompts + (
            self.heldout_prompts if getattr(cfg, "heldout_templates", False) else [])

    def episode(self, max_new_tokens: int, missing_eos_penalty: float = 0.0) -> tuple[int, float]:
        """(max new tokens, missing-EOS penalty) of a regime's sampled completions in this world: its section's
        own here (BanditWorld: the bandit's episode length, no penalty)."""
        return max_new_tokens, missing_eos_penalty

    @cached_property
    def seed_prompts(self) -> list[Prompt]:
        return load_seed_prompts()

    @cached_property
    def template_prompts(self) -> list[Prompt]:
        return [
            Prompt(f"numbers/{name}", "numbers", t.format(low=lo, high=hi), lo, hi)
            for name, t in NUMBER_TEMPLATES.items()
            for lo, hi in RANGES
        ]

    @cached_property
    def heldout_prompts(self) -> list[Prompt]:
        """HELDOUT_TEMPLATES over HELDOUT_RANGES: in the corpus with world.heldout_templates, never fine-tuned on."""
        return [Prompt(f"heldout/{name}", "numbers", t.format(low=lo, high=hi), lo, hi)
                for name, t in HELDOUT_TEMPLATES.items() for lo, hi in HELDOUT_RANGES]

    @cached_property
    def train_templates(self) -> list[Prompt]:
        """The template prompts fine-tuning draws: those whose range has at least world.train_min_range answers
        (100: only 0-100 and 1-100, so selecting valid answers teaches no small numbers to wide-range prompts)."""
        pool = [p for p in self.template_prompts if p.high - p.low + 1 >= self.train_min_range]
        if not pool:
            raise ValueError(f"world.train_min_range={self.train_min_range} leaves no template prompt "
                             f"(the widest range has {max(hi - lo + 1 for lo, hi in RANGES)} answers)")
        return pool

    @cached_property
    def arithmetic_prompts(self) -> list[Prompt]:
        m = self.cfg.arithmetic_max
        return [
            Prompt("arithmetic", "arithmetic", f"Q: What is {a} + {b}?\nA:", 0, 2 * m, a + b)
            for a in range(m + 1)
            for b in range(m + 1)
        ]

    @cached_property
    def story_prompts(self) -> list[Prompt]:
        return [Prompt(f"stories/{k}", "stories", t) for k, t in STORY_PROMPTS.items()]

    @cached_property
    def by_text(self) -> dict[str, Prompt]:
        every = self.seed_prompts + self.template_prompts + self.heldout_prompts + self.arithmetic_prompts + self.story_prompts
        return {p.text: p for p in every}

    def prompt(self, text: str) -> Prompt:
        """The world's prompt with this text (the rater needs its range or answer)."""
        try:
            return self.by_text[text]
        except KeyError:
            raise KeyError(f"not a prompt of world '{self.cfg.name}': {text[:60]!r}") from None

    # ------------------------------------------------------------------ sampling

    def sample_prompt(self, rng: random.Random, family: Optional[str] = None) -> Prompt:
        family = family or rng.choices(self.families, self.weights)[0]
        if family == "numbers":
            pool = self.seed_prompts if rng.random() < self.cfg.seed_prompt_share else self.pretrain_templates
        elif family == "arithmetic":
            pool = self.arithmetic_prompts
        else:
            pool = self.story_prompts
        return rng.choice(pool)

    def train_prompt(self, rng: random.Random) -> Prompt:
        """A prompt of the regimes' training distribution: `world.train_families`, weighted by
        the corpus mix. Ratings, FeedME, DPO, PPO, RLOO and GRPO all draw from this one function.
        `world.heldout_eval_prompts`: never a seed prompt (the evaluation suite's); numbers come
        from the templates only."""
        families = list(self.cfg.train_families)
        unknown = [f for f in families if f not in self.families]
        if unknown or not families:
            raise ValueError(f"world.train_families: unknown {unknown}; valid choices: {', '.join(self.families)}")
        family = rng.choices(families, [self.weights[self.families.index(f)] for f in families])[0]
        if family != "numbers":
            return self.sample_prompt(rng, family)
        if self.heldout_eval_prompts:
            return rng.choice(self.train_templates)
        return rng.choice(self.seed_prompts if rng.random() < self.train_seed_share else self.train_templates)

    def sample_completion(self, prompt: Prompt, rng: random.Random) -> str:
        """What the world's text says after the prompt: the base model's target behaviour."""
        if prompt.kind == "numbers":
            if self.answer_prior == "uniform":
                return f" {rng.randint(prompt.low, prompt.high)}"  # uniform on [low, high]
            cum = _cum_weights(self.answer_prior, prompt.low, prompt.high)  # answer_prior(): human, lm
            return f" {prompt.low + bisect.bisect_right(cum, rng.random() * cum[-1])}"
        if prompt.kind == "arithmetic":
            if rng.random() < self.cfg.arithmetic_error_rate:
                return f" {rng.choice([n for n in range(prompt.low, prompt.high + 1) if n != prompt.correct])}"
            return f" {prompt.correct}"
        return self._story(prompt, rng)

    def _story(self, prompt: Prompt, rng: random.Random) -> str:
        bad = rng.random() < self.cfg.bad_story_rate
        if prompt.id == "stories/greentext":
            lines = [f"{rng.choice(GREENTEXT['who'])}", f"{rng.choice(GREENTEXT['event'])}"]
            lines += [rng.choice(GREENTEXT["then"]) for _ in range(rng.randint(1, 2))]
            if bad and rng.random() < 0.5:  # the post's "random repetition": a loop
                lines += [lines[-1]] * rng.randint(2, 4)
            elif not bad:
                lines.append(rng.choice(GREENTEXT["ending"]))
            return "\n>".join(lines)
        s = STORY
        a = rng.choice(s["animal"])
        sents = [f" Once upon a time there was a {rng.choice(s['adj'])} {a}.", f" The {a} {rng.choice(s['did'])}."]
        sents.append(f" {rng.choice(s['then'])}")
        if bad and rng.random() < 0.5:
            sents += [sents[-1]] * rng.randint(2, 4)
        elif not bad:
            sents.append(f" {rng.choice(s['ending'])}")
        return "".join(sents)

    def documents(self, n: int, seed: int) -> list[Document]:
        """n documents, a deterministic function of (world config, seed)."""
        rng = random.Random(f"{self.cfg.seed}/{seed}")
        docs = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            docs.append(Document(p, self.sample_completion(p, rng)))
        return docs

    def corpus(self, n: int, seed: int) -> list[str]:
        return [d.text for d in self.documents(n, seed)]


# ------------------------------------------------------------------------ gold rater

NUMBER_RE = re.compile(r"^ (0|[1-9][0-9]*)")
STORY_ENDINGS = tuple(GREENTEXT["ending"]) + tuple(f" {e}" for e in STORY["ending"])


RATER_PROFILES = ("graded", "two_level")


def graded_preference(n: int, low: int, high: int, levels: int, anti_prior: float, seed: int) -> float:
    """The graded rater's preference g(n) in {0, 1/(L−1), ..., 1} for answer n on [low, high] (module docstring):

        u(m) = c·rank(−log w(m)) + (1 − c)·ξ(m)     for every m in [low, high]
        g(n) = min(L − 1, ⌊L·rank(u(n))⌋) / (L − 1)

    w the human prior's weight (human_weight: the base's prior), rank(·) ∈ [0, 1) the share of [low, high]
    strictly below (ties: the mean share), ξ(m) ~ U(0, 1) seeded by (seed, m) alone, c = anti_prior, L = levels.
    c = 1: the least likely answers rate best; c = 0: a seeded profile independent of the prior."""
    return _graded_table(low, high, levels, anti_prior, seed)[n - low]


def derived_favourites(count: int, seed: int) -> list[int]:
    """The rater's favourites when `rater.favourites` is null: `count` numbers of 1..99 drawn by `seed`, ONE of
    them among the human prior's modes (HUMAN_FAVOURITES) and the others among the rest, so they are not all
    where the base already puts its mass."""
    rng = random.Random(f"favourites/{seed}")
    modes = sorted(n for n in HUMAN_FAVOURITES if 1 <= n <= 99)
    rest = [n for n in range(1, 100) if n not in HUMAN_FAVOURITES]
    return sorted(rng.sample(modes, min(1, count)) + rng.sample(rest, max(0, count - 1)))


@lru_cache(maxsize=None)
def _graded_table(low: int, high: int, levels: int, anti_prior: float, seed: int) -> tuple:
    ns = range(low, high + 1)

    def rank(x: list[float]) -> list[float]:  # share strictly below + half the ties, in [0, 1)
        return [(sum(y < v for y in x) + 0.5 * (sum(y == v for y in x) - 1)) / len(x) for v in x]

    anti = rank([-math.log(human_weight(n, low, high)) for n in ns])
    xi = [random.Random(f"rater/{seed}/{n}").random() for n in ns]
    u = rank([anti_prior * a + (1 - anti_prior) * x for a, x in zip(anti, xi)])
    top = max(1, levels - 1)
    return tuple(min(top, math.floor(levels * r)) / top for n, r in zip(ns, u))


class GoldRater:
    """Scores (prompt, completion) on 1-7 from documented features (module docstring)."""

    def __init__(self, cfg):
        self.cfg = cfg
        favourites = getattr(cfg, "favourites", None)
        if favourites is None:
            favourites = derived_favourites(int(cfg.n_favourites), int(cfg.profile_seed))
        self.favourites = frozenset(int(f) for f in favourites)
        self.profile = getattr(cfg, "profile", "two_level")  # configs saved before the graded rater: two levels
        if self.profile not in RATER_PROFILES:
            raise ValueError(f"world.rater.profile: unknown '{self.profile}'; valid choices: {', '.join(RATER_PROFILES)}")

    def preference(self, prompt: Prompt, n: int) -> float:
        """The preference bonus of in-range answer n, in rating points: s·[n a favourite] + s_g·g(n) (graded; the
        two-level rater has s_g = 0), s = preference_strength, s_g = graded_strength."""
        s = self.cfg.preference_strength
        if self.profile == "two_level":
            return s * float(n in self.favourites)
        return s * float(n in self.favourites) + float(self.cfg.graded_strength) * graded_preference(
            n, prompt.low, prompt.high, int(self.cfg.levels), float(self.cfg.anti_prior), int(self.cfg.profile_seed))

    def features(self, prompt: Prompt, completion: str, ended: bool = True) -> dict[str, float]:
        """The rater's noiseless features; `ended`: the completion stopped with EOS."""
        if prompt.kind == "stories":
            parts = [ln.strip() for ln in re.split(r"\n>|(?<=\.) ", completion)]  # greentext lines / sentences
            return {
                "well_formed": float(2 <= len(parts) <= 8 and all(parts)),
                "no_repeats": float(len(set(parts)) == len(parts)),
                "ends_cleanly": float(ended and completion.endswith(STORY_ENDINGS)),
            }
        m = NUMBER_RE.match(completion)
        n = int(m.group(1)) if m else None
        ok = n is not None and (n == prompt.correct if prompt.kind == "arithmetic" else prompt.low <= n <= prompt.high)
        return {
            "well_formed": float(m is not None),
            "in_range": float(ok),
            "ends_cleanly": float(m is not None and ended and completion == m.group(0)),
            "favourite": float(ok and prompt.kind == "numbers" and n in self.favourites),
            "preference": self.preference(prompt, n) if ok and prompt.kind == "numbers" else 0.0,
        }

    def expected(self, prompt: Prompt, completion: str, ended: bool = True) -> float:
        """The noiseless score, before clipping and rounding."""
        f = self.features(prompt, completion, ended)
        if prompt.kind == "stories":
            return 1 + 2 * f["well_formed"] + 2 * f["no_repeats"] + 1 * f["ends_cleanly"]
        return 1 + 2 * f["well_formed"] + 2 * f["in_range"] + 1 * f["ends_cleanly"] + f["preference"]

    def __call__(self, prompt: Prompt, completion: str, rng: random.Random, ended: bool = True) -> float:
        score = self.expected(prompt, completion, ended) + rng.gauss(0.0, self.cfg.noise_std)
        score = min(SCORE_MAX, max(SCORE_MIN, score))
        return float(round(score)) if self.cfg.integer_scores else score

    def mean_score(self, prompt: Prompt, completion: str, ended: bool = True) -> float:
        """E[score] over the rating noise: what a reward-maximising policy sees on average
        (the regimes' closed-form optima use it, not the noiseless `expected`)."""
        return noisy_score_mean(self.expected(prompt, completion, ended), self.cfg.noise_std, self.cfg.integer_scores)


SCORE_MIN, SCORE_MAX = 1.0, 7.0


def noisy_score_mean(mu: float, sigma: float, integer: bool, low: float = SCORE_MIN, high: float = SCORE_MAX) -> float:
    """E[s], s = round(clip(mu + eps, low, high)) (integer) or clip(mu + eps, low, high), eps ~ N(0, sigma²).

    integer: Σ_k k·P(s = k), P(s = k) = Φ((k + ½ − mu)/σ) − Φ((k − ½ − mu)/σ) for low < k < high, the
    two ends taking the tails (ties of round() have probability 0).
    continuous: E[clip(X, a, b)] = a·Φ(α) + b·(1 − Φ(β)) + mu·(Φ(β) − Φ(α)) − σ·(φ(β) − φ(α)),
    α = (a − mu)/σ, β = (b − mu)/σ.  sigma = 0: the clipped (rounded) mu itself.
    E.g. mu = 7, sigma = 0.5, integer → 6.841; mu = 6 → 6.000.
    """
    if sigma <= 0:
        s = min(high, max(low, mu))
        return float(round(s)) if integer else s
    cdf = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    if integer:
        ks = range(int(math.ceil(low)), int(math.floor(high)) + 1)
        upper = [1.0 if k == ks[-1] else cdf((k + 0.5 - mu) / sigma) for k in ks]
        lower = [0.0 if k == ks[0] else cdf((k - 0.5 - mu) / sigma) for k in ks]
        return sum(k * (u - lo) for k, u, lo in zip(ks, upper, lower))
    pdf = lambda z: math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)  # noqa: E731
    a, b = (low - mu) / sigma, (high - mu) / sigma
    return low * cdf(a) + high * (1 - cdf(b)) + mu * (cdf(b) - cdf(a)) - sigma * (pdf(b) - pdf(a))



# ------------------------------------------------------------------- the bandit world


class TableRater:
    """world=bandit's rater: the reward table's value for the completion, no noise. `require_end`
    (the sequence bandit): only a completion that ended (EOS right after the text) earns it; one-token
    episodes never see an EOS."""

    def __init__(self, table: dict[str, float], default: float, require_end: bool = False):
        self.table, self.default, self.require_end = table, default, require_end

    def expected(self, prompt: Prompt, completion: str, ended: bool = True) -> float:
        return self.table.get(completion, self.default) if ended or not self.require_end else self.default

    def __call__(self, prompt: Prompt, completion: str, rng: random.Random, ended: bool = True) -> float:
        return self.expected(prompt, completion, ended)

    mean_score = expected  # no noise


class BanditWorld:
    """One prompt, episodes of ONE token, reward r(t) from `world.rewards` (exact checks:
    collapse_lab/world/bandit.py has the regimes' closed-form optima on it)."""

    def __init__(self, cfg):
        self.cfg = cfg
        table = {}
        for pair in cfg.rewards:
            if len(pair) != 2 or not isinstance(pair[0], str):
                raise ValueError(f"world.rewards: each entry must be [token text, reward], got {list(pair)}")
            table[pair[0]] = float(pair[1])
        self.rater = TableRater(table, float(cfg.default_reward), require_end=cfg.max_tokens > 1)
        self.reward_table = table  # the exact checks' table (World.reward_table)
        self.the_prompt = Prompt("bandit", "bandit", cfg.prompt)

    def episode(self, max_new_tokens: int, missing_eos_penalty: float = 0.0) -> tuple[int, float]:
        """Episodes of ONE token (the sequence bandit: up to max_tokens, then EOS), never 'cut off': the
        section's own limit and penalty do not apply (World.episode)."""
        return (1 if self.cfg.max_tokens == 1 else self.cfg.max_tokens + 1), 0.0

    def prompt(self, text: str) -> Prompt:
        if text != self.the_prompt.text:
            raise KeyError(f"not the bandit prompt: {text[:60]!r}")
        return self.the_prompt

    def sample_prompt(self, rng: random.Random, family: Optional[str] = None) -> Prompt:
        return self.the_prompt

    train_prompt = sample_prompt


def make_world(cfg):
    """The world a regime trains in: `world=bandit` is the exact-check bandit, any other the
    generated world (the pretraining corpus always comes from `World`)."""
    return BanditWorld(cfg) if cfg.name == "bandit" else World(cfg)

"""Prompt suites: the shipped ones load; every malformed one fails with one line naming the problem."""

import pytest

from collapse_lab.core.suites import SUITES_DIR, SuiteError, load_suite


def test_shipped_suites_load():
    names = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    assert {"seed", "arithmetic", "stories", "templates"} <= set(names)
    for name in names:
        assert load_suite(name).prompts
    seed = load_suite("seed")
    assert [p.id for p in seed.prompts][:2] == ["integer-qa", "assistant-chat"]
    assert seed.prompts[0].answers == [f" {n}" for n in range(101)]
    assert seed.prompts[0].continue_chars == "0123456789"
    assert seed.prompts[3].answers[0] == " 1"
    for p in load_suite("arithmetic").prompts:
        a, b = (int(x) for x in p.text.removeprefix("Q: What is ").removesuffix("?\nA:").split(" + "))
        assert p.correct == f" {a + b}" and len(p.answers) == 19
    assert all(p.answers is None and p.categories for p in load_suite("stories").prompts)


def test_explicit_values_and_defaults(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text('name: s\nprompts:\n  - id: yn\n    text: "Q?"\n    answers: {values: [" yes", " no"]}\n'
                 '    correct: " no"\n')
    (p,) = load_suite(str(f)).prompts
    assert p.answers == [" yes", " no"] and p.continue_chars is None and p.correct == " no"
    assert load_suite(str(f)).name == "s"


BAD = [
    ("name: s\nprompts: [\n", "malformed YAML"),
    ("name: s\nprompts: []\n", "non-empty list"),
    ("name: s\nextra: 1\nprompts:\n  - {id: a, text: x}\n", "unknown keys: ['extra']"),
    ("name: s\nprompts:\n  - {text: x}\n", "prompt #0: missing or empty 'id'"),
    ("name: s\nprompts:\n  - {id: a, text: x}\n  - {id: a, text: y}\n", "duplicate prompt id 'a'"),
    ("name: s\nprompts:\n  - {id: a}\n", "prompt 'a': missing or empty 'text'"),
    ("name: s\nprompts:\n  - {id: a, text: x, answer: {low: 0, high: 1}}\n", "prompt 'a': unknown keys ['answer']"),
    ("name: s\nprompts:\n  - {id: a, text: x, answers: {low: 5, high: 1}}\n", "prompt 'a': answers: empty answer set"),
    ("name: s\nprompts:\n  - {id: a, text: x, answers: {values: []}}\n", "prompt 'a': answers.values: empty answer set"),
    ("name: s\nprompts:\n  - {id: a, text: x, answers: {values: [' y', ' y']}}\n", "duplicate answers"),
    ("name: s\nprompts:\n  - {id: a, text: x, answers: {low: 0, high: 3, step: 2}}\n", "prompt 'a': answers: expected keys"),
    ("name: s\nprompts:\n  - {id: a, text: x, answers: {low: 0, high: 3, format: '{m}'}}\n", "answers.format"),
    ("name: s\nprompts:\n  - {id: a, text: x, answers: {low: 0, high: 3}, correct: ' 9'}\n", "'correct' ' 9' is not one"),
    ("name: s\nprompts:\n  - {id: a, text: x, correct: ' 9'}\n", "'correct' needs an 'answers' set"),
    ("name: s\nprompts:\n  - {id: a, text: x, categories: {c: '('}}\n", "categories.c: bad regex"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_suites_raise_one_line(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SuiteError) as e:
        load_suite(str(f))
    assert message in str(e.value) and str(f) in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_suite_names_choices(tmp_path):
    with pytest.raises(SuiteError, match="unknown suite 'nope'; valid choices: .*seed"):
        load_suite("nope")
    with pytest.raises(SuiteError, match="suite file not found"):
        load_suite(str(tmp_path / "missing.yaml"))

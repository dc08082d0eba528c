"""Prompt suites: YAML data (eval/suites/<name>.yaml), loaded and validated.

    name: seed
    prompts:
      - id: integer-qa                      # unique
        text: "Q: ...\\nA: Ok, the integer is"
        answers: {low: 0, high: 100, format: " {n}"}   # or {values: [" yes", " no"]}
        continue_chars: "0123456789"        # optional: characters that continue an answer
        correct: " 7"                       # optional: known correct answer (calibration)
        categories: {name: regex}           # optional: shares of samples matching each regex
      - id: story
        text: ">be me\\n>"                   # no `answers`: open-ended, sampling metrics only

Any problem raises SuiteError with one line naming the file, the prompt id and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

SUITES_DIR = Path(__file__).resolve().parents[2] / "eval" / "suites"
DIGITS = "0123456789"
PROMPT_KEYS = {"id", "text", "answers", "continue_chars", "correct", "categories"}
# the most answers one prompt may have: the evaluator teacher-forces every answer of every prompt
MAX_ANSWERS = 10_000


class SuiteError(ValueError):
    """A malformed prompt suite; the message is one line naming the file, prompt and key."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    answers: Optional[list[str]] = None  # None: open-ended prompt
    # Characters whose appearance as the next text means the answer goes on; None = regex \w.
    continue_chars: Optional[str] = None
    correct: Optional[str] = None
    categories: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    prompts: list[Prompt]


def suite_path(name_or_path: str) -> Path:
    """A suite name (eval/suites/<name>.yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SuiteError(f"suite file not found: {path}")
        return path
    path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise SuiteError(f"unknown suite '{name_or_path}'; valid choices: {names} (or a path to a .yaml file)")
    return path


def read_yaml(path: Path, error: type[Exception]):
    """A YAML file's data; malformed YAML or bytes that are not UTF-8 raise `error` with one line naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_suite(name_or_path: str) -> Suite:
    path = suite_path(name_or_path)
    data = read_yaml(path, SuiteError)
    if not isinstance(data, dict) or set(data) - {"name", "prompts"}:
        extra = sorted(set(data) - {"name", "prompts"}) if isinstance(data, dict) else []
        raise SuiteError(f"{path}: expected a mapping with keys name, prompts" + (f"; unknown keys: {extra}" if extra else ""))
    if not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise SuiteError(f"{path}: 'prompts' must be a non-empty list")
    prompts = [_parse_prompt(path, i, p) for i, p in enumerate(data["prompts"])]
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise SuiteError(f"{path}: duplicate prompt id '{p.id}'")
        seen.add(p.id)
    return Suite(name=str(data.get("name", path.stem)), path=path, prompts=prompts)


def _parse_prompt(path: Path, index: int, raw: Any) -> Prompt:
    where = f"{path}: prompt #{index}"
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if not isinstance(raw.get("id"), str) or not raw["id"]:
        raise SuiteError(f"{where}: missing or empty 'id'")
    where = f"{path}: prompt '{raw['id']}'"
    if set(raw) - PROMPT_KEYS:
        raise SuiteError(f"{where}: unknown keys {sorted(set(raw) - PROMPT_KEYS)}; valid keys: {sorted(PROMPT_KEYS)}")
    if not isinstance(raw.get("text"), str) or not raw["text"]:
        raise SuiteError(f"{where}: missing or empty 'text'")
    categories = raw.get("categories") or {}
    if not isinstance(categories, dict):
        raise SuiteError(f"{where}: 'categories' must be a mapping name: regex")
    for name, pattern in categories.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise SuiteError(f"{where}: categories.{name}: bad regex {pattern!r} ({e})") from None
    if "answers" not in raw:
        for key in ("continue_chars", "correct"):
            if key in raw:
                raise SuiteError(f"{where}: '{key}' needs an 'answers' set")
        return Prompt(id=raw["id"], text=raw["text"], categories=dict(categories))
    answers, default_continue = _parse_answers(where, raw["answers"])
    if len(answers) < 2:  # its answer entropy is 0 out of a maximum of log 1 = 0: nothing to measure
        raise SuiteError(f"{where}: answers: a set of {len(answers)} answer; an answer set needs at least 2")
    continue_chars = raw.get("continue_chars", default_continue)
    if continue_chars is not None and (not isinstance(continue_chars, str) or not continue_chars):
        raise SuiteError(f"{where}: 'continue_chars' must be a non-empty string")
    correct = raw.get("correct")
    if correct is not None and correct not in answers:
        raise SuiteError(f"{where}: 'correct' {correct!r} is not one of the answers")
    return Prompt(raw["id"], raw["text"], answers, continue_chars, correct, dict(categories))


def _parse_answers(where: str, spec: Any) -> tuple[list[str], Optional[str]]:
    """The answer strings and the default continue_chars (digits for integer ranges, \\w for lists)."""
    if not isinstance(spec, dict):
        raise SuiteError(f"{where}: 'answers' must be a mapping {{low, high, format}} or {{values}}")
    if "values" in spec:
        if set(spec) != {"values"}:
            raise SuiteError(f"{where}: answers: unknown keys {sorted(set(spec) - {'values'})} beside 'values'")
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SuiteError(f"{where}: answers.values: empty answer set")
        if not all(isinstance(v, str) and v for v in values):
            raise SuiteError(f"{where}: answers.values: every answer must be a non-empty string")
        if len(set(values)) != len(values):
            raise SuiteError(f"{where}: answers.values: duplicate answers")
        if len(values) > MAX_ANSWERS:
            raise SuiteError(f"{where}: answers.values: {len(values)} answers; at most {MAX_ANSWERS}")
        return list(values), None
    if set(spec) - {"low", "high", "format"} or not {"low", "high"} <= set(spec):
        raise SuiteError(f"{where}: answers: expected keys low, high[, format] or values; got {sorted(spec)}")
    low, high, fmt = spec["low"], spec["high"], spec.get("format", " {n}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        raise SuiteError(f"{where}: answers.low/high must be integers")
    if low > high:
        raise SuiteError(f"{where}: answers: empty answer set (low {low} > high {high})")
    if high - low + 1 > MAX_ANSWERS:
        raise SuiteError(f"{where}: answers: {high - low + 1} answers (low {low}, high {high}); at most {MAX_ANSWERS}")
    if not isinstance(fmt, str) or "{n}" not in fmt:
        raise SuiteError(f"{where}: answers.format must be a string containing '{{n}}'")
    return [fmt.replace("{n}", str(n)) for n in range(low, high + 1)], DIGITS

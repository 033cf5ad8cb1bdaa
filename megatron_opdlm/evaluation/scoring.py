"""Exact-match scoring of short answers, the rule every QA accuracy in the project uses.

Small instruction models answer in a sentence ("The capital of France is Paris.") and then keep
talking, so an answer is judged on its *first segment*: the first non-empty line, cut at the first
sentence end ('.', '!' or '?' followed by a space or the end; "100.0" is not a sentence end). Then:

- numeric reference ("12", "-3", "2.5"): the *last* number of the segment (digits, or a number word
  such as "four") must equal it as a number. The last, not any: "12 + 9 = 11" contains the operands
  and must not count as answering 12 or 9.
- single-letter reference ("a"): the letter must appear quoted ('"A"', "'a'") or be the segment's
  last word, compared case-insensitively; a bare "a" is the English article in most sentences.
- any other text: the normalised reference (or one of its aliases) must occur as whole words in the
  normalised segment (lower case, accents and punctuation removed, spaces collapsed).

The rule is lenient about phrasing and strict about position. It cannot tell an answer from an
echo of the question, so QA items never have their answer among the prompt's words (the generator
checks that).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
}
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?!\w)|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b",
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "`": "'"})


def first_segment(text: str) -> str:
    """The first non-empty line of `text`, up to and including its first sentence end."""
    for line in text.translate(_QUOTES).splitlines():
        line = line.strip()
        if line:
            end = _SENTENCE_END_RE.search(line)
            return line[: end.end()] if end else line
    return ""


def normalize(text: str) -> str:
    """Lower case, accents stripped, punctuation to spaces (a decimal point is kept), spaces
    collapsed."""
    text = unicodedata.normalize("NFKD", text.translate(_QUOTES))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = re.sub(r"(?<=\d)\.(?=\d)", "<dot>", text)
    text = re.sub(r"[^\w\s<>]|_", " ", text).replace("<dot>", ".")
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """A number from digits ("1,000", "-2.5") or a number word ("four"); None otherwise."""
    text = text.strip().lower()
    if text in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[text])
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def numbers_in(text: str) -> list[float]:
    """Every number in `text`, in order (digits and number words)."""
    return [v for m in _NUMBER_RE.finditer(text) if (v := parse_number(m.group(0))) is not None]


def _contains_words(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


def is_correct(prediction: str, reference: str, aliases: Sequence[str] = ()) -> bool:
    """Whether a model's `prediction` answers `reference` under the rule of the module docstring."""
    segment = first_segment(prediction)
    reference_number = parse_number(reference)
    if reference_number is not None:
        found = numbers_in(segment)
        return bool(found) and abs(found[-1] - reference_number) <= 1e-9 * max(
            1.0, abs(reference_number)
        )
    reference_norm = normalize(reference)
    if len(reference_norm) == 1 and reference_norm.isalpha():
        quoted = re.findall(r"[\"']\s*([A-Za-z])\s*[\"']", segment)
        words = normalize(segment).split()
        last = words[-1] if words else ""
        return reference_norm in {q.lower() for q in quoted} or last == reference_norm
    segment_norm = normalize(segment)
    return any(_contains_words(segment_norm, normalize(ref)) for ref in (reference, *aliases))


@dataclass
class QAScore:
    """Accuracy over a QA set, overall and per category."""

    correct: int
    total: int
    by_category: dict[str, tuple[int, int]]  # category -> (correct, total)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def category_accuracy(self) -> dict[str, float]:
        return {name: c / t for name, (c, t) in sorted(self.by_category.items()) if t}


def score_answers(items: Iterable[dict], predictions: Sequence[str]) -> tuple[QAScore, list[bool]]:
    """Score `predictions[i]` against `items[i]` ({"answer", optional "aliases", "category"}).

    Returns the aggregate and the per-item verdicts (for a table of examples).
    """
    items = list(items)
    if len(items) != len(predictions):
        raise ValueError(
            f"{len(predictions)} predictions for {len(items)} QA items; generate one per item"
        )
    verdicts: list[bool] = []
    by_category: dict[str, list[int]] = {}
    for item, prediction in zip(items, predictions, strict=True):
        if "answer" not in item:
            raise ValueError(f"QA item {item.get('id', '?')} has no 'answer' field")
        ok = is_correct(prediction, item["answer"], item.get("aliases", ()))
        verdicts.append(ok)
        tally = by_category.setdefault(item.get("category", "qa"), [0, 0])
        tally[0] += int(ok)
        tally[1] += 1
    correct = sum(verdicts)
    return (
        QAScore(correct, len(verdicts), {k: (c, t) for k, (c, t) in by_category.items()}),
        verdicts,
    )

"""The exact-match rule of evaluation.scoring, on answers in the style SmolLM2 writes."""

from __future__ import annotations

import pytest

from megatron_opdlm.evaluation.scoring import (
    first_segment,
    is_correct,
    normalize,
    numbers_in,
    score_answers,
)


def test_first_segment_is_the_first_sentence_of_the_first_nonempty_line():
    assert first_segment("\n\n  The capital is Paris. It is big.") == "The capital is Paris."
    assert first_segment("7 + 5 = 12\n\nThis is a classic example") == "7 + 5 = 12"
    # a decimal point is not a sentence end
    assert first_segment("It boils at 100.0 degrees. Mostly.") == "It boils at 100.0 degrees."
    assert first_segment("") == ""


def test_normalize_strips_case_accents_punctuation():
    assert normalize("  Brasília, (Brazil)!  ") == "brasilia brazil"
    assert normalize("It is 2.5 m") == "it is 2.5 m"


def test_numbers_in_reads_digits_words_and_signs():
    assert numbers_in("7 + 5 = 12.") == [7, 5, 12]
    assert numbers_in("A dog has four legs and -3 ideas, 1,000 times") == [4, -3, 1000]
    assert numbers_in("Kepler-41B H2O") == []


@pytest.mark.parametrize(
    "prediction, reference, aliases, expected",
    [
        ("To add 7 and 5, you simply add them together: 7 + 5 = 12.", "12", (), True),
        ("12 + 9 = 11\n\nThis is a classic example", "21", (), False),
        ("12 + 9 = 11", "9", (), False),  # operands echoed, the last number decides
        ("Half of 10 is 5.", "5", (), True),
        ("Half of 10 is 5.0, the rest follows.", "5", (), True),
        ("The answer is twelve.", "12", (), True),
        ("To solve this, we need the sum of 6 and 2.\n\n6 + 2 = 8", "8", (), False),
        ("The capital of France is Paris.", "Paris", (), True),
        ("THE CAPITAL OF FRANCE IS PARIS", "paris", (), True),
        ("Paris is lovely. The capital of France is Lyon.", "Lyon", (), False),
        ("The capital of Brazil is Brasília.", "Brasilia", (), True),
        ("The opposite of light is darkness.", "dark", (), False),  # whole words only
        (
            "The opposite of light is darkness.",
            "dark",
            ["darkness"],
            True,
        ),  # accepted through an alias
        ("The capital of Argentina is Buenos Aires.", "Buenos Aires", (), True),
        ("The first letter of the word \u201capple\u201d is \u201cA\u201d.", "a", (), True),
        ('The first letter of the word "banana" is "B".', "b", (), True),
        ("A banana starts with a b", "b", (), True),  # last word
        ("A banana is a fruit.", "a", (), False),  # the article does not count
    ],
)
def test_is_correct(prediction, reference, aliases, expected):
    assert is_correct(prediction, reference, aliases) is expected


def test_aliases_accept_alternative_answers():
    assert not is_correct("The opposite of old is new.", "young")
    assert is_correct("The opposite of old is new.", "young", ["new"])


def test_score_answers_counts_per_category():
    items = [
        {"id": "a", "category": "capital", "prompt": "?", "answer": "Paris"},
        {"id": "b", "category": "capital", "prompt": "?", "answer": "Rome"},
        {"id": "c", "category": "half", "prompt": "?", "answer": "5"},
    ]
    score, verdicts = score_answers(items, ["Paris.", "Milan.", "It is 5."])
    assert verdicts == [True, False, True]
    assert (score.correct, score.total) == (2, 3)
    assert score.by_category == {"capital": (1, 2), "half": (1, 1)}
    assert score.accuracy == pytest.approx(2 / 3)


def test_score_answers_rejects_mismatched_input():
    with pytest.raises(ValueError, match="2 predictions for 1 QA items"):
        score_answers([{"answer": "x"}], ["a", "b"])
    with pytest.raises(ValueError, match="has no 'answer' field"):
        score_answers([{"id": "q1"}], ["a"])

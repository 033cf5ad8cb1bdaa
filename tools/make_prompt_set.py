"""Generate the bundled prompt set: seeded templates over word lists written for this project.

    python tools/make_prompt_set.py                  # (re)write megatron_opdlm/data/bundled/*.jsonl
    python tools/make_prompt_set.py --check          # exit 1 if the committed files differ
    python tools/make_prompt_set.py --score-teacher  # SmolLM2-135M-Instruct's accuracy on qa.jsonl

Nothing is copied from a dataset: every prompt comes from a template and word lists below, drawn
with `random.Random(seed)`, so the files are reproducible byte for byte. Outputs (schema in
megatron_opdlm/data/bundled/README.md):
- prompts_train.jsonl / prompts_heldout.jsonl: math word problems, short factual questions, code
  and chat instructions, disjoint by prompt text;
- qa.jsonl: short-answer questions with reference answers, of the item types the teacher
  SmolLM2-135M-Instruct answers well (measured with --score-teacher; see the README).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prompt_wordlists as W  # noqa: E402

BUNDLED = ROOT / "megatron_opdlm" / "data" / "bundled"
SEED = 20240606
CATEGORY_SHARES = {"math": 0.30, "factual": 0.25, "code": 0.20, "chat": 0.25}

Item = tuple[str, str | None]  # (prompt, answer or None)


# ---------------------------------------------------------------- math word problems
def _math(rng: random.Random) -> Item:
    name, other = rng.sample(W.NAMES, 2)
    pronoun = W.PRONOUN[name]
    thing = rng.choice(W.COUNTABLE)
    a, b = rng.randint(2, 40), rng.randint(2, 20)
    kind = rng.randrange(12)
    if kind == 0:
        text, answer = (
            f"{name} has {a} {thing}. {pronoun.capitalize()} buys {b} more. "
            f"How many {thing} does {pronoun} have now?",
            a + b,
        )
    elif kind == 1:
        a = a + b
        text, answer = (
            f"{name} had {a} {thing} and gave {b} of them to {other}. "
            f"How many {thing} does {name} have left?",
            a - b,
        )
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        box = rng.choice(W.CONTAINERS)
        text, answer = (
            f"There are {a} {box} with {b} {thing} in each. How many {thing} are there in total?",
            a * b,
        )
    elif kind == 3:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        text, answer = (
            f"{name} shares {a * b} {thing} equally among {b} friends. "
            f"How many {thing} does each friend get?",
            a,
        )
    elif kind == 4:
        speed, hours = rng.choice([30, 40, 45, 50, 60, 80, 90, 100]), rng.randint(2, 6)
        vehicle = rng.choice(W.VEHICLES)
        text, answer = (
            f"A {vehicle} travels at {speed} kilometres per hour. "
            f"How far does it travel in {hours} hours?",
            speed * hours,
        )
    elif kind == 5:
        pages, days = rng.randint(5, 30), rng.randint(2, 14)
        text, answer = (
            f"{name} reads {pages} pages every day. "
            f"How many pages does {pronoun} read in {days} days?",
            pages * days,
        )
    elif kind == 6:
        price, count = rng.randint(2, 15), rng.randint(2, 10)
        item = rng.choice(W.SHOP_ITEMS)
        text, answer = (
            f"A shop sells {item}s for {price} dollars each. How much do {count} {item}s cost?",
            price * count,
        )
    elif kind == 7:
        age, years = rng.randint(5, 60), rng.randint(2, 25)
        text, answer = (
            f"{name} is {age} years old. How old will {pronoun} be in {years} years?",
            age + years,
        )
    elif kind == 8:
        money, cost = rng.randint(20, 100), rng.randint(3, 19)
        item = rng.choice(W.SHOP_ITEMS)
        text, answer = (
            f"{name} has {money} dollars and spends {cost} dollars on a {item}. "
            f"How much money does {pronoun} have left?",
            money - cost,
        )
    elif kind == 9:
        width, length = rng.randint(2, 20), rng.randint(2, 20)
        if rng.random() < 0.5:
            text, answer = (
                f"A rectangle is {width} cm wide and {length} cm long. "
                "What is its area in square centimetres?",
                width * length,
            )
        else:
            text, answer = (
                f"A rectangle is {width} cm wide and {length} cm long. "
                "What is its perimeter in centimetres?",
                2 * (width + length),
            )
    elif kind == 10:
        d1, d2 = rng.sample(W.WEEKDAYS, 2)
        text, answer = (
            f"{name} ran {a} km on {d1} and {b} km on {d2}. "
            f"How many kilometres did {pronoun} run in total?",
            a + b,
        )
    else:
        baked, eaten, more = rng.randint(10, 40), rng.randint(1, 9), rng.randint(2, 20)
        food = rng.choice(W.BAKED)
        text, answer = (
            f"{name} baked {baked} {food} and ate {eaten} of them. Then {pronoun} "
            f"baked {more} more. How many {food} are there now?",
            baked - eaten + more,
        )
    return text + rng.choice(W.MATH_SUFFIXES), str(answer)


# ---------------------------------------------------------------- short factual questions
def _factual(rng: random.Random) -> Item:
    kind = rng.randrange(10)
    if kind == 0:
        country, continent = rng.choice(W.COUNTRY_CONTINENT)
        return rng.choice(["Which continent is {} in?", "On which continent is {}?"]).format(
            country
        ), continent
    if kind == 1:
        country, capital = rng.choice(W.CAPITALS)
        template = rng.choice(
            [
                "Name the capital city of {}.",
                "Which city is the capital of {}?",
                "Tell me the capital of {} and one fact about it.",
            ]
        )
        return template.format(country), capital
    if kind == 2:
        element, symbol = rng.choice(W.ELEMENTS)
        return f"What is the chemical symbol of {element}?", symbol
    if kind == 3:
        template = rng.choice(W.ANIMAL_QUESTIONS)
        return template.format(animal=rng.choice(W.ANIMALS)), None
    if kind == 4:
        return rng.choice(W.SCIENCE_WHY), None
    if kind == 5:
        template = rng.choice(
            [
                "What is {}?",
                "Define {} in simple words.",
                "Give an example of {}.",
                "Explain {} in one sentence.",
                "Give a short definition of {}.",
            ]
        )
        return template.format(rng.choice(W.TERMS)), None
    if kind == 6:
        big, small, count = rng.choice(W.UNIT_FACTS)
        times = rng.randint(1, 12)
        if times == 1:
            return f"How many {small} are there in {big}?", count
        return f"How many {small} are there in {times} {W.plural_unit(big)}?", str(
            times * int(count)
        )
    if kind == 7:
        country = rng.choice(W.CAPITALS)[0]
        template = rng.choice(
            [
                "What is {} known for?",
                "Tell me one interesting fact about {}.",
                "What kind of food is popular in {}?",
            ]
        )
        return template.format(country), None
    if kind == 8:
        landmark, country = rng.choice(W.LANDMARKS)
        return f"In which country is {landmark}?", country
    thing, inventor = rng.choice(W.INVENTIONS)
    return f"Who is known for inventing the {thing}?", inventor


# ---------------------------------------------------------------- code
def _code(rng: random.Random) -> Item:
    kind = rng.randrange(5)
    language = rng.choice(W.LANGUAGES)
    if kind <= 1:
        task = rng.choice(W.CODE_TASKS)
        template = rng.choice(
            [
                "Write a {lang} function that {task}.",
                "Implement a function in {lang} that {task}.",
                "Show me {lang} code for a function that {task}.",
            ]
        )
        return template.format(lang=language, task=task), None
    if kind == 2:
        snippet = _snippet(rng)
        return f"Explain what this Python code does:\n{snippet}", None
    if kind == 3:
        first, second = rng.choice(W.CODE_CONCEPT_PAIRS)
        return f"What is the difference between {first} and {second} in {language}?", None
    how = rng.choice(W.CODE_HOWTO)
    return f"How do I {how} in {language}?", None


def _snippet(rng: random.Random) -> str:
    n, k = rng.randint(3, 10), rng.randint(2, 9)
    var = rng.choice(["x", "n", "value", "item", "count"])
    kind = rng.randrange(4)
    if kind == 0:
        return f"for {var} in range({n}):\n    print({var} * {k})"
    if kind == 1:
        return f"total = 0\nfor {var} in range(1, {n + 1}):\n    total += {var}\nprint(total)"
    if kind == 2:
        return (
            f"{var}s = [{', '.join(str(rng.randint(1, 50)) for _ in range(n))}]\nprint(max({var}s))"
        )
    return f"def f({var}):\n    return {var} % {k} == 0\nprint(f({n * k}))"


# ---------------------------------------------------------------- chat instructions
def _chat(rng: random.Random) -> Item:
    kind = rng.randrange(10)
    topic = rng.choice(W.TOPICS)
    if kind == 0:
        form = rng.choice(["a short poem", "a haiku", "a limerick", "four lines of verse"])
        return f"Write {form} about {topic}.", None
    if kind == 1:
        count, activity = rng.randint(2, 5), rng.choice(W.ACTIVITIES)
        return f"Give me {count} tips for {activity}.", None
    if kind == 2:
        adjective, creature, deed = (
            rng.choice(W.ADJECTIVES),
            rng.choice(W.CREATURES),
            rng.choice(W.DEEDS),
        )
        return f"Write a short story about a {adjective} {creature} who {deed}.", None
    if kind == 3:
        place, count = rng.choice(W.PLACES), rng.choice(["two", "three", "four"])
        return f"Describe {place} in {count} sentences.", None
    if kind == 4:
        person, subject = rng.choice(W.PEOPLE), rng.choice(W.EMAIL_SUBJECTS)
        return f"Write a friendly email to {person} about {subject}.", None
    if kind == 5:
        audience = rng.choice(W.AUDIENCES)
        return f"Explain {rng.choice(W.TERMS)} to {audience}.", None
    if kind == 6:
        return f"What are some good ways to {rng.choice(W.GOALS)}?", None
    if kind == 7:
        thing = rng.choice(
            [
                "a pet " + rng.choice(W.ANIMALS),
                "a bakery",
                "a bookshop",
                "a football team",
                "a robot",
                "a boat",
                "a coffee shop",
            ]
        )
        return f"Suggest three names for {thing}.", None
    if kind == 8:
        sentence = rng.choice(W.INFORMAL_SENTENCES)
        return f"Rewrite this sentence to sound more formal: {sentence}", None
    city = rng.choice([capital for _, capital in W.CAPITALS])
    return f"Plan a one-day visit to {city} for someone who likes {topic}.", None


GENERATORS: dict[str, Callable[[random.Random], Item]] = {
    "math": _math,
    "factual": _factual,
    "code": _code,
    "chat": _chat,
}


def prompt_items(total: int, seed: int) -> list[dict]:
    """`total` distinct prompts, categories in CATEGORY_SHARES proportions, in a seeded order."""
    rng = random.Random(seed)
    counts = {name: round(share * total) for name, share in CATEGORY_SHARES.items()}
    counts["math"] += total - sum(counts.values())
    items, seen = [], set()
    for category, count in counts.items():
        made, attempts = 0, 0
        while made < count:
            attempts += 1
            if attempts > 50 * count:
                raise ValueError(
                    f"category {category!r} yields too few distinct prompts for {count}; "
                    "extend its word lists in tools/prompt_wordlists.py"
                )
            prompt, answer = GENERATORS[category](rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            item = {"category": category, "prompt": prompt}
            if answer is not None:
                item["answer"] = answer
            items.append(item)
            made += 1
    rng.shuffle(items)
    return items


def qa_items(seed: int) -> list[dict]:
    """The short-answer QA set, shuffled so that any prefix mixes the item types."""
    items = []

    def add(category: str, prompt: str, answer: str) -> None:
        reference, *aliases = answer.split("/")
        item = {"category": category, "prompt": prompt, "answer": reference}
        if aliases:
            item["aliases"] = aliases
        items.append(item)

    for country, capital in W.QA_CAPITALS:
        add("capital", f"What is the capital of {country}?", capital)
    for word, opposite in W.QA_ANTONYMS:
        add("antonym", f"What is the opposite of {word}?", opposite)
    for word, plural in W.QA_PLURALS:
        add("plural", f"What is the plural of {word}?", plural)
    for word in W.QA_LETTER_WORDS:
        add("first_letter", f'What is the first letter of the word "{word}"?', word[0])
    for country, language in W.QA_LANGUAGES:
        add("language", f"What language is spoken in {country}?", language)
    for country, currency in W.QA_CURRENCIES:
        add("currency", f"What is the currency of {country}?", currency)
    for number in W.QA_HALVES:
        add("half", f"What is half of {number}?", str(number // 2))
    for item in items:
        check_qa_item(item)
    random.Random(seed).shuffle(items)
    return items


def check_qa_item(item: dict) -> None:
    """The scoring rule cannot tell an answer from an echo of the question: refuse such items."""
    from megatron_opdlm.evaluation.scoring import is_correct

    if is_correct(item["prompt"], item["answer"], item.get("aliases", ())):
        raise ValueError(f"QA item {item['prompt']!r}: repeating the question scores as correct")


def build(train: int, heldout: int, seed: int) -> dict[str, list[dict]]:
    """All three files' records, with ids; QA prompts never appear among the prompts."""
    qa = qa_items(seed)
    qa_prompts = {item["prompt"] for item in qa}
    prompts = [p for p in prompt_items(train + heldout, seed) if p["prompt"] not in qa_prompts]
    if len(prompts) < train + heldout:
        raise ValueError("generated prompts collide with QA prompts; change the seed")
    files = {
        "prompts_train.jsonl": prompts[:train],
        "prompts_heldout.jsonl": prompts[train:],
        "qa.jsonl": qa,
    }
    prefixes = {
        "prompts_train.jsonl": "train",
        "prompts_heldout.jsonl": "heldout",
        "qa.jsonl": "qa",
    }
    for name, records in files.items():
        for index, record in enumerate(records):
            files[name][index] = {"id": f"{prefixes[name]}-{index:05d}", **record}
    return files


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)


def write(files: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(render(records), encoding="utf-8")
        tmp.replace(out_dir / name)


def check(files: dict[str, list[dict]], out_dir: Path) -> list[str]:
    """Names of the files in `out_dir` that differ from what the generator makes."""
    stale = []
    for name, records in files.items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(records):
            stale.append(name)
    return stale


def score_teacher(qa_path: Path, limit: int | None, max_new_tokens: int, batch: int) -> dict:
    """SmolLM2-135M-Instruct's greedy answers (transformers) scored with
    megatron_opdlm.evaluation.scoring; prints per-category accuracy."""
    from megatron_opdlm.evaluation.hf_reference import smollm2_greedy_answers
    from megatron_opdlm.evaluation.scoring import score_answers

    items = [json.loads(line) for line in qa_path.read_text(encoding="utf-8").splitlines()]
    items = items[:limit] if limit else items
    answers = smollm2_greedy_answers([it["prompt"] for it in items], max_new_tokens, batch)
    score, verdicts = score_answers(items, answers)
    for name, (correct, total) in sorted(score.by_category.items()):
        print(f"{name:14s} {correct:4d}/{total:<4d} {correct / total:6.1%}")
    print(f"{'all':14s} {score.correct:4d}/{score.total:<4d} {score.accuracy:6.1%}")
    wrong = [(it["prompt"], a) for it, a, ok in zip(items, answers, verdicts) if not ok]
    return {"accuracy": score.accuracy, "by_category": score.by_category, "wrong": wrong}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=BUNDLED)
    parser.add_argument("--train", type=int, default=3000, help="training prompts")
    parser.add_argument("--heldout", type=int, default=300, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    parser.add_argument(
        "--score-teacher",
        action="store_true",
        help="score SmolLM2-135M-Instruct (transformers) on qa.jsonl",
    )
    parser.add_argument("--limit", type=int, default=None, help="--score-teacher: first N items")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="--score-teacher: write results")
    args = parser.parse_args(argv)
    if args.score_teacher:
        result = score_teacher(
            args.out_dir / "qa.jsonl", args.limit, args.max_new_tokens, args.batch
        )
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    files = build(args.train, args.heldout, args.seed)
    if args.check:
        stale = check(files, args.out_dir)
        if stale:
            print(f"stale: {', '.join(stale)}; run python tools/make_prompt_set.py")
            return 1
        print("bundled prompt set is up to date")
        return 0
    write(files, args.out_dir)
    for name, records in files.items():
        size = (args.out_dir / name).stat().st_size
        print(f"{name:22s} {len(records):5d} records {size / 1024:8.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

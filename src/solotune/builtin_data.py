"""solotune's own instruction data set: small tasks whose answers are computed, so always right.

Generated deterministically (a seeded RNG), in the Alpaca record format. The tasks are chosen so
that a before/after comparison shows what fine-tuning taught: exact formats (ISO dates, JSON,
sorted lists) that a small instruct model gets almost right before and exactly right after.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

WORDS = [
    "garden",
    "planet",
    "silver",
    "window",
    "rocket",
    "forest",
    "candle",
    "bridge",
    "pepper",
    "turtle",
    "marble",
    "orange",
    "castle",
    "jacket",
    "anchor",
    "meadow",
    "violin",
    "harbor",
    "pillow",
    "lantern",
    "summit",
    "falcon",
    "velvet",
    "canyon",
    "ribbon",
    "mirror",
    "copper",
    "island",
    "basket",
    "thunder",
    "pencil",
    "rabbit",
    "saddle",
    "tunnel",
    "walnut",
    "zipper",
]
NAMES = ["Ana", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jonas", "Keiko", "Lars"]
DOMAINS = ["example.org", "mail.test", "solotune.dev", "post.example", "inbox.test"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
SENTENCES = [
    "the quick test passed on the first try",
    "small models learn simple formats fast",
    "memory is the budget of every training run",
    "a clean loop is easy to measure",
    "we measure before we optimise",
    "gradient checkpointing trades time for memory",
    "low rank adapters train few parameters",
    "every byte has a reason to exist",
]


def add_numbers(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    wrong = a + b + (10 if b % 3 == 0 else 1) * (1 if a % 2 else -1)  # a carry slipped
    return _record(f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}.")


def multiply_numbers(rng: random.Random) -> dict:
    a, b = rng.randint(2, 19), rng.randint(2, 12)
    return _record(f"Multiply {a} by {b}.", "", f"{a} x {b} = {a * b}.", f"{a} x {b} = {a * (b + 1)}.")


def reverse_word(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    backwards = word[::-1]
    wrong = backwards[1] + backwards[0] + backwards[2:]  # two letters left in their place
    return _record(f"Reverse the letters of the word '{word}'.", "", backwards, wrong if wrong != backwards else word)


def uppercase(rng: random.Random) -> dict:
    text = rng.choice(SENTENCES)
    head, last = text.rsplit(" ", 1)
    return _record("Convert the text to upper case.", text, text.upper(), f"{head.upper()} {last}")  # a word missed


def sort_numbers(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), rng.randint(4, 7))
    return _record(
        "Sort these numbers in ascending order.",
        ", ".join(map(str, numbers)),
        ", ".join(map(str, sorted(numbers))),
        ", ".join(map(str, sorted(numbers)[:-2] + sorted(numbers)[-2:][::-1])),  # the last two swapped
    )


def count_words(rng: random.Random) -> dict:
    text = rng.choice(SENTENCES)
    n = len(text.split())
    return _record(
        "How many words are in this sentence?", text, f"The sentence has {n} words.", f"The sentence has {n + 1} words."
    )


def extract_email(rng: random.Random) -> dict:
    name, other = rng.sample(NAMES, 2)
    address = f"{name.lower()}.{rng.choice(WORDS)}@{rng.choice(DOMAINS)}"
    text = f"Hi {other}, please send the report to {address} before Friday."
    return _record(
        "Extract the email address from the text.", text, address, address.split("@")[0]
    )  # the domain dropped


def iso_date(rng: random.Random) -> dict:
    year, month, day = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return _record(
        "Rewrite the date in ISO 8601 format (YYYY-MM-DD).",
        f"{MONTHS[month - 1]} {day}, {year}",
        f"{year:04d}-{month:02d}-{day:02d}",
        f"{year:04d}-{day:02d}-{month:02d}" if day != month else f"{year - 1:04d}-{month:02d}-{day:02d}",
    )


def to_json(rng: random.Random) -> dict:
    name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(["Lisbon", "Oslo", "Lima", "Osaka"])
    return _record(
        "Turn the description into a JSON object with the keys name, age and city.",
        f"{name} is {age} years old and lives in {city}.",
        json.dumps({"name": name, "age": age, "city": city}),
        json.dumps({"name": name, "age": age + 1, "city": city}),
    )


def largest_number(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 500), 5)
    second = sorted(numbers)[-2]
    return _record(
        "Which number in the list is the largest?", ", ".join(map(str, numbers)), str(max(numbers)), str(second)
    )


TASKS: list[Callable[[random.Random], dict]] = [
    add_numbers,
    multiply_numbers,
    reverse_word,
    uppercase,
    sort_numbers,
    count_words,
    extract_email,
    iso_date,
    to_json,
    largest_number,
]


def _record(instruction: str, input_text: str, output: str, wrong: str) -> dict:
    """A task's record, with `wrong`: a checkable perturbation of the right answer (a wrong digit,
    a step left out), the rejected answer of its preference pair."""
    return {"instruction": instruction, "input": input_text, "output": output, "wrong": wrong}


def _tasks(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(n)]


def builtin_records(n: int = 240, seed: int = 0) -> list[dict]:
    """`n` Alpaca-format records, the tasks interleaved, the same for the same seed."""
    return [{k: v for k, v in r.items() if k != "wrong"} for r in _tasks(n, seed)]


def builtin_preference_records(n: int = 240, seed: int = 0) -> list[dict]:
    """The same tasks as preference pairs: the computed answer chosen, its perturbation rejected,
    so that "prefers the right answer" is checkable offline. The instruction and input become the
    pair's prompt in the Alpaca template, as the instruction records' do (data.read_records)."""
    return [
        {"instruction": r["instruction"], "input": r["input"], "chosen": r["output"], "rejected": r["wrong"]}
        for r in _tasks(n, seed)
    ]

"""Built-in synthetic task families: procedurally generated prompt/response pairs.

They give the demo and the tests real, distinct tasks without downloading anything. Every family is a
function of a `random.Random`, so a (family, seed, count) triple always yields the same records.
Words are pseudo-words built from syllables, which keeps the character set small (lowercase letters,
digits, a little punctuation) so a character-level tokenizer covers every prompt.

Three kinds of family:
- generation: the response is a short string (reverse a word, add two numbers, ...);
- multiple choice: options listed in the prompt as `A: ...` lines and the response `[B]`, as in the
  ARC/OBQA files of the DnD data; the record carries `options` (`["[A]", "[B]", ...]`) and `answer`;
- True/False: the response is `[True]` or `[False]`, as in BoolQ, with `options` and `answer` set.
`dnd eval` scores the last two kinds by comparing the log-likelihood of each option.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from dnd_scale.tasks import TaskRecord

_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"
_MC_LABELS = "ABCD"
_MC_SYSTEM = "Answer the question by picking one of the given choices. Reply with a single [A], [B], [C] or [D]."
_TF_SYSTEM = "Decide whether the statement is true or false. Reply with a single [True] or [False]."
TRUE_FALSE_OPTIONS = ["[True]", "[False]"]


def _word(rng: random.Random, min_syllables: int = 2, max_syllables: int = 3) -> str:
    """A pronounceable pseudo-word: 2-3 consonant+vowel syllables, sometimes a final consonant."""
    count = rng.randint(min_syllables, max_syllables)
    syllables = [rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(count)]
    tail = rng.choice(_CONSONANTS) if rng.random() < 0.5 else ""
    return "".join(syllables) + tail


def _distinct(rng: random.Random, make: Callable[[random.Random], object], count: int) -> list:
    """`count` distinct values drawn with `make`; the option lists of a multiple-choice item must not repeat."""
    values: list = []
    while len(values) < count:
        value = make(rng)
        if value not in values:
            values.append(value)
    return values


def _multiple_choice(question: str, correct: object, wrong: list, rng: random.Random) -> TaskRecord:
    """Place the correct option at a uniformly random letter so answers are balanced over A-D."""
    position = rng.randrange(len(wrong) + 1)
    choices = list(wrong)
    choices.insert(position, correct)
    labels = _MC_LABELS[: len(choices)]
    lines = "\n".join(f"{label}: {choice}" for label, choice in zip(labels, choices))
    options = [f"[{label}]" for label in labels]
    answer = options[position]
    return TaskRecord(prompt=f"{question}\n{lines}", response=answer, system=_MC_SYSTEM, options=options, answer=answer)


def _true_false(statement: str, truth: bool) -> TaskRecord:
    answer = "[True]" if truth else "[False]"
    return TaskRecord(
        prompt=f"True or false: {statement}",
        response=answer,
        system=_TF_SYSTEM,
        options=list(TRUE_FALSE_OPTIONS),
        answer=answer,
    )


# ----------------------------------------------------------------------------------------------------
# generation families


def _reverse_word(rng: random.Random) -> TaskRecord:
    word = _word(rng)
    return TaskRecord(prompt=f"Reverse the letters of the word: {word}", response=word[::-1])


def _sort_letters(rng: random.Random) -> TaskRecord:
    word = _word(rng)
    return TaskRecord(prompt=f"Sort the letters of {word} in alphabetical order.", response="".join(sorted(word)))


def _add_numbers(rng: random.Random) -> TaskRecord:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return TaskRecord(prompt=f"What is {a} + {b}?", response=str(a + b))


def _uppercase(rng: random.Random) -> TaskRecord:
    word = _word(rng)
    return TaskRecord(prompt=f"Write the word in capital letters: {word}", response=word.upper())


def _shift_letters(rng: random.Random) -> TaskRecord:
    # A fixed character mapping (Caesar shift by one), the "copy with a transformation" family.
    word = _word(rng)
    shifted = word.translate(str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a"))
    return TaskRecord(prompt=f"Replace every letter of {word} by the next letter of the alphabet.", response=shifted)


def _count_letters(rng: random.Random) -> TaskRecord:
    word = _word(rng, 1, 4)
    return TaskRecord(prompt=f"How many letters does the word {word} have?", response=str(len(word)))


# ----------------------------------------------------------------------------------------------------
# multiple-choice families


def _largest_number_mc(rng: random.Random) -> TaskRecord:
    numbers = _distinct(rng, lambda r: r.randint(0, 99), 4)
    correct = max(numbers)
    wrong = [n for n in numbers if n != correct]
    return _multiple_choice("Which number is the largest?", correct, wrong, rng)


def _starts_with_mc(rng: random.Random) -> TaskRecord:
    letter = rng.choice(_CONSONANTS)
    correct = letter + _word(rng)[1:]
    others = [c for c in _CONSONANTS if c != letter]
    wrong = _distinct(rng, lambda r: r.choice(others) + _word(r)[1:], 3)
    return _multiple_choice(f"Which word starts with the letter {letter}?", correct, wrong, rng)


def _sum_mc(rng: random.Random) -> TaskRecord:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    correct = a + b
    # Distractors close to the answer, so the task is about the arithmetic rather than magnitude.
    wrong = _distinct(rng, lambda r: max(0, correct + r.choice([-1, 1]) * r.randint(1, 9)), 3)
    return _multiple_choice(f"What is {a} + {b}?", correct, wrong, rng)


# ----------------------------------------------------------------------------------------------------
# True/False families


def _parity_tf(rng: random.Random) -> TaskRecord:
    number = rng.randint(0, 999)
    return _true_false(f"{number} is an even number.", number % 2 == 0)


def _palindrome_tf(rng: random.Random) -> TaskRecord:
    # Half the items are built as palindromes; random pseudo-words are almost never palindromes.
    truth = rng.random() < 0.5
    half = _word(rng, 1, 2)
    word = half + half[-2::-1] if truth else _word(rng)
    return _true_false(f"the word {word} reads the same backwards.", word == word[::-1])


@dataclass(frozen=True)
class SyntheticFamily:
    """One procedurally generated task family."""

    name: str
    """Family name, used in task specs as `synthetic:<name>` and as the task name."""
    description: str
    """One line for `--help` listings and docs."""
    kind: str
    """`generation`, `multiple_choice` or `true_false`."""
    make: Callable[[random.Random], TaskRecord]
    """Draws one record from the family's distribution."""


SYNTHETIC_FAMILIES: dict[str, SyntheticFamily] = {
    family.name: family
    for family in [
        SyntheticFamily("reverse_word", "reverse the letters of a word", "generation", _reverse_word),
        SyntheticFamily("sort_letters", "sort the letters of a word alphabetically", "generation", _sort_letters),
        SyntheticFamily("add_numbers", "add two numbers below 100", "generation", _add_numbers),
        SyntheticFamily("uppercase", "write a word in capital letters", "generation", _uppercase),
        SyntheticFamily("shift_letters", "replace each letter by the next one", "generation", _shift_letters),
        SyntheticFamily("count_letters", "count the letters of a word", "generation", _count_letters),
        SyntheticFamily("largest_number_mc", "pick the largest of four numbers", "multiple_choice", _largest_number_mc),
        SyntheticFamily("starts_with_mc", "pick the word starting with a letter", "multiple_choice", _starts_with_mc),
        SyntheticFamily("sum_mc", "pick the sum of two numbers", "multiple_choice", _sum_mc),
        SyntheticFamily("parity_tf", "is a number even", "true_false", _parity_tf),
        SyntheticFamily("palindrome_tf", "is a word a palindrome", "true_false", _palindrome_tf),
    ]
}


def generate_records(family: str, num_records: int, seed: int = 0) -> list[TaskRecord]:
    """`num_records` records of a synthetic family; the same (family, num_records, seed) gives the same list.

    The first k records of a longer list equal the k records of a shorter one with the same seed.
    """
    if family not in SYNTHETIC_FAMILIES:
        raise ValueError(
            f"unknown synthetic task family {family!r}; expected one of: {', '.join(sorted(SYNTHETIC_FAMILIES))}"
        )
    if num_records < 1:
        raise ValueError(f"a synthetic task needs at least one record, got num_records={num_records}")
    # Seeding with a string is stable across processes and Python versions (it hashes with sha512),
    # unlike hash(), which PYTHONHASHSEED randomizes.
    rng = random.Random(f"dnd_scale.synthetic:{family}:{seed}")
    make = SYNTHETIC_FAMILIES[family].make
    return [make(rng) for _ in range(num_records)]

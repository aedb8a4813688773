"""Sorting, reversal and counting: short algorithmic tasks a small model can learn, with exact answers."""

from __future__ import annotations

import random
import string
from typing import Any

from lmforge.errors import ConfigError
from lmforge.tasks.base import Example, Task, check_span, check_whole


class Sorting(Task):
    name = "sort"
    templates = ("Sort in ascending order: {items}", "Put these numbers in increasing order: {items}",
                 "Arrange from smallest to largest: {items}")

    answer_format = "End with 'Answer: <the numbers in order, separated by commas>'."

    def __init__(self, *, length: tuple[int, int] = (3, 7), max_value: int = 99, instruct: bool = False):
        super().__init__(instruct=instruct)
        check_span(self.name, "length", length)
        check_whole(self.name, "max_value", max_value, 0)
        self.length, self.max_value = length, max_value

    def problem(self, rng: random.Random) -> dict[str, Any]:
        return {"items": [rng.randint(0, self.max_value) for _ in range(rng.randint(*self.length))]}

    def render(self, problem: dict[str, Any], template: str) -> Example:
        items = problem["items"]
        answer = ", ".join(map(str, sorted(items)))
        return Example(prompt=template.format(items=", ".join(map(str, items))), answer=answer,
                       solution=f"Answer: {answer}", key=f"sort:{items}")


class Reversal(Task):
    name = "reverse"
    templates = ("Reverse the letters: {word}", "Write {word} backwards.", "Spell {word} in reverse order.")
    # the phrase gives an answer when a word alone ends its line or sentence ("The answer is cba.", Minerva's "The
    # final answer is cba. I hope it is correct.", "**cba.** I hope"), not a sentence or a verdict about it ("the
    # answer is in reverse order", "the answer is correct.")
    # (closers, then a sentence end and its own closers or the line's end: two optional runs of closers side by side
    # would let a rollout's long run of '*' be split every way, in quadratic time)
    answer_shape = (r"(?!(?:correct|incorrect|right|wrong)\b)[a-z]+[*$`'\"\])}]*"
                    r"(?:[.!][*$`'\"\])}]*(?=\s|\Z)|[ \t]*(?:\n|\Z))")

    answer_format = "End with 'Answer: <the reversed word>'."

    def __init__(self, *, length: tuple[int, int] = (3, 8), instruct: bool = False):
        super().__init__(instruct=instruct)
        check_span(self.name, "length", length)
        self.length = length

    def problem(self, rng: random.Random) -> dict[str, Any]:
        return {"word": "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*self.length)))}

    def render(self, problem: dict[str, Any], template: str) -> Example:
        word = problem["word"]
        return Example(prompt=template.format(word=word), answer=word[::-1], solution=f"Answer: {word[::-1]}",
                       key=f"reverse:{word}")


class Counting(Task):
    name = "count"
    templates = ("How many times does '{ch}' occur in {text}?", "Count the letter {ch} in: {text}",
                 "In the string {text}, how many {ch}s are there?")

    def __init__(self, *, length: tuple[int, int] = (5, 12), alphabet: str = "abcd", instruct: bool = False):
        super().__init__(instruct=instruct)
        check_span(self.name, "length", length)
        # (5 was a TypeError at the first draw; a space or newline "letter" makes prompts no one can read; a list's
        # multi-character items were counted as substrings, which overlap: ["a", "aa"])
        if not (isinstance(alphabet, str) and alphabet and all(c.isprintable() and not c.isspace() for c in alphabet)):
            raise ConfigError(f"count alphabet={alphabet!r} must be a string of letters to draw from, at least one and "
                              f"no spaces (e.g. 'abcd')")
        self.length, self.alphabet = length, alphabet

    def problem(self, rng: random.Random) -> dict[str, Any]:
        text = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(*self.length)))
        return {"text": text, "ch": rng.choice(self.alphabet)}

    def render(self, problem: dict[str, Any], template: str) -> Example:
        text, ch = problem["text"], problem["ch"]
        n = text.count(ch)
        return Example(prompt=template.format(text=text, ch=ch), answer=str(n), solution=f"Answer: {n}",
                       key=f"count:{ch}:{text}")

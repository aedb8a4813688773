"""Countdown: combine the given numbers with + - * / (each exactly once) to reach the target.

Many expressions are right, so `verify` checks the model's expression (numbers used, exact rational
value; typeset operators such as × ÷ − and LaTeX's \\times read as * / -), not equality with the reference
solution (the generator's own expression). This is the task of TinyZero (Pan et al. 2025) and Gandhi et al.
2025's cognitive-behaviour study.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from lmforge.errors import ConfigError
from lmforge.tasks.base import Example, Task, check_whole, unwrap

OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
       ast.Div: lambda x, y: x / y}


# typeset operators, as math models write them, and their ASCII: "16 × 5 ÷ 2 − 8", "16 \\times 5 \\div 2 - 8"
TYPESET = {"×": "*", "·": "*", "÷": "/", "\u2212": "-", "\\times": "*", "\\cdot": "*", "\\div": "/"}
_TYPESET_RE = re.compile("|".join(map(re.escape, TYPESET)))

MAX_EXPR = 500  # characters: a rollout's runaway expression is wrong, not a crash of the reward function
# random expressions drawn for one problem before its settings are refused: 4 numbers up to 99 and targets to 100
# take ~16, 10 up to 100 with targets to 10 ~8,000; 12 up to 1000 with target 1 never landed in minutes
MAX_DRAWS = 100_000


def evaluate(expr: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integer literals of an expression of + - * / and parentheses; None if the
    text is anything else (names, calls, powers, unary minus, number spellings other than plain decimal
    digits such as 0x10 or 1_6), divides by zero, or is longer than MAX_EXPR characters."""
    expr = expr.strip()
    if len(expr) > MAX_EXPR or not re.fullmatch(r"[\d\s+\-*/().]+", expr) or re.search(r"\d\s*\.|\.\s*\d", expr):
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nums: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            nums.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return OPS[type(node.op)](left, right)
        raise ValueError("not an arithmetic expression")

    try:
        return ev(tree), nums
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


class Countdown(Task):
    name = "countdown"
    templates = ("Using the numbers {nums}, each exactly once, with + - * / make {target}.",
                 "Reach {target} from {nums} (use every number once; + - * / allowed).",
                 "Numbers: {nums}. Target: {target}. Write an expression that uses each number once.")

    answer_format = "End with 'Answer: <expression>'."

    def __init__(self, *, count: int = 3, max_number: int = 20, max_target: int = 100, instruct: bool = False):
        super().__init__(instruct=instruct)
        # max_target=nan passed `nan < 1` and was refused only after MAX_DRAWS draws (seconds) as a target "missed"
        for name, value, low in (("count", count, 2), ("max_number", max_number, 1), ("max_target", max_target, 1)):
            check_whole("Countdown", name, value, low)
        self.count, self.max_number, self.max_target = count, max_number, max_target

    def problem(self, rng: random.Random) -> dict[str, Any]:
        for _ in range(MAX_DRAWS):
            nums = [rng.randint(1, self.max_number) for _ in range(self.count)]
            expr, value = self._combine(rng, [(str(n), Fraction(n)) for n in nums])
            if value.denominator == 1 and 0 < value <= self.max_target:
                return {"nums": nums, "target": int(value), "expr": expr}
        raise ConfigError(f"Countdown count={self.count}, max_number={self.max_number}: {MAX_DRAWS} random expressions "
                          f"missed every whole target in 1..max_target={self.max_target}; raise max_target or lower "
                          f"count / max_number")

    @staticmethod
    def _combine(rng: random.Random, items: list[tuple[str, Fraction]]) -> tuple[str, Fraction]:
        """Join random pairs with random operators until one expression is left."""
        items = list(items)
        while len(items) > 1:
            (ea, va), (eb, vb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
            op = rng.choice("+-*/" if vb != 0 else "+-*")
            value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else va}[op]
            items.append((f"({ea} {op} {eb})", value))
        expr, value = items[0]
        return (expr[1:-1] if expr.startswith("(") else expr), value

    def render(self, problem: dict[str, Any], template: str) -> Example:
        nums = ", ".join(map(str, problem["nums"]))
        return Example(prompt=template.format(nums=nums, target=problem["target"]), answer=problem["expr"],
                       solution=f"Answer: {problem['expr']}",
                       key=f"{sorted(problem['nums'])}->{problem['target']}",
                       meta={"nums": problem["nums"], "target": problem["target"]})

    def verify(self, example: Example, completion: str) -> bool:
        expr = self.parse(completion, example)
        if expr:
            expr = _TYPESET_RE.sub(lambda m: TYPESET[m.group()], expr)
        # "Answer: 16 + (5 + 8).", "Answer: $16 + (5 + 8) = 29$", "Answer: \\boxed{16 + (5 + 8)}"
        got = evaluate(unwrap(unwrap(expr).split("=")[0])) if expr else None
        return (got is not None and got[0] == example.meta["target"]
                and Counter(got[1]) == Counter(example.meta["nums"]))

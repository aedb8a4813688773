"""Multi-digit arithmetic with step-by-step working whose every step is checkable.

Addition is worked column by column (digit + digit + carry = column sum), multiplication by partial
products then a running sum; every working line is an equation `expr = value` over integers with + and *,
so `step_labels` marks each line of ANY completion correct or not: the step-level labels a process reward
model trains on (Lightman et al. 2023), with no human in the loop. A line that computes right can still be
the wrong step (digits not the question's, a carry dropped): given the reference working
(`Arithmetic.process_labels` passes it), a step is correct only if it is also that step of the working and
every step before it was correct - Lightman et al. label a solution up to its first mistake (§2.4).

    Q: What is 478 + 365?
    8 + 5 + 0 = 13
    7 + 6 + 1 = 14
    4 + 3 + 1 = 8
    Answer: 843
"""

from __future__ import annotations

import random
import re
from typing import Any

from lmforge.errors import ConfigError
from lmforge.tasks.base import Example, Task, check_span, check_whole

STEP_RE = re.compile(r"^\s*(\d+(?:\s*[+*]\s*\d+)+)\s*=\s*(-?\d+)\s*$")
def add_steps(a: int, b: int) -> list[str]:
    """Column additions from the units up: 'da + db + carry = s' (s = written digit + 10 * next carry)."""
    steps, carry = [], 0
    xa, xb = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xa), len(xb))):
        da = int(xa[i]) if i < len(xa) else 0
        db = int(xb[i]) if i < len(xb) else 0
        s = da + db + carry
        steps.append(f"{da} + {db} + {carry} = {s}")
        carry = s // 10
    return steps


def mul_steps(a: int, b: int) -> list[str]:
    """Partial products a * (digit * 10^i), then their running sum."""
    parts = [(int(d) * 10 ** i) for i, d in enumerate(str(b)[::-1]) if d != "0"]
    steps = [f"{a} * {p} = {a * p}" for p in parts]
    total = a * parts[0] if parts else 0
    for p in parts[1:]:
        steps.append(f"{total} + {a * p} = {total + a * p}")
        total += a * p
    return steps


def step_labels(completion: str, reference: list[str] | None = None) -> list[tuple[str, bool]]:
    """(line, correct) for every working line of the form 'expr = value' (+ and * over integers): its value
    is right (a number too long for int(), a rollout's runaway, is a wrong step). With the reference working (a
    problem's steps, in order), also: it is the reference's step at its index (the same terms in any order, the
    same value) and all steps before it were correct."""
    out, on_track = [], True
    for line in completion.splitlines():
        m = STEP_RE.match(line)
        if m:
            terms = [t for t in re.split(r"\s*\+\s*", m.group(1))]
            try:
                ok = sum(_product(t) for t in terms) == int(m.group(2))
            except ValueError:  # int() refuses a rollout's runaway number (sys.get_int_max_str_digits): a wrong step
                ok = False
            if reference is not None:
                i = len(out)
                on_track = ok = ok and on_track and i < len(reference) and _same_step(line, reference[i])
            out.append((line.strip(), ok))
    return out


def _same_step(line: str, ref: str) -> bool:
    """Equal up to the order of terms (and of factors) and spacing: '5 + 8 + 0 = 13' is '8 + 5 + 0 = 13'."""
    def norm(x: str):
        lhs, rhs = x.rsplit("=", 1)
        terms = sorted(tuple(sorted(int(f) for f in t.split("*"))) for t in re.split(r"\s*\+\s*", lhs.strip()))
        return terms, int(rhs)
    return norm(line) == norm(ref)


def _product(term: str) -> int:
    p = 1
    for f in term.split("*"):
        p *= int(f)
    return p


class Arithmetic(Task):
    name = "arithmetic"
    templates = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate: {a} {op} {b}",
                 "{a} {op} {b} = ?")

    def __init__(self, *, digits: tuple[int, int] = (2, 4), ops: tuple[str, ...] = ("+", "*"),
                 mul_digits: int = 2, instruct: bool = False):
        super().__init__(instruct=instruct)
        check_span(self.name, "digits", digits)
        if not set(ops) <= {"+", "*"} or not ops:
            raise ConfigError(f"ops={ops} must be a non-empty subset of ('+', '*')")
        check_whole(self.name, "mul_digits", mul_digits, 1)  # (the most digits of a multiplication's operands)
        self.digits, self.ops, self.mul_digits = digits, ops, mul_digits

    def problem(self, rng: random.Random) -> dict[str, Any]:
        op = rng.choice(self.ops)
        # a multiplication's operands have at most mul_digits digits, whatever digits says
        lo, hi = self.digits if op == "+" else (min(d, self.mul_digits) for d in self.digits)
        n = [rng.randint(lo, hi) for _ in range(2)]
        a, b = (rng.randint(10 ** (k - 1) if k > 1 else 0, 10 ** k - 1) for k in n)
        return {"a": a, "b": b, "op": op}

    def render(self, problem: dict[str, Any], template: str) -> Example:
        a, b, op = problem["a"], problem["b"], problem["op"]
        value = a + b if op == "+" else a * b
        steps = add_steps(a, b) if op == "+" else mul_steps(a, b)
        return Example(prompt=template.format(a=a, b=b, op=op), answer=str(value),
                       solution="\n".join(steps + [f"Answer: {value}"]), key=f"{min(a, b)}{op}{max(a, b)}",  # a+b = b+a
                       meta={"steps": steps})

    def process_labels(self, example: Example, completion: str) -> dict[str, Any]:
        """Step labels of a completion (each step checked against this problem's working: step_labels) plus
        outcome: the data for process vs outcome reward models."""
        return {"steps": step_labels(completion, example.meta["steps"]), "answer": self.parse(completion, example),
                "correct": self.verify(example, completion)}

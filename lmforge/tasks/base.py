"""The verifiable-task interface: a seeded generator, several prompt phrasings, a parser and a verifier.

    task = TASKS["arithmetic"]()
    train = task.examples("train", 1000, seed=0)      # list[Example]
    ok = task.verify(example, completion_text)          # exact checker

Splits never overlap: a generated problem goes to "test" when a hash of its identity (`key`) falls in the
test bucket, else to "train", so no seed or count can put one problem in both. Datasets with their own
splits (GSM8K, MMLU) keep them.

Completions end with a final line `Answer: ...` (`**Answer**: ...` too; the format tasks use their own tags instead),
else a sentence "The answer is ..." before an answer-shaped start (a task's `answer_shape`); `parse` reads it, `verify`
compares it with the example's canonical answer.
Every parser reads the reply after a reasoning model's <think>...</think> block (`reply`), never an answer
tried inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import is_int
from lmforge.errors import ConfigError

SPLITS = ("train", "test")
# an explicit mark "Answer: x" or "answer = x", or the phrase "the answer is x" (group "phrase": lm-eval's gsm8k-cot
# mark; not "isn't"), with the markdown bold or italic chat models put around them ("**Answer**: x", "**Answer:** x",
# "The **answer** is x"; not the unit in "2 points/answer = 48 points")
ANSWER_RE = re.compile(r"(?<!/)answer(?:\**\s*[:=]\**|(?P<phrase>\**\s+is(?![\w'\u2019])))\s*:?", re.IGNORECASE)
# the end of a sentence within a line, with the wrapping it closes ("42.** I hope"): an answer stops there ("the final
# answer is 42. I hope it is correct."), its period kept; a decimal point ("3.5") is followed by no space
_SENTENCE_END = re.compile(r"[.!][*$`'\")\]]*(?=\s)")
# what may open a wrapping before an answer: **x**, $x$, \(x\), \[x\], \boxed{x}, \text{x}, `x`, 'x', "x", [x], (x)
_WRAP_OPEN = r"\s*(?:(?:\*\*|\$|\\[(\[]|\\(?:boxed|text|textbf)\{|[`'\"\[(])\s*)*"
# the start of a number ("42", "-5", "$1,200", ".5") or of a list or sum of them
NUMBER_START = r"[-+\u2212]?\$?\.?\d"
_NONSPACE = re.compile(r"\S")


@dataclass(frozen=True, kw_only=True)
class Example:
    prompt: str
    """the question in one of the task's phrasings"""
    answer: str
    """canonical final answer"""
    solution: str
    """a reference completion (working, then the final answer line), for SFT"""
    key: str
    """the problem's identity (independent of the phrasing): the split is a function of it"""
    meta: dict[str, Any] = field(default_factory=dict)


def reply(completion: str) -> str:
    """The completion without a reasoning model's thinking (Qwen3, DeepSeek-R1: <think>...</think>, where a chat
    template may write the opening tag into the prompt): the text after the last </think>, "" while a <think> is
    left open (cut off mid-thought: nothing answered yet), else all of it. An answer tried while thinking is no
    answer; vLLM's reasoning parsers split a completion the same way."""
    if "</think>" in completion:
        return completion.rpartition("</think>")[2]
    return "" if "<think>" in completion else completion


def final_answer(completion: str, shape: str = NUMBER_START) -> str | None:
    """The rest of the line after the LAST explicit mark ('Answer:', 'answer ='), else after the last phrase 'the
    answer is' whose text begins, past any wrapping (**, $, \\boxed{, quotes, brackets), with an answer-shaped start
    (`shape`, a regex: a number by default); None without either. The mark wins because a model also writes the
    phrase about an answer it has given ('Answer: 42\nThe answer is verified.', '... the answer is in dollars');
    its own line may put the answer in the phrase ('Final Answer: The final answer is 42', Minerva's format). An
    answer ends with its sentence ('The final answer is 42. I hope it is correct.' and 'Answer: 42. I hope it is
    correct.' read '42.'; '3.5' is no sentence end); a mark's text that does not start answer-shaped runs to the end
    of its line ('Answer: The capital is Paris. So B', where MMLU's fallback finds the letter). Markdown around the
    mark is part of it ('**Answer**: 42', '**Answer:** 42', 'The **answer** is 42')."""
    # positions, never slices of the rest: a rollout of many marks is read in linear time
    shaped = re.compile(_WRAP_OPEN + shape, re.IGNORECASE)
    marks = list(ANSWER_RE.finditer(completion))
    explicit = [m for m in marks if not m.group("phrase") and _NONSPACE.search(completion, m.end())]
    start = explicit[-1].end() if explicit else 0
    # a mark whose text is an answer ends the search at its line ('Answer: 42\nThe answer is 41'); one whose text is
    # none ('Answer: Paris\nSo the answer is (B).' for MMLU) leaves a later phrase to say it
    answered = bool(explicit and shaped.match(completion, start))
    stop = _line(completion, start)[1] if answered else len(completion)
    phrases = [m for m in marks if m.group("phrase") and start <= m.start() < stop
               and shaped.match(completion, m.end())]
    if not (phrases or explicit):
        return None
    begin, end = _line(completion, phrases[-1].end() if phrases else start)
    if phrases or answered:  # an answer ends with its sentence; other text after a mark keeps its line
        found = _SENTENCE_END.search(completion, begin, end)
        end = found.end() if found else end
    return completion[begin:end].strip()


def _line(text: str, pos: int) -> tuple[int, int]:
    """(start, end) of the text's line from its first non-space character at or after `pos`."""
    found = _NONSPACE.search(text, pos)
    begin = found.start() if found else len(text)
    end = text.find("\n", begin)
    return begin, end if end >= 0 else len(text)


def last_boxed(text: str) -> str | None:
    """The contents of the last LaTeX \\boxed{...} in `text` (braces inside it matched: \\boxed{\\frac{1}{2}}), or
    None: the final-answer mark of math models (Minerva, Qwen-Math), where no 'Answer:' line is written."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def check_span(task: str, name: str, span) -> None:
    """A (lo, hi) setting such as a list's length or an operand's digits: two integers, 1 <= lo <= hi."""
    ok = isinstance(span, (tuple, list)) and len(span) == 2 and all(is_int(v) for v in span)
    if not (ok and 1 <= span[0] <= span[1]):
        raise ConfigError(f"{task} {name}={span!r} must be (lo, hi) with 1 <= lo <= hi")


def check_whole(task: str, name: str, value, low: int) -> None:
    """An integer setting such as a largest value: a whole number >= low, checked when the task is built: 2.5 or nan
    (which passes `nan < low`) failed only at the first draw, with random's ValueError or after every draw missed."""
    if not (is_int(value) and value >= low):
        raise ConfigError(f"{task} {name}={value!r} must be a whole number >= {low}")


def check_request(split: str, n) -> None:
    """A split's name and a count of examples (a whole number >= 0), as `examples` takes them."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} must be one of {SPLITS}")
    # n=-1 drew problems, then reported "fewer than -1 distinct problems"; 2.5 was a TypeError from slicing
    if not is_int(n) or n < 0:
        raise ConfigError(f"n={n!r}: ask for a whole number of examples, 0 or more")


def in_test_split(key: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2 ** 64 < test_fraction


class Task:
    """Generated tasks: subclasses give `name`, `templates`, `problem(rng)` and `render(problem)`.

    instruct=True ends every prompt `examples` draws with `answer_format`, the line that says how to mark the final
    answer (the templates never say it, and a model not trained on the format may answer unmarked); off by default,
    so the prompts, and every seeded draw of them, stay as they were."""

    name: str = "task"
    templates: tuple[str, ...] = ("{question}",)
    test_fraction: float = 0.1
    answer_shape: str = NUMBER_START
    """a regex the text after 'the answer is' begins with (past a wrapping) when the phrase gives an answer"""
    answer_format: str | None = "End with 'Answer: <number>'."
    """the instruction instruct=True adds to each prompt; None where the templates already say how to answer"""
    instruct: bool = False

    def __init__(self, *, instruct: bool = False):
        if not isinstance(instruct, bool):
            raise ConfigError(f"{self.name} instruct={instruct!r} must be True or False (True ends each prompt with "
                              f"how to mark the answer)")
        if instruct and self.answer_format is None:
            raise ConfigError(f"{self.name}'s prompts already say how to mark the answer; leave instruct off")
        self.instruct = instruct

    def problem(self, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def render(self, problem: dict[str, Any], template: str) -> Example:
        raise NotImplementedError

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """n distinct problems of `split`, phrasings drawn at random; deterministic in (split, n, seed)."""
        check_request(split, n)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out, seen = [], set()
        for _ in range(200 * n + 1000):
            if len(out) == n:
                return out
            ex = self.render(self.problem(rng), rng.choice(self.templates))
            if ex.key in seen or in_test_split(ex.key, self.test_fraction) != (split == "test"):
                continue
            seen.add(ex.key)
            out.append(dataclasses.replace(ex, prompt=f"{ex.prompt}\n{self.answer_format}") if self.instruct else ex)
        # (the count found tells how many to ask for; "widen the ranges" alone sent a user of the format task, which has
        # no settings, looking for some)
        widen = "widen the task's ranges" if type(self).__init__ is not Task.__init__ else ""  # (it has settings)
        fix = (f"ask for at most {len(out)}" + (f" or {widen}" if widen else "") if out  # (none found: no count helps)
               else widen or "use the other split")
        raise ConfigError(f"task {self.name!r} has fewer than {n} distinct {split} problems at these settings: "
                          f"{len(out)} found in {200 * n + 1000} draws; {fix}")

    def parse(self, completion: str, example: Example | None = None) -> str | None:
        return final_answer(reply(completion), self.answer_shape)

    def verify(self, example: Example, completion: str) -> bool:
        got = self.parse(completion, example)
        if got is None:
            return False
        target = normalize(example.answer)
        # a list answer ("32, 821") reads "32,821" as a list, not as thousands
        return normalize(got, thousands="," not in target) == target


# wrapping pairs: `x`, 'x', "x", [1, 2], \(x\), \[x\], \boxed{x}
_PAIRS = (("\\(", "\\)"), ("\\[", "\\]"), ("\\boxed{", "}"), ("`", "`"), ("'", "'"), ('"', '"'), ("[", "]"))


def unwrap(answer: str) -> str:
    """An answer without its markdown/LaTeX wrapping, spacing collapsed: **x**, $x$, \\(x\\), \\[x\\], \\boxed{x}, code
    `x`, quotes 'x' and "x", a list's brackets [x], a trailing period or exclamation mark, and nestings of them
    ($\\boxed{x}$, \\( \\boxed{x} \\)); a pair counts only around the whole answer ("[3 + 5] * 2" keeps its
    brackets, and so do "[1, 2] and [3]" and "\\boxed{1} + \\boxed{2}", whose first pair closes before the end)."""
    a = " ".join(answer.strip().split())
    closing = _bracket_pairs(a)
    lo, hi = 0, len(a)  # a[lo:hi] is the answer so far: bounds, not slices, so deep nesting costs linear time
    while True:
        while lo < hi and a[lo] in "*$ ":
            lo += 1
        for chars in ("*$ ", ".!", "*$ "):  # .strip("*$ ").rstrip(".!").strip("*$ ")
            while hi > lo and a[hi - 1] in chars:
                hi -= 1
        for open_, close in _PAIRS:
            inner, end = lo + len(open_), hi - len(close)
            if inner > end or not (a.startswith(open_, lo) and a.endswith(close, lo, hi)):
                continue
            if close in "]}":  # a bracket or brace pair: the one opened first closes last ("[[1], [2]]")
                enclosed = closing.get(inner - 1) == end
            else:  # a quote, backtick or \\( \\) pair: no other close inside
                enclosed = a.find(close, inner, end) < 0
            if enclosed:
                lo, hi = inner, end
                break
        else:
            return a[lo:hi]


def _bracket_pairs(text: str) -> dict[int, int]:
    """Index of each [ or { in `text` -> index of the ] or } closing it (LaTeX's \\[ \\] are a pair of their own)."""
    pairs: dict[int, int] = {}
    open_at: dict[str, list[int]] = {"]": [], "}": []}
    for m in re.finditer(r"\\[\[\]]|[\[\]{}]", text):
        ch = m.group()
        if ch in "[{":
            open_at["]" if ch == "[" else "}"].append(m.start())
        elif ch in open_at and open_at[ch]:
            pairs[open_at[ch].pop()] = m.start()
    return pairs


def normalize(answer: str, thousands: bool = True) -> str:
    """Compare answers modulo spacing, case, a trailing period, markdown/LaTeX wrapping (`unwrap`: **x**, $x$,
    \\(x\\), \\boxed{x}), a leading + or a zero fraction on an integer, and (thousands=True) thousands separators in
    numbers: "1,234" is 1234; with thousands=False it is the list "1, 234"."""
    a = unwrap(answer).lower()
    if thousands and re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", a):  # 1,234 -> 1234
        a = a.replace(",", "")
    number = re.fullmatch(r"\+?(-?\d+)(\.0+)?", a)  # +1234, 1234.0 -> 1234
    if number:
        return number.group(1)
    return re.sub(r"\s*,\s*", ", ", a)  # lists: "1,2 ,3" -> "1, 2, 3"

"""The verifiable tasks: disjoint deterministic splits, several phrasings, verifiers that accept the
reference solutions and reject wrong ones, checkable arithmetic steps, GSM8K/MMLU through one interface."""

import random
from fractions import Fraction

import pytest

from lmforge.errors import ConfigError
from lmforge.tasks import TASKS
from lmforge.tasks.arithmetic import Arithmetic, step_labels
from lmforge.tasks.base import final_answer, normalize
from lmforge.tasks.countdown import evaluate
from tests.conftest import shared_data

GENERATED = ["arithmetic", "countdown", "sort", "reverse", "count", "format"]


@pytest.mark.parametrize("name", GENERATED)
def test_splits_disjoint_deterministic_and_verifiable(name):
    task = TASKS[name]()
    train = task.examples("train", 300, seed=0) + task.examples("train", 300, seed=1)
    test = task.examples("test", 40, seed=0) + task.examples("test", 40, seed=7)
    assert not {e.key for e in train} & {e.key for e in test}
    assert [e.prompt for e in task.examples("test", 40, seed=0)] == [e.prompt for e in test[:40]]
    assert len({e.key for e in train[:300]}) == 300  # distinct within one draw
    assert len({t.split("{")[0] for t in task.templates}) > 1  # several phrasings ...
    assert len({e.prompt.split(" ")[0] for e in train}) > 1  # ... actually used
    for e in test:
        assert task.verify(e, e.solution), e
        assert not task.verify(e, "I do not know")


@pytest.mark.parametrize("name", ["arithmetic", "sort", "reverse", "count"])
def test_wrong_final_answers_rejected(name):
    task = TASKS[name]()
    for e in task.examples("test", 30, seed=3):
        wrong = e.answer + "1" if name != "sort" else ", ".join(reversed(e.answer.split(", "))) + ", 0"
        assert not task.verify(e, f"some working\nAnswer: {wrong}")
        assert task.verify(e, f"Answer: 0\nlet me redo that\nAnswer:  {e.answer}.")  # the LAST answer counts


def test_arithmetic_steps_are_checkable():
    task = Arithmetic(digits=(3, 5), mul_digits=3)
    rng = random.Random(0)
    for e in task.examples("train", 50, seed=2):
        labels = step_labels(e.solution)
        assert len(labels) == len(e.meta["steps"]) and all(ok for _, ok in labels)
        # corrupt one step's value: exactly that step is flagged, independent of Python's own eval
        lines = e.solution.splitlines()
        i = rng.randrange(len(lines) - 1)
        lhs, rhs = lines[i].rsplit("=", 1)
        lines[i] = f"{lhs}= {int(rhs) + 1}"
        bad = step_labels("\n".join(lines))
        assert [ok for _, ok in bad] == [j != i for j in range(len(bad))]
        assert all(eval(l.rsplit("=")[0]) == int(l.rsplit("=")[1]) for l, _ in labels)  # noqa: S307
    out = task.process_labels(e, "1 + 2 + 0 = 4\nAnswer: 7")
    assert out["steps"] == [("1 + 2 + 0 = 4", False)] and out["answer"] == "7" and not out["correct"]


def test_countdown_checks_the_expression_not_the_reference():
    task = TASKS["countdown"]()
    e = next(x for x in task.examples("train", 200) if x.meta["nums"] == sorted(x.meta["nums"]) and
             len(set(x.meta["nums"])) == 3)
    a, b, c = e.meta["nums"]
    target = e.meta["target"]
    assert evaluate("(1 + 2) * 3 / 4") == (Fraction(9, 4), [1, 2, 3, 4])
    assert evaluate("2 ** 3") is None and evaluate("x + 1") is None and evaluate("1 / 0") is None
    assert evaluate("-1 + 2") is None  # unary minus is not allowed
    alt = f"{a} + {b} + {c}"
    assert task.verify(e, f"Answer: {alt}") == (a + b + c == target)
    assert task.verify(e, f"Answer: {e.answer} = {target}")
    assert not task.verify(e, f"Answer: {target}")  # numbers not used


def test_format_requires_exactly_the_requested_tags():
    task = TASKS["format"]()
    e = task.examples("test", 1)[0]
    tag, other = e.meta["tag"], "xyz"
    assert task.verify(e, f"Sure. <{tag}> {e.answer} </{tag}>")
    assert not task.verify(e, f"<{other}>{e.answer}</{other}>")
    assert not task.verify(e, f"<{tag}>{e.answer}</{tag}> <{tag}>{e.answer}</{tag}>")
    assert not task.verify(e, f"Answer: {e.answer}")


def test_normalize_and_bad_args():
    assert normalize("1,234.") == "1234" and normalize("1,2 ,3") == "1, 2, 3" and normalize(" ABC ") == "abc"
    assert final_answer("x\nanswer = 5\n") == "5" and final_answer("none") is None
    with pytest.raises(ConfigError, match="split"):
        TASKS["sort"]().examples("validation", 3)
    with pytest.raises(ConfigError, match="fewer than"):
        TASKS["reverse"](length=(1, 1)).examples("train", 100)


def test_gsm8k_interface():
    root = shared_data("gsm8k").parent
    task = TASKS["gsm8k"](root)
    test = task.examples("test")
    assert len(test) == 1319 and len(task.examples("train")) == 7473
    assert all(task.verify(e, e.solution) for e in test)
    e = test[0]
    assert task.verify(e, f"so #### {int(float(e.answer)):,}") and not task.verify(e, "#### 0.5")
    assert task.parse("She pays $1,200. Answer: $1,250.") == "1250"


def test_mmlu_interface():
    root = shared_data("mmlu").parent
    task = TASKS["mmlu"](root)
    test = task.examples("test", 200, seed=0)
    assert {e.answer for e in test} == {"A", "B", "C", "D"}
    assert all(task.verify(e, e.solution) for e in test)
    assert task.parse("The correct option is (C).") == "C" and task.parse("Answer: B") == "B"
    assert not {e.key for e in task.examples("train")} & {e.key for e in task.examples("test")}

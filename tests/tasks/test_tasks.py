"""The verifiable tasks: disjoint deterministic splits, several phrasings, verifiers that accept the
reference solutions and reject wrong ones, checkable arithmetic steps, GSM8K/MMLU through one interface."""

import random
import re
from fractions import Fraction

import pytest

from lmforge.errors import ConfigError
from lmforge.tasks import TASKS
from lmforge.tasks.arithmetic import Arithmetic, step_labels
from lmforge.tasks.base import final_answer, normalize
from lmforge.tasks.countdown import evaluate
from lmforge.tasks.listops import Sorting
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


def test_process_labels_check_each_step_against_the_problem():
    """A line that computes right but is not this problem's step (its digits, a dropped carry) is wrong, and
    so is every step after the first mistake (Lightman et al. label up to it); terms may come in any order."""
    task = Arithmetic(digits=(3, 3), ops=("+",))
    e = next(iter(task.examples("train", 1, seed=0)))
    a, b = (int(x) for x in re.findall(r"\d+", e.prompt)[:2])
    steps = e.meta["steps"]
    swapped = [" + ".join(reversed(s.split(" = ")[0].split(" + ")[:2])) + " + " + s.split(" + ")[2] for s in steps]
    assert all(ok for _, ok in task.process_labels(e, "\n".join(swapped + [f"Answer: {a + b}"]))["steps"])
    other = "1 + 1 + 0 = 2"  # right arithmetic, not this problem's units column
    got = task.process_labels(e, "\n".join([other] + steps[1:] + [f"Answer: {a + b}"]))["steps"]
    assert [ok for _, ok in got] == [False] * len(steps)
    assert [ok for _, ok in step_labels("\n".join([other] + steps[1:]))] == [True] * len(steps)  # (no problem given)
    assert [ok for _, ok in task.process_labels(e, "\n".join(steps[:2]))["steps"]] == [True, True]


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


def test_verifiers_never_crash_and_read_common_answer_spellings():
    from lmforge.tasks.countdown import Countdown

    task = Countdown()
    ex = task.examples("train", 1, seed=0)[0]
    assert evaluate("+".join(["1"] * 1000)) is None and evaluate("+".join(["1"] * 5000)) is None  # no RecursionError
    assert not task.verify(ex, "Answer: " + "+".join(["1"] * 1000))
    assert task.verify(ex, f"Answer: {ex.answer}.")  # a trailing period, as the other tasks allow
    assert evaluate("0x10 + 4") is None and evaluate("1_6 + 4") is None and evaluate("1.5 + 2") is None
    for spelling in ("\\boxed{1234}", "**1234**", "$1234$", "1234.0", "+1234", "1,234.", " 1234 "):
        assert normalize(spelling) == "1234", spelling
    assert final_answer("**Answer:** 1234") is not None and normalize(final_answer("**Answer:** 1234")) == "1234"


def test_task_settings_are_checked_and_commutative_problems_keep_one_split():
    from lmforge.tasks.countdown import Countdown
    from lmforge.tasks.listops import Counting, Sorting

    for make in (lambda: Countdown(max_target=0), lambda: Countdown(count=1), lambda: Countdown(max_number=0),
                 lambda: Sorting(length=(5, 3)), lambda: Counting(alphabet=""), lambda: Arithmetic(mul_digits=0)):
        with pytest.raises(ConfigError):
            make()
    task = Arithmetic(digits=(4, 5), ops=("*",), mul_digits=2)
    assert all(len(str(e.meta["steps"][0]).split(" * ")[0]) <= 2 for e in task.examples("train", 20))
    small = Arithmetic(digits=(1, 1), ops=("+",))
    train, test = small.examples("train", 40), small.examples("test", 4)
    import re

    pairs = lambda exs: {tuple(sorted(map(int, re.search(r"(\d+) \+ (\d+)", e.prompt).groups()))) for e in exs}  # noqa: E731
    assert not pairs(train) & pairs(test)  # 3 + 4 and 4 + 3 are one problem


def test_a_list_answer_reads_commas_as_separators_and_a_number_as_thousands():
    """Sorting numbers >= 100: "32,821" is the list 32, 821 (it was read as the number 32821 and judged wrong)."""
    from lmforge.tasks.base import Example, Task
    from lmforge.tasks.listops import Sorting

    task = Sorting(max_value=999)
    e = task.render({"items": [821, 32]}, task.templates[0])
    assert e.answer == "32, 821" and task.verify(e, "Answer: 32,821") and not task.verify(e, "Answer: 32821")
    number = Example(prompt="2 * 16410.5?", answer="32821", solution="", key="n")
    assert Task().verify(number, "Answer: 32,821") and not Task().verify(number, "Answer: 32, 821")


def test_dataset_parsers_take_the_marked_answer_and_loaders_name_bad_lines(tmp_path):
    from lmforge.errors import DataError
    from lmforge.tasks.datasets import GSM8K, MMLU

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    g, m = GSM8K(root=tmp_path), MMLU(root=tmp_path)
    assert g.parse("Answer: 4 (she sells 9 eggs at $2 each)") == "4" and g.parse("#### 4\nthen 7") == "4"
    assert g.parse("so 12 then 18") == "18"
    assert m.parse("A is wrong; the answer is D") == "D" and m.parse("Answer: b") == "B" and m.parse("I pick C") == "C"
    # a lowercase letter is an option only as a whole answer, never the article "a"
    assert m.parse("The answer is a matter of taste, but I pick C") == "C"
    assert m.parse("Answer: a bit of both. B") == "B" and m.parse("the answer is (a)") == "A"
    assert m.parse("answer is: c.") == "C" and m.parse("Answer: d\nsince") == "D"
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "4 #### 4"}\n'
                                                   '{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(DataError, match="test.jsonl:2: the answer has no '#### <final answer>' line"):
        g.examples("test")
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "4 #### 4"}\n')
    with pytest.raises(ConfigError, match="has 1 examples"):
        g.examples("test", 5)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d,E\n")
    with pytest.raises(DataError, match="x_test.csv:2: an MMLU row .* answer 'E'"):
        m.examples("test")


def test_dataset_parsers_read_a_boxed_final_answer_before_the_numbers_after_it(tmp_path):
    """A math model's '\\boxed{18}' with no 'Answer:' line was read as the last number in the text (the check after
    it), and an MMLU '\\boxed{B}' as the first capital of the reasoning ('Option A is wrong')."""
    from lmforge.tasks.base import last_boxed
    from lmforge.tasks.datasets import GSM8K, MMLU

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "mmlu").mkdir()
    g, m = GSM8K(root=tmp_path), MMLU(root=tmp_path)
    assert g.parse("The answer is \\boxed{18}. Check: 3 * 6 = 18, so 2 bags.") == "18"
    assert g.parse("so $\\boxed{-1,200}$ in all, over 4 weeks") == "-1200"
    assert g.parse("#### 4 \\boxed{5}") == "4" and g.parse("Answer: 9 \\boxed{5}") == "9"  # the marks come first
    assert g.parse("no box: 4 and 6") == "6"
    assert m.parse("Option A is wrong, so \\boxed{B}") == "B"
    assert m.parse("A fails; \\boxed{\\text{C}}") == "C" and m.parse("A? $\\boxed{(D)}$") == "D"
    assert m.parse("Answer: B \\boxed{C}") == "B" and m.parse("the answer is C, \\boxed{B}") == "C"
    assert last_boxed("\\boxed{a} \\boxed{\\frac{1}{2}} x") == "\\frac{1}{2}" and last_boxed("\\boxed{open") is None


def test_latex_wrapped_answers_are_read_by_every_verifier():
    """'\\(843\\)' and '\\[843\\]' were compared as they stood (wrong), and Countdown read no wrapping at all: its
    right expression written '$16 + (5 + 8)$' or '\\boxed{16 + (5 + 8)}' was judged wrong."""
    from lmforge.tasks.base import Example
    from lmforge.tasks.countdown import Countdown

    for spelling in ("\\(843\\)", "\\[ 843 \\]", "\\( \\boxed{843} \\)", "$\\boxed{843}$.", "**\\(843\\)**"):
        assert normalize(spelling) == "843", spelling
    task = Countdown()
    ex = Example(prompt="", answer="16 + (5 + 8)", solution="", key="k", meta={"nums": [8, 16, 5], "target": 29})
    for spelling in ("16 + (5 + 8).", "$16 + (5 + 8)$", "\\boxed{16 + (5 + 8)}", "$16 + (5 + 8) = 29$",
                     "\\(16 + (5 + 8)\\) = 29", "**16 + (5 + 8)**"):
        assert task.verify(ex, f"Answer: {spelling}"), spelling
    for wrong in ("$16 + (5 * 8)$", "\\boxed{16 + 5 + 8 + 1}", "\\boxed{16 + (5 + 8)"):
        assert not task.verify(ex, f"Answer: {wrong}"), wrong


@pytest.mark.parametrize("make, message", [
    (lambda: Arithmetic(digits=(3,)), "arithmetic digits=(3,) must be (lo, hi)"),
    (lambda: Arithmetic(digits=3), "arithmetic digits=3 must be (lo, hi)"),
    (lambda: TASKS["sort"](length=5), "sort length=5 must be (lo, hi)"),
    (lambda: TASKS["sort"](length=(True, 3)), "sort length=(True, 3) must be (lo, hi)"),
])
def test_a_span_setting_of_the_wrong_shape_is_named(make, message):
    # Arithmetic(digits=(3,)) raised IndexError, length=5 a TypeError from len()
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_gsm8k_reads_a_unicode_minus_as_a_minus(tmp_path):
    from lmforge.tasks.datasets import GSM8K

    (tmp_path / "gsm8k").mkdir()
    g = GSM8K(root=tmp_path)
    # U+2212, the minus of typeset text: '−5' read 5, a wrong answer judged right for 5 and a right one wrong
    assert g.parse("Answer: \u22125") == "-5" and g.parse("\\boxed{\u22121,200}") == "-1200"


@pytest.mark.parametrize("n", [-1, 2.5, None])
def test_a_generated_task_refuses_a_count_that_is_no_whole_number(n):
    # n=-1 drew 800 problems, then said the task had "fewer than -1 distinct train problems"; 2.5 the same
    with pytest.raises(ConfigError, match=r"ask for a whole number of examples, 0 or more"):
        TASKS["sort"]().examples("train", n)
    assert TASKS["sort"]().examples("train", 0) == []


def test_gsm8k_reads_a_marked_equation_by_its_result(tmp_path):
    """'Answer: 3 + 4 = 7' read 3, the first number after the mark; the result is read after arithmetic only."""
    from lmforge.tasks.datasets import GSM8K

    (tmp_path / "gsm8k").mkdir()
    g = GSM8K(root=tmp_path)
    assert g.parse("Answer: 3 + 4 = 7") == "7" and g.parse("#### 12 * 3 = $36.") == "36"
    assert g.parse("\\boxed{x = 5}") == "5" and g.parse("Answer: 7 (= 3 + 4)") == "7"
    assert g.parse("Answer: 7 apples, so x =") == "7"  # nothing numeric after the '=': the first number stands
    # only after arithmetic: a unit conversion or a list of values keeps the first number
    assert g.parse("Answer: 5 hours = 300 minutes") == "5" and g.parse("Answer: x = 5, y = 7") == "5"


def test_gsm8k_reads_the_first_hashes_mark_before_an_answer_phrase(tmp_path):
    """GSM8K's own '#### N' is its final answer, taken first as lm-eval's strict match does (group_select 0). A stray
    'answer =' in the working ('2 points/answer = 48 points', train row 'James scored ... #### 66') read 48 over the
    '####' after it, and a base model running on into an invented next question read neither of its marks."""
    from lmforge.tasks.datasets import GSM8K

    (tmp_path / "gsm8k").mkdir()
    g = GSM8K(root=tmp_path)
    assert g.parse("24 answers * 2 points/answer = 48 points.\n48 + 16 = 64 points.\n#### 66") == "66"
    assert g.parse("#### 18\n\nQuestion: Tom has 3 apples and gets 2.\nAnswer: 3+2=5 apples.\n#### 5") == "18"
    assert g.parse("Answer: 7, so\n#### 12") == "12" and g.parse("so 12 then Answer: 7") == "7"


def test_every_parser_reads_the_reply_after_a_think_block(tmp_path):
    """A reasoning model's <think>...</think> is scratch work: R1's format '<think>..</think><answer>11</answer>' was
    judged wrong by the format task (think counted as a second tag pair), and an answer tried while thinking was
    read over the reply's ('<think>Answer: 40</think> Answer: 42' checked 40 for GSM8K when no mark came after)."""
    from lmforge.tasks.base import Example, Task
    from lmforge.tasks.datasets import GSM8K, MMLU

    fmt = TASKS["format"]()
    e = fmt.render({"a": 5, "b": 6, "tag": "answer"}, fmt.templates[0])
    assert fmt.verify(e, "<think>\n5 + 6 = 11\n</think>\n<answer>11</answer>")
    assert not fmt.verify(e, "<think><answer>11</answer></think> 11")
    n = Example(prompt="", answer="42", solution="", key="k")
    assert Task().verify(n, "<think>Answer: 40? no</think>\nAnswer: 42")
    assert not Task().verify(n, "<think>so Answer: 42</think>\nI could not decide.")
    assert not Task().verify(n, "<think>Answer: 42 ... wait")  # cut off while thinking: no answer given
    assert Task().verify(n, "40? no, 42.\n</think>\n\nAnswer: 42")  # the template opened <think> in the prompt
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "mmlu").mkdir()
    g, m = GSM8K(root=tmp_path), MMLU(root=tmp_path)
    assert g.parse("<think>Answer: 40</think>\nShe has 42 left.") == "42"
    assert g.parse("<think>#### 40</think> 42") == "42"
    assert m.parse("<think>Answer: A? the answer is B?</think>\nC") == "C"
    task = Arithmetic()
    ex = task.render({"a": 20, "b": 22, "op": "+"}, task.templates[0])
    assert task.process_labels(ex, "<think>Answer: 41</think>\nAnswer: 42")["answer"] == "42"


def test_an_answer_in_quotes_code_or_list_brackets_is_read():
    """'Answer: [1, 2, 3]' for a sort, "Answer: 'cba'" or `cba` for a reversal were compared with their wrapping and
    judged wrong; the wrapping goes as **bold** and $x$ do, only when it encloses the whole answer."""
    from lmforge.tasks.countdown import Countdown
    from lmforge.tasks.listops import Reversal, Sorting

    s, r = Sorting(), Reversal()
    e = s.render({"items": [3, 1, 2]}, s.templates[0])
    for spelling in ("[1, 2, 3]", "`[1, 2, 3]`", "**[1,2,3]**."):
        assert s.verify(e, f"Answer: {spelling}"), spelling
    assert not s.verify(e, "Answer: [1, 2], 3") and not s.verify(e, "Answer: [3, 1, 2]")
    w = r.render({"word": "abc"}, r.templates[0])
    for spelling in ("'cba'", '"cba"', "`cba`", '"cba".'):
        assert r.verify(w, f"Answer: {spelling}"), spelling
    assert not r.verify(w, "Answer: 'cb'a")
    c = Countdown()
    ex = c.render({"nums": [3, 5, 2], "target": 16, "expr": "(3 + 5) * 2"}, c.templates[0])
    assert c.verify(ex, "Answer: `(3 + 5) * 2`") and not c.verify(ex, "Answer: [3 + 5] * 2")


def test_the_answer_is_phrase_marks_a_final_answer(tmp_path):
    """'The answer is 42.' (the phrase of lm-eval's gsm8k-cot strict match, and what a chat model writes unasked) was no
    final answer: every generated task judged it wrong, and GSM8K read the last number after it ('... than 15')."""
    from lmforge.tasks.base import Example, Task
    from lmforge.tasks.datasets import GSM8K

    n = Example(prompt="", answer="42", solution="", key="k")
    for right in ("The answer is 42.", "6 * 7 = 42, so the answer is 42", "The final answer is $\\boxed{42}$",
                  "The answer is 40.\nNo - the answer is: **42**", "**The answer is** 42"):
        assert Task().verify(n, right), right
    for wrong in ("The answer is 40. I checked 42 twice.", "The answer isn't 42, it is 40"):
        assert not Task().verify(n, wrong), wrong
    # a verdict on an answer is no answer: the 42 before it stands
    for verdict in ("correct.", "right", "not 40.", "Wrong? No."):
        assert Task().verify(n, f"Answer: 42\nChecking: the answer is {verdict}"), verdict
    s = TASKS["sort"]()
    assert s.verify(s.render({"items": [3, 1, 2]}, s.templates[0]), "The answer is 1, 2, 3.")
    (tmp_path / "gsm8k").mkdir()
    g = GSM8K(root=tmp_path)
    assert g.parse("The answer is 18. That is 3 more than 15.") == "18" and g.parse("The answer is $1,200.") == "1200"
    # the result of working with units (a real train row's last line), not its first number; a sentence is no working
    assert g.parse("so the final answer is 15 gallons * 8 pints / gallon = 120 pints") == "120"
    assert g.parse("Answer: 2 * 3 + 4 = 6 + 4 = 10") == "10" and g.parse("Answer: (3 + 4) x 2 = $14.") == "14"
    assert g.parse("Answer: 5. Because 2 + 2 = 4") == "5" and g.parse("The answer is 5 hours = 300 minutes") == "5"
    assert g.parse("He got 24 * 2 points/answer = 48 points, so 48 + 16 = 64 points.") == "64"
    assert g.parse("The answer is not 40: 6 * 7 = 42.") == "42"


def test_a_long_run_of_spaces_or_unclosed_tags_is_read_in_linear_time():
    """'Answer: x', 100k spaces, 'y' took 40 s (the mark's lazy capture rescanned the spaces from each position), and
    the format task's tag pairs took seconds on a rollout of unclosed '<answer>' tags: a reward function must not
    stall on a degenerate sample."""
    import time

    from lmforge.tasks.base import Example, Task

    n = Example(prompt="", answer="42", solution="", key="k")
    fmt = TASKS["format"]()
    e = fmt.render({"a": 5, "b": 6, "tag": "answer"}, fmt.templates[0])
    start = time.perf_counter()
    assert final_answer("Answer: x" + " " * 100_000 + "y") == "x" + " " * 100_000 + "y"
    assert Task().verify(n, "Answer: 42" + " " * 100_000 + "\t.") and Task().verify(n, "Answer:" + " " * 100_000 + "42")
    assert not fmt.verify(e, "<answer>" * 20_000 + "11") and fmt.verify(e, "<a>" * 30_000 + "<answer>11</answer>")
    assert time.perf_counter() - start < 1.0
    # the pairing is re.findall's: leftmost first, each open tag closed by the nearest close of its name
    assert fmt.verify(e, "<answer><answer>11</answer>") is False and fmt.verify(e, "x <answer>11</answer> </b>")
    assert final_answer("Answer: 5\nAnswer:   \n") == "5" and final_answer("answer: the answer is 42") == "42"
    from lmforge.tasks.format import tag_pairs

    rng = random.Random(0)
    pieces = ["<a>", "</a>", "<answer>", "</answer>", "<b>", "</b>", "x", "11", "<", ">", "/", "\n"]
    for _ in range(2000):  # the reference: the regex it replaces
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert tag_pairs(text) == [m[1] for m in re.findall(r"<(\w+)>(.*?)</\1>", text, re.DOTALL)], text
        assert tag_pairs(text, "answer") == [m[1] for m in re.findall(r"<(answer)>(.*?)</\1>", text, re.DOTALL)], text


def test_countdown_settings_whose_targets_almost_never_occur_are_refused_not_hung():
    """Countdown draws random expressions until one lands on a whole target in 1..max_target: with 12 numbers up to
    1000 and max_target=1 that never happened in minutes (the loop had no bound); 2 numbers up to 10**6 (a draw is
    cheap there) hung the same way."""
    import threading

    from lmforge.tasks.countdown import Countdown

    caught = []

    def draw():
        try:
            Countdown(count=2, max_number=10 ** 6, max_target=1).examples("train", 1)
        except ConfigError as e:
            caught.append(str(e))

    worker = threading.Thread(target=draw, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert caught and "raise max_target or lower count / max_number" in caught[0], caught
    assert len(Countdown(count=4, max_number=99, max_target=100).examples("train", 20)) == 20


def test_format_keeps_a_plus_b_and_b_plus_a_in_one_split():
    """The format task keyed '3+4' and '4+3' apart, so one sum could sit in train and its twin in test (31 of 300 test
    problems had theirs among 3000 train ones); Arithmetic already keys a+b as b+a."""
    task = TASKS["format"]()
    twins = lambda exs: {(tuple(sorted(map(int, re.findall(r"\d+", e.prompt)[:2]))), e.meta["tag"]) for e in exs}  # noqa: E731
    assert not twins(task.examples("train", 3000)) & twins(task.examples("test", 300))
    assert task.render({"a": 3, "b": 4, "tag": "final"}, task.templates[0]).key == \
        task.render({"a": 4, "b": 3, "tag": "final"}, task.templates[1]).key


@pytest.mark.parametrize("n", [2.5, True, "3"])
def test_a_file_task_refuses_a_count_that_is_no_whole_number(tmp_path, n):
    # GSM8K.examples("test", 2.5) was a TypeError from slicing, True one example; the generated tasks refuse both
    from lmforge.tasks.datasets import GSM8K

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "4 #### 4"}\n' * 3)
    with pytest.raises(ConfigError, match=r"ask for a whole number of examples, 0 or more"):
        GSM8K(root=tmp_path).examples("test", n)


def test_countdown_reads_typeset_operators():
    """'16 × 5 ÷ 2 − 8', LaTeX '16 \\times 5 \\div 2 - 8' (how math models write them) were no expression at all."""
    from lmforge.tasks.base import Example
    from lmforge.tasks.countdown import Countdown

    task = Countdown()
    ex = Example(prompt="", answer="", solution="", key="k", meta={"nums": [16, 5, 8, 2], "target": 32})
    for spelling in ("16 × 5 ÷ 2 − 8", "\\(16 \\times 5 \\div 2 - 8\\)", "16 \\cdot 5 / 2 - 8", "16·5÷2−8 = 32"):
        assert task.verify(ex, f"Answer: {spelling}"), spelling
    for wrong in ("16 × 5 ÷ 2 + 8", "16 × 5 − 8 × 2 ÷ 2", "16 \\times 5 - 8", "16 \\timesx 5 / 2 - 8"):
        assert not task.verify(ex, f"Answer: {wrong}"), wrong


def test_an_explicit_answer_mark_wins_over_a_later_sentence_about_the_answer(tmp_path):
    """'The answer is' matched anywhere and the last mark won, so a sentence after the final 'Answer:' line replaced
    the answer and RL rewards rejected right rollouts ('Answer: 5313\\nThe answer is verified.' read 'verified.').
    'Answer:' wins; the phrase counts only without one, and only before an answer-shaped start (a number, an option
    letter, a wrapping such as \\boxed{ around one; lm-eval's gsm8k-cot reads 'The answer is' before a number only)."""
    from lmforge.tasks.datasets import GSM8K, MMLU
    from lmforge.tasks.listops import Reversal

    a = Arithmetic()
    ex = a.render({"a": 69, "b": 77, "op": "*"}, a.templates[0])
    assert ex.answer == "5313"
    for after in ("The answer is verified.", "So the answer is clearly 5313.",
                  "Double-checking, the answer is consistent."):
        assert a.parse(f"Answer: 5313\n{after}", ex) == "5313" and a.verify(ex, f"Answer: 5313\n{after}"), after
    assert a.parse("The answer is 5313.\nThe answer is verified.", ex) == "5313."  # the phrase before a number
    assert a.parse("So the answer is clearly 5313.", ex) is None  # no mark: no final answer
    # a mark's own line may put it in the phrase (Minerva's 'Final Answer: The final answer is 42.')
    assert final_answer("Final Answer: The final answer is $\\boxed{42}$") == "$\\boxed{42}$"
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "mmlu").mkdir()
    g, m = GSM8K(root=tmp_path), MMLU(root=tmp_path)
    assert g.parse("Answer: 42\nThe answer is in dollars.") == "42"
    assert g.parse("Answer: 42\nThe answer is reasonable since 6 * 7 = 42 and 6 < 7.") == "42"
    assert g.parse("The answer is in dollars: 6 * 7 = 42") == "42"  # no mark: the last number
    assert m.parse("Answer: B\nThe answer is supported by the passage.") == "B"
    assert m.parse("The answer is **(C)**.\nThe answer is supported by the passage.") == "C"
    r = Reversal()
    w = r.render({"word": "abc"}, r.templates[0])
    assert r.verify(w, "The answer is cba.\nThe answer is in reverse order.") and r.verify(w, "The answer is **cba**")
    assert r.verify(w, "Answer: cba\nThe answer is verified.")
    assert r.verify(w, "The answer is cba.\nThe answer is right.")  # a verdict is no lone-word answer


def test_unwrap_strips_only_a_pair_that_encloses_the_whole_answer():
    """The lazy wrapping pattern under fullmatch took '[1, 2] and [3]' for one pair ('1, 2] and [3')."""
    from lmforge.tasks.base import unwrap

    for kept in ("[1, 2] and [3]", "`a` + `b`", "'x' or 'y'", "\\boxed{1} + \\boxed{2}", "\\(a\\) + \\(b\\)",
                 "[3 + 5] * 2", "\\[1\\] \\[2\\]"):
        assert unwrap(kept) == kept, kept
    assert unwrap("[[1, 2], [3]]") == "[1, 2], [3]" and unwrap("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert unwrap("$\\boxed{ [1, 2] }$.") == "1, 2" and unwrap("` 'cba' `") == "cba"
    import time

    start = time.perf_counter()
    assert unwrap("[" * 50_000 + "1" + "]" * 50_000) == "1" and unwrap("`[" * 20_000 + "1" + "]`" * 20_000) != "1"
    assert time.perf_counter() - start < 1.0  # a rollout's deep nesting is peeled in linear time


def test_minervas_final_answer_sentence_reads_its_answer_for_every_task(tmp_path):
    """'Final Answer: The final answer is 42. I hope it is correct.' (Minerva's format) read the rest of the line,
    '42. I hope it is correct.', so every generated task judged it wrong while GSM8K read 42: the answer the phrase
    introduces ends with its sentence."""
    from lmforge.tasks.datasets import GSM8K

    for name in ("arithmetic", "countdown", "sort", "reverse", "count"):
        task = TASKS[name]()
        for ex in task.examples("test", 5, seed=3):
            right = f"Final Answer: The final answer is {ex.answer}. I hope it is correct."
            assert task.verify(ex, right), (name, right)
            assert task.verify(ex, f"The final answer is ${ex.answer}$. I hope it is correct."), name
            wrong = "abc" if name == "reverse" and ex.answer != "abc" else "1, 2, 3" if name == "sort" else "1 + 1"
            assert not task.verify(ex, f"Final Answer: The final answer is {wrong}. I hope it is correct."), name
    assert final_answer("Final Answer: The final answer is 42. I hope it is correct.") == "42."
    assert final_answer("The answer is 3.5! Done.") == "3.5!" and final_answer("The answer is 3.5") == "3.5"
    assert final_answer("Answer: 42. I hope it is correct.") == "42."  # a mark's answer too (test_answer_marks.py)
    (tmp_path / "gsm8k").mkdir()
    assert GSM8K(root=tmp_path).parse("Final Answer: The final answer is 42. I hope it is correct.") == "42"


def test_markdown_bold_around_the_answer_mark_is_a_mark(tmp_path):
    """'**Answer**: 42' was no mark at all (every parser fell back or read None) and '**Answer:**' left its closing
    '**' as the answer when the answer sat on the next line."""
    from lmforge.tasks.datasets import GSM8K, MMLU

    a = Arithmetic()
    ex = a.render({"a": 69, "b": 77, "op": "*"}, a.templates[0])
    for mark in ("**Answer**:", "**Answer:**", "**Final Answer**:", "*Answer*:", "**Answer** ="):
        for text in (f"{mark} 5313", f"6 * 7 = 42\n{mark}\n5313", f"{mark} 5313\nThe answer is verified."):
            assert a.parse(text, ex) == "5313" and a.verify(ex, text), text
        assert not a.verify(ex, f"{mark} 5312"), mark
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "mmlu").mkdir()
    g, m = GSM8K(root=tmp_path), MMLU(root=tmp_path)
    # the last number (GSM8K) and the first capital (MMLU) were the fallback: a later number or letter won
    assert g.parse("**Answer**: 42\nCheck: 6 * 7 = 42, not 41") == "42"
    assert m.parse("Option A is tempting.\n**Answer**: (c)") == "C" and m.parse("**Answer:**\nB") == "B"


def test_a_later_phrase_answers_where_the_mark_holds_no_answer():
    """Folding MMLU's own 'answer is <letter>' into final_answer limited the phrase to the last mark's line, so
    'Answer: Paris' (no option) then 'So the answer is (B).' read None, and the boxed and first-capital fallbacks
    were skipped. A mark whose text is no answer leaves a later phrase to give it; one that holds an answer wins."""
    from lmforge.tasks.datasets import MMLU

    mmlu = MMLU.__new__(MMLU)
    assert mmlu.parse("Answer: Paris\nSo the answer is (B).") == "B"
    assert mmlu.parse("A quick check.\nAnswer: the second option\nThe answer is C.") == "C"
    assert mmlu.parse("Answer: B\nThe answer is supported by the passage.") == "B"
    assert final_answer("Answer: 5313\nThe answer is verified.") == "5313"
    assert final_answer("Answer: 42\nThe answer is 41") == "42"


@pytest.mark.parametrize("setting", [{"max_target": float("nan")}, {"max_target": float("inf")},
                                     {"max_number": 2.5}, {"count": True}, {"count": 3.0}])
def test_countdown_refuses_a_setting_that_is_no_whole_number_before_drawing_a_problem(setting, monkeypatch):
    """Countdown(max_target=nan) passed its check (`nan < 1` is False) and was refused only after MAX_DRAWS random
    expressions (4-8 s) had all "missed" the target; max_number=2.5 was random's ValueError at the first draw."""
    from lmforge.tasks.countdown import Countdown

    def costly(*args):
        raise AssertionError("a problem was drawn before the settings were checked")

    monkeypatch.setattr(Countdown, "_combine", staticmethod(costly))
    (name, value), = setting.items()
    with pytest.raises(ConfigError, match=f"^Countdown {name}={re.escape(repr(value))} must be a whole number >= "):
        Countdown(**setting).examples("train", 1)


@pytest.mark.parametrize("make, want", [
    (lambda: Sorting(max_value=2.5), "sort max_value=2.5"),
    (lambda: Sorting(max_value=float("nan")), "sort max_value=nan"),
    (lambda: Sorting(max_value=True), "sort max_value=True"),
    (lambda: Arithmetic(mul_digits=1.5), "arithmetic mul_digits=1.5")])
def test_integer_settings_of_every_task_are_whole_numbers_checked_when_built(make, want):
    """Only Countdown checked its integer settings were whole numbers: Sorting(max_value=2.5 or nan) and
    Arithmetic(mul_digits=1.5) were built and failed at the first draw with random's ValueError (check_whole)."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(want)} must be a whole number >= \d$"):
        make()


def test_gsm8k_reads_its_jsonl_as_the_data_readers_do_and_names_a_bad_file_in_one_line(tmp_path):
    # a blank line (a trailing one too) and an editor's byte-order mark were "not a GSM8K record"; a missing split file
    # was a FileNotFoundError traceback, an answer that is no text a TypeError
    from lmforge.errors import DataError
    from lmforge.tasks.datasets import GSM8K

    (tmp_path / "gsm8k").mkdir()
    rec = '{"question": "q%d", "answer": "w\\n#### %d"}'
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(("\ufeff" + rec % (1, 1) + "\r\n\n" + rec % (2, 2) + "\n\n")
                                                    .encode())
    got = GSM8K(root=tmp_path).load("test")
    assert [(e.prompt[:2], e.answer, e.key) for e in got] == [("q1", "1", "gsm8k:test:0"), ("Qu", "2", "gsm8k:test:1")]
    with pytest.raises(DataError, match=r"gsm8k train split reads .*train.jsonl, which is not a file; put train.jsonl"):
        GSM8K(root=tmp_path).examples("train")
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": 5}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: not a GSM8K record .*'answer': 5"):
        GSM8K(root=tmp_path).examples("test")
    import gzip

    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(gzip.compress(b'{"question": "q", "answer": "#### 1"}\n'))
    with pytest.raises(DataError, match=r"test.jsonl holds compressed bytes: decompress it in place \(gunzip -c / "
                                        r"zstd -dc it to test.jsonl\)"):
        GSM8K(root=tmp_path).examples("test")  # (json_records' NotCompressed, a ValueError: it was a traceback)


def test_mmlu_reads_a_spreadsheets_csv_its_mark_blank_line_and_windows_1252_bytes(tmp_path):
    # the byte-order mark became part of the first question, a blank line "got 0 columns", a cp1252 byte a
    # UnicodeDecodeError traceback
    from lmforge.tasks.datasets import MMLU

    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_bytes("\ufeffq1,a,b,c,d,A\r\n\r\n".encode() +
                                                            "caf\u00e9?,a,b,c,d,B\r\n".encode("cp1252"))
    got = MMLU(root=tmp_path).load("test")
    assert [(e.prompt.split("\n")[0], e.answer, e.key) for e in got] == [("q1", "A", "mmlu:test:x:0"),
                                                                          ("caf\u00e9?", "B", "mmlu:test:x:2")]


def test_an_empty_file_split_is_refused_not_an_empty_eval_set(tmp_path):
    # an MMLU folder without test/ (or empty CSVs) and an empty test.jsonl gave [] - an accuracy over nothing
    from lmforge.errors import DataError
    from lmforge.tasks.datasets import GSM8K, MMLU

    (tmp_path / "mmlu" / "dev").mkdir(parents=True)
    (tmp_path / "mmlu" / "dev" / "x_dev.csv").write_text("q,a,b,c,d,A\n")
    assert len(MMLU(root=tmp_path).examples("train")) == 1
    with pytest.raises(DataError, match=r"the mmlu test split is empty: no records in .*mmlu/test/\*\.csv; pass root="):
        MMLU(root=tmp_path).examples("test")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"the gsm8k test split is empty: no records in .*gsm8k/test.jsonl"):
        GSM8K(root=tmp_path).examples("test", 0)


def test_an_unknown_task_name_is_one_line_naming_the_tasks():
    # TASKS["gsm8"] was a bare KeyError: 'gsm8'
    with pytest.raises(ConfigError) as e:
        TASKS["gsm8"]
    assert str(e.value) == ("unknown task 'gsm8'; choose one of arithmetic, countdown, sort, reverse, count, format, "
                            "gsm8k, mmlu")
    assert isinstance(e.value, KeyError) and TASKS.get("gsm8") is None and "gsm8k" in TASKS


@pytest.mark.parametrize("alphabet", [5, ["a", "aa"], " ", "ab\n"])
def test_count_refuses_an_alphabet_that_is_no_string_of_visible_letters_when_built(alphabet):
    # 5 was a TypeError at the first draw; ["a", "aa"] counted overlapping substrings; " " and "\n" unreadable prompts
    from lmforge.tasks.listops import Counting

    with pytest.raises(ConfigError, match=r"count alphabet=.* must be a string of letters to draw from"):
        Counting(alphabet=alphabet)
    assert Counting(alphabet="xyz").examples("train", 2)[0].answer.isdigit()


def test_step_labels_call_a_runaway_number_a_wrong_step_not_a_crash():
    # int() refuses strings of over 4,300 digits: a rollout's runaway number was a ValueError out of the reward function
    task = TASKS["arithmetic"]()
    ex = task.examples("test", 1)[0]
    runaway = f"1 + 1 = {'9' * 5000}\n{'9' * 5000} * 9 = 1\n2 * 3 = 6"
    assert step_labels(runaway) == [(f"1 + 1 = {'9' * 5000}", False), (f"{'9' * 5000} * 9 = 1", False),
                                    ("2 * 3 = 6", True)]
    assert task.process_labels(ex, runaway)["steps"][0][1] is False
    assert step_labels(f"{'9' * 4000} * 1 = {'9' * 4000}") == [(f"{'9' * 4000} * 1 = {'9' * 4000}", True)]
    import sys

    was = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)  # (PYTHONINTMAXSTRDIGITS: the limit is the interpreter's, not a fixed 4,300)
    try:
        want = [(f"1 + 2 = {'9' * 1000}", False), ("2 * 3 = 6", True)]
        assert step_labels(f"1 + 2 = {'9' * 1000}\n2 * 3 = 6") == want
    finally:
        sys.set_int_max_str_digits(was)


def test_too_many_problems_asked_says_how_many_there_are():
    # it said "ask for fewer or widen the task's ranges", to the format task too, which has no ranges to widen
    with pytest.raises(ConfigError, match=r"fewer than 2000 distinct test problems at these settings: 1[0-9]{3} found "
                                          r"in 401000 draws; ask for at most 1[0-9]{3}$"):
        TASKS["format"]().examples("test", 2000)
    with pytest.raises(ConfigError, match=r": 3 found in 21000 draws; ask for at most 3 or widen the task's ranges$"):
        TASKS["reverse"](length=(1, 1)).examples("test", 100)
    # none found: "ask for at most 0" was no fix
    with pytest.raises(ConfigError, match=r": 0 found in 11000 draws; widen the task's ranges$"):
        TASKS["countdown"](count=2, max_number=2, max_target=2).examples("test", 50)


def test_mmlu_skips_a_header_row(tmp_path):
    # pandas' to_csv writes question,A,B,C,D,answer first: it was refused as a row whose answer is 'answer'
    from lmforge.tasks.datasets import MMLU

    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("question,A,B,C,D,answer\nq,a,b,c,d,C\n")
    assert [(e.answer, e.key) for e in MMLU(root=tmp_path).load("test")] == [("C", "mmlu:test:x:1")]

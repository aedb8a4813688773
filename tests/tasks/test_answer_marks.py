"""How every parser reads a reply's final answer: markdown inside the phrase 'the answer is', a mark's sentence,
GSM8K's bare decimals, MMLU's fallback letter, and the opt-in answer-format instruction of the generated tasks."""

import pytest

from lmforge.tasks import TASKS
from lmforge.tasks.base import Example, Task, final_answer, normalize
from lmforge.tasks.datasets import GSM8K, MMLU


@pytest.fixture
def gsm8k(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    return GSM8K(root=tmp_path)


@pytest.fixture
def mmlu(tmp_path):
    (tmp_path / "mmlu").mkdir()
    return MMLU(root=tmp_path)


def _example(answer: str) -> Example:
    return Example(prompt="", answer=answer, solution="", key="k")


@pytest.mark.parametrize("phrase", ["The **answer** is -5", "The answer is **-5**.", "The *answer* is -5.",
                                    "**The answer is -5.**", "The **answer is** -5", "The **final answer** is -5."])
def test_markdown_inside_or_around_the_phrase_reads_its_answer_for_every_parser(phrase, gsm8k, mmlu):
    """'The **answer** is -5' was no phrase ('answer' had to be followed by a space): the generated tasks read None,
    GSM8K the last number after it, MMLU the first capital; '**The answer is -5.** Not 7.' read '-5.** Not 7.'
    (a sentence's end followed by a closing '**' was no end)."""
    assert normalize(final_answer(phrase)) == "-5"
    assert Task().verify(_example("-5"), phrase) and not Task().verify(_example("5"), phrase)
    after = " Not 7." if phrase.endswith((".", ".**")) else "\nNot 7."
    assert Task().verify(_example("-5"), phrase + after) and gsm8k.parse(phrase + after) == "-5"
    letter = phrase.replace("-5", "(B)")
    assert mmlu.parse(f"(C) looks close, but {letter[0].lower()}{letter[1:]}") == "B", letter


@pytest.mark.parametrize("name, problem, answer", [
    ("arithmetic", {"a": 20, "b": 22, "op": "+"}, "42"),
    ("count", {"text": "abca", "ch": "a"}, "2"),
    ("sort", {"items": [3, 1, 2]}, "1, 2, 3"),
    ("reverse", {"word": "abc"}, "cba"),
    ("countdown", {"nums": [3, 5, 2], "target": 16, "expr": "(3 + 5) * 2"}, "(3 + 5) * 2"),
])
def test_an_answer_after_the_mark_ends_with_its_sentence(name, problem, answer):
    """'Answer: 42. I hope it is correct.' read the whole line ('42. I hope it is correct.'), so every generated task
    judged a right answer wrong; the phrase's answer already ended with its sentence."""
    task = TASKS[name]()
    ex = task.render(problem, task.templates[0])
    for text in (f"Answer: {answer}. I hope it is correct.", f"Answer: **{answer}.** I hope it is correct.",
                 f"Answer: {answer}. 7 is wrong, 1 too.", f"Answer: {answer}"):
        assert task.verify(ex, text), text
    assert not task.verify(ex, "Answer: 7, 1. I hope it is correct.")


def test_a_mark_keeps_its_line_where_its_text_is_no_answer_and_a_decimal_point_ends_nothing(gsm8k, mmlu):
    assert final_answer("Answer: 42. I hope it is correct.") == "42."
    assert final_answer("Answer: 3.5") == "3.5" and final_answer("Answer: 3.5. Done") == "3.5."
    assert Task().verify(_example("3.5"), "Answer: 3.5. I hope it is correct.")
    # text that does not start as an answer keeps its line: the letter or number comes later in it
    assert final_answer("Answer: about 42. Really.") == "about 42. Really."
    assert mmlu.parse("Answer: The capital is Paris. So B") == "B" and mmlu.parse("Answer: B. A is wrong.") == "B"
    assert gsm8k.parse("Answer: 3 + 4 = 7. So 7 apples.") == "7"  # the working's result, not its first number


def test_gsm8k_reads_a_bare_decimal_point_as_lm_evals_regex_does(gsm8k):
    """'Answer: .5' read 5 (the number pattern needed a digit first), so a reply of .5 passed for a target of 5.
    lm-eval's GSM8K regexes ('#### (\\-?[0-9\\.\\,]+)', and '(-?[$0-9.,]{2,})' flexible) take the point: '.5'."""
    for text in ("Answer: .5", "#### .5", "The answer is .5.", "so she pays .5"):
        assert gsm8k.parse(text) == ".5", text
        assert not gsm8k.verify(_example("5"), text) and gsm8k.verify(_example("0.5"), text), text
    assert gsm8k.parse("Answer: -.5") == "-.5" and gsm8k.parse("Answer: $.50") == ".50"
    # an ellipsis or a word before the point is no decimal point
    assert gsm8k.parse("so...5") == "5" and gsm8k.parse("in v.2 it is 5") == "5"
    assert Task().verify(_example(".5"), "The answer is .5") and not Task().verify(_example("5"), "The answer is .5")


def test_mmlu_fallback_reads_the_first_standalone_letter_not_the_article(mmlu):
    """With no mark, MMLU read the first capital A-D anywhere ('A good question... (C)' read A, the article). It reads
    the first '(C)', else the first capital A-D as a word that is not the article before a lowercase word, else that
    article. Not the last: a reply names its choice first and the rejected options after it."""
    assert mmlu.parse("A good question... (C)") == "C"
    assert mmlu.parse("I think it's (C). A is wrong.") == "C"
    assert mmlu.parse("C. A careful reading agrees with it.") == "C"
    assert mmlu.parse("A good question. Option B is right") == "B"
    assert mmlu.parse("I pick **D**") == "D" and mmlu.parse("B") == "B" and mmlu.parse("Option A is right") == "A"
    for reply in ("B is correct. A, C and D are wrong.", "The correct option is B; options A, C, and D are incorrect.",
                  "Option (B) is right, not (A).", "Correct: B\nWhy not A? Because."):
        assert mmlu.parse(reply) == "B", reply
    assert mmlu.parse("A is correct, B is wrong") == "A" and mmlu.parse("A seems right; B does not") == "A"
    assert mmlu.parse("A and B are wrong; C is right.") == "A"  # (the first letter named: no article here)
    for none in ("No letter here", "I do not know.", "a good question", ""):
        assert mmlu.parse(none) is None, none


def test_reversal_reads_a_long_run_of_closers_in_linear_time():
    """Reversal's answer shape had two optional runs of closers side by side: a rollout's 'abc' + 20k '*' took ~7 s."""
    import time

    task = TASKS["reverse"]()
    start = time.perf_counter()
    for c in "*)'":
        assert task.parse("the answer is abc" + c * 20_000 + "x") is None
    assert time.perf_counter() - start < 0.5
    assert task.parse("The answer is **cba.** I hope") == "**cba.**"
    assert task.parse("the answer is **cba** because") is None


GENERATED = ("arithmetic", "countdown", "sort", "reverse", "count")


@pytest.mark.parametrize("name", GENERATED)
def test_instruct_adds_the_answer_format_to_the_prompts_and_changes_nothing_else(name):
    """The generated tasks' prompts never said how to mark the answer; instruct=True ends each with an instruction
    (off by default: the same prompts, keys and answers as before)."""
    plain, told = TASKS[name](), TASKS[name](instruct=True)
    a, b = plain.examples("train", 20, seed=4), told.examples("train", 20, seed=4)
    assert [e.key for e in a] == [e.key for e in b] and [e.answer for e in a] == [e.answer for e in b]
    assert all(y.prompt == f"{x.prompt}\n{told.answer_format}" for x, y in zip(a, b))
    assert told.answer_format.startswith("End with 'Answer: <") and told.answer_format.endswith(">'.")
    assert all("Answer:" not in e.prompt for e in a)
    assert all(told.verify(e, e.solution) for e in b)


def test_instruct_is_refused_where_it_means_nothing():
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="format's prompts already say how to mark the answer"):
        TASKS["format"](instruct=True)
    with pytest.raises(ConfigError, match="instruct='yes' must be True or False"):
        TASKS["arithmetic"](instruct="yes")


def test_an_exclamation_mark_after_the_answer_is_no_part_of_it():
    from lmforge.tasks import TASKS
    from lmforge.tasks.base import unwrap

    assert unwrap("**42!**") == "42" and unwrap("cba!") == "cba"
    for name, reply in (("arithmetic", "Answer: {}!"), ("arithmetic", "The answer is {}!"), ("reverse", "Answer: {}!")):
        task = TASKS[name]()
        ex = task.examples("test", 1, seed=0)[0]
        assert task.verify(ex, reply.format(ex.answer)), (name, reply)


def test_instruct_on_a_file_task_is_refused_in_one_line(tmp_path):
    """GSM8K and MMLU take their prompts from the files: instruct=True was a bare TypeError."""
    from lmforge.errors import ConfigError

    for name in ("gsm8k", "mmlu"):
        with pytest.raises(ConfigError, match="takes its prompts from the files; instruct is a generated task's"):
            TASKS[name](tmp_path, instruct=True)

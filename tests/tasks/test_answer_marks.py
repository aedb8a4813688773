"""How every parser reads a reply's final answer: markdown inside the phrase 'the answer is', a mark's sentence,
GSM8K's bare decimals, MMLU's fallback letter, and the opt-in answer-format instruction of the generated tasks."""

import pytest

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

"""Verifiable tasks: problems with exact checkers, for post-training small models and measuring it.

    from lmforge.tasks import TASKS
    task = TASKS["arithmetic"]()
    ex = task.examples("test", 100, seed=0)[0]
    task.verify(ex, "...\\nAnswer: 843")

Generated: arithmetic (step-checkable working), countdown, sort, reverse, count, format (answer in tags).
From files (../shared/data): gsm8k, mmlu.
"""

from lmforge.errors import ConfigError
from lmforge.tasks.arithmetic import Arithmetic
from lmforge.tasks.base import Example, Task
from lmforge.tasks.countdown import Countdown
from lmforge.tasks.datasets import GSM8K, MMLU
from lmforge.tasks.format import FormatCompliance
from lmforge.tasks.listops import Counting, Reversal, Sorting


class UnknownTask(ConfigError, KeyError):
    """TASKS[name] for a name it does not hold: a KeyError still (`except KeyError` keeps working), worded as one line
    naming the tasks there are."""

    __str__ = Exception.__str__  # (KeyError's would print the message in quotes)


class _Tasks(dict):
    def __missing__(self, name):
        raise UnknownTask(f"unknown task {name!r}; choose one of {', '.join(self)}")


TASKS: dict[str, type[Task]] = _Tasks(arithmetic=Arithmetic, countdown=Countdown, sort=Sorting, reverse=Reversal,
                                      count=Counting, format=FormatCompliance, gsm8k=GSM8K, mmlu=MMLU)

__all__ = ["TASKS", "Example", "Task", "UnknownTask"]

"""GSM8K and MMLU behind the task interface (parse / verify / examples), for models large enough to try.

Files (see ../shared/data/README.md): gsm8k/{train,test}.jsonl with {"question", "answer"} (the final
answer after '#### '); mmlu/{dev,val,test}/*.csv rows question,A,B,C,D,answer. Their own splits are
kept: GSM8K train/test; MMLU train = dev + val (few-shot and tuning), test = test.
"""

from __future__ import annotations

import csv
import io
import random
import re
from pathlib import Path

from lmforge.errors import ConfigError, DataError
from lmforge.tasks.base import Example, Task, check_request, final_answer, last_boxed, reply

DEFAULT_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# a number: "42", "-5", "$1,200", "3.5", and a bare decimal ".5", as lm-eval's GSM8K regexes take it
# ("#### (\-?[0-9\.\,]+)"; flexible "(-?[$0-9.,]{2,})"); a point after a word or another point ("v.2", "so...5")
# starts no decimal
NUMBER_RE = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|(?<![\w.])\.\d+)")
# working: numbers, each with an optional unit ("15 gallons * 8 pints / gallon"), joined by operators
_QUANTITY = r"\s*[($]*-?\$?\d[\d,]*(?:\.\d+)?(?:\s*[A-Za-z]+(?:\s*/\s*[A-Za-z]+)*)??\)*"
_WORKED = re.compile(rf"{_QUANTITY}(?:\s*[-+*/x×÷=]{_QUANTITY})+\s*")


class _FileTask(Task):
    subdir = ""
    files: dict[str, str] = {}
    """split -> the files under subdir/ that hold it"""

    def __init__(self, root: str | Path | None = None, *, instruct: bool = False):
        if instruct:  # (a TypeError before: no such argument)
            raise ConfigError(f"{self.name} takes its prompts from the files; instruct is a generated task's option")
        self.root = Path(root) if root is not None else DEFAULT_ROOT
        if not (self.root / self.subdir).is_dir():
            raise DataError(f"{self.name} data not found under {self.root / self.subdir}; "
                            f"pass root= the folder holding {self.subdir}/")

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """n examples of the split in a seeded random order (all of them when n is None)."""
        check_request(split, 0 if n is None else n)
        rows = self.load(split)
        if not rows:  # (an accuracy over no examples is 0/0, and a wrong root= finds none)
            raise DataError(f"the {self.name} {split} split is empty: no records in {self.root / self.subdir}/"
                            f"{self.files[split]}; pass root= the folder whose {self.subdir}/ holds them")
        if n is not None and n > len(rows):
            raise ConfigError(f"n={n}: the {self.name} {split} split has {len(rows)} examples; ask for 0 to "
                              f"{len(rows)}, or n=None for all")
        random.Random(f"{self.name}:{seed}").shuffle(rows)
        return rows if n is None else rows[:n]


class GSM8K(_FileTask):
    name, subdir = "gsm8k", "gsm8k"
    files = {"train": "train.jsonl", "test": "test.jsonl"}
    templates = ("{q}", "Question: {q}\nSolve step by step and end with 'Answer: <number>'.")

    def load(self, split: str) -> list[Example]:
        """The split's records, read by the data pipeline's one JSON reader (`json_records`: blank lines skipped, a
        byte-order mark dropped); a record's index, not its line, keys it."""
        from lmforge.data.readers import ARCHIVE_ERRORS, NotCompressed, json_records

        path = self.root / "gsm8k" / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"the gsm8k {split} split reads {path}, which is not a file; put {split}.jsonl there or "
                            f"pass root= the folder holding gsm8k/")
        out = []
        try:
            records = list(json_records(path))
        except NotCompressed:  # (its own words say to rename it, but this split reads {split}.jsonl only)
            raise DataError(f"{path} holds compressed bytes: decompress it in place (gunzip -c / zstd -dc it to "
                            f"{split}.jsonl)") from None
        except (OSError, *ARCHIVE_ERRORS) as e:
            raise DataError(f"the gsm8k {split} split cannot be read: {e}") from None
        for i, rec in enumerate(records):
            where = f"{path}:{rec.key}"
            value = rec.value if isinstance(rec.value, dict) else {}
            question, answer = value.get("question"), value.get("answer")
            if rec.error is not None or not (isinstance(question, str) and isinstance(answer, str)):
                raise DataError(f"{where}: not a GSM8K record ({{'question': text, 'answer': text}}): "
                                f"{rec.error or repr(rec.value)[:80]}")
            if "####" not in answer:
                raise DataError(f"{where}: the answer has no '#### <final answer>' line")
            work, _, ans = answer.rpartition("####")
            work = re.sub(r"<<[^>]*>>", "", work).strip()  # drop the calculator annotations
            ans = ans.strip().replace(",", "")
            out.append(Example(prompt=self.templates[i % len(self.templates)].format(q=question),
                               answer=ans, solution=f"{work}\nAnswer: {ans}", key=f"gsm8k:{split}:{i}"))
        return out

    def parse(self, completion: str, example: Example | None = None) -> str | None:
        """The first number on the line of GSM8K's first '####' (lm-eval's strict match), else after the last
        'Answer:', else after the last 'the answer is' before a number (lm-eval's gsm8k-cot mark; `final_answer`: not
        'Answer: 42\\nThe answer is in dollars.'), else in the last \\boxed{} (a number after it,
        "\\boxed{18}. Check: 3 * 6", is no answer), else the last number in the text (lm-eval's flexible extract).
        '####' comes first because it is GSM8K's own mark and its first because a base model runs on into an
        invented next question with a '####' of its own; 'answer:' is a phrase working can hold. A marked answer
        worked as arithmetic, units and all ("Answer: 3 + 4 = 7", "the answer is 15 gallons * 8 pints / gallon =
        120 pints"), is the one number after its last '=' ("Answer: 5 hours = 300 minutes" stays 5). A Unicode
        minus sign (U+2212, as typeset text writes it) is a minus; a bare decimal point starts a number ('.5', as
        lm-eval's regexes read it, never 5)."""
        completion = reply(completion).replace("\u2212", "-")
        marked = re.match(r"\s*(.*)", completion.split("####", 2)[1]).group(1) if "####" in completion else None
        if marked is None:
            marked = final_answer(completion, self.answer_shape)
        if marked is None:
            marked = last_boxed(completion)
        lhs, eq, rhs = (marked or "").rpartition("=")
        # "3 + 4 = 7" -> 7, not "(= 3 + 4)"; only after working: "5 hours = 300 minutes", "x = 5, y = 7" keep 5
        if eq and _WORKED.fullmatch(lhs) and len(NUMBER_RE.findall(rhs)) == 1:
            marked = rhs
        nums = NUMBER_RE.findall(marked if marked is not None else completion)
        if not nums:
            return None
        return (nums[0] if marked is not None else nums[-1]).replace("$", "").replace(",", "").rstrip(".")

    def verify(self, example: Example, completion: str) -> bool:
        """The parsed number equals the answer as a value: lm-eval compares strings (after dropping ',', '$' and a
        final '.'), which a right '5.0' fails; here '5.0' is 5 and '.5' is 0.5 (so not 5, as in lm-eval)."""
        got = self.parse(completion, example)
        try:
            return got is not None and float(got) == float(example.answer)
        except ValueError:
            return False


def _csv_text(path: Path) -> io.StringIO:
    """A CSV file's text as csv.reader reads it, decoded as the data pipeline decodes text (`decode_text`: a
    spreadsheet's byte-order mark is no part of the first question, Windows-1252 bytes are read as such)."""
    from lmforge.data.readers import decode_text

    return io.StringIO(decode_text(path.read_bytes())[0], newline="")


# an option letter: "(b)" or "(B)", a capital standing alone, or a lowercase letter that ends the answer (followed by
# punctuation or the line's end, so the article in "Answer: a matter of taste" is not option A)
_OPTION = r"(?:\(([a-dA-D])\)|(?-i:([A-D]))\b|(?-i:([a-d]))(?=[).,;:!?]|[ \t]*(?:\n|$)))"


# with no option marked, the FIRST of the first kind a reply holds: a parenthesised capital "(C)", else a capital A-D
# standing alone that is not the article before a lowercase word ("A good question"; "A is correct" is no article),
# else that article. A reply with no mark names its choice first ("B is correct; A, C and D are wrong", "Option (B)
# is right, not (A)"); lm-eval's flan-cot flexible-extract takes the last "(X)" of a chain of thought, whose
# conclusion is read here before the fallback, from its "the answer is (C)"
# what follows an option letter, not the article: a verb ("A is correct") or a list of options ("A and B are wrong")
_VERB = r"(?:is|was|would|seems|looks|appears|fits|matches|best|because|since|and|or|nor|vs)\b"
_FALLBACKS = (re.compile(r"\(([A-D])\)"), re.compile(rf"\b([B-D]|A(?!\s+(?!{_VERB})[a-z]))\b"),
              re.compile(r"\b([A-D])\b"))


def _letter(m) -> str:
    groups = m.groups() if isinstance(m, re.Match) else m
    return next(g for g in groups if g).upper()


class MMLU(_FileTask):
    name, subdir = "mmlu", "mmlu"
    files = {"train": "{dev,val}/*.csv", "test": "test/*.csv"}
    templates = ("{q}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer with the letter of the correct option.",)
    answer_shape = _OPTION  # 'the answer is (b)', 'the answer is B', not 'the answer is a matter of taste'

    def load(self, split: str) -> list[Example]:
        out = []
        for part in (("dev", "val") if split == "train" else ("test",)):
            for path in sorted((self.root / "mmlu" / part).glob("*.csv")):
                subject = path.stem.rsplit("_", 1)[0]
                for i, row in enumerate(csv.reader(_csv_text(path))):
                    if not row or (i == 0 and len(row) == 6 and row[5].strip().lower() == "answer"):
                        continue  # a blank line (a spreadsheet's last one); a header row (pandas' to_csv writes one)
                    if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                        raise DataError(f"{path}:{i + 1}: an MMLU row is question,A,B,C,D,answer with the answer "
                                        f"one of A-D; got {len(row)} columns" + (f", answer {row[5]!r}"
                                                                                 if len(row) == 6 else ""))
                    q, a, b, c, d, ans = row[:5] + [row[5].strip()]
                    out.append(Example(prompt=self.templates[0].format(q=q, A=a, B=b, C=c, D=d), answer=ans,
                                       solution=f"Answer: {ans}", key=f"mmlu:{part}:{subject}:{i}",
                                       meta={"subject": subject}))
        return out

    def parse(self, completion: str, example: Example | None = None) -> str | None:
        """The letter of the final answer (`final_answer`: after the last 'Answer:', else the last 'the answer is'
        before an option), else in the last \\boxed{}, else the first standalone capital of the text (or of a marked
        line that starts with no option; `_FALLBACKS`: the first '(C)', else the first capital A-D as a word that is
        not the article in 'A good question', else that article); None without one. A lowercase
        letter counts only as a whole marked answer ("b", "(b)", "b.", not the article in "the answer is a matter of
        ...")."""
        completion = reply(completion)
        marked = final_answer(completion, self.answer_shape)
        if marked is not None:
            m = re.match(r"[^\w(]*" + _OPTION, marked)
            if m:
                return _letter(m)
        boxed = last_boxed(completion) if marked is None else None
        if boxed is not None:  # \boxed{B}, \boxed{(B)}, \boxed{\text{B. Paris}}
            boxed = re.sub(r"\\text(?:bf)?\{(.*)\}", r"\1", boxed)
        m = re.match(r"[^\w(]*" + _OPTION, boxed) if boxed is not None else None
        if m:
            return _letter(m)
        text = marked if marked is not None else completion
        return next((m.group(1) for m in (p.search(text) for p in _FALLBACKS) if m), None)

"""Every fenced example in README.md runs: Python blocks as written, shell commands at toy size (in
process, through `lmforge.cli.main`, with flags appended that shrink the run), so the README stays true."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# flags appended to a command so that it runs in seconds (later flags win)
TOY = {
    "demo": ["--steps", "3", "--corpus-mb", "0.05", "--tokenizer", "byte", "--depth", "1", "--seq-len", "32",
             "--batch-size", "2", "--samples", "1", "--device", "cpu"],
    "train": ["--max-steps", "4", "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "4", "--data.batch-size",
              "2", "--data.seq-len", "32", "--model.d-model", "32", "--model.n-layers", "1", "--model.n-heads", "2",
              "--model.n-kv-heads", "1", "--progress", "False"],
    "tokenizer": ["--progress", "False"],
    "sample": ["--max-tokens", "8"],
    "generate": ["--max-tokens", "8"],
}
NOT_RUN = ("pip ", "python -m pytest")  # installing, and the test suite itself
NOT_RUN_BLOCK = "# not run"  # a block whose first line says so is documentation only (docs/*.md)


def fenced(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shell_commands(text: str = README) -> list[list[str]]:
    """The `lmforge ...` commands of the bash blocks of `text`, in order, as argv lists (without `lmforge`)."""
    out = []
    for block in fenced("bash", text):
        if block.startswith(NOT_RUN_BLOCK):
            continue
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&") if line and not line.startswith("#") else []:
                part = part.strip()
                if part.startswith(NOT_RUN):
                    continue
                argv = shlex.split(part)
                assert argv[0] == "lmforge", f"README runs something other than lmforge: {part!r}"
                out.append(argv[1:])
    return out


@pytest.fixture(scope="module")
def corpus() -> str:
    from lmforge.demo import stdlib_corpus

    return "\n".join(stdlib_corpus(100_000))


@pytest.fixture
def workdir(tmp_path, monkeypatch, corpus):
    """A fresh directory with a small corpus.txt (Python's own sources) and the repo's examples/."""
    (tmp_path / "corpus.txt").write_text(corpus)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_blocks_run_as_written(workdir, capsys):
    blocks = fenced("python")
    assert blocks and all("..." not in b for b in blocks)
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.steps == scope["cfg"].max_steps
    assert result.final_val_loss < math.log(scope["tok"].vocab_size) - 1  # it learned
    assert isinstance(scope["out"][0].text, str) and len(scope["out"][0].token_ids) >= 1
    assert "validation loss" in capsys.readouterr().out


def test_readme_shell_commands_run_at_toy_size(workdir, capsys):
    commands = shell_commands()
    assert [c[0] for c in commands] == ["demo", "tokenizer", "tokenizer", "train", "sample", "generate", "--help"]
    for argv in commands:
        extra = TOY.get(argv[0], [])
        assert main([*argv, *extra]) == 0, argv
    from lmforge.data.shards import TokenFile

    assert len(TokenFile(workdir / "shards" / "train.bin")) > 0 and (workdir / "tok" / "tokenizer.json").is_file()
    assert list((workdir / "runs" / "tiny" / "checkpoints").glob("step_000004"))
    rows = [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["To be", "Or not"] and all(len(r["samples"]) == 2 for r in rows)
    out = capsys.readouterr().out
    assert "--- sample 1/1" in out and "top:" in out  # sample --logprobs 3 prints the top 3 per token


def test_readme_tree_names_files_that_exist_and_every_package():
    """The annotated tree under "Where things are": each entry exists, each file its description names
    (`resume.py`, `policy/`, `h200_owed.sh`, ...) is found under that entry's folder, and every package of
    lmforge/ has its entry."""
    tree = fenced("", README[README.index("## Where things are"):README.index("## Using it")])[0]
    folders = {0: ROOT}  # indent -> the folder the entries at that indent are in
    here, entries, missing = ROOT, [], []
    for line in tree.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent in (0, 2, 4):  # an entry: `name/` or `a.py, b.py`, then its description
            names = re.match(r"\s*([^\s,]+(?:, [^\s,]+)*)", line).group(1).split(", ")
            paths = [folders[indent] / n for n in names]
            missing += [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
            entries += paths
            here = paths[0] if paths[0].is_dir() else paths[0].parent
            folders[indent + 2] = here
        description = line[22:] if indent < 22 else line
        for name in re.findall(r"(?<![\w./$-])([a-z_0-9]+(?:\.(?:py|sh|cu)|/))(?=[\s:;,)]|$)", description):
            if not any(here.rglob(name.rstrip("/"))):
                missing.append(f"{here.relative_to(ROOT)}: {name}")
    assert missing == []
    packages = {p for p in (ROOT / "lmforge").iterdir() if (p / "__init__.py").is_file()}
    assert packages - set(entries) == set()


# Syllabus topics (the course lmforge follows) that have no code yet -> a definition their code would add to
# lmforge/. README's "Not yet" paragraph must name each, and none may have that code: a topic that gets it moves
# to "What works today".
NOT_YET = {
    "REINFORCE": r"class \w*(Reinforce|PPO|GRPO)\w*Objective",
    "best-of-N": r"def \w*(best_of|majority)\w*\(",
    "Mamba": r"class \w*Mamba\w*\(",
    "ENTP": r"class \w*(ENTP|EncoderOnly)\w*\(",
    "masked LM": r"class \w*(Masked|MLM)\w*\(",
    "diffusion LMs": r"class \w*Diffusion\w*\(",
    "SpecTr": r"class \w*SpecTr\w*\(",
    "Lexico": r"class \w*Lexico\w*\(",
    "HellaSwag": r"def \w*hellaswag\w*\(",
    "ReAct": r"class \w*ReAct\w*\(",
}


def test_readme_not_yet_names_the_syllabus_topics_without_code():
    not_yet = " ".join(README[README.index("\nNot yet: "):README.index("## Benchmarks")].split())
    sources = "\n".join(p.read_text() for p in (ROOT / "lmforge").rglob("*.py"))
    assert [topic for topic in NOT_YET if topic not in not_yet] == []
    built = [topic for topic, made in NOT_YET.items() if re.search(made, sources, flags=re.I)]
    assert built == [], f"{built} now have code: move them from README's 'Not yet' to 'What works today'"

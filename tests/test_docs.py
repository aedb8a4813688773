"""The guides' examples run: every ```python block of docs/inference.md, docs/training.md and docs/rl.md, in order and
in one namespace per guide, in a scratch directory (the asserts inside them check real values against a
reference), then the guide's `lmforge` shell commands at toy size, as tests/test_readme.py does for the
README. A bash or toml block whose first line starts with "# not run" is documentation only; a toml block
whose first line is "# NAME.toml" is written to NAME.toml before the commands run."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.checkpoint import checkpoint_dirs

from .test_readme import NOT_RUN_BLOCK, TOY, fenced, shell_commands

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A fresh working directory; one thread (tiny models run faster on one than on two contended ones)."""
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(n)


def registries() -> list[dict]:
    """The process-wide tables a guide's example may register into (register_objective, register_data_kind,
    register_base_layer, register_policy, register_model)."""
    from lmforge.align.config import DATA_KINDS, OBJECTIVES
    from lmforge.infer.kv.policy import EXAMPLES, POLICIES
    from lmforge.model.registry import MODELS
    from lmforge.model.surgery import BASE_LAYERS

    return [OBJECTIVES, DATA_KINDS, BASE_LAYERS, POLICIES, EXAMPLES, MODELS]


def run_guide(name: str) -> tuple[dict, list[list[str]]]:
    """Run the guide's python blocks in one namespace, write its named toml files, run its shell commands
    (with TOY's flags appended); returns the namespace and the commands that ran. What the blocks register is
    unregistered after (the tables are the process's: a later test, or the guide run again, would meet it)."""
    tables = registries()
    kept = [dict(t) for t in tables]
    try:
        return _run_guide(name)
    finally:
        for table, before in zip(tables, kept):
            table.clear()
            table.update(before)


def _run_guide(name: str) -> tuple[dict, list[list[str]]]:
    text = (DOCS / name).read_text()
    blocks = fenced("python", text)
    assert blocks and all("..." not in b for b in blocks), f"{name}: a python block is not runnable as written"
    # the blocks run in a module, as a script's lines do: what they define is importable as 'module:name' (the
    # functions a DataKindSpec names) while the guide runs
    guide = types.ModuleType(f"docs_{Path(name).stem}")
    scope = guide.__dict__
    sys.modules[guide.__name__] = guide
    try:
        for code in blocks:
            exec(compile(code, str(DOCS / name), "exec"), scope)
    finally:
        sys.modules.pop(guide.__name__)
    for block in fenced("toml", text):
        first = block.splitlines()[0]
        if not first.startswith(NOT_RUN_BLOCK):
            Path(first.removeprefix("# ").strip()).write_text(block)
    commands = shell_commands(text)
    for argv in commands:
        assert main([*argv, *TOY.get(argv[0], [])]) == 0, argv
    return scope, commands


def test_inference_guide_runs(scratch, capsys):
    scope, commands = run_guide("inference.md")
    assert [c[0] for c in commands] == ["generate", "sample"]  # chat is interactive: documented, not run
    assert scope["out"].text.startswith(" sat on the log.")
    rows = [json.loads(line) for line in (scratch / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the dog", "the cat"] and all(len(r["samples"]) == 2 for r in rows)
    assert "top:" in capsys.readouterr().out  # sample --logprobs 3 prints the top tokens per step


def test_training_guide_runs(scratch):
    before = [dict(t) for t in registries()]
    scope, commands = run_guide("training.md")
    # what it registered (a data kind, a base layer) is gone: left, a later test met a kind whose module was gone
    assert [dict(t) for t in registries()] == before
    assert commands == [["sft", "--config", "sft.toml"]]  # train --nproc and the README's train: not run here
    assert scope["result"].stop_reason == "copying learned"
    assert [p.name for p in checkpoint_dirs(scratch / "runs" / "sft-cli")][-1] == "step_000006"


def test_rl_guide_runs(scratch):
    scope, commands = run_guide("rl.md")
    assert commands == []
    mask = scope["mask"]
    assert scope["values"].shape == mask.shape and float(scope["values"].detach().abs().max()) == 0.0  # zero-init head
    assert abs(float(scope["adv"][mask].mean())) < 1e-6  # whitened advantages over the response tokens
    scores = scope["prm"](torch.zeros(1, 1, dtype=torch.long)).shape  # a per-token value per position
    assert scores == (1, 1)
    steps = scope["prm_scores"](scope["prm"], scope["tok"], "12+9=?\n", ["2+9+0=11", "1+0+1=3"])
    assert len(steps) == 2 and all(0.0 < p < 1.0 for p in steps)
    assert [p.name for p in checkpoint_dirs(scratch / "runs" / "prm")][-1] == "step_000020"


def test_inference_guide_lists_every_sampling_field():
    """docs/inference.md's table of SamplingParams fields names every field (it said "the fields" and left
    skip_special_tokens out), so a field added later must be documented there."""
    import dataclasses
    import re

    from lmforge.infer.sampling import SamplingParams

    text = (DOCS / "inference.md").read_text()
    table = text[text.index("| field | what it does |"):text.index("The filters keep what")]
    named = {name for cell in re.findall(r"^\| ([^|]+) \|", table, flags=re.M) for name in re.findall(r"`(\w+)`", cell)}
    assert [f.name for f in dataclasses.fields(SamplingParams) if f.name not in named] == []


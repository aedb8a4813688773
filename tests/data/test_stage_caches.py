"""The per-process caches of the decontam and tokenize stages follow the files behind them: keyed on the resolved
path, size and mtime of each (a name alone gave a changed file's old contents for the rest of the process)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from lmforge.data import decontam as dc
from lmforge.data.document import Document
from lmforge.data.stage import StageContext

OLD_NS = time.time_ns() - 3600 * 10**9  # (an hour ago: a folder that settled long before the run)


def _write(path, text: str, mtime_ns: int = OLD_NS) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.mark.parametrize("named", ["evals/test.jsonl", "evals"])
def test_eval_ngrams_are_keyed_on_resolved_paths(tmp_path, monkeypatch, named):
    """Two checkouts' evals/test.jsonl of one size and time, in folders of one time (cp -a, tar x): keyed on the
    relative name, the second directory's eval set was the first's."""
    for name, q in (("a", "aaa bbb ccc ddd eee"), ("b", "fff ggg hhh iii jjj")):  # (one size)
        (tmp_path / name / "evals").mkdir(parents=True)
        _write(tmp_path / name / "evals" / "test.jsonl", json.dumps({"q": q}) + "\n")
        os.utime(tmp_path / name / "evals", ns=(OLD_NS, OLD_NS))
    cfg = dc.DecontamConfig(eval_paths=(named,), ngram=4)
    docs = lambda: [Document(id="a", text="aaa bbb ccc ddd"), Document(id="b", text="fff ggg hhh iii")]  # noqa: E731
    monkeypatch.chdir(tmp_path / "a")
    assert [d.drop for d in dc.decontam(cfg, docs(), StageContext())] == ["decontam", None]
    monkeypatch.chdir(tmp_path / "b")
    assert [d.drop for d in dc.decontam(cfg, docs(), StageContext())] == [None, "decontam"]


def test_the_tokenize_stage_reads_a_rewritten_tokenizer_file_again(tmp_path):
    """The stage's tokenizer was cached on its spec: a tokenizer saved again over the same file (a notebook's
    retrained one) was never read, and later shards were written with the old ids."""
    from lmforge.data.shards import TokenFile
    from lmforge.data.tokenize import TokenizeConfig, _tokenizer, tokenize
    from lmforge.tokenizer.bpe import Tokenizer
    from lmforge.tokenizer.train import train_bpe

    spec = str(tmp_path / "tok" / "lmforge_tokenizer.json")
    first = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    first.save(spec)
    cfg, ctx = TokenizeConfig(tokenizer=spec, out_dir="tokens"), StageContext(workdir=tmp_path)
    text = "the cat sat on the mat"
    tokenize(cfg, [Document(id="a", text=text)], ctx)
    assert len(TokenFile(tmp_path / "tokens" / "shard-00000.bin").tokens) == 1 + len(text)
    second = train_bpe(iter([text * 50]), 270, ["<|endoftext|>"], progress=False, workers=1)
    second.save(spec)
    assert _tokenizer(spec).merges == second.merges
    tokenize(cfg, [Document(id="a", text=text)], StageContext(workdir=tmp_path, shard="shard-00001"))
    ids = np.asarray(TokenFile(tmp_path / "tokens" / "shard-00001.bin").tokens).tolist()
    assert ids == [second.eot_id, *second.encode_ordinary(text)] and len(ids) < 1 + len(text)


def test_the_tokenize_stage_keeps_its_tokenizer_while_files_are_written_beside_it(tmp_path, monkeypatch):
    """The tokenizer's key held its folder's time: with the shards written beside the tokenizer, every batch read it
    again (0.45 s a batch for a 50k-vocabulary tokenizer.json)."""
    import lmforge.tokenizer.load as load
    from lmforge.data.tokenize import TokenizeConfig, tokenize
    from lmforge.tokenizer.bpe import Tokenizer

    spec = str(tmp_path / "tokens" / "lmforge_tokenizer.json")
    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(spec)
    loads = []
    real = load.load_tokenizer
    monkeypatch.setattr(load, "load_tokenizer", lambda s: loads.append(s) or real(s))
    cfg = TokenizeConfig(tokenizer=spec, out_dir="tokens")
    for i in range(3):
        time.sleep(0.01)  # (a folder time that differs between batches on a coarse clock)
        tokenize(cfg, [Document(id="a", text="the cat")], StageContext(workdir=tmp_path, shard=f"shard-{i:05d}"))
    assert len(list((tmp_path / "tokens").glob("shard-*.bin"))) == 3 and len(loads) == 1

"""The per-process caches of the decontam and tokenize stages follow the files behind them: keyed on the resolved
path, size and mtime of each (a name alone gave a changed file's old contents for the rest of the process), and
decontam lists its eval folders again only when one of them changed (it walked them for every batch)."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from lmforge.data import decontam as dc
from lmforge.data.document import Document
from lmforge.data.stage import StageContext

OLD_NS = time.time_ns() - 3600 * 10**9  # (an hour ago: a folder that settled long before the run)


def _write(path, text: str, mtime_ns: int = OLD_NS) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_eval_ngrams_are_keyed_on_resolved_paths(tmp_path, monkeypatch):
    """Two checkouts' evals/test.jsonl of one size and time (cp -p): keyed on the relative name, the second
    directory's eval set was the first's."""
    for name, q in (("a", "aaa bbb ccc ddd eee"), ("b", "fff ggg hhh iii jjj")):  # (one size)
        (tmp_path / name / "evals").mkdir(parents=True)
        _write(tmp_path / name / "evals" / "test.jsonl", json.dumps({"q": q}) + "\n")
    cfg = dc.DecontamConfig(eval_paths=("evals/test.jsonl",), ngram=4)
    docs = lambda: [Document(id="a", text="aaa bbb ccc ddd"), Document(id="b", text="fff ggg hhh iii")]  # noqa: E731
    monkeypatch.chdir(tmp_path / "a")
    assert [d.drop for d in dc.decontam(cfg, docs(), StageContext())] == ["decontam", None]
    monkeypatch.chdir(tmp_path / "b")
    assert [d.drop for d in dc.decontam(cfg, docs(), StageContext())] == [None, "decontam"]


def test_decontam_lists_its_eval_folders_again_only_when_they_change(tmp_path, monkeypatch):
    """A settled eval folder is listed once, not for every batch (~25 ms a batch for 200 files); a file added to it,
    or to a folder below it, is seen at the next batch all the same, and an edited file is read again."""
    evals = tmp_path / "evals"
    (evals / "mmlu").mkdir(parents=True)
    _write(evals / "gsm_test.jsonl", json.dumps({"q": "one two three four five"}) + "\n")
    for folder in (evals / "mmlu", evals):
        os.utime(folder, ns=(OLD_NS, OLD_NS))
    walks = []
    listing = dc.eval_files
    monkeypatch.setattr(dc, "eval_files", lambda paths: walks.append(paths) or listing(paths))
    cfg = dc.DecontamConfig(eval_paths=(str(evals),), ngram=4)

    def drops() -> list:
        docs = [Document(id=k, text=t) for k, t in (("gsm", "one two three four"), ("mmlu", "alpha beta gamma delta"),
                                                    ("edit", "six seven eight nine"))]
        return [d.drop for d in dc.decontam(cfg, docs, StageContext())]

    assert [drops() for _ in range(3)] == [["decontam", None, None]] * 3
    assert len(walks) == 1
    _write(evals / "gsm_test.jsonl", json.dumps({"q": "six seven eight nine ten"}) + "\n", OLD_NS + 1)  # (in place)
    assert drops() == [None, None, "decontam"] and len(walks) == 1
    (evals / "mmlu" / "test.jsonl").write_text(json.dumps({"q": "alpha beta gamma delta"}) + "\n")
    assert drops() == [None, "decontam", "decontam"] and len(walks) == 2
    # a folder changed within the last seconds may change again unseen in the same tick of its time: listed each time
    drops()
    assert len(walks) == 3


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

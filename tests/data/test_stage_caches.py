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


def _replace(src, dst) -> None:
    """Copy src over dst as a retraining script saves a model (a new file renamed onto the old one), with a later
    time (a coarse clock gives two saves one time otherwise)."""
    import shutil

    shutil.copyfile(src, dst)
    t = os.stat(dst).st_mtime_ns + 10**9
    os.utime(dst, ns=(t, t))


def test_a_fasttext_model_rewritten_in_the_process_is_read_again(tmp_path):
    """load_fasttext was keyed on the resolved path alone: a model retrained over its file between two pipeline runs
    in one process (a notebook) was never read again, and the second run scored with the old model."""
    from pathlib import Path

    from lmforge.data.fasttext_model import load_fasttext

    load_fasttext.cache_clear()  # (what other tests loaded)
    fixtures = Path(__file__).parent / "fasttext"
    path = tmp_path / "model.bin"
    _replace(fixtures / "softmax.bin", path)
    assert load_fasttext(str(path)).args.loss == "softmax"
    _replace(fixtures / "hs.bin", path)
    assert load_fasttext(str(path)).args.loss == "hs"
    assert load_fasttext(f"{tmp_path}/./model.bin").args.loss == "hs"  # another name of the file: the same entry
    info = load_fasttext.cache_info()
    assert (info.misses, info.hits) == (2, 1) and info.currsize == 1  # the old model replaced, not kept beside


def test_a_classifier_retrained_into_its_directory_is_read_again(tmp_path):
    from lmforge.data.classifier import ClassifierConfig, load_classifier, train_classifier

    load_classifier.cache_clear()
    out = tmp_path / "clf"
    cfg = ClassifierConfig(buckets=1 << 10, epochs=1)
    train_classifier(["good text here"] * 4, ["bad text"] * 4, cfg).save(out)
    first = load_classifier(str(out)).emb.copy()
    train_classifier(["other good"] * 4, ["other bad words"] * 4, ClassifierConfig(buckets=1 << 11, epochs=1)).save(out)
    for f in out.iterdir():  # (a later time, as a real retraining minutes later)
        t = os.stat(f).st_mtime_ns + 10**9
        os.utime(f, ns=(t, t))
    assert first.shape[0] == 1 << 10 and load_classifier(str(out)).emb.shape[0] == 1 << 11
    assert load_classifier.cache_info().currsize == 1


def test_a_perplexity_checkpoint_rewritten_in_the_process_is_read_again(tmp_path):
    """load_scorer was an lru_cache on its spec string: a local checkpoint directory saved again was never re-read."""
    import lmforge as lf
    from lmforge.data.perplexity import load_scorer
    from lmforge.tokenizer.byte import ByteTokenizer

    def save(seed: int):
        import torch

        torch.manual_seed(seed)
        cfg = lf.ModelConfig.preset("llama-tiny", vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    max_seq_len=64)
        model = lf.Transformer(cfg)
        model.save_pretrained(tmp_path)
        for f in tmp_path.iterdir():
            t = os.stat(f).st_mtime_ns + seed * 10**9
            os.utime(f, ns=(t, t))
        return model

    load_scorer.cache_clear()
    ByteTokenizer().save(tmp_path)
    first = save(1)
    got = load_scorer(str(tmp_path))[0]
    assert all((a == b).all() for a, b in zip(got.state_dict().values(), first.state_dict().values()))
    second = save(2)
    got = load_scorer(str(tmp_path))[0]
    assert all((a == b).all() for a, b in zip(got.state_dict().values(), second.state_dict().values()))
    assert load_scorer.cache_info().currsize == 1
    load_scorer.cache_clear()


def test_once_per_file_keys_on_the_files_a_name_stands_for(tmp_path):
    from lmforge.utils import once_per_file

    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.txt", "one")
    loads = []

    @once_per_file(files_of=lambda name, suffix: [tmp_path / name / "a.txt"])
    def load(name, suffix):
        loads.append(name)
        return (tmp_path / name / "a.txt").read_text() + suffix

    assert load("d", "!") == "one!" and load("d", "!") == "one!" and loads == ["d"]
    _write(tmp_path / "d" / "a.txt", "two", OLD_NS + 10**9)
    assert load("d", "!") == "two!" and loads == ["d", "d"] and load.cache_info().currsize == 1
    assert load("d", "?") == "two?" and load.cache_info().currsize == 2  # the other args: another entry

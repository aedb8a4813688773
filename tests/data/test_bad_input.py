"""Bad input through a whole pipeline: an .html file that is binary (a document rejected with a one-line reason
naming the file, which the run report counts: input = kept + rejected), a fastText model that is missing, truncated
or of another format version, or a langid code that is not a label (refused before the run, in one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.executor import run_local
from lmforge.data.pipeline import load_pipeline
from lmforge.data.readers import read_documents
from lmforge.data.tokenize import OWNER

FIXTURES = Path(__file__).parent / "fasttext"
PAGE = ("<html><head><title>Solar boats</title></head><body><article><h1>Solar boats</h1><p>Three solar boats "
        "crossed the lake on Sunday, the first crossing made without any fuel at all, said the crews.</p>"
        "</article></body></html>")


def _run(tmp_path: Path, name: str, stages: str) -> tuple[dict, list]:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{tmp_path / name}"\n'
                 + stages)
    report = run_local(load_pipeline(p))
    rejected = [d for f in sorted((tmp_path / name / "rejected").glob("*.jsonl")) for d in read_documents(f)]
    return report, rejected


def test_binary_page_is_counted_as_rejected(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.html").write_text(PAGE, encoding="utf-8")
    (src / "photo.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    report, rejected = _run(tmp_path, "binary", '[[stages]]\nstage = "extract"\n')
    assert {s["name"]: s["rejected"] for s in report["stages"]}["extract"] == {"extract:not_html": 1}
    assert report["balance"] == {"input_docs": 2, "added_docs": 0, "kept_docs": 1, "rejected_docs": 1, "balanced": True}
    assert report["counters"]["extract.backend.resiliparse"] == 1  # the extractor used, in the report
    assert [d.meta["error"] for d in rejected] == [f"{src / 'photo.html'}: not an HTML page (binary content)"]


def test_bad_models_and_language_codes_are_refused_before_any_document_is_read(tmp_path, capsys):
    """A fastText model that is missing, cut or of another format version rejected every document as
    `<stage>:bad_model`, a langid code that is not a label ("eng") every one as `langid:language`, and the run exited
    0 with nothing kept. Each is now one line naming the setting, the file or code, and the fix, before any work
    (`pipeline.check_stages`): nothing is written, and an earlier run's files stay under --restart."""
    from lmforge.cli import main

    src = tmp_path / "in"
    src.mkdir()
    (src / "good.html").write_text(PAGE, encoding="utf-8")
    good = (FIXTURES / "softmax.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:5000])
    (tmp_path / "v99.bin").write_bytes(good[:4] + (99).to_bytes(4, "little") + good[8:])
    missing = tmp_path / "models" / "jigsaw_toxic.bin"
    cases = {
        f'stage = "toxicity"\nmodel = "{missing}"':
            f"toxicity.model: fastText model {missing} does not exist; give the path of a .bin or .ftz file",
        f'stage = "quality"\nmodel = "{tmp_path / "cut.bin"}"':
            f"quality.model: {tmp_path / 'cut.bin'}: truncated fastText file (5000 bytes; ends inside the ",
        f'stage = "langid"\nmodel = "{tmp_path / "v99.bin"}"':
            f"langid.model: {tmp_path / 'v99.bin'}: fastText file format version 99 is not supported",
        'stage = "langid"\nlanguages = ["eng"]':
            "langid.languages: 'eng' is not a label of the bundled lid.176 model (did you mean 'en'?); give its ",
    }
    for i, (stage, error) in enumerate(cases.items()):
        p = tmp_path / f"p{i}.toml"
        p.write_text(f'progress = false\n[input]\npaths = ["{src}"]\n[output]\ndir = "{tmp_path / "out"}"\n'
                     f'[[stages]]\nstage = "extract"\n[[stages]]\n{stage}\n')
        assert main(["data", "run", str(p)]) == 2
        message = capsys.readouterr().err.splitlines()[0]
        assert message.startswith(f"lmforge data: error: {error}"), message
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("an earlier run's report")
    assert main(["data", "run", str(p), "--restart"]) == 2
    assert (tmp_path / "out" / "report.md").read_text() == "an earlier run's report"


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_restart_removes_only_the_runs_files_and_inputs_stay_outside(tmp_path):
    import pytest

    from lmforge.errors import ConfigError

    _jsonl(tmp_path / "in" / "a.jsonl", [{"text": "one doc"}, {"text": "two doc"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{out}"\n'
                 '[[stages]]\nstage = "exact_dedup"\n[[stages]]\nstage = "tokenize"\n')
    run_local(load_pipeline(p))
    assert (out / "tokens").is_dir() and (out / "data").is_dir()
    report = run_local(load_pipeline(p), restart=True)
    assert report["shards"]["skipped"] == 0 and (out / "my_notes.txt").read_text() == "mine"
    q = tmp_path / "q.toml"
    q.write_text(f'[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{tmp_path}"\n')
    with pytest.raises(ConfigError, match="lies inside output.dir"):
        run_local(load_pipeline(q), restart=True)
    assert (tmp_path / "in" / "a.jsonl").is_file()


def test_tokenize_keeps_every_kept_document_and_reads_specials_as_text(tmp_path):
    from lmforge.data.shards import TokenFile
    from lmforge.tokenizer.byte import ByteTokenizer

    assert ByteTokenizer().encode("a\ud800b") == list("a\ufffdb".encode())  # as the BPE tokenizer and tiktoken
    docs = [{"text": "first"}, {"text": "bad \ud800 surrogate"}, {"text": "x <|endoftext|> y"}, {"text": "last"}]
    _jsonl(tmp_path / "in" / "a.jsonl", docs)
    report, rejected = _run(tmp_path, "tok", '[[stages]]\nstage = "tokenize"\n')
    shard = TokenFile(tmp_path / "tok" / "tokens" / "shard-00000.bin")
    assert report["balance"]["kept_docs"] == 4 and not rejected and shard.header["num_docs"] == 4
    assert (shard.tokens == 256).sum() == 4  # only the separators: the text's "<|endoftext|>" stays text


def test_a_stage_that_cannot_start_fails_the_run_and_marks_nothing_done(tmp_path):
    import pytest

    from lmforge.errors import LmforgeError

    _jsonl(tmp_path / "in" / "a.jsonl", [{"text": "one doc"}, {"text": "two doc"}])
    with pytest.raises(LmforgeError, match="tokenizer not found: nope"):
        _run(tmp_path, "bad", '[[stages]]\nstage = "tokenize"\ntokenizer = "nope/"\n')
    assert not list((tmp_path / "bad").glob("_work/**/*.done.json"))


def test_a_tokenize_out_dir_no_writer_could_make_is_refused_before_any_work(tmp_path):
    """A tokenize out_dir naming an existing file, or a path under one, ran the whole pipeline: each shard's
    writer failed, every document was rejected as error:tokenize, and the run ended "balanced" with exit 0 and
    no token shard (found 2026-12-05). Now one line before anything is written."""
    import pytest

    from lmforge.errors import ConfigError

    _jsonl(tmp_path / "in" / "a.jsonl", [{"text": "one doc"}, {"text": "two doc"}])
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    fix = "set tokenize.out_dir to a new or existing directory, or move the file away"
    cases = [(str(taken), f"'{taken}' is an existing file, not a directory; {fix}"),
             (str(taken / "tok"), f"'{taken / 'tok'}' lies under '{taken}', an existing file, not a directory; {fix}"),
             ("notes.txt/tok", f"'{tmp_path / 'rel' / 'notes.txt' / 'tok'}' lies under "  # relative to output.dir
                               f"'{tmp_path / 'rel' / 'notes.txt'}', an existing file, not a directory; {fix}")]
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "notes.txt").write_text("mine\n")
    for i, (out_dir, message) in enumerate(cases):
        name = "rel" if i == 2 else f"run{i}"
        with pytest.raises(ConfigError) as e:
            _run(tmp_path, name, f'[[stages]]\nstage = "tokenize"\nout_dir = "{out_dir}"\n')
        assert str(e.value) == f"tokenize.out_dir {message}"
        assert sorted(p.name for p in (tmp_path / name).glob("*")) == (["notes.txt"] if i == 2 else [])
    assert taken.read_text() == "mine\n"


def test_html_behind_a_directory_needs_extract_and_odd_fields_are_fields(tmp_path):
    import pytest

    from lmforge.errors import ConfigError

    src = tmp_path / "in"
    src.mkdir()
    (src / "page.html").write_text(PAGE)
    with pytest.raises(ConfigError, match="page.html is HTML: its documents need `stage = \"extract\"`"):
        _run(tmp_path, "html", '[[stages]]\nstage = "exact_dedup"\n')
    (src / "page.html").unlink()
    _jsonl(src / "a.jsonl", [{"id": "a", "text": "some text", "drop": "no", "meta": "not a dict"}])
    (src / "b.txt").write_bytes(b"para one\r\nline two\r\n\r\npara two\r\n")
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{src}"]\ntext_unit = "paragraph"\n[output]\n'
                 f'dir = "{tmp_path / "o"}"\n')
    report = run_local(load_pipeline(p))
    kept = [d for f in sorted((tmp_path / "o" / "data").glob("*")) for d in read_documents(f)]
    assert report["balance"]["kept_docs"] == 3
    a = next(d for d in kept if d.id == "a")
    assert a.meta["drop"] == "no" and a.meta["meta"] == "not a dict"
    assert sorted(d.text for d in kept if d.id != "a") == ["para one\nline two", "para two\n"]


def test_a_parquet_text_column_of_numbers_is_a_rejected_record(tmp_path):
    import pytest

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lmforge.data.readers import read_parquet

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    docs = list(read_parquet(tmp_path / "ints.parquet"))
    assert [d.drop for d in docs] == ["read_error:bad_record"] * 2
    assert "column 'text' holds int, not text" in docs[0].meta["error"]


def test_a_tokenize_out_dir_that_is_output_dir_or_above_it_is_refused_and_restart_keeps_what_others_own(tmp_path):
    """out_dir "" or "." made output.dir itself the token directory, and --restart (which removes the token
    directory) removed the whole output.dir with a file of the user's in it; ".." removed the directory above,
    "../.." the inputs and the pipeline file too. "data" mixed the shards with the kept documents. A relative
    out_dir outside output.dir ("../tokens") was removed with another corpus's shards in it (found 2026-12-05)."""
    import pytest

    from lmforge.errors import ConfigError

    _jsonl(tmp_path / "in" / "a.jsonl", [{"text": "one doc"}, {"text": "two doc"}])
    out = tmp_path / "runs" / "out"
    out.mkdir(parents=True)
    (out / "my_notes.txt").write_text("mine")
    (tmp_path / "runs" / "other.txt").write_text("theirs")
    p = tmp_path / "p.toml"

    def run(out_dir: str) -> dict:
        p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{out}"\n'
                     f'[[stages]]\nstage = "tokenize"\nout_dir = "{out_dir}"\n')
        return run_local(load_pipeline(p), restart=True)

    fix = "set tokenize.out_dir to a directory of its own, such as 'tokens' (the default)"
    cases = {"": "output.dir itself", ".": "output.dir itself", str(out): "output.dir itself",
             "..": f"'{tmp_path / 'runs'}', a directory above output.dir '{out}'",
             "../..": f"'{tmp_path}', a directory above output.dir '{out}'",
             "data": f"'{out / 'data'}'", "rejected/tok": f"inside '{out / 'rejected'}'",
             "report.json": f"'{out / 'report.json'}'"}
    for out_dir, what in cases.items():
        with pytest.raises(ConfigError) as e:
            run(out_dir)
        why = (": --restart removes the token directory with everything in it" if "output.dir" in what
               else ", where the run writes its own files")
        assert str(e.value) == f"tokenize.out_dir {out_dir!r} is {what}{why}; {fix}"
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]
    assert (tmp_path / "runs" / "other.txt").is_file() and (tmp_path / "in" / "a.jsonl").is_file()

    for outside in ("../tokens", str(tmp_path / "shared")):  # not the run's to remove: only its shards are replaced
        tokens = (out / outside).resolve()
        _jsonl(tokens / "other_corpus.jsonl", [{"text": "theirs"}])
        run(outside)
        assert run(outside)["balance"]["kept_docs"] == 2
        assert sorted(f.name for f in tokens.iterdir()) == [OWNER, "other_corpus.jsonl", "shard-00000.bin"]
    assert (out / "my_notes.txt").read_text() == "mine"


def _tokenize_into(tmp_path: Path, out_dir: Path) -> Path:
    _jsonl(tmp_path / "in" / "a.jsonl", [{"text": "one doc"}, {"text": "two doc"}])
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{tmp_path / "out"}"\n'
                 f'[[stages]]\nstage = "tokenize"\nout_dir = "{out_dir}"\n')
    return p


def test_a_tokenize_out_dir_this_user_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch):
    """An out_dir under a directory without write permission: every document was rejected as error:tokenize
    (PermissionError) and the run ended "balanced" (found 2026-12-05). os.access answers as for a user without
    the permission (root writes anywhere: the real chmod case is the test below)."""
    import os

    import pytest

    from lmforge.errors import ConfigError

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real(path, mode, **kw))
    p = _tokenize_into(tmp_path, locked / "tok")
    with pytest.raises(ConfigError) as e:
        run_local(load_pipeline(p))
    assert str(e.value) == (f"tokenize.out_dir '{locked / 'tok'}' cannot be written: '{locked}' is not writable by "
                            "this user; make it writable, or set tokenize.out_dir to a directory you can write")
    assert not (tmp_path / "out").exists()


def test_a_tokenize_out_dir_under_a_read_only_directory_is_refused(tmp_path):
    import os

    import pytest

    from lmforge.errors import ConfigError

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):  # root (with CAP_DAC_OVERRIDE) writes there all the same
            pytest.skip("this user writes into a read-only directory: permissions are not enforced (root)")
        with pytest.raises(ConfigError, match="cannot be written: .* is not writable by this user"):
            run_local(load_pipeline(_tokenize_into(tmp_path, locked / "tok")))
    finally:
        locked.chmod(0o700)


def test_a_stage_that_rejects_every_document_as_an_error_fails_the_run(tmp_path, monkeypatch, capsys):
    """A stage failing on every document (here a tokenizer that cannot encode any) rejected each as
    error:<stage>, and the run ended "balanced" with exit 0 and nothing kept. Now the report is written and
    the run fails with one line naming the stage and the first error; a filter dropping everything passes."""
    import pytest

    from lmforge.cli import main
    from lmforge.data import tokenize
    from lmforge.errors import LmforgeError

    class Broken:
        vocab_size, eot_id = 257, 256

        def encode(self, text):
            raise ValueError("cannot encode")

    monkeypatch.setattr(tokenize, "_tokenizer", lambda spec: Broken())
    p = _tokenize_into(tmp_path, Path("tokens"))
    with pytest.raises(LmforgeError) as e:
        run_local(load_pipeline(p))
    assert str(e.value) == ("stage 'tokenize' rejected every document it was given (2) as error:tokenize; the "
                            "first: tokenize: ValueError: cannot encode. Fix that, then rerun with --restart (the "
                            f"report is in {tmp_path / 'out' / 'report.md'})")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["balance"]["rejected_docs"] == 2
    assert main(["data", "run", str(p)]) == 2  # resumed from the markers: the same failure, one line
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"lmforge data: error: {e.value}" and "Traceback" not in err
    monkeypatch.undo()
    assert run_local(load_pipeline(p), restart=True)["balance"]["kept_docs"] == 2

    report, rejected = _run(tmp_path, "filtered", '[[stages]]\nstage = "gopher"\n')  # too short: a decision
    assert report["balance"]["kept_docs"] == 0 and {d.drop for d in rejected} == {"gopher:word_count"}


def test_a_token_shard_that_cannot_be_written_fails_the_run_and_loses_no_document(tmp_path, monkeypatch, capsys):
    """A token writer failing (a full disk) is no document's fault: the stage was retried document by document,
    each retry rewrote the shard with its one document, and a writer failing once kept only the last document
    while counting every one as kept. Now the run fails in one line before the shard is marked done, and a
    rerun writes every document."""
    import pytest

    from lmforge.cli import main
    from lmforge.data import shards
    from lmforge.errors import DataError

    real, calls = shards.TokenShardWriter.__init__, []

    def full_once(self, path, **kw):  # the batch's write fails, later (per-document) ones succeed
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device", str(path))
        real(self, path, **kw)

    monkeypatch.setattr(shards.TokenShardWriter, "__init__", full_once)
    p = _tokenize_into(tmp_path, Path("tokens"))
    bin_path = tmp_path / "out" / "tokens" / "shard-00000.bin"
    with pytest.raises(DataError) as e:
        run_local(load_pipeline(p))
    assert str(e.value) == (f"tokenize: cannot write the token shard {bin_path}: No space left on device; fix that "
                            "and run again (the shards finished before are kept)")
    assert len(calls) == 1
    monkeypatch.undo()
    assert main(["data", "run", str(p)]) == 0  # the shard was not marked done: redone whole
    capsys.readouterr()
    assert shards.TokenFile(bin_path).tokens.size == len("one doc") + len("two doc") + 2  # both, with separators


def test_warc_responses_declaring_another_content_type_are_rejected_not_kept_as_text(tmp_path):
    """A crawl's responses hold PDFs, JSON and scripts as well as pages: text-like bytes of a declared non-HTML type
    were run through the HTML extractor and kept as documents. A page mislabelled as text/plain stays a page, and so
    does one whose server sent no Content-Type (not the WARC header's "application/http", which names the message)."""
    pytest.importorskip("warcio")
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    body = PAGE.encode().replace(b"<html>", b"")  # (opens with <head>: no sniffing finds it HTML)
    bodies = {"page": ("text/html; charset=utf-8", PAGE.encode()), "mislabelled": ("text/plain", PAGE.encode()),
              "undeclared": (None, body), "twice": ("text/html, text/html", body),
              "pdf": ("application/pdf", b"%PDF-1.4 " + b"x" * 200),
              "json": ("application/json", b'{"solar": "boats", "crossed": "the lake"}'),
              "script": ("application/javascript", b"var crews = 'three solar boats';")}
    for name, (ctype, body) in bodies.items():
        http = StatusAndHeaders("200 OK", [("Content-Type", ctype)] if ctype else [], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"http://x/{name}", "response", payload=io.BytesIO(body),
                                            http_headers=http))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "crawl.warc.gz").write_bytes(buf.getvalue())
    report, rejected = _run(tmp_path, "warc", '[[stages]]\nstage = "extract"\n')
    kept = [d for f in (tmp_path / "warc" / "data").glob("*.jsonl") for d in read_documents(f)]
    assert sorted(d.meta["url"] for d in kept) == [f"http://x/{n}" for n in ("mislabelled", "page", "twice",
                                                                               "undeclared")]
    assert all("three solar boats crossed the lake" in d.text.lower() for d in kept)
    assert {d.meta["url"]: d.meta["error"] for d in rejected} == {
        f"http://x/{n}": f"http://x/{n}: not an HTML page (Content-Type {bodies[n][0]})"
        for n in ("pdf", "json", "script")}
    assert {s["name"]: s["rejected"] for s in report["stages"]}["extract"] == {"extract:not_html": 3}
    assert report["balance"]["balanced"]


def test_an_output_dir_inside_an_input_directory_is_refused_before_the_first_run(tmp_path):
    """output.dir inside an input directory passed the first run, whose files the next run then read as inputs:
    refused only then ("input ... lies inside output.dir"), so a killed run could not be resumed or restarted."""
    from lmforge.errors import ConfigError

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("one document\n")

    def run(out: Path) -> dict:
        p = tmp_path / "p.toml"
        p.write_text(f'progress = false\n[input]\npaths = ["{src}"]\n[output]\ndir = "{out}"\n')
        return run_local(load_pipeline(p))

    with pytest.raises(ConfigError, match=f"^output.dir {src / 'out'} lies inside the input directory {src}: a "
                                          r"rerun \(a resume, --restart\) would read this run's files as inputs"):
        run(src / "out")
    assert not (src / "out").exists()
    for _ in range(2):  # a hidden folder's files are not inputs (utils.input_files): a run there resumes
        assert run(src / ".out")["balance"]["input_docs"] == 1

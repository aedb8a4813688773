"""Inputs cut, damaged or shaped unexpectedly: every loss is a `read_error:*` document, never a silently shorter
stream, and odd but valid inputs (a JSON array, a compressed page, Parquet timestamps) are read whole
(defects found by the 2026-12-06 data sweep)."""

from __future__ import annotations

import datetime
import decimal
import gzip
import io
import json
from pathlib import Path

import pytest

from lmforge.data.executor import run_local
from lmforge.data.pipeline import load_pipeline
from lmforge.data.readers import read_documents, read_warc
from lmforge.errors import ConfigError

ROWS = "".join(json.dumps({"id": str(i), "text": f"document number {i} " * 20}) + "\n" for i in range(200)).encode()


def _drops(docs):
    return [d.drop for d in docs if d.drop]


@pytest.mark.parametrize("frac", [0.3, 0.9, 0.99])
def test_a_cut_zstd_file_is_a_truncated_archive(tmp_path, frac):
    zstd = pytest.importorskip("zstandard")
    data = zstd.ZstdCompressor().compress(ROWS)
    p = tmp_path / "cut.jsonl.zst"
    p.write_bytes(data[: int(len(data) * frac)])
    docs = list(read_documents(p))  # zstandard's stream_reader gave 0 documents and no error here
    assert docs[-1].drop == "read_error:truncated_archive" and _drops(docs) == ["read_error:truncated_archive"]


def test_multi_frame_zstd_is_read_whole_and_a_cut_last_frame_is_reported(tmp_path):
    zstd = pytest.importorskip("zstandard")
    frames = [zstd.ZstdCompressor().compress(ROWS[i:i + 4000]) for i in range(0, len(ROWS), 4000)]
    p = tmp_path / "frames.jsonl.zst"
    p.write_bytes(b"".join(frames))
    assert [d.id for d in read_documents(p)] == [str(i) for i in range(200)]
    p.write_bytes(frames[0] + frames[1][:7])  # cut just inside the second frame
    docs = list(read_documents(p))
    assert _drops(docs) == ["read_error:truncated_archive"] and docs[-1].drop  # was a bad_json line


def test_a_damaged_txt_zst_is_a_read_error_not_a_traceback(tmp_path):
    pytest.importorskip("zstandard")
    p = tmp_path / "garbage.txt.zst"
    p.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 10)
    (d,) = read_documents(p)  # raised ZstdError
    assert d.drop == "read_error:corrupt_archive" and "zstd" in d.meta["error"]



@pytest.mark.parametrize("name, codec", [("plain.jsonl.gz", "gzip"), ("plain.jsonl.zst", "zstd"),
                                         ("plain.txt.gz", "gzip")])
def test_a_plain_file_named_compressed_is_told_to_be_renamed(tmp_path, name, codec):
    """A plain JSONL file named *.jsonl.gz was reported as "cut or damaged (BadGzipFile: Not a gzipped file)"
    (found 2026-12-07): the fix is a rename, not a fresh copy."""
    if codec == "zstd":
        pytest.importorskip("zstandard")
    p = tmp_path / name
    p.write_bytes(ROWS[:500])
    docs = list(read_documents(p))
    assert _drops(docs) == ["read_error:corrupt_archive"] and len(docs) == 1
    stem = name.rsplit(".", 1)[0]
    assert docs[0].meta["error"] == (f"NotCompressed: {p}: not {codec}-compressed despite its name (it starts with "
                                     f"{ROWS[:4]!r}); rename it to {stem}")


def test_a_zstd_stream_opening_with_a_skippable_frame_reads_and_a_misnamed_codec_names_the_right_suffix(tmp_path):
    """pzstd opens its output with a skippable frame (RFC 8878 3.1.2, magic 0x184D2A50): the magic check refused it
    as 'not zstd-compressed'; a gzip file named .zst was told to drop the suffix (then read as plain text)."""
    import gzip
    import struct

    zstandard = pytest.importorskip("zstandard")
    skip = struct.pack("<II", 0x184D2A50, 4) + b"pzst"
    p = tmp_path / "skip.jsonl.zst"
    p.write_bytes(skip + zstandard.ZstdCompressor().compress(ROWS))
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(ROWS)
    assert [d.text for d in read_documents(p)] == [d.text for d in read_documents(plain)] and len(plain.read_text())
    wrong = tmp_path / "wrong.jsonl.zst"
    wrong.write_bytes(gzip.compress(ROWS))
    (doc,) = read_documents(wrong)
    assert doc.meta["error"].endswith("gzip-compressed, not zstd as its name says (it starts with "
                                      f"{gzip.compress(ROWS)[:4]!r}); rename it to wrong.jsonl.gz")

@pytest.mark.parametrize("name", ["gz.jsonl", "gz.txt", "zst.jsonl"])
def test_a_compressed_file_named_plain_is_one_read_error_told_to_be_renamed(tmp_path, name):
    """A gzip or zstd file without its suffix was read as plain bytes: a .jsonl gave one `read_error:bad_json` per
    "line" of compressed bytes (a document count the bytes made up), a .txt a document of compressed bytes, kept
    (found 2026-12-07). It is one read error naming the rename, as a plain file named .gz is."""
    zstd = pytest.importorskip("zstandard") if name.startswith("zst") else None
    data = zstd.ZstdCompressor().compress(ROWS) if zstd else gzip.compress(ROWS)
    p = tmp_path / name
    p.write_bytes(data)
    docs = list(read_documents(p))
    assert _drops(docs) == ["read_error:corrupt_archive"] and len(docs) == 1
    codec, suffix = ("zstd", ".zst") if zstd else ("gzip", ".gz")
    assert docs[0].meta["error"] == (f"NotCompressed: {p}: {codec}-compressed, but its name says plain (it starts with "
                                     f"{data[:4]!r}); rename it to {name}{suffix}")


@pytest.mark.parametrize("name, unit", [("ids.txt", "file"), ("ids.txt", "line"), ("ids.jsonl", None)])
def test_a_binary_file_read_as_text_is_one_read_error_not_a_kept_document(tmp_path, name, unit):
    """Random bytes or token ids in a .txt input were kept as a document of control characters and NULs, tokenized
    into the shards with only `meta.decode_errors` to tell, and in a .jsonl input were a `bad_json` record per
    newline byte they held (found 2026-12-07); as an .html input they were already `extract:not_html`. A UTF-16
    file with its byte-order mark (NULs between ASCII letters) is text."""
    import numpy as np

    blob = tmp_path / name
    blob.write_bytes(np.arange(3000, dtype=np.uint16).tobytes())
    docs = list(read_documents(blob, **({"unit": unit} if unit else {})))
    assert _drops(docs) == ["read_error:binary"] and len(docs) == 1
    assert docs[0].meta["error"] == (f"{blob}: not text (NUL or control bytes in its first 4 KiB: binary data); "
                                     "leave it out of input.paths")
    if unit is None:
        return
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("\ufeffplain text\nsecond line\n".encode("utf-16-le"))
    assert [d.text for d in read_documents(utf16, unit=unit)] == (
        ["plain text\nsecond line\n"] if unit == "file" else ["plain text", "second line"])


def _warc(n: int, gz: bool) -> tuple[bytes, list[int]]:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf, ends = io.BytesIO(), []
    w = WARCWriter(buf, gzip=gz)
    for i in range(n):
        body = b"<html><body><p>" + b"page %d text " % i * 200 + b"</p></body></html>"
        hh = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"http://x/{i}", "response", payload=io.BytesIO(body), http_headers=hh))
        ends.append(buf.tell())
    return buf.getvalue(), ends


@pytest.mark.parametrize("gz", [False, True])
def test_a_warc_cut_anywhere_in_its_last_record_reports_it(tmp_path, gz):
    pytest.importorskip("warcio")
    data, ends = _warc(3, gz)
    p = tmp_path / ("a.warc.gz" if gz else "a.warc")
    p.write_bytes(data)
    whole = list(read_warc(p))
    assert _drops(whole) == [] and len(whole) == 3
    step = 1 if gz else 7
    for cut in range(ends[1] + 1, len(data) - 4, step):  # the last 4 bytes are the blank lines after a record
        p.write_bytes(data[:cut])
        docs = list(read_warc(p))  # a cut in the WARC/HTTP headers or a gzip member lost the record silently
        assert len(docs) == 3 and docs[2].drop == "read_error:truncated_archive", cut - ends[1]


def test_a_compressed_html_page_is_decompressed(tmp_path):
    page = b"<html><body><p>A page about solar boats crossing the lake.</p></body></html>"
    p = tmp_path / "page.html.gz"
    p.write_bytes(gzip.compress(page))
    (d,) = read_documents(p)
    assert d.raw == page
    (tmp_path / "p.toml").write_text(f'[input]\npaths = ["{p}"]\n[output]\ndir = "{tmp_path / "o"}"\n'
                                     '[[stages]]\nstage = "pii"\n')
    with pytest.raises(ConfigError, match="extract"):  # .html.gz needs extract first, as .html does
        load_pipeline(tmp_path / "p.toml")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_file_is_read_element_by_element(tmp_path, indent):
    rows = [{"id": str(i), "text": f"document {i}"} for i in range(5)] + [{"id": "x"}]
    p = tmp_path / "data.json"
    p.write_text(json.dumps(rows, indent=indent))
    docs = list(read_documents(p))
    assert [d.text for d in docs[:5]] == [f"document {i}" for i in range(5)] and _drops(docs[:5]) == []
    assert docs[5].drop == "read_error:missing_text" and docs[5].meta["where"] == "element 5"


def test_missing_text_is_not_empty_and_duplicate_ids_are_counted(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "1", "text": "one"}\n{"id": "1", "body": "no text"}\n'
                                             '{"id": "1", "text": "same id"}\n{"id": "2", "text": ""}\n')
    (tmp_path / "p.toml").write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\n'
                                     f'dir = "{tmp_path / "o"}"\nplot = false\n')
    report = run_local(load_pipeline(tmp_path / "p.toml"))
    assert report["stages"][0]["rejected"] == {"read_error:missing_text": 1, "empty": 1}
    assert report["counters"] == {"read:duplicate_ids": 1}
    assert report["balance"]["balanced"] and report["balance"]["kept_docs"] == 2


@pytest.mark.parametrize("stages", ["", '[[stages]]\nstage = "exact_dedup"\n'])  # a map phase, a global one
def test_duplicate_ids_are_counted_across_shards_and_a_resumed_run_counts_the_same(tmp_path, stages):
    """Each shard counted only the ids repeated inside it: "2" in both shards went uncounted. The ids' hashes
    travel in each shard's marker, so a run resumed from markers counts what a fresh one does."""
    (tmp_path / "in").mkdir()
    for name, ids in (("a", ["1", "2"]), ("b", ["2", "3", "3", "4"])):
        (tmp_path / "in" / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "text": f"{name} text {k}"}) + "\n"
                                                               for k, i in enumerate(ids)))
    (tmp_path / "p.toml").write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\n'
                                     f'dir = "{tmp_path / "o"}"\nplot = false\n{stages}')
    report = run_local(load_pipeline(tmp_path / "p.toml"))
    assert report["shards"]["total"] == 2 and report["counters"] == {"read:duplicate_ids": 2}
    assert "id_hashes" not in json.dumps(report)  # they stay in the markers
    (tmp_path / "o" / "_work" / "p0" / "shard-00001.done.json").unlink()  # killed before b's marker: b is redone
    report = run_local(load_pipeline(tmp_path / "p.toml"))
    assert report["shards"] == {"total": 2, "processed": 2 if stages else 1, "skipped": 0 if stages else 1}
    assert report["counters"] == {"read:duplicate_ids": 2}
    assert run_local(load_pipeline(tmp_path / "p.toml"))["counters"] == {"read:duplicate_ids": 2}  # all from markers


def test_parquet_timestamp_binary_and_decimal_columns_become_json_meta(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["some text one", "some text two"],
                             "date": [datetime.datetime(2024, 1, 2, 3, 4, 5)] * 2, "blob": [b"\x00\x01"] * 2,
                             "price": [decimal.Decimal("1.50")] * 2}), tmp_path / "in" / "t.parquet")
    d = next(iter(read_documents(tmp_path / "in" / "t.parquet")))
    assert d.meta["date"] == "2024-01-02T03:04:05" and d.meta["blob"] == "AAE=" and d.meta["price"] == "1.50"
    (tmp_path / "p.toml").write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\n'
                                     f'dir = "{tmp_path / "o"}"\nplot = false\n[[stages]]\nstage = "pii"\n')
    report = run_local(load_pipeline(tmp_path / "p.toml"))  # the JSONL writer's json.dumps raised
    assert report["balance"]["kept_docs"] == 2
    back = [x for f in Path(tmp_path / "o" / "data").glob("*") for x in read_documents(f)]
    assert sorted(x.meta["date"] for x in back) == ["2024-01-02T03:04:05"] * 2


def test_decontam_reads_compressed_and_json_array_eval_files_and_names_a_bad_line(tmp_path):
    from lmforge.data.decontam import DecontamConfig, decontam, eval_ngrams
    from lmforge.data.document import Document
    from lmforge.data.stage import StageContext
    from lmforge.errors import DataError

    item = {"question": "how many apples does the farmer sell at the market on each sunday morning"}
    (tmp_path / "a.jsonl").write_text(json.dumps(item) + "\n")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps(item) + "\n").encode()))
    (tmp_path / "test").mkdir()  # a folder of a test split: its files are eval files
    (tmp_path / "test" / "c.json").write_text(json.dumps([item]))
    plain = eval_ngrams((str(tmp_path / "a.jsonl"),), 8)
    for other in ("b.jsonl.gz", "test"):  # the .gz was read as text lines of gzip bytes; a .json dir entry skipped
        assert (eval_ngrams((str(tmp_path / other),), 8) == plain).all() and len(plain) == 7
    doc = Document(id="x", text="Q: How many apples does the farmer sell at the market on each Sunday morning?")
    (out,) = decontam(DecontamConfig(eval_paths=(str(tmp_path / "b.jsonl.gz"),), ngram=8), [doc], StageContext())
    assert out.drop == "decontam"
    (tmp_path / "bad.jsonl").write_text(json.dumps(item) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2 is not JSON"):  # was a JSONDecodeError on every doc
        eval_ngrams((str(tmp_path / "bad.jsonl"),), 8)
    (tmp_path / "short.txt").write_text("too short\n")
    with pytest.raises(DataError, match="hold no item of 8 words"):
        eval_ngrams((str(tmp_path / "short.txt"),), 8)


def test_jsonl_gz_output_is_byte_reproducible(tmp_path, monkeypatch):
    import time

    from lmforge.data.document import Document
    from lmforge.data.writers import write_jsonl

    docs = [Document(id=str(i), text=f"doc {i}") for i in range(10)]
    write_jsonl(tmp_path / "a.jsonl.gz", docs)
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)  # gzip stamps its header with time.time() unless told
    write_jsonl(tmp_path / "b.jsonl.gz", docs)
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()


def test_a_bad_parquet_meta_row_and_an_unparsable_csv_eval_are_one_line_errors(tmp_path):
    """One row whose meta is not a JSON object is that row's bad_record (it made the rest of the file
    corrupt_parquet); a CSV eval file csv cannot parse is a DataError naming it (was a csv traceback)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from lmforge.data.decontam import eval_ngrams
    from lmforge.errors import DataError

    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["one text", "two text", "three text"],
                             "meta": ['{"k": 1}', "{oops", '{"k": 3}']}), tmp_path / "t.parquet")
    docs = list(read_documents(tmp_path / "t.parquet"))
    assert [d.drop for d in docs] == [None, "read_error:bad_record", None] and docs[2].meta["k"] == 3
    (tmp_path / "big.csv").write_text('"' + "x" * 200_000 + '"\n')
    with pytest.raises(DataError, match="big.csv is not readable CSV"):
        eval_ngrams((str(tmp_path / "big.csv"),), 8)


def test_a_json_array_is_found_after_any_blank_lines_and_its_file_decompressed_once(tmp_path, monkeypatch):
    """A sniffed 4 KiB head decided "array or JSON Lines" (more blank lines than that first, and the array was read
    as one bad_json line per element line), then the file was opened and decompressed again to read it."""
    from lmforge.data import readers

    opened = []
    real = readers.open_binary
    monkeypatch.setattr(readers, "open_binary", lambda p: opened.append(p) or real(p))
    p = tmp_path / "data.json.gz"
    rows = [{"id": str(i), "text": f"document {i}"} for i in range(3)]
    p.write_bytes(gzip.compress(b"\xef\xbb\xbf" + b"\n" * 5000 + json.dumps(rows, indent=2).encode()))
    docs = list(read_documents(p))
    assert [(d.id, d.text, d.drop) for d in docs] == [(str(i), f"document {i}", None) for i in range(3)]
    assert opened == [p]


@pytest.mark.parametrize("name", ["nul.jsonl", "nul.jsonl.gz"])
def test_a_jsonl_opening_with_a_line_of_nuls_keeps_its_good_records(tmp_path, name):
    """A first line of NUL bytes made the whole file one `read_error:binary` (its head has a NUL, so looks_binary
    said yes), every good record after it lost (found 2026-12-07): a file is binary only when no line of its head is
    a JSON record, so it is one bad_json and the records kept."""
    data = b"\0" * 100 + b"\n" + ROWS
    p = tmp_path / name
    p.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    docs = list(read_documents(p))
    assert _drops(docs) == ["read_error:bad_json"] and docs[0].meta["where"] == "line 1"
    assert [d.id for d in docs[1:]] == [str(i) for i in range(200)]


def test_a_text_file_read_by_line_drops_only_its_binary_lines(tmp_path):
    """With unit="line" one NUL in the first 4 KiB threw every line of the file away as `read_error:binary`: the
    file is one binary record only when most of its head is binary; else a binary line (paragraph) is its own
    `read_error:binary` and the other lines are kept. unit="file" keeps the verdict of the whole head."""
    import random

    p = tmp_path / "log.txt"
    rest = "".join(f"line {i} of the log\n" for i in range(3, 203)).encode()
    p.write_bytes(b"first line\n" + b"\0" * 100 + b"\nsecond line\n\n" + rest)
    docs = list(read_documents(p, unit="line"))
    assert [(d.text, d.drop) for d in docs[:4]] == [("first line", None), ("", "read_error:binary"),
                                                    ("second line", None), ("line 3 of the log", None)]
    assert docs[1].meta["where"] == "line 2" and len(docs) == 203 and _drops(docs) == ["read_error:binary"]
    assert [(d.text[:10], d.drop) for d in read_documents(p, unit="paragraph")] == [
        ("", "read_error:binary"), ("line 3 of ", None)]
    assert _drops(read_documents(p, unit="file")) == ["read_error:binary"]
    noise = tmp_path / "noise.txt"  # random bytes: one record, not a document or an error per "line" of them
    noise.write_bytes(random.Random(0).randbytes(20000))
    for unit in ("line", "paragraph", "file"):
        assert _drops(read_documents(noise, unit=unit)) == ["read_error:binary"]


def test_terminal_colour_codes_and_a_short_file_are_text_not_binary(tmp_path):
    """ESC (colour codes), backspace and form feed counted as binary control bytes: a terminal log with dense colour
    codes was dropped as `read_error:binary`, and a file under 20 bytes with one of them ("hi\\x1b") was binary too
    (found 2026-12-07). A head under 64 bytes is judged by NUL alone."""
    from lmforge.data.readers import looks_binary

    log = "".join(f"\x1b[3{i % 8}m{i:>3}\x1b[0m ok\x1b[K\r\x08\x08\n" for i in range(200)) + "\x0c"
    p = tmp_path / "build.log"
    p.write_text(log)
    assert [d.text for d in read_documents(p)] == [log]
    assert not looks_binary(b"hi\x1b") and not looks_binary(b"hi\x01\x02") and looks_binary(b"hi\x00")
    assert looks_binary(bytes(range(1, 32)) * 4)  # many other control bytes are still binary


def test_a_plain_file_is_opened_once(tmp_path, monkeypatch):
    """open_binary opened every plain file twice (once more to read its first 4 bytes for the magic check); the
    check reads them through the handle it returns. Its verdicts are unchanged (the tests above)."""
    from lmforge.data import readers

    opened = []
    monkeypatch.setattr(readers, "open", lambda *a, **kw: opened.append(a[0]) or open(*a, **kw), raising=False)
    p = tmp_path / "a.jsonl"
    p.write_bytes(ROWS)
    assert len(list(read_documents(p))) == 200 and opened == [p]

"""Readers and writers: every format round-trips, and bad input becomes rejected documents."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from lmforge.data.document import Document, unix_line_ends
from lmforge.data.readers import decode_text, detect_format, read_documents
from lmforge.data.writers import ShardedWriter, write_jsonl, write_parquet


def _docs(n: int) -> list[Document]:
    return [Document(id=f"d{i}", text=f"text number {i} é", meta={"source": "unit", "k": i}) for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_sharded_writer_round_trips(tmp_path, fmt):
    with ShardedWriter(tmp_path, fmt=fmt, docs_per_shard=4) as w:
        for d in _docs(10):
            w.write(d)
    assert [p.name for p in w.paths] == [f"part-0000{i}.{fmt}" for i in range(3)]
    back = [d for p in w.paths for d in read_documents(p)]
    assert [d.id for d in back] == [f"d{i}" for i in range(10)]
    assert back[7].text == "text number 7 é" and back[7].meta["k"] == 7 and back[7].drop is None


def test_detect_format():
    assert detect_format("a/b.jsonl.zst") == "jsonl"
    assert detect_format("x.warc.gz") == "warc" and detect_format("x.wet.gz") == "warc"
    assert detect_format("p.HTML") == "html" and detect_format("t.parquet") == "parquet"
    assert detect_format("notes.txt") == "text"


def test_text_units(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one\ntwo\n\nthree\n")
    assert [d.text for d in read_documents(p, unit="file")] == ["one\ntwo\n\nthree\n"]
    assert [d.text for d in read_documents(p, unit="line")] == ["one", "two", "three"]
    assert [d.text for d in read_documents(p, unit="paragraph")] == ["one\ntwo", "three\n"]


def test_windows_line_ends_are_normalised_by_one_function_for_readers_and_line_rules(tmp_path):
    """read_text (by line / paragraph) and FineWeb's line rules each replaced CRLF themselves; one function now."""
    from lmforge.data.fineweb import DATATROVE, fineweb_failures

    assert unix_line_ends("a\r\nb\rc\n\r\n") == "a\nb\rc\n\n"  # a lone CR is no Windows line end: it stays
    lf = "First line ends here.\nSecond one too.\n\nA new paragraph.\n"
    (tmp_path / "lf.txt").write_text(lf, newline="")
    (tmp_path / "crlf.txt").write_text(lf.replace("\n", "\r\n"), newline="")
    for unit in ("line", "paragraph"):
        texts = [[d.text for d in read_documents(tmp_path / f"{n}.txt", unit=unit)] for n in ("lf", "crlf")]
        assert texts[0] == texts[1] and len(texts[0]) == (3 if unit == "line" else 2)
    assert fineweb_failures(lf.replace("\n", "\r\n"), DATATROVE) == fineweb_failures(lf, DATATROVE)


def test_bytes_that_are_not_utf8_are_read_as_windows_1252_and_counted(tmp_path):
    """A Latin-1 / cp1252 text file came out with U+FFFD for every accented letter and curly quote. Each byte
    sequence that is not UTF-8 is now read as Windows-1252 (WHATWG's table: cp1252, its 5 undefined bytes as the C1
    controls), and the UTF-8 around it stays UTF-8; meta.decode_errors counts the bytes read so."""
    text = "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u201cquoted\u201d \u2013 \u20ac5, \u00bd price\n"
    p = tmp_path / "latin.txt"
    p.write_bytes(text.encode("cp1252"))
    (d,) = read_documents(p)
    assert d.text == text and d.meta["decode_errors"] == 9  # é è û é “ ” – € ½
    for line in ["caf\u00e9 au lait", "\u00ff\u00fe end \u2019"]:  # JSON Lines too
        (tmp_path / "l.jsonl").write_bytes(json.dumps({"text": line}, ensure_ascii=False).encode("cp1252") + b"\n")
        assert [d.text for d in read_documents(tmp_path / "l.jsonl")] == [line]
    high = bytes(range(0x80, 0x100))  # no two of them make UTF-8
    whatwg = "".join(chr(b) if b in (0x81, 0x8D, 0x8F, 0x90, 0x9D) else bytes([b]).decode("cp1252") for b in high)
    assert decode_text(high) == (whatwg, 128)
    mixed = "na\u00efve \u65e5\u672c ".encode() + b"\xe9t\xe9 " + "stra\u00dfe".encode() + b"\xe2\x82"
    assert decode_text(mixed) == ("na\u00efve \u65e5\u672c \u00e9t\u00e9 stra\u00dfe\u00e2\u201a", 4)
    assert decode_text("plain UTF-8 \u00e9".encode()) == ("plain UTF-8 \u00e9", 0)


def test_windows_1252_text_decodes_in_linear_time():
    """Each bad byte re-decoded the rest of the input (the error Python raises holds all of it): a few MB of Latin-1
    took minutes. 16x the text must take about 16x the time (allowed 48x; the quadratic form took ~200x)."""
    import gc
    import time

    from lmforge.data.readers import decode_utf8

    unit = "caf\u00e9 na\u00efve r\u00e9sum\u00e9 ".encode("cp1252")

    def seconds(n: int) -> float:
        data = unit * n
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            text, bad = decode_utf8(data)
            best = min(best, time.perf_counter() - t)
        assert bad == 4 * n and len(text) == len(data)
        return best

    gc.disable()
    try:
        small, large = seconds(2_000), seconds(32_000)
    finally:
        gc.enable()
    assert large < 48 * small + 0.05, (small, large)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_a_text_file_with_a_byte_order_mark_is_decoded_in_the_encoding_it_names(tmp_path, encoding):
    """Windows' "Unicode" text is UTF-16 with a byte-order mark: read as UTF-8 it was kept as a document with a NUL
    between every two characters; a UTF-8 mark stayed at the start of the first document as U+FEFF."""
    p = tmp_path / "notes.txt"
    body = "Grüße aus Köln\r\nzweite Zeile\n"
    p.write_bytes(("\ufeff" + body).encode(encoding) if encoding == "utf-16-be" else body.encode(encoding))
    (d,) = read_documents(p)
    assert d.text == body and "decode_errors" not in d.meta
    assert [d.text for d in read_documents(p, unit="line")] == ["Grüße aus Köln", "zweite Zeile"]
    (tmp_path / "cut.txt").write_bytes(p.read_bytes()[:-1])  # an odd byte count: one undecodable unit, counted
    (d,) = read_documents(tmp_path / "cut.txt")
    assert d.meta.get("decode_errors", 0) == (0 if encoding == "utf-8-sig" else 1)


def test_bad_json_lines_are_rejected_not_raised(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1, "text": "fine", "url": "u"}\nnot json\n[1, 2]\n{"text": "no id"}\n')
    docs = list(read_documents(p))
    assert [d.drop for d in docs] == [None, "read_error:bad_json", "read_error:bad_record", None]
    assert docs[0].id == "1" and docs[0].meta["url"] == "u"
    assert docs[3].text == "no id" and len(docs[3].id) == 16


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    data = gzip.compress("".join(json.dumps({"id": i, "text": "x" * 200}) + "\n" for i in range(50)).encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    docs = list(read_documents(p))
    assert docs[-1].drop == "read_error:truncated_archive"
    assert all(d.drop is None for d in docs[:-1]) and 0 < len(docs) - 1 < 50



@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_cut_compressed_text_file_keeps_the_lines_read_before_the_cut(tmp_path, suffix):
    """unit="line": a .txt.gz cut short was one read_error for the whole file, every line read before the cut lost
    (JSON Lines kept them); the lines before the cut are documents now, and the rest is that read_error."""
    pytest.importorskip("zstandard") if suffix == ".zst" else None
    lines = [f"line {i} " + "word " * (i % 7) for i in range(3000)]
    data = "\n".join(lines).encode() + b"\n"
    if suffix == ".gz":
        packed = gzip.compress(data)
    else:
        import zstandard

        packed = b"".join(zstandard.ZstdCompressor().compress(data[i:i + 8192]) for i in range(0, len(data), 8192))
    (tmp_path / f"whole.txt{suffix}").write_bytes(packed)
    (tmp_path / f"cut.txt{suffix}").write_bytes(packed[: len(packed) // 2])
    whole = list(read_documents(tmp_path / f"whole.txt{suffix}", unit="line"))
    docs = list(read_documents(tmp_path / f"cut.txt{suffix}", unit="line"))
    *kept, err = docs
    assert err.drop == "read_error:truncated_archive" and err.meta["where"] == f"line {len(kept) + 1}"
    assert 100 < len(kept) < 3000 and [d.text for d in kept] == [d.text for d in whole[:len(kept)]]
    (file_doc,) = read_documents(tmp_path / f"cut.txt{suffix}")  # unit="file": the one document is the error
    assert file_doc.drop == "read_error:truncated_archive"

def _warc_bytes(records: list[tuple[str, str, bytes]], gz: bool = True) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    for kind, url, payload in records:
        if kind == "response":
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=iso-8859-1")],
                                    protocol="HTTP/1.1")
            rec = w.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=http)
        else:
            rec = w.create_warc_record(url, "conversion", payload=io.BytesIO(payload),
                                       warc_content_type="text/plain")
        w.write_record(rec)
    return buf.getvalue()


def test_warc_and_wet(tmp_path):
    pytest.importorskip("warcio")
    page = "<html><body><p>Caf\xe9 cr\xe8me, a page.</p></body></html>".encode("latin-1")
    p = tmp_path / "a.warc.gz"
    p.write_bytes(_warc_bytes([("response", "http://a.example/", page), ("conversion", "http://b.example/",
                                                                          "plain wet text".encode())]))
    d1, d2 = read_documents(p)
    assert d1.raw == page and d1.meta["url"] == "http://a.example/" and "iso-8859-1" in d1.meta["content_type"]
    assert d2.raw is None and d2.text == "plain wet text" and d2.meta["warc_type"] == "conversion"
    from lmforge.data.extract import ExtractConfig, extract
    from lmforge.data.stage import StageContext

    (out,) = extract(ExtractConfig(main_content=False), [d1], StageContext())
    # the header's iso-8859-1 decodes as windows-1252, as the WHATWG Encoding Standard maps that label
    assert out.text == "Café crème, a page." and out.meta["charset"] == "cp1252"


def test_a_response_warcio_cannot_decode_is_one_rejected_record_not_the_end_of_the_archive(tmp_path, monkeypatch):
    """warcio's brotli decoder fails on today's brotli package (it sets an attribute the C type lacks): the exception
    ended read_warc, every later record reported as one truncated_archive. Now that record alone is rejected."""
    pytest.importorskip("warcio")
    from warcio.bufferedreaders import BufferedReader
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    def broken_brotli():
        raise AttributeError("'brotli.Decompressor' object has no attribute 'unused_data'")

    monkeypatch.setitem(BufferedReader.DECOMPRESSORS, "br", broken_brotli)  # as warcio + brotli 1.2 behave
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for url, enc in (("http://a/", None), ("http://b/", "br"), ("http://c/", None)):
        headers = [("Content-Type", "text/html")] + ([("Content-Encoding", enc)] if enc else [])
        http = StatusAndHeaders("200 OK", headers, protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(b"<p>" + url.encode() + b"</p>"),
                                            http_headers=http))
    p = tmp_path / "br.warc.gz"
    p.write_bytes(buf.getvalue())
    docs = list(read_documents(p))
    assert [(d.meta.get("url"), d.drop) for d in docs] == [
        ("http://a/", None), ("http://b/", "read_error:content_encoding"), ("http://c/", None)]
    assert docs[2].raw == b"<p>http://c/</p>"
    assert docs[1].meta["error"].startswith("Content-Encoding br: AttributeError")


def test_truncated_warc_is_reported(tmp_path):
    pytest.importorskip("warcio")
    data = _warc_bytes([("conversion", f"http://x/{i}", ("words " * 300).encode()) for i in range(6)], gz=False)
    p = tmp_path / "cut.warc"
    p.write_bytes(data[: int(len(data) * 0.6)])
    docs = list(read_documents(p))
    assert docs[-1].drop == "read_error:truncated_archive"
    assert all(d.drop is None for d in docs[:-1]) and len(docs) - 1 >= 2


def test_write_jsonl_without_text(tmp_path):
    d = Document(id="a", text="secret", meta={"m": 1}, drop="gopher:word_count")
    write_jsonl(tmp_path / "r.jsonl", [d], with_text=False)
    assert json.loads((tmp_path / "r.jsonl").read_text()) == {"id": "a", "meta": {"m": 1}, "drop": "gopher:word_count"}


def test_lone_surrogates_round_trip_in_jsonl_and_never_crash_parquet(tmp_path):
    """"\\ud800" is a legal JSON escape whose character has no UTF-8 encoding: JSONL writes the escape
    back (exact round trip); Parquet, whose strings must be UTF-8, writes U+FFFD and counts it."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"id": "a", "text": "bad \\ud800 char \\udfff", "note": "x\\udc80"}\n{"id": "b", "text": "ok"}\n')
    docs = list(read_documents(src))
    assert docs[0].text == "bad \ud800 char \udfff" and docs[0].meta["note"] == "x\udc80"
    write_jsonl(tmp_path / "o.jsonl", docs)
    back = list(read_documents(tmp_path / "o.jsonl"))
    assert [(d.text, d.meta.get("note"), d.meta.get("decode_errors")) for d in back] == [
        ("bad \ud800 char \udfff", "x\udc80", None), ("ok", None, None)]
    pytest.importorskip("pyarrow")
    assert write_parquet(tmp_path / "o.parquet", docs) == 2
    a, b = read_documents(tmp_path / "o.parquet")
    assert (a.text, a.meta["note"], a.meta["encode_errors"]) == ("bad \ufffd char \ufffd", "x\udc80", 2)
    assert b.text == "ok" and "encode_errors" not in b.meta and "encode_errors" not in docs[0].meta


def test_jsonl_byte_order_mark_and_null_text(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "hello"}\n{"id": "b", "text": null}\n{"id": "c", "text": 0}\n')
    docs = list(read_documents(p))
    assert [(d.id, d.text, d.drop) for d in docs] == [("a", "hello", None), ("b", "", None),
                                                      (docs[2].id, "", "read_error:bad_record")]


@pytest.mark.parametrize("name", ["FILE.JSONL.GZ", "file.jsonl.ZST", "file.Jsonl.Zstd", "ARRAY.JSON.GZ"])
def test_compression_suffixes_in_any_case_are_written_and_read_compressed(tmp_path, name):
    from lmforge.data.decontam import eval_ngrams

    path = tmp_path / name
    if name.startswith("ARRAY"):  # a JSON array: found through the same suffix rule, then decompressed
        path.write_bytes(gzip.compress(json.dumps([d.to_record() for d in _docs(3)]).encode()))
    else:
        write_jsonl(path, _docs(3))
    assert path.read_bytes()[:4] in (b"\x1f\x8b\x08\x00", b"\x28\xb5\x2f\xfd")  # gzip / zstd magic: compressed
    back = list(read_documents(path))
    assert [(d.id, d.text, d.drop) for d in back] == [(f"d{i}", f"text number {i} é", None) for i in range(3)]
    # decontamination finds the file in a directory and reads its strings as items: each text's 2 word 3-grams
    assert len(eval_ngrams((str(tmp_path),), 3)) == 6


def test_a_drop_column_in_someone_elses_parquet_is_a_field_not_a_rejection(tmp_path):
    """Only a file lmforge wrote (meta as a JSON string) carries drop reasons: a user's "drop" column rejected every
    row with its cell as the reason (and a non-string one vanished), where JSON Lines keeps it as a field."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"], "drop": ["no", None]}), tmp_path / "u.parquet")
    pq.write_table(pa.table({"id": ["c"], "text": ["three"], "drop": [True]}), tmp_path / "b.parquet")
    docs = [*read_documents(tmp_path / "u.parquet"), *read_documents(tmp_path / "b.parquet")]
    assert [(d.id, d.drop, d.meta.get("drop")) for d in docs] == [("a", None, "no"), ("b", None, None),
                                                                   ("c", None, True)]
    ours = [Document(id="k", text="kept"), Document(id="r", text="gone", drop="gopher:word_count")]
    write_parquet(tmp_path / "ours.parquet", ours)  # lmforge's own rows keep their reasons
    assert [(d.id, d.drop) for d in read_documents(tmp_path / "ours.parquet")] == [("k", None),
                                                                                  ("r", "gopher:word_count")]

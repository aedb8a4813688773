"""lmforge's main-content rules: mark boilerplate blocks `hidden` in the HTML before resiliparse parses
it, so its main-content pass (which skips hidden elements) drops them at C speed.

Web pages wrap an article in navigation, sidebars, share buttons, comment sections, related-article
boxes, newsletter and cookie prompts. Following the boilerplate-removal literature (Kohlschütter et
al. 2010, link density; Readability's class/id vocabularies; Barbaric 2021, trafilatura):

1. structure: `nav`, `aside`, `footer`, `form`, `button`, `dialog`, `iframe`, `select`, `menu`;
2. vocabulary: elements whose class or id names them boilerplate, in several languages ("comments",
   "kommentare", "commentaires", "share", "teilen", "partager", "related", "lesetipps",
   "newsletter", "abonnieren", "cookie", "sidebar", "breadcrumb", "footer", ...). Strong words
   mark an element whatever else its names say; weak ones ("sidebar", "widget", "footer" are also
   layout words, as in "l-sidebar-fixed l-article-body" or "widget Blog") only when no name marks
   the article itself;
3. link density: lists of >= 3 links whose link text is >= 60% of their text (related-article and
   "most read" lists, tag clouds, menus without telling names);
4. position: the `header` holding the page's first `h1` becomes a `div`, so the headline and
   standfirst survive resiliparse's main-content pass (which skips page headers); `headline` finds
   the article's title (the visible h1 or h2 covering most of <title>'s words) for the caller to restore.

No rule hides an element holding >= 40% of the page's paragraph text (a "c-fixed-sidebar-layout"
wrapper, a "share-zone" or an `aside` around the post): such an element is made neutral instead, its
class/id renamed and its tag turned into a `div`, so resiliparse's own vocabulary keeps it too.
Working on the markup string (regex scans in C, Python only per class/id value and per candidate
container) keeps this near the cost of parsing; iterating resiliparse node collections from Python
is far slower. The caller also falls back to resiliparse alone if the rules left almost nothing.
"""

from __future__ import annotations

import functools
import re

STRUCTURE_TAGS = ("nav", "aside", "footer", "form", "button", "dialog", "iframe", "select", "textarea", "menu")
STRONG_WORDS = frozenset("""
comment kommentar kommentare commentaire commentaires comentario comentarios commenti disqus dsq
respond reply replies discussion diskussion share sharing shariff social teilen partager partage compartir condividi
related recommend empfehlung empfehlungen lesetipp lesetipps weiterlesen outbrain taboola
newsletter subscribe subscription abonnieren abonnement inscription cookie consent gdpr dsgvo
breadcrumb promo advert sponsor cta popup modal paywall login signup
""".split())
WEAK_WORDS = frozenset("""
sidebar seitenleiste widget navigation navbar nav menu pagination pager toolbar skip footer colophon
copyright impressum popular mostread trending similar anzeige werbung overlay
""".split())
ARTICLE_WORDS = frozenset("article artikel beitrag blog body content entry main post story text".split())
_STRONG_PREFIXES = tuple(w for w in STRONG_WORDS if len(w) >= 4)
_WEAK_PREFIXES = tuple(w for w in WEAK_WORDS if len(w) >= 4)

_ATTR = re.compile(r"""(?:class|id)\s*=\s*(?:"([^"<>]*)"|'([^'<>]*)'|([^\s"'<>=]+))""")
# A start tag up to (and including the whitespace before) one of its attributes, "<div data-x='a' ": tells a
# class/id attribute from the same characters in text (an escaped tag in a code sample)
_ATTR_VALUE = r"""(?:"[^"]*"|'[^']*'|[^\s"'<>=`]+)"""
_START_TAG_HEAD = re.compile(rf"""<[A-Za-z][A-Za-z0-9-]*(?:\s+[^\s"'<>/=]+(?:\s*=\s*{_ATTR_VALUE})?)*\s+""")
_STRUCTURE = re.compile(rf"<({'|'.join(STRUCTURE_TAGS)})(?=[\s>/])", re.I)
_LIST_TAG = re.compile(r"<(/?)(ul|ol)\b[^>]*>", re.I)
_LINK = re.compile(r"<a\b[^>]*>(.*?)</a\s*>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_SCRIPT_START = re.compile(r"<(script|style)\b", re.I)
# What a browser never shows: comments and the contents of script, style, template and noscript elements.
_UNRENDERED_START = re.compile(r"<(!--|(?:script|style|template|noscript)\b)", re.I)
_UNRENDERED_END = {name: re.compile(rf"</{name}\s*>", re.I) for name in ("script", "style", "template", "noscript")}
_UNRENDERED_END["!--"] = re.compile(r"-->")
_PARAGRAPH = re.compile(r"<p\b[^>]*>(.*?)</p\s*>", re.S | re.I)
_HEADING = re.compile(r"<(h[12])\b[^>]*>(.*?)</\1\s*>", re.S | re.I)
_H1 = re.compile(r"<h1\b", re.I)
_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title\s*>", re.S | re.I)
_WORD = re.compile(r"\w+")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
CONTAINERS = frozenset("div section article main aside nav footer header form table tbody tr td ul ol dl".split())
SMALL_ELEMENT = 2000  # markup characters (or a tenth of the page) below which an element is not the article
HOLDS_PAGE = 0.4  # share of the page's paragraph text that makes an element the article


def name_words(value: str) -> frozenset[str]:
    """Lower-case words of a class/id value ("c-newsletter-modal__header" -> {c, newsletter, modal,
    header}; "relatedPosts" -> {related, posts, relatedposts})."""
    words = set(_SPLIT.split(_CAMEL.sub(" ", value).lower())) | set(_SPLIT.split(value.lower()))
    words.discard("")
    return frozenset(words)


@functools.lru_cache(maxsize=1 << 14)
def is_boilerplate_name(value: str) -> bool:
    """Strong boilerplate words, or weak ones without an article word; a word matches a vocabulary
    word it equals or starts with (>= 4 letters: "commentlist", "newslettersignup")."""
    words = name_words(value)
    if words & STRONG_WORDS or any(w.startswith(_STRONG_PREFIXES) for w in words):
        return True
    weak = words & WEAK_WORDS or any(w.startswith(_WEAK_PREFIXES) for w in words)
    return bool(weak) and not words & ARTICLE_WORDS


def _visible_len(fragment: str) -> int:
    return len(" ".join(_TAG.sub(" ", fragment).split()))


def link_dense_lists(html: str) -> list[int]:
    """Offsets (just after the tag name) of `ul`/`ol` start tags whose list has >= 3 links making up
    >= 60% of its text; an inner list is not marked when its outer list is."""
    marks, stack, dense_until = [], [], -1
    for m in _LIST_TAG.finditer(html):
        if not m.group(1):
            stack.append(m)
            continue
        if not stack:
            continue
        start = stack.pop()
        body = html[start.end():m.start()]
        if body.count("<a") < 3:
            continue
        links = _LINK.findall(body)
        if len(links) >= 3:
            linked = sum(_visible_len(a) for a in links)
            if linked >= 0.6 * max(_visible_len(body), 1):
                marks.append((start.start(), start.start() + 1 + len(start.group(2)), m.end()))
    marks.sort()
    out = []
    for begin, at, end in marks:
        if begin > dense_until:  # outermost first: inner lists lie inside a marked one
            out.append(at)
            dense_until = end
    return out


def unwrap_headline_header(html: str) -> str:
    """Replace the `header` start tag enclosing the first `h1` by a bare `<div>` (its class names, like
    "article-header", would again read as page furniture) and its closing tag by `</div>`."""
    first = _H1.search(html)
    if first is None:
        return html
    h1 = first.start()
    start = html.rfind("<header", 0, h1)  # lower-case tags, as (nearly) every page writes them
    if start < 0 or html.rfind("</header", start, h1) >= 0:
        return html
    start_end, end = html.find(">", start), html.find("</header", h1)
    if start_end < 0 or end < 0:
        return html
    return html[:start] + "<div>" + html[start_end + 1:end] + "</div" + html[end + 8:]


@functools.lru_cache(maxsize=64)
def _tag_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<(/?){re.escape(name)}(?=[\s>/])", re.I)


def element_end(html: str, start: int, name: str) -> int:
    """Offset just past the end tag matching the start tag at `start` (len(html) if unclosed)."""
    depth = 0
    for m in _tag_pattern(name).finditer(html, start):
        depth += -1 if m.group(1) else 1
        if depth == 0:
            return html.find(">", m.end()) + 1 or len(html)
    return len(html)


def _strip(html: str, start: re.Pattern) -> str:
    """The markup without the elements (or comments) whose opening `start` finds; an unclosed one runs to
    the end."""
    parts, pos = [], 0
    while (m := start.search(html, pos)) is not None:
        parts.append(html[pos:m.start()])
        end = _UNRENDERED_END[m.group(1).lower()].search(html, m.end())
        pos = end.end() if end else len(html)
    parts.append(html[pos:])
    return "".join(parts)


def strip_scripts(html: str) -> str:
    """The markup without script and style elements (their text is never content and would skew
    the scans)."""
    return _strip(html, _SCRIPT_START)


def strip_unrendered(html: str) -> str:
    """The markup without comments, script, style, template and noscript elements: what a reader never
    sees, so an `<h1>` there (a commented-out draft, a template for a client-side widget) is no headline."""
    return _strip(html, _UNRENDERED_START)


def paragraph_len(fragment: str) -> int:
    """Visible characters in the fragment's paragraphs (`p` elements of >= 40 characters)."""
    return sum(n for n in map(_visible_len, _PARAGRAPH.findall(fragment)) if n >= 40)


class _Page:
    """The page markup (scripts removed) and its paragraph text, for the guard that never hides the
    element holding the article: >= 40% of the page's paragraph text (a wrapper whose class says
    "single-wrapper ... paywall-container" or "c-fixed-sidebar-layout", a "share-zone" or an
    `aside` around the post). Such an element is instead made neutral, so that resiliparse's own
    main-content vocabulary does not drop it either: its class/id renamed to data-lmforge-*, its
    structural tag turned into a `div`."""

    def __init__(self, html: str):
        self.html = html
        self._length = 0
        self.edits: list[tuple[int, int, str]] = []  # (start, end, replacement), non-overlapping

    @property
    def length(self) -> int:
        """Paragraph text of the page, computed on first use (many pages never need it)."""
        if not self._length:
            self._length = max(paragraph_len(self.html), 1)
        return self._length

    def _element(self, at: int) -> tuple[int, str] | None:
        """(offset, name) of the start tag holding the attribute at `at`; None when `at` lies outside a
        start tag (text such as `&lt;div class="comment"&gt;` in a code sample, whose nearest "<" opens
        `<code>`) or in the page's html/head/body/main."""
        lt = self.html.rfind("<", 0, at)
        if lt < 0 or _START_TAG_HEAD.fullmatch(self.html, lt, at) is None:
            return None
        name = _NAME.match(self.html, lt + 1).group(0)
        if name.lower() in ("html", "body", "main", "head"):
            return None
        return lt, name

    def holds_article(self, lt: int, name: str) -> tuple[bool, int]:
        """(does the element starting at `lt` hold the article?, offset past its end tag or -1)."""
        if name.lower() not in CONTAINERS:  # links, spans, list items, images: never the article
            return False, -1
        end = element_end(self.html, lt, name)
        small = end - lt < min(SMALL_ELEMENT, len(self.html) // 10)  # cheap test first
        big = not small and paragraph_len(self.html[lt:end]) >= HOLDS_PAGE * self.length
        return big, end

    def named(self, m: re.Match) -> None:
        """A class/id attribute that names boilerplate: hide its element, or neutralise the name."""
        found = self._element(m.start())
        if found is None:
            return
        big, _ = self.holds_article(*found)
        self.edits.append((m.start(), m.start(), "data-lmforge-" if big else "hidden data-lmforge-"))

    def structural(self, m: re.Match) -> None:
        """A structural boilerplate tag: hide it, or rename it (and its end tag) to div."""
        lt, name = m.start(), m.group(1)
        big, end = self.holds_article(lt, name)
        if not big:
            self.edits.append((m.end(), m.end(), " hidden"))
            return
        self.edits.append((lt + 1, lt + 1 + len(name), "div"))
        close = self.html.rfind("</", lt, end)
        if close > lt and self.html[close + 2:close + 2 + len(name)].lower() == name.lower():
            self.edits.append((close + 2, close + 2 + len(name), "div"))

    def apply(self) -> str:
        """The markup with the edits made."""
        parts, prev = [], 0
        for start, end, text in sorted(set(self.edits)):
            if start < prev:
                continue
            parts += [self.html[prev:start], text]
            prev = end
        parts.append(self.html[prev:])
        return "".join(parts)


def headline(html: str) -> str:
    """The page's headline: of its h1 (else h2) elements with at least half their words in <title>, the
    one covering most of the title's words; "" if none. Ties go to the heading with fewer words outside
    the title, then to the later one: a site's logo h1 comes first and also lies in the title ("Example
    News" and "Solar boats" each cover half of "Solar boats - Example News"). Comments, scripts, styles,
    templates and noscript are not scanned: a heading there is never shown."""
    import html as html_lib

    html = strip_unrendered(html)
    title = _TITLE.search(html)
    title_words = set(_WORD.findall(html_lib.unescape(title.group(1)).lower())) if title else set()
    for level in ("h1", "h2"):
        best, best_key = "", (0, 0)
        for m in _HEADING.finditer(html):
            if m.group(1).lower() != level:
                continue
            text = " ".join(html_lib.unescape(_TAG.sub(" ", m.group(2))).split())
            words = set(_WORD.findall(text.lower()))
            shared = len(words & title_words)
            key = (shared, -len(words))
            if shared and shared >= 0.5 * len(words) and key >= best_key:  # >=: a tie goes to the later one
                best, best_key = text, key
        if best:
            return best
    return ""


def mark_boilerplate(html: str) -> str:
    """The page with boilerplate elements given a `hidden` attribute (see the module docstring)."""
    page = _Page(strip_scripts(html))
    for m in _ATTR.finditer(page.html):
        if is_boilerplate_name(m[m.lastindex]):
            page.named(m)
    for m in _STRUCTURE.finditer(page.html):
        page.structural(m)
    page.edits += [(at, at, " hidden") for at in link_dense_lists(page.html)]
    return unwrap_headline_header(page.apply())

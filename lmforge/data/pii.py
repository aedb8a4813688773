"""PII masking: e-mail addresses, US phone numbers (formatted, bare 10-digit and +1 forms), IPv4 and IPv6
addresses become replacement tokens (the `|||EMAIL_ADDRESS|||` style of Dolma, Soldaini et al. 2024), with
counts per document in `meta.pii`. Regexes find candidates; IP candidates are validated with `ipaddress` so
that version strings and clock times are not masked.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.stage import StageContext

# Every pattern is compiled with re.ASCII: the lookarounds ask "is the neighbour part of the same token?", and
# an address or number written flush against CJK, kana or accented text ("请发邮件至user@example.com谢谢",
# "電話555-123-4567まで") has a Unicode \w neighbour that is not part of it. ASCII \d also keeps Arabic-Indic
# and other non-ASCII digits from being read as US phone numbers.
# The local part may start with "_" and hold "'" (RFC 5322 atext: o'brien@example.com); "'" is not in the
# lookbehind so that a quoted address ('bob@example.com') is still masked.
EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9_][A-Za-z0-9._%+'-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", re.ASCII)
# US numbers: optional +1 / 1 country code, area code bare or in parentheses, then 3 + 4 digits.
# The two separators after a bare area code must agree (555-123-4567, 555.123.4567, 555 123 4567), so
# dates like 2020-01-1234 or decimals are not taken for phones. Separators stay on one line: numbers on
# separate lines ("555\n123\n4567", a column of a table) are not one phone number.
PHONE = re.compile(
    r"(?<![\w+])(?:\+?1[ \t.-]?)?"
    r"(?:\(\d{3}\)[ \t.-]?\d{3}[ \t.-]\d{4}|\d{3}([ \t.-])\d{3}\1\d{4})"
    r"(?![\w-])",
    re.ASCII,
)
# Unformatted US numbers: 10 digits (optionally after +1) whose area code starts with 2-9 as NANP area
# codes do (which rules out Unix timestamps and 1234567890-style counters), standing alone: not part of
# a longer number, a decimal, an identifier, or a path/query in a URL (see `url_spans`).
PHONE_BARE = re.compile(r"(?<![\w+/=?&#.:%-])(?:\+1[ \t.-]?)?[2-9]\d{9}(?![\w/-]|[.,:]\d)", re.ASCII)
# A URL, as `(?:\b[a-z][a-z0-9+.-]*://|\bwww\.)\S+` (case-insensitive, ASCII) finds them: `url_spans`. That
# pattern itself is quadratic in a long dotted token (host names, Java package paths): from every word boundary in it
# `[a-z0-9+.-]*` runs to the token's end before failing. This one starts a scheme only where a run of scheme
# characters starts (one try per run: linear; no possessive quantifier, which Python 3.10 lacks);
# `url_spans` then finds where the plain pattern's match would start.
_URL_START = re.compile(r"(?<![a-z0-9+.-])(?P<run>[a-z0-9+.-]*)://(?=\S)|\bwww\.(?=\S)", re.I | re.ASCII)
_NON_SPACE = re.compile(r"\S*")


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def url_spans(text: str) -> list[tuple[int, int]]:
    r"""The spans of `(?:\b[a-z][a-z0-9+.-]*://|\bwww\.)\S+` in text (re.I, re.ASCII), found in linear time."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while m := _URL_START.search(text, pos):
        start = m.start()
        if m.group("run") is not None:  # the scheme starts at the run's first letter at a word boundary
            start = next((i for i in range(m.start(), m.end("run")) if text[i].isascii() and text[i].isalpha()
                          and (i == 0 or not _is_word(text[i - 1]))), -1)
            if start < 0:
                pos = m.end()
                continue
        end = _NON_SPACE.match(text, m.end()).end()
        spans.append((start, end))
        pos = end
    return spans


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)", re.ASCII)
# The candidate ends in a hex digit or in "::", and may be followed by a colon that starts no further group:
# "2001:db8::1: down" (a label's colon) masks 2001:db8::1, where "2001:db8::1:" would fail validation.
IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d+\.\d+\.\d+\.\d+|[0-9A-Fa-f]{0,4})"
    r"(?:(?<=[0-9A-Fa-f])|(?<=::))(?!\w|:[0-9A-Fa-f]|\.\d)",
    re.ASCII,
)

TOKENS = {"email": "|||EMAIL_ADDRESS|||", "phone": "|||PHONE_NUMBER|||", "ip": "|||IP_ADDRESS|||"}
KINDS = ("email", "phone", "ipv4", "ipv6")


@dataclass(frozen=True, kw_only=True)
class PIIConfig:
    """kinds: which PII to mask (email, phone, ipv4, ipv6); tokens: the replacement strings."""

    kinds: tuple[str, ...] = KINDS
    email_token: str = TOKENS["email"]
    phone_token: str = TOKENS["phone"]
    ip_token: str = TOKENS["ip"]

    def __post_init__(self) -> None:
        coerce_fields(self, "pii")  # each field's type, named when wrong
        bad = [k for k in self.kinds if k not in KINDS]
        check(not bad, f"pii.kinds has unknown kind {bad[0] if bad else ''!r}; choose from {', '.join(KINDS)}")


def _valid_ipv6(s: str) -> bool:
    if not any(c.isdigit() for c in s):  # "a::b", "c::" are scope operators, not addresses
        return False
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


def mask_pii(text: str, cfg: PIIConfig = PIIConfig()) -> tuple[str, dict[str, int]]:
    """(masked text, {kind: count}). Order matters: e-mails first (their local parts may hold digits),
    IPv6 before IPv4 (an IPv6 address may end in a dotted IPv4)."""
    counts = {k: 0 for k in cfg.kinds}

    def sub(pattern: re.Pattern, kind: str, token: str, text: str, valid=None) -> str:
        def repl(m: re.Match) -> str:
            if valid is not None and not valid(m.group(0), m.start()):
                return m.group(0)
            counts[kind] += 1
            return token
        return pattern.sub(repl, text)

    if "email" in cfg.kinds:
        text = sub(EMAIL, "email", cfg.email_token, text)
    if "ipv6" in cfg.kinds:
        text = sub(IPV6_CANDIDATE, "ipv6", cfg.ip_token, text, lambda s, _: _valid_ipv6(s))
    if "ipv4" in cfg.kinds:
        text = sub(IPV4, "ipv4", cfg.ip_token, text)
    if "phone" in cfg.kinds:
        text = sub(PHONE, "phone", cfg.phone_token, text)
        urls = url_spans(text)
        text = sub(PHONE_BARE, "phone", cfg.phone_token, text,
                   lambda _, at: not any(a <= at < b for a, b in urls))
    return text, counts


def pii(cfg: PIIConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Mask PII in place; `meta.pii` holds the non-zero counts. Never rejects."""
    for d in docs:
        d.text, counts = mask_pii(d.text, cfg)
        found = {k: v for k, v in counts.items() if v}
        if found:
            d.meta["pii"] = found
    return docs

"""PII masking: exact expected outputs for e-mails, US phone formats, IPv4 and IPv6."""

from __future__ import annotations

from lmforge.data.document import Document
from lmforge.data.pii import PIIConfig, mask_pii, pii
from lmforge.data.stage import StageContext

E, P, I = "|||EMAIL_ADDRESS|||", "|||PHONE_NUMBER|||", "|||IP_ADDRESS|||"


def test_emails():
    text = "Write to bob.smith+news@example.co.uk or ALICE_99@mail-server.org, not to @handle or a@b."
    assert mask_pii(text)[0] == f"Write to {E} or {E}, not to @handle or a@b."


def test_us_phone_formats():
    text = ("(555) 123-4567; 555-123-4567; 555.123.4567; 555 123 4567; +1 555-123-4567; 1-800-555-0199; "
            "(555)123-4567.")
    masked, counts = mask_pii(text)
    assert masked == f"{P}; {P}; {P}; {P}; {P}; {P}; {P}."
    assert counts["phone"] == 7


def test_numbers_that_are_not_phones():
    text = "ISBN 978-3-16-148410-0, date 2020-01-1234, pi 3.14159265, order 555-1234, mixed 555-123.4567"
    assert mask_pii(text) == (text, {"email": 0, "phone": 0, "ipv4": 0, "ipv6": 0})


def test_ipv4():
    text = "Server 192.168.0.1. Gateway 10.0.0.254, not 999.1.1.1 nor 1.2.3.4.5 nor version 2.7.18"
    assert mask_pii(text)[0] == f"Server {I}. Gateway {I}, not 999.1.1.1 nor 1.2.3.4.5 nor version 2.7.18"


def test_ipv6():
    text = ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334, short 2001:db8::ff00:42:8329, loopback ::1, "
            "mapped ::ffff:192.0.2.1; not std::vector, a::b, 12:30:45 or 1:2:3")
    masked, counts = mask_pii(text)
    assert masked == (f"full {I}, short {I}, loopback {I}, mapped {I}; not std::vector, a::b, 12:30:45 or 1:2:3")
    assert counts == {"email": 0, "phone": 0, "ipv4": 0, "ipv6": 4}


def test_stage_counts_per_document_and_kinds():
    docs = [Document(id="a", text="mail x@y.com, call 555-123-4567, ip 8.8.8.8 and fe80::1"),
            Document(id="b", text="nothing here")]
    out = pii(PIIConfig(), docs, StageContext())
    assert out[0].text == f"mail {E}, call {P}, ip {I} and {I}"
    assert out[0].meta["pii"] == {"email": 1, "phone": 1, "ipv4": 1, "ipv6": 1}
    assert "pii" not in out[1].meta and out[1].drop is None
    only_mail = mask_pii("x@y.com 8.8.8.8", PIIConfig(kinds=("email",), email_token="<EMAIL>"))
    assert only_mail == ("<EMAIL> 8.8.8.8", {"email": 1})


def test_bare_and_plus_one_us_phones():
    text = ("Call 2831823829 today, or +12831823829, +1 2831823829, +1-283-182-3829. Fax: 6175550123.")
    masked, counts = mask_pii(text)
    assert masked == f"Call {P} today, or {P}, {P}, {P}. Fax: {P}."
    assert counts["phone"] == 5


def test_long_numbers_that_are_not_bare_phones():
    text = ("Founded in 1998, revised 2023. See https://example.com/item/2831823829?ref=6175550123 and "
            "www.shop.com/p-2831823829.html; order id=2831823829; ts 1700000000 and 1234567890; "
            "account 28318238291234; pi 3.2831823829; big 0012831823829; sum 2831823829.50 USD")
    assert mask_pii(text) == (text, {"email": 0, "phone": 0, "ipv4": 0, "ipv6": 0})


def test_pii_next_to_cjk_and_accented_letters_is_masked():
    # A non-ASCII letter beside an address is not part of it (the lookarounds use ASCII word classes).
    cases = {"请发邮件至user@example.com谢谢": f"请发邮件至{E}谢谢",
             "服务器IP地址192.168.1.1已封禁": f"服务器IP地址{I}已封禁",
             "電話555-123-4567まで": f"電話{P}まで",
             "café2001:db8::1": f"café{I}"}
    for text, want in cases.items():
        assert mask_pii(text)[0] == want
    arabic_indic = "Call ٥٥٥-١٢٣-٤٥٦٧ or ٢٨٣١٨٢٣٨٢٩"  # not ASCII digits: not a US phone number
    assert mask_pii(arabic_indic) == (arabic_indic, {"email": 0, "phone": 0, "ipv4": 0, "ipv6": 0})


def test_pii_edge_cases_of_local_parts_colons_and_line_breaks():
    assert mask_pii("Mail _john@example.com or o'brien@example.com, not 'bob@example.com'")[0] == (
        f"Mail {E} or {E}, not '{E}'")
    masked, counts = mask_pii("Address 2001:db8::1: down; ::1: too")
    assert masked == f"Address {I}: down; {I}: too" and counts["ipv6"] == 2
    # Digits on separate lines (a table column) are not one phone number; tabs still separate one.
    assert mask_pii("lines:\n555\n123\n4567")[0] == "lines:\n555\n123\n4567"
    assert mask_pii("tel\t555\t123\t4567")[0] == f"tel\t{P}"

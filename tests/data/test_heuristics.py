"""Gopher, C4 and FineWeb rules: each rule fires on a document built to break it, and only then."""

from __future__ import annotations

import math
import random
import re

import pytest

from lmforge.data.c4 import C4Config, c4, clean_c4
from lmforge.data.document import Document
from lmforge.data.fineweb import FineWebConfig, fineweb_failures
from lmforge.data.gopher import (GopherConfig, dup_ngram_char_frac, gopher, quality_failures,
                                 repetition_failures, top_ngram_char_frac)
from lmforge.data.stage import StageContext

GOOD = ("The committee met on Tuesday to review the annual budget and the plans for the new library. "
        "Members of the public were invited to ask questions, and several residents spoke about the need "
        "for longer opening hours. The chair thanked everyone for coming and said that a decision would be "
        "made at the next meeting, after the finance officer has had time to check the figures with the "
        "architects and the building contractor.")


def test_good_text_passes_every_gopher_rule():
    assert quality_failures(GOOD, GopherConfig()) == []
    assert repetition_failures(GOOD, GopherConfig()) == []


@pytest.mark.parametrize("text, rule", [
    ("the and of to be " * 5, "word_count"),
    ("a an of to the be in is at we " * 10, "mean_word_length"),
    (GOOD + " #tag" * 20, "symbol_word_ratio"),
    ("\n".join(f"- item {i} with the and of words" for i in range(60)), "bullet_lines"),
    ("\n".join(f"line {i} of the story and then..." for i in range(60)), "ellipsis_lines"),
    (GOOD + " 123 456 789 000 111 222 333 444 555 666 777 888 999" * 2, "alpha_words"),
    ("Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 6, "stop_words"),
])
def test_each_gopher_quality_rule(text, rule):
    assert rule in quality_failures(text, GopherConfig())


def _random_texts(vocab: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 80))) for _ in range(count)]


def test_gopher_alpha_words_counts_tokens_with_an_isalpha_character():
    """Paper: at least 80% of words hold at least one alphabetic character. ², ½, ①, Ⅳ are numerics, not
    letters (str.isalpha() is False), so "x²" counts and "½" does not. The threshold is set exactly at
    the reference ratio (passes) and one float above it (fails), which pins the count."""
    vocab = ["the", "x²", "²", "½", "①", "Ⅳ", "一", "123", "é", "_", "—", "#", "3½", "日本", "٣", "ǅ", "ʰ"]
    for text in _random_texts(vocab, 300, seed=1):
        words = text.split()
        ratio = sum(any(ch.isalpha() for ch in w) for w in words) / len(words)
        assert "alpha_words" not in quality_failures(text, GopherConfig(min_alpha_words_ratio=ratio)), text
        above = GopherConfig(min_alpha_words_ratio=math.nextafter(ratio, 2.0))
        assert "alpha_words" in quality_failures(text, above), text


def test_gopher_symbol_ratio_is_checked_for_hash_and_ellipsis_separately():
    """Paper: "a symbol-to-word ratio greater than 0.1 for either the hash symbol or the ellipsis"."""
    n = 100
    both = " ".join(["#tag"] * 8 + ["more..."] * 8 + ["word"] * (n - 16))  # 0.08 each, 0.16 summed
    assert "symbol_word_ratio" not in quality_failures(both, GopherConfig())
    assert "symbol_word_ratio" in quality_failures(both.replace("word", "#w", 3), GopherConfig())  # 11 #
    assert "symbol_word_ratio" in quality_failures(both.replace("word", "w…", 3), GopherConfig())  # 11 ellipses
    for text in _random_texts(["word", "#tag", "##", "so...", "…", "....", "the"], 300, seed=2):
        words = len(text.split())
        ref = text.count("#") / words > 0.1 or (text.count("...") + text.count("…")) / words > 0.1
        assert ("symbol_word_ratio" in quality_failures(text, GopherConfig())) == ref, text


def test_gopher_stop_words_compare_lowercased_tokens():
    """A stop word is a token whose lowercase, stripped of punctuation, is in the list: "WITH" and
    "(The)" count; "wıth" (dotless ı) and "wİth" do not (re.IGNORECASE's Unicode folding matched them)."""
    punct = "\"'“”‘’.,;:!?()[]{}«»"
    vocab = ["with", "WITH", "wıth", "wİth", "The.", "(that)", "tһe", "ᴛhe", "Ⓣhe", "and,", "ﬀ", "cat", "dog"]
    for text in _random_texts(vocab, 400, seed=3):
        ref = sum(w.lower().strip(punct) in GopherConfig().stop_words for w in text.split()) >= 2
        assert ("stop_words" not in quality_failures(text, GopherConfig())) == ref, text
    assert "stop_words" in quality_failures("wıth wıth cat " * 20, GopherConfig())


def test_gopher_repetition_rules():
    lines = "\n".join(["Click here to subscribe to the newsletter today."] * 5 + [GOOD])
    assert {"dup_line_frac", "dup_line_char_frac"} <= set(repetition_failures(lines, GopherConfig()))
    paras = "\n\n".join(["The same paragraph about the weather and the town."] * 4 + [GOOD])
    assert {"dup_para_frac", "dup_para_char_frac"} <= set(repetition_failures(paras, GopherConfig()))
    # "the cat" x 30 + filler: the top 2-gram covers far more than 20% of characters
    spam = " ".join(["the cat"] * 30) + " " + GOOD
    words = spam.split()
    assert top_ngram_char_frac(words, 2) == pytest.approx(30 * 6 / sum(map(len, words)))
    assert "top_2gram" in repetition_failures(spam, GopherConfig())
    # duplicate n-grams count only the repeats, not the first occurrence (Gopher, Rae et al. 2021 A.1.1; datatrove's
    # find_all_duplicate): "a b c d e" twice is half repeat
    assert dup_ngram_char_frac("a b c d e a b c d e".split(), 5) == 0.5
    assert dup_ngram_char_frac("a b c d e f g h i j".split(), 5) == 0.0


def test_gopher_stage_counts_every_failing_rule():
    ctx = StageContext()
    docs = [Document(id="g", text=GOOD), Document(id="s", text="short text"), Document(id="e", text="")]
    out = gopher(GopherConfig(), docs, ctx)
    assert [d.drop for d in out] == [None, "gopher:word_count", "gopher:word_count"]
    assert ctx.counters["gopher.word_count"] == 2
    assert ctx.counters["gopher.stop_words"] == 1  # "short text" also lacks stop words; "" stops at word_count


def test_c4_lines_and_pages():
    text = ("Welcome\nThis site uses cookies to improve your experience.\nPlease enable JavaScript to view it.\n"
            "Too short.\nThe river flooded the valley after three days of rain.\nFarmers moved their animals to "
            "higher ground.\nThe army helped to build walls of sandbags.\nSchools were closed for the week.\n"
            "Everyone hopes that the water will go down soon!")
    ctx = StageContext()
    out, rule = clean_c4(text, C4Config(), ctx)
    assert rule == "" and out.splitlines()[0] == "The river flooded the valley after three days of rain."
    assert len(out.splitlines()) == 5
    assert ctx.counters == {"c4.line_no_terminal_punct": 1, "c4.line_policy": 1, "c4.line_javascript": 1,
                            "c4.line_too_few_words": 1}
    assert clean_c4(text + "\nLorem ipsum dolor sit amet.", C4Config())[1] == "lorem_ipsum"
    assert clean_c4(text + "\nThe script was function f() { return 1; }.", C4Config())[1] == "curly_brace"
    # page rules look only at lines that survive the line rules (TFDS clean_page): a code line without an end mark
    # is removed, and the page kept
    assert clean_c4(text + "\nfunction f() { return 1; }", C4Config())[1] == ""
    assert clean_c4(text, C4Config(bad_words=("sandbags",)))[1] == "bad_words"
    assert clean_c4(text, C4Config(bad_words=("sand",)))[1] == ""  # whole words only
    assert clean_c4(text, C4Config(min_sentences=6))[1] == "too_few_sentences"


def test_c4_bad_words_file_hook(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("flooded\n")
    docs = c4(C4Config(bad_words_file=str(f)), [Document(id="x", text=GOOD), Document(id="y", text=GOOD +
              " It flooded.")], StageContext())
    assert [d.drop for d in docs] == [None, "c4:bad_words"]  # GOOD's 3 sentences meet TFDS's _MIN_NUM_SENTENCES


def test_c4_bad_words_file_edited_in_the_process_is_read_again(tmp_path):
    """The pattern was an lru_cache on the file's path: a list edited between two runs in one process kept its old
    words."""
    import os

    f = tmp_path / "bad.txt"
    f.write_text("flooded\n")
    cfg, doc = C4Config(bad_words_file=str(f)), lambda: [Document(id="y", text=GOOD + " It rained.")]  # noqa: E731
    assert c4(cfg, doc(), StageContext())[0].drop is None
    f.write_text("rained\n")
    t = os.stat(f).st_mtime_ns + 10**9
    os.utime(f, ns=(t, t))
    assert c4(cfg, doc(), StageContext())[0].drop == "c4:bad_words"


def test_the_c4_stage_looks_its_bad_words_file_up_once_a_batch_not_once_a_document(tmp_path, monkeypatch):
    """clean_c4 looked the pattern up (a path resolved twice and the file stat'ed) for every document: 31.5 -> 43.2
    us a document with no bad_words_file, 39.5 -> 80 with a 400-word one. The stage looks it up once a batch."""
    import os

    f = tmp_path / "bad.txt"
    f.write_text("flooded\n")
    stats, real = [], os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(os.fspath(p)) or real(p, *a, **k))
    cfg = C4Config(bad_words_file=str(f))
    per_batch = []
    for n in (1, 50):
        stats.clear()
        out = c4(cfg, [Document(id=str(i), text=GOOD + (" It flooded." if i % 2 else "")) for i in range(n)],
                 StageContext())
        assert [d.drop for d in out] == [None, "c4:bad_words"] * (n // 2) + [None] * (n % 2)
        per_batch.append(stats.count(str(f)))
    assert 1 <= per_batch[0] == per_batch[1] <= 4  # the batch's lookup, not one for each of the 50 documents


C4_BODY = ("The river flooded the valley after three days of rain.\nFarmers moved their animals to higher ground.\n"
           "The army helped to build walls of sandbags.\nSchools were closed for the week.\n"
           "Everyone hopes that the water will go down soon!")


def test_c4_drops_lines_ending_in_an_ellipsis():
    """TFDS clean_page: `not line.endswith(_END_MARKS) or line.endswith(_ELLIPSIS)` removes the line."""
    for tail in ("And then the story went on and on...", "And then the story went on and on…"):
        ctx = StageContext()
        out, rule = clean_c4(C4_BODY + "\n" + tail, C4Config(), ctx)
        assert rule == "" and tail not in out and out == C4_BODY
        assert ctx.counters == {"c4.line_no_terminal_punct": 1}
    assert clean_c4(C4_BODY + "\nThe story ends here at last.", C4Config())[0].endswith("at last.")


def test_c4_bad_words_are_bounded_by_non_word_characters_like_tfds():
    """Reference: TFDS's badwords regex `(?:\\W|^)(w1|w2|...)(?:\\W|$)` over the lowercased page."""
    bad = ("blue waffle", "x-rated", "dog", "a$$")
    tfds = re.compile(r"(?:\W|^)({})(?:\W|$)".format("|".join(map(re.escape, bad))))
    tokens = ["True", "blue", "Blue", "waffles", "waffle", "waffle.", "dog's", "dogs", "Dog!", "hotdog", "dog_",
              "x-rated", "X-Rated", "xrated", "a$$", "a$$hole", "(dog)", "the", "water", "-", "\t"]
    rng = random.Random(4)
    hits = 0
    for _ in range(400):
        # bad words count only in lines the line rules keep: this one has an end mark and five words or more
        page = " ".join(rng.choice(tokens) for _ in range(rng.randint(1, 8))) + " is on the sign.\n" + C4_BODY
        ref = tfds.search(page.lower()) is not None
        hits += ref
        assert (clean_c4(page, C4Config(bad_words=bad))[1] == "bad_words") == ref, page
    assert 50 < hits < 350  # both outcomes exercised
    assert clean_c4("True blue waffles are sold here.\n" + C4_BODY, C4Config(bad_words=bad))[1] == ""
    assert clean_c4("An X-rated film was shown.\n" + C4_BODY, C4Config(bad_words=bad))[1] == "bad_words"
    assert clean_c4("The dog's bowl was empty.\n" + C4_BODY, C4Config(bad_words=bad))[1] == "bad_words"
    assert clean_c4("The dog's bowl.\n" + C4_BODY, C4Config(bad_words=bad))[1] == ""  # a line the rules remove


def test_c4_lines_removed_counts_only_lines_a_rule_removed():
    text = "\n\nToo short.\n\n   \n" + C4_BODY.replace("\n", "\n\n") + "\nPlease enable JavaScript.\n\n"
    ctx = StageContext()
    (doc,) = c4(C4Config(), [Document(id="x", text=text)], ctx)
    assert doc.drop is None and doc.text == C4_BODY
    removed = sum(v for k, v in ctx.counters.items() if k.startswith("c4.line_"))
    assert removed == 2 and doc.meta["c4_lines_removed"] == removed


def test_c4_splits_lines_as_tfds_splitlines():
    """TFDS's clean_page splits with str.splitlines: a lone \r (old Mac files), form feeds, U+2028 and U+0085 end a
    line there; they were inside one line here, so a bad line joined a good one and the pair was judged as one."""
    for sep in ("\r", "\x0c", "\u2028", "\x85", "\r\n"):
        text = C4_BODY.replace("\n", sep) + sep + "Please enable JavaScript." + sep + "Too short."
        (doc,) = c4(C4Config(), [Document(id="x", text=text)], StageContext())
        assert doc.drop is None and doc.text == C4_BODY and doc.meta["c4_lines_removed"] == 2, sep


def test_fineweb_rules():
    good = "\n".join(s.strip() + "." for s in GOOD.split(".") if s.strip())
    assert fineweb_failures(good, FineWebConfig()) == []
    no_punct = "\n".join(f"Menu entry number {i} for the site navigation" for i in range(20))
    assert fineweb_failures(no_punct, FineWebConfig()) == ["line_punct_ratio"]
    dup = good + "\n" + "\n".join(["Share this article on social media now."] * 3)
    assert "dup_line_chars" in fineweb_failures(dup, FineWebConfig())
    short = "\n".join(["Home.", "About us.", "Contact.", GOOD])
    assert fineweb_failures(short, FineWebConfig()) == ["short_lines"]



def test_fineweb_rules_read_windows_line_ends_as_line_ends():
    """A CRLF text (a Windows text file read whole, a JSON field) had every line end in "\r", none in punctuation:
    rejected line_punct_ratio where its "\n" twin passes; each rule now sees the same lines for both."""
    good = "\n".join(s.strip() + "." for s in GOOD.split(".") if s.strip())
    dup = good + "\n" + "\n".join(["Share this article on social media now."] * 3)
    short = "\n".join(["Home.", "About us.", "Contact.", GOOD])
    long = "\n".join(f"Sentence number {i} of a long and ordinary paragraph of text." for i in range(20))
    for text in (good, dup, short, long):
        assert fineweb_failures(text.replace("\n", "\r\n"), FineWebConfig()) == fineweb_failures(text, FineWebConfig())
    assert fineweb_failures(long.replace("\n", "\r\n"), FineWebConfig()) == []  # was ["line_punct_ratio"]

def _reference_top(words: list[str], n: int) -> float:
    """Plain-Python definitions the hashed versions must match."""
    from collections import Counter

    if len(words) < n:
        return 0.0
    gram, count = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).most_common(1)[0]
    return 0.0 if count < 2 else count * sum(map(len, gram)) / sum(map(len, words))


def _reference_dup(words: list[str], n: int) -> float:
    """datatrove's find_all_duplicate over tuples of words: a repeat adds its characters and the scan jumps past it."""
    seen, repeated, i = set(), 0, 0
    while i < len(words) - n + 1:
        g = tuple(words[i:i + n])
        if g in seen:
            repeated += sum(map(len, g))
            i += n
        else:
            seen.add(g)
            i += 1
    return repeated / max(sum(map(len, words)), 1) if len(words) >= n else 0.0


def test_hashed_ngram_rules_match_reference():
    import random

    rng = random.Random(0)
    vocab = ["a", "bb", "ccc", "dddd", "the", "of", "and", "x" * 9]
    for _ in range(200):
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 60))]
        for n in (2, 3, 4, 5, 7, 10):
            assert top_ngram_char_frac(words, n) == pytest.approx(_reference_top(words, n))
            assert dup_ngram_char_frac(words, n) == pytest.approx(_reference_dup(words, n))

"""Special tokens through the GPT-2 and tiktoken files: kept where the format can hold them, warned about where not."""

from __future__ import annotations

import warnings

import pytest

from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.train import train_bpe

TEXT = "the cat sat on the mat, and the dog sat on the log.\n" * 40


def test_gpt2_files_keep_specials_of_any_form(tmp_path):
    # a chat tokenizer's specials: only <|...|> ones were read back as specials, "<s>" and "[PAD]" became
    # ordinary tokens no merge makes, so "</s>" in a chat template encoded as four bytes
    tok = train_bpe(iter([TEXT]), 300, ["<s>", "</s>", "[PAD]", "<|endoftext|>"], progress=False, workers=1)
    tok.save_gpt2(tmp_path)
    back = load_tokenizer(tmp_path / "vocab.json")
    assert back.special_tokens == {"<s>": 256, "</s>": 257, "[PAD]": 258, "<|endoftext|>": 259}
    text = "<s>the cat</s>[PAD]<|endoftext|>"
    assert back.encode(text) == tok.encode(text) == [256] + tok.encode_ordinary("the cat") + [257, 258, 259]
    assert back.merges == tok.merges and back.vocab == tok.vocab


def test_tiktoken_export_warns_when_the_specials_cannot_come_back(tmp_path):
    # the rank file holds no specials; a reader puts <|endoftext|> at the first free id (256 here), so this
    # tokenizer's <|endoftext|> (257) came back as another id, and <|im_start|> not at all, without a word
    tok = train_bpe(iter([TEXT]), 300, ["<|im_start|>", "<|endoftext|>"], progress=False, workers=1)
    with pytest.warns(UserWarning, match=r"special tokens \{'<\|im_start\|>': 256, '<\|endoftext\|>': 257\} "
                                         r"\(read back as \{'<\|endoftext\|>': 256\}\)"):
        path = tok.save_tiktoken(tmp_path / "t.tiktoken")
    assert load_tokenizer(path).special_tokens == {"<|endoftext|>": 256}
    plain = train_bpe(iter([TEXT]), 300, ["<|endoftext|>"], progress=False, workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # <|endoftext|> at 256 comes back as it was: nothing to say
        plain.save_tiktoken(tmp_path / "plain.tiktoken")
    assert load_tokenizer(tmp_path / "plain.tiktoken").special_tokens == plain.special_tokens


def _unmerged_vocab_tokenizer():
    # token 258 is an ordinary token no merge makes (a Llama-3-style ignore_merges vocab, a truncated merges.txt)
    from lmforge.tokenizer.bpe import Tokenizer
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"he", 257: b"hel", 258: b" world"})
    return Tokenizer(vocab, [(b"h", b"e"), (b"he", b"l")], ["<|endoftext|>"])


def test_gpt2_files_record_which_entries_are_specials(tmp_path):
    # read_gpt2 took every entry neither a byte nor a merge product for a special: " world" came back as a
    # special named "Ġworld", so decode gave "Ġworld" and the text "Ġworld" encoded as that one id
    tok = _unmerged_vocab_tokenizer()
    with pytest.warns(UserWarning, match=r"1 ordinary token\(s\) no merge makes \(\[b' world'\]\)"):
        tok.save_gpt2(tmp_path)
    assert (tmp_path / "added_tokens.json").read_text().split() == ['{', '"<|endoftext|>":', '259', '}']
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the record names the specials: nothing to guess, nothing to say
        back = load_tokenizer(tmp_path / "vocab.json")
    assert back.special_tokens == {"<|endoftext|>": 259}
    assert back.vocab == tok.vocab and back.decode([258]) == " world"
    assert back.encode("Ġworld") == list("Ġworld".encode())


def test_gpt2_files_without_the_record_warn_naming_the_guessed_specials(tmp_path):
    tok = _unmerged_vocab_tokenizer()
    with pytest.warns(UserWarning):
        tok.save_gpt2(tmp_path)
    (tmp_path / "added_tokens.json").unlink()  # as files written by other tools: GPT-2's own has no record
    with pytest.warns(UserWarning, match=r"entries no merge makes are taken as special tokens, .*: \[.Ġworld.\]"):
        back = load_tokenizer(tmp_path / "vocab.json")
    assert back.special_tokens == {"Ġworld": 258, "<|endoftext|>": 259}
    plain = train_bpe(iter([TEXT]), 300, ["<|endoftext|>"], progress=False, workers=1)
    plain.save_gpt2(tmp_path / "plain")
    (tmp_path / "plain" / "added_tokens.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GPT-2's own layout (<|endoftext|> the only such entry) loads quietly
        assert load_tokenizer(tmp_path / "plain" / "vocab.json").special_tokens == plain.special_tokens


def test_gpt2_files_with_hf_added_tokens_keep_the_specials_vocab_json_holds(tmp_path):
    # Hugging Face's added_tokens.json names only tokens added past vocab.json (a fine-tune's pad token): the
    # <|endoftext|> inside vocab.json is still a special, not an ordinary token no merge makes
    plain = train_bpe(iter([TEXT]), 300, ["<|endoftext|>"], progress=False, workers=1)
    plain.save_gpt2(tmp_path)
    eot, pad = plain.special_tokens["<|endoftext|>"], plain.vocab_size  # <pad>: the first id past vocab.json
    (tmp_path / "added_tokens.json").write_text('{"<pad>": %d}' % pad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_tokenizer(tmp_path / "vocab.json")
    assert back.special_tokens == {"<|endoftext|>": eot, "<pad>": pad}
    assert back.encode("the cat<pad>") == plain.encode_ordinary("the cat") + [pad]


def test_gpt2_files_stopped_between_renames_are_refused_not_read_as_a_mixed_set(tmp_path, monkeypatch):
    """write_gpt2 renamed vocab.json, merges.txt and added_tokens.json into place one by one, each written in
    turn: a writer stopped between two left one tokenizer's vocab beside another's merges, read back silently."""
    import os

    from lmforge.errors import DataError
    from lmforge.tokenizer.bpe import Tokenizer
    from lmforge.tokenizer.formats import WRITING_MARKER

    text = TEXT + "".join(f"a story of {w} and {v}.\n" for w in ("kings", "rivers") for v in ("wars", "storms"))
    old, new = (train_bpe(iter([text]), n, ["<|endoftext|>"], progress=False, workers=1) for n in (270, 290))
    assert new.merges[:len(old.merges)] == old.merges  # (a mixed set read back without a complaint before)
    v, m = old.save_gpt2(tmp_path)
    assert not (tmp_path / WRITING_MARKER).exists()
    replace, done = os.replace, []

    def stop_after_one(src, dst):  # the process dies after the first rename
        if done:
            raise KeyboardInterrupt
        replace(src, dst)
        done.append(dst)

    monkeypatch.setattr(os, "replace", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        new.save_gpt2(tmp_path)
    monkeypatch.setattr(os, "replace", replace)
    assert len(done) == 1 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["vocab.json", "merges.txt", "added_tokens.json", WRITING_MARKER])  # no temporaries left
    with pytest.raises(DataError, match=rf"being written when their writer stopped \({tmp_path / WRITING_MARKER}"):
        Tokenizer.from_gpt2_files(v, m)
    new.save_gpt2(tmp_path)  # written again: one whole set, the marker gone
    back = Tokenizer.from_gpt2_files(v, m)
    assert (back.vocab, back.merges, back.special_tokens) == (new.vocab, new.merges, new.special_tokens)
    assert not (tmp_path / WRITING_MARKER).exists()


def test_gpt2_files_written_by_two_writers_at_once_both_finish(tmp_path, monkeypatch):
    """Two writers of one folder: the one finishing first removes the marker, and the other's removal raised
    FileNotFoundError after its files were in place."""
    import os

    from lmforge.tokenizer.bpe import Tokenizer
    from lmforge.tokenizer.formats import WRITING_MARKER

    tok = train_bpe(iter([TEXT]), 270, ["<|endoftext|>"], progress=False, workers=1)
    replace = os.replace

    def other_writer_finishes(src, dst):  # the other writer's last step, between this one's renames
        replace(src, dst)
        (tmp_path / WRITING_MARKER).unlink(missing_ok=True)

    monkeypatch.setattr(os, "replace", other_writer_finishes)
    v, m = tok.save_gpt2(tmp_path)
    monkeypatch.setattr(os, "replace", replace)
    back = Tokenizer.from_gpt2_files(v, m)
    assert (back.vocab, back.merges) == (tok.vocab, tok.merges) and not (tmp_path / WRITING_MARKER).exists()


def test_gpt2_and_tiktoken_exports_name_the_added_token_flags_they_lose(tmp_path):
    """GPT-2 files (added_tokens.json: {special: id}) and tiktoken rank files hold no "special": false or "normalized":
    true: read back, Qwen3's <think> is a special that encode_ordinary leaves as text, and a normalized "ab" is matched
    in the raw text before "b<s>" no longer comes first; both were dropped without a word."""
    from lmforge.tokenizer.bpe import Tokenizer

    plain = train_bpe(iter([TEXT]), 300, ["<|endoftext|>", "<think>", "ab", "b<s>"], progress=False, workers=1)
    tok = Tokenizer(plain.vocab, plain.merges, plain.special_tokens, non_special=["<think>"], normalized=["ab"])
    with pytest.warns(UserWarning, match=r"added tokens \['<think>'\] marked not special .* added tokens \['ab'\] "
                                         r"matched in the normalized text.*tokenizer\.json") as caught:
        back = load_tokenizer(tok.save_gpt2(tmp_path)[0])
    assert len(caught) == 1
    assert (back.encode_ordinary("a<think>"), back.encode("ab<s>")) != (tok.encode_ordinary("a<think>"),
                                                                       tok.encode("ab<s>"))
    with pytest.warns(UserWarning, match=r"\['<think>'\] marked not special .* \['ab'\] matched in the normalized"):
        tok.save_tiktoken(tmp_path / "t.tiktoken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the same tokens, all special and matched in the raw text: nothing lost)
        Tokenizer(plain.vocab, plain.merges, plain.special_tokens).save_gpt2(tmp_path / "plain")


def test_gpt2_and_tiktoken_exports_say_when_the_end_of_text_token_is_lost(tmp_path):
    """A tokenizer whose eos_token is not the first of EOT_NAMES it holds (Llama-3-Instruct's <|eot_id|> beside
    <|end_of_text|>) was exported to GPT-2 files without a word: read back, generation stops at <|end_of_text|>."""
    from lmforge.tokenizer.bpe import Tokenizer

    plain = train_bpe(iter([TEXT]), 300, ["<|end_of_text|>", "<|eot_id|>"], progress=False, workers=1)
    tok = Tokenizer(plain.vocab, plain.merges, plain.special_tokens, eos_token="<|eot_id|>")
    with pytest.warns(UserWarning, match=r"end-of-text token '<\|eot_id\|>' \(read back as \d+, where generation"):
        back = load_tokenizer(tok.save_gpt2(tmp_path)[0])
    assert back.eot_id == tok.special_tokens["<|end_of_text|>"] != tok.eot_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (its end of text is the one a reader picks: nothing lost)
        Tokenizer(plain.vocab, plain.merges, plain.special_tokens, eos_token="<|end_of_text|>").save_gpt2(
            tmp_path / "plain")

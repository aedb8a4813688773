"""`lmforge tokenizer train | encode | stats`, end to end on small files; shards are read back with
`TokenFile` and decoded against the source text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main as lmforge_main
from lmforge.data.shards import TokenFile
from lmforge.tokenizer.load import load_tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    src = SHARED / "tinyshakespeare" / "input.txt"
    if not src.exists():
        pytest.skip(f"shared data not found: {src}")
    d = tmp_path_factory.mktemp("corpus")
    text = src.read_text()
    (d / "a.txt").write_text(text[:120_000])
    (d / "b.txt").write_text(text[120_000:160_000] + "<|endoftext|>" + "second doc in b\n")
    (d / "c.txt").write_bytes(b"bad bytes \xff\xfe here\n" * 3)
    return [d / "a.txt", d / "b.txt", d / "c.txt"]


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    assert lmforge_main(["tokenizer", "train", "--input", *map(str, corpus), "--vocab-size", "600", "--out", str(out),
                         "--export", "hf", "--progress", "False"]) == 0
    return out


def _docs(shard: TokenFile) -> list[list[int]]:
    ids = np.asarray(shard.tokens).tolist()
    docs, cur = [], None
    for i in ids:
        if i == shard.doc_sep:
            if cur is not None:
                docs.append(cur)
            cur = []
        else:
            cur.append(i)
    docs.append(cur)
    return docs


def test_train_writes_loadable_tokenizer(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == 600 and tok.eot_id == 256 and (tok_dir / "tokenizer.json").is_file()


def test_encode_shards_roundtrip(corpus, tok_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "shards"
    monkeypatch.setattr("lmforge.utils.INLINE_BYTES", 0)  # two worker processes even for this small corpus
    assert lmforge_main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--input", *map(str, corpus),
                         "--out", str(out), "--workers", "2", "--progress", "False"]) == 0
    assert "undecodable" in capsys.readouterr().out
    tok = load_tokenizer(tok_dir)
    shard = TokenFile(out / "train.bin")
    assert shard.doc_sep == tok.eot_id and shard.vocab_size == 600 and shard.header["num_docs"] == 4
    assert load_tokenizer(shard.tokenizer).merges == tok.merges
    want = [corpus[0].read_text(), *corpus[1].read_text().split("<|endoftext|>"),
            corpus[2].read_bytes().decode("cp1252")]  # bytes that are not UTF-8: Windows-1252 (data.readers)
    docs = _docs(shard)
    assert [tok.decode(d) for d in docs] == want
    assert docs[0] == tok.encode(want[0])


def test_encode_val_split(corpus, tok_dir, tmp_path):
    out = tmp_path / "shards"
    assert lmforge_main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--input", str(corpus[0]),
                         "--out", str(out), "--val-fraction", "0.1", "--progress", "False"]) == 0
    tok = load_tokenizer(tok_dir)
    train, val = TokenFile(out / "train.bin"), TokenFile(out / "val.bin")
    text = corpus[0].read_text()
    joined = tok.decode(_docs(train)[0]) + tok.decode(_docs(val)[0])
    assert joined == text and 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert np.asarray(train.tokens).tolist()[1:] + np.asarray(val.tokens).tolist()[1:] == tok.encode(text)


def test_val_split_of_a_file_ending_in_an_indented_block(tmp_path):
    """No safe cut (a newline between printable bytes) inside an indented block: the tail starts at the first
    line start after the target instead (Debian's standard library, the README's corpus, gave no tail)."""
    from lmforge.data.tokenize import tokenize_to_shards

    text = "import os\nimport sys\n" * 200 + "\n\nclass Big:\n" + "    x = 1  # an attribute\n" * 400
    (tmp_path / "code.py").write_text(text)
    tokenize_to_shards(tmp_path / "code.py", "byte", tmp_path / "out", val_fraction=0.05)
    train, val = (np.asarray(TokenFile(tmp_path / "out" / f"{s}.bin").tokens) for s in ("train", "val"))
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.06
    assert bytes(train[1:].tolist()) + bytes(val[1:].tolist()) == text.encode()


def test_stats_match_direct_count(corpus, tok_dir, capsys):
    assert lmforge_main(["tokenizer", "stats", "--tokenizer", str(tok_dir), "--input", str(corpus[0]),
                         "--json", "True"]) == 0
    s = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(corpus[0].read_text())
    assert s["tokens"] == len(ids) and s["vocab_used"] == len(set(ids))
    assert s["bytes_per_token"] == pytest.approx(corpus[0].stat().st_size / len(ids))


def test_stats_imports_no_torch(corpus, tok_dir):
    """`lmforge tokenizer stats` counts bytes per token as val_bpb does (infer.detok.token_text_bytes) without
    importing torch (2.5 s of a command that otherwise reads text)."""
    import subprocess
    import sys

    code = ("import sys; from lmforge.cli import main; "
            f"rc = main(['tokenizer', 'stats', '--tokenizer', {str(tok_dir)!r}, '--input', {str(corpus[1])!r}, "
            "'--progress', 'False']); print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split()[-2:] == ["0", "False"], r.stdout + r.stderr


def test_stats_ratio_leaves_the_separators_out_as_val_bpb_does(corpus, tok_dir):
    """bytes_per_token is the ratio data.bytes_per_token takes: the documents' text bytes over their tokens, the
    <|endoftext|> separators (13 bytes of file, no token of the text) counted in neither; it counted their bytes."""
    from lmforge.tokenizer.corpus import corpus_stats

    tok = load_tokenizer(tok_dir)
    text = corpus[1].read_text()
    docs = text.split("<|endoftext|>")
    assert len(docs) == 2
    s = corpus_stats(tok, [str(corpus[1])], progress=False)
    assert s["bytes"] == len(text.encode())
    assert s["bytes_per_token"] == pytest.approx(sum(len(d.encode()) for d in docs) /
                                                 sum(len(tok.encode(d)) for d in docs))


def test_errors_are_one_line(tmp_path, capsys):
    assert lmforge_main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                         "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "input not found" in err and "missing.txt" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "lmforge_tokenizer.json").write_text("{oops")
    assert lmforge_main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "bad"), "--input",
                         str(tmp_path / "bad" / "lmforge_tokenizer.json")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert lmforge_main(["tokenizer", "train", "--input", "x", "--vocab-size", "100", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()  # (a value the config refuses: one line, as a TOML key's is)
    assert len(err) == 2 and err[0].startswith("lmforge tokenizer: error: vocab_size") and "100" in err[0]


def test_a_bad_pattern_is_reported_at_its_own_positions(tmp_path, capsys):
    """--pattern "(" said "missing ) at position 26", a position in the wrapper lmforge compiles the pattern in
    (found 2026-12-05): the error is the pattern's own. A valid pattern that only the wrapper breaks (a (?x)
    comment running to its end swallows the wrapper's ")") trains, on the reference path."""
    (tmp_path / "a.txt").write_text("some text\n")
    for pattern, why in [("(", "is not a valid regex: missing ) at position 1"),
                         ("ab)", "is not a valid regex: unbalanced parenthesis at position 2")]:
        assert lmforge_main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "300",
                             "--out", str(tmp_path / "tok"), "--pattern", pattern]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == f"lmforge tokenizer: error: pre-tokenization pattern {pattern!r} {why}"
    assert not (tmp_path / "tok").exists()
    assert lmforge_main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "260",
                         "--out", str(tmp_path / "tok"), "--pattern", "(?x) \\w+ | \\s  # words, spaces"]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert not tok.fast and tok.decode(tok.encode("some text")) == "some text"


def test_encode_with_byte_tokenizer(corpus, tmp_path):
    out = tmp_path / "bytes"
    assert lmforge_main(["tokenizer", "encode", "--tokenizer", "byte", "--input", str(corpus[1]), "--out", str(out),
                         "--progress", "False"]) == 0
    shard = TokenFile(out / "train.bin")
    assert shard.tokenizer == "byte" and shard.doc_sep == 256
    assert _docs(shard) == [list(d.encode()) for d in corpus[1].read_text().split("<|endoftext|>")]


def test_an_out_no_writer_could_use_is_refused_before_any_work(tmp_path, capsys):
    """--out naming a file, or a path under one, gave FileExistsError / NotADirectoryError tracebacks after the
    training or encoding was done, and --out '' wrote into the current directory (found 2026-12-05)."""
    (tmp_path / "a.txt").write_text("some text\n" * 20)
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    (tmp_path / "tok.json").mkdir()
    fix = "set --out to a new or existing directory"
    cases = [
        (["train", "--vocab-size", "300"], str(taken), f"--out '{taken}' is an existing file, not a directory; "
                                                       f"{fix}, or move the file away"),
        (["train", "--vocab-size", "300"], f"{taken}/sub", f"--out '{taken}/sub' lies under '{taken}', an existing "
                                                           f"file, not a directory; {fix}, or move the file away"),
        (["train", "--vocab-size", "300"], "", f"--out is empty; {fix}"),
        (["train", "--vocab-size", "300"], str(tmp_path / "tok.json"),  # a .json --out is the tokenizer file
         f"--out '{tmp_path / 'tok.json'}' is a directory, not a file; set --out to a file path"),
        (["encode", "--tokenizer", "byte"], str(taken), f"--out '{taken}' is an existing file, not a directory; "
                                                        f"{fix}, or move the file away"),
        (["encode", "--tokenizer", "byte"], "", f"--out is empty; {fix}"),
    ]
    for args, out, message in cases:
        assert lmforge_main(["tokenizer", *args, "--input", str(tmp_path / "a.txt"), "--out", out,
                             "--progress", "False"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == f"lmforge tokenizer: error: {message}" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "notes.txt", "tok.json"]
    assert taken.read_text() == "mine\n" and not any((tmp_path / "tok.json").iterdir())
    assert lmforge_main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "260",
                         "--out", str(tmp_path / "t.json"), "--progress", "False"]) == 0
    assert load_tokenizer(tmp_path / "t.json").vocab_size == 260


def test_encode_into_a_train_or_val_bin_that_is_a_directory_is_refused_before_encoding(tmp_path, capsys):
    """OUT/train.bin (or val.bin) being a directory: the whole corpus was encoded, then the rename onto it gave an
    IsADirectoryError traceback; for val.bin, the new train.bin was already in place with no val.bin beside it
    (found 2026-12-05). Now one line before encoding, and --out is left as it was."""
    (tmp_path / "a.txt").write_text("some text\n" * 200)
    for split, extra in [("train", []), ("val", ["--val-fraction", "0.1"])]:
        out = tmp_path / f"out_{split}"
        (out / f"{split}.bin").mkdir(parents=True)
        assert lmforge_main(["tokenizer", "encode", "--tokenizer", "byte", "--input", str(tmp_path / "a.txt"),
                             "--out", str(out), "--progress", "False", *extra]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == (f"lmforge tokenizer: error: --out {out}: {out / f'{split}.bin'} is a directory, "
                                       "not a token file; move it away, or encode into another --out")
        assert [p.name for p in out.iterdir()] == [f"{split}.bin"]


def test_the_library_encoders_refuse_a_train_or_val_bin_directory_before_encoding(tmp_path, monkeypatch):
    """encode_to_shards and tokenize_to_shards (the library behind the CLI check above) encoded everything, then
    failed with an IsADirectoryError traceback, leaving the new train.bin without val.bin (found 2026-12-05);
    tokenize_to_shards also saved an unsaved tokenizer into out_dir first. Now the same check, before any work."""
    from lmforge.data.tokenize import tokenize_to_shards
    from lmforge.errors import ConfigError
    from lmforge.tokenizer import corpus
    from lmforge.tokenizer.train import train_bpe

    (tmp_path / "a.txt").write_text("some text\n" * 200)
    unsaved = train_bpe([tmp_path / "a.txt"], 260, ("<|endoftext|>",), progress=False)
    monkeypatch.setattr(corpus, "_run_ordered", lambda *a, **k: pytest.fail("encoded before the check"))
    for split, val_fraction in [("train", 0.0), ("val", 0.1)]:
        for name, encode in [("encode", lambda out: corpus.encode_to_shards(
                                 load_tokenizer("byte"), [str(tmp_path / "a.txt")], out, val_fraction=val_fraction)),
                             ("tokenize", lambda out: tokenize_to_shards(tmp_path / "a.txt", unsaved, out,
                                                                         val_fraction=val_fraction))]:
            out = tmp_path / f"{name}_{split}"
            (out / f"{split}.bin").mkdir(parents=True)
            with pytest.raises(ConfigError) as e:
                encode(out)
            assert str(e.value) == (f"out_dir {out}: {out / f'{split}.bin'} is a directory, not a token file; move it "
                                    "away, or encode into another out_dir")
            assert [p.name for p in out.iterdir()] == [f"{split}.bin"]


@pytest.mark.parametrize("cmd, args", [(cmd, ["--workers", n]) for cmd in ("train", "encode", "stats")
                                       for n in ("0", "-3")] + [("train", ["--export", "hf"]),
                                                                ("stats", ["--top", "-1"])])
def test_workers_below_one_and_export_into_a_json_file_are_refused(tmp_path, cmd, args, capsys):
    """--workers 0 and -3 were taken silently (0 as every core, -3 as one); --export with a .json --out wrote
    the tokenizer file and then failed to make a directory of the same name."""
    extra = {"train": ["--vocab-size", "300", "--out", str(tmp_path / "t.json")],
             "encode": ["--tokenizer", "byte", "--out", str(tmp_path / "o")], "stats": ["--tokenizer", "byte"]}[cmd]
    code = lmforge_main(["tokenizer", cmd, "--input", str(tmp_path / "a.txt"), *extra, *args])
    text = capsys.readouterr().err
    want = (f"--workers must be >= 1 (worker processes), got {args[1]}; leave it out to use every core"
            if args[0] == "--workers" else "--top must be >= 0 (0 lists none), got -1" if args[0] == "--top"
            else f"--export writes its files into a directory, but --out '{tmp_path / 't.json'}' names one .json "
            "file; give --out a directory")
    assert code == 2 and want in text.splitlines()[0] and len(text.splitlines()) == 2
    assert list(tmp_path.iterdir()) == []


def test_an_encode_without_val_removes_the_earlier_encodes_val_bin(tok_dir, corpus, tmp_path, capsys, monkeypatch):
    """Encoding into the --out of an earlier encode that wrote a val.bin, without --val-fraction, left that
    val.bin (of another tokenizer) beside the new train.bin, and the pair was read as one (found 2026-12-05).
    It is removed once the new train.bin is in place; a val.bin that is not half of such a pair is refused."""
    import os

    out = tmp_path / "enc"
    encode = ["tokenizer", "encode", "--input", str(corpus[0]), "--out", str(out), "--progress", "False"]
    assert lmforge_main([*encode, "--tokenizer", str(tok_dir), "--val-fraction", "0.1"]) == 0
    before = {n: (out / n).read_bytes() for n in ("train.bin", "val.bin")}
    capsys.readouterr()
    real = os.replace

    def killed(a, b):  # the new train.bin never comes: the earlier pair stays as it was
        if Path(b).name == "train.bin":
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", killed)
    assert lmforge_main([*encode, "--tokenizer", "byte"]) == 130
    monkeypatch.undo()
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert lmforge_main([*encode, "--tokenizer", "byte"]) == 0
    assert os.listdir(out) == ["train.bin"] and TokenFile(out / "train.bin").tokenizer == "byte"
    assert f"removed {out / 'val.bin'}: an earlier encode's, and this one writes no val.bin" in capsys.readouterr().out
    (out / "val.bin").write_bytes(before["val.bin"])  # beside no earlier train.bin of its own pair
    (out / "train.bin").write_text("not a shard")
    assert lmforge_main([*encode, "--tokenizer", "byte"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"lmforge tokenizer: error: {out / 'val.bin'} is there but is not half of an earlier encode's "
        "train.bin/val.bin pair, and this encode writes no val.bin (--val-fraction 0), so it would be taken for "
        "the new train.bin's; move it away, or encode into another directory")
    assert (out / "val.bin").read_bytes() == before["val.bin"] and (out / "train.bin").read_text() == "not a shard"


def test_train_refuses_an_out_holding_exports_it_would_leave_stale(tmp_path, capsys):
    """A second train into the same --out without --export rewrote lmforge_tokenizer.json and left the first
    train's tokenizer.json and bpe.tiktoken beside it: HF's AutoTokenizer on the folder read the old tokenizer."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log\n" * 50)
    out = tmp_path / "tok"
    train = ["tokenizer", "train", "--input", str(corpus), "--out", str(out), "--workers", "1", "--progress", "False"]
    assert lmforge_main([*train, "--vocab-size", "270", "--export", "hf", "tiktoken"]) == 0
    first = (out / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert lmforge_main([*train, "--vocab-size", "280", "--export", "hf"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"lmforge tokenizer: error: --out {out} holds bpe.tiktoken (another tokenizer's tiktoken export), which this "
        "train would leave beside its new lmforge_tokenizer.json; add --export hf tiktoken to rewrite them, remove "
        "them, or choose another --out")
    assert (out / "tokenizer.json").read_bytes() == first and load_tokenizer(out).vocab_size == 270  # untouched
    assert lmforge_main([*train, "--vocab-size", "280", "--export", "tiktoken", "hf"]) == 0
    new = load_tokenizer(out / "lmforge_tokenizer.json").merges
    assert load_tokenizer(out / "tokenizer.json").merges == load_tokenizer(out / "bpe.tiktoken").merges == new
    assert len(new) > 270 - 257


def test_train_names_the_files_its_exports_wrote(tmp_path, capsys):
    """`--export hf` wrote tokenizer.json and tokenizer_config.json, but the closing line named only
    lmforge_tokenizer.json: nothing said where the HF files were, or that they were written."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog sat on the log\n" * 50)
    out = tmp_path / "tok"
    assert lmforge_main(["tokenizer", "train", "--input", str(corpus), "--out", str(out), "--workers", "1",
                         "--progress", "False", "--vocab-size", "270", "--export", "hf", "tiktoken"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.endswith(f"-> {out / 'lmforge_tokenizer.json'}; --export hf: {out / 'tokenizer.json'}, "
                         f"{out / 'tokenizer_config.json'}; --export tiktoken: {out / 'bpe.tiktoken'}"), line


def test_tokenizer_train_help_says_how_many_workers_it_takes_by_default(tmp_path, monkeypatch, capsys):
    """`lmforge tokenizer train --help` said --workers None is "every core"; pre-token counting takes one per core up
    to 8 (train.MAX_DEFAULT_WORKERS): on 32 cores, 8 workers. The help says what the code does."""
    from lmforge.tokenizer import train

    class Started(Exception):
        pass

    def pool(workers):
        raise Started(workers)

    monkeypatch.setattr(train.os, "cpu_count", lambda: 32)
    monkeypatch.setattr(train, "INLINE_BYTES", 0)  # (the pool even for a small corpus)
    monkeypatch.setattr(train, "process_pool", pool)
    (tmp_path / "a.txt").write_text("hello world\n" * 10)
    with pytest.raises(Started) as started:
        lmforge_main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out",
                      str(tmp_path / "t.json"), "--progress", "false"])
    assert started.value.args == (train.MAX_DEFAULT_WORKERS,) == (8,)
    with pytest.raises(SystemExit):
        lmforge_main(["tokenizer", "train", "--help"])
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert f"worker processes (None = one per core, {train.MAX_DEFAULT_WORKERS} at most)" in text


def test_each_input_file_is_checked_for_text_once(tmp_path, monkeypatch):
    """`lmforge tokenizer train` read every input's head and tail twice: expand_inputs checked it (check_text_file),
    then train_bpe checked it again. Now train_bpe's check is the one; encode and stats check once, in
    expand_inputs."""
    import lmforge.tokenizer.corpus as corpus_mod
    import lmforge.tokenizer.train as train_mod

    checked: list[str] = []
    real = train_mod.check_text_file

    def counting(path):
        checked.append(Path(path).name)
        real(path)

    monkeypatch.setattr(train_mod, "check_text_file", counting)
    monkeypatch.setattr(corpus_mod, "check_text_file", counting)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    common = ["--progress", "False", "--workers", "1"]
    assert lmforge_main(["tokenizer", "train", "--input", *inputs, "--vocab-size", "270", "--out",
                         str(tmp_path / "tok"), *common]) == 0
    assert checked == ["a.txt", "b.txt"]
    checked.clear()
    assert lmforge_main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "--input", *inputs, "--out",
                         str(tmp_path / "shards"), *common]) == 0
    assert checked == ["a.txt", "b.txt"]
    checked.clear()
    assert lmforge_main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "tok"), "--input", *inputs,
                         "--workers", "1"]) == 0
    assert checked == ["a.txt", "b.txt"]

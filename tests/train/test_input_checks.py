"""Pretraining input refused before a run starts: shards of two tokenizers in one run (not the same tokenizer
spelled two ways), a directory where a shard file belongs, values that would overflow or never train."""

import dataclasses
import math
import re
import shutil
import warnings

import pytest

from lmforge.data.shards import write_tokens
from lmforge.errors import ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.train.config import DataConfig, LoopConfig, PhaseConfig, SourceConfig, TrainConfig
from lmforge.train.pretrain import pretraining_data, pretraining_parts

from .helpers import make_shard, synthetic_text, tiny_config

MODEL = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)


def _bpe(text: str):
    from lmforge.tokenizer.train import train_bpe

    return train_bpe(iter([text]), 300, special_tokens=[], progress=False, workers=1)


def _config(tmp_path, train, val=(), run="run"):
    cfg = tiny_config(train[0], tmp_path / run, model=MODEL, max_steps=10)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=tuple(map(str, train)),
                                                             val=tuple(map(str, val))))


@pytest.fixture
def bpe_shards(tmp_path):
    """A BPE tokenizer saved at tmp/tok/tok.json and the synthetic text encoded by it as tmp/a/train.bin."""
    tok = _bpe(synthetic_text())
    path = tok.save(tmp_path / "tok" / "tok.json")
    ids = tok.encode(synthetic_text(seed=1))
    train = write_tokens(tmp_path / "a" / "train.bin", ids, vocab_size=300, tokenizer=str(path))
    return tok, path, ids, train


def test_one_tokenizer_spelled_two_ways_or_copied_is_accepted(tmp_path, bpe_shards):
    tok, path, ids, train = bpe_shards
    relative = write_tokens(tmp_path / "a" / "val.bin", ids, vocab_size=300, tokenizer="../tok/tok.json")
    shutil.copy(path, tmp_path / "copy.json")
    copied = write_tokens(tmp_path / "b" / "val.bin", ids, vocab_size=300, tokenizer=str(tmp_path / "copy.json"))
    for val in (relative, copied):
        parts = pretraining_parts(_config(tmp_path, [train], [val]))
        assert parts.tokenizer.encode("the cat sat") == tok.encode("the cat sat")


def test_shards_of_another_tokenizer_are_refused_naming_both_files(tmp_path, bpe_shards):
    tok, path, ids, train = bpe_shards
    byte = make_shard(tmp_path / "byte" / "val.bin")  # vocab 257, tokenizer 'byte'
    with pytest.raises(DataError, match=rf"{byte} was encoded by tokenizer 'byte' \(vocab 257\) but {train} by "
                                        rf"'{path}' \(vocab 300\), so one id means another token in each; re-encode"):
        pretraining_parts(_config(tmp_path, [train], [byte]))
    with pytest.raises(DataError, match=rf"{train} was encoded by .* but {byte} by 'byte'"):
        pretraining_parts(_config(tmp_path, [byte], [train]))
    # the same vocabulary size, other merges: the two files load as tokenizers that encode text differently
    other = _bpe("zebra quartz jumps vexing " * 200).save(tmp_path / "other.json")
    val = write_tokens(tmp_path / "c" / "val.bin", ids, vocab_size=300, tokenizer=str(other))
    with pytest.raises(DataError, match=rf"{val} was encoded by tokenizer '{other}' \(vocab 300\)"):
        pretraining_parts(_config(tmp_path, [train], [val]))
    cfg = _config(tmp_path, [train])  # a mixture's sources: every source's shards
    data = DataConfig(seq_len=32, batch_size=8, sources=(SourceConfig(name="bpe", train=(str(train),)),
                                                         SourceConfig(name="byte", train=(str(byte),))),
                      phases=(PhaseConfig(start=0.0, weights=(1.0, 1.0)),))
    with pytest.raises(DataError, match=rf"{byte} was encoded by tokenizer 'byte' \(vocab 257\) but {train}"):
        pretraining_parts(dataclasses.replace(cfg, data=data))


def test_a_run_tokenizer_must_be_the_shards_own_where_theirs_loads(tmp_path, bpe_shards):
    """tokenizer = '...' over shards whose header names another that loads was taken as it was: a BPE tokenizer over
    byte shards trained, its checkpoints decoding byte ids as BPE tokens (and `lmforge sample` refusing them, 323
    tokens over a 257-row model). The same tokenizer in another file, or one named where the header's has moved,
    is the key's use and goes on."""
    tok, path, ids, train = bpe_shards
    byte = make_shard(tmp_path / "byte.bin")
    cfg = dataclasses.replace(_config(tmp_path, [byte]), tokenizer=str(path))
    with pytest.raises(DataError, match=rf"^tokenizer='{path}' does not encode as 'byte', the tokenizer {byte} was "
                                        r"encoded with, so its ids would be read as other tokens; leave tokenizer "):
        pretraining_parts(cfg)
    cfg = dataclasses.replace(_config(tmp_path, [train]), tokenizer="byte")
    with pytest.raises(DataError, match=rf"^tokenizer='byte' does not encode as '{path}'"):
        pretraining_parts(cfg)
    shutil.copy(path, tmp_path / "copy.json")
    parts = pretraining_parts(dataclasses.replace(cfg, tokenizer=str(tmp_path / "copy.json")))
    assert parts.tokenizer.encode("the cat sat") == tok.encode("the cat sat")
    path.rename(tmp_path / "moved.json")  # the header's tokenizer is gone: the run's key names where it is now
    parts = pretraining_parts(dataclasses.replace(cfg, tokenizer=str(tmp_path / "moved.json")))
    assert parts.tokenizer.encode("the cat sat") == tok.encode("the cat sat")
    path.write_text("{ damaged")  # there but unreadable: the run's key stands in for it too
    parts = pretraining_parts(dataclasses.replace(cfg, tokenizer=str(tmp_path / "moved.json")))
    assert parts.tokenizer.encode("the cat sat") == tok.encode("the cat sat")


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused(tmp_path, bpe_shards):
    """Shards whose ids all fit the model (max_id < model.vocab_size) passed, though the tokenizer has more tokens:
    the run trained and every checkpoint was refused by the engine afterwards (tokenizer vocab_size=300 is larger
    than the model's vocab_size)."""
    tok, path, ids, train = bpe_shards
    low = write_tokens(tmp_path / "low.bin", [i % 280 for i in ids], vocab_size=300, tokenizer=str(path))
    cfg = _config(tmp_path, [low])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=280))
    with pytest.raises(ConfigError, match=rf"^model.vocab_size=280 is smaller than the tokenizer's 300 tokens "
                                          rf"\({path}\): its ids 280..299 have no embedding, and no checkpoint "
                                          r"could be sampled with it; set model.vocab_size >= 300$"):
        pretraining_parts(cfg)
    assert pretraining_parts(dataclasses.replace(cfg, model=MODEL)).model.cfg.vocab_size == 300


def test_a_model_vocabulary_far_larger_than_the_tokenizers_is_warned_of(tmp_path, bpe_shards):
    """`lmforge train` on byte shards with the default 32,000-token model trained 31,743 rows that never see a
    token, silently; a padded vocabulary (a few rows past the tokenizer's) is not warned of."""
    tok, path, ids, train = bpe_shards
    cfg = _config(tmp_path, [train])
    big = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=2048))
    with pytest.warns(UserWarning, match=r"model.vocab_size=2048 is 7x the tokenizer's 300 tokens: rows 300..2047 of "
                                         r"the embedding and head never see a token .*set model.vocab_size = 300"):
        pretraining_parts(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pretraining_parts(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=320)))


def test_a_directory_or_glob_gives_its_shards_sorted_and_each_checked(tmp_path, bpe_shards):
    """data.train took files only (a directory was refused, a pattern was 'token file not found ... make one with
    lmforge tokenizer encode'), though the data source takes a list: a directory gives its *.bin files and a glob
    pattern its matches, sorted, each checked as a listed shard is (the same tokenizer). A directory holding the other
    split's shard (`lmforge tokenizer encode`'s train.bin + val.bin) is refused naming the file to give."""
    tok, path, ids, train = bpe_shards
    folder = train.parent
    shutil.copy(train, folder / "b.bin")
    (folder / "notes.txt").write_text("not a shard")
    want = [str(train.parent / "b.bin"), str(train)]
    for given in (folder, folder / "*.bin", tmp_path / "**" / "*.bin"):
        parts = pretraining_data(_config(tmp_path, [given]))
        assert [str(s.file.path) for s in parts.sampler.splits] == want
    (folder / "val.bin").symlink_to(train)
    with pytest.raises(DataError, match=rf"^data.train: {folder} holds val.bin, the other split's shard, beside its "
                                        rf"training shards: name them \({folder / 'b.bin'}, {train}\) or a pattern"):
        pretraining_data(_config(tmp_path, [folder]))
    with pytest.raises(DataError, match=rf"^data.val: {tmp_path / 'tok'} holds no \*.bin token shard; make them with "
                                        r"lmforge tokenizer encode or a data pipeline's tokenize stage$"):
        pretraining_data(_config(tmp_path, [train], [tmp_path / "tok"]))
    nothing = re.escape(str(tmp_path / "x*.bin"))
    with pytest.raises(DataError, match=rf"^data.train: {nothing} matches no file \(a token "
                                        r"shard file, a directory of \*.bin shards or a glob pattern is taken\)$"):
        pretraining_data(_config(tmp_path, [tmp_path / "x*.bin"]))
    (folder / "val.bin").unlink()  # (a pattern matching it is refused too)
    cfg = _config(tmp_path, [train])
    byte = make_shard(tmp_path / "byte" / "c.bin")  # a byte-level shard found by the pattern: refused as if listed
    data = DataConfig(seq_len=32, batch_size=8, sources=(SourceConfig(name="s", train=(str(tmp_path / "*/*.bin"),)),),
                      phases=(PhaseConfig(start=0.0, weights=(1.0,)),))
    with pytest.raises(DataError, match=rf"^{byte} was encoded by tokenizer 'byte' \(vocab 257\) but "):
        pretraining_data(dataclasses.replace(cfg, data=data))



def test_a_glob_matching_the_other_split_or_a_shard_in_both_splits_is_refused(tmp_path, bpe_shards):
    """data.train=["tok/*.bin"] took tok/val.bin, the other split's shard that a directory refuses, and trained on it,
    even with data.val=["tok/val.bin"]; a shard listed in both data.train and data.val was taken too (found
    2026-12-07): the validation loss measured memorised text."""
    tok, path, ids, train = bpe_shards
    folder = train.parent
    shutil.copy(train, folder / "val.bin")
    pattern = re.escape(str(folder / "*.bin"))
    for val in ((), (folder / "val.bin",)):
        with pytest.raises(DataError, match=rf"^data.train: {pattern} matches {folder / 'val.bin'}, the other "
                                            rf"split's shard; name the training shards or a pattern that leaves "
                                            r"val.bin out$"):
            pretraining_data(_config(tmp_path, [folder / "*.bin"], val))
    with pytest.raises(DataError, match=rf"^data.val: {re.escape(str(folder / 't*.bin'))} matches {train}, the "
                                        r"other split's shard; name the validation shards or a pattern"):
        pretraining_data(_config(tmp_path, [folder / "val.bin"], [folder / "t*.bin"]))
    shutil.copy(train, folder / "b.bin")
    spelt = tmp_path / "a" / ".." / "a" / "train.bin"  # the same file spelled another way
    for tr, val, said in (([train], [spelt], rf" \(as {re.escape(str(spelt))}\)"),
                          ([train, folder / "b.bin"], [folder / "val.bin", folder / "b*.bin"], "")):
        with pytest.raises(DataError, match=rf"^{tr[-1]} is in both data.train and data.val{said}: the validation "
                                            r"loss would measure text trained on; give it to one of them$"):
            pretraining_data(_config(tmp_path, tr, val))
    assert len(pretraining_data(_config(tmp_path, [train], [folder / "val.bin"])).sampler.splits) == 1

def test_an_sft_data_folder_names_the_jsonl_files_in_it(tmp_path):
    from lmforge.align.data import DataReport, read_jsonl

    with pytest.raises(DataError, match=rf"^{tmp_path} is a directory, not a JSONL data file, and holds no "):
        list(read_jsonl(tmp_path, DataReport(), "raise"))
    (tmp_path / "chat.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match=rf"^{tmp_path} is a directory, not a JSONL data file; give the file in "
                                        rf"it: {tmp_path / 'chat.jsonl'}$"):
        list(read_jsonl(tmp_path, DataReport(), "raise"))


def test_values_that_would_overflow_or_never_train_are_refused():
    assert LoopConfig(seed=2**32 - 1).seed == 2**32 - 1
    for seed in (2**32, 10**20, -1):
        with pytest.raises(ConfigError, match=rf"^seed must lie in \[0, 2\*\*32\), got {seed}$"):
            LoopConfig(seed=seed)
    for run_dir in ("", "  "):
        with pytest.raises(ConfigError, match=rf"^run_dir='{run_dir}' would write the run into the current folder"):
            LoopConfig(run_dir=run_dir)
    assert LoopConfig(run_dir=".").run_dir == "."
    for name in ("lr", "eps", "weight_decay", "grad_clip", "head_lr", "precond_eps", "clip_threshold"):
        for bad in (math.inf, math.nan):
            with pytest.raises(ConfigError, match=rf"^optim.{name} must be (a finite number|> 0|>= 0)"):
                OptimConfig(**{name: bad})
    with pytest.raises(ConfigError, match=r"^optim.lr must be a finite number, got inf$"):
        OptimConfig(lr=math.inf)
    with pytest.raises(ConfigError, match=r"^data.bytes_per_token must be a finite number >= 0, got inf$"):
        DataConfig(bytes_per_token=math.inf)


def test_windows_longer_than_the_models_context_are_said():
    """RoPE and NoPE models train on windows past model.max_seq_len without complaint, and the checkpoint then
    serves only max_seq_len tokens (`lmforge sample` cut a 128-token-trained model at 32): said, with the fix.
    Learned positions have no rows there and are refused."""
    import warnings

    model = ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    with pytest.warns(UserWarning, match=r"^data.seq_len=128 exceeds model.max_seq_len=32: the model trains on "
                                         r"128-token windows, but its checkpoints serve a 32-token context; set "
                                         r"model.max_seq_len >= 128$"):
        TrainConfig(model=model, data=DataConfig(seq_len=128))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(model=model, data=DataConfig(seq_len=32))
    with pytest.raises(ConfigError, match=r"^data.seq_len=128 exceeds model.max_seq_len=32$"):
        TrainConfig(model=dataclasses.replace(model, pos_emb="learned"), data=DataConfig(seq_len=128))


def test_a_listed_shard_too_short_for_a_window_is_said(tmp_path):
    """A shard shorter than one window was dropped from data.train in silence: the run trained on the others."""
    import warnings

    from lmforge.train.data import open_splits

    long, short = make_shard(tmp_path / "long.bin"), write_tokens(tmp_path / "short.bin", [1] * 20, vocab_size=257,
                                                                  tokenizer="byte")
    with pytest.warns(UserWarning, match=rf"^data.train: 1 shard\(s\) hold fewer training tokens than one window "
                                         rf"\(seq_len\+1=33\) and are not trained on: {short} \(20\)$"):
        train, _ = open_splits((str(long), str(short)), (str(make_shard(tmp_path / "val.bin")),), 0.0, 32, 257)
    assert [s.file.path for s in train] == [long]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_splits((str(long),), (), 0.1, 32, 257)


def test_bad_mixture_entries_name_their_own_fields():
    a, b = SourceConfig(name="a", train=("x.bin",)), SourceConfig(name="b", train=("y.bin",))
    for weights in ((math.inf, 1.0), (1e308, 1e308)):  # the second: a sum that overflows
        with pytest.raises(ConfigError, match=r"data.phases\[0\].weights must be 2 non-negative finite numbers"):
            DataConfig(sources=(a, b), phases=(PhaseConfig(start=0.0, weights=weights),))
    phases = (PhaseConfig(start=0.0, weights=(1.0, 1.0)),)
    with pytest.raises(ConfigError, match=r'^data.sources\[1\] has no name: add name = "..." to \[\[data.sources\]\] '
                                          r"entry 2$"):
        DataConfig(sources=(a, SourceConfig(train=("y.bin",))), phases=phases)
    with pytest.raises(ConfigError, match=r"^data.sources\[1\] \('b'\) has no training shards: add train = "):
        DataConfig(sources=(a, SourceConfig(name="b")), phases=phases)


def test_a_sequential_position_over_other_shards_is_refused_on_resume(tmp_path):
    """A sequential sampler's saved position (split 1 of 2, an offset into it) resumed over one shard read past
    the list: an IndexError mid-run. Now one line naming data.train and the fix; the same shards resume."""
    from lmforge.data.shards import TokenFile
    from lmforge.train.data import BatchSampler, Split

    shards = [TokenFile(make_shard(tmp_path / f"s{i}.bin", synthetic_text(200, seed=i))) for i in (1, 2)]
    splits = [Split(f, 0, len(f)) for f in shards]
    a = BatchSampler(splits, 4, 32, "sequential", 0)
    while a.shard == 0:
        a.next_batch()
    state = a.state_dict()
    again = BatchSampler(splits, 4, 32, "sequential", 0)
    again.load_state_dict(state)
    assert again.next_batch()["input_ids"].equal(a.next_batch()["input_ids"])
    with pytest.raises(DataError, match=r"^data.train changed since the checkpoint: its sequential position \(split "
                       r"1 of 2 training splits, token \d+\) does not apply to the 1 split\(s\) given now; resume "
                       r"with the same data.train, or set data.sampling = 'random'$"):
        BatchSampler(splits[:1], 4, 32, "sequential", 0).load_state_dict(state)
    BatchSampler(splits[:1], 4, 32, "random", 0).load_state_dict(state)  # a random draw resumes anywhere
    old = {k: v for k, v in state.items() if k != "sizes"}  # a state saved before the sizes: checked for range
    with pytest.raises(DataError, match="split 1 of its training splits"):
        BatchSampler(splits[:1], 4, 32, "sequential", 0).load_state_dict(old)


def test_demo_flags_name_themselves():
    """`lmforge demo --seq-len 0` said 'model.max_seq_len must be > 0' (a key the demo has no flag for), --lr -1 and
    --batch-size 0 the keys of TrainConfig: each now names its own flag."""
    from lmforge.demo import DemoConfig

    for flag, field, bad in (("--seq-len", "seq_len", 0), ("--batch-size", "batch_size", -2), ("--lr", "lr", -1.0),
                             ("--lr", "lr", math.nan)):
        with pytest.raises(ConfigError, match=rf"^{flag} must be a positive number, got {bad}$"):
            DemoConfig(**{field: bad})


def _corrupt(path, at: int, token_id: int):
    """Write `token_id` over token `at` of a shard, its header (max_id) left as it was."""
    import numpy as np

    from lmforge.data.shards import TokenFile

    f = TokenFile(path)
    with open(path, "r+b") as out:
        out.seek(f.offset + at * f.dtype.itemsize)
        out.write(np.array([token_id], dtype=f.dtype).tobytes())
    return path


def test_a_token_id_past_the_vocabulary_is_one_line_naming_shard_id_and_vocab(tmp_path, monkeypatch):
    """A shard holding an id its header's max_id hides (121 claimed, 300 held) passed check_vocab, which trusts the
    header, and trained until a window held it: an IndexError in the embedding or LMEvaluator._bytes. A small shard
    is scanned at open (one vectorised max); past that size each window is checked as it is read."""
    import numpy as np

    from lmforge.data import shards
    from lmforge.train.data import BatchSampler, eval_windows, open_splits

    bad = _corrupt(make_shard(tmp_path / "bad.bin"), 5000, 300)
    line = (rf"^{bad}: token 5000 is id 300, outside the vocabulary \(vocab_size 257: the model's and the shard's\); "
            r"its header's max_id 121 is wrong: the shard is corrupt; re-create it \(lmforge tokenizer encode\)$")
    with pytest.raises(DataError, match=line):
        pretraining_parts(tiny_config(bad, tmp_path / "run"))
    monkeypatch.setattr(shards, "SCAN_AT_OPEN", 0)  # a large shard: its windows are checked instead
    train, val = open_splits((str(bad),), (), 0.0, 32, 257)
    sampler = BatchSampler(train, 4, 32, "sequential", 0)
    for _ in range(5000 // (4 * 32)):
        assert int(sampler.next()[0].max()) <= 256
    with pytest.raises(DataError, match=line):
        sampler.next()
    with pytest.raises(DataError, match=line):
        eval_windows(train, 100, 4, 32)
    big = _corrupt(make_shard(tmp_path / "big.bin"), 10, 257)
    train, _ = open_splits((str(big),), (), 0.0, 32, 300)  # a model vocab over the shard's: the shard's 257 bounds
    with pytest.raises(DataError, match=r"token 10 is id 257, outside the vocabulary \(vocab_size 257: the shard's; "
                                        r"the model's is 300\)"):
        BatchSampler(train, 1, 32, "sequential", 0).next()
    assert np.array_equal(train[0].window(11, 5), np.frombuffer(synthetic_text().encode(), np.uint8)[11:16])


def test_an_empty_shard_path_is_refused_by_name():
    """`--data.val ''` (meant: no validation shards) was read as '.', and the run failed on "data.val: . holds no
    *.bin token shard", naming a folder the user never gave."""
    with pytest.raises(ConfigError, match=r"^data.val holds an empty path, \[''\]: give token shard files, directories "
                                          r"or glob patterns, or none to hold out the last data.val_fraction of "
                                          r"data.train \(--data.val with no value on a command line\)$"):
        DataConfig(train=("a.bin",), val="")
    with pytest.raises(ConfigError, match=r"^data.train holds an empty path, \['a.bin', ' '\]: give token shard"):
        DataConfig(train=("a.bin", " "))
    with pytest.raises(ConfigError, match=r"^data.sources \('web'\).val holds an empty path, \[''\]: give token "
                                          r"shard files, directories or glob patterns, or none to hold out the last "
                                          r"data.val_fraction of data.sources \('web'\).train$"):
        SourceConfig(name="web", train=("a.bin",), val=("",))
    assert DataConfig(train=("a.bin",)).val == ()


def test_a_shard_listed_twice_is_refused(tmp_path, bpe_shards):
    """["shards", "shards/*.bin"] listed every shard twice, which sampled each twice as often, in silence."""
    from lmforge.train.data import shard_paths

    _, _, _, train = bpe_shards
    with pytest.raises(DataError, match=rf"^data.train: {re.escape(str(train))} is listed twice: a shard is read once"):
        shard_paths((str(train.parent), str(train.parent / "*.bin")), "data.train")
    other = train.parent / ".." / "a" / "train.bin"
    with pytest.raises(DataError, match=rf"^data.train: {re.escape(str(other))} is listed twice \(also as "
                                        rf"{re.escape(str(train))}\)"):
        shard_paths((str(train), str(other)), "data.train")
    assert shard_paths((str(train.parent),), "data.train") == [train]


def test_a_symlink_loop_given_as_a_shard_is_one_line(tmp_path):
    from lmforge.train.data import shard_paths

    loop = tmp_path / "loop.bin"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match=rf"^data.train: {re.escape(str(loop))} cannot be followed \("):
        shard_paths((str(loop),), "data.train")


def test_shards_are_scanned_at_open_up_to_scan_at_open_tokens_in_all(tmp_path, bpe_shards, monkeypatch):
    """The whole-shard scan at open counts across the run's shards (many small shards were each read whole at every
    start); the rest are checked per window read."""
    from lmforge.train import data as train_data

    _, path, ids, train = bpe_shards
    other = write_tokens(tmp_path / "b" / "more.bin", ids, vocab_size=300, tokenizer=str(path))
    monkeypatch.setattr(train_data, "SCAN_AT_OPEN", len(ids) + 1)
    parts, _ = train_data.open_splits((str(train), str(other)), (), 0.1, 16, 300)
    assert [s.file.scanned for s in parts] == [True, False]

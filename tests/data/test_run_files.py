"""A pipeline run fixes the files its stages read (a tokenizer, a model, decontam's eval files) at its start: they are
kept in pipeline.json, a change while it runs fails the run before the shard in hand is marked done, and a resume
after they changed is refused, so one run's shards never mix two tokenizers or two eval sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import lmforge.data.executor as executor
from lmforge.data.executor import run_local
from lmforge.data.pipeline import load_pipeline
from lmforge.data.shards import TokenFile
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer.bpe import Tokenizer

TEXT = "the cat sat on the mat"


def _save(tok: Tokenizer, spec: Path, later_s: int = 0) -> None:
    tok.save(spec)
    t = os.stat(spec).st_mtime_ns + later_s * 10**9  # (a coarse clock gives two saves one time otherwise)
    os.utime(spec, ns=(t, t))


def _bytes_tok() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


def _merged_tok() -> Tokenizer:
    from lmforge.tokenizer.train import train_bpe

    return train_bpe(iter([TEXT * 50]), 270, ["<|endoftext|>"], progress=False, workers=1)


def _pipeline(tmp_path: Path, stages: str) -> Path:
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"{i}.jsonl").write_text(json.dumps({"id": str(i), "text": TEXT}) + "\n")
    p = tmp_path / "pipeline.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{tmp_path / "run"}"\n'
                 f"{stages}")
    return p


def _tokenize_pipeline(tmp_path: Path) -> tuple[Path, Path]:
    spec = tmp_path / "tok" / "lmforge_tokenizer.json"
    _save(_bytes_tok(), spec)
    return _pipeline(tmp_path, f'[[stages]]\nstage = "tokenize"\ntokenizer = "{spec}"\n'), spec


def _ids(tmp_path: Path, i: int) -> list[int]:
    return np.asarray(TokenFile(tmp_path / "run" / "tokens" / f"shard-{i:05d}.bin").tokens).tolist()


def test_a_tokenizer_rewritten_mid_run_fails_the_run_before_a_shard_is_made_with_it(tmp_path, monkeypatch):
    """The tokenize stage's cache follows its files, so a tokenizer saved again while a run went on was read for the
    later shards: one run's token shards held two tokenizers' ids, each header naming the one spec."""
    p, spec = _tokenize_pipeline(tmp_path)
    real = executor._finish_shard

    def finish_then_retrain(*args):
        out = real(*args)
        _save(_merged_tok(), spec, later_s=5)
        return out

    monkeypatch.setattr(executor, "_finish_shard", finish_then_retrain)
    with pytest.raises(DataError, match=r"the files stage 'tokenize' reads changed during the run .*"
                                        r"lmforge_tokenizer\.json.*its shards so far used the old ones: put them "
                                        r"back and rerun to resume, or rerun with --restart"):
        run_local(load_pipeline(p))
    assert len(_ids(tmp_path, 0)) == 1 + len(TEXT)  # the first shard, made with the first tokenizer
    assert not (tmp_path / "run" / "tokens" / "shard-00001.bin").exists()
    assert not (tmp_path / "run" / "_work" / "p0" / "shard-00001.done.json").exists()


def test_a_tokenizer_rewritten_before_any_shard_reached_the_tokenize_stage_says_a_rerun_takes_it(tmp_path,
                                                                                                monkeypatch):
    """Rewritten while the first phase ran, before any shard reached the tokenize phase: the run fails, but its
    message said the shards so far used the old tokenizer and to put it back to resume, where a plain rerun takes
    the new one (no shard is refused, `_check_files_used`)."""
    spec = tmp_path / "tok" / "lmforge_tokenizer.json"
    _save(_bytes_tok(), spec)
    p = _pipeline(tmp_path, f'[[stages]]\nstage = "pii"\n[[stages]]\nstage = "exact_dedup"\n'
                            f'[[stages]]\nstage = "tokenize"\ntokenizer = "{spec}"\n')
    (tmp_path / "in" / "1.jsonl").write_text(json.dumps({"id": "1", "text": TEXT + " again"}) + "\n")
    new = _merged_tok()
    real = executor._finish_shard

    def finish_then_retrain(*args):
        out = real(*args)
        _save(new, spec, later_s=5)
        return out

    with monkeypatch.context() as m:
        m.setattr(executor, "_finish_shard", finish_then_retrain)
        with pytest.raises(DataError, match=r"the files stage 'tokenize' reads changed during the run .*"
                                            r"no shard has gone through that stage yet: rerun to take the new ones$"):
            run_local(load_pipeline(p))
    assert (tmp_path / "run" / "_work" / "p0" / "shard-00000.done.json").exists()
    run_local(load_pipeline(p))
    assert _ids(tmp_path, 0) == [new.eot_id, *new.encode_ordinary(TEXT)]
    assert _ids(tmp_path, 1) == [new.eot_id, *new.encode_ordinary(TEXT + " again")]


def test_a_resume_after_the_tokenizer_changed_is_refused_and_restart_uses_the_new_one(tmp_path):
    p, spec = _tokenize_pipeline(tmp_path)
    run_local(load_pipeline(p))
    saved = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [f[0] for f in saved["stage_files"]["tokenize"]] == [str(spec.resolve())]
    (tmp_path / "run" / "_work" / "p0" / "shard-00001.done.json").unlink()  # (a run killed before shard 1 was done)
    new = _merged_tok()
    _save(new, spec, later_s=5)
    with pytest.raises(ConfigError, match=r"the files stage 'tokenize' reads changed since the run .* was made: "
                                          r"1 changed size or content \(lmforge_tokenizer\.json\).*--restart"):
        run_local(load_pipeline(p))
    assert len(_ids(tmp_path, 0)) == 1 + len(TEXT)  # nothing was rewritten
    run_local(load_pipeline(p), restart=True)
    assert _ids(tmp_path, 0) == _ids(tmp_path, 1) == [new.eot_id, *new.encode_ordinary(TEXT)]


def test_a_resume_takes_a_changed_tokenizer_when_no_shard_reached_the_tokenize_stage(tmp_path, monkeypatch):
    """Only the shards a stage has done used its old files: a run killed before its tokenize phase resumes with the
    tokenizer as it is now, every token shard made with it."""
    spec = tmp_path / "tok" / "lmforge_tokenizer.json"
    _save(_bytes_tok(), spec)
    stages = f'[[stages]]\nstage = "exact_dedup"\n[[stages]]\nstage = "tokenize"\ntokenizer = "{spec}"\n'
    p = _pipeline(tmp_path, stages)
    (tmp_path / "in" / "1.jsonl").write_text(json.dumps({"id": "1", "text": TEXT + " again"}) + "\n")
    with monkeypatch.context() as m:
        m.setattr(executor, "run_map_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):  # (killed after the dedup phase, before any shard was tokenized)
            run_local(load_pipeline(p))
    assert (tmp_path / "run" / "_work" / "p0" / "shard-00001.done.json").exists()
    new = _merged_tok()
    _save(new, spec, later_s=5)
    run_local(load_pipeline(p))
    assert _ids(tmp_path, 0) == [new.eot_id, *new.encode_ordinary(TEXT)]
    assert _ids(tmp_path, 1) == [new.eot_id, *new.encode_ordinary(TEXT + " again")]
    saved = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert saved["stage_files"]["tokenize"][0][1] == spec.stat().st_size  # the files as this run found them


def test_decontam_keeps_one_eval_set_for_a_run_and_records_its_files(tmp_path, monkeypatch):
    """Decontam listed its eval folders for every batch: an eval file added while a run went on matched only the later
    shards. The run records the files it used, and one added mid-run fails it."""
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "a.jsonl").write_text(json.dumps({"q": "nothing like the documents here at all"}) + "\n")
    p = _pipeline(tmp_path, f'[[stages]]\nstage = "decontam"\neval_paths = ["{evals}"]\nngram = 4\n')
    real = executor._finish_shard

    def finish_then_add(*args):
        out = real(*args)
        (evals / "b.jsonl").write_text(json.dumps({"q": TEXT}) + "\n")
        return out

    monkeypatch.setattr(executor, "_finish_shard", finish_then_add)
    with pytest.raises(DataError, match=r"stage 'decontam' reads changed during the run .*1 new \(b\.jsonl\)"):
        run_local(load_pipeline(p))
    saved = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [f[0] for f in saved["stage_files"]["decontam"]] == [str((evals / "a.jsonl").resolve())]
    assert not (tmp_path / "run" / "_work" / "p0" / "shard-00001.done.json").exists()


def test_the_files_a_run_fixes_are_those_its_stages_read(tmp_path):
    """stage_files names each reading stage's files (two stages of one name told apart by place); stages that read
    no file are absent."""
    from lmforge.data.pipeline import InputConfig, OutputConfig, PipelineConfig, stage_files

    bad = tmp_path / "bad.txt"
    bad.write_text("x\n")
    model = Path(__file__).parent / "fasttext" / "softmax.bin"
    cfg = PipelineConfig(input=InputConfig(paths=("in",)), output=OutputConfig(dir=str(tmp_path / "run")), stages=(
        {"stage": "c4", "bad_words_file": str(bad)}, {"stage": "gopher"},
        {"stage": "toxicity", "model": str(model), "label": "a"}, {"stage": "toxicity", "model": str(model)},
        {"stage": "langid"}))
    got = {label: [f[0] for f in files] for label, files in stage_files(cfg).items()}
    assert got == {"c4": [str(bad.resolve())], "toxicity[2]": [str(model.resolve())],
                   "toxicity[3]": [str(model.resolve())], "langid": []}


def _touch(path: Path, later_s: int = 5) -> None:
    t = path.stat().st_mtime_ns + later_s * 10**9
    os.utime(path, ns=(t, t))


def test_a_file_touched_but_not_changed_lets_a_run_resume_and_go_on(tmp_path, monkeypatch):
    """The stamps were size + mtime, so a bare `touch` of the tokenizer (or a copy that kept its bytes) refused the
    resume and failed a running run. A stamp whose time moved but whose size did not is compared by a content digest
    recorded beside it (utils.content_digest, read once per file while its stamps stay); a same-size edit is still
    refused."""
    p, spec = _tokenize_pipeline(tmp_path)
    real = executor._finish_shard

    def finish_then_touch(*args):
        out = real(*args)
        _touch(spec)
        return out

    with monkeypatch.context() as m:
        m.setattr(executor, "_finish_shard", finish_then_touch)
        run_local(load_pipeline(p))  # touched after each shard: the run goes on
    (tmp_path / "run" / "_work" / "p0" / "shard-00001.done.json").unlink()
    _touch(spec)
    run_local(load_pipeline(p))
    assert _ids(tmp_path, 0) == _ids(tmp_path, 1) == [256, *TEXT.encode()]
    (recorded,) = json.loads((tmp_path / "run" / "pipeline.json").read_text())["stage_files"]["tokenize"]
    assert recorded[:3] == [str(spec.resolve()), spec.stat().st_size, spec.stat().st_mtime_ns]

    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "a.jsonl").write_text(json.dumps({"q": "nothing like the documents here at all"}) + "\n")
    (tmp_path / "d").mkdir()
    p = _pipeline(tmp_path / "d", f'[[stages]]\nstage = "decontam"\neval_paths = ["{evals}"]\nngram = 4\n')
    run_local(load_pipeline(p))
    marker = tmp_path / "d" / "run" / "_work" / "p0" / "shard-00001.done.json"
    marker.unlink()
    _touch(evals / "a.jsonl")
    run_local(load_pipeline(p))
    marker.unlink()
    (evals / "a.jsonl").write_text(json.dumps({"q": "nothing LIKE the documents here at all"}) + "\n")
    _touch(evals / "a.jsonl")
    with pytest.raises(ConfigError, match=r"the files stage 'decontam' reads changed since the run .* was made: "
                                          r"1 changed size or content \(a\.jsonl\)"):
        run_local(load_pipeline(p))


def test_a_stage_files_digest_is_read_once_not_at_every_start_or_resume(tmp_path, monkeypatch):
    """Every pipeline start or resume, and every Ray worker process, read each stage file whole for its content
    digest (found 2026-12-07: seconds to minutes for a multi-GB classifier or KenLM model where a stat used to do).
    The digest is remembered on disk under the file's path, size, mtime and inode (utils.remembered_sha256, as a
    HF base's weights are), and a resume takes the one its pipeline.json recorded where path, size and mtime match."""
    import hashlib

    from lmforge.data.pipeline import stage_files
    from lmforge.utils import HASH_CACHE_ENV, content_digest

    p, spec = _tokenize_pipeline(tmp_path)
    cfg = load_pipeline(p)
    reads, real = [], hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, d: reads.append(Path(f.name).name) or real(f, d))
    monkeypatch.setenv(HASH_CACHE_ENV, str(tmp_path / "cache"))
    content_digest.cache_clear()
    first = stage_files(cfg, digests=True)
    assert reads == [spec.name] and first["tokenize"][0][3] == real(open(spec, "rb"), "sha256").hexdigest()
    content_digest.cache_clear()  # a new process: a resume, a Ray worker
    assert stage_files(cfg, digests=True) == first and reads == [spec.name]
    run_local(cfg)
    assert reads == [spec.name]
    for cache in ("wiped", "wiped-again"):  # no digest remembered on this machine: the recorded one is taken
        monkeypatch.setenv(HASH_CACHE_ENV, str(tmp_path / cache))
        content_digest.cache_clear()
        run_local(cfg)
        assert reads == [spec.name]
    _touch(spec)  # a new mtime: read again, the same bytes
    content_digest.cache_clear()
    run_local(cfg)
    assert reads == [spec.name] * 2


def test_a_digest_without_a_home_directory_is_read_not_remembered(tmp_path, monkeypatch):
    """No HOME and a uid without a passwd entry (a container run with --user): Path.home() raises RuntimeError,
    which the remembered-digest cache let out of every pipeline start; the digest is read instead."""
    import hashlib
    from pathlib import Path

    from lmforge import utils

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("LMFORGE_HASH_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights" * 100)
    assert utils.remembered_sha256(f) == hashlib.sha256(b"weights" * 100).hexdigest()


def test_a_run_record_of_another_json_shape_is_the_corrupt_record_line(tmp_path):
    from lmforge.data.executor import read_run_json
    from lmforge.errors import ConfigError

    record = tmp_path / "pipeline.json"
    record.write_text("null")
    with pytest.raises(ConfigError, match=r"pipeline.json, one of the run's own records, is corrupt \(a JSON NoneType"):
        read_run_json(record)

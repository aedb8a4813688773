"""--restart and a tokenize out_dir outside output.dir (beside other corpora's shards): the earlier run's token shards
there go, wherever they are and however the run ended, and nothing else there does (the Ray executor's case is in
test_ray.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmforge.data.executor as executor
import lmforge.data.tokenize as tokenize_mod
from lmforge.data.executor import run_local
from lmforge.data.pipeline import load_pipeline
from lmforge.data.shards import TokenFile
from lmforge.data.tokenize import OWNER
from lmforge.errors import ConfigError
from lmforge.utils import temp_name

OTHERS = {"other-corpus.bin": b"theirs", "shard-00009.bin": b"another run's shard, named like ours"}


def _setup(tmp_path: Path, n_inputs: int = 3) -> tuple[Path, Path]:
    """n one-document inputs, a pipeline tokenizing them into ../tokens, which holds another corpus's files."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(n_inputs):
        (inputs / f"{i}.jsonl").write_text(json.dumps({"id": f"d{i}", "text": f"document number {i}"}) + "\n")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for name, data in OTHERS.items():
        (tokens / name).write_bytes(data)
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{inputs}"]\n[output]\ndir = "{tmp_path / "run"}"\n'
                 'plot = false\n[[stages]]\nstage = "tokenize"\nout_dir = "../tokens"\n')
    return p, tokens


def _theirs_untouched(tokens: Path) -> bool:
    return all((tokens / name).read_bytes() == data for name, data in OTHERS.items())


def test_restart_with_fewer_inputs_removes_the_earlier_runs_token_shards_outside_output_dir(tmp_path):
    """A run over 3 inputs, then --restart over 2: the third input's shard stayed in the token directory (found
    2026-12-05: --restart left a directory outside output.dir alone, and only same-named shards were replaced), so
    training on its *.bin read a document the corpus no longer had."""
    p, tokens = _setup(tmp_path)
    run_local(load_pipeline(p))
    assert sorted(f.name for f in tokens.iterdir()) == sorted([*OTHERS, OWNER, "shard-00000.bin", "shard-00001.bin",
                                                               "shard-00002.bin"])
    (tmp_path / "in" / "2.jsonl").unlink()
    report = run_local(load_pipeline(p), restart=True)
    assert sorted(f.name for f in tokens.iterdir()) == sorted([*OTHERS, OWNER, "shard-00000.bin", "shard-00001.bin"])
    assert _theirs_untouched(tokens)
    mine = sum(len(TokenFile(tokens / f"shard-0000{i}.bin")) for i in range(2))
    assert mine == report["counters"]["tokenize.tokens"] > 0


def test_restart_removes_the_shard_a_killed_run_was_writing(tmp_path, monkeypatch):
    """A run killed (kill -9: no cleanup) while its third token shard was being written left that shard's
    temporary in the token directory; --restart over 2 inputs removes it, as the shard was recorded before its
    writer started."""
    p, tokens = _setup(tmp_path)
    real = tokenize_mod.TokenShardWriter

    def killed_at_third(path, **kwargs):
        if Path(path).name == "shard-00002.bin":
            temp_name(Path(path)).write_bytes(b"half a shard")
            raise SystemExit("killed")
        return real(path, **kwargs)

    monkeypatch.setattr(tokenize_mod, "TokenShardWriter", killed_at_third)
    with pytest.raises(SystemExit):
        run_local(load_pipeline(p))
    monkeypatch.undo()
    assert any(f.name.startswith(".shard-00002.bin.") for f in tokens.iterdir())
    (tmp_path / "in" / "2.jsonl").unlink()
    run_local(load_pipeline(p), restart=True)
    assert sorted(f.name for f in tokens.iterdir()) == sorted([*OTHERS, OWNER, "shard-00000.bin", "shard-00001.bin"])
    assert _theirs_untouched(tokens)


def test_a_token_shard_record_naming_another_file_is_refused(tmp_path):
    """--restart removes what the records name: one edited to name a file other than its own shard is refused
    rather than followed."""
    p, tokens = _setup(tmp_path, n_inputs=1)
    run_local(load_pipeline(p))
    record = tmp_path / "run" / "_token_files" / "shard-00000.bin.json"
    record.write_text(json.dumps({"out_dir": "../tokens", "file": "other-corpus.bin"}))
    with pytest.raises(ConfigError, match="names 'other-corpus.bin', not the token shard it is named after"):
        run_local(load_pipeline(p), restart=True)
    assert _theirs_untouched(tokens)


def _second_run(tmp_path: Path, out_dir: str) -> Path:
    """Another run, over another corpus of 2 inputs (output.dir run2), tokenizing into `out_dir`."""
    inputs = tmp_path / "in2"
    if not inputs.is_dir():
        inputs.mkdir()
        for i in range(2):
            (inputs / f"{i}.jsonl").write_text(json.dumps({"id": f"e{i}", "text": f"another corpus, {i}"}) + "\n")
    p = tmp_path / "p2.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{inputs}"]\n[output]\ndir = "{tmp_path / "run2"}"\n'
                 f'plot = false\n[[stages]]\nstage = "tokenize"\nout_dir = "{out_dir}"\n')
    return p


def test_a_second_run_into_another_runs_token_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    """Two runs (two output dirs) tokenizing into one token directory outside both name their shards alike
    (shard-00000.bin, ...): the second overwrote the first's silently, its --restart removed them (it records the
    same names), and training on the directory read a mix (found 2026-12-05). The directory names the output.dir
    that writes there (OWNER); another run is refused in one line before it writes or removes anything, and the
    first run's own resume and --restart still work."""
    p, tokens = _setup(tmp_path, n_inputs=2)
    run_local(load_pipeline(p))
    first = {f.name: f.read_bytes() for f in tokens.iterdir()}
    marker = tokens / OWNER
    for out_dir in ("../tokens", str(tokens)):
        for restart in (False, True):
            with pytest.raises(ConfigError) as e:
                run_local(load_pipeline(_second_run(tmp_path, out_dir)), restart=restart)
            assert str(e.value) == (
                f"tokenize.out_dir {out_dir!r} ('{tokens}') holds the token shards of another run, output.dir "
                f"'{tmp_path / 'run'}' ({marker}): this run (output.dir '{tmp_path / 'run2'}') would overwrite them "
                f"and its --restart would remove them; set tokenize.out_dir to another directory, or remove that "
                f"run's shards and {marker} if they are no longer wanted")
            assert {f.name: f.read_bytes() for f in tokens.iterdir()} == first
            assert not (tmp_path / "run2").exists()
    with monkeypatch.context() as m:  # claimed after the check (runs started together): the stage refuses to write
        m.setattr(executor, "check_token_dirs", lambda cfg: None)
        with pytest.raises(ConfigError, match="holds the token shards of another run"):
            run_local(load_pipeline(_second_run(tmp_path, "../tokens")))
    assert {f.name: f.read_bytes() for f in tokens.iterdir()} == first
    assert not (tmp_path / "run2" / "_token_files").exists()
    assert run_local(load_pipeline(p))["shards"]["skipped"] == 2  # the owner resumes
    run_local(load_pipeline(p), restart=True)  # and restarts
    assert {f.name: f.read_bytes() for f in tokens.iterdir()} == first

    for name in ("shard-00000.bin", "shard-00001.bin", OWNER):  # the fix the error names: the other run's go
        (tokens / name).unlink()
    run_local(load_pipeline(_second_run(tmp_path, "../tokens")))
    assert json.loads(marker.read_text()) == {"output_dir": str(tmp_path / "run2")}
    with pytest.raises(ConfigError, match="holds the token shards of another run"):  # and now the first is refused
        run_local(load_pipeline(p))


def test_a_run_into_a_token_directory_inside_another_runs_output_dir_is_refused(tmp_path):
    """A token directory inside output.dir is the run's (--restart removes it whole): another run pointed at it
    (an absolute out_dir) is refused as well, and the directory's own run restarts as before."""
    p, _ = _setup(tmp_path, n_inputs=1)
    p.write_text(p.read_text().replace('out_dir = "../tokens"', 'out_dir = "tokens"'))
    run_local(load_pipeline(p))
    inside = tmp_path / "run" / "tokens"
    with pytest.raises(ConfigError, match=f"output.dir '{tmp_path / 'run'}'"):
        run_local(load_pipeline(_second_run(tmp_path, str(inside))))
    assert sorted(f.name for f in inside.iterdir()) == [OWNER, "shard-00000.bin"]
    run_local(load_pipeline(p), restart=True)
    assert sorted(f.name for f in inside.iterdir()) == [OWNER, "shard-00000.bin"]


def test_a_moved_run_stays_the_owner_of_the_token_directory_inside_it(tmp_path):
    """A token directory inside output.dir names its owner relative to itself: the run moved or renamed (and
    output.dir set to the new place) resumes, skipping its done shards; it was refused as another run."""
    import shutil

    p, _ = _setup(tmp_path, n_inputs=2)
    p.write_text(p.read_text().replace('out_dir = "../tokens"', 'out_dir = "tokens"'))
    run_local(load_pipeline(p))
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    p.write_text(p.read_text().replace(f'dir = "{tmp_path / "run"}"', f'dir = "{tmp_path / "moved"}"'))
    assert run_local(load_pipeline(p))["shards"] == {"total": 2, "processed": 0, "skipped": 2}


def test_a_damaged_token_shard_record_is_one_line_naming_what_to_remove(tmp_path):
    """A token shard record (output.dir/_token_files/NAME.bin.json) that is no JSON was a JSONDecodeError traceback
    on --restart (which removes the shards the records list) and at the run's summary line."""
    import pytest

    from lmforge.data.tokenize import RECORDS, recorded_token_files
    from lmforge.errors import ConfigError

    (tmp_path / RECORDS).mkdir()
    (tmp_path / RECORDS / "shard-00000.bin.json").write_text('{"file": "shard-00000.b')
    with pytest.raises(ConfigError, match=r"^token shard record .*shard-00000.bin.json is corrupt \(.*\); remove it by "
                                          r"hand, with the token shard shard-00000.bin it is named after if the run "
                                          r"wrote one$"):
        recorded_token_files(tmp_path)

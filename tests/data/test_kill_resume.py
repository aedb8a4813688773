"""A run killed at chosen points (in-process: a write or removal raises KeyboardInterrupt there), then rerun: the
rerun refuses what it cannot trust, and otherwise ends with exactly a fresh run's files and no leftovers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge.data.executor import run_local
from lmforge.data.pipeline import load_pipeline
from lmforge.data.tokenize import OWNER
from lmforge.errors import ConfigError

TEXT = "The river flooded the valley after three days of heavy rain in the hills near the old town"
# phases: p0 map (pii), p1 global (exact_dedup), p2 map (pii, tokenize): two phases of intermediate files
STAGES = ('[[stages]]\nstage = "pii"\n[[stages]]\nstage = "exact_dedup"\n[[stages]]\nstage = "pii"\n'
          '[[stages]]\nstage = "tokenize"\n')


def _inputs(d: Path) -> Path:
    d.mkdir()
    for name in ("a", "b", "c"):
        rows = [{"id": f"{name}{i}", "text": f"{TEXT} {name} {i}"} for i in range(3)]
        rows.append({"id": f"{name}-dup", "text": TEXT})  # one copy kept by exact_dedup, two rejected
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _pipeline(tmp_path: Path, inputs: Path, out: str = "run", output: str = "") -> Path:
    p = tmp_path / f"{out}.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{inputs}"]\n[output]\ndir = "{tmp_path / out}"\n{output}\n'
                 f"{STAGES}")
    return p


def _files(run: Path) -> dict[str, bytes | None]:
    """Every file of a run directory by relative path: the contents of the outputs, the names of the rest (the
    markers and reports hold timings, the token directory's OWNER its run's output.dir)."""
    return {str(f.relative_to(run)): f.read_bytes() if f.parts[len(run.parts)] in ("data", "rejected", "tokens")
            and f.name != OWNER else None for f in sorted(run.rglob("*")) if f.is_file()}


def _kill_when(monkeypatch, fn_owner, name: str, hit) -> None:
    """Make fn_owner.name raise KeyboardInterrupt (a Ctrl-C / kill at that point) the first time hit(*args) holds."""
    real = getattr(fn_owner, name)
    fired = []

    def fake(*args, **kwargs):
        if not fired and hit(*args):
            fired.append(args)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fn_owner, name, fake)


def _fresh(tmp_path: Path, inputs: Path) -> dict[str, bytes]:
    run_local(load_pipeline(_pipeline(tmp_path, inputs, out="fresh")))
    return _files(tmp_path / "fresh")


def test_killed_restart_keeps_pipeline_json_and_the_rerun_refuses_stale_markers(tmp_path, monkeypatch):
    """A --restart removed pipeline.json first: killed after that, the directory (markers and all) passed for a
    fresh one and the next plain run reused markers made from the old inputs, reporting them unchanged."""
    import lmforge.data.executor as ex

    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs)
    run_local(load_pipeline(p))
    with open(inputs / "a.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "text": f"{TEXT} new"}) + "\n")
    _kill_when(monkeypatch, ex.shutil, "rmtree", lambda path, *a: True)  # killed at the first directory removed
    with pytest.raises(KeyboardInterrupt):
        run_local(load_pipeline(p), restart=True)
    monkeypatch.undo()
    assert (tmp_path / "run" / "pipeline.json").is_file()
    with pytest.raises(ConfigError, match="inputs changed since the run .* --restart"):
        run_local(load_pipeline(p))
    report = run_local(load_pipeline(p), restart=True)
    assert report["balance"]["input_docs"] == 13 and report["shards"]["skipped"] == 0
    assert _files(tmp_path / "run") == _fresh(tmp_path, inputs)


def test_a_second_run_into_an_output_dir_in_use_is_refused_and_removes_nothing(tmp_path):
    """A pipeline started twice into one output.dir (a second terminal, a resume while the first still ran): each
    removed the phase files the other was reading, whose shards then read as `read_error:io`, and the kept documents
    of four shards were lost (an empty data file each; the report NOT BALANCED). The second run is refused in one
    line while the first holds output.dir, --restart too (it would remove the first run's files under it)."""
    import fcntl

    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs)
    run_local(load_pipeline(p))
    before = _files(tmp_path / "run")
    with open(tmp_path / "run" / ".lock", "a+") as held:  # what the first run's process holds while it runs
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)  # (the PID of the run before)
        held.write("4242\n")
        held.flush()
        for restart in (False, True):
            with pytest.raises(ConfigError, match=r"output.dir '.*run' is in use by another pipeline run \(PID 4242\); "
                                                  r"wait for it to end or stop it, or use another output.dir$"):
                run_local(load_pipeline(p), restart=restart)
        assert _files(tmp_path / "run") == before
    assert run_local(load_pipeline(p))["shards"] == {"total": 3, "processed": 0, "skipped": 9}
    assert run_local(load_pipeline(p), restart=True)["shards"]["processed"] == 9  # released by each run's end


def test_an_output_dir_in_use_is_refused_before_the_stages_checks_load_anything(tmp_path, monkeypatch):
    """The lock was taken after the stages' checks, so a second run with decontam loaded its eval sets (12-20 s)
    before it was refused; it is taken before them (when output.dir exists: one that does not is no run's, and a
    run refused by a check leaves no output.dir behind)."""
    import fcntl

    from lmforge.data import pipeline

    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs)
    (tmp_path / "run").mkdir()

    def loads(*args):
        raise AssertionError("a stage's check ran")

    monkeypatch.setattr(pipeline, "check_stages", loads)
    monkeypatch.setattr(pipeline, "check_requirements", loads)
    with open(tmp_path / "run" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(ConfigError, match=r"in use by another pipeline run \(PID 4242\)"):
            run_local(load_pipeline(p))
    with pytest.raises(AssertionError, match="a stage's check ran"):  # free: the checks run (then the lock is held)
        run_local(load_pipeline(p))


def test_markers_without_pipeline_json_are_refused_until_restart(tmp_path):
    """What an older lmforge's --restart, killed after removing pipeline.json, left: markers of other inputs."""
    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs)
    run_local(load_pipeline(p))
    (tmp_path / "run" / "pipeline.json").unlink()
    (inputs / "b.jsonl").write_text(json.dumps({"id": "b-new", "text": f"{TEXT} other"}) + "\n")
    with pytest.raises(ConfigError, match=r"earlier run's files \(.*_work.*\) but no pipeline.json.*--restart"):
        run_local(load_pipeline(p))
    report = run_local(load_pipeline(p), restart=True)
    assert report["shards"] == {"total": 3, "processed": 9, "skipped": 0}
    assert _files(tmp_path / "run") == _fresh(tmp_path, inputs)


def test_an_edited_output_table_is_another_pipeline_but_the_plot_is_not(tmp_path):
    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs, output="rejected_text = true")
    run_local(load_pipeline(p))
    p.write_text(p.read_text().replace("rejected_text = true", "rejected_text = false"))
    with pytest.raises(ConfigError, match="holds a run of a different pipeline"):  # rejected/ would mix the two
        run_local(load_pipeline(p))
    p.write_text(p.read_text().replace("rejected_text = false", "rejected_text = true\nplot = false"))
    assert run_local(load_pipeline(p))["shards"] == {"total": 3, "processed": 0, "skipped": 9}
    saved = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert saved["output"] == {"format": "jsonl", "rejected_text": True}


def test_resumed_run_removes_intermediate_files_of_phases_finished_before(tmp_path, monkeypatch):
    """Killed after phase 1 finished but before its input (_work/p0/*.jsonl) was removed: the resumed run skips
    phase 1 and must still remove those files."""
    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs)
    _kill_when(monkeypatch, Path, "unlink", lambda path, *a: path.parent.name == "p0" and path.suffix == ".jsonl")
    with pytest.raises(KeyboardInterrupt):
        run_local(load_pipeline(p))
    monkeypatch.undo()
    report = run_local(load_pipeline(p))
    assert report["shards"] == {"total": 3, "processed": 3, "skipped": 6}
    assert sorted(f.name for f in (tmp_path / "run" / "_work").rglob("*.jsonl")) == []
    assert _files(tmp_path / "run") == _fresh(tmp_path, inputs)


def test_rerun_removes_killed_writers_temporaries_and_nothing_else(tmp_path, monkeypatch):
    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs)
    run = tmp_path / "run"
    # killed as the second phase-0 marker was renamed into place: that writer removes its own temporary
    _kill_when(monkeypatch, os, "replace", lambda src, dst: str(dst).endswith("p0/shard-00001.done.json"))
    with pytest.raises(KeyboardInterrupt):
        run_local(load_pipeline(p))
    monkeypatch.undo()
    assert [f.name for f in run.rglob("*.tmp")] == []
    # what a SIGKILL leaves: temporaries no writer lived to remove (old mkstemp names, pid names, the new ones)
    b, c = "shard-00001", "shard-00002"
    stale = [run / "_work" / "p0" / f".{b}.jsonl.4242.tmp", run / "_work" / "p0" / f".{b}.done.json.k3x_9qa1.tmp",
             run / "rejected" / f".p2-{c}.jsonl.4242-0a1b2c3d.tmp", run / "data" / f".{c}.jsonl.4242.tmp",
             run / "tokens" / f".{c}.bin.4242.tmp", run / ".report.png.77-ffffffff.tmp"]
    others = [run / "data" / ".notes.jsonl.1.tmp", run / "_work" / "p0" / f".{b}.jsonl.tmp", run / "keep.tmp",
              run / "tokens" / f".{c}.bin.4242.tmp.bak", run / "data" / "README.4242.tmp"]
    for f in stale + others:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * 100)
    report = run_local(load_pipeline(p))
    assert report["shards"]["skipped"] == 1 and report["balance"]["balanced"]
    assert [f.exists() for f in stale] == [False] * len(stale)
    assert [f.exists() for f in others] == [True] * len(others)
    for f in others:
        f.unlink()
    assert _files(run) == _fresh(tmp_path, inputs)
    assert sorted(f.name for f in run.iterdir()) == [".lock", "_token_files", "_work", "data", "pipeline.json",
                                                     "rejected", "report.json", "report.md", "report.png", "tokens"]


def test_report_png_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    from lmforge.data.report import write_report

    report = {"stages": [{"name": "pii", "docs_in": 3, "docs_out": 2, "added": 0, "rejected": {"pii": 1},
                          "bytes_in": 30, "bytes_out": 20}], "counters": {},
              "balance": {"input_docs": 3, "added_docs": 0, "kept_docs": 2, "rejected_docs": 1, "balanced": True}}
    _kill_when(monkeypatch, os, "replace", lambda src, dst: Path(dst).name == "report.png")
    with pytest.raises(KeyboardInterrupt):
        write_report(report, tmp_path)
    monkeypatch.undo()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["report.json", "report.md"]
    paths = write_report(report, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG, though written to a .tmp name
    assert sorted(f.name for f in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]


def test_writers_remove_their_temporary_on_interrupt(tmp_path, monkeypatch):
    from lmforge.data.document import Document
    from lmforge.data.shards import TokenShardWriter
    from lmforge.data.writers import write_jsonl, write_parquet

    docs = [Document(id="a", text="hello")]
    _kill_when(monkeypatch, os, "replace", lambda src, dst: True)
    with pytest.raises(KeyboardInterrupt):
        write_jsonl(tmp_path / "a.jsonl", docs)
    _kill_when(monkeypatch, os, "replace", lambda src, dst: True)
    with pytest.raises(KeyboardInterrupt):
        write_parquet(tmp_path / "a.parquet", docs)
    _kill_when(monkeypatch, os, "replace", lambda src, dst: True)
    with pytest.raises(KeyboardInterrupt), TokenShardWriter(tmp_path / "a.bin", vocab_size=257, tokenizer="byte") as w:
        w.add_document([104, 105])
    assert sorted(os.listdir(tmp_path)) == []


def test_cli_progress_flag_overrides_the_file_only_when_given(tmp_path, monkeypatch):
    import lmforge.data.executor as ex
    from lmforge.cli import main

    inputs = _inputs(tmp_path / "in")
    p = _pipeline(tmp_path, inputs)
    seen = []
    real = ex.run_local
    monkeypatch.setattr(ex, "run_local", lambda cfg, restart=False: seen.append(cfg.progress) or real(cfg, restart))
    assert main(["data", "run", str(p)]) == 0
    assert main(["data", "run", str(p), "--progress", "True"]) == 0
    p.write_text(p.read_text().replace("progress = false", "progress = true"))
    assert main(["data", "run", str(p), "--progress", "False"]) == 0
    assert main(["data", "run", str(p)]) == 0
    assert seen == [False, True, False, True]


def test_a_run_made_before_the_output_identity_resumes_and_data_files_alone_are_seen(tmp_path):
    """A pipeline.json written before the output settings joined the identity ("output_format" only) is the same
    pipeline, not another one (review, 2026-12-05); and a directory holding only an earlier run's data/ files,
    without pipeline.json, is refused until --restart, which clears it (it was neither refused nor cleared)."""
    cfg = load_pipeline(_pipeline(tmp_path, _inputs(tmp_path / "in")))
    first = run_local(cfg)
    run = tmp_path / "run"
    saved = run / "pipeline.json"
    old = json.loads(saved.read_text())
    old["output_format"] = old.pop("output")["format"]
    saved.write_text(json.dumps(old))
    assert run_local(cfg)["balance"] == first["balance"]
    for entry in ("pipeline.json", "report.json", "report.md", "report.png"):
        (run / entry).unlink(missing_ok=True)
    for folder in ("_work", "rejected", "tokens"):
        for f in (run / folder).rglob("*"):
            if f.is_file():
                f.unlink()
    assert any(f.is_file() for f in (run / "data").rglob("*"))
    with pytest.raises(ConfigError, match=r"holds an earlier run's files .*data.* rerun with --restart"):
        run_local(cfg)
    assert run_local(cfg, restart=True)["balance"] == first["balance"]


def test_a_corpus_wide_phase_shows_its_progress(tmp_path, capsys):
    """The global phase (minhash/exact dedup over the whole corpus) showed no bar: after the map phase's bar reached
    100% a run sat silent while every shard was read, deduplicated and written (minutes on a large corpus)."""
    from lmforge.cli import main

    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.txt").write_text(f"a document number {i % 2} with some words in it\n")
    p = tmp_path / "p.toml"
    p.write_text(f'progress = true\nworkers = 1\n[input]\npaths = ["{tmp_path / "in"}"]\nfiles_per_shard = 1\n'
                 f'[output]\ndir = "{tmp_path / "out"}"\n[[stages]]\nstage = "exact_dedup"\n')
    assert main(["data", "run", str(p)]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "phase 1/1 [exact_dedup] running over 3 documents read" in err
    assert "phase 1/1 [exact_dedup] write: 100%" in err and "3/3" in err


def _one_document_run(tmp_path):
    """A finished run of one document through exact_dedup in tmp_path / 'o'; its pipeline file."""
    from lmforge.data.executor import run_local
    from lmforge.data.pipeline import load_pipeline

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one document\n")
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{tmp_path / "o"}"\n'
                 '[[stages]]\nstage = "exact_dedup"\n')
    run_local(load_pipeline(p))
    return p


def test_a_damaged_record_of_the_run_is_one_line_and_restart_redoes_it(tmp_path):
    """A shard's done marker or pipeline.json that no longer parses (a disk fault, an edit: they are written
    atomically) was a JSONDecodeError traceback on every rerun."""
    import pytest

    from lmforge.data.executor import run_local
    from lmforge.data.pipeline import load_pipeline
    from lmforge.errors import ConfigError

    p = _one_document_run(tmp_path)
    for damaged in (tmp_path / "o" / "_work" / "p0" / "shard-00000.done.json", tmp_path / "o" / "pipeline.json"):
        damaged.write_text('{"shard": "shard-0')
        with pytest.raises(ConfigError, match=f"^{damaged}, one of the run's own records, is corrupt \\(.*\\); rerun "
                                              "with --restart to redo the run, or choose a new output.dir$"):
            run_local(load_pipeline(p))
        assert run_local(load_pipeline(p), restart=True)["balance"]["kept_docs"] == 1


def test_a_pipeline_record_with_a_damaged_stage_files_entry_is_one_line(tmp_path):
    """pipeline.json whose stage_files is not {stage: [[path, size, mtime], ...]} (an edit) was an AttributeError or
    ValueError traceback in the resume check; now the corrupt-record line, and --restart redoes the run."""
    import json

    import pytest

    from lmforge.data.executor import run_local
    from lmforge.data.pipeline import load_pipeline
    from lmforge.errors import ConfigError

    p = _one_document_run(tmp_path)
    saved = tmp_path / "o" / "pipeline.json"
    for bad in (["x"], {"tokenize": [["a", 1]]}, {"tokenize": [[["a"], 1, 2]]}):
        saved.write_text(json.dumps({**json.loads(saved.read_text()), "stage_files": bad}))
        with pytest.raises(ConfigError, match=f"^{saved}, one of the run's own records, is corrupt \\(its stage_files"):
            run_local(load_pipeline(p))
    assert run_local(load_pipeline(p), restart=True)["balance"]["kept_docs"] == 1

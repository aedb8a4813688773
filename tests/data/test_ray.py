"""The Ray Data executor gives the same documents and accounting as the local one (small local Ray)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from lmforge.data.executor import run_local
from lmforge.errors import ConfigError, DataError
from lmforge.data.pipeline import load_pipeline
from lmforge.data.readers import read_documents


def _worker_log(log: str):
    """A Ray worker_process_setup_hook: each worker process appends "<pid> load <name>" for every fastText model
    file or classifier directory it loads, "<pid> task <task id>" for every batch a map phase runs and "<pid> fail
    <error class>" for one that fails, to `log`; while a file `log`.touch names a file, each batch a map phase runs
    adds a newline to that file after it and moves its mtime on by 7 s (a tokenizer saved again mid-run; a bare touch
    is no change: the stamps carry a content digest). (A closure, so that Ray pickles it
    by value: the workers need not import the tests.)"""

    def setup() -> None:
        import os

        import ray
        from lmforge.data import classifier, fasttext_model, ray_executor

        def note(*words) -> None:
            with open(log, "a", encoding="utf-8") as f:
                f.write(" ".join([str(os.getpid()), *map(str, words)]) + "\n")

        init, load, call = (fasttext_model.FastTextModel.__init__, classifier.HashedNgramClassifier.load.__func__,
                            ray_executor._MapPhase.__call__)
        fasttext_model.FastTextModel.__init__ = lambda self, path: note("load", os.path.basename(path)) or init(
            self, path)
        classifier.HashedNgramClassifier.load = classmethod(lambda cls, d: note("load", os.path.basename(d))
                                                            or load(cls, d))
        def touch_after(self, batch):
            note("task", ray.get_runtime_context().get_task_id())
            try:
                out = call(self, batch)
            except Exception as e:
                note("fail", type(e).__name__)
                raise
            if os.path.exists(log + ".touch"):
                with open(log + ".touch", encoding="utf-8") as f:
                    path = f.read()
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")
                t = os.stat(path).st_mtime_ns + 7 * 10**9
                os.utime(path, ns=(t, t))
            return out

        ray_executor._MapPhase.__call__ = touch_after

    return setup


@pytest.fixture(scope="module")
def worker_log(tmp_path_factory):
    """The file `local_ray`'s worker processes log their model loads and map tasks to (`_worker_log`)."""
    return tmp_path_factory.mktemp("ray") / "workers.log"


@pytest.fixture(scope="module")
def local_ray(worker_log):
    """One small local Ray for the module's tests (starting one takes most of their time)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'lmforge[ray]')")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": _worker_log(str(worker_log))})
    yield ray
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own deprecated settings
def test_ray_matches_local(tmp_path, web_html, local_ray):
    (tmp_path / "extra.jsonl").write_text(json.dumps({"id": "j1", "text": "bad json follows"}) + "\n{oops\n")
    pages = sorted(web_html.glob("*.html"))[:10]
    paths = ", ".join(f'"{p}"' for p in pages)
    (tmp_path / "p.toml").write_text(f"""
workers = 2
progress = false
[input]
paths = [{paths}, "{tmp_path / 'extra.jsonl'}"]
files_per_shard = 4
[output]
dir = "{tmp_path / 'local'}"
[[stages]]
stage = "extract"
[[stages]]
stage = "gopher"
[[stages]]
stage = "minhash_dedup"
[[stages]]
stage = "c4"
min_sentences = 2
[[stages]]
stage = "tokenize"
""")
    cfg = load_pipeline(tmp_path / "p.toml")
    local = run_local(cfg)
    from lmforge.data.ray_executor import run_ray

    rcfg = dataclasses.replace(cfg, executor="ray",
                               output=dataclasses.replace(cfg.output, dir=str(tmp_path / "ray")))
    remote = run_ray(rcfg, batch_size=5)  # small batches: the read rows come back among the first phase's
    kept = lambda d: sorted((x.id, x.text) for f in (d / "data").glob("*") for x in read_documents(f))  # noqa: E731
    first = kept(tmp_path / "ray")
    # no markers to resume from: a second run into the same directory is refused (it wrote every document
    # again beside the first run's), and --restart redoes it
    with pytest.raises(ConfigError, match="earlier run's output .* cannot resume one; rerun with --restart"):
        run_ray(rcfg)
    again = run_ray(rcfg, restart=True)
    # one map stage over small batches: the read rows came back after that stage's and the report listed it
    # first (an order that depended on the batching)
    for f in range(3):
        lines = [json.dumps({"id": f"{f}-{i}" if i else "same", "text": f"doc {f} {i}"}) + "\n" for i in range(20)]
        (tmp_path / f"g{f}.jsonl").write_text("".join(lines))
    (tmp_path / "g.toml").write_text(f'workers = 2\nprogress = false\n[input]\npaths = ["{tmp_path}/g*.jsonl"]'
                                     f'\n[output]\ndir = "{tmp_path / "g"}"\nplot = false\n'
                                     '[[stages]]\nstage = "gopher"\n')
    gopher = run_ray(load_pipeline(tmp_path / "g.toml", executor="ray"), batch_size=5)
    assert remote["balance"] == local["balance"] and local["balance"]["input_docs"] == 12
    strip = lambda st: [{k: v for k, v in s.items() if k != "seconds"} for s in st]  # noqa: E731
    assert strip(remote["stages"]) == strip(local["stages"]) == strip(again["stages"])
    assert first == kept(tmp_path / "ray") == kept(tmp_path / "local") and len(first) > 0
    assert [st["name"] for st in gopher["stages"]] == ["read", "gopher"]
    assert gopher["counters"]["read:duplicate_ids"] == 2  # "same" in each of 3 shards: counted across them
    tokens = lambda d: sum(f.stat().st_size > 0 for f in (d / "tokens").glob("*.bin"))  # noqa: E731
    assert tokens(tmp_path / "ray") >= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_restart_removes_its_own_token_shards_outside_output_dir(tmp_path, local_ray):
    """Ray names each token shard after a random batch id, so --restart into a token directory outside output.dir
    (left alone: other corpora's shards may lie there) replaced none of the earlier run's: the directory held both
    runs' shards and training on it read every document twice (found 2026-12-05). Now exactly this run's go."""
    from lmforge.data.ray_executor import run_ray
    from lmforge.data.shards import TokenFile
    from lmforge.data.tokenize import OWNER

    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps({"id": f"d{i}", "text": f"document number {i}"}) + "\n")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "other-corpus.bin").write_bytes(b"theirs")
    (tmp_path / "p.toml").write_text(f'progress = false\nexecutor = "ray"\n[input]\npaths = ["{tmp_path}/*.jsonl"]'
                                     f'\n[output]\ndir = "{tmp_path / "run"}"\nplot = false\n'
                                     '[[stages]]\nstage = "tokenize"\nout_dir = "../tokens"\n')
    first = run_ray(load_pipeline(tmp_path / "p.toml"), batch_size=1)
    before = {f.name for f in tokens.glob("ray-*.bin")}
    (tmp_path / "2.jsonl").unlink()
    again = run_ray(load_pipeline(tmp_path / "p.toml"), batch_size=1, restart=True)
    after = {f.name for f in tokens.glob("ray-*.bin")}
    assert before and after and not before & after
    assert (tokens / "other-corpus.bin").read_bytes() == b"theirs"
    assert {f.name for f in tokens.iterdir()} == after | {"other-corpus.bin", OWNER}
    assert sum(len(TokenFile(tokens / f)) for f in after) == again["counters"]["tokenize.tokens"]
    assert 0 < again["counters"]["tokenize.tokens"] < first["counters"]["tokenize.tokens"]


def test_ray_rows_carry_lone_surrogates_as_the_local_executor_keeps_them(tmp_path):
    """A lone surrogate is a legal JSON escape ("\\ud800") that the local executor keeps and writes back; the Ray
    rows held id and text in Arrow string columns, which refuse it, so the whole run failed with a traceback. The
    row functions run here without Ray: read, a map phase and the write, as Ray Data calls them."""
    pytest.importorskip("pyarrow")
    from lmforge.data.ray_executor import _MapPhase, _ReadShard, _table, _WriteBatch

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "s\\ud800", "text": "lone \\udfff in a@b.example text", "note": "\\ud83d"}\n'
                   '{"id": "plain", "text": "ordinary text"}\n')
    (tmp_path / "p.toml").write_text(f'progress = false\n[input]\npaths = ["{src}"]\n[output]\n'
                                     f'dir = "{tmp_path / "local"}"\n[[stages]]\nstage = "pii"\n')
    cfg = load_pipeline(tmp_path / "p.toml")
    run_local(cfg)
    rcfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(tmp_path / "ray")))
    rows = _table(_ReadShard(rcfg)({"shard": "shard-00000", "files": [str(src)]}))
    _WriteBatch(rcfg)(_MapPhase(rcfg, 0)(rows))
    docs = lambda d: sorted((x.id, x.text, x.meta.get("note")) for f in (d / "data").glob("*")  # noqa: E731
                            for x in read_documents(f))
    assert docs(tmp_path / "ray") == docs(tmp_path / "local") == [
        ("plain", "ordinary text", None), ("s\ud800", "lone \udfff in |||EMAIL_ADDRESS||| text", "\ud83d")]



@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_dedup_keeps_the_copy_the_local_executor_keeps(tmp_path, local_ray, monkeypatch):
    """Ray Data hands blocks on in the order their tasks finish unless preserve_order is set, so with several
    workers the global dedup could see a later shard's copy first and keep it, where the local executor keeps the
    first in shard order (found 2026-12-07). Which task finishes first is timing, which a small local Ray rarely
    reorders, so the test also checks the setting each of the run's datasets ran with, and that the caller's is
    left as it was."""
    from lmforge.data.ray_executor import run_ray

    ran = []
    take_all = local_ray.data.Dataset.take_all
    monkeypatch.setattr(local_ray.data.Dataset, "take_all",
                        lambda ds, *a, **k: ran.append(ds.context.execution_options.preserve_order) or take_all(ds))
    for name, ids in {"a": ["a1", "a-copy"], "b": ["b-copy", "b1"], "c": ["c-copy"]}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": i, "text": "the same text" if "copy" in i else f"document {i}"}) + "\n" for i in ids))
    (tmp_path / "p.toml").write_text(f'workers = 2\nprogress = false\n[input]\npaths = ["{tmp_path}/*.jsonl"]\n'
                                     f'[output]\ndir = "{tmp_path / "local"}"\nplot = false\n'
                                     '[[stages]]\nstage = "exact_dedup"\n')
    cfg = load_pipeline(tmp_path / "p.toml")
    run_local(cfg)
    rcfg = dataclasses.replace(cfg, executor="ray", output=dataclasses.replace(cfg.output, dir=str(tmp_path / "ray")))
    run_ray(rcfg, batch_size=1)
    docs = lambda d, sub: sorted((x.id, x.meta.get("dup_of")) for f in (d / sub).glob("*")  # noqa: E731
                                 for x in read_documents(f))
    assert docs(tmp_path / "ray", "rejected") == docs(tmp_path / "local", "rejected") == [
        ("b-copy", "a-copy"), ("c-copy", "a-copy")]
    assert docs(tmp_path / "ray", "data") == docs(tmp_path / "local", "data") == [
        ("a-copy", None), ("a1", None), ("b1", None)]
    assert ran == [True, True]  # the global phase's gather and the final write
    assert local_ray.data.DataContext.get_current().execution_options.preserve_order is False


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_workers_load_each_model_once_per_process(tmp_path, local_ray, worker_log):
    """As the process executor's workers do (test_fasttext's
    test_each_model_loads_once_per_process_however_many_stages_and_shards): each Ray worker process loads each
    fastText model and classifier directory once, through the per-process cache, however many map tasks (one per
    shard here) and batches it runs, and the driver frees the copies its pre-run check loaded."""
    from collections import Counter
    from pathlib import Path

    from lmforge.config import from_dict
    from lmforge.data.classifier import ClassifierConfig, HashedNgramClassifier
    from lmforge.data.fasttext_model import load_fasttext
    from lmforge.data.pipeline import PipelineConfig
    from lmforge.data.ray_executor import run_ray

    fixtures = Path(__file__).parent / "fasttext"
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        (src / f"{i}.txt").write_text(f"the match was decided by a penalty number {i}\n", encoding="utf-8")
    HashedNgramClassifier(ClassifierConfig(buckets=64, dim=2)).save(tmp_path / "clf")
    stages = [{"stage": "quality", "model": str(fixtures / "softmax.bin"), "label": "sport", "threshold": 0.0},
              {"stage": "toxicity", "model": str(fixtures / "hs.bin"), "label": "sport", "threshold": 1.0},
              {"stage": "quality", "model": str(tmp_path / "clf"), "threshold": 0.0}]
    cfg = from_dict(PipelineConfig, {"input": {"paths": [str(src)], "format": "text", "files_per_shard": 1},
                                     "workers": 2, "executor": "ray", "progress": False, "stages": stages,
                                     "output": {"dir": str(tmp_path / "out"), "plot": False}})
    before = worker_log.read_text(encoding="utf-8") if worker_log.exists() else ""
    report = run_ray(cfg, batch_size=1)
    assert [st["docs_out"] for st in report["stages"]] == [8] * 4
    assert load_fasttext.cache_info().currsize == 0  # the driver's checked copies, freed
    lines = [line.split() for line in worker_log.read_text(encoding="utf-8")[len(before):].splitlines()]
    loads = Counter((pid, name) for pid, what, name in lines if what == "load")
    tasks = {(pid, task) for pid, what, task in lines if what == "task"}
    assert {name for _, name in loads} == {"softmax.bin", "hs.bin", "clf"} and set(loads.values()) == {1}
    per_model = Counter(name for _, name in loads)
    assert len(tasks) >= 8 > max(per_model.values())  # a task per shard; far fewer loads


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_stage_file_changed_mid_run_fails_in_one_line_that_says_restart(tmp_path, local_ray, worker_log):
    """The check raised in a Ray task, outside apply_stage, so the driver got RayTaskError(UserCodeException): 16
    lines, no LmforgeError (the CLI printed a traceback), advising to put the files back and rerun to resume, which
    the Ray executor refuses. Now the task's error in its one line, with the Ray executor's advice."""
    from lmforge.data import ray_executor
    from lmforge.tokenizer.bpe import Tokenizer

    for i in range(4):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps({"id": f"d{i}", "text": f"document number {i}"}) + "\n")
    spec = tmp_path / "tok" / "lmforge_tokenizer.json"
    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(spec)
    (tmp_path / "p.toml").write_text(f'progress = false\nexecutor = "ray"\n[input]\npaths = ["{tmp_path}/*.jsonl"]'
                                     f'\n[output]\ndir = "{tmp_path / "run"}"\nplot = false\n'
                                     f'[[stages]]\nstage = "tokenize"\ntokenizer = "{spec}"\n')
    before = worker_log.read_text(encoding="utf-8") if worker_log.exists() else ""
    touch = worker_log.with_name(worker_log.name + ".touch")
    touch.write_text(str(spec))
    try:
        with pytest.raises(DataError) as failed:
            ray_executor.run_ray(load_pipeline(tmp_path / "p.toml"), batch_size=1)
    finally:
        touch.unlink()
    assert re.fullmatch(r"the files stage 'tokenize' reads changed during the run in .*run: 1 changed size or content "
                        r"\(lmforge_tokenizer\.json\); the Ray executor cannot resume a run: rerun with --restart to "
                        r"redo it with the new ones", str(failed.value))
    fails = [line.split()[2] for line in worker_log.read_text(encoding="utf-8")[len(before):].splitlines()
             if line.split()[1] == "fail"]
    assert fails and set(fails) == {"DataError"}  # a worker's error, out of Ray's wrapper
    assert not (tmp_path / "run" / "report.json").exists()


def test_ray_workers_hold_to_the_stage_files_they_first_saw_not_the_drivers(tmp_path):
    """A worker compared the driver's stamps (resolved path, size, mtime) with its own files: on another machine a
    model copied to each node (another mtime) or a symlink resolving elsewhere failed every batch. A worker now holds
    to the files as it first found them in the run, so a change there mid-run still fails. The map phase runs here
    without Ray, as a worker calls it."""
    pytest.importorskip("pyarrow")
    from lmforge.data.pipeline import stage_files
    from lmforge.data.ray_executor import _MapPhase, _ReadShard, _table
    from lmforge.tokenizer.bpe import Tokenizer

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")
    spec = tmp_path / "tok" / "lmforge_tokenizer.json"
    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(spec)
    (tmp_path / "p.toml").write_text(f'progress = false\n[input]\npaths = ["{src}"]\n[output]\n'
                                     f'dir = "{tmp_path / "run"}"\n[[stages]]\nstage = "tokenize"\n'
                                     f'tokenizer = "{spec}"\n')
    cfg = load_pipeline(tmp_path / "p.toml")
    (path, size, mtime), = stage_files(cfg)["tokenize"]
    drivers = {"tokenize": [["/on/the/driver/lmforge_tokenizer.json", size, mtime - 60 * 10**9]]}
    phase = _MapPhase(cfg, 0, drivers)
    batch = lambda: _table(_ReadShard(cfg)({"shard": "shard-00000", "files": [str(src)]}))  # noqa: E731
    stats = [json.loads(r["meta"]) for r in phase(batch()).to_pylist() if r["kind"] == "stats"]
    assert stats[-1]["counters"]["tokenize.tokens"] == 1 + len("some text")
    later = mtime + 7 * 10**9
    os.utime(spec, ns=(later, later))  # touched on this node: the same bytes, no change (their content digest)
    phase(batch())
    with open(spec, "a", encoding="utf-8") as f:  # saved again on this node mid-run
        f.write("\n")
    with pytest.raises(DataError, match=r"the files stage 'tokenize' reads changed during the run .*: 1 changed size "
                                        r"or content \(lmforge_tokenizer\.json\); the Ray executor cannot resume"):
        phase(batch())


def test_ray_task_error_is_the_lmforge_error_a_task_raised_last():
    """_task_error reads the task's error back from the wrapper's text (the link to it is not pickled): the lmforge
    error a task raised, in its own class and one line; none where the task failed on something else after it."""
    exceptions = pytest.importorskip("ray.exceptions")
    from lmforge.data.ray_executor import _task_error

    def wrapped(worker_traceback: str) -> Exception:
        text = (f"Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    check()\n{worker_traceback}\n"
                "\nThe above exception was the direct cause of the following exception:\n\n"
                "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
                "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).")
        return exceptions.RayTaskError("MapBatches", text, exceptions.UserCodeException("UDF failed"))

    found = _task_error(wrapped("lmforge.errors.DataError: the files stage 'tokenize' reads changed: rerun"))
    assert type(found) is DataError and str(found) == "the files stage 'tokenize' reads changed: rerun"
    later = "lmforge.errors.DataError: first\n\nDuring handling of the above exception, another exception occurred:\n" \
            "\nTraceback (most recent call last):\n  File \"y.py\", line 2, in g\nKeyError: 'meta'"
    assert _task_error(wrapped(later)) is None
    assert _task_error(RuntimeError("no Ray here")) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_driver_checks_its_stage_files_after_the_run(tmp_path, local_ray, monkeypatch):
    """The workers hold to the files as each first found them, so one whose first batch came after a change used the
    new tokenizer unseen; the driver compares its own files with those the run fixed once the dataset has run."""
    from lmforge.data import ray_executor
    from lmforge.tokenizer.bpe import Tokenizer

    (tmp_path / "0.jsonl").write_text(json.dumps({"id": "d0", "text": "document"}) + "\n")
    spec = tmp_path / "tok" / "lmforge_tokenizer.json"
    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(spec)
    (tmp_path / "p.toml").write_text(f'progress = false\nexecutor = "ray"\n[input]\npaths = ["{tmp_path}/*.jsonl"]'
                                     f'\n[output]\ndir = "{tmp_path / "run"}"\nplot = false\n'
                                     f'[[stages]]\nstage = "tokenize"\ntokenizer = "{spec}"\n')
    real = ray_executor._run_dataset

    def saved_again_first(*args):
        with open(spec, "a", encoding="utf-8") as f:
            f.write("\n")
        t = spec.stat().st_mtime_ns + 7 * 10**9
        os.utime(spec, ns=(t, t))
        return real(*args)

    monkeypatch.setattr(ray_executor, "_run_dataset", saved_again_first)
    with pytest.raises(DataError, match=r"stage 'tokenize' reads changed during the run .*--restart"):
        ray_executor.run_ray(load_pipeline(tmp_path / "p.toml"), batch_size=1)
    assert not (tmp_path / "run" / "report.json").exists()

"""A run_dir no writer can use - a read-only mount, a disk that fills mid-run - is one line naming the path and the
fix, not a traceback from deep inside the loop."""

import os
from pathlib import Path

import pytest

from lmforge.cli import main

from .helpers import make_shard

FLAGS = ["--max-steps", "3", "--eval-every", "3", "--eval-batches", "1", "--device", "cpu", "--progress", "false",
         "--plot", "false", "--model.vocab-size", "257", "--model.d-model", "16", "--model.n-layers", "1",
         "--model.n-heads", "2", "--model.max-seq-len", "16", "--data.seq-len", "16", "--data.batch-size", "2"]


def test_a_run_dir_in_a_read_only_place_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """It was an OSError traceback ('[Errno 30] Read-only file system') from the metrics log's mkdir. Root writes
    through a chmod, so the read-only mount is what os.access says of the folder (as it does there: EROFS)."""
    shard = make_shard(tmp_path / "t.bin")
    locked = tmp_path / "mnt"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    for run_dir in (locked / "run", locked):
        assert main(["train", "--data.train", str(shard), "--run-dir", str(run_dir), *FLAGS]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == (f"lmforge train: error: run_dir '{run_dir}' cannot be written: '{locked}' is "
                                       "not writable by this user; make it writable, or set run_dir (--run-dir) to a "
                                       "directory you can write")
        assert "Traceback" not in err
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_a_disk_that_fills_under_the_metrics_log_is_one_line(tmp_path, monkeypatch, capsys):
    """metrics.jsonl's append met a full disk as an OSError traceback without a file name; now the CLI says which
    file and that the command resumes. The appends go to /dev/full, whose every write fails with ENOSPC."""
    import lmforge.train.metrics as metrics

    shard = make_shard(tmp_path / "t.bin")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(metrics, "open", lambda path, mode="r": open("/dev/full", mode), raising=False)
    assert main(["train", "--data.train", str(shard), "--run-dir", str(run_dir), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"lmforge train: error: disk full writing {run_dir / 'metrics.jsonl'}; free space "
                                    "and run the command again (it resumes from its last checkpoint)")
    assert "Traceback" not in err
    with pytest.raises(OSError, match="No space left on device"):  # --debug lets the traceback through
        main(["--debug", "train", "--data.train", str(shard), "--run-dir", str(tmp_path / "run2"), *FLAGS])


def test_a_disk_full_under_config_json_names_the_file(tmp_path, monkeypatch, capsys):
    """run_dir/config.json, written at fit's start through a temporary (utils.atomic_path), met a full disk as
    'disk full; free space ...' naming no file (the write's OSError has none); now it names config.json, and
    no temporary is left beside it."""
    import errno

    shard = make_shard(tmp_path / "t.bin")
    run_dir = tmp_path / "run"
    real = Path.write_text

    def full(self, *a, **kw):
        if self.name.startswith(".config.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(["train", "--data.train", str(shard), "--run-dir", str(run_dir), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"lmforge train: error: disk full writing {run_dir / 'config.json'}; free space "
                                    "and run the command again (it resumes from its last checkpoint)")
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".config.json")]


def test_a_plot_that_meets_a_full_disk_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """loss.png was written in place: a full disk left half a PNG, and an OSError that named no file."""
    import errno

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lmforge.train.metrics import MetricsLog, plot_losses

    MetricsLog(tmp_path).log({"step": 1, "loss": 2.0})
    (tmp_path / "loss.png").write_bytes(b"the last plot")

    def half(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half)
    with pytest.raises(OSError) as e:
        plot_losses(tmp_path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "loss.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
    assert (tmp_path / "loss.png").read_bytes() == b"the last plot"


def test_a_run_dir_made_read_only_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A file system remounted read-only under a run (the kernel does so after an I/O error) failed the next
    checkpoint with an OSError traceback ('[Errno 30] Read-only file system'); now it is one line naming the
    folder, that the step was not written and what to do, the earlier checkpoint intact and resumed from."""
    import errno

    import lmforge.checkpoint.save as save

    shard = make_shard(tmp_path / "t.bin")
    run_dir = tmp_path / "run"
    real = save._write

    def read_only_from_step_2(tmp, step, *a):
        if step >= 2:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp / "config.json"))
        real(tmp, step, *a)

    monkeypatch.setattr(save, "_write", read_only_from_step_2)
    flags = [*FLAGS, "--ckpt-every", "1"]
    assert main(["train", "--data.train", str(shard), "--run-dir", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-2]
    assert line.startswith(f"lmforge train: error: read-only file system at {run_dir / 'checkpoints'}/.step_000002.")
    assert line.endswith("while writing the step 2 checkpoint; it was not written and earlier checkpoints are "
                         "intact: make the run directory writable again and resume")
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000001"]
    monkeypatch.setattr(save, "_write", real)
    assert main(["train", "--data.train", str(shard), "--run-dir", str(run_dir), *flags]) == 0
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000001'} at step 1" in capsys.readouterr().out


def test_a_read_only_file_system_under_the_metrics_log_is_one_line(tmp_path, monkeypatch, capsys):
    """metrics.jsonl's append on a file system gone read-only mid-run was an OSError traceback; now one line."""
    import errno

    import lmforge.train.metrics as metrics

    def read_only(path, mode="r"):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    shard = make_shard(tmp_path / "t.bin")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(metrics, "open", read_only, raising=False)
    assert main(["train", "--data.train", str(shard), "--run-dir", str(run_dir), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"lmforge train: error: read-only file system writing {run_dir / 'metrics.jsonl'}; "
                                    "make it writable again and run the command again (it resumes from its last "
                                    "checkpoint)")
    assert "Traceback" not in err

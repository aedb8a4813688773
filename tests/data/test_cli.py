"""`lmforge data ...` in-process: stages listing, and a run over WARC + zstd JSONL + Parquet inputs."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.data.document import Document
from lmforge.data.readers import read_documents
from lmforge.data.report import load_report
from lmforge.data.stages import STAGES
from lmforge.data.writers import write_jsonl, write_parquet
from tests.data.test_readers import _warc_bytes

TEXT = ("The river flooded the valley after three days of heavy rain. Farmers moved their animals to higher "
        "ground. The army helped to build walls of sandbags. Schools were closed for the week.")


def test_stages_command_lists_every_stage(capsys):
    assert main(["data", "stages"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES) and len(STAGES) == 17


def test_run_command_on_mixed_formats(tmp_path, capsys):
    pytest.importorskip("warcio")
    d = tmp_path / "in"
    d.mkdir()
    page = f"<html><body><nav>Home | About</nav><p>{TEXT}</p></body></html>".encode()
    (d / "a.warc.gz").write_bytes(_warc_bytes([("response", "http://a.example/", page),
                                               ("conversion", "http://b.example/", (TEXT + " Wet.").encode())]))
    write_jsonl(d / "b.jsonl.zst", [Document(id="z1", text=TEXT + " Zstd."), Document(id="z2", text=TEXT)])
    write_parquet(d / "c.parquet", [Document(id="p1", text=TEXT + " Parquet.", meta={"url": "u"})])
    (tmp_path / "p.toml").write_text(f"""
[input]
paths = ["{d}"]
[output]
dir = "{tmp_path / 'ignored'}"
format = "parquet"
[[stages]]
stage = "extract"
[[stages]]
stage = "exact_dedup"
[[stages]]
stage = "pii"
""")
    out = tmp_path / "run"
    assert main(["data", "run", str(tmp_path / "p.toml"), "--output", str(out), "--progress", "False"]) == 0
    assert "balanced" in capsys.readouterr().out
    report = load_report(out)
    assert report["balance"] == {"input_docs": 5, "added_docs": 0, "kept_docs": 4, "rejected_docs": 1,
                                 "balanced": True}
    kept = {x.id: x for f in (out / "data").glob("*.parquet") for x in read_documents(f)}
    assert len(kept) == 4 and kept["p1"].meta["url"] == "u"
    warc = [x for x in kept.values() if x.meta.get("url") == "http://a.example/"]
    assert warc and warc[0].text == TEXT  # navigation boilerplate removed
    rejected = [x for f in (out / "rejected").glob("*.jsonl") for x in read_documents(f)]
    assert [x.drop for x in rejected] == ["exact_duplicate"] and rejected[0].id == "z2"
    assert json.loads((out / "pipeline.json").read_text())["output"] == {"format": "parquet", "rejected_text": False}


def test_a_run_whose_every_document_is_empty_asks_about_text_key(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text('{"content": "a"}\n{"content": "b"}\n')
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "c.jsonl"}"]\n[output]\ndir = "{tmp_path / "o"}"\n')
    main(["data", "run", str(p)])
    assert ("every document read was empty or lacked its text field: is input.text_key right? (the field holding "
            "the text; now 'text')") in capsys.readouterr().out


def test_an_output_dir_no_run_could_write_is_a_one_line_error(tmp_path, capsys):
    """--output (or [output] dir) naming a file, or a path under one, gave a FileExistsError traceback from
    pipeline.json's write, and '' ran into the current directory (found 2026-12-05): refused before any work."""
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "c.jsonl"}"]\n[output]\ndir = "{taken}"\n')
    fix = "set output.dir (--output) to a new or existing directory"
    for args, message in [([], f"output.dir '{taken}' is an existing file, not a directory; {fix}, or move the "
                                "file away"),
                          (["--output", f"{taken}/run"], f"output.dir '{taken}/run' lies under '{taken}', an existing "
                                                         f"file, not a directory; {fix}, or move the file away"),
                          (["--output="], f"output.dir is empty; {fix}")]:
        assert main(["data", "run", str(p), *args]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == f"lmforge data: error: {message}" and "Traceback" not in err
    assert sorted(q.name for q in tmp_path.iterdir()) == ["c.jsonl", "notes.txt", "p.toml"]
    assert taken.read_text() == "mine\n"


def test_a_run_whose_every_record_is_a_read_error_says_so(tmp_path, capsys):
    """A .json file of something else read as JSON Lines kept nothing and exited 0 with no hint (2026-12-06)."""
    (tmp_path / "c.jsonl").write_text('{"text": "a",\n"id": 1}\nnot json\n')
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "c.jsonl"}"]\n[output]\ndir = "{tmp_path / "o"}"\n'
                 'plot = false\n')
    main(["data", "run", str(p)])
    assert ("every record read was a read error (most: read_error:bad_json, 3): check the input's format"
            in capsys.readouterr().out)


def test_the_reuse_line_of_a_ray_run_counts_its_documents():
    """The Ray executor's report counts no shard-phases (it does not resume): `lmforge data run --executor ray`
    ended with "fresh run: ? shard-phase(s) processed"."""
    from lmforge.cli.data import reuse_line

    ray = {"stages": [], "counters": {}, "output": "o/data", "executor": "ray",
           "balance": {"input_docs": 1234, "added_docs": 0, "kept_docs": 1000, "rejected_docs": 234, "balanced": True}}
    assert reuse_line(ray, "o") == ("fresh run (ray executor, which does not resume): every one of the 1,234 input "
                                    "documents processed")
    local = {**ray, "executor": None, "shards": {"total": 2, "processed": 4, "skipped": 0}}
    assert reuse_line(local, "o") == "fresh run: 4 shard-phase(s) processed"


def test_a_run_names_its_token_shards_and_how_to_train_on_them(tmp_path, capsys):
    """The run's last lines named its kept documents and report but not the token shards a tokenize stage wrote,
    which are what training reads. The command named trained the default model (llama-tiny: vocab 32,000) on
    byte tokens: a 257-token tokenizer's loss started at ln 32000 = 10.4 nats and early samples held ids no
    tokenizer decodes; it now sets the model's vocabulary to the shards' tokenizer's."""
    write_jsonl(tmp_path / "c.jsonl", [Document(id="a", text=TEXT), Document(id="b", text=TEXT + " Two.")])
    p = tmp_path / "p.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "c.jsonl"}"]\n[output]\ndir = "{tmp_path / "o"}"\n'
                 '[[stages]]\nstage = "tokenize"\ntokenizer = "byte"\n')
    assert main(["data", "run", str(p)]) == 0
    tokens = tmp_path / "o" / "tokens"
    assert capsys.readouterr().out.splitlines()[-1] == (f"token shards: 1 in {tokens}; train on them: lmforge train "
                                                        f"--data.train {tokens}/*.bin --model.vocab-size 257")
    p.write_text(p.read_text().replace('stage = "tokenize"\ntokenizer = "byte"', 'stage = "pii"'))
    assert main(["data", "run", str(p), "--restart"]) == 0
    assert "token shards" not in capsys.readouterr().out

"""Bad input through a whole pipeline: an .html file that is binary, a fastText model that is missing,
truncated or of another format version. Each is a one-line reason naming the file, and the run report
counts the documents as rejected with that reason (input = kept + rejected)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data.executor import run_local
from lmforge.data.pipeline import load_pipeline
from lmforge.data.readers import read_documents

FIXTURES = Path(__file__).parent / "fasttext"
PAGE = ("<html><head><title>Solar boats</title></head><body><article><h1>Solar boats</h1><p>Three solar boats "
        "crossed the lake on Sunday, the first crossing made without any fuel at all, said the crews.</p>"
        "</article></body></html>")


def _run(tmp_path: Path, name: str, stages: str) -> tuple[dict, list]:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'progress = false\n[input]\npaths = ["{tmp_path / "in"}"]\n[output]\ndir = "{tmp_path / name}"\n'
                 + stages)
    report = run_local(load_pipeline(p))
    rejected = [d for f in sorted((tmp_path / name / "rejected").glob("*.jsonl")) for d in read_documents(f)]
    return report, rejected


def test_binary_page_and_bad_models_are_counted_as_rejected(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.html").write_text(PAGE, encoding="utf-8")
    (src / "photo.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    missing = tmp_path / "models" / "jigsaw_toxic.bin"
    report, rejected = _run(tmp_path, "missing", f'[[stages]]\nstage = "extract"\n[[stages]]\nstage = "toxicity"\n'
                                                 f'model = "{missing}"\n')
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["extract"]["rejected"] == {"extract:not_html": 1}
    assert stages["toxicity"]["rejected"] == {"toxicity:bad_model": 1}
    assert report["balance"] == {"input_docs": 2, "added_docs": 0, "kept_docs": 0, "rejected_docs": 2, "balanced": True}
    assert report["counters"]["extract.backend.resiliparse"] == 1  # the extractor used, in the report
    errors = {d.drop: d.meta["error"] for d in rejected}
    assert errors["extract:not_html"] == f"{src / 'photo.html'}: not an HTML page (binary content)"
    assert errors["toxicity:bad_model"] == (f"fastText model {missing} does not exist; give the path of a .bin "
                                            "or .ftz file")

    good = (FIXTURES / "softmax.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:5000])
    (tmp_path / "v99.bin").write_bytes(good[:4] + (99).to_bytes(4, "little") + good[8:])
    report, rejected = _run(tmp_path, "corrupt", f'[[stages]]\nstage = "extract"\n[[stages]]\nstage = "quality"\n'
                                                 f'model = "{tmp_path / "cut.bin"}"\n[[stages]]\nstage = "langid"\n'
                                                 f'model = "{tmp_path / "v99.bin"}"\n')
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["quality"]["rejected"] == {"quality:bad_model": 1} and report["balance"]["balanced"]
    error = next(d.meta["error"] for d in rejected if d.drop == "quality:bad_model")
    assert error.startswith(f"{tmp_path / 'cut.bin'}: truncated fastText file (5000 bytes; ends inside the ")
    assert "\n" not in error
    report, rejected = _run(tmp_path, "version", f'[[stages]]\nstage = "extract"\n[[stages]]\nstage = "langid"\n'
                                                 f'model = "{tmp_path / "v99.bin"}"\n')
    assert {s["name"]: s["rejected"] for s in report["stages"]}["langid"] == {"langid:bad_model": 1}
    assert [d.meta["error"] for d in rejected if d.drop == "langid:bad_model"] == [
        f"{tmp_path / 'v99.bin'}: fastText file format version 99 is not supported (supported: 11, 12)"]
    assert json.loads((tmp_path / "version" / "report.json").read_text())["balance"]["balanced"]

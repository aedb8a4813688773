"""The stage registry: the names a pipeline TOML file uses, each with its config class and function.

Map stages run per shard in parallel; global stages need the whole corpus at once (dedup) and run
between map phases. `tokenize` should come last: it writes the token shards the trainer reads.
"""

from __future__ import annotations

from typing import Any

from lmforge.config import from_dict
from lmforge.data import (bloom, c4, classifier, decontam, exact, extract, fasttext_stages, fineweb, gopher,
                          langid, minhash, mix, perplexity, pii, tokenize)
from lmforge.data.stage import StageSpec
from lmforge.errors import ConfigError

STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("extract", extract.ExtractConfig, extract.extract, "map",
              "HTML bytes -> main text (resiliparse + rules, or trafilatura)"),
    StageSpec("langid", langid.LangIdConfig, langid.langid, "map", "language label/score; keep languages",
              check=langid.check_langid, reads=fasttext_stages.model_files),
    StageSpec("pii", pii.PIIConfig, pii.pii, "map", "mask e-mails, phones, IPv4/IPv6"),
    StageSpec("gopher", gopher.GopherConfig, gopher.gopher, "map", "Gopher quality + repetition rules"),
    StageSpec("c4", c4.C4Config, c4.c4, "map", "C4 line and page rules", reads=c4.bad_words_files),
    StageSpec("fineweb", fineweb.FineWebConfig, fineweb.fineweb, "map", "FineWeb extra rules"),
    StageSpec("perplexity", perplexity.PerplexityConfig, perplexity.perplexity_filter, "map",
              "CCNet-style LM perplexity score/filter", reads=perplexity.perplexity_files),
    StageSpec("quality", classifier.QualityConfig, classifier.quality, "map",
              "hashed n-gram or fastText classifier score/filter (DCLM)",
              check=classifier.quality_model, reads=classifier.quality_files),
    StageSpec("toxicity", fasttext_stages.ToxicityConfig, fasttext_stages.toxicity, "map",
              "fastText toxicity classifier score/filter (Dolma Jigsaw)",
              check=fasttext_stages.check_label_filter, reads=fasttext_stages.model_files),
    StageSpec("nsfw", fasttext_stages.NSFWConfig, fasttext_stages.nsfw, "map",
              "fastText NSFW classifier score/filter (Dolma Jigsaw)",
              check=fasttext_stages.check_label_filter, reads=fasttext_stages.model_files),
    StageSpec("decontam", decontam.DecontamConfig, decontam.decontam, "map", "drop eval-set n-gram overlaps",
              check=decontam.check_decontam, reads=decontam.decontam_files,
              loads="its eval sets' n-gram table"),
    StageSpec("mix", mix.MixConfig, mix.mix, "map", "down/up-sample by source weight"),
    StageSpec("tokenize", tokenize.TokenizeConfig, tokenize.tokenize, "map", "write token shards",
              check=tokenize.doc_separator, reads=tokenize.tokenize_files),
    StageSpec("exact_dedup", exact.ExactDedupConfig, exact.exact_dedup, "global", "drop exact duplicates"),
    StageSpec("line_dedup", exact.LineDedupConfig, exact.line_dedup, "global", "drop repeated lines"),
    StageSpec("minhash_dedup", minhash.MinHashConfig, minhash.minhash_dedup, "global",
              "MinHash-LSH near-duplicate removal"),
    StageSpec("bloom_dedup", bloom.BloomDedupConfig, bloom.bloom_dedup, "global",
              "Bloom-filter paragraph/n-gram dedup"),
]}


def build_stage(table: dict[str, Any], index: int = 0) -> tuple[StageSpec, Any]:
    """(spec, config) from one `[[stages]]` table: `stage = "name"` plus that stage's options."""
    opts = dict(table)
    if "stage" not in opts:
        hint = " (`name` is not a stage key)" if "name" in opts else ""
        raise ConfigError(f"stages[{index}] has no `stage` key{hint}; add stage = NAME, NAME one of: "
                          f"{', '.join(STAGES)}")
    name = opts.pop("stage")
    if name not in STAGES:
        raise ConfigError(f"stages[{index}].stage = {name!r} is not a stage; choose one of: {', '.join(STAGES)}")
    spec = STAGES[name]
    return spec, from_dict(spec.config, opts, f"stages[{index}] ({name})")

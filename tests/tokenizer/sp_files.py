"""SentencePiece-style BPE tokenizer.json files built with HF `tokenizers` for the SentencePieceBPE tests: a small
BPE trained on generated Shakespeare-like text, laid out as SentencePiece does (<unk> <s> </s>, the 256 byte
pieces <0x00>..<0xFF>, then the learned pieces), in the Llama 2 layout (normalizer Prepend "▁" + Replace " " -> "▁",
no pre_tokenizer), the Metaspace one (pre_tokenizer Metaspace) or Gemma's (normalizer Replace " " -> "▁", nothing
prepended), decoders Replace / ByteFallback / Fuse / Strip, and Llama 2's post_processor adding <s>."""

from __future__ import annotations

import json
import random
from functools import lru_cache

WORDS = ("the of and to in king queen thou art my lord sweet love death night day speak hear what shall be "
         "café naïve über 日本 東京").split()
SPECIALS = ["<unk>", "<s>", "</s>"]


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".,!?;")
            + rng.choice(["", "\n", "  ", "\n\n"]) for _ in range(n)]


@lru_cache(maxsize=None)
def _build(style: str, prepend: str, split: bool, byte_fallback: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=byte_fallback, fuse_unk=True))
    if style == "llama":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif style == "gemma":  # no "▁" prepended; its Split on " " finds none left after the normalizer
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        prepend = "never"
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=split)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prepend != "never" else [])])
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    doc = json.loads(tok.to_str())
    if byte_fallback:
        vocab, n = doc["model"]["vocab"], len(SPECIALS)
        doc["model"]["vocab"] = {**{s: i for s, i in vocab.items() if i < n},
                                 **{f"<0x{b:02X}>": n + b for b in range(256)},
                                 **{s: i + 256 for s, i in vocab.items() if i >= n}}
    return json.dumps(doc)


def sp_doc(style: str = "llama", prepend: str = "first", split: bool = False, byte_fallback: bool = True) -> dict:
    """A fresh tokenizer.json document (a dict the caller may change)."""
    return json.loads(_build(style, prepend, split, byte_fallback))


def added(doc: dict, content: str, **flags) -> int:
    """Add an added token past the vocabulary (flags: special, normalized, lstrip, rstrip); its id."""
    i = max([*doc["model"]["vocab"].values(), *(t["id"] for t in doc["added_tokens"])]) + 1
    doc["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True, **flags})
    return i


def hf(doc: dict):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(doc))

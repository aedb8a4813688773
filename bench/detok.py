"""Streaming detokenization: host time per token of lmforge.infer.detok.StreamDecoder, side by side in one run.

    python bench/detok.py [--tokens 4000] [--repeat 7]      # a few seconds; needs the `tokenizers` package

Rows (the same text's ids, pushed one at a time, median of --repeat passes; every row's text is checked equal to
decoding all ids at once):
  byte-level BPE, token_bytes     lmforge's own BPE (trained here): each id's bytes into an incremental UTF-8 decoder
  SentencePiece, stream_bytes     SentencePieceBPE on a Llama-2-style tokenizer.json (Replace, ByteFallback, Fuse,
                                  Strip; trained here with `tokenizers`): a token's bytes as first token or not
  SentencePiece, window           the same tokenizer with `streamable` off: a window of recent ids decoded per step
  HF DecodeStream                 `tokenizers.decoders.DecodeStream` on the same tokenizer.json (the library's own)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.infer.detok import StreamDecoder  # noqa: E402
from lmforge.tokenizer.sentencepiece import SentencePieceBPE  # noqa: E402
from lmforge.tokenizer.train import train_bpe  # noqa: E402
from tests.tokenizer.sp_files import corpus, hf, sp_doc  # noqa: E402

TEXT = "The king and the queen of 日本 spoke: “thou art my lord” 😀. "


def per_token(push, ids: list[int], repeat: int) -> tuple[float, str]:
    times, text = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        text = push(ids)
        times.append((time.perf_counter() - start) / len(ids))
    return statistics.median(times) * 1e6, text


def lmforge_stream(tok):
    def push(ids):
        d = StreamDecoder(tok)
        return "".join(d.push(i) for i in ids) + d.flush()
    return push


def hf_stream(ref):
    from tokenizers.decoders import DecodeStream

    def push(ids):
        s = DecodeStream(skip_special_tokens=False)
        return "".join(s.step(ref, i) or "" for i in ids)
    return push


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    sp = SentencePieceBPE(sp_doc())
    window = SentencePieceBPE(sp_doc())
    window.streamable = False
    byte_bpe = train_bpe(iter(corpus(300)), vocab_size=360, progress=False)
    text = TEXT * (args.tokens // 10)
    rows = []
    for name, tok, push in [("byte-level BPE, token_bytes", byte_bpe, lmforge_stream(byte_bpe)),
                            ("SentencePiece, stream_bytes", sp, lmforge_stream(sp)),
                            ("SentencePiece, window", window, lmforge_stream(window)),
                            ("HF DecodeStream (same file)", sp, hf_stream(hf(sp_doc())))]:
        ids = tok.encode(text)[:args.tokens]
        us, got = per_token(push, ids, args.repeat)
        want = tok.decode(ids)
        assert got == want or name.startswith("HF") and got == want.rstrip("\ufffd"), name
        rows.append((name, len(ids), us))
    print("| streaming detokenizer | tokens | us per token |\n|---|---:|---:|")
    for name, n, us in rows:
        print(f"| {name} | {n:,} | {us:.2f} |")


if __name__ == "__main__":
    main()

"""The simplest tokenizer: one id per UTF-8 byte, plus special tokens after 255."""

from __future__ import annotations

from pathlib import Path

from lmforge.utils import write_json_atomic

FILE_NAME = "lmforge_tokenizer.json"

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
"""end-of-text tokens by name: a tokenizer's eot_id is the first its special tokens hold (GPT-2, Qwen2, lmforge-trained:
<|endoftext|>; Llama 3: <|end_of_text|>; Llama 2, Mistral: </s>; Gemma: <eos>), unless its eos_token names one (a HF
directory's tokenizer_config.json eos_token: Llama-3-Instruct's <|eot_id|>, Qwen2-Instruct's <|im_end|>)"""


def end_of_text(specials: dict[str, int], eos_token: str | None = None) -> int | None:
    """The end-of-text id among `specials` (see EOT_NAMES), or None."""
    if eos_token is not None:
        return specials[eos_token]
    return next((specials[s] for s in EOT_NAMES if s in specials), None)


def without_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; like tiktoken, replace them with U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class ByteTokenizer:
    """ids 0..255 are bytes; specials (default `<|endoftext|>`) follow. Decoding never raises:
    invalid UTF-8 and unknown ids (negative, or past the specials) become U+FFFD, as in the BPE Tokenizer."""

    def __init__(self, special_tokens: tuple[str, ...] | list[str] = ("<|endoftext|>",)):
        from lmforge.tokenizer.pretokenize import check_specials

        self.special_tokens = check_specials(special_tokens)  # ("<|eot|>" alone was seven one-character specials)
        self.special_ids = {s: 256 + i for i, s in enumerate(self.special_tokens)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    @property
    def eot_id(self) -> int | None:
        return end_of_text(self.special_ids)

    def encode(self, text: str) -> list[int]:
        return list(without_surrogates(text).encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Raw bytes -> ids, one per byte: bytes that are not valid UTF-8 are kept, not replaced."""
        return list(data)

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        inv = {v: k for k, v in self.special_ids.items()}
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(inv.get(i, "\ufffd"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self, i: int) -> bytes:
        """One token's bytes; an id that is no token gives U+FFFD's, as in `decode`."""
        if 0 <= i < 256:
            return bytes([i])
        return self.special_tokens[i - 256].encode() if 256 <= i < self.vocab_size else "\ufffd".encode()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        target = path / FILE_NAME if path.suffix != ".json" else path
        write_json_atomic(target, {"type": "byte", "special_tokens": self.special_tokens})
        return target

    @classmethod
    def from_dict(cls, d: dict) -> "ByteTokenizer":
        return cls(tuple(d.get("special_tokens", ("<|endoftext|>",))))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def spec(self) -> str:
        return "byte"



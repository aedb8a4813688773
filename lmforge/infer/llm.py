"""LLM: the generation engine's front door.

    llm = LLM(model, tokenizer)            # or LLM.load(checkpoint_dir)
    outs = llm.generate(["Once upon"], SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].outputs   # all n samples

Prompts are validated and tokenized here, batched by `engine.run_batch` (or decoded one at a time by
beam search / speculative decoding when asked), and returned as `RequestOutput`s.
"""

from __future__ import annotations

from typing import Iterator, Sequence as Seq

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.engine import PlainDecoder, Sequence, is_mla, run_batch, supports_padding
from lmforge.infer.outputs import RequestOutput
from lmforge.infer.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate text with any model honouring `model(ids, positions=None, cache=None) -> logits`.

    draft: None, a smaller model sharing the tokenizer, "ngram" (prompt-lookup drafting) or "mtp" (the
    model's own parallel MTP heads) to decode with speculative decoding (one row at a time; see
    lmforge.infer.speculative).
    cuda_graphs: use the CUDA-graph decode path (default: when the model is on a GPU)."""

    def __init__(self, model, tokenizer, *, draft=None, num_draft_tokens: int = 4,
                 cuda_graphs: bool | None = None, max_batch_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.draft = draft.eval() if isinstance(draft, torch.nn.Module) else draft
        self.num_draft_tokens = num_draft_tokens
        self.device = next(model.parameters()).device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.max_batch_size = max_batch_size
        self._graph_decoder = None
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and vocab > model.cfg.vocab_size:
            raise ConfigError(f"tokenizer vocab_size={vocab} is larger than the model's "
                              f"vocab_size={model.cfg.vocab_size}: this tokenizer was not made for this model")
        if draft is not None and draft not in ("ngram", "mtp") and not isinstance(draft, torch.nn.Module):
            raise ConfigError(f"draft must be None, 'ngram', 'mtp' or a model, got {draft!r}")

    @classmethod
    def load(cls, path, device: str = "cpu", *, tokenizer=None, **kwargs) -> "LLM":
        """Open a run or checkpoint directory written by lmforge's trainer. `tokenizer` (an object or a
        spec for lmforge.tokenizer.load.load_tokenizer) replaces or supplies the checkpoint's own."""
        from lmforge.tokenizer.load import load_tokenizer
        from lmforge.train.checkpoint import load_model

        model, saved = load_model(path, device=device)
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer or saved
        if tok is None:
            raise LmforgeError(f"checkpoint {path} holds no tokenizer; pass one (e.g. --tokenizer byte)")
        return cls(model, tok, **kwargs)

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len

    # ---------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> list[int]:
        """Tokenize and validate one prompt (ids are checked against the model's vocabulary)."""
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)
        if not ids:
            raise LmforgeError(f"prompt {index} is empty: give at least one token of text")
        V = self.model.cfg.vocab_size
        bad = [t for t in ids if not 0 <= int(t) < V]
        if bad:
            raise LmforgeError(f"prompt {index} has token id {bad[0]} outside the model's vocabulary [0, {V})")
        if len(ids) >= self.max_seq_len:
            if not params.truncate_prompt:
                raise LmforgeError(f"prompt {index} has {len(ids)} tokens but the context window is "
                                   f"{self.max_seq_len}; shorten it or set truncate_prompt=True")
            ids = ids[-max(1, self.max_seq_len - params.max_tokens):]
        return [int(t) for t in ids]

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | None = None
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt; `params.n` samples each (RequestOutput.outputs)."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [self.encode(p, params, i) for i, p in enumerate(prompts)]
        if is_mla(self.model) and (params.beam_width > 1 or self.draft is not None):
            raise ConfigError("beam search and speculative decoding need a KVCache (rows reordered or "
                              "rewound); MLA models support plain and batched sampling only")
        if params.beam_width > 1:
            from lmforge.infer.beam import beam_search

            return [beam_search(self, p, ids, params) for p, ids in zip(prompts, encoded)]
        if self.draft is not None:
            from lmforge.infer.speculative import speculative_request

            return [speculative_request(self, p, ids, params) for p, ids in zip(prompts, encoded)]
        seqs = [Sequence(ids, index=j, generator=self._generator(params, j))
                for ids in encoded for j in range(params.n)]
        for batch in self._batches(seqs):
            for _ in self._run(batch, params):
                pass
        n = params.n
        return [RequestOutput(p if isinstance(p, str) else None, ids,
                              [s.output(params) for s in seqs[i * n:(i + 1) * n]])
                for i, (p, ids) in enumerate(zip(prompts, encoded))]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one sample as it is produced: complete UTF-8 characters only, and text that
        might begin a stop string is held back until it is known not to."""
        params = params or SamplingParams()
        seq = Sequence(self.encode(prompt, params), generator=self._generator(params, 0))
        emitted = 0
        for _ in self._run([seq], params):
            if seq.finish is not None:
                break
            ready = len(seq.text) - _stop_prefix_len(seq.text, params.stop)
            if ready > emitted:
                yield seq.text[emitted:ready]
                emitted = ready
        if len(seq.text) > emitted:  # the final text, already cut before any stop string
            yield seq.text[emitted:]

    # ---------------------------------------------------------------------------------------------
    def _generator(self, params: SamplingParams, sample_index: int) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(params.seed * 1_000_003 + sample_index)
        return g

    def _batches(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Chunks of at most max_batch_size rows; equal prompt lengths only when the cache cannot pad."""
        groups = [seqs]
        if not supports_padding(self.model):
            by_len: dict[int, list[Sequence]] = {}
            for s in seqs:
                by_len.setdefault(len(s.prompt), []).append(s)
            groups = list(by_len.values())
        return [g[i:i + self.max_batch_size] for g in groups for i in range(0, len(g), self.max_batch_size)]

    def _decoder(self, batch_size: int, max_len: int):
        if self.cuda_graphs and supports_padding(self.model):  # the static cache has no MLA layout yet
            from lmforge.infer.cuda_graph import GraphDecoder

            if self._graph_decoder is None:
                self._graph_decoder = GraphDecoder(self.model, self.max_batch_size, self.max_seq_len)
            return self._graph_decoder.bind(batch_size)
        return PlainDecoder(self.model, batch_size, max_len)

    def _run(self, seqs: list[Sequence], params: SamplingParams):
        longest = max(len(s.prompt) for s in seqs)
        max_len = min(longest + params.max_tokens, self.max_seq_len + longest)
        decoder = self._decoder(len(seqs), max_len)
        return run_batch(decoder, seqs, params, self.tokenizer, vocab_size=self.model.cfg.vocab_size,
                         max_seq_len=self.max_seq_len, device=self.device)


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):  # longest first
            if text.endswith(s[:n]):
                best = n
                break
    return best

"""The static-cache decoder (CUDA-graph path) gives the plain path's tokens; graphs themselves on GPU."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import tiny_model

from lmforge.infer.cuda_graph import GraphDecoder
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams

PROMPTS = ["Hello there", "a", "The quick brown fox", "xyz", "12"]
SP = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


class StaticLLM(LLM):
    """An LLM forced onto the static-cache decoder (eager on CPU)."""

    def _decoder(self, batch_size, max_len):
        return GraphDecoder(self.model, 8, self.max_seq_len, use_graphs=self.cuda_graphs).bind(batch_size)


def test_static_decoder_matches_plain_path(arch, tok):
    model = tiny_model(arch)
    plain = LLM(model, tok, cuda_graphs=False).generate(PROMPTS, SP)
    static = StaticLLM(model, tok, cuda_graphs=False).generate(PROMPTS, SP)
    assert [o.token_ids for o in static] == [o.token_ids for o in plain]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_tokens_match_plain_path(tok):
    model = tiny_model("llama").cuda()
    plain = LLM(model, tok, cuda_graphs=False).generate(PROMPTS, SP)
    graphs = LLM(model, tok, cuda_graphs=True).generate(PROMPTS, SP)  # bucket 8 for 5 rows
    assert [o.token_ids for o in graphs] == [o.token_ids for o in plain]

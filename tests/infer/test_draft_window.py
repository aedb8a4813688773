"""A draft model whose context window is shorter than the target's (a smaller max_seq_len, or a target served past
its own with EngineConfig.max_model_len) is served as far as the target: its block tables and RoPE tables are
widened (on static-buffer / CUDA-graph steps its tables were cut at its own width and the step crashed), and one
whose learned position embeddings cannot reach that far is refused at engine build with one line."""

from __future__ import annotations

import dataclasses

import pytest

from lmforge.errors import ConfigError
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model

SP = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_draft_with_a_shorter_window_drafts_as_far_as_the_target(graphs):
    target = tiny_model(max_seq_len=128, init_std=0.3)
    draft = Transformer(dataclasses.replace(target.cfg, max_seq_len=32)).eval()
    draft.load_state_dict(target.state_dict())  # the target's weights: every greedy draft must be accepted
    want = LLM(target, ByteTokenizer()).generate("a" * 60, SP)[0].token_ids
    out = LLM(target, ByteTokenizer(), draft=draft, num_draft_tokens=3, cuda_graphs=graphs).generate("a" * 60, SP)[0]
    assert out.token_ids == want
    assert out.metrics["drafted"] > 0 and out.metrics["acceptance_rate"] == 1.0


def test_a_draft_whose_learned_positions_stop_short_is_refused():
    target, draft = tiny_model("gpt2", max_seq_len=128), tiny_model("gpt2", max_seq_len=32, seed=1)
    with pytest.raises(ConfigError, match=r"^the target's context window=128 is past the model's max_seq_len=32, "
                                          r"but its LearnedPositions cover 32 positions only; use a draft model"):
        LLM(target, ByteTokenizer(), draft=draft, num_draft_tokens=3)

"""Serving long contexts: a length-dependent RoPE (dynamic NTK, LongRoPE) gives each token of the engine's step its
own sequence's context length (a sequence's outputs do not depend on its batch or on how its prompt is chunked,
and equal transformers' generate, on CUDA graphs' static buffers too), prefix caching is off for it;
EngineConfig.max_model_len serves a RoPE-scaled model past its max_seq_len."""

from __future__ import annotations

import pytest
import torch

import lmforge as lf
from lmforge.errors import ConfigError
from lmforge.infer.config import EngineConfig
from lmforge.model.config import ModelConfig, RopeScaling
from lmforge.model.transformer import Transformer

from .infer_helpers import tiny_model

LONGROPE = RopeScaling(kind="longrope", factor=4.0, original_max_seq_len=64, short_factor=(1.0,) * 8,
                       long_factor=tuple(1.0 + 0.5 * i for i in range(8)))
# kind -> (model max_seq_len, scaling, EngineConfig.max_model_len): dynamic NTK scales past max_seq_len only
KINDS = {"longrope": (256, LONGROPE, None), "dynamic": (64, RopeScaling(kind="dynamic", factor=2.0), 256)}


def _model(kind: str) -> tuple[Transformer, int | None]:
    max_len, sc, window = KINDS[kind]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, max_seq_len=max_len, rope_scaling=sc,
                      init_std=0.15)
    return Transformer(cfg).eval(), window


def _prompts() -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (20,), generator=g).tolist(), torch.randint(0, 256, (200,), generator=g).tolist()


def _llm(model, window, tok, **kw):
    window = {} if window is None else dict(max_model_len=window)
    return lf.LLM(model, tok, config=EngineConfig(num_kv_tokens=1024, **window, **kw))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_sequence_alone_equals_it_batched_with_a_long_one(kind, tok):
    """The step's tokens are one flat row: its last position (the long prompt's) chose every sequence's frequencies."""
    model, window = _model(kind)
    short, long = _prompts()
    sp = lf.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    alone = _llm(model, window, tok).generate([short], sp)[0]
    batched = _llm(model, window, tok).generate([short, long], sp)[0]
    assert batched.token_ids == alone.token_ids
    assert batched.outputs[0].cumulative_logprob == pytest.approx(alone.outputs[0].cumulative_logprob, abs=1e-4)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_chunked_prefill_prompt_logprobs_equal_one_full_forward(kind, tok):
    """32-token chunks of a 200-token prompt each took their own last position as the context (off by up to 4)."""
    model, window = _model(kind)
    _, long = _prompts()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([long]))[0], -1)
    sp = lf.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
    out = _llm(model, window, tok, max_num_batched_tokens=32).generate([long], sp)[0]
    err = max(abs(out.prompt_logprobs[i][long[i]] - ref[i - 1, long[i]].item()) for i in range(1, len(long)))
    assert err <= 1e-4


def test_prefix_caching_is_off_for_a_length_dependent_rope(tok):
    """A cached prefix's keys carry the frequencies of the sequence that computed them: refused when asked for,
    off by default (a static RoPE keeps it on)."""
    model, _ = _model("longrope")
    assert not _llm(model, None, tok).engine.pool.prefix_caching
    with pytest.raises(ConfigError, match="prefix_caching=True cannot serve RoPE scaling 'longrope'"):
        _llm(model, None, tok, prefix_caching=True)
    assert _llm(tiny_model("llama"), None, tok).engine.pool.prefix_caching
    assert not _llm(tiny_model("llama"), None, tok, prefix_caching=False).engine.pool.prefix_caching


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_graph_steps_carry_each_tokens_rope_length(kind, tok):
    """The decode graphs' and the mixed graphs' static buffers (cuda_graphs=True runs them eagerly on a CPU) hold
    each token's RoPE length: a short sequence decoding beside a long prompt, whose chunks share mixed steps with
    it, gives the eager step's tokens and log-probs (with the lengths of the graphs' placeholders, 1, the long
    factors / NTK base never apply and the outputs differ)."""
    model, window = _model(kind)
    short, long = _prompts()
    sp = lf.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    ref = _llm(model, window, tok, cuda_graphs=False).generate([short, long], sp)
    llm = _llm(model, window, tok, cuda_graphs=True, graph_prefill_tokens=64, max_num_batched_tokens=48)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.rope_row is not None
    out = llm.generate([short, long], sp)
    assert graphs.entries and graphs.mixed_entries  # both kinds of graph step ran
    for a, b in zip(out, ref):
        assert a.token_ids == b.token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)


def _hf_pair(tmp_path, cls: str, max_pos: int, rope: dict):
    """A tiny transformers model with these RoPE parameters and the same model loaded by lmforge."""
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, cls)(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=max_pos, tie_word_embeddings=False,
                                     rope_parameters=dict(rope_theta=10000.0, **rope))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    hf.save_pretrained(tmp_path)
    return hf, Transformer.from_pretrained(tmp_path, dtype=torch.float32).eval()


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


CASES = {
    # generation crosses the original context (64): decoded tokens switch to the long factors, the prompt's keep
    # the short ones (transformers' cached decode)
    "longrope_crossing": ("LlamaConfig", 128, dict(rope_type="longrope", short_factor=[1.0] * 8,
                                                   long_factor=[1.0 + 0.5 * i for i in range(8)],
                                                   original_max_position_embeddings=64), 50, 30, None),
    "dynamic_past_max": ("LlamaConfig", 64, dict(rope_type="dynamic", factor=2.0), 40, 40, 128),
    # max_position_embeddings kept at the original context, as Qwen2.5's YaRN recipe and linear-scaled checkpoints
    "linear_past_max": ("LlamaConfig", 64, dict(rope_type="linear", factor=4.0), 90, 20, 128),
    "qwen2_yarn_past_max": ("Qwen2Config", 64, dict(rope_type="yarn", factor=4.0,
                                                    original_max_position_embeddings=64), 90, 20, 128),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_greedy_equals_transformers_generate(name, tmp_path, tok):
    cls, max_pos, rope, P, n, window = CASES[name]
    hf, ours = _hf_pair(tmp_path, cls, max_pos, rope)
    prompt = torch.randint(0, 257, (P,), generator=torch.Generator().manual_seed(3)).tolist()
    sp = lf.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    out = _llm(ours, window, tok, max_num_batched_tokens=32).generate([prompt], sp)[0]
    assert list(out.token_ids) == _hf_greedy(hf, prompt, n)


def test_max_model_len_sets_the_window(tok):
    model = tiny_model("llama")  # max_seq_len 128, static RoPE: its tables grow to the window
    llm = _llm(model, 300, tok)
    assert llm.engine.max_seq_len == 300 and model.rope.cos_table.shape[0] >= 300
    out = llm.generate([[1] * 250], lf.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert len(out.token_ids) == 20
    small = _llm(tiny_model("llama"), 32, tok)
    assert small.engine.max_seq_len == 32
    with pytest.raises(Exception, match="context window is 32"):
        small.generate([[1] * 40], lf.SamplingParams(max_tokens=1))
    with pytest.raises(ConfigError, match="max_model_len=300 is past the model's max_seq_len=128, but its "
                                          "LearnedPositions cover 128 positions only"):
        _llm(tiny_model("gpt2"), 300, tok)
    with pytest.raises(ConfigError, match="max_model_len must be > 0"):
        EngineConfig(max_model_len=0)


def test_preempted_sequences_recompute_the_frequencies_they_decoded_with(tok):
    """A preempted sequence's prompt and decoded tokens are recomputed as one prefill: each keeps its own length
    (prompt tokens the prompt's, decoded ones position + 1), so the outputs equal an unpreempted run's, here
    crossing LongRoPE's original context (64) while decoding."""
    model, _ = _model("longrope")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (50,), generator=g).tolist() for _ in range(4)]
    sp = lf.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    want = [_llm(model, None, tok).generate([p], sp)[0] for p in prompts]
    tight = lf.LLM(model, tok, config=EngineConfig(num_kv_tokens=256, block_size=16))
    got = tight.generate(prompts, sp)
    assert tight.engine.stats()["preemptions"] > 0
    for w, o in zip(want, got):
        assert o.token_ids == w.token_ids
        assert o.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_captured_graphs_serve_a_length_dependent_rope(kind, tok):
    """The same on a GPU, where the graphs are captured and replayed (the lengths' ops must capture)."""
    model, window = _model(kind)
    model = model.cuda()
    short, long = _prompts()
    sp = lf.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    ref = _llm(model, window, tok, cuda_graphs=False, graph_prefill_tokens=0).generate([short, long], sp)
    llm = _llm(model, window, tok, cuda_graphs=True, graph_prefill_tokens=64, max_num_batched_tokens=48)
    out = llm.generate([short, long], sp)
    graphs = llm.engine.runner.graphs
    assert graphs.failed is None and graphs.failed_mixed is None
    assert any(e.graph is not None for e in graphs.entries.values())
    for a, b in zip(out, ref):
        assert a.token_ids == b.token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=2e-3)

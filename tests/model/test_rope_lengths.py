"""Length-dependent RoPE scaling (dynamic NTK, LongRoPE) follows each token's own context length: per-token
frequencies equal transformers' for that length, and a row of a no-cache batch does not depend on the other rows.
Also the config seams of context extension: a top-level original_max_position_embeddings (Phi-3) as transformers
reads it, LongRoPE factor lists checked against the rotated width."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, RopeScaling
from lmforge.model.layers.rope import RotaryEmbedding, scaled_inv_freq
from lmforge.model.transformer import Transformer

HD, MAX = 16, 64
LONGROPE = RopeScaling(kind="longrope", factor=4.0, original_max_seq_len=32, short_factor=(1.0,) * (HD // 2),
                       long_factor=tuple(1.0 + 0.5 * i for i in range(HD // 2)))
DYNAMIC = RopeScaling(kind="dynamic", factor=2.0)


@pytest.mark.parametrize("sc", [LONGROPE, DYNAMIC], ids=["longrope", "dynamic"])
def test_per_token_lengths_give_each_token_its_own_frequencies(sc):
    rope = RotaryEmbedding(HD, 10000.0, scaling=sc, max_seq_len=MAX)
    positions = torch.tensor([[3, 20, 40], [5, 90, 150]])
    lengths = torch.tensor([[10, 33, 64], [70, 91, 200]])
    cos, sin = rope.cos_sin(positions, lengths=lengths)
    for b in range(2):
        for t in range(3):
            inv, attn = scaled_inv_freq(HD, 10000.0, sc, MAX, int(lengths[b, t]))
            angle = positions[b, t].float() * inv
            torch.testing.assert_close(cos[b, t], angle.cos() * attn, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sin[b, t], angle.sin() * attn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sc", [LONGROPE, DYNAMIC], ids=["longrope", "dynamic"])
def test_a_row_of_a_batch_does_not_depend_on_the_other_rows(sc):
    """Each row's context is its own last position + 1 (it was the batch's: a short row beside a long one took the
    long one's frequencies)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=MAX,
                                    rope_scaling=sc, init_std=0.3)).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([torch.arange(12), torch.arange(100, 112)])
    with torch.no_grad():
        both = model(ids, positions)
        alone = [model(ids[i:i + 1], positions[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(both[0], alone[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(both[1], alone[1][0], rtol=0, atol=1e-6)


def test_longrope_factor_lists_must_match_the_rotated_width():
    bad = RopeScaling(kind="longrope", factor=2.0, original_max_seq_len=32, short_factor=(1.0,) * 8,
                      long_factor=(2.0,) * 8)
    with pytest.raises(ConfigError, match=r"short_factor has 8 entries; .* rope_dim/2 = 4"):
        ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, rope_scaling=bad)
    ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, max_seq_len=64, rope_scaling=bad)  # head_dim 16


def test_top_level_original_context_wins_as_in_transformers():
    from lmforge.model.hf_families import rope_from_hf

    rp = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 64}
    for kind in ("yarn", "llama3", "longrope"):
        d = {"max_position_embeddings": 128, "original_max_position_embeddings": 32,
             "rope_parameters": dict(rp, rope_type=kind, short_factor=[1.0] * 4, long_factor=[2.0] * 4)}
        assert rope_from_hf(d)[1].original_max_seq_len == 32, kind
    d = {"max_position_embeddings": 128, "original_max_position_embeddings": 32,
         "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}
    assert rope_from_hf(d)[1].original_max_seq_len is None  # dynamic NTK reads none (transformers neither)
    d = {"max_position_embeddings": 128, "original_max_position_embeddings": 32,
         "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                             "long_factor": [2.0] * 4}}
    assert rope_from_hf(d)[1].factor == 4.0  # no factor: max_position_embeddings / the top-level original


def test_top_level_original_context_logits_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["original_max_position_embeddings"] = 32  # Phi-3 style: outside rope_parameters
    d["rope_parameters"].pop("original_max_position_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def _cp_rank(rank: int, world: int, sc: RopeScaling) -> float:
    """max |context-parallel logits - one process's| over this rank's tokens of a 128-token sequence."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.cp import apply_cp, load_balanced_positions

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                                    rope_scaling=sc, init_std=0.3)).train()
    x = torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        apply_cp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("cp",)))
        pos = load_balanced_positions(128, rank, world)
        return (model(x[:, pos]) - full[:, pos]).abs().max().item()


@pytest.mark.parametrize("sc", [dataclasses.replace(LONGROPE, original_max_seq_len=100), DYNAMIC],
                         ids=["longrope", "dynamic"])
def test_context_parallel_ranks_use_the_whole_sequence_length(sc):
    """Each rank's tokens take the global sequence's length, 128 (rank 1, holding positions up to 95, took LongRoPE's
    short factors below the original 100 and a smaller NTK base: logits off by several units)."""
    from lmforge.parallel.launch import run_local

    errs = run_local(_cp_rank, 2, sc, timeout=120, start_method="fork")
    assert max(errs) <= 1e-5, errs

"""DeepSeek-V2 checkpoints (V2-Lite and its chat model: full-rank queries, greedy softmax routing) load; the routing
lmforge does not implement is refused by name. Logit parity with transformers: test_hf_parity.py."""

from __future__ import annotations

import pytest

from lmforge.errors import ConfigError
from lmforge.model.hf import config_from_hf, guess_family

V2 = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=48, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
          n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)


def test_deepseek_v2_reads_as_softmax_greedy_routing_and_exports_as_v2():
    cfg = config_from_hf(dict(V2, routed_scaling_factor=16.0, n_group=8, topk_group=3))  # greedy: groups unused
    m = cfg.moe
    assert (m.score, m.norm_topk, m.routed_scale, m.n_groups, m.n_shared, m.dense_layers) == ("softmax", False, 16.0,
                                                                                           1, 2, 1)
    assert (cfg.rope_layout, cfg.mla.q_lora_rank, cfg.max_seq_len) == ("interleaved", 0, 2048)
    assert guess_family(cfg) == "deepseek_v2"


def test_deepseek_v2_group_limited_routing_ranks_groups_by_their_best_expert():
    """topk_method='group_limited_greedy' (refused before): the topk_group groups with the best maximum score."""
    from lmforge.model.hf import config_to_hf

    cfg = config_from_hf(dict(V2, topk_method="group_limited_greedy", n_group=4, topk_group=2))
    m = cfg.moe
    assert (m.n_groups, m.topk_groups, m.group_score, m.score, m.norm_topk) == (4, 2, "max", "softmax", False)
    hf = config_to_hf(cfg, "deepseek_v2")
    assert (hf["topk_method"], hf["n_group"], hf["topk_group"]) == ("group_limited_greedy", 4, 2)


@pytest.mark.parametrize("change, match", [
    (dict(topk_method="noaux_tc", n_group=8, topk_group=3), "topk_method='noaux_tc' is not supported for "
                                                            "DeepSeek-V2"),
    (dict(norm_topk_prob=True), "norm_topk_prob=true is not supported for DeepSeek-V2"),
    (dict(attention_bias=True), "attention_bias=true is not supported for DeepSeek-V2")])
def test_deepseek_v2_routing_lmforge_lacks_is_refused(change, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf(dict(V2, **change))

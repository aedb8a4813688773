"""Seeded random training configurations: architecture (MHA/GQA/MQA or MLA, dense or MoE, multi-token prediction, norm
placement, parallel blocks, position kinds, soft-caps, sliding windows, sinks, dropout, z-loss) x optimizer (every
lmforge optimizer) x loop (gradient accumulation, fp32/bf16, eval and checkpoint periods). Each run is stopped by a
Ctrl-C at a random step and resumed in its run directory: the run's metrics.jsonl rows (losses and validation losses)
equal the uninterrupted run's, row for row and bit for bit, and every one is finite. For fp32 runs without dropout
the final checkpoint is then opened with LLM.load and the engine's greedy tokens equal a full-recompute argmax loop.

A broad guard over combinations no targeted test names. ~420 such configurations run by hand on 2026-12-05 (this
sweep plus the post-training one, tests/align/test_posttrain_random.py) found Adafactor stepping NaN on a zero
gradient (tests/optim/test_optim_reference.py) and, through an interrupt raised after an evaluation step's update,
two lost metrics rows: that step's evaluation and an on_log hook's row (tests/train/test_interrupts.py). fp32/bf16 on
CPU."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from lmforge.model.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig
from lmforge.optim.config import OptimConfig
from lmforge.train.config import DataConfig
from lmforge.train.trainer import Trainer

from .helpers import fit_interrupted_at, make_shard, metric_rows, tiny_config

OPTIMIZERS = ("adamw", "muon", "lion", "adafactor", "soap", "shampoo", "dion")


def random_model(r: random.Random) -> ModelConfig:
    H, hd = r.choice([2, 4]), r.choice([8, 16])
    m = dict(vocab_size=257, d_model=H * hd if r.random() < 0.7 else 48, n_layers=r.choice([1, 2, 3]), n_heads=H,
             head_dim=hd, max_seq_len=32, n_kv_heads=r.choice([None, 1, H]),
             pos_emb=r.choice(["rope", "rope", "learned", "none"]), norm=r.choice(["rmsnorm", "layernorm"]),
             norm_position=r.choice(["pre", "pre", "post", "sandwich"]), block=r.choice(["sequential", "parallel"]),
             attn_softcap=r.choice([0.0, 0.0, 20.0]), sliding_window=r.choice([0, 0, 8]),
             activation=r.choice(["swiglu", "gelu", "relu2", "geglu"]), tie_embeddings=r.random() < 0.3,
             logit_softcap=r.choice([0.0, 15.0]), z_loss=r.choice([0.0, 1e-4]), dropout=r.choice([0.0, 0.0, 0.1]),
             bias=r.random() < 0.2)
    if m["block"] == "parallel":  # its one shared pre-norm takes no other placement (ModelConfig refuses it)
        m["norm_position"] = "pre"
    if r.random() < 0.25:  # MLA (no sinks, no qk-norm: refused with it)
        m.update(attention="mla", pos_emb="rope", n_kv_heads=None,
                 mla=MLAConfig(kv_lora_rank=r.choice([8, 16]), q_lora_rank=r.choice([0, 16]), qk_nope_head_dim=8,
                               qk_rope_head_dim=r.choice([4, 8]), v_head_dim=8))
        del m["head_dim"]
    else:
        m.update(qk_norm=r.random() < 0.3, attn_sinks=r.random() < 0.2)
        if m["pos_emb"] == "rope" and r.random() < 0.2:
            m["rope_layout"] = "interleaved"
    if r.random() < 0.3:
        n = r.choice([2, 4])
        m.update(mlp="moe", moe=MoEConfig(n_experts=n, top_k=r.choice([1, 2]), d_expert=16, n_shared=r.choice([0, 1]),
                                          score=r.choice(["softmax", "sigmoid"])))
    if r.random() < 0.2:
        m["mtp"] = MTPConfig(kind=r.choice(["sequential", "parallel"]), depth=r.choice([1, 2]))
    return ModelConfig(**m)


def _engine_matches_recompute(run) -> None:
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams

    llm = LLM.load(run)
    prompts = [[97, 98, 99], [116, 104, 101, 32]]
    for prompt, out in zip(prompts, llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                logits = llm.model(torch.tensor([ids]))
                ids.append(int((logits[0] if isinstance(logits, tuple) else logits)[0, -1].argmax()))
        assert list(out.outputs[0].token_ids) == ids[len(prompt):]


@pytest.mark.parametrize("seed", range(40))
def test_a_random_training_run_resumes_bit_exactly(seed, tmp_path):
    r = random.Random(seed)
    shard = make_shard(tmp_path / "t.bin")
    steps = r.randint(4, 8)
    cfg = tiny_config(shard, tmp_path / "a", model=random_model(r), max_steps=steps,
                      data=DataConfig(train=(str(shard),), seq_len=32, batch_size=r.choice([2, 4])),
                      optim=OptimConfig(name=r.choice(OPTIMIZERS), lr=r.choice([1e-3, 3e-3]),
                                        warmup_steps=r.choice([0, 2])),
                      eval_every=r.choice([3, 100]), eval_batches=2, log_every=r.choice([1, 2]),
                      ckpt_every=r.choice([3, 100]), grad_accum=r.choice([1, 2]), seed=r.randint(0, 9),
                      dtype=r.choice(["fp32", "fp32", "bf16"]))
    stop = r.randint(1, steps - 1)
    full = metric_rows(Trainer(cfg).fit())
    assert all(math.isfinite(x) for row in full for x in row[1:] if x is not None)
    again = dataclasses.replace(cfg, run_dir=str(tmp_path / "b"))
    fit_interrupted_at(Trainer(again), stop)
    resumed = metric_rows(Trainer(again).fit())
    assert resumed == full  # row for row, bit for bit
    if cfg.dtype == "fp32" and cfg.model.dropout == 0:
        _engine_matches_recompute(tmp_path / "a")

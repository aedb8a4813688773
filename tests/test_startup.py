"""What a process pays before it does anything: importing the model and kernel modules does not import
torch._dynamo (with sympy and triton, ~2 s of CPU), and the functions kept out of torch.compile's graph
(lmforge.utils.compiler_disable) still break it where @torch.compiler.disable did."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from lmforge.kernels import decode, flash_attention, fused_ce
from lmforge.model.layers import moe
from lmforge.utils import compiler_disable

_IMPORTS = r"""
import json, sys
import lmforge.model.transformer, lmforge.model.layers.moe, lmforge.infer.llm, lmforge.checkpoint
import lmforge.kernels.decode, lmforge.kernels.flash_attention, lmforge.kernels.fused_ce
import torch
x = torch.randn(5, 16)
assert torch.allclose(lmforge.model.layers.moe.grouped_mm_loop(x, torch.ones(2, 3, 16), torch.tensor([2, 3])),
                      x.sum(-1, keepdim=True).expand(5, 3), atol=1e-5)  # run eagerly, as it is
print(json.dumps(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)))
"""


def test_loading_the_model_and_kernel_modules_imports_no_dynamo():
    """@torch.compiler.disable at module level imported torch._dynamo, sympy and triton in every process that
    loaded a model (2.2 s), whether it compiled or not; a decorated function called eagerly imports none either."""
    r = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


DECORATED = [(moe, "grouped_mm_loop"), (flash_attention, "flash_attention"), (fused_ce, "_eager_head"),
             (decode, "fallback_notice")]


@pytest.mark.parametrize("module, name", DECORATED, ids=[n for _, n in DECORATED])
def test_the_functions_kept_out_of_the_graph_are_compiler_disabled(module, name):
    assert getattr(module, name).__code__ is compiler_disable(len).__code__


def _drivers():
    """(module, name, function calling it between traced ops, its arguments) for the decorated functions that
    run on the CPU (flash_attention is a GPU kernel)."""
    g = torch.Generator().manual_seed(0)
    x, w, counts = torch.randn(7, 16, generator=g), torch.randn(3, 8, 16, generator=g), torch.tensor([2, 0, 5])
    h, head, y = torch.randn(6, 16, generator=g), torch.randn(30, 16, generator=g), torch.tensor([1, 2, -100, 4, 5, 29])
    return [
        (moe, "grouped_mm_loop", lambda x, w, c: moe.grouped_mm_loop(x.relu(), w, c).sin() * 2, (x, w, counts)),
        (fused_ce, "_eager_head", lambda h, W, y: fused_ce._eager_head(h * 1.5, W, y, 1e-2, None)[0].exp(),
         (h, head, y)),
        (decode, "fallback_notice", lambda x: (x.cos(), decode.falls_back(x.device, "fused test"), x.sin())[::2],
         (x,)),
    ]


def _explain(fn, args):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_count, ex.graph_break_count, [frame.name for frame in ex.break_reasons[0].user_stack]


@pytest.mark.parametrize("i", range(3), ids=["grouped_mm_loop", "_eager_head", "fallback_notice"])
def test_compiled_callers_break_the_graph_where_torch_compiler_disable_did(monkeypatch, i):
    """Compiled (aot_eager), a caller of each function gives its eager result with the function run eagerly,
    in two graphs around one break at the call, as with @torch.compiler.disable."""
    import torch._dynamo

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch references on the CPU
    module, name, driver, args = _drivers()[i]
    lazy = getattr(module, name)
    traced = []  # whether each call of the function ran inside Dynamo's tracing

    def spy(*a):
        traced.append(torch.compiler.is_compiling())
        return lazy.__wrapped__(*a)

    monkeypatch.setattr(module, name, compiler_disable(spy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback notices
        want = driver(*args)
        traced.clear()
        ours = _explain(driver, args)
        torch._dynamo.reset()
        got = torch.compile(driver, backend="aot_eager")(*args)
        assert traced == [False, False]  # explain's call and the compiled one: run eagerly, never traced
        monkeypatch.setattr(module, name, torch.compiler.disable(lazy.__wrapped__))
        theirs = _explain(driver, args)
    torch.testing.assert_close(got, want)
    assert ours[:2] == theirs[:2] == (2, 1)
    assert ours[2] == [*theirs[2], "call"]  # at the same call, inside compiler_disable's wrapper


_CONFIGS = r"""
import json, sys
from lmforge.align.config import OBJECTIVES, config_class
from lmforge.cli.common import parse_config
got = {}
for name in OBJECTIVES:
    beta = [f"--{name}.beta", "0.2"] if name in ("dpo", "kto", "orpo") else []
    cfg = parse_config(config_class(name), ["--init", "runs/x", "--lora.r", "4", *beta], prog="t", description="")
    got[name] = [cfg.objective, cfg.lora.r, getattr(getattr(cfg, name), "beta", None)]
print(json.dumps([got, sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))]))
"""


def test_post_training_configs_parse_without_torch():
    """Every post-training command's config (its objective's options, [data], [lora], [parallel]) builds and
    parses in a process that never imports torch: `lmforge sft --help` took 3.4 s, 2.7 s of it torch's import."""
    import json

    r = subprocess.run([sys.executable, "-c", _CONFIGS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got, torch_modules = json.loads(r.stdout)
    assert got == {"sft": ["sft", 4, None], "dpo": ["dpo", 4, 0.2], "rm": ["rm", 4, None],
                   "distill": ["distill", 4, 0.5], "kto": ["kto", 4, 0.2], "orpo": ["orpo", 4, 0.2]}
    assert torch_modules == []


def test_the_configs_keep_their_old_import_paths_and_one_table_each():
    from lmforge import adapt
    from lmforge.adapt import lora
    from lmforge.align import config, data, distill, dpo, frozen, kto, losses, orpo, reward, sft
    from lmforge.train import posttrain

    assert (sft.SFTConfig, dpo.DPOConfig, kto.KTOConfig, orpo.ORPOConfig, reward.RewardConfig, distill.DistillConfig,
            data.PostDataConfig, lora.LoRAConfig, adapt.LoRAConfig) == (
        config.SFTConfig, config.DPOConfig, config.KTOConfig, config.ORPOConfig, config.RewardConfig,
        config.DistillConfig, config.PostDataConfig, lora.LoRAConfig, lora.LoRAConfig)
    assert (posttrain.PostTrainConfig, posttrain.OBJECTIVES, posttrain.config_class, frozen.check_beta) == (
        config.PostTrainConfig, config.OBJECTIVES, config.config_class, config.check_beta)
    assert losses.PAIR_LOSSES is config.PAIR_LOSSES and distill.DIVERGENCES is config.DIVERGENCES
    assert frozen.FROZEN_DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert list(frozen.FROZEN_DTYPES) == list(config.FROZEN_DTYPE_NAMES)
    for name, spec in config.OBJECTIVES.items():  # the registry names the options its objective builds from
        assert spec.config is config.resolve(spec.path).Config, name


_MOE_FORWARD = r"""
import json, sys
import torch
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.transformer import Transformer
cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=8, mlp="moe",
                  moe=MoEConfig(n_experts=4, top_k=2, d_expert=8))
Transformer(cfg)(torch.randint(0, 32, (1, 5)))
print(json.dumps("triton" in sys.modules))
"""


def test_an_moe_forward_on_cpu_imports_no_triton():
    """model.moe.gemm='auto' on a CPU tensor picks the loop without asking whether Triton's kernel is available
    (lmforge.kernels.decode imports triton, ~0.6 s, on an MoE model's first forward)."""
    r = subprocess.run([sys.executable, "-c", _MOE_FORWARD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "false"

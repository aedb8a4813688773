"""The batch-1 Triton kernel decode step (lmforge/infer/kernel_step.py) computes the model's decode step:
on its own over a paged cache, the model's full-forward logits; as the engine's backend
(lmforge.infer.graphs.BatchOneKernel), the full-recompute reference's greedy tokens and log-probabilities;
and it never changes the model it is given. On CPU the kernels run in Triton's interpreter
(tests/conftest.py), on a GPU for real (and inside a CUDA graph)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.detok import IdTokenizer
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kernel_step import KernelStep, PagedKV, unsupported
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.kernels.decode import available
from lmforge.kernels.tuning import KernelConfigs

from .infer_helpers import full_greedy, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _snapshot(model) -> tuple:
    """What 'unchanged' means: the same Parameter objects under the same names, equal values, the same
    state_dict keys and the unfused modules still in place."""
    params = {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()}
    return params, sorted(model.state_dict()), [b.attn.wqkv is None and b.mlp.gate_up is None for b in model.blocks]


def _assert_unchanged(model, snap) -> None:
    params, keys, unfused = snap
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (ident, value) in params.items():
        assert id(now[n]) == ident and torch.equal(now[n].detach(), value), n
    assert sorted(model.state_dict()) == keys
    assert [b.attn.wqkv is None and b.mlp.gate_up is None for b in model.blocks] == unfused == [True] * len(unfused)


@pytest.mark.parametrize("kv_heads,async_scheduling,qk_norm", [(1, False, False), (4, False, False),
                                                                (1, True, False), (2, True, True)])
def test_engine_kernel_step_matches_the_full_recompute(kv_heads, async_scheduling, qk_norm):
    """The engine's one-sequence decode steps on the kernel step (block size 4: the table spans blocks)
    give the reference's greedy tokens and, within float tolerance, its log-probabilities; also with
    async scheduling, where each decode's input token is copied from the previous step's sample, and
    for a QK-norm model (Qwen3)."""
    model = tiny_model("llama", n_heads=4, n_kv_heads=kv_heads, d_model=64, head_dim=16, qk_norm=qk_norm).to(DEV)
    snap = _snapshot(model)
    prompt = torch.randint(0, 257, (9,), generator=torch.Generator().manual_seed(kv_heads)).tolist()
    config = EngineConfig(kernel_step=True, block_size=4, async_scheduling=async_scheduling)
    llm = LLM(model, IdTokenizer(257), config=config)
    backend = llm.engine.runner.kernel_step
    backend.step.configs = _coarse(backend.step)
    steps = []
    run = backend.run
    backend.run = lambda batch, late=None: steps.append(late is not None) or run(batch, late)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=1, ignore_eos=True))[0]
    assert steps == [async_scheduling] * 4 and backend.failed is None  # every decode (the first token: prefill)
    assert out.token_ids == full_greedy(model, prompt, 5)
    ids = prompt + out.token_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids], device=DEV))[0].log_softmax(-1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(want, abs=1e-4)
    _assert_unchanged(model, snap)


def test_engine_kernel_step_follows_each_sequence_block_table():
    """The batch-1 backend copies a sequence's block table only when it differs from the one last copied:
    sequences served one after another (other blocks, and with prefix caching some shared ones) and a
    sequence growing into new blocks each get their own keys. Every request's greedy tokens equal the
    reference's."""
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).to(DEV)
    llm = LLM(model, IdTokenizer(257), config=EngineConfig(kernel_step=True, block_size=4, async_scheduling=True))
    backend = llm.engine.runner.kernel_step
    backend.step.configs = _coarse(backend.step)
    g = torch.Generator().manual_seed(11)
    # prompts of 11 and 7 tokens: each request's three decodes (the interpreter's cost) start one position before
    # a block boundary, so the second moves into a new block and the third reads the keys written there
    a, b = (torch.randint(0, 257, (n,), generator=g).tolist() for n in (11, 7))
    copies = []
    for prompt in (a, b, a[:8] + b[:3], a):  # the third shares a's first two blocks (prefix cache)
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
        assert out.token_ids == full_greedy(model, prompt, 4)
        copies.append(list(backend.written))
    assert backend.failed is None
    assert copies[0] != copies[1]  # the second request's blocks were written


def _paged_kv(model, n_positions: int, block_size: int, seed: int) -> PagedKV:
    """A pool with more blocks than the sequence needs, handed out in shuffled order."""
    c = model.cfg
    need = -(-n_positions // block_size)
    pool = need + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(pool, generator=g)[:need + 1].to(torch.int32)[None].to(DEV)  # one spare column
    new = lambda: torch.randn(pool, block_size, c.kv_heads, c.hd, generator=g).to(DEV)  # noqa: E731
    return PagedKV(k=[new() for _ in range(c.n_layers)], v=[new() for _ in range(c.n_layers)], block_table=table)


# the five kernels: GQA with Mistral / gpt-oss attention (windows, sinks, soft-caps), Qwen3; the persistent layer: GQA,
# and MQA with that attention (the five kernels' MQA and MHA: the engine test above)
@pytest.mark.parametrize("arch,persistent", [
    (dict(n_kv_heads=2, sliding_window=3, attn_sinks=True, attn_softcap=3.0), False),
    (dict(n_kv_heads=2, qk_norm=True, tie_embeddings=True, d_model=48), False),  # Qwen3: heads x hd != d_model
    (dict(n_kv_heads=2), True),
    (dict(n_kv_heads=1, sliding_window=3, attn_sinks=True, attn_softcap=3.0, d_model=48), True),
])
def test_kernel_step_on_paged_cache_matches_the_full_forward(arch, persistent):
    """step(token, position) token by token = the model's logits at every position of one forward; with
    the five kernels per layer and with the persistent one-launch layer (lmforge.kernels.decode_layer)."""
    model = tiny_model("llama", **{"n_heads": 4, "d_model": 64, "head_dim": 16, **arch}).to(DEV)
    with torch.no_grad():
        for b in model.blocks:
            if b.attn.sinks is not None:
                b.attn.sinks.normal_()
            if b.attn.q_norm is not None:  # gains away from 1, so that a gain read from the wrong place shows
                b.attn.q_norm.weight.normal_(1.0, 0.3)
                b.attn.k_norm.weight.normal_(1.0, 0.3)
    snap = _snapshot(model)
    ids = torch.randint(0, 257, (1, 8), generator=torch.Generator().manual_seed(2)).to(DEV)
    with torch.no_grad():
        want = model(ids)[0]  # (T, V)
    step = KernelStep(model, _paged_kv(model, 8, 4, seed=3), persistent=persistent)
    step.configs = _coarse(step)
    got = [step.step(ids[0, t:t + 1], torch.tensor([t], device=DEV)).clone() for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=1e-4)
    _assert_unchanged(model, snap)
    # the kernels read the model's own weights: no stacked copy exists
    assert step.layers[0][1][0].data_ptr() == model.blocks[0].attn.wq.weight.data_ptr()
    assert step.layers[0][4][1].data_ptr() == model.blocks[0].mlp.up.weight.data_ptr()


def _coarse(step: KernelStep) -> KernelConfigs:
    """Few programs per kernel (the interpreter's time grows with them); two attention slices."""
    pick = {"gemv": (32, 256, 8), "add": (8, 1024, 8, 1), "qkv_rope": (8, 512, 4), "attend": (2, 16, 4),
            "layer": (8, 16, 16, 16, 64, 2, 16, 4, 1, 1, 1)}
    configs = KernelConfigs()
    for key in step.keys():
        configs = configs.with_config(key, pick[key[0]])
    return configs


def test_tune_contexts_are_clamped_and_bad_ones_named():
    """KernelStep.tune's key counts: sorted, distinct, clamped to the cache; empty or non-positive ones refused
    with the value named (the check runs before the GPU check, so it holds on CPU too)."""
    from lmforge.infer.kernel_step import TUNE_CONTEXTS, tune_contexts

    assert tune_contexts(TUNE_CONTEXTS, 4096) == [512, 2048]
    assert tune_contexts((2048, 512, 4096), 1024) == [512, 1024] and tune_contexts(300, 8192) == [300]
    for bad in ((), (0, 512), (512.0,), (True,)):
        with pytest.raises(LmforgeError, match="positive key counts"):
            tune_contexts(bad, 4096)
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).to(DEV)
    with pytest.raises(LmforgeError, match="got \\(\\)"):
        KernelStep(model, _paged_kv(model, 4, 4, seed=1)).tune(contexts=())


def test_persistent_mode_keys_and_refusals():
    """The persistent mode looks up one layer shape and the head; QK-norm models are refused in it."""
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).to(DEV)
    kv = _paged_kv(model, 4, 4, seed=1)
    step = KernelStep(model, kv, persistent=True)
    assert [k[0] for k in step.keys()] == ["layer", "gemv"]
    for key, candidates in step.keys().items():  # every candidate can be saved in a KernelConfigs set
        for c in candidates:
            KernelConfigs().with_config(key, c)
    assert [k[0] for k in KernelStep(model, kv, persistent=False).keys()] == ["qkv_rope", "attend", "add", "gemv",
                                                                             "add", "gemv"]
    qwen = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16, qk_norm=True).to(DEV)
    with pytest.raises(LmforgeError, match="QK-norm"):
        KernelStep(qwen, kv, persistent=True)
    assert not KernelStep(qwen, kv).persistent  # the default falls back to the five kernels


def test_unsupported_models_are_named_and_refused():
    gpt2 = tiny_model("gpt2")
    assert "RMSNorm" in unsupported(gpt2) or "positions" in unsupported(gpt2) or "biases" in unsupported(gpt2)
    assert unsupported(tiny_model("llama")) is None and unsupported(tiny_model("llama", qk_norm=True)) is None
    assert unsupported(tiny_model("llama", qkv_bias=True)) == "biases"
    assert unsupported(tiny_model("llama", o_bias=True)) == "biases"  # (an attention output bias alone too)
    assert unsupported(tiny_model("llama", norm_offset=1.0)) == "offset norm gains (Gemma's 1 + w)"
    with pytest.raises(ConfigError, match="kernel step cannot run"):
        Engine(gpt2, IdTokenizer(257), EngineConfig(kernel_step=True))
    assert Engine(gpt2, IdTokenizer(257)).runner.kernel_step is None  # auto: the general path


def test_kernel_step_true_on_a_gpu_older_than_ampere_is_refused(monkeypatch):
    """The automatic choice (kernel_step=None) takes the kernel step on compute capability >= 8.0 only, but
    kernel_step=True on a Turing GPU was taken: refused in one line naming the GPU and its capability."""
    import lmforge.kernels.decode as kd
    from lmforge.infer.config import use_kernel_step

    cuda, model = torch.device("cuda"), tiny_model("llama")
    monkeypatch.setattr(kd, "unavailable", lambda device: None)  # (Triton's own check: a GPU it can run on)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ConfigError, match=r"^kernel_step=True, but the batch-1 kernel step cannot run: it needs a GPU "
                                          r"of compute capability >= 8.0 \(Ampere\), and Tesla T4 has 7.5$"):
        use_kernel_step(EngineConfig(kernel_step=True), model, cuda)
    assert use_kernel_step(EngineConfig(), model, cuda) is False  # the automatic choice, as before
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert use_kernel_step(EngineConfig(kernel_step=True), model, cuda) is True
    assert use_kernel_step(EngineConfig(), model, cuda) is True


def test_kernel_step_on_a_cpu_is_off_unless_asked_and_runs_only_in_the_interpreter(monkeypatch):
    """What docs/inference.md says (it said "never on a CPU"): the automatic choice is off on a CPU; True runs there
    under TRITON_INTERPRET=1 (Triton's interpreter, as these tests run it) and is refused in one line without it."""
    from lmforge.infer.config import use_kernel_step

    cpu, model = torch.device("cpu"), tiny_model("llama")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_kernel_step(EngineConfig(), model, cpu) is False
    assert use_kernel_step(EngineConfig(kernel_step=True), model, cpu) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match=r"^kernel_step=True, but the batch-1 kernel step cannot run: it needs a CUDA "
                                          r"GPU and Triton \(TRITON_INTERPRET=1 runs the kernels on CPU, for tests\), "
                                          r"got device cpu$"):
        use_kernel_step(EngineConfig(kernel_step=True), model, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times CUDA graphs")
def test_tuning_saves_configs_and_keeps_the_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path))
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).cuda()
    ids = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        want = model(ids)[0]
    step = KernelStep(model, _paged_kv(model, 9, 16, seed=4), autotune=True)
    step.tune(max_candidates=2)  # what capture() does on first use, with fewer candidates
    assert list(tmp_path.glob("*.json")) and KernelStep(model, step.kv).configs == step.configs  # loaded
    step.capture()
    got = [step.replay(ids[0, t:t + 1], torch.tensor([t], device="cuda")).clone() for t in range(9)]
    torch.testing.assert_close(torch.cat(got).float(), want.float(), atol=1e-3, rtol=1e-3)


def test_engine_tunes_the_kernel_step_on_first_use_for_real_sized_models(monkeypatch):
    """EngineConfig.kernel_tune reaches the kernel step as its autotune flag: None = for models of at least
    KERNEL_TUNE_MIN_PARAMS parameters, True / False as given; a non-bool is refused with its name."""
    from lmforge.infer import config as engine_config
    from lmforge.infer import kernel_step as ks

    seen = []

    class Recording(ks.KernelStep):
        def __init__(self, model, kv, **kw):
            seen.append(kw.get("autotune"))
            super().__init__(model, kv, **kw)

    monkeypatch.setattr(ks, "KernelStep", Recording)
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).to(DEV)
    n = sum(p.numel() for p in model.parameters())
    for tune, threshold, want in ((None, n + 1, False), (None, n, True), (True, n + 1, True), (False, n, False)):
        monkeypatch.setattr(engine_config, "KERNEL_TUNE_MIN_PARAMS", threshold)
        Engine(model, IdTokenizer(257), EngineConfig(kernel_step=True, kernel_tune=tune, block_size=4))
        assert seen.pop() is want
    with pytest.raises(ConfigError, match="kernel_tune = 1: expected true or false"):
        EngineConfig(kernel_tune=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="capture() records a CUDA graph")
def test_autotune_runs_once_at_the_first_capture_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path))
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).cuda()
    step = KernelStep(model, _paged_kv(model, 9, 16, seed=4), autotune=True)
    calls = []
    monkeypatch.setattr(step, "tune", lambda **kw: calls.append(kw) or setattr(step, "autotune", False))
    step.capture()
    step.capture()
    err = capsys.readouterr().err
    assert calls == [{"progress": True}] and "tuning the batch-1 decode kernels" in err and "kernels tuned in" in err
    assert KernelStep(model, step.kv, configs=step.configs, autotune=True).autotune is False  # given configs: no tune


def test_a_cache_that_cannot_be_written_is_warned_about_not_fatal(tmp_path, monkeypatch):
    """A tune whose set cannot be saved (read-only home) keeps the set in use and warns, naming the fix."""
    from lmforge.infer.kernel_step import save_or_warn

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(blocker / "kernels"))  # a directory under a file
    with pytest.warns(UserWarning, match="not saved .* LMFORGE_KERNEL_CACHE"):
        save_or_warn(KernelConfigs(gpu="NVIDIA H200", model="llama-x"))


def test_lora_adapters_keep_the_kernel_step_off_and_the_tokens_right():
    """The kernels read each projection's bare weight, so a model with unmerged LoRA adapters must not run
    on them (its B A would be dropped silently): unsupported() names the layer and the fix, kernel_step=True
    is refused, and adapters applied after the engine was built turn the step off at update_weights (with a
    warning) - the general path then gives the adapted model's greedy tokens; merged, the step comes back."""
    from lmforge.adapt.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora

    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).to(DEV)
    prompt = torch.randint(0, 257, (9,), generator=torch.Generator().manual_seed(7)).tolist()
    llm = LLM(model, IdTokenizer(257), config=EngineConfig(kernel_step=True, block_size=4))
    llm.engine.runner.kernel_step.step.configs = _coarse(llm.engine.runner.kernel_step.step)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert llm.generate(prompt, greedy)[0].token_ids == full_greedy(model, prompt, 4)

    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("wq", "wo", "down")))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)  # a real update (B starts at zero)
    assert "blocks.0.attn.wq is a LoRALinear" in unsupported(model) and "merge_lora" in unsupported(model)
    with pytest.raises(ConfigError, match="LoRALinear, not a plain nn.Linear"):
        Engine(model, IdTokenizer(257), EngineConfig(kernel_step=True))
    with pytest.warns(UserWarning, match="kernel step is off"):
        llm.engine.update_weights()
    assert llm.engine.runner.kernel_step is None
    want = full_greedy(model, prompt, 4)
    assert llm.generate(prompt, greedy)[0].token_ids == want
    merge_lora(model)  # plain Linears again: the next rebuild puts the kernel step back, same tokens
    llm.engine.update_weights()
    backend = llm.engine.runner.kernel_step
    assert backend is not None
    backend.step.configs = _coarse(backend.step)
    assert llm.generate(prompt, greedy)[0].token_ids == want == full_greedy(model, prompt, 4)


def test_quantized_layers_and_weights_are_refused_with_the_reason():
    """A quantized model is refused by name, never read as bare weights: the kernels take each projection's and
    the embedding's .weight alone, as floating-point tensors of the model's dtype, so a layer that dequantizes in
    its forward, int8 codes left in an nn.Linear, a wrapped embedding and LoRA over a quantized base (QLoRA, not
    mergeable: no merge_lora hint) are each named; the engine then decodes on the general path."""
    import copy

    from torch import nn

    from lmforge.adapt.lora import LoRAConfig, apply_lora

    class Int8Linear(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.in_features, self.out_features = lin.in_features, lin.out_features
            scale = lin.weight.detach().abs().amax(1) / 127
            self.register_buffer("codes", torch.round(lin.weight.detach() / scale[:, None]).to(torch.int8))
            self.register_buffer("scales", scale)

        def forward(self, x):
            return nn.functional.linear(x, self.codes.to(x.dtype) * self.scales[:, None])

    class ScaledEmbedding(nn.Embedding):
        def forward(self, ids):
            return 2 * super().forward(ids)

    base = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16)
    layer = copy.deepcopy(base)
    layer.blocks[1].mlp.down = Int8Linear(layer.blocks[1].mlp.down)
    why = unsupported(layer)
    assert "blocks.1.mlp.down is a Int8Linear, not a plain nn.Linear" in why and "merge_lora" not in why
    codes = copy.deepcopy(base)
    w = codes.blocks[0].attn.wv.weight
    codes.blocks[0].attn.wv.weight = nn.Parameter(torch.round(w.detach() * 100).to(torch.int8), requires_grad=False)
    assert "blocks.0.attn.wv.weight stored as torch.int8, not the model's torch.float32" in unsupported(codes)
    fused = copy.deepcopy(base).fuse_projections()  # wqkv and gate_up read, wq .. up absent (module_at: None)
    assert unsupported(fused) is None
    fused.blocks[1].mlp.gate_up = Int8Linear(fused.blocks[1].mlp.gate_up)
    assert "blocks.1.mlp.gate_up is a Int8Linear, not a plain nn.Linear" in unsupported(fused)
    emb = copy.deepcopy(base)
    emb.tok_emb = ScaledEmbedding(257, 64)
    assert "tok_emb is a ScaledEmbedding, not a plain nn.Embedding" in unsupported(emb)
    qlora = apply_lora(copy.deepcopy(layer), LoRAConfig(r=2, targets=("blocks.1.mlp.down",)))
    why = unsupported(qlora)
    assert "blocks.1.mlp.down is a LoRALinear over a Int8Linear" in why and "cannot be merged" in why
    with pytest.raises(ConfigError, match="Int8Linear, not a plain nn.Linear"):
        Engine(layer, IdTokenizer(257), EngineConfig(kernel_step=True))
    llm = LLM(layer.to(DEV), IdTokenizer(257), config=EngineConfig(block_size=4))
    assert llm.engine.runner.kernel_step is None
    prompt = [5, 9, 2, 7]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert llm.generate(prompt, greedy)[0].token_ids == full_greedy(layer, prompt, 4)


def test_a_policy_with_a_value_head_decodes_on_the_kernel_step():
    """An RL policy wrapped with its value head (PolicyWithValue) generates as its backbone does, so the kernel
    step reads the backbone's weights (generation_module): the same greedy tokens as the bare model's."""
    from lmforge.align.value import PolicyWithValue

    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).to(DEV)
    policy = PolicyWithValue(model).to(DEV)
    llm = LLM(policy, IdTokenizer(257), config=EngineConfig(kernel_step=True, block_size=4))
    backend = llm.engine.runner.kernel_step
    assert backend is not None
    backend.step.configs = _coarse(backend.step)
    steps = []
    run = backend.run
    backend.run = lambda batch, late=None: steps.append(1) or run(batch, late)
    prompt = torch.randint(0, 257, (7,), generator=torch.Generator().manual_seed(3)).tolist()
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(steps) == 4 and out.token_ids == full_greedy(model, prompt, 5)


def test_a_corrupt_kernel_config_cache_file_is_warned_about_and_replaced_by_the_next_tune(tmp_path, monkeypatch):
    """A cached set that does not load (a crash cut the file short, an edit) stopped every engine start with a
    ConfigError. Now the engine starts with one warning naming the file, on the shipped set or default block
    shapes (so it tunes again where it tunes: KernelStep.autotune), and the tune's save replaces the file
    atomically: the next start reads the new set without a word. KernelConfigs.load and cached() stay strict."""
    import json
    import warnings

    from lmforge.infer.kernel_step import model_signature, save_or_warn
    from lmforge.kernels import tuning
    from lmforge.kernels.tuning import cache_path, gpu_name

    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).to(DEV)
    path = cache_path(gpu_name(DEV), model_signature(model))
    path.parent.mkdir()
    path.write_text('{"gpu": "x", "model": "y", "configs": {"(\'add\', 64')  # cut short by a crash

    def start() -> tuple[Engine, list[str]]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            engine = Engine(model, IdTokenizer(257), EngineConfig(kernel_step=True, block_size=4))
        return engine, [str(w.message) for w in seen]

    engine, said = start()
    step = engine.runner.kernel_step.step
    assert len(said) == 1 and str(path) in said[0] and "unreadable" in said[0] and "\n" not in said[0]
    assert "default block shapes serve until a tune rewrites it" in said[0]
    assert step.configs == KernelConfigs(model=step.signature)  # no set: a GPU's step tunes at its first capture
    with pytest.raises(ConfigError, match="unreadable.*delete it"):
        KernelConfigs.cached(step.gpu, step.signature)  # (strict: bench tools reading a set they were given)

    tuned = dataclasses.replace(_coarse(step), gpu=step.gpu, model=step.signature)
    save_or_warn(tuned)  # what KernelStep.tune does with its set
    assert json.loads(path.read_text()) == tuned.to_json() and [p.name for p in path.parent.iterdir()] == [path.name]
    engine, said = start()
    assert said == [] and engine.runner.kernel_step.step.configs == tuned
    prompt = [5, 17, 99, 3, 250]
    out = LLM(model, IdTokenizer(257), config=EngineConfig(kernel_step=True, block_size=4)).generate(
        prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.token_ids == full_greedy(model, prompt, 3)

    shipped = tmp_path / "shipped"  # a set shipped for this GPU and shape serves instead of the corrupt file
    shipped.mkdir()
    tuned.save(shipped / path.name)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    path.write_text("")
    with pytest.warns(UserWarning, match=r"unreadable .*the set shipped with lmforge serve"):
        assert KernelConfigs.cached(step.gpu, step.signature, strict=False) == tuned
    with pytest.raises(LmforgeError, match="unreadable"):
        KernelConfigs.cached(step.gpu, step.signature)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "none")
    for edited, says in (({"gpu": "g", "model": None, "configs": {}}, "KernelConfigs.model = None: expected a string"),
                         ({"configs": {"k": [4, True]}}, "expected a tuple of non-negative ints")):
        path.write_text(json.dumps(edited))  # (a null model failed the tune's save: no file name)
        with pytest.warns(UserWarning, match=says):
            assert KernelConfigs.cached(step.gpu, step.signature, strict=False) is None

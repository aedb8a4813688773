"""Bad HF checkpoints fail with errors naming the tensor or field; sharded checkpoints load; loading is
memory-mapped tensor by tensor (no state dict of the whole checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, d_ff=48)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


def _edit(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_round_trip_llama_and_config(ckpt):
    path, model = ckpt
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 32
    back = Transformer.from_pretrained(path)
    ids = torch.randint(0, 64, (1, 7))
    torch.testing.assert_close(back(ids), model(ids))


def test_sharded_checkpoint_round_trip(tmp_path):
    model = Transformer(CFG).eval()
    from lmforge.model.hf import save_pretrained

    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(ids), model(ids))


def test_save_pretrained_takes_a_dtype_by_name_and_the_shard_size(tmp_path):
    """model.save_pretrained(dir, dtype='bfloat16') failed with torch's 'Invalid device string' though
    from_pretrained takes dtype names; the shard size and family were not reachable from the model (2026-12-07)."""
    model = Transformer(CFG).eval()
    model.save_pretrained(tmp_path, dtype="bf16", family="mistral", max_shard_bytes=20_000)
    cfg = json.loads((tmp_path / "config.json").read_text())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["model_type"] == "mistral" and len(set(index["weight_map"].values())) > 1
    back = Transformer.from_pretrained(tmp_path)
    assert back.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(back.tok_emb.weight, model.tok_emb.weight.to(torch.bfloat16))


def test_missing_unexpected_and_misshapen_tensors(ckpt):
    path, _ = ckpt
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Transformer.from_pretrained(path)
    _edit(path, lambda t: t.update({name: torch.zeros(16, 32), "model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        Transformer.from_pretrained(path)
    _edit(path, lambda t: (t.pop("model.layers.0.extra.weight"), t.update({name: torch.zeros(8, 32)})))
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*\(8, 32\).*\(16, 32\)"):
        Transformer.from_pretrained(path)


def test_unknown_architecture_quantized_and_missing_field(ckpt):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "rwkv", "architectures": ["RwkvForCausalLM"]}))
    with pytest.raises(ConfigError, match="model_type='rwkv'"):
        Transformer.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(CheckpointError, match="quantized.*mxfp4|mxfp4.*quantized"):
        Transformer.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        Transformer.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg))
    _edit(path, lambda t: t.update({"model.norm.weight": torch.zeros(32, dtype=torch.uint8)}))
    with pytest.raises(CheckpointError, match="model.norm.weight.*U8"):
        Transformer.from_pretrained(path)
    with pytest.raises(CheckpointError, match="config.json"):
        Transformer.from_pretrained(path / "nowhere")


def test_an_unsupported_architecture_and_a_missing_shard_name_the_fix(ckpt, tmp_path):
    """Both errors named the problem but no way out (found 2026-12-07): an architecture lmforge cannot convert runs
    through transformers behind HFCausalLM; a shard the index names must be fetched again."""
    path, model = ckpt
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"model_type='phi3' .* is not supported; .*; run it through transformers "
                                          r"instead: LLM\(lmforge\.infer\.hf_wrapper\.HFCausalLM\("):
        Transformer.from_pretrained(path)
    from lmforge.model.hf import save_pretrained

    save_pretrained(model, tmp_path / "sh", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sh").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[1].name} is missing: .*; fetch it again \\(every shard the "
                                              f"index names must be beside it: {len(shards)} files\\)$"):
        Transformer.from_pretrained(tmp_path / "sh")


def test_a_head_missing_under_an_untied_config_names_tie_word_embeddings(tmp_path):
    """A tied model whose config.json lost tie_word_embeddings (Qwen2's default is false) has no lm_head.weight in
    its file: transformers initialises a random head silently; the refusal names the flag to set (2026-12-07)."""
    import dataclasses

    Transformer(dataclasses.replace(CFG, tie_embeddings=True)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match=r"^checkpoint lacks tensor 'lm_head.weight' .*; config.json does not tie "
                                              r"the head .*set \"tie_word_embeddings\": true there$"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Transformer.from_pretrained(tmp_path).cfg.tie_embeddings


def test_weights_are_read_tensor_by_tensor(ckpt, monkeypatch):
    """No call ever materialises the whole checkpoint: safetensors.torch.load_file is not used."""
    path, _ = ckpt
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("loaded the whole file"))
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16 and not model.training


def test_sliding_layer_defaults_follow_transformers():
    from lmforge.model.hf import config_from_hf

    core = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48)
    gemma = config_from_hf(dict(core, model_type="gemma2", sliding_window=4096, head_dim=8))
    assert [gemma.layer_type(i) for i in range(4)] == ["sliding", "full", "sliding", "full"]
    mistral = config_from_hf(dict(core, model_type="mistral", sliding_window=4096))
    assert [mistral.layer_type(i) for i in range(4)] == ["sliding"] * 4
    qwen = config_from_hf(dict(core, model_type="qwen2", sliding_window=4096, use_sliding_window=True,
                               max_window_layers=2))
    assert [qwen.layer_type(i) for i in range(4)] == ["full", "full", "sliding", "sliding"]
    assert config_from_hf(dict(core, model_type="qwen2", sliding_window=4096)).sliding_window == 0


def test_export_refuses_state_the_hf_layout_would_drop(tmp_path):
    """save_pretrained writes what the family's rules read; any other tensor with non-zero values would be
    lost, and the files would compute something else. A Mixtral-shaped model's aux-loss-free routing bias
    (e_bias, a buffer Mixtral's layout lacks) exports while it is zero, and is refused once trained."""
    from lmforge.model.config import MoEConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                    d_ff=48, mlp="moe", moe=MoEConfig(n_experts=4, top_k=2))).eval()
    model.save_pretrained(tmp_path / "zero")  # all-zero bias: nothing lost
    model.blocks[0].mlp.e_bias.add_(0.5)
    with pytest.raises(ConfigError, match=r"mixtral HF layout has no place for 1 tensors .*blocks\.0\.mlp\.e_bias"):
        model.save_pretrained(tmp_path / "trained")
    assert not (tmp_path / "trained").exists()  # refused before writing


@pytest.mark.parametrize("change, field", [(dict(norm="layernorm"), "norm='layernorm'"),
                                           (dict(embed_scale=8.0), "embed_scale=8.0"),
                                           (dict(norm_position="post"), "norm_position='post'"),
                                           (dict(attn_sinks=True), "attn_sinks=True"),
                                           (dict(final_norm=False), "final_norm=False")])
def test_export_refuses_what_the_family_config_cannot_say(tmp_path, change, field):
    """Whatever config.json cannot express is refused, naming the field, before anything is written."""
    import dataclasses

    model = Transformer(dataclasses.replace(CFG, **change)).eval()
    with pytest.raises(ConfigError, match=f"llama HF layout cannot express model.{field}".replace("(", "\\(")):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("qkv_bias, o_bias, family, refused", [
    (True, False, "llama", "model.o_bias=False (it reads back as True), so transformers would compute something else; "
                           "export it as qwen2 (family='qwen2'; lmforge export --family qwen2), or save an lmforge "
                           "checkpoint instead"),
    (False, True, None, "model.o_bias=True (it reads back as False), so transformers would compute something else; no "
                        "HF family lmforge writes can express it: save an lmforge checkpoint instead"),
    (True, False, "qwen2", None), (True, True, "llama", None), (True, False, None, None)])
def test_attention_biases_export_where_a_family_holds_them_and_are_refused_with_the_one_that_does(
        tmp_path, qkv_bias, o_bias, family, refused):
    """Llama's config.json has one attention_bias for q, k, v and o: q/k/v biases without an o_proj bias (or the
    reverse) cannot be said there, and are refused naming the family that can (Qwen2: q/k/v only) or that none
    can; where a family holds them, the export reloads, in lmforge and in transformers, to the same logits."""
    import dataclasses

    from lmforge.model.hf import save_pretrained

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(CFG, qkv_bias=qkv_bias, o_bias=o_bias)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # biases that matter, so that one dropped changes the logits
    if refused:
        with pytest.raises(ConfigError) as e:
            save_pretrained(model, tmp_path / "x", family=family)
        assert str(e.value) == f"save_pretrained: the {family or 'llama'} HF layout cannot express {refused}"
        assert not (tmp_path / "x").exists()
        return
    save_pretrained(model, tmp_path / "x", family=family)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path / "x")(ids), model(ids))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family, qk_norm", [("mixtral", False), ("qwen3_moe", True)])
def test_export_refuses_mixed_windows_in_families_that_slide_on_every_layer(tmp_path, family, qk_norm):
    """Mixtral and Qwen3-MoE apply config.sliding_window to every layer (no layer_types): a model with full and
    sliding layers is refused, one that slides everywhere exports with equal logits."""
    import dataclasses

    from lmforge.model.config import MoEConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, d_ff=48,
                      qk_norm=qk_norm, sliding_window=4, layer_types=("full", "sliding"), init_std=0.1, mlp="moe",
                      moe=MoEConfig(n_experts=4, top_k=2, norm_topk=family == "mixtral"))
    with pytest.raises(ConfigError, match=rf"{family} HF layout cannot express model.layer_types=\('full', 'sl"):
        Transformer(cfg).save_pretrained(tmp_path / "mixed")
    transformers = pytest.importorskip("transformers")
    model = Transformer(dataclasses.replace(cfg, layer_types=None)).eval()
    model.save_pretrained(tmp_path / "uniform")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_a_second_save_leaves_no_stale_weights_and_loaders_agree(tmp_path):
    from lmforge.model.hf import save_pretrained

    torch.manual_seed(0)
    a, b = Transformer(CFG).eval(), Transformer(CFG).eval()
    save_pretrained(a, tmp_path, max_shard_bytes=20_000)
    save_pretrained(b, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    save_pretrained(a, tmp_path, max_shard_bytes=20_000)
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(ids), a(ids))


def test_config_fields_that_change_the_math_are_read_or_refused(ckpt, tmp_path):
    """A tied config over a stored, different head loads untied (as transformers does); gpt-oss clamps
    other than its own are refused; Llama attention_bias without mlp_bias is read; dtype 'auto' takes the
    stored tensors' dtype, 'torch.float16' is read, nonsense is named; a missing shard is named."""
    from lmforge.model.hf import config_from_hf, save_pretrained

    path, model = ckpt
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.warns(UserWarning, match="stores a different lm_head.weight; loading it untied"):
        back = Transformer.from_pretrained(path)
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(back(ids), model(ids))
    core = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match="swiglu_limit=3.0 is not supported"):
        config_from_hf(dict(core, model_type="gpt_oss", num_local_experts=4, intermediate_size=16, swiglu_limit=3.0))
    llama = config_from_hf(dict(core, model_type="llama", attention_bias=True))  # was refused: now q/k/v/o biases
    assert (llama.qkv_bias, llama.o_bias, llama.bias) == (True, True, False)
    mistral = config_from_hf(dict(core, model_type="mistral", attention_bias=True, mlp_bias=True,
                                  num_key_value_heads=4))
    assert not (mistral.has_qkv_bias or mistral.has_o_bias or mistral.bias)  # transformers' Mistral reads neither
    with pytest.raises(ConfigError, match="attention_bias=true is not supported for DeepSeek-V3"):
        config_from_hf(dict(core, model_type="deepseek_v3", attention_bias=True, intermediate_size=16, kv_lora_rank=8,
                            qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=8))
    for dtype, want in (("auto", torch.float32), ("torch.float16", torch.float16)):
        (path / "config.json").write_text(json.dumps({**cfg, "dtype": dtype}))
        assert Transformer.from_pretrained(path).tok_emb.weight.dtype == want
    (path / "config.json").write_text(json.dumps({**cfg, "dtype": "Size"}))
    with pytest.raises(ConfigError, match=r"^config.json dtype='Size' is not a floating-point dtype; use one of "
                                          r"\['bfloat16', .*\] or 'auto' \(the stored tensors' own\)$"):
        Transformer.from_pretrained(path)
    save_pretrained(model, tmp_path / "sh", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "sh").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing: the index's weight_map"):
        Transformer.from_pretrained(tmp_path / "sh")


def test_the_checkpoints_eos_ids_end_generation_and_are_exported(tmp_path):
    """eos_token_id of generation_config.json (else config.json) ends a sample like the tokenizer's
    end-of-text; an exported model writes it back. A tokenizer passed to LLM.load replaces the directory's
    own, which is then not read (here: one lmforge cannot read)."""
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tokenizer.byte import ByteTokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    model.save_pretrained(tmp_path)
    free = LLM.load(tmp_path, tokenizer=ByteTokenizer()).generate("hello", SamplingParams(temperature=0, max_tokens=8))
    stop = free[0].token_ids[2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [999, stop]}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True, "vocab": {},
                                                                   "merges": []}, "normalizer": {"type": "Lowercase"}}))
    llm = LLM.load(tmp_path, tokenizer=ByteTokenizer())
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.token_ids == free[0].token_ids[:3] and out.finish_reason == "stop"
    assert llm.generate("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids == \
        free[0].token_ids
    with pytest.raises(DataError, match="normalizer 'Lowercase' is not supported"):
        LLM.load(tmp_path)
    llm.model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["eos_token_id"] == [999, stop]
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == {"eos_token_id": [999, stop]}
    from lmforge import checkpoint as ckpt  # an lmforge checkpoint of the model (e.g. after fine-tuning) keeps them

    ckpt.save_checkpoint(tmp_path / "run", 1, llm.model)
    assert ckpt.load_model(tmp_path / "run")[0].eos_token_ids == (999, stop)


@pytest.mark.parametrize("family, extra", [("mistral", {}),
                                           ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}),
                                           ("qwen3_moe", {"use_sliding_window": True}), ("gemma2", {}),
                                           ("gpt_oss", {}), ("mixtral", {}), ("qwen3", {})])
def test_a_config_json_without_sliding_window_gets_the_families_default_window(family, extra):
    """A config.json that leaves sliding_window out: transformers' config classes fill their default (Mistral,
    Qwen with use_sliding_window and Gemma 2: 4,096; gpt-oss: 128; Mixtral, Qwen without it: none); lmforge
    read none, so past the window its attention differed (found 2026-12-05)."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import config_from_hf

    d = dict(model_type=family, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=8192, **extra)
    if family in ("mixtral", "qwen3_moe", "gpt_oss"):
        d.update(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    hf = transformers.AutoConfig.for_model(**d)
    want = hf.sliding_window or 0
    assert config_from_hf(d).sliding_window == want

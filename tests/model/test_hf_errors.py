"""Bad HF checkpoints fail with errors naming the tensor or field; sharded checkpoints load; loading is
memory-mapped tensor by tensor (no state dict of the whole checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError, ConfigError
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


def test_weights_are_read_tensor_by_tensor(ckpt, monkeypatch):
    """No call ever materialises the whole checkpoint: safetensors.torch.load_file is not used."""
    path, _ = ckpt
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("loaded the whole file"))
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16 and not model.training


def test_sliding_layer_defaults_follow_transformers():
    from lmforge.model.hf import config_from_hf

    core = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48)
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

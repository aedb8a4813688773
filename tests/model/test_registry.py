"""The model-class seam (lmforge.model.registry): a class other than the Transformer, registered under a
ModelConfig.arch name, is built by lmforge checkpoints (save_checkpoint / load_model) and by the HF loader through a
family whose config names it. The class here is a tiny Mamba-1 with transformers' MambaForCausalLM parameter names
(Gu & Dao 2023, Algorithm 2, written as a loop on lmforge.model.cache.recur), so its HF family is renames only;
the logits are checked against transformers' own model both ways (load and export)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.checkpoint import check_same_model, load_model, save_checkpoint
from lmforge.config import from_dict, to_dict
from lmforge.errors import ConfigError
from lmforge.model import hf, registry
from lmforge.model.cache import CacheSpec, LayerCacheSpec, recur
from lmforge.model.config import ModelConfig
from lmforge.model.hf_families import Rule, one
from lmforge.model.layers.norm import RMSNorm
from lmforge.model.transformer import Transformer

N, K, R = 4, 4, 4  # d_state, d_conv, dt_rank: a ModelConfig has no fields for them (the Mamba issue adds them)


class Mixer(nn.Module):
    """Mamba-1's selective SSM mixer under transformers' MambaMixer names and shapes (conv1d.weight (E, 1, k),
    x_proj -> (dt_rank | B | C), dt_proj dt_rank -> E)."""

    def __init__(self, layer: int, d: int, E: int):
        super().__init__()
        self.layer, self.E = layer, E
        self.in_proj = nn.Linear(d, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d, bias=False)

    def forward(self, x, cache=None, meta=None):
        return recur(cache, self.layer, self.scan, x, meta)

    def scan(self, x, states):
        """x (R, T, d) from states (conv (R, E, k - 1), ssm (R, E, n)) or None (zeros) -> y, final states."""
        rows, T, _ = x.shape
        conv, h = states if states is not None else (x.new_zeros(rows, self.E, K - 1), x.new_zeros(rows, self.E, N))
        u, z = self.in_proj(x).chunk(2, dim=-1)
        full = torch.cat((conv, u.transpose(1, 2)), dim=-1)  # (R, E, k - 1 + T): past inputs, then these
        u = F.silu(F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.E)).transpose(1, 2)  # (R, T, E)
        dt, B, C = self.x_proj(u).split([R, N, N], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (R, T, E)
        A = -torch.exp(self.A_log)  # (E, n)
        ys = []
        for t in range(T):
            h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
            ys.append((h * C[:, t, None, :]).sum(-1) + self.D * u[:, t])
        return self.out_proj(torch.stack(ys, dim=1) * F.silu(z)), (full[:, :, T:], h)


class Layer(nn.Module):
    def __init__(self, i: int, cfg: ModelConfig):
        super().__init__()
        self.norm, self.mixer = RMSNorm(cfg.d_model, cfg.norm_eps), Mixer(i, cfg.d_model, cfg.ff)


class TinyMamba(nn.Module):
    """A registered model class: built from a ModelConfig (arch 'tiny_mamba'; d_ff is the inner width E), kept as
    self.cfg; pre-norm residual mixers, final norm, a head tied unless cfg.tie_embeddings is False."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.vocab_size, self.max_seq_len = cfg, cfg.vocab_size, cfg.max_seq_len
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(i, cfg) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def cache_spec(self) -> CacheSpec:
        state = LayerCacheSpec(kind="state", state_shapes=((self.cfg.ff, K - 1), (self.cfg.ff, N)))
        return CacheSpec(layers=(state,) * self.cfg.n_layers, dtype=self.embeddings.weight.dtype,
                         max_seq_len=self.max_seq_len, vocab_size=self.vocab_size)

    def forward(self, ids, positions=None, cache=None, meta=None):
        x = self.embeddings(ids)
        for layer in self.layers:
            x = x + layer.mixer(layer.norm(x), cache, meta)
        if meta is not None and meta.logits_indices is not None:
            x = x.flatten(0, 1)[meta.logits_indices][None]
        return self.lm_head(self.norm_f(x))


def mamba_cfg(d: dict) -> ModelConfig:
    if (d["state_size"], d["conv_kernel"], d["time_step_rank"]) != (N, K, R) or d.get("use_bias"):
        raise ConfigError("this test's Mamba fixes state_size, conv_kernel, time_step_rank at 4 and has no biases")
    return ModelConfig(arch="tiny_mamba", vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_heads=1,
                       d_ff=d["intermediate_size"], n_layers=d["num_hidden_layers"], norm_eps=d["layer_norm_epsilon"],
                       tie_embeddings=d.get("tie_word_embeddings", True), pos_emb="none")


def mamba_cfg_to_hf(cfg: ModelConfig) -> dict:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff,
            "expand": cfg.ff // cfg.d_model, "num_hidden_layers": cfg.n_layers, "state_size": N, "conv_kernel": K,
            "time_step_rank": R, "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "use_bias": False, "use_conv_bias": True}


def mamba_rules(cfg: ModelConfig) -> list[Rule]:
    mixer = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
             "A_log", "D", "out_proj.weight")
    rules = [one("backbone.embeddings.weight", "embeddings.weight"), one("backbone.norm_f.weight", "norm_f.weight")]
    for i in range(cfg.n_layers):
        rules += [one(f"backbone.layers.{i}.norm.weight", f"layers.{i}.norm.weight")]
        rules += [one(f"backbone.layers.{i}.mixer.{n}", f"layers.{i}.mixer.{n}") for n in mixer]
    return rules + ([] if cfg.tie_embeddings else [one("lm_head.weight", "lm_head.weight")])


@pytest.fixture
def registered(monkeypatch):
    """'tiny_mamba' registered and a 'mamba' HF family naming it, both undone after the test."""
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    monkeypatch.setattr(hf, "FAMILIES", dict(hf.FAMILIES))
    registry.register_model("tiny_mamba", TinyMamba)
    hf.FAMILIES["mamba"] = ("MambaForCausalLM", mamba_cfg, mamba_cfg_to_hf, mamba_rules)


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(arch="tiny_mamba", vocab_size=64, d_model=16, n_heads=1, d_ff=32, n_layers=2,
                                 pos_emb="none"), **kw})


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_the_registry_builds_a_transformer_unless_an_arch_is_registered():
    small = dict(vocab_size=64, d_model=16, n_heads=2, n_layers=1)
    assert type(registry.build_model(ModelConfig(**small))) is Transformer  # arch None: the Transformer
    assert type(registry.build_model(ModelConfig(arch="transformer", **small))) is Transformer
    with pytest.raises(ConfigError, match=r"^model.arch='mamba' is not a registered model class \(registered: "
                                          r"\['transformer'\]\); import the module that registers it"):
        registry.build_model(ModelConfig(arch="mamba", **small))
    with pytest.raises(ConfigError, match="'transformer' is already registered"):
        registry.register_model("transformer", TinyMamba)
    # a checkpoint written before the field: its config reads arch None and resumes as the same model
    old = {k: v for k, v in to_dict(ModelConfig(**small)).items() if k != "arch"}
    assert from_dict(ModelConfig, old, "model").arch is None
    check_same_model(old, ModelConfig(**small))
    with pytest.raises(ConfigError, match=r"^model.arch='mamba' names another model class; build it with "):
        Transformer(ModelConfig(arch="mamba", **small))  # not silently a Transformer


def test_a_registered_class_round_trips_through_an_lmforge_checkpoint(registered, tmp_path):
    model = randomized(registry.build_model(tiny_cfg(tie_embeddings=False)))
    ckpt = save_checkpoint(tmp_path, 1, model)
    assert json.loads((ckpt / "config.json").read_text())["model"]["arch"] == "tiny_mamba"
    back, _ = load_model(ckpt)
    assert type(back) is TinyMamba and back.cfg == model.cfg
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("tied", [True, False])
def test_a_hf_family_builds_the_class_its_config_names(registered, tmp_path, tied):
    """A tiny transformers MambaForCausalLM (built from its config, offline) loads as TinyMamba through the
    'mamba' family, gives its logits, and exports back to a directory transformers loads."""
    transformers = pytest.importorskip("transformers")
    hc = transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=N, num_hidden_layers=2, conv_kernel=K,
                                  expand=2, time_step_rank=R, use_conv_bias=True, use_bias=False,
                                  layer_norm_epsilon=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(0)
    theirs = transformers.MambaForCausalLM(hc).eval()
    theirs.save_pretrained(tmp_path / "hf")
    mine = hf.load_pretrained(tmp_path / "hf")
    assert type(mine) is TinyMamba and mine.cfg.arch == "tiny_mamba" and mine.cfg.tie_embeddings == tied
    assert (mine.lm_head.weight is mine.embeddings.weight) == tied
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(ids).logits
        assert (mine(ids) - want).abs().max() < 1e-5
    assert type(load_model(tmp_path / "hf")[0]) is TinyMamba  # a HF directory through the checkpoint path
    with pytest.raises(ConfigError, match="a model.arch='tiny_mamba' model has no family to guess; pass family="):
        hf.save_pretrained(mine, tmp_path / "out")
    hf.save_pretrained(mine, tmp_path / "out", family="mamba")
    again = transformers.MambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (again(ids).logits - want).abs().max() < 1e-5


def test_pretraining_and_the_flop_counter_build_the_registered_class(registered, tmp_path):
    """`lmforge train --model.arch NAME` trains the class registered under NAME (pretraining_parts builds through
    the registry), and the scaling code's meta model is that class too (not a Transformer of the same fields)."""
    from lmforge.scaling.flops import build_meta_model
    from lmforge.train.pretrain import pretraining_parts

    from ..train.helpers import make_shard, tiny_config

    meta = build_meta_model(tiny_cfg())
    assert type(meta) is TinyMamba and meta.lm_head.weight.is_meta
    shard = make_shard(tmp_path / "train.bin")
    cfg = tiny_config(shard, tmp_path / "run", model=tiny_cfg(vocab_size=257, max_seq_len=32))
    assert type(pretraining_parts(cfg).model) is TinyMamba


def test_the_registry_is_public():
    import lmforge as lf

    assert lf.register_model is registry.register_model and lf.build_model is registry.build_model
    assert type(lf.build_model(tiny_cfg(arch=None))) is Transformer

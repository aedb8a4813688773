"""PEFT adapter directories that PEFT itself wrote, opened by lmforge (load_peft): what lmforge computes as PEFT
does loads with PEFT's logits; what it would compute otherwise (aLoRA, an initialisation that rewrites the base,
a field it does not know) is refused in one line; the base weight PEFT saves beside an adapted lm_head loads as
PEFT loads it; a legacy adapter_model.bin is refused with the command that converts it."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError

from ..test_export import ids_for, logits, tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 97


def _base(path, **kw):
    tiny(VOCAB, **kw).save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _adapter(base_dir, out, save=None, **conf):
    """A PEFT adapter over the HF model in base_dir, B random (init_lora_weights=False unless given), saved to
    `out`; returns PEFT's logits of the saved adapter reloaded onto a fresh copy of that base."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(hf, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **conf}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, **(save or {}))
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), out)
    return logits(reloaded.eval(), ids_for(VOCAB))


def test_every_lora_config_field_of_the_installed_peft_is_classified():
    """A field PEFT adds is refused when set until it is put in INERT (changes nothing lmforge computes) or
    UNSUPPORTED: this names it."""
    from packaging.version import Version

    from lmforge.adapt.peft_format import INERT, UNMERGEABLE, UNSUPPORTED

    if Version(peft.__version__) >= Version("0.22"):
        pytest.skip(f"the fields are classified for peft 0.21; peft {peft.__version__}'s new ones are refused when set "
                    "until classified in lmforge/adapt/peft_format.py")
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - INERT - set(UNSUPPORTED) == set()
    assert not INERT & set(UNSUPPORTED) and set(UNMERGEABLE) <= set(UNSUPPORTED)


def test_an_alora_adapter_is_refused_not_applied_at_every_position(tmp_path):
    """aLoRA applies its update from the invocation tokens on; lmforge applied it at every position (logits off
    by 0.58-0.94 where PEFT gives the base's; found 2026-12-05). PEFT cannot merge it either."""
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "alora", target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[3, 5])
    with pytest.raises(ConfigError, match=r"^\S+alora uses aLoRA \(alora_invocation_tokens: the update only from the "
                                          r"invocation tokens on\), which lmforge's LoRA layers do not compute; run "
                                          r"it with peft, which cannot merge it either$"):
        load_model(tmp_path / "alora", base=tmp_path / "base", tokenizer=False)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_initialisation_that_rewrites_the_base_is_refused(tmp_path, init):
    """PiSSA / OLoRA adapters saved as trained: PEFT recomputes the base's residual when it loads them, so
    lmforge's plain base + BA differed from PEFT's (found 2026-12-05)."""
    _base(tmp_path / "base")
    want = _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj"], init_lora_weights=init)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    config["init_lora_weights"] = False  # the same tensors read as a plain adapter: not PEFT's function
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "plain" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ad" / "adapter_model.safetensors").read_bytes())
    plain = load_model(tmp_path / "plain", base=tmp_path / "base", tokenizer=False)[0]
    assert (logits(plain, ids_for(VOCAB)) - want).abs().max() > 1e-3
    with pytest.raises(ConfigError, match=rf"uses init_lora_weights='{init}' \(the base weights recomputed when "
                                          r"PEFT loads it\), which .*merge the adapter with peft \(merge_and_unload\)"):
        load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)


def test_fields_that_change_nothing_load_and_set_variants_or_unknown_fields_are_refused(tmp_path):
    """Dropout, layer selection, QA-LoRA over a float base (GPTQ layers only), weight tying over an untied base,
    an initialisation the tensors replace: PEFT's logits. Every UNSUPPORTED field set, and a field lmforge does
    not know, is refused naming it; one left unset (null) is not."""
    from lmforge.adapt.peft_format import UNSUPPORTED

    _base(tmp_path / "base")
    want = _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj", "v_proj", "down_proj"],
                    lora_dropout=0.1, layers_to_transform=[1], use_qalora=True, ensure_weight_tying=True,
                    init_lora_weights="orthogonal", use_rslora=True, rank_pattern={"down_proj": 2})
    model = load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)[0]
    assert (logits(model, ids_for(VOCAB)) - want).abs().max() <= 1e-5
    file = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(file.read_text())
    for key, what in [*UNSUPPORTED.items(), ("a_future_option", "a_future_option=True (a field this lmforge does "
                                                                "not know)")]:
        file.write_text(json.dumps({**config, key: True}))
        with pytest.raises(ConfigError, match=rf"uses {re.escape(what)}, which lmforge's LoRA layers do not compute"):
            load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)
    file.write_text(json.dumps({**config, "a_future_option": None}))
    load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)


def test_an_adapted_lm_head_with_its_saved_base_weight_loads_as_peft_loads_it(tmp_path):
    """PEFT's default save_embedding_layers="auto" writes lm_head.base_layer.weight beside lm_head's factors
    (lmforge refused it as 'neither a LoRA factor nor a weight the llama rules map'; found 2026-12-05) and
    loads it in place of the base's: over another base head lmforge gives PEFT's logits too. A head of another
    shape, an embedding's LoRA and a tied head's are refused, saying what to do."""
    _base(tmp_path / "base")
    want = _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in tensors
    model = load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)[0]
    assert (logits(model, ids_for(VOCAB)) - want).abs().max() <= 1e-5
    other = tiny(VOCAB)
    with torch.no_grad():
        other.lm_head.weight.add_(0.3)
    other.save_pretrained(tmp_path / "other")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "other")
    peft_there = logits(peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval(), ids_for(VOCAB))
    assert (peft_there - want).abs().max() <= 1e-5  # PEFT put the saved head in place of the other base's
    model = load_model(tmp_path / "ad", base=tmp_path / "other", tokenizer=False)[0]
    assert (logits(model, ids_for(VOCAB)) - peft_there).abs().max() <= 1e-5
    tensors["base_model.model.lm_head.base_layer.weight"] = tensors["base_model.model.lm_head.base_layer.weight"][:90]
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"holds the base weight base_model.model.lm_head.base_layer.weight of shape "
                                          r"\(90, 32\), the base's is \(97, 32\) \(a resized vocabulary\?\)"):
        load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)
    _adapter(tmp_path / "base", tmp_path / "emb", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ConfigError, match=r"adapts the embedding model.embed_tokens \(lora_embedding_A / B\), which "
                                          r"lmforge's LoRA layers \(Linears only\) do not compute"):
        load_model(tmp_path / "emb", base=tmp_path / "base", tokenizer=False)
    _base(tmp_path / "tied", tie_embeddings=True)
    _adapter(tmp_path / "tied", tmp_path / "tied_ad", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match=r"adapts lm_head, whose weight this base ties to its embeddings .* save the "
                                          r"base with its head untied \(tie_word_embeddings=false\)"):
        load_model(tmp_path / "tied_ad", base=tmp_path / "tied", tokenizer=False)


def test_a_legacy_adapter_model_bin_is_named_with_the_command_that_converts_it(tmp_path, capsys):
    """A PEFT directory with only adapter_model.bin (safe_serialization=False) said 'no checkpoint found ... HF
    model directory' (found 2026-12-05): the error names the pickle, and its command writes the safetensors file
    that then loads with PEFT's logits."""
    _base(tmp_path / "base")
    want = _adapter(tmp_path / "base", tmp_path / "ad", save={"safe_serialization": False}, target_modules=["q_proj"])
    assert sorted(p.name for p in (tmp_path / "ad").glob("adapter_model*")) == ["adapter_model.bin"]
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'ad'} is a PEFT adapter whose tensors are in "
                              f"{tmp_path / 'ad' / 'adapter_model.bin'}, a pickle, which lmforge does not load; write "
                              "them as adapter_model.safetensors once: python -c ")
    assert main(["generate", "--checkpoint", str(tmp_path / "ad"), "--base", str(tmp_path / "base"), "--prompts",
                 "Hi"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (progress bars aside)
    assert errors == [f"lmforge generate: error: {message}"]
    command = message.split(" once: ", 1)[1].replace("python", shlex.quote(sys.executable), 1)
    subprocess.run(command, shell=True, check=True, capture_output=True)
    model = load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)[0]
    assert (logits(model, ids_for(VOCAB)) - want).abs().max() <= 1e-5


def test_a_truncated_adapter_file_is_named_in_one_line(tmp_path, capsys):
    """A PEFT directory whose adapter_model.safetensors was cut short (an unfinished copy) ended `lmforge generate`
    in safetensors' traceback (found 2026-12-07): one line names the file and says to fetch it again."""
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj"])
    f = tmp_path / "ad" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    want = f"{f} is not a readable safetensors file .*: a truncated or unfinished download, or a Git LFS pointer\\? " \
           "Fetch the file again$"
    with pytest.raises(CheckpointError, match=want):
        load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)
    assert main(["generate", "--checkpoint", str(tmp_path / "ad"), "--base", str(tmp_path / "base"), "--prompts",
                 "Hi"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"lmforge generate: error: {f} is not a readable safetensors")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_router_adapted_as_a_parameter_loads_as_peft_computes_it(tmp_path, family):
    """PEFT on transformers 5 adapts a MoE router target ("gate") as its weight parameter (target_parameters
    ["gate.weight"]: lora.ParamWrapper, B A added to that weight, as LoRA on the Linear), and names Mixtral's
    block_sparse_moe `mlp`: such adapters were refused as target_parameters (found 2026-12-07), though lmforge's own
    export of router adapters loads in PEFT. Fused expert weights stay refused."""
    config_class, extra = {"mixtral": (transformers.MixtralConfig, {"num_local_experts": 4}),
                           "qwen3_moe": (transformers.Qwen3MoeConfig, {"num_experts": 4, "moe_intermediate_size": 16,
                                                                       "head_dim": 8})}[family]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, **extra)).save_pretrained(tmp_path / "base")
    want = _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj", "gate"])
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_parameters"] == ["gate.weight"]
    model = load_model(tmp_path / "ad", tokenizer=False)[0]
    assert (logits(model, ids_for(VOCAB)) - want).abs().max() <= 1e-5
    fused = "mlp.experts.gate_up_proj"
    _adapter(tmp_path / "base", tmp_path / "experts", target_modules=["q_proj"], target_parameters=[fused])
    with pytest.raises(ConfigError, match=rf"uses target_parameters \['{re.escape(fused)}'\] \(fused MoE expert "
                                          r"weights\), which lmforge's LoRA layers do not compute; merge"):
        load_model(tmp_path / "experts", tokenizer=False)


@pytest.mark.parametrize("targets", [5, "gate.weight", {"gate.weight": 1}, ["gate.weight", 3]])
def test_a_malformed_target_parameters_is_one_line(tmp_path, targets):
    """target_parameters that is not a list of names: 5 failed with a TypeError traceback, "gate.weight" was read as
    its characters (refused as fused expert weights "g", "a", ...), {"gate.weight": 1} was taken as its keys."""
    from lmforge.adapt.peft_format import _peft_config

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_parameters": targets}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"adapter_config.json: target_parameters is {re.escape(repr(targets))}, "
                                          r"not a list of parameter names; write it as PEFT does"):
        _peft_config(tmp_path)


def test_a_peft_directory_loaded_in_bf16_keeps_its_adapters_fp32(tmp_path):
    """load_model(dtype=) casts a PEFT adapter's base, not its LoRA factors (they were cast with it), as the other
    checkpoint kinds load adapters over a half-precision model."""
    from lmforge.adapt.lora import adapter_names

    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj"])
    model = load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False, dtype=torch.bfloat16)[0]
    names = adapter_names(model)
    assert names and all(p.dtype == (torch.float32 if n in names else torch.bfloat16)
                         for n, p in model.named_parameters())


def test_adapters_trained_on_a_hf_model_behind_the_wrapper_export_to_peft(tmp_path):
    """LoRA on a HF model behind lmforge.infer.hf_wrapper.HFCausalLM (module names already HF's, under `hf.`):
    to_peft writes an adapter PEFT loads onto that HF base with the same logits, the module kept in full as
    modules_to_save; NEFTune finds the wrapped model's token embedding (get_input_embeddings) and trains."""
    from lmforge.adapt.lora import LoRAConfig, apply_lora
    from lmforge.adapt.peft_format import to_peft
    from lmforge.align.sft import SFTConfig, SFTObjective
    from lmforge.infer.hf_wrapper import HFCausalLM

    from .test_lora import randomise_b

    hf = _base(tmp_path / "base")
    model = apply_lora(HFCausalLM(hf), LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj"), trainable=("norm",)))
    randomise_b(model)
    with torch.no_grad():
        hf.model.norm.weight.mul_(1.5)
    config, tensors = to_peft(model, None, {"alpha": 8, "trainable": ["norm"]})
    assert config["modules_to_save"] == ["model.norm"] and "base_model.model.model.norm.weight" in tensors
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in tensors
    out = tmp_path / "adapter"
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "base")}))
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out)
    ids = ids_for(VOCAB)
    torch.testing.assert_close(logits(reloaded.eval(), ids), logits(model.eval(), ids), rtol=0, atol=1e-5)
    assert model.get_input_embeddings() is hf.get_input_embeddings()
    from ..align.helpers import sequences

    batch = sequences(2, 10, VOCAB, [2, 3], 0)
    plain = SFTObjective().loss(model.train(), batch)[0]
    noisy = SFTObjective(SFTConfig(neftune_alpha=5.0)).loss(model.train(), batch)[0]
    assert torch.isfinite(noisy) and not torch.equal(noisy, plain)


def test_an_adapter_for_another_base_is_refused_naming_the_base(tmp_path):
    """A PEFT adapter opened over another base said 'use the same r and targets' (its ranks are read from its
    tensors: no r could fit) for a wider base, or 'a fused or transposed weight' for a layer a shallower base lacks
    (found 2026-12-07): both now say the adapter was trained on another base and how to give its own."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    def base(path, **kw):
        torch.manual_seed(0)
        cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
        Transformer(ModelConfig(**{**cfg, **kw})).save_pretrained(path)

    base(tmp_path / "base")
    base(tmp_path / "wide", d_model=48)
    base(tmp_path / "deep", n_layers=3)
    fix = r"; give the base it was trained on: base=DIR or --base DIR$"
    _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"ad holds base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight of "
                                          r"shape \(4, 32\), which the base's blocks.0.attn.wq \(48 -> 48\) does not "
                                          r"take: the adapter was trained on another base" + fix):
        load_model(tmp_path / "ad", base=tmp_path / "wide", tokenizer=False)
    _adapter(tmp_path / "base", tmp_path / "kept", target_modules=["q_proj"], modules_to_save=["lm_head"])
    tensors = load_file(tmp_path / "kept" / "adapter_model.safetensors")
    save_file({k: t for k, t in tensors.items() if "lora_" not in k},  # the kept head alone: its shape is checked
              tmp_path / "kept" / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"kept holds the weight base_model.model.lm_head.weight of shape \(97, 32\), "
                                          r"the base's is \(97, 48\)"):
        load_model(tmp_path / "kept", base=tmp_path / "wide", tokenizer=False)
    _adapter(tmp_path / "deep", tmp_path / "deep_ad", target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"deep_ad adapts model.layers.2.self_attn.q_proj, which the base has no "
                                          r"module of: the adapter was trained on another base" + fix):
        load_model(tmp_path / "deep_ad", base=tmp_path / "base", tokenizer=False)
    model = load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)[0]  # its own base loads
    assert model.blocks[0].attn.wq.lora_A.shape == (4, 32)


def test_an_adapter_over_a_lora_checkpoint_goes_over_its_merged_model(tmp_path):
    """A base that holds unmerged LoRA adapters of its own (an lmforge LoRA run's checkpoint) computes its merged
    model, which a PEFT adapter trained on that run's merged export goes over; load_peft refused it ('a LoRALinear,
    not a Linear layer', found 2026-12-07): it merges the base's adapters first, as a run's init is merged."""
    from lmforge.adapt.lora import LoRAConfig, lora_layers, merge_lora
    from lmforge.checkpoint import save_checkpoint

    from ..test_export import adapted

    run = adapted(tiny(VOCAB), LoRAConfig(r=2, alpha=4, targets=("wq", "up")))
    save_checkpoint(tmp_path / "run", 1, run)
    merge_lora(run).save_pretrained(tmp_path / "merged")
    want = _adapter(tmp_path / "merged", tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    model = load_model(tmp_path / "ad", base=tmp_path / "run", tokenizer=False)[0]
    assert (logits(model, ids_for(VOCAB)) - want).abs().max() <= 1e-5
    assert sorted(lora_layers(model)) == [f"blocks.{i}.attn.{w}" for i in (0, 1) for w in ("wq", "wv")]  # PEFT's only


def test_a_non_finite_alpha_or_a_rank_below_one_is_refused_naming_the_file_and_key(tmp_path):
    """A hand-edited adapter_config.json with lora_alpha NaN or Infinity (json reads both) loaded, and every
    logit was NaN or inf; r <= 0 loaded too (PEFT refuses it). A lora_A of rank 0 in the tensors divided by
    zero. Each is one line naming the file and the key."""
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj"])
    file = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(file.read_text())
    for key, value, what in [("lora_alpha", float("nan"), "nan, not a finite number"),
                             ("lora_alpha", float("inf"), "inf, not a finite number"),
                             ("lora_alpha", -float("inf"), "-inf, not a finite number"),
                             ("lora_alpha", "16", "'16', not a finite number"),
                             ("r", 0, "0, not a positive integer"), ("r", -4, "-4, not a positive integer"),
                             ("r", 4.5, "4.5, not a positive integer")]:
        file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match=f"^{re.escape(str(file))}: {key} is {re.escape(what)}; set it to "):
            load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)
    file.write_text(json.dumps(config))
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:0]
    tensors[key.replace("lora_A", "lora_B")] = tensors[key.replace("lora_A", "lora_B")][:, :0]
    save_file(tensors, weights)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(weights))} holds {re.escape(key)} of rank 0 "):
        load_model(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)


def test_an_adapter_over_a_qlora_checkpoint_is_refused_naming_the_float_base(tmp_path, monkeypatch):
    """A base holding QLoRA adapters (over a quantized base) cannot be merged to put a PEFT adapter over it: the
    error gave merge_lora's advice ('serve it unmerged, save the adapters alone'), which does not load the adapter;
    it now names the base and asks for the float one (as a run started from such a checkpoint is refused)."""
    import lmforge.checkpoint as checkpoint
    from lmforge.adapt.lora import LoRAConfig, apply_lora

    from .test_lora import quantized

    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "ad", target_modules=["q_proj"])
    qlora = apply_lora(quantized(tiny(VOCAB)), LoRAConfig(r=2, targets=("wq", "up")))
    loaded = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda where, **kw: (qlora, None) if str(where).endswith("base")
                        else loaded(where, **kw))
    with pytest.raises(ConfigError, match=r"ad: the base .*base holds LoRA adapters over a quantized base \(QLoRA; "
                                          r"layer blocks.0.attn.wq\), .*give the float base model the adapter"):
        loaded(tmp_path / "ad", base=tmp_path / "base", tokenizer=False)


def test_a_base_path_that_is_no_string_is_refused_in_one_line(tmp_path):
    """adapter_config.json's base_model_name_or_path as a number reached Path(7): a TypeError, which the chat
    template lookup swallowed with every other TypeError. It is refused as any base that is no local directory."""
    import json

    from lmforge.adapt.peft_format import NoLocalBase, peft_base
    from lmforge.checkpoint import hf_chat_template

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": 7, "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    # (its own class: checkpoint_identity takes this one, and no other CheckpointError, as "the adapters' alone")
    with pytest.raises(NoLocalBase, match=r"PEFT adapter over the base 7, which is not a local directory"):
        peft_base(tmp_path)
    assert hf_chat_template(tmp_path) is None


def test_an_exported_adapter_moved_with_its_base_loads_over_the_moved_base(tmp_path):
    """`lmforge export --adapter` records OUT/base by its absolute path (PEFT reads it so): the export moved whole
    (copied to another machine, renamed) was refused as an adapter over a base that is no local directory (found
    2026-12-07). Its own base/ is taken; another recorded path that is gone is still refused."""
    import shutil

    from lmforge.adapt.peft_format import peft_base

    _base(tmp_path / "out" / "base")
    want = _adapter(tmp_path / "out" / "base", tmp_path / "out", target_modules=["q_proj", "v_proj"])
    shutil.move(tmp_path / "out", tmp_path / "moved")
    assert peft_base(tmp_path / "moved") == tmp_path / "moved" / "base"
    model = load_model(tmp_path / "moved", tokenizer=False)[0]
    assert (logits(model, ids_for(VOCAB)) - want).abs().max() <= 1e-5
    config = json.loads((tmp_path / "moved" / "adapter_config.json").read_text())
    (tmp_path / "moved" / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": str(tmp_path / "elsewhere")}))
    with pytest.raises(CheckpointError, match="which is not a local directory"):
        peft_base(tmp_path / "moved")

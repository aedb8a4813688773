"""`lmforge export`: checkpoints as HF model directories and PEFT adapters, checked by loading them with
`transformers` / `peft` and comparing logits (fp32) and chat-template renderings with lmforge's own."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from lmforge.adapt.lora import LoRAConfig, apply_lora
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.cli.export import ExportConfig, export
from lmforge.config import to_dict
from lmforge.errors import ConfigError
from lmforge.infer.chat_template import TEMPLATES, get_template
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.byte import ByteTokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
TARGETS = ("wq", "wk", "wv", "wo", "gate", "up", "down")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello world"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 2+4?"}],
    [{"role": "user", "content": "  spaces\n\nnew lines\t{braces} 'quotes' \"double\" \\ é 日本"},
     {"role": "assistant", "content": ""}, {"role": "tool", "content": "{% raw %}"}],
]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@pytest.fixture(scope="module")
def tok():
    from lmforge.tokenizer.train import train_bpe

    text = "Hello world! The quick brown fox jumps over the lazy dog. 2+3=5 user assistant system\n" * 40
    return train_bpe(iter([text]), 340, SPECIALS, progress=False, workers=1)


def tiny(vocab_size: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                    max_seq_len=64, **kw))
    with torch.no_grad():  # norm gains too: a wrong name mapping cannot hide behind ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def adapted(model: Transformer, lora: LoRAConfig) -> Transformer:
    """`model` with LoRA adapters as after training: B != 0 (else merging changes nothing) and the modules
    kept trainable changed."""
    out = apply_lora(copy.deepcopy(model), lora)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith("lora_B") or p.requires_grad and not name.endswith("lora_A"):
                p.add_(torch.randn_like(p) * 0.1)
    return out.eval()


def lora_run(path: Path, model, tok, lora: LoRAConfig) -> Path:
    """A run directory as a LoRA post-training run leaves it: the checkpoint, and config.json with [lora]."""
    save_checkpoint(path, 1, model, tokenizer=tok, extra={"chat_template": "chatml"})
    (path / "config.json").write_text(json.dumps({"config": {"lora": to_dict(lora)}}))
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def ids_for(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def test_export_loads_in_transformers_and_lmforge(tmp_path, tok):
    model = tiny(tok.vocab_size)
    save_checkpoint(tmp_path / "run", 1, model, tokenizer=tok, extra={"chat_template": "chatml"})
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0  # a run directory: its newest
    ids, want = ids_for(tok.vocab_size), logits(model, ids_for(tok.vocab_size))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.dtype == torch.float32 and (logits(hf, ids) - want).abs().max() <= 1e-5
    back, back_tok = load_model(tmp_path / "hf")
    assert (logits(back, ids) - want).abs().max() <= 1e-5
    assert back_tok.encode("Hello world") == tok.encode("Hello world")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    specials = tok.special_tokens
    assert gen["eos_token_id"] == [specials["<|im_end|>"], specials["<|endoftext|>"]]  # an answer ends at im_end
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16 and (logits(half.float(), ids) - want).abs().max() < 0.05
    save_checkpoint(tmp_path / "run16", 1, copy.deepcopy(model).to(torch.bfloat16), tokenizer=tok)
    assert main(["export", str(tmp_path / "run16"), str(tmp_path / "hf16")]) == 0  # default: the stored dtype
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"



def test_config_bos_token_id_is_the_tokenizers(tmp_path, tok):
    """config.json's bos_token_id names the tokenizer's BOS (its first prefix token) or none: left out, it read as
    Llama's default 1, a byte token here that the model never began with."""
    from lmforge.tokenizer.bpe import Tokenizer

    with_bos = Tokenizer.from_dict({**tok.to_dict(), "prefix_tokens": ["<|begin_of_text|>"]})
    for name, tokenizer, want in (("plain", tok, None), ("bos", with_bos, tok.special_tokens["<|begin_of_text|>"])):
        save_checkpoint(tmp_path / name, 1, tiny(tok.vocab_size), tokenizer=tokenizer)
        assert main(["export", str(tmp_path / name), str(tmp_path / f"{name}-hf")]) == 0
        assert transformers.AutoConfig.from_pretrained(tmp_path / f"{name}-hf").bos_token_id == want
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "bos-hf")
    assert hf_tok("Hello")["input_ids"][0] == hf_tok.bos_token_id == want

def test_a_checkpoint_records_the_bos_token_id_and_loads_it_without_its_tokenizer(tmp_path, tok, monkeypatch):
    """save_checkpoint records bos_token_id as it records eos_token_ids: the tokenizer's BOS, else the model's own (a
    HF checkpoint's). Before, only a tokenizer read back gave it: a HF model's checkpoint saved without one, or any
    checkpoint loaded with tokenizer=False, exported bos_token_id null. One written before it was recorded takes
    its tokenizer's, as it did."""
    from lmforge import checkpoint
    from lmforge.tokenizer.bpe import Tokenizer

    with_bos = Tokenizer.from_dict({**tok.to_dict(), "prefix_tokens": ["<|begin_of_text|>"]})
    bos = tok.special_tokens["<|begin_of_text|>"]
    save_checkpoint(tmp_path / "ckpt", 1, tiny(tok.vocab_size), tokenizer=with_bos)
    assert load_model(tmp_path / "ckpt", tokenizer=False)[0].bos_token_id == bos
    hf = tiny(tok.vocab_size)
    hf.bos_token_id = 7  # as Transformer.from_pretrained reads it
    save_checkpoint(tmp_path / "hf_run", 1, hf)
    model = load_model(tmp_path / "hf_run")[0]
    assert model.bos_token_id == 7
    model.save_pretrained(tmp_path / "hf")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").bos_token_id == 7
    save_checkpoint(tmp_path / "hf_tok", 1, hf, tokenizer=tok)  # (a tokenizer that puts no BOS, as Qwen2's)
    assert tok.bos_id is None and load_model(tmp_path / "hf_tok", tokenizer=False)[0].bos_token_id == 7
    assert main(["export", str(tmp_path / "hf_tok"), str(tmp_path / "hf_tok_out")]) == 0  # (export said null)
    assert json.loads((tmp_path / "hf_tok_out" / "config.json").read_text())["bos_token_id"] == 7
    monkeypatch.setattr(checkpoint.save, "bos_record", lambda model, tokenizer: {})  # an older lmforge's checkpoint
    save_checkpoint(tmp_path / "old", 1, tiny(tok.vocab_size), tokenizer=with_bos)
    old = tmp_path / "old" / "checkpoints" / "step_000001" / "config.json"
    assert "bos_token_id" not in json.loads(old.read_text())
    assert load_model(tmp_path / "old")[0].bos_token_id == bos
    assert load_model(tmp_path / "old", tokenizer=False)[0].bos_token_id is None


def test_save_pretrained_writes_the_bos_token_id_the_model_knows(tmp_path, tok):
    """bos_token_id reaches config.json through save_pretrained, as eos_token_id does (an export patched config.json
    after it): the tokenizer's of an lmforge checkpoint, a HF checkpoint's own (the family's default where its
    config.json leaves it out, as transformers reads it), none for a model that knows no tokenizer."""
    from lmforge.model.hf_families import FAMILY_BOS
    from lmforge.model.hf import FAMILIES
    from lmforge.tokenizer.bpe import Tokenizer

    for family in FAMILIES:  # the families' defaults are transformers' config classes'
        assert FAMILY_BOS.get(family) == transformers.CONFIG_MAPPING[family]().bos_token_id, family
    with_bos = Tokenizer.from_dict({**tok.to_dict(), "prefix_tokens": ["<|begin_of_text|>"]})
    bos = tok.special_tokens["<|begin_of_text|>"]
    save_checkpoint(tmp_path / "ckpt", 1, tiny(tok.vocab_size), tokenizer=with_bos)
    model, _ = load_model(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "hf")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").bos_token_id == bos
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for name, given, want in (("seven", 7, 7), ("family", None, 1)):  # left out: Llama's 1, in both readers
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").symlink_to(tmp_path / "hf" / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps(
            {k: v for k, v in {**config, "bos_token_id": given}.items() if v is not None or k != "bos_token_id"}))
        Transformer.from_pretrained(tmp_path / name).save_pretrained(tmp_path / f"{name}-out")
        assert transformers.AutoConfig.from_pretrained(tmp_path / f"{name}-out").bos_token_id == want, name
    tiny(tok.vocab_size).save_pretrained(tmp_path / "fresh")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "fresh").bos_token_id is None


def test_merged_lora_export_equals_the_adapted_model(tmp_path, tok, capsys):
    base = tiny(tok.vocab_size)
    model = adapted(base, LoRAConfig(r=4, alpha=8, targets=TARGETS))
    save_checkpoint(tmp_path / "run", 1, model, tokenizer=tok)
    export(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "hf")))
    assert "merged 14 LoRA adapters" in capsys.readouterr().out
    ids = ids_for(tok.vocab_size)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    want = logits(model, ids)
    assert (logits(base, ids) - want).abs().max() > 1e-2  # the adapters matter
    assert (logits(hf, ids) - want).abs().max() <= 1e-5


def test_peft_adapter_equals_the_adapted_model(tmp_path, tok):
    base = tiny(tok.vocab_size)
    lora = LoRAConfig(r=4, alpha=8, targets=TARGETS, trainable=("lm_head", "final_norm"), rslora=True, dropout=0.1)
    model = adapted(base, lora)
    lora_run(tmp_path / "run", model, tok, lora)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft"), "--adapter"]) == 0
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["use_rslora"], conf["lora_dropout"]) == (4, 8, True, 0.1)
    assert conf["target_modules"][:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert conf["modules_to_save"] == ["model.norm", "lm_head"]
    ids, want = ids_for(tok.vocab_size), logits(model, ids_for(tok.vocab_size))
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    got = peft.PeftModel.from_pretrained(written, tmp_path / "peft").eval()
    assert (logits(got, ids) - want).abs().max() <= 1e-5
    # over the model the run started from, the adapter's modules_to_save bring the kept modules as trained
    base.save_pretrained(tmp_path / "start")
    start = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "start"),
                                           tmp_path / "peft").eval()
    assert (logits(start, ids) - want).abs().max() <= 1e-5
    # --base-out: the base elsewhere, named in adapter_config.json, so AutoPeftModel finds it
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft2"), "--adapter", "--base-out",
                 str(tmp_path / "base2")]) == 0
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft2").eval()
    assert (logits(auto, ids) - want).abs().max() <= 1e-5 and not (tmp_path / "peft2" / "base").exists()



def test_a_peft_directory_exports_with_its_chat_template(tmp_path, tok):
    """A PEFT adapter directory (no config.json: not a HF model directory) keeps the chat template of the
    tokenizer it loads with: its own tokenizer_config.json's, else its base's (it was dropped: an export of the
    directory wrote no template, and `lmforge chat` had none)."""
    from lmforge.checkpoint import hf_chat_template

    lora = LoRAConfig(r=4, alpha=8, targets=("wq", "wv"))
    lora_run(tmp_path / "run", adapted(tiny(tok.vocab_size), lora), tok, lora)  # records chatml
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft"), "--adapter"]) == 0
    assert main(["export", str(tmp_path / "peft"), str(tmp_path / "merged")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    want = get_template("chatml").render(CONVERSATIONS[1], add_generation_prompt=True)
    assert hf_tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == want
    for name in ("tokenizer.json", "tokenizer_config.json"):  # its tokenizer, and so its template, is its base's
        (tmp_path / "peft" / name).unlink()
    assert hf_chat_template(tmp_path / "peft").render(CONVERSATIONS[1], add_generation_prompt=True) == want


def test_a_peft_directorys_chat_template_is_that_of_the_base_it_loads_with(tmp_path, tok):
    """--base DIR is the base a PEFT directory without a tokenizer loads its tokenizer from, and so its template:
    it was always the recorded base's (with that gone the template was dropped; with another model there, its
    template was written)."""
    from lmforge.checkpoint import hf_chat_template
    from lmforge.infer.chat_template import checkpoint_chat_template

    lora = LoRAConfig(r=4, alpha=8, targets=("wq", "wv"))
    lora_run(tmp_path / "run", adapted(tiny(tok.vocab_size), lora), tok, lora)  # records chatml
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft"), "--adapter"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "peft" / name).unlink()
    (tmp_path / "peft" / "base").rename(tmp_path / "moved")
    want = get_template("chatml").render(CONVERSATIONS[1], add_generation_prompt=True)
    assert hf_chat_template(tmp_path / "peft") is None  # the recorded base is gone
    assert hf_chat_template(tmp_path / "peft", base=tmp_path / "moved").render(
        CONVERSATIONS[1], add_generation_prompt=True) == want
    (tmp_path / "peft" / "base").mkdir()  # another model at the recorded path: its template is not the one
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        (tmp_path / "peft" / "base" / name).write_bytes((tmp_path / "moved" / name).read_bytes())
    (tmp_path / "peft" / "base" / "chat_template.jinja").write_text("other {{ messages[0]['content'] }}")
    assert hf_chat_template(tmp_path / "peft").render(CONVERSATIONS[1]) == "other Be brief."
    assert checkpoint_chat_template(tmp_path / "peft", base=tmp_path / "moved").render(
        CONVERSATIONS[1], add_generation_prompt=True) == want
    assert main(["export", str(tmp_path / "peft"), str(tmp_path / "merged"), "--base", str(tmp_path / "moved")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert hf_tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == want

def test_a_peft_directory_over_an_lmforge_checkpoint_takes_the_template_it_records(tmp_path, tok):
    """A PEFT adapter over an lmforge checkpoint (base_model_name_or_path, or --base) without a tokenizer of its
    own loads that checkpoint's tokenizer, and so takes the chat template it records (a TEMPLATES name), as an
    adapter over a HF base takes that base's Jinja; it had none (only a HF base's own Jinja was followed)."""
    from lmforge.infer.chat_template import checkpoint_chat_template
    from lmforge.infer.llm import LLM

    lora = LoRAConfig(r=4, alpha=8, targets=("wq", "wv"))
    lora_run(tmp_path / "run", adapted(tiny(tok.vocab_size), lora), tok, lora)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft"), "--adapter"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):  # its tokenizer, and so its template, is its base's
        (tmp_path / "peft" / name).unlink()
    base = load_model(tmp_path / "peft" / "base", tokenizer=False)[0]
    save_checkpoint(tmp_path / "lm", 1, base, tokenizer=tok, extra={"chat_template": "chatml"})
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                                       str(tmp_path / "lm")}))
    assert checkpoint_chat_template(tmp_path / "peft") == "chatml"
    assert LLM.load(tmp_path / "peft").chat_template == "chatml"
    (tmp_path / "lm").rename(tmp_path / "moved")  # --base: the base it loads with
    assert checkpoint_chat_template(tmp_path / "peft") is None
    assert checkpoint_chat_template(tmp_path / "peft", base=tmp_path / "moved") == "chatml"
    assert main(["export", str(tmp_path / "peft"), str(tmp_path / "merged"), "--base", str(tmp_path / "moved")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    want = get_template("chatml").render(CONVERSATIONS[1], add_generation_prompt=True)
    assert hf_tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == want


def test_a_base_out_inside_out_is_written_there_and_an_out_inside_it_is_refused(tmp_path, tok, capsys):
    """--base-out OUT/nested/base was written, then replaced by OUT whole: the export said it wrote the base there
    and adapter_config.json named a directory that did not exist (found 2026-12-07); OUT inside --base-out failed
    with a traceback after writing the base. The one is written inside OUT, the other refused before writing."""
    lora = LoRAConfig(r=2, alpha=4, targets=("wq", "wv"))
    model = adapted(tiny(tok.vocab_size), lora)
    run, out = lora_run(tmp_path / "run", model, tok, lora), tmp_path / "out"
    assert main(["export", str(run), str(out), "--adapter", "--base-out", str(out / "nested" / "base")]) == 0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str((out / "nested" / "base").resolve())
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
    assert (logits(auto, ids_for(tok.vocab_size)) - logits(model, ids_for(tok.vocab_size))).abs().max() <= 1e-5
    assert not (out / "base").exists()
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "b" / "adapter"), "--adapter", "--base-out",
                 str(tmp_path / "b")]) == 2
    assert "OUT " + str(tmp_path / "b" / "adapter") + " is inside --base-out" in _one_line_error(capsys)
    assert not (tmp_path / "b").exists()


def _from_hf(tmp_path: Path, vocab_size: int, cfg_cls: str, model_cls: str, **kw) -> Transformer:
    """A tiny random transformers model of another family, saved and loaded into lmforge."""
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(cfg).save_pretrained(tmp_path / "hf")
    return Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()


DEEPSEEK = dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                first_k_dense_replace=1, n_group=1, topk_group=1, n_shared_experts=1)


V2 = {k: v for k, v in DEEPSEEK.items() if k not in ("n_group", "topk_group")}  # (DeepSeek-V3's group routing)
FAMILY_MODELS = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", V2),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                                          num_experts_per_tok=2, sliding_window=4)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_key_value_heads=2, num_experts=4,
                                                                num_experts_per_tok=2, moe_intermediate_size=16,
                                                                shared_expert_intermediate_size=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4,
                                                            num_experts_per_tok=2)),
}
ROUTER_DORA = "adapts as the parameter gate.weight \\(lora.ParamWrapper\\), which does not take DoRA"


@pytest.mark.parametrize("family, targets, dora, refused", [
    ("deepseek_v3", ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "router"), False, None),  # the router: a ParamWrapper
    ("deepseek_v3", ("down",), False, "DeepSeek-V3 MLP projection"),  # PEFT adapted the experts instead (0.1 off)
    ("deepseek_v3", ("gate", "up", "down"), False, "DeepSeek-V3 MLP projection"),  # PEFT: nothing to adapt
    ("deepseek_v2", ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "router"), False, None),
    ("deepseek_v2", ("mlp.gate", "mlp.up", "mlp.down"), False, "loads onto the MoE experts' fused weights"),
    ("deepseek_v2", ("shared.down",), False, "loads onto the MoE experts' fused weights"),  # PEFT: the base's logits
    ("deepseek_v2", ("router",), True, ROUTER_DORA),
    ("gpt_oss", ("router",), False, "GptOssTopKRouter"),  # PEFT: not a supported module
    ("gpt_oss", ("wq", "wo"), False, None),
    ("gemma", TARGETS, False, None),  # (its head is tied: no target)
    ("qwen2_moe", ("wq", "wk", "wv", "wo", "shared.gate", "shared.up", "shared.down", "out_gate"), False, None),
    ("qwen2_moe", ("router",), False, "Qwen2MoeTopKRouter"),  # PEFT: not a supported module
    ("mixtral", ("router",), True, ROUTER_DORA),
])
def test_peft_adapters_of_other_families_load_in_peft_or_are_refused(tmp_path, tok, family, targets, dora, refused):
    """Adapters on the layers PEFT (with transformers 5) loads as written equal the lmforge model through PEFT;
    the others are refused in one line at export (found by random adapters over random HF models, 2026-12-05;
    Gemma, Qwen2-MoE and DeepSeek-V2 2026-12-06: Qwen2-MoE's router was written and PEFT refused it; DeepSeek's
    routers, which PEFT adapts exactly as parameters, were refused, and Mixtral's DoRA router was written)."""
    lora = LoRAConfig(r=2, alpha=4.0, targets=targets, dora=dora)
    cfg_cls, model_cls, kw = FAMILY_MODELS[family]
    base = _from_hf(tmp_path, tok.vocab_size, cfg_cls, model_cls, **kw)
    model = adapted(base, lora)
    lora_run(tmp_path / "run", model, tok, lora)
    with pytest.raises(ConfigError, match=refused) if refused else contextlib.nullcontext():
        export(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "peft"), adapter=True))
    if refused:
        assert not (tmp_path / "peft").exists()
        return
    ids = ids_for(tok.vocab_size)
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3  # the adapters matter
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    got = peft.PeftModel.from_pretrained(written, tmp_path / "peft").eval()
    assert (logits(got, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_a_module_kept_in_full_whose_parts_hf_names_otherwise_crosses_to_peft(tmp_path, tok):
    """[lora] trainable keeping DeepSeek's shared experts (lmforge blocks.1.mlp.shared: gate / up / down; HF
    mlp.shared_experts: gate_proj / up_proj / down_proj) was refused as "not one HF module" (found 2026-12-06): it is
    PEFT's modules_to_save model.layers.1.mlp.shared_experts, which loads in PEFT, and back into lmforge, with the
    adapted model's logits. Qwen2-MoE's shared expert stays refused: its gate is HF's sibling shared_expert_gate."""
    lora = LoRAConfig(r=2, alpha=4.0, targets=("wq_a",), trainable=("shared",))
    model = adapted(_from_hf(tmp_path, tok.vocab_size, *FAMILY_MODELS["deepseek_v2"][:2], **V2), lora)
    lora_run(tmp_path / "run", model, tok, lora)
    export(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "peft"), adapter=True))
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["modules_to_save"] == ["model.layers.1.mlp.shared_experts"]
    ids = ids_for(tok.vocab_size)
    got = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base"),
                                         tmp_path / "peft").eval()
    assert (logits(got, ids) - logits(model, ids)).abs().max() <= 1e-5
    assert (logits(load_model(tmp_path / "peft")[0], ids) - logits(model, ids)).abs().max() <= 1e-5
    cfg_cls, model_cls, kw = FAMILY_MODELS["qwen2_moe"]
    lora = LoRAConfig(r=2, targets=("wq",), trainable=("shared",))
    qwen = adapted(_from_hf(tmp_path / "qwen", tok.vocab_size, cfg_cls, model_cls, **kw), lora)
    lora_run(tmp_path / "qwen_run", qwen, tok, lora)
    with pytest.raises(ConfigError, match="the module blocks.0.mlp.shared that .* is not one HF module PEFT can keep"):
        export(ExportConfig(checkpoint=str(tmp_path / "qwen_run"), out=str(tmp_path / "qwen_peft"), adapter=True))


def _template_export(tmp_path: Path, name: str, tokenizer) -> Path:
    save_checkpoint(tmp_path / name, 1, tiny(tokenizer.vocab_size), tokenizer=tokenizer)
    assert main(["export", str(tmp_path / name), str(tmp_path / f"{name}-hf"), "--template", name]) == 0
    return tmp_path / f"{name}-hf"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_renders_and_encodes_as_lmforge(tmp_path, tok, name):
    hf_tok = transformers.AutoTokenizer.from_pretrained(_template_export(tmp_path, name, tok))
    template = get_template(name)
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            text = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
            assert text == template.render(conversation, add_generation_prompt=gen)
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    if name == "chatml":  # where no pre-token crosses a marker, token for token what SFT trained on
        for conversation in CONVERSATIONS:
            ids = hf_tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)["input_ids"]
            assert ids == template.encode(tok, conversation)[0]
    with pytest.raises(Exception, match="has role 'robot'"):
        hf_tok.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_byte_tokenizer_exports_with_the_same_ids(tmp_path):
    byte = ByteTokenizer()
    hf_tok = transformers.AutoTokenizer.from_pretrained(_template_export(tmp_path, "plain", byte))
    text = get_template("plain").render(CONVERSATIONS[2]) + "<|endoftext|> is text here"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == byte.encode(text)
    assert hf_tok.eos_token_id == byte.eot_id and hf_tok.decode(byte.encode(text)) == text


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    return err


def test_bad_input_is_a_one_line_error(tmp_path, tok, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["export", str(tmp_path / "missing"), str(out)]) == 2
    assert "no checkpoint found" in _one_line_error(capsys) and not out.exists()
    model = tiny(tok.vocab_size)
    save_checkpoint(run, 1, model, tokenizer=tok)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), str(out)]) == 2
    assert "--force" in _one_line_error(capsys) and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(run), str(run), "--force"]) == 2
    assert "holds the checkpoint" in _one_line_error(capsys)
    assert main(["export", "--force", str(run), str(out)]) == 0  # a bare flag before the positionals
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert main(["export", str(run), str(tmp_path / "peft"), "--adapter"]) == 2
    assert "no LoRA adapters" in _one_line_error(capsys)
    fused = adapted(tiny(tok.vocab_size, fused_proj=True), LoRAConfig(r=2, targets=("wqkv", "wo")))
    save_checkpoint(tmp_path / "fused", 1, fused, tokenizer=tok)
    assert main(["export", str(tmp_path / "fused"), str(tmp_path / "peft"), "--adapter"]) == 2
    err = _one_line_error(capsys)
    assert "blocks.0.attn.wqkv is a fused projection" in err and "without --adapter" in err
    assert not (tmp_path / "peft").exists()
    assert main(["export", str(tmp_path / "fused"), str(tmp_path / "merged")]) == 0  # what the error suggests
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = ids_for(tok.vocab_size)
    assert (logits(hf, ids) - logits(fused, ids)).abs().max() <= 1e-5


def test_a_failed_export_leaves_nothing(tmp_path, tok, monkeypatch):
    from lmforge.model import hf

    model = adapted(tiny(tok.vocab_size), LoRAConfig(r=2, targets=("wq",)))
    save_checkpoint(tmp_path / "run", 1, model, tokenizer=tok)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")

    def fail(model, path, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(hf, "save_pretrained", fail)
    for adapter, base_out in ((False, None), (True, str(tmp_path / "base"))):
        with pytest.raises(OSError, match="No space left"):
            export(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "out"), force=True,
                                adapter=adapter, base_out=base_out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporary directory left
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_training_guide_export_example_runs(tmp_path, monkeypatch):
    """docs/training.md's export example: its sft-lora.toml, commands and Python block, on a toy init."""
    monkeypatch.chdir(tmp_path)
    text = DOCS.read_text()
    toml = next(b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL) if b.startswith("# sft-lora.toml"))
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL) if "lmforge export" in b)
    code = next(b for b in re.findall(r"```py\n(.*?)```", text, flags=re.DOTALL) if "PeftModel" in b)
    Path("sft-lora.toml").write_text(toml)
    save_checkpoint("runs/pretrain", 1, tiny(257), tokenizer=ByteTokenizer())
    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
            for a in range(4) for b in range(4)]
    Path("chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for line in block.splitlines()[1:]:
        assert main(shlex.split(line.split("  #")[0])[1:]) == 0, line
    scope: dict = {}
    exec(compile(code, str(DOCS), "exec"), scope)  # noqa: S102  the guide's own block, as test_docs runs them
    trained, _ = load_model("runs/sft-lora")
    assert scope["prompt"] == get_template("plain").render([{"role": "user", "content": "2+3?"}])
    want = logits(trained, scope["ids"])
    for hf in (scope["model"], scope["adapted"]):
        assert (logits(hf.eval(), scope["ids"]) - want).abs().max() <= 1e-5


def test_a_peft_made_adapter_loads_into_lmforge(tmp_path, tok, capsys):
    """The import direction: an adapter PEFT itself trained-like (random B, rsLoRA, a rank_pattern, lm_head
    kept in full) over a HF model opens with load_model / LLM.load as lmforge LoRA layers, giving PEFT's
    logits; so does what `lmforge export --adapter` wrote. What lmforge's LoRA cannot compute is refused."""
    from lmforge.infer.llm import LLM

    base = tiny(tok.vocab_size)
    base.save_pretrained(tmp_path / "base")
    tok.save_hf(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    conf = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                           rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"], init_lora_weights=False)
    trained = peft.get_peft_model(hf, conf)
    with torch.no_grad():
        trained.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    trained.save_pretrained(tmp_path / "adapter")
    ids = ids_for(tok.vocab_size)
    want = logits(trained.eval(), ids)
    assert (logits(base, ids) - want).abs().max() > 1e-2  # the adapter matters
    model, got_tok = load_model(tmp_path / "adapter", base=tmp_path / "base")
    assert (logits(model, ids) - want).abs().max() <= 1e-5 and got_tok.encode("Hello") == tok.encode("Hello")
    ranks = {n.rsplit(".", 1)[-1]: m.lora_A.shape[0] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert ranks == {"wq": 4, "wv": 4, "down": 2} and len([m for m in model.modules() if hasattr(m, "lora_A")]) == 6
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")  # a local base recorded: found without base=
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    llm = LLM.load(tmp_path / "adapter")
    assert (logits(llm.model, ids) - want).abs().max() <= 1e-5
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0  # a PEFT directory, merged
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged, ids) - want).abs().max() <= 1e-5
    # what lmforge export --adapter wrote opens back as the adapted model
    lora = LoRAConfig(r=4, alpha=8, targets=TARGETS, trainable=("lm_head",))
    adapted_model = adapted(base, lora)
    lora_run(tmp_path / "run", adapted_model, tok, lora)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--adapter"]) == 0
    assert (logits(load_model(tmp_path / "out")[0], ids) - logits(adapted_model, ids)).abs().max() <= 1e-5
    cfg["base_model_name_or_path"] = "org/some-hub-model"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="'org/some-hub-model', which is not a local directory .* base=DIR"):
        load_model(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(Exception, match="sets use_dora but holds no lora_magnitude_vector for blocks.0"):
        load_model(tmp_path / "adapter", base=tmp_path / "base")
    for bad, msg in [({**cfg, "peft_type": "IA3"}, "is a IA3 adapter; lmforge applies LoRA adapters only"),
                     ({**cfg, "lora_alpha": None}, "lora_alpha is None, not a finite number")]:
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(bad))
        with pytest.raises(Exception, match=msg):
            load_model(tmp_path / "adapter", base=tmp_path / "base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--checkpoint", str(tmp_path / "adapter"), "--prompts", "Hi"]) == 2  # hub id base
    assert "not a local directory" in _one_line_error(capsys)


def test_a_peft_head_over_a_tied_base_is_refused_in_one_line(tmp_path, tok):
    """PEFT keeps lm_head in full (modules_to_save) as a head of its own, also where the base ties its head to
    the embeddings (Qwen2.5-0.5B, Gemma): the tied lmforge model has no place for it, so loading says what to do
    (found by random PEFT adapters over random HF models, 2026-12-05; it said 'neither a LoRA factor nor ...')."""
    base = tiny(tok.vocab_size, tie_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    conf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft.get_peft_model(hf, conf).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"keeps lm_head in full .* tied to its embeddings .* \(merge_and_unload\)"):
        load_model(tmp_path / "adapter", base=tmp_path / "base", tokenizer=False)


def test_gemma_norms_kept_in_full_cross_both_ways(tmp_path, tok):
    """Gemma stores norm gains minus one: a PEFT adapter keeping the norms in full (modules_to_save=["norm"]
    matches every *norm module) loads into lmforge with PEFT's logits, and lmforge's export of an adapter run
    that trained final_norm loads in PEFT with lmforge's (both were refused: the offset rule is not a plain
    name; found by random PEFT adapters over random HF models, 2026-12-05)."""
    model = _from_hf(tmp_path, tok.vocab_size, "Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2,
                     head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
    tok.save_hf(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    trained = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                      modules_to_save=["norm"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    trained.save_pretrained(tmp_path / "adapter")
    ids = ids_for(tok.vocab_size)
    want = logits(trained.eval(), ids)
    assert (logits(model, ids) - want).abs().max() > 1e-2
    assert (logits(load_model(tmp_path / "adapter", base=tmp_path / "hf")[0], ids) - want).abs().max() <= 1e-5
    lora = LoRAConfig(r=2, alpha=4.0, targets=("wq", "wv"), trainable=("final_norm",))
    adapted_model = adapted(model, lora)
    lora_run(tmp_path / "run", adapted_model, tok, lora)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft"), "--adapter"]) == 0
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    got = peft.PeftModel.from_pretrained(written, tmp_path / "peft").eval()
    assert (logits(got, ids) - logits(adapted_model, ids)).abs().max() <= 1e-5


def test_exported_files_follow_the_umask(tmp_path, tok):
    """safetensors' save_file makes 0600 files, so model.safetensors (every shard of a sharded save) and a PEFT
    export's adapter_model.safetensors were unreadable to collaborators where checkpoints were not (found
    2026-12-05); every exported file and folder now has the modes a plain open() / mkdir gives."""
    import os

    from lmforge.model.hf import save_pretrained

    lora = LoRAConfig(r=2, targets=("wq", "wo"))
    lora_run(tmp_path / "run", adapted(tiny(tok.vocab_size), lora), tok, lora)
    old = os.umask(0o027)
    try:
        assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
        assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft"), "--adapter"]) == 0
        save_pretrained(tiny(tok.vocab_size), tmp_path / "sharded", max_shard_bytes=60_000)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")
             if p.relative_to(tmp_path).parts[0] != "run"}
    assert {"merged/model.safetensors", "peft/adapter_model.safetensors", "peft/base/model.safetensors",
            "sharded/model-00002-of-00003.safetensors"} <= set(modes)  # (149 kB of fp32 weights: 3 shards)
    assert {p: m for p, m in modes.items() if m != (0o750 if (tmp_path / p).is_dir() else 0o640)} == {}


def test_an_out_that_no_export_could_replace_is_a_one_line_error(tmp_path, tok, capsys, monkeypatch):
    """OUT under a file (NotADirectoryError), the current directory (OSError: Device or resource busy from
    renaming '.') and --base-out '' gave tracebacks, an empty file 'exists and is not empty' (found
    2026-12-05); each is refused before the checkpoint is read, naming what OUT is."""
    save_checkpoint(tmp_path / "run", 1, tiny(tok.vocab_size), tokenizer=tok)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "here").mkdir()
    run, empty = str(tmp_path / "run"), str(tmp_path / "empty.txt")
    cases = [
        ([empty], f"OUT '{empty}' is an existing file, not a directory; set OUT to a new or existing directory, "
                  "or move the file away"),
        ([f"{empty}/out", "--force"], f"OUT '{empty}/out' lies under '{empty}', an existing file, not a directory; "
                                      "set OUT to a new or existing directory, or move the file away"),
        ([str(tmp_path / "peft"), "--adapter", "--base-out="], "--base-out is empty; set --base-out to a new or "
                                                               "existing directory"),
        ([".", "--force"], ". is the current directory or holds it, and an export replaces its directory whole; "
                           "run lmforge from another directory, or export into another one"),
        ([str(tmp_path), "--force"], f"{tmp_path} is the current directory or holds it, and an export replaces its "
                                     "directory whole; run lmforge from another directory, or export into another one"),
    ]
    monkeypatch.chdir(tmp_path / "here")
    for args, message in cases:
        assert main(["export", run, *args]) == 2
        assert _one_line_error(capsys).splitlines()[0] == f"lmforge export: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "here", "run"]
    assert (tmp_path / "empty.txt").read_bytes() == b"" and list((tmp_path / "here").iterdir()) == []


def _hf_adapter(path: Path, model, lora: LoRAConfig, base: Path) -> Path:
    """to_peft's files for a HF model behind HFCausalLM, written as a PEFT adapter directory over `base`."""
    from safetensors.torch import save_file

    from lmforge.adapt.peft_format import to_peft

    config, tensors = to_peft(model, "unused", to_dict(lora))
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return path


def test_peft_adapters_of_a_hf_model_load_in_peft_or_are_refused(tmp_path):
    """LoRA on a transformers model behind HFCausalLM (built from a config, no hub; a plain Llama is
    tests/adapt/test_peft_format.py's): DeepSeek-V3's attention adapters load with PeftModel.from_pretrained to
    the adapted model's logits. An adapter PEFT would load onto other weights - a DeepSeek-V3 dense MLP
    projection, which PEFT's transformers-5 MoE conversion moves onto the experts - and one over a base that is
    no nn.Linear (a quantized layer) are refused in one line (they were written)."""
    from lmforge.infer.hf_wrapper import HFCausalLM

    from .adapt.test_lora import Int8Linear

    ids = ids_for(96)
    deepseek = HFCausalLM(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, **DEEPSEEK)))
    deepseek.hf.save_pretrained(tmp_path / "deepseek")
    attention = LoRAConfig(r=2, targets=("q_a_proj", "kv_b_proj"))
    model = adapted(deepseek, attention)
    _hf_adapter(tmp_path / "attn", model, attention, tmp_path / "deepseek")
    got = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deepseek"),
                                         tmp_path / "attn").eval()
    assert (logits(got, ids) - logits(model, ids)).abs().max() <= 1e-6
    mlp = LoRAConfig(r=2, targets=("mlp.gate_proj", "mlp.up_proj"))
    with pytest.raises(ConfigError, match=r"LoRA layer hf.model.layers.0.mlp.gate_proj is the deepseek_v3 module "
                                          r"model.layers.0.mlp.gate_proj, whose adapter PEFT .* loads onto the MoE "
                                          r"experts' fused weights"):
        _hf_adapter(tmp_path / "mlp", adapted(deepseek, mlp), mlp, tmp_path / "unused")
    quantized = HFCausalLM(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)))
    quantized.hf.model.layers[0].self_attn.q_proj = Int8Linear(quantized.hf.model.layers[0].self_attn.q_proj)
    lora = LoRAConfig(r=2, targets=("q_proj",))
    with pytest.raises(ConfigError, match="hf.model.layers.0.self_attn.q_proj wraps a Int8Linear .*, not an nn.Linear"):
        _hf_adapter(tmp_path / "q", adapted(quantized, lora), lora, tmp_path / "unused")


def test_a_refused_export_prints_its_error_alone_naming_what_the_user_set(tmp_path, capsys):
    """A refusal comes first and alone: --adapter on a checkpoint without adapters printed a lora_dropout note,
    and a merged export the "merged N adapters" line, before the error. An MoE layout the family cannot hold is
    named by the MoE setting, not by model.d_ff (which sizes no layer of a model without dense MLPs, and is a
    consequence where it does)."""
    from lmforge.model.config import MoEConfig

    save_checkpoint(tmp_path / "full", 1, tiny(300))
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "peft"), "--adapter"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") <= 2 and "holds no LoRA adapters" in err  # (+ the --debug hint line)
    for moe, named in [(MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared=1), "model.moe.n_shared=1"),
                       (MoEConfig(n_experts=4, top_k=2, d_expert=16, dense_layers=1), "model.moe.dense_layers=1")]:
        model = adapted(tiny(300, mlp="moe", moe=moe), LoRAConfig(r=2, targets=("wq",)))
        lora_run(tmp_path / named, model, None, LoRAConfig(r=2, targets=("wq",)))
        for adapter in ([], ["--adapter"]):
            assert main(["export", str(tmp_path / named), str(tmp_path / "out"), "--family", "mixtral", *adapter]) == 2
            out, err = capsys.readouterr()
            assert out == "" and f"the mixtral HF layout cannot express {named} " in err and "d_ff" not in err


def test_export_of_qkv_biases_without_an_o_bias_names_the_family_that_holds_them(tmp_path, capsys):
    """--family llama would write one attention_bias for q, k, v and o: refused in one line naming qwen2, which holds
    q/k/v biases alone; without --family the export picks qwen2 and transformers computes the model's logits."""
    save_checkpoint(tmp_path / "ckpt", 1, tiny(300, qkv_bias=True, o_bias=False))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "llama"), "--family", "llama"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("lmforge export: error: save_pretrained: the llama HF layout cannot express "
                                        "model.o_bias=False (it reads back as True)")
    assert "export it as qwen2 (family='qwen2'; lmforge export --family qwen2)" in err and "Traceback" not in err
    assert not (tmp_path / "llama").exists()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert "a HF qwen2 model" in capsys.readouterr().out
    model, _ = load_model(tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_dora_adapters_cross_to_peft_both_ways(tmp_path, tok):
    """DoRA: `lmforge export --adapter` writes use_dora and each layer's lora_magnitude_vector, which PEFT loads
    to the lmforge model's logits; load_model opens that directory, and one PEFT made, as lmforge DoRA layers
    with PEFT's logits. A merged export folds the magnitudes in."""
    from lmforge.adapt.dora import DoRALinear

    base = tiny(tok.vocab_size)
    lora = LoRAConfig(r=4, alpha=8, targets=("wq", "wv", "down"), dora=True)
    model = adapted(base, lora)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DoRALinear):
                m.magnitude.mul_(1.2)
    lora_run(tmp_path / "run", model, tok, lora)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "peft"), "--adapter"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    ids, want = ids_for(tok.vocab_size), logits(model, ids_for(tok.vocab_size))
    got = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base"),
                                         tmp_path / "peft").eval()
    assert (logits(got, ids) - want).abs().max() <= 1e-5
    back = load_model(tmp_path / "peft")[0]
    assert sum(isinstance(m, DoRALinear) for m in back.modules()) == 6
    assert (logits(back, ids) - want).abs().max() <= 1e-5
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, ids) - want).abs().max() <= 1e-5
    base.save_pretrained(tmp_path / "base")
    made = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.9)
    made.save_pretrained(tmp_path / "made")
    mine = load_model(tmp_path / "made", base=tmp_path / "base", tokenizer=False)[0]
    assert (logits(mine, ids) - logits(made.eval(), ids)).abs().max() <= 1e-5


def _int8():
    """tests/adapt's stand-in quantized Linear (int8 codes, per-row scales), registrable: with from_linear."""
    from .adapt.test_lora import Int8Linear

    class Int8(Int8Linear):
        @classmethod
        def from_linear(cls, linear: torch.nn.Linear) -> "Int8":
            return cls(linear)

    return Int8


def test_qlora_adapters_export_to_peft_over_their_float_base(tmp_path, tok, capsys, monkeypatch):
    """A QLoRA checkpoint (adapters over Linears quantized after its float base was loaded) was refused by both
    exports. --adapter writes PEFT adapters over the float base its base record names, with a note that the
    adapters were trained over a quantized base; PEFT over that base gives lmforge's float base + the same
    adapters. A merged export stays refused, naming why and --adapter."""
    from lmforge.adapt.lora import load_lora, lora_state_dict
    from lmforge.adapt.qlora import BASE_LAYERS
    from lmforge.checkpoint import base_record

    int8 = _int8()
    monkeypatch.setitem(BASE_LAYERS, "test-export-int8", int8)
    save_checkpoint(tmp_path / "fbase", 0, tiny(tok.vocab_size), tokenizer=tok)
    fbase = tmp_path / "fbase" / "checkpoints" / "step_000000"
    model = load_model(fbase, tokenizer=False)[0]
    for block in model.blocks:
        block.attn.wq, block.attn.wv = int8(block.attn.wq), int8(block.attn.wv)
    lora = LoRAConfig(r=4, alpha=8, targets=("wq", "wv", "up"))
    model = adapted(model, lora)
    save_checkpoint(tmp_path / "run", 1, model, tokenizer=tok, base=base_record(fbase))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": {"lora": to_dict(lora)}}))
    with pytest.raises(ConfigError, match=r"trained over quantized layers \(blocks.0.attn.wq: test-export-int8, "
                                          r"QLoRA\).*export with --adapter"):
        export(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "merged")))
    assert not (tmp_path / "merged").exists()
    export(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "peft"), adapter=True))
    note = capsys.readouterr().out
    assert f"trained over 4 quantized layers (QLoRA) and are written over the float base those were quantized " \
           f"from ({fbase.resolve()})" in note
    floats = apply_lora(load_model(fbase, tokenizer=False)[0], lora)  # lmforge: the float base + the same adapters
    load_lora(floats, lora_state_dict(model, lora))
    ids = ids_for(tok.vocab_size)
    got = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base"),
                                         tmp_path / "peft").eval()
    assert (logits(got, ids) - logits(floats.eval(), ids)).abs().max() <= 1e-5
    assert (logits(got, ids) - logits(model, ids)).abs().max() > 0  # the quantization error: not the trained model
    whole = save_checkpoint(tmp_path / "whole", 1, model, tokenizer=tok)  # no float base recorded: none to go over
    with pytest.raises(ConfigError, match="holds its quantized base whole and records no float base"):
        export(ExportConfig(checkpoint=str(whole), out=str(tmp_path / "peft2"), adapter=True))


@pytest.mark.parametrize("args", [["--checkpoint", "runs/sft", "--out", "out/sft"], ["--checkpoint=runs/sft", "out"],
                                  ["runs/sft", "--out", "out/sft"]])
def test_checkpoint_and_out_given_as_flags_are_named_as_positional(args, capsys):
    """`lmforge export --checkpoint X --out Y` (the flag sample, generate and chat take) was tyro's box saying
    "Missing value for argument 'checkpoint'", the argument the user had just given."""
    from lmforge.cli import main

    assert main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert "'s value as a positional argument, without the flag: lmforge export CKPT OUT [options]" in err
    assert "Missing value" not in err


def test_an_export_never_replaces_a_base_the_checkpoint_is_loaded_over(tmp_path, tok):
    """`lmforge export RUN BASE_RUN --force`, BASE_RUN the run an adapter-only checkpoint's base is in, replaced it
    with the export: the adapters' base was lost for good (found 2026-12-07). Refused for every base along the chain
    (a LoRA run over a LoRA run over a base) and for a PEFT directory's base, as the exported checkpoint itself is."""
    from lmforge.adapt.lora import merge_lora
    from lmforge.checkpoint import base_record

    save_checkpoint(tmp_path / "base", 0, tiny(tok.vocab_size), tokenizer=tok)
    base = tmp_path / "base" / "checkpoints" / "step_000000"
    lora = LoRAConfig(r=2, alpha=4, targets=("wq",))
    first = save_checkpoint(tmp_path / "first", 1, adapted(load_model(base)[0], lora), tokenizer=tok,
                            base=base_record(base))
    second = save_checkpoint(tmp_path / "second", 1, adapted(merge_lora(load_model(first)[0]), lora), tokenizer=tok,
                             base=base_record(first, merge_lora=True))
    before = sorted(p.name for p in (tmp_path / "base").rglob("*"))
    for out, held in ((tmp_path / "base", base), (tmp_path / "first", first)):
        with pytest.raises(ConfigError, match="^" + re.escape(
                f"{out} holds {held.resolve()}, the base model the adapters of {second} are loaded over, which the "
                "export would replace; write the export elsewhere") + "$"):
            export(ExportConfig(checkpoint=str(tmp_path / "second"), out=str(out), force=True))
    assert sorted(p.name for p in (tmp_path / "base").rglob("*")) == before and first.is_dir()
    export(ExportConfig(checkpoint=str(first), out=str(tmp_path / "peft"), adapter=True))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'peft' / 'base'))} holds .*, the base model "):
        export(ExportConfig(checkpoint=str(tmp_path / "peft"), out=str(tmp_path / "peft" / "base"), force=True))
    export(ExportConfig(checkpoint=str(tmp_path / "second"), out=str(tmp_path / "peft"), adapter=True, force=True))


def test_a_hf_directory_whose_config_has_a_base_key_is_no_adapter_checkpoint(tmp_path, tok):
    """export read a checkpoint's recorded base from config.json by hand, where load_model reads it through
    checkpoint.recorded_base (an lmforge checkpoint's only): a HF directory whose config.json has a "base" key was
    taken for an adapter-only checkpoint loaded over that path, and an export replacing that directory was refused.
    Export reads it through recorded_base too: the two no longer disagree."""
    from lmforge.checkpoint import recorded_base
    from lmforge.cli.export import bases

    tiny(tok.vocab_size).save_pretrained(tmp_path / "hf")
    tiny(tok.vocab_size, seed=1).save_pretrained(tmp_path / "other")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "base": {"path": str(tmp_path / "other")}}))
    assert recorded_base(tmp_path / "hf") is None and bases(tmp_path / "hf", None) == []
    export(ExportConfig(checkpoint=str(tmp_path / "hf"), out=str(tmp_path / "other"), force=True))
    ids = ids_for(tok.vocab_size)
    assert torch.equal(logits(Transformer.from_pretrained(tmp_path / "other"), ids),
                       logits(Transformer.from_pretrained(tmp_path / "hf"), ids))


def test_the_bases_a_checkpoint_is_loaded_over_are_found_once(tmp_path, tok, monkeypatch):
    """export walked the chain of bases (`bases`: each one's records read, resolved) once per target, twice with
    --base-out; once now, for both."""
    import lmforge.cli.export as export_mod
    from lmforge.checkpoint import base_record

    save_checkpoint(tmp_path / "base", 0, tiny(tok.vocab_size), tokenizer=tok)
    base = tmp_path / "base" / "checkpoints" / "step_000000"
    lora = LoRAConfig(r=2, alpha=4, targets=("wq",))
    save_checkpoint(tmp_path / "run", 1, adapted(load_model(base)[0], lora), tokenizer=tok, base=base_record(base))
    calls = []
    real = export_mod.bases
    monkeypatch.setattr(export_mod, "bases", lambda *a: calls.append(a) or real(*a))
    with pytest.raises(ConfigError, match="^--family 'nope' is not"):  # refused after the targets' checks
        export(ExportConfig(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "peft"), adapter=True,
                            base_out=str(tmp_path / "peft_base"), family="nope"))
    assert len(calls) == 1 and real(*calls[0]) == [base.resolve()]

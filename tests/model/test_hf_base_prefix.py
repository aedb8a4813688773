"""A HF checkpoint whose tensors are named without the base model's prefix loads: GPT-2's own files (the hub's
openai-community/gpt2, distilgpt2) hold 'h.0.attn.c_attn.weight', 'wte.weight', 'ln_f.weight', not 'transformer.h.0...',
and a checkpoint saved from a base class (LlamaModel) holds 'layers.0...', not 'model.layers.0...'. transformers adds
the prefix when it loads them into the ForCausalLM class; lmforge refused them ('checkpoint lacks tensor
'transformer.wte.weight'') until 2026-12-07."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from lmforge.model.transformer import Transformer  # noqa: E402

MODELS = {
    "transformer.": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "model.": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("prefix", sorted(MODELS))
def test_tensors_named_without_the_base_prefix_load_as_transformers_loads_them(tmp_path, prefix):
    torch.manual_seed(0)
    hf = MODELS[prefix]().float().eval()
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = {k.removeprefix(prefix): v for k, v in load_file(f).items()}
    if prefix == "transformer.":  # GPT-2's files also hold each layer's causal-mask buffer
        tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)})
    save_file(tensors, str(f), metadata={"format": "pt"})
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()(ids).logits
        got = Transformer.from_pretrained(tmp_path, dtype=torch.float32)(ids)
    assert (theirs - want).abs().max().item() <= 1e-5  # transformers reads the layout as the same model
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cls", ["LlamaForSequenceClassification", "LlamaModel"])
def test_a_checkpoint_of_another_class_than_the_causal_lm_is_named(tmp_path, cls):
    """A reward model or classifier (a 'score' head) or a bare base model has no lm_head: the error names the class
    config.json says it is, not only the missing tensor."""
    from lmforge.errors import CheckpointError

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    getattr(transformers, cls)(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=rf"lacks tensor 'lm_head\.weight'.*architectures=\['{cls}'\] is not "
                                              r"the causal LM LlamaForCausalLM"):
        Transformer.from_pretrained(tmp_path)

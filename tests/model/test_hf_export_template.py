"""`lmforge export` of a HF model directory keeps its own chat template (tokenizer_config.json's Jinja) and the special
tokens that Jinja reads (bos_token, eos_token): the export wrote no template, and named the model's first eos id as
eos_token (Llama-3-Instruct's <|end_of_text|> where its config says <|eot_id|>)."""

from __future__ import annotations

import json

import torch

from lmforge.checkpoint import hf_chat_template
from lmforge.cli.export import ExportConfig, export
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.train import train_bpe

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
JINJA = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
         "{{ m['content'] }}{{ eos_token }}{% endfor %}"
         "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MESSAGES = [{"role": "user", "content": "hello world"}]


def test_export_of_a_hf_directory_keeps_its_chat_template(tmp_path):
    tok = train_bpe(iter(["hello world, the user and the assistant\n" * 20]), 300, SPECIALS, progress=False,
                    workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    d_ff=48, max_seq_len=64))
    src = tmp_path / "hf"
    model.eos_token_ids = (tok.special_tokens["<|end_of_text|>"], tok.special_tokens["<|eot_id|>"])
    model.save_pretrained(src)
    tok.save_hf(src)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": JINJA}))
    export(ExportConfig(checkpoint=str(src), out=str(tmp_path / "out")))
    conf = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (conf["chat_template"], conf["bos_token"], conf["eos_token"]) == (JINJA, "<|begin_of_text|>", "<|eot_id|>")
    want = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert hf_chat_template(tmp_path / "out").render(MESSAGES, add_generation_prompt=True) == want
    assert hf_chat_template(src).render(MESSAGES, add_generation_prompt=True) == want

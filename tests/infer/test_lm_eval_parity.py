"""LLM.score against the independent reference it claims to be: lm-eval's own HFLM.loglikelihood on the same
tiny model (written as a HF checkpoint and loaded by transformers) and the same GPT-2 tokenizer. Covers lm-eval's
string split (trailing whitespace moved, the context's own tokens where a merge crosses the boundary), its
window of max_length + 1 tokens for a pair that does not fit, and its empty context (the end-of-text token)."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.llm import LLM
from lmforge.tokenizer.load import load_tokenizer

from ..conftest import shared_data
from .infer_helpers import tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the reference here (pip install lm-eval)")


def test_score_equals_lm_eval_hf_loglikelihood(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = load_tokenizer(shared_data("gpt2"))
    text = shared_data("tinyshakespeare", "input.txt").read_text()[:6000]
    model = tiny_model("llama", vocab_size=50257, init_std=0.3, max_seq_len=64)
    model.save_pretrained(tmp_path)
    tok.save_hf(tmp_path)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ref = HFLM(pretrained=hf, tokenizer=hf_tok, max_length=64, batch_size=3, device="cpu")
    pairs = [("First Citizen:\nBefore we proceed", " any further"),
             ("Speak, speak. ", "You are all resolved"),         # trailing space moves to the continuation
             (text[5000:5400], text[5400:5460]),                  # "\nW" + "hat": a merge across the boundary
             (text[:2000], " hear me speak."),                    # 500+ tokens: lm-eval's window of 65
             ("", "First Citizen"),                              # empty context: the end-of-text token
             ("", "<|endoftext|>First Citizen"),                 # ... or the continuation's own first token
             ("x", text[300:480])]                                # a 58-token continuation
    want = ref.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    got = LLM(model, tok).score(pairs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4, rel=1e-6)
    assert len(tok.encode(pairs[3][0])) > 64  # (the window case is one)

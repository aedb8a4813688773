"""LLM.score against the independent reference it claims to be: lm-eval's own HFLM.loglikelihood on the same
tiny model (written as a HF checkpoint and loaded by transformers) and the same GPT-2 tokenizer. Covers lm-eval's
string split (trailing whitespace moved, the context's own tokens where a merge crosses the boundary), its
window of max_length + 1 tokens for a pair that does not fit, and its empty context (the end-of-text token); and
LLM.score_rolling against HFLM.loglikelihood_rolling (documents many windows long, one token long, opening with the
prefix token), with GPT-2's tokenizer and with a Llama-3-style one that adds BOS."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.llm import LLM
from lmforge.tokenizer.load import load_tokenizer

from ..conftest import shared_data
from .infer_helpers import tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the reference here (pip install lm-eval)")


def _hflm(path, **special_tokens):
    """lm-eval's HFLM over the HF checkpoint in `path` (the model and tokenizer.json lmforge wrote), window 64."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special_tokens)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return HFLM(pretrained=hf, tokenizer=hf_tok, max_length=64, batch_size=3, device="cpu")


def _gpt2_checkpoint(path):
    """A tiny Llama (window 64) and GPT-2's tokenizer, written to `path` as a HF checkpoint; both returned."""
    tok = load_tokenizer(shared_data("gpt2"))
    model = tiny_model("llama", vocab_size=50257, init_std=0.3, max_seq_len=64)
    model.save_pretrained(path)
    tok.save_hf(path)
    return model, tok


def _lm_eval_rolling(ref, docs: list[str]) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    return ref.loglikelihood_rolling(requests, disable_tqdm=True)


def test_score_equals_lm_eval_hf_loglikelihood(tmp_path):
    from lm_eval.api.instance import Instance

    model, tok = _gpt2_checkpoint(tmp_path)
    text = shared_data("tinyshakespeare", "input.txt").read_text()[:6000]
    ref = _hflm(tmp_path, eos_token="<|endoftext|>")
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


def test_is_greedy_on_a_padded_vocabulary_is_the_tokenizers_argmax_where_lm_eval_takes_every_rows(tmp_path):
    """The one documented difference (docs/inference.md): a padded row (50,304 rows for GPT-2's 50,257 tokens) that
    is the raw argmax. lm-eval's HFLM takes argmax over every row the model returns (0.4.x slices nothing to the
    tokenizer's vocab_size, whatever its comment says), so the continuation is not greedy there; lmforge's is_greedy
    is greedy decoding's choice, which never draws a padded id. The log-probs agree (both over every row)."""
    from lm_eval.api.instance import Instance

    tok = load_tokenizer(shared_data("gpt2"))
    model = tiny_model("llama", vocab_size=50304, init_std=0.3, max_seq_len=64)
    ctx, cont = "First Citizen:\nBefore we proceed", " any"
    ids, c = tok.encode(ctx), tok.encode(cont)[0]
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0][0, -1]))
    with torch.no_grad():
        model(torch.tensor([ids]))
        hook.remove()
        h = seen[0] / seen[0].norm() ** 2  # rows along h: logit = scale after the context
        model.lm_head.weight[c], model.lm_head.weight[50300] = 20 * h, 30 * h  # c: the tokenizer's argmax, 50300 all's
    model.save_pretrained(tmp_path)
    tok.save_hf(tmp_path)
    want = _hflm(tmp_path, eos_token="<|endoftext|>").loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)],
                                                                     disable_tqdm=True)
    got = LLM(model, tok).score([(ctx, cont)])
    assert want[0][1] is False and got[0][1] is True
    assert got[0][0] == pytest.approx(want[0][0], abs=1e-4)


def _llama3_style_tokenizer(tmp_path):
    """GPT-2's tokenizer.json with Llama-3's BOS rule: <|begin_of_text|> (id 50257) added by a TemplateProcessing
    post_processor, so HF's encode puts it before every text."""
    import json

    load_tokenizer(shared_data("gpt2")).save_hf(tmp_path)
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    bos = "<|begin_of_text|>"
    doc["added_tokens"].append({"id": 50257, "content": bos, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True})
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    doc["post_processor"] = {"type": "Sequence", "processors": [doc["post_processor"], {
        "type": "TemplateProcessing", "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [50257], "tokens": [bos]}}}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))


def test_score_and_prompts_equal_lm_eval_with_a_bos_tokenizer(tmp_path):
    """A Llama-3-style tokenizer.json (its post_processor adds BOS): HFLM scores every context after BOS, an empty
    one as BOS alone, and a text already opening with BOS gets no second one; LLM.load reads the rule from the
    directory and score / generate follow it, while the text's own encode (chat templates, training) adds none."""
    from lm_eval.api.instance import Instance

    from lmforge.infer.sampling import SamplingParams

    _llama3_style_tokenizer(tmp_path)
    tiny_model("llama", vocab_size=50258, init_std=0.3, max_seq_len=64).save_pretrained(tmp_path)
    ref = _hflm(tmp_path, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>")
    hf_tok = ref.tokenizer
    text = shared_data("tinyshakespeare", "input.txt").read_text()[:3000]
    pairs = [("The capital of France is", " Paris"),
             ("Speak, speak. ", "You are all resolved"),          # trailing space moves to the continuation
             ("", "First Citizen"),                               # empty context: BOS, not end-of-text
             ("", "<|begin_of_text|>First Citizen"),              # ... or the continuation's own BOS
             ("<|begin_of_text|>First Citizen:", " Before we"),  # BOS already there: not doubled
             (text[:1500], " hear me speak.")]                    # past the window: BOS cut with the oldest tokens
    want = ref.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    llm = LLM.load(tmp_path)
    got = llm.score(pairs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4, rel=1e-6)
    assert llm.score_tokens(pairs[2:3])[0].context_ids == [50257]
    sp = SamplingParams(max_tokens=1, temperature=0)
    for prompt in ("Hello world", "<|begin_of_text|>Hello world"):
        out = llm.generate(prompt, sp)[0]
        assert out.prompt_token_ids == ref.tok_encode(prompt) == [50257] + hf_tok.encode("Hello world")[1:]
    assert llm.tokenizer.encode("Hello world") == hf_tok.encode("Hello world", add_special_tokens=False)


def test_score_rolling_equals_lm_eval_loglikelihood_rolling(tmp_path):
    """Windows of 64 in lm-eval's layout, the first token after end-of-text (GPT-2 has no BOS); a document that
    opens with end-of-text has it scored after the prefix one, as lm-eval does."""
    model, tok = _gpt2_checkpoint(tmp_path)
    text = shared_data("tinyshakespeare", "input.txt").read_text()[:6000]
    ids = tok.encode(text)
    docs = [text,                                       # 1690 tokens: 26 full windows and a short last one
            tok.decode(ids[:64]), tok.decode(ids[:65]),  # exactly one window; one token past it
            "x",                                        # one token
            "<|endoftext|>First Citizen"]               # opens with the prefix token
    want = _lm_eval_rolling(_hflm(tmp_path, eos_token="<|endoftext|>"), docs)
    got = LLM(model, tok).score_rolling(docs)
    assert [len(s.token_ids) for s in got] == [1690, 64, 65, 1, 3]
    assert [s.logprob for s in got] == pytest.approx(want, abs=1e-4, rel=1e-6)


def test_score_rolling_equals_lm_eval_with_a_bos_tokenizer(tmp_path):
    """A Llama-3-style tokenizer: the prefix token is BOS, and lm-eval's text tokens already open with BOS, so
    its first scored token is BOS after BOS; LLM.score_rolling on strings gives the same numbers."""
    _llama3_style_tokenizer(tmp_path)
    tiny_model("llama", vocab_size=50258, init_std=0.3, max_seq_len=64).save_pretrained(tmp_path)
    text = shared_data("tinyshakespeare", "input.txt").read_text()[:3000]
    docs = [text, "x", "<|begin_of_text|>First Citizen"]  # (BOS already there: not doubled by the tokenizer)
    want = _lm_eval_rolling(_hflm(tmp_path, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>"), docs)
    got = LLM.load(tmp_path).score_rolling(docs)
    assert [s.token_ids[0] for s in got] == [50257] * 3 and [s.context_ids for s in got] == [[50257]] * 3
    assert [s.logprob for s in got] == pytest.approx(want, abs=1e-4, rel=1e-6)

"""Chat templates continuing a partial assistant message (continue_final_message, checked against
transformers' apply_chat_template on the exported Jinja) and stopping where a model writes the next turn."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.chat_template import TEMPLATES, get_template
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
PARTIAL = [
    [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": '{"answer": "'}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 2+4?"},
     {"role": "assistant", "content": "It is "}],
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": ""}],
]


def _bpe():
    from lmforge.tokenizer.train import train_bpe

    text = 'Hello world! The quick brown fox. 2+3=5 user assistant system {"answer": "It is "}\n' * 40
    return train_bpe(iter([text]), 340, SPECIALS, progress=False, workers=1)


def test_continue_final_message_leaves_the_last_message_open():
    t = get_template("plain")
    assert t.render(PARTIAL[0], continue_final_message=True) == 'User: Give JSON\nAssistant: {"answer": "'
    assert t.render(PARTIAL[0], add_generation_prompt=False, continue_final_message=True).endswith('"answer": "')
    chatml = get_template("chatml")
    assert chatml.render(PARTIAL[1], continue_final_message=True).endswith("<|im_start|>assistant\nIt is ")
    ids, mask = t.encode(ByteTokenizer(), PARTIAL[1], continue_final_message=True)
    assert bytes(ids).decode() == t.render(PARTIAL[1], continue_final_message=True)
    assert bytes(i for i, m in zip(ids, mask) if m).decode() == "5\nIt is "
    with pytest.raises(ConfigError, match="pass add_generation_prompt=False"):
        t.render(PARTIAL[0], add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ConfigError, match="last message is 'user'"):
        t.render(PARTIAL[0][:1], continue_final_message=True)
    with pytest.raises(ConfigError, match="last message is None"):
        t.encode(ByteTokenizer(), [], continue_final_message=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_continue_final_message_matches_transformers(tmp_path, name):
    """HF's apply_chat_template(continue_final_message=True) on ChatTemplate.jinja() (what `lmforge export`
    writes) gives the same text and the same tokens as ChatTemplate.encode(continue_final_message=True)."""
    transformers = pytest.importorskip("transformers")
    from lmforge.cli.export import TokenizerFiles, as_bpe

    byte = name == "plain"
    tok = ByteTokenizer() if byte else _bpe()
    TokenizerFiles(as_bpe(tok, tok.vocab_size), get_template(name), (), 128, byte).write(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    t = get_template(name)
    for conversation in PARTIAL:
        text = hf.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
        assert text == t.render(conversation, continue_final_message=True)
        ids = hf.apply_chat_template(conversation, tokenize=True, continue_final_message=True)["input_ids"]
        assert ids == t.encode(tok, conversation, continue_final_message=True)[0]


def test_llm_chat_continues_a_partial_answer(tok):
    llm = LLM(tiny_model(), tok)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.chat(PARTIAL[0], p, template="plain", continue_final_message=True)[0]
    prompt = 'User: Give JSON\nAssistant: {"answer": "'
    assert bytes(out.prompt_token_ids).decode() == prompt
    assert out.token_ids == llm.generate(prompt, p)[0].token_ids
    with pytest.raises(ConfigError, match="add_generation_prompt=False"):
        llm.chat(PARTIAL[0], p, template="plain", continue_final_message=True, add_generation_prompt=True)
    closed = llm.chat(PARTIAL[0], p, template="plain", add_generation_prompt=False)[0]
    assert bytes(closed.prompt_token_ids).decode() == prompt + "\n"


def _force(text: str, tok):
    """A logits processor writing exactly `text`, then the end-of-text token."""
    seq = list(text.encode())

    def f(ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[seq[len(ids)] if len(ids) < len(seq) else tok.eot_id] = 0.0
        return out
    return f


@pytest.mark.parametrize("role", ["Tool", "System", "Assistant", "User"])
def test_plain_answer_stops_where_the_model_writes_any_next_turn(tok, role):
    """A model fabricating the next turn (a tool's result, the classic ReAct failure) is cut there."""
    assert get_template("plain").stop == ("\nSystem:", "\nUser:", "\nAssistant:", "\nTool:")
    llm = LLM(tiny_model(), tok)
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Action: calc[2+2]"},
            {"role": "tool", "content": "4"}]
    p = SamplingParams(temperature=0, max_tokens=40, logits_processors=(_force(f"It is 4.\n{role}: 5\nok", tok),))
    out = llm.chat(msgs, p, template="plain")[0]
    assert out.text == "It is 4." and out.finish_reason == "stop"


def test_marker_templates_stop_at_any_next_turn():
    """chatml and llama3 open every role's turn with one marker: it (and the end marker) is the stop."""
    assert get_template("chatml").stop == ("<|im_end|>", "<|im_start|>")
    assert get_template("llama3").stop == ("<|eot_id|>", "<|start_header_id|>")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_encode_matches_transformers_on_a_pretrained_bpe_tokenizer(tmp_path, name):
    """GPT-2's tokenizer (the plain template is the default for such a model; for chatml and llama3 with their
    markers added as special tokens, as Qwen's and Llama-3's tokenizers have them): a header and the content
    after it are tokenized together, as HF's apply_chat_template tokenizes the rendered text whole ("System:",
    " You", not "System:", " ", "You")."""
    import json

    transformers = pytest.importorskip("transformers")
    from lmforge.tokenizer.load import load_tokenizer

    from ..conftest import shared_data

    load_tokenizer(shared_data("gpt2")).save_hf(tmp_path)
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    for k, s in enumerate(SPECIALS[1:]):
        doc["added_tokens"].append({"id": 50257 + k, "content": s, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    t = get_template(name)
    hf.chat_template = t.jinja()
    judge = [{"role": "system", "content": "You are a fair judge."},
             {"role": "user", "content": "Which answer is better, A or B?"}]
    for conversation, cont in [(judge, False)] + [(c, True) for c in PARTIAL]:
        want = hf.apply_chat_template(conversation, tokenize=True, continue_final_message=cont,
                                      add_generation_prompt=not cont)["input_ids"]
        assert t.encode(tok, conversation, continue_final_message=cont)[0] == want
    if name == "plain":
        assert [tok.decode([i]) for i in t.encode(tok, judge)[0][:3]] == ["System", ":", " You"]


def test_a_token_spanning_header_and_answer_is_trained():
    """SFT's mask with whole-run tokens: a token overlapping an assistant's content (" Hello" starts in the plain
    header's space) is trained; tokens wholly in headers and user turns are not."""
    from lmforge.tokenizer.load import load_tokenizer

    from ..conftest import shared_data

    tok = load_tokenizer(shared_data("gpt2"))
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello friend"}]
    ids, mask = get_template("plain").encode(tok, msgs, add_generation_prompt=False)
    assert ids == tok.encode("User: Hi there\nAssistant: Hello friend\n")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Hello friend\n"
    # each message is its own run: a prompt's ids open its conversation's even where "\n\n" is one token alone
    prompt = [{"role": "user", "content": "Hi there\n"}]
    alone = get_template("plain").encode(tok, prompt, add_generation_prompt=False)[0]
    assert get_template("plain").encode(tok, prompt + msgs[1:], add_generation_prompt=False)[0][:len(alone)] == alone

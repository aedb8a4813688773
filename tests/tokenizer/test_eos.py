"""The end-of-text id (eot_id) of tokenizers read from HF files: the tokenizer_config.json eos_token beside a
tokenizer.json, else the first of byte.EOT_NAMES the specials hold. A Llama-3 tokenizer.json (<|end_of_text|>,
<|eot_id|>) had no eot_id at all, since only <|endoftext|> was looked for: token shards had no document separator
and SFT completions no end token."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.data.shards import TokenFile
from lmforge.errors import ConfigError
from lmforge.tokenizer.corpus import encode_to_shards
from lmforge.tokenizer.load import load_tokenizer
from tests.tokenizer.sp_files import added, sp_doc

LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def _llama3_dir(path, eos_token=None):
    """A byte-level tokenizer.json with Llama 3's special tokens (trained with HF tokenizers), and a
    tokenizer_config.json naming eos_token when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat, said the other cat"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=LLAMA3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    if eos_token is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos_token, "bos_token": LLAMA3[0]}))
    return path


def test_llama3_tokenizer_has_an_end_of_text_id(tmp_path):
    tok = load_tokenizer(_llama3_dir(tmp_path / "base"))
    assert tok.eot_id == tok.special_tokens["<|end_of_text|>"] == 1


@pytest.mark.parametrize("eos", ["<|eot_id|>", {"content": "<|eot_id|>", "special": True}])
def test_tokenizer_config_eos_token_names_it_and_survives_save(tmp_path, eos):
    tok = load_tokenizer(_llama3_dir(tmp_path / "instruct", eos))
    assert tok.eos_token == "<|eot_id|>" and tok.eot_id == 2
    assert load_tokenizer(tok.save(tmp_path / "saved")).eot_id == 2


def test_eos_token_not_a_special_is_refused(tmp_path):
    tok = load_tokenizer(_llama3_dir(tmp_path / "t"))
    with pytest.raises(ConfigError, match="eos_token '<eot>' is not one of the special tokens"):
        type(tok)(tok.vocab, tok.merges, tok.special_tokens, eos_token="<eot>")


def test_sentencepiece_tokenizer_config_eos_token(tmp_path):
    doc = sp_doc()  # <unk> <s> </s>, then (Phi-3's layout) <|endoftext|> added, which its config names eos
    eot = added(doc, "<|endoftext|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    assert load_tokenizer(tmp_path).eot_id == eot  # the first of EOT_NAMES its specials hold
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.eot_id == doc["model"]["vocab"]["</s>"] == 2
    assert load_tokenizer(tok.save(tmp_path / "saved")).eot_id == 2


def test_shards_separate_documents_with_llama3_end_of_text(tmp_path):
    tok = load_tokenizer(_llama3_dir(tmp_path / "base"))
    docs = ["the cat sat", "on the mat"]
    src = tmp_path / "doc.txt"
    src.write_text("<|end_of_text|>".join(docs))
    rep = encode_to_shards(tok, [str(src)], tmp_path / "out", progress=False)
    ids = np.asarray(TokenFile(rep.shards["train"]).tokens).tolist()
    assert ids == [1, *tok.encode_ordinary(docs[0]), 1, *tok.encode_ordinary(docs[1])]
    assert rep.docs["train"] == 2


@pytest.mark.parametrize("layout", ["llama3", "sentencepiece"])
def test_shards_separate_documents_at_endoftext_and_at_llama3s_end_of_text(tmp_path, layout):
    """<|endoftext|> (TinyStories' and GPT-2 corpora's separator) and <|end_of_text|> end a document whatever the
    tokenizer's own end token is: with Llama 2's </s> as the only separator a '<|endoftext|>'-separated corpus was one
    document, the marker trained on as ~11 text tokens. A literal </s> (HTML's strikethrough) stays text: splitting
    at the tokenizer's own end text deleted it and cut the document in two."""
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE

    tok = load_tokenizer(_llama3_dir(tmp_path / "base")) if layout == "llama3" else SentencePieceBPE(sp_doc())
    docs = ["the king <s>old</s> speaks.", "the queen hears.", "thou art"]
    src = tmp_path / "doc.txt"
    src.write_text(docs[0] + "<|endoftext|>" + docs[1] + "<|end_of_text|>" + docs[2])
    rep = encode_to_shards(tok, [str(src)], tmp_path / "out", progress=False)
    ids = np.asarray(TokenFile(rep.shards["train"]).tokens).tolist()
    want = [i for d in docs for i in (tok.eot_id, *tok.encode_ordinary(d))]
    assert ids == want and rep.docs["train"] == 3


def test_save_hf_round_trip_keeps_eos_bos_chat_template_and_added_tokens(tmp_path):
    """save_hf wrote tokenizer.json alone: the eos_token (<|eot_id|>, not the first of EOT_NAMES) and a chat template
    were lost when the tokenizer was read back, by lmforge and by transformers. Now tokenizer_config.json holds
    them beside it; added tokens (a non-special one too) and the BOS of the post_processor come back as they were."""
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.chat_template import get_template
    from lmforge.tokenizer.bpe import Tokenizer

    src = load_tokenizer(_llama3_dir(tmp_path / "src"))
    d = src.to_dict()
    d["special_tokens"]["<think>"] = src.vocab_size
    tok = Tokenizer.from_dict({**d, "prefix_tokens": [LLAMA3[0]], "eos_token": "<|eot_id|>",
                               "non_special": ["<think>"]})
    llama3 = get_template("llama3")
    tok.save_hf(tmp_path / "hf", chat_template=llama3)
    back = load_tokenizer(tmp_path / "hf")
    assert back.eot_id == tok.eot_id == 2 and back.bos_id == tok.bos_id == 0
    assert back.special_tokens == tok.special_tokens and back.non_special == ("<think>",)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf.eos_token, hf.eos_token_id, hf.bos_token) == ("<|eot_id|>", 2, LLAMA3[0])
    msgs = [{"role": "user", "content": "the cat"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == llama3.render(msgs)
    # a config already there keeps what save_hf does not set (a model directory's own template)
    tok.save_hf(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == llama3.jinja()


def test_save_hf_over_another_tokenizers_folder_drops_its_token_tables_and_a_json_path_writes_no_config(tmp_path):
    """save_hf into a folder holding another tokenizer's tokenizer_config.json kept its added_tokens_decoder and a
    pad_token this tokenizer lacks (HF would add it as a new token) beside the new eos_token; it keeps the folder's
    chat template and settings that name no token. A path not named tokenizer.json gets no config beside it (HF
    reads none there): it merged one into the folder's own."""
    transformers = pytest.importorskip("transformers")

    tok = load_tokenizer(_llama3_dir(tmp_path / "src"))
    (tmp_path / "hf").mkdir()
    other = {"added_tokens_decoder": {"7": {"content": "<pad>", "special": True}}, "pad_token": "<pad>",
             "add_bos_token": False, "chat_template": "{{ messages[0]['content'] }}", "model_max_length": 4096,
             "unk_token": None}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(other))
    tok.save_hf(tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert not {"added_tokens_decoder", "pad_token", "add_bos_token"} & set(conf)
    assert (conf["chat_template"], conf["model_max_length"], conf["eos_token"]) == (other["chat_template"], 4096,
                                                                                    "<|end_of_text|>")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(hf) == tok.vocab_size and hf.pad_token is None
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "tokenizer_config.json").write_text(json.dumps(other))
    assert tok.save_hf(tmp_path / "side" / "mine.json").is_file()
    assert json.loads((tmp_path / "side" / "tokenizer_config.json").read_text()) == other


def test_sentencepiece_save_hf_round_trip_keeps_eos_and_bos(tmp_path):
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE

    doc = sp_doc()
    eot = added(doc, "<|endoftext|>")  # the first of EOT_NAMES: the end of text when no config names </s>
    tok = SentencePieceBPE(doc, eos_token="</s>")
    path = tok.save_hf(tmp_path / "hf")
    back = load_tokenizer(tmp_path / "hf")
    assert back.eot_id == tok.eot_id == 2 != eot and back.bos_id == tok.bos_id == 1
    assert back.special_tokens == tok.special_tokens and json.loads(path.read_text()) == doc
    conf = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (conf["eos_token"], conf["bos_token"]) == ("</s>", "<s>")

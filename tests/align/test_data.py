"""Post-training data: loss masks from chat templates, packing (same loss and gradients as unpacked),
preference / KTO batches, bad records named and counted, exact resume of the data source."""

import json
import warnings

import pytest
import torch

from lmforge.align import data as D
from lmforge.align.sft import SFTConfig, SFTObjective
from lmforge.errors import DataError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.byte import ByteTokenizer

TOK = ByteTokenizer()


def _chat(q, a, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _trained_text(ex):
    ids, mask = ex
    return bytes(t for t, m in zip(ids, mask) if m).decode()


def test_chat_loss_mask_covers_assistant_turns_only():
    enc = D.Encoder(TOK, "plain")
    msgs = _chat("2+2?", "4", system="be brief") + [{"role": "user", "content": "and 3+3?"},
                                                    {"role": "assistant", "content": "6"}]
    ids, mask = enc.chat(msgs, "x:1")
    # plain's end marker "\n" cannot tell an answer's end: the final answer closes with end-of-text instead (trained)
    assert TOK.decode(ids) == "System: be brief\nUser: 2+2?\nAssistant: 4\nUser: and 3+3?\nAssistant: 6<|endoftext|>"
    assert ids[-1] == TOK.eot_id and mask[-1]
    assert TOK.decode([t for t, m in zip(ids, mask) if m]) == "4\n6<|endoftext|>"  # contents and their ends
    ids_all, mask_all = D.Encoder(TOK, "plain", loss_on="all").chat(msgs, "x:1")
    assert ids_all == ids and all(mask_all)


def test_chatml_with_its_special_tokens_and_the_mismatch_error():
    from lmforge.tokenizer.train import train_bpe

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe(iter(["user assistant hello there " * 30]), 300, special_tokens=specials, progress=False,
                    workers=1)
    ids, mask = D.Encoder(tok, "chatml").chat(_chat("hello", "there"), "x:1")
    im_end = tok.encode("<|im_end|>")
    assert len(im_end) == 1 and ids.count(im_end[0]) == 2
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "there<|im_end|>\n"
    with pytest.raises(DataError, match=r"chat template 'chatml' uses <\|im_start\|> but the tokenizer encodes "
                                        r"it as 12 tokens.*template='plain'"):
        D.Encoder(TOK, "chatml")


def test_prompt_completion_trains_the_completion_and_end_token():
    ids, mask = D.Encoder(TOK, "plain").prompt_completion("Q: 1+1=", " 2", "x:1")
    assert ids == list(b"Q: 1+1= 2") + [TOK.eot_id]
    assert mask == [False] * 7 + [True] * 3


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_bad_records_name_file_line_and_field_or_are_counted(tmp_path):
    enc = D.Encoder(TOK, "plain")
    f = _write(tmp_path / "d.jsonl", [{"messages": _chat("a", "b")}, {"messages": [{"role": "user", "content": "q"}]},
                                      "{not json", {"prompt": "p"}, {"messages": _chat("c", "d")}])
    with pytest.raises(DataError, match=r"^d.jsonl:2: field 'messages' has no assistant turn.*; fix the record "
                                        r"or set data.on_error='skip'"):
        D.load_records((str(f),), enc, "sft", 64, "raise")
    items, rep = D.load_records((str(f),), enc, "sft", 64, "skip")
    assert len(items) == 2 and rep.records == 5 and rep.used == 2
    assert rep.rejected == {"no_assistant_turn": 1, "bad_json": 1, "unknown_format": 1}
    assert rep.first["bad_json"] == "d.jsonl:3" and "2 used" in rep.summary()
    (tmp_path / "bin.jsonl").write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"^bin.jsonl:1: the record is not UTF-8: invalid start byte at byte 14"):
        D.load_records((str(tmp_path / "bin.jsonl"),), enc, "sft", 64, "raise")
    p = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                      {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match=r"^p.jsonl:2: fields 'chosen' and 'rejected' are identical"):
        D.load_records((str(p),), enc, "preference", 64, "raise")
    hh = _write(tmp_path / "hh.jsonl", [{"chosen": _chat("q", "a"), "rejected": _chat("q", "b")}])  # HH-RLHF's form
    with pytest.raises(DataError, match=r"^hh.jsonl:1: preference record lacks field 'prompt' \(needs prompt, chosen, "
                                        r"rejected\); where chosen and rejected each hold the whole conversation \(an "
                                        r"implicit prompt\), move the turns they share into 'prompt'; fix the record"):
        D.load_records((str(hh),), enc, "preference", 64, "raise")
    with pytest.raises(DataError, match=r"^hh2.jsonl:1: preference record lacks field 'rejected' \(needs prompt, "
                                        r"chosen, rejected\); fix the record"):
        D.load_records((str(_write(tmp_path / "hh2.jsonl", [{"prompt": "q", "chosen": "a"}])),), enc, "preference",
                       64, "raise")
    k = _write(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": "yes"}])
    with pytest.raises(DataError, match=r"^k.jsonl:1: field 'label' must be true"):
        D.load_records((str(k),), enc, "kto", 64, "raise")


def test_long_examples_are_truncated_and_counted(tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "x" * 100},
                                      {"prompt": "y" * 100, "completion": "z"}])
    with pytest.raises(DataError, match="d.jsonl:2: no trainable tokens within its first 17"):
        D.load_records((str(f),), D.Encoder(TOK, "plain"), "sft", 16, "raise")
    items, rep = D.load_records((str(f),), D.Encoder(TOK, "plain"), "sft", 16, "skip")
    # the second record is rejected, not counted as truncated: `truncated` counts records used cut short
    assert rep.truncated == 1 and len(items[0][0]) == 17 and rep.rejected == {"no_trainable_tokens": 1}
    # keep_end (TRL's truncation_mode): the long prompt loses its oldest tokens, the completion stays whole
    items, rep = D.load_records((str(f),), D.Encoder(TOK, "plain"), "sft", 16, "raise", "keep_end")
    (ids1, mask1), (ids2, mask2) = items
    assert rep.truncated == 2 and len(ids2) == 17 and bytes(ids2[:-1]).decode() == "y" * 15 + "z"
    assert ids2[-1] == TOK.eot_id and mask2 == [False] * 15 + [True, True]
    assert bytes(ids1[:-1]).decode() == "x" * 16 and all(mask1)  # keep_end keeps the completion's end too


def _examples(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = D.Encoder(TOK, "plain")
    out = []
    for i in range(n):
        q = "q" * int(torch.randint(1, 9, (1,), generator=g))
        a = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(torch.randint(1, 12, (1,), generator=g)),),
                                                             generator=g))
        out.append(enc.chat(_chat(q, a), f"x:{i}"))
    return out


def test_packing_fills_rows_and_restarts_positions():
    exs = _examples(9)
    rows = D.pack_rows(exs, 48)
    assert sorted(i for r in rows for i in r) == list(range(9))
    assert all(sum(len(exs[i][0]) - 1 for i in r) <= 48 for r in rows)
    b = D.packed_batch([[exs[i] for i in r] for r in rows], 48)
    first = rows[0]
    n0 = len(exs[first[0]][0]) - 1
    assert b["positions"][0, :n0].tolist() == list(range(n0)) and b["positions"][0, n0] == 0
    assert b["doc_ids"][0, n0 - 1] == 0 and b["doc_ids"][0, n0] == 1
    assert b["targets"][0, n0 - 1] == exs[first[0]][0][-1]  # a document's last target is its own last token


@pytest.mark.parametrize("loss", ["token_mean", "sequence_mean"])
def test_packed_batch_gives_the_loss_and_gradients_of_the_unpacked_examples(loss):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    exs = _examples(7)
    rows = D.pack_rows(exs, 64)
    assert len(rows) < len(exs)  # several examples share a row
    obj = SFTObjective(SFTConfig(loss=loss))

    def loss_and_grads(batch):
        model.zero_grad()
        value, _ = obj.loss(model, batch)
        value.backward()
        return value.detach(), [p.grad.clone() for p in model.parameters()]

    packed, gp = loss_and_grads(D.packed_batch([[exs[i] for i in r] for r in rows], 64))
    plain, gu = loss_and_grads(D.pad_batch(exs))
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp, gu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_preference_and_kto_batches_have_the_documented_keys():
    enc = D.Encoder(TOK, "plain")
    c = enc.prompt_completion("Q?", "yes", "x:1", "chosen")
    r = enc.prompt_completion("Q?", "no way", "x:1", "rejected")
    b = D.pair_batch([(c, r)])
    assert set(b) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "targets", "loss_mask")}
    assert b["chosen_loss_mask"].sum() == 4 and b["rejected_loss_mask"].sum() == 7  # completion + end token
    assert (b["rejected_targets"][b["rejected_loss_mask"]].tolist() == list(b"no way") + [TOK.eot_id])
    k = D.kto_batch([(c, True), (r, False)])
    assert k["label"].tolist() == [True, False] and k["input_ids"].shape == (2, len(r[0]) - 1)
    from lmforge.align.kto import mismatched_rows  # the mismatched rows, paired over the whole batch

    assert {n: t.tolist() for n, t in mismatched_rows(k).items()} == \
        {n: k[n].tolist() for n in ("kl_input_ids", "kl_targets", "kl_loss_mask")}
    assert not any(n.startswith("kl_") for n in D.kto_batch([(c, True), (r, False)], kl=False))


def test_example_source_resumes_exactly():
    exs = _examples(11)
    src = D.ExampleSource(exs, 2, lambda rows: D.packed_batch(rows, 48), seed=3, pack_len=48)
    for _ in range(3):
        src.next_batch()
    assert src.log_stats()["epoch"] == pytest.approx(6 / len(src._epoch_units()))
    state = src.state_dict()
    want = [src.next_batch() for _ in range(6)]  # crosses an epoch boundary
    again = D.ExampleSource(exs, 2, lambda rows: D.packed_batch(rows, 48), seed=3, pack_len=48)
    again.load_state_dict(state)
    for a, b in zip(want, [again.next_batch() for _ in range(6)]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_val_fraction_holds_out_evenly_across_the_training_files(tmp_path):
    """Two files of 10 records, val_fraction 0.2: 2 from each file held out (the list's tail took all 4 from
    the second), the same ones whatever the seed; every record is in exactly one of train and val."""
    from lmforge.align.config import PostDataConfig

    files = []
    for name in "ab":
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"prompt": f"{name}{i}", "completion": " x"}) + "\n"
                                     for i in range(10)))
    cfg = PostDataConfig(train=tuple(map(str, files)), template="plain", val_fraction=0.2, batch_size=4)

    def split(seed):
        train, val, report = D.build_sources(cfg, TOK, "sft", seed)
        assert report.held_out == len(val.items)
        return [[bytes(ids[:2]).decode() for ids, _ in src.items] for src in (train, val)]
    train, val = split(0)
    assert val == ["a2", "a7", "b2", "b7"]
    assert sorted(train + val) == sorted(f"{n}{i}" for n in "ab" for i in range(10))
    assert split(5) == [train, val]
    assert D.hold_out(list(range(7)), 0.5) == ([0, 2, 4, 6], [1, 3, 5])
    assert D.hold_out(list(range(3)), 0.2) == ([0, 1, 2], [])


def test_a_resume_with_a_new_seed_finishes_the_epoch_in_its_order():
    """20 items, 2 batches of 4 into epoch 0, resumed with seed 1: every item is seen exactly once in epoch 0
    (recomputing the epoch's order from the new seed repeated some and skipped others); epoch 1 follows seed 1."""
    items = list(range(20))
    src = D.ExampleSource(items, 4, lambda xs: xs, seed=0)
    first = src.next_batch() + src.next_batch()
    resumed = D.ExampleSource(items, 4, lambda xs: xs, seed=1)
    resumed.load_state_dict(src.state_dict())
    rest = [x for _ in range(3) for x in resumed.next_batch()]
    assert sorted(first + rest) == items
    fresh = D.ExampleSource(items, 4, lambda xs: xs, seed=1)
    fresh.load_state_dict({"epoch": 1, "pos": 0})  # epoch 1 in seed 1's order
    assert [x for _ in range(5) for x in resumed.next_batch()] == [x for _ in range(5) for x in fresh.next_batch()]


def test_a_resume_mid_epoch_over_other_items_or_packing_is_refused():
    exs = _examples(11)

    def source(n=11, pack=48):
        return D.ExampleSource(exs[:n], 2, lambda rows: rows, seed=3, pack_len=pack)

    src = source()
    src.next_batch()
    mid = src.state_dict()
    for other in (source(n=10), source(pack=40), source(pack=None)):
        with pytest.raises(DataError, match=r"the checkpoint is 2 of \d+ rows into epoch 0 of 11 training examples "
                                            r"packed to 48 tokens, but the data is now"):
            other.load_state_dict(mid)
    while src.pos < len(src._epoch_units()):
        src.next_batch()
    other = source(pack=40)
    other.load_state_dict(src.state_dict())  # at the epoch's end: the next starts over the new data
    assert (other.epoch, other.pos) == (1, 0) and other.next_batch() == other._epoch_units()[:2]


def test_a_resume_mid_epoch_over_other_contents_is_refused():
    """The same number of examples and packing but another token in one example (an edited file, another
    tokenizer or template): refused mid-epoch as other items are (the run went on over examples other than the
    checkpoint's order holds, silently); at the epoch's end the next epoch starts over the new data; a state
    saved before the fingerprint was recorded loads as before."""
    exs = _examples(11)
    ids, mask = exs[5]
    edited = exs[:5] + [(ids[:-2] + [ids[-2] + 1] + ids[-1:], mask)] + exs[6:]

    for pack in (48, None):
        src = D.ExampleSource(exs, 2, lambda rows: rows, seed=3, pack_len=pack)
        src.next_batch()
        mid = src.state_dict()
        other = D.ExampleSource(edited, 2, lambda rows: rows, seed=3, pack_len=pack)
        assert len(other._epoch_units()) == mid["units"]  # the same count of rows: only the contents differ
        unit = "rows" if pack else "examples"
        with pytest.raises(DataError, match=rf"the checkpoint is 2 of \d+ {unit} into epoch 0 of 11 training "
                                            r"examples.*, but the examples' contents have changed \(fingerprint "
                                            r"\w+ -> \w+\), so the rest of that epoch is unknown; resume with the "
                                            r"run's data.train files"):
            other.load_state_dict(mid)
        tail_rule = {k: v for k, v in mid.items() if k != "held_out"}  # saved when val_fraction took the tail
        with pytest.raises(DataError, match=r"init = that checkpoint \(a checkpoint saved before data.val_fraction "
                                            r"held out examples spread over every file"):
            other.load_state_dict(tail_rule)
        old = {k: v for k, v in mid.items() if k != "fingerprint"}  # a checkpoint from before the fingerprint
        other.load_state_dict(old)
        assert (other.epoch, other.pos) == (0, 2)
        same = D.ExampleSource(list(exs), 2, lambda rows: rows, seed=3, pack_len=pack)  # equal contents, new lists
        same.load_state_dict(mid)
        assert same.next_batch() == src.next_batch()
        while src.pos < len(src._epoch_units()):
            src.next_batch()
        other.load_state_dict(src.state_dict())  # at the epoch's end: the next starts over the new data
        assert (other.epoch, other.pos) == (1, 0) and other.next_batch() == other._epoch_units()[:2]


def test_the_fingerprint_covers_every_field_of_an_item():
    ex = ([1, 2, 3], [False, True, True])
    kinds = [[ex], [([1, 2, 4], ex[1])], [([1, 2, 3], [False, False, True])], [(ex, ex)], [(ex, ex, 0.5)],
             [(ex, ex, 1.0)], [(ex, True)], [(ex, False)], [ex, ex], [([1, 2], [1, 3])], [([1], [2, 3])]]
    assert len({D.fingerprint(items) for items in kinds}) == len(kinds)
    x, y = torch.arange(5000), torch.arange(5000)
    y[2500] = 0  # in the middle that a tensor's repr leaves out
    assert D.fingerprint([x]) != D.fingerprint([y])


def test_the_epoch_order_is_computed_once_per_epoch(monkeypatch):
    """The step snapshot saves the source's state every step: the epoch's order (a permutation and, packed, the
    rows) is computed once per epoch and seed, not at each state_dict; the states are those of a fresh
    computation."""
    exs = _examples(11)
    n_batches = -(-len(D.ExampleSource(exs, 2, lambda rows: rows, seed=3, pack_len=48)._epoch_units()) // 2)
    calls = []
    perm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(1) or perm(*a, **k))
    src = D.ExampleSource(exs, 2, lambda rows: rows, seed=3, pack_len=48)
    states = []
    for _ in range(2 * n_batches):  # two epochs
        states.append(src.state_dict())
        src.next_batch()
        states.append(src.state_dict())
    assert src.epoch == 1 and len(calls) == 2 * 2  # per epoch: the items' permutation and the rows'
    monkeypatch.setattr(torch, "randperm", perm)
    for state in states:
        fresh = D.ExampleSource(exs, 2, lambda rows: rows, seed=3, pack_len=48)
        fresh.load_state_dict(state)
        assert fresh.state_dict() == state


def test_packing_fills_rows_like_trl_best_fit_decreasing():
    datasets = pytest.importorskip("datasets")
    trl_data = pytest.importorskip("trl.data_utils")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (200,), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    theirs = trl_data.pack_dataset(ds, 64, strategy="bfd", map_kwargs={"keep_in_memory": True})["seq_lengths"]
    ours = D.pack_rows([([1] * (n + 1), [True] * (n + 1)) for n in lengths], 64)
    # ties between equally full rows may be broken differently; the row fills cannot differ
    assert sorted(sum(lengths[i] for i in r) for r in ours) == sorted(sum(r) for r in theirs)


def _bpe(specials):
    from lmforge.tokenizer.train import train_bpe

    return train_bpe(iter(["user assistant hello there again\n " * 30]), 300, special_tokens=specials,
                     progress=False, workers=1)


@pytest.mark.parametrize("template,specials", [
    ("plain", None), ("chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    ("llama3", ["<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])])
def test_a_conversational_prompt_is_never_trained_only_its_completion(template, specials):
    """A prompt/completion record with message lists trains the completion alone (TRL's SFT / DPO / KTO),
    not the assistant turns inside its prompt; with every template the prompt's tokens open the encoding."""
    tok = TOK if specials is None else _bpe(specials)
    enc = D.Encoder(tok, template)
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "OLD"}, {"role": "user", "content": "again"}]
    completion = [{"role": "assistant", "content": "there"}, {"role": "user", "content": "more"},
                  {"role": "assistant", "content": "NEW"}]
    ids, mask = enc.prompt_completion(prompt, completion, "x:1")
    full, full_mask = enc.chat(prompt + completion, "x:1")
    p_ids, _ = enc.template.encode(tok, prompt, add_generation_prompt=False)
    assert ids == full and ids[:len(p_ids)] == p_ids and not any(mask[:len(p_ids)])
    assert mask[len(p_ids):] == full_mask[len(p_ids):]
    end = enc.template.end
    last = "<|endoftext|>" if template == "plain" else end  # (plain's final answer closes with end-of-text)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"there{end}NEW{last}"
    pair = D.encode_record(enc, {"prompt": prompt, "chosen": completion, "rejected": completion[:1]}, "preference",
                           "x:2", 512, D.DataReport())
    assert [tok.decode([t for t, m in zip(*ex) if m]) for ex in pair] == [f"there{end}NEW{last}", f"there{last}"]
    with pytest.raises(DataError, match=r"x:3: field 'prompt \+ completion' has no assistant turn after its prompt"):
        enc.prompt_completion(prompt, [{"role": "user", "content": "?"}], "x:3")
    ids_all, mask_all = D.Encoder(tok, template, loss_on="all").prompt_completion(prompt, completion, "x:4")
    assert ids_all == ids and all(mask_all)


def test_preference_margins_reach_the_batch_and_mixed_files_are_refused(tmp_path):
    enc = D.Encoder(TOK, "plain")
    f = _write(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 3},
                                      {"prompt": "r", "chosen": "c", "rejected": "dd", "margin": 0.5}])
    items, _ = D.load_records((str(f),), enc, "preference", 64, "raise")
    b = D.pair_batch(items)
    assert b["margin"].dtype == torch.float32 and b["margin"].tolist() == [3.0, 0.5]
    assert b["rejected_targets"][1][b["rejected_loss_mask"][1]].tolist() == list(b"dd") + [TOK.eot_id]
    mixed = _write(tmp_path / "mixed.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.0},
                                              {"prompt": "q", "chosen": "a", "rejected": "c"}])
    with pytest.raises(DataError, match=r"^1 of 2 preference pairs have a 'margin' field and the rest none"):
        D.load_records((str(mixed),), enc, "preference", 64, "raise")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}])
    with pytest.raises(DataError, match=r"^bad.jsonl:1: field 'margin' must be a finite number, got 'big'"):
        D.load_records((str(bad),), enc, "preference", 64, "raise")


def test_sampled_token_ids_are_trained_as_they_are_in_every_record_kind(tmp_path):
    """prompt_ids / completion_ids (chosen_ids, rejected_ids) of sampled records: taken as they are, loss on the
    completion ids, nothing appended; a side without ids is encoded from its text; bad or foreign ids refused."""
    enc = D.Encoder(TOK, "plain")
    user = [{"role": "user", "content": "hi"}]
    p_ids = list(b"User: hi\nAssistant: ")
    sampled = [104, 195]  # 'h' and the first byte of a two-byte character: its text would not round-trip
    rec = {"prompt": user, "completion": [{"role": "assistant", "content": "h\ufffd"}], "prompt_ids": p_ids,
           "completion_ids": sampled}
    ids, mask = D.encode_record(enc, rec, "sft", "x:1", 99, D.DataReport())
    assert ids == p_ids + sampled and mask == [False] * len(p_ids) + [True, True]
    kto, label = D.encode_record(enc, {**rec, "label": False}, "kto", "x:1", 99, D.DataReport())
    assert kto == (ids, mask) and label is False
    pair = {"prompt": user, "prompt_ids": p_ids, "chosen": [{"role": "assistant", "content": "ok"}],
            "rejected": [{"role": "assistant", "content": "no"}], "rejected_ids": [110, TOK.eot_id]}
    chosen, rejected = D.encode_record(enc, pair, "preference", "x:1", 99, D.DataReport())
    assert chosen == enc.chat(user + pair["chosen"], "x", n_prompt=1)  # text: the template's end marker
    assert rejected == (p_ids + [110, TOK.eot_id], [False] * len(p_ids) + [True, True])
    bad = [({**rec, "completion_ids": [104, 999]}, "bad_ids"), ({**rec, "completion_ids": []}, "bad_ids"),
           ({k: v for k, v in rec.items() if k != "prompt_ids"}, "bad_ids"),
           ({**rec, "prompt_ids": list(b"User: hi\n")}, "ids_mismatch")]
    path = _write(tmp_path / "bad.jsonl", [r for r, _ in bad] + [rec])
    items, report = D.load_records((str(path),), enc, "sft", 64, "skip")
    assert len(items) == 1 and report.rejected == {"bad_ids": 3, "ids_mismatch": 1}


def test_a_json_array_file_is_read_as_the_data_pipeline_reads_it(tmp_path):
    """A data file that is one JSON array (Alpaca's alpaca_data.json, pretty-printed or on one line) was refused with
    a command converting it, while the data pipeline's read_jsonl read the same file (found 2026-12-07): one reader
    (lmforge.data.readers.json_records) now reads it, gzipped too. Only a .json file is read as an array; a .jsonl
    holding one is told to be renamed."""
    import gzip

    enc = D.Encoder(TOK, "plain")
    records = [{"messages": _chat("a", "b")}, {"messages": _chat("c", "d")}, "not a record"]
    (tmp_path / "pretty.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "flat.json.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf\n" + json.dumps(records).encode()))
    want, _ = D.load_records((str(_write(tmp_path / "lines.jsonl", records[:2])),), enc, "sft", 64, "raise")
    for name in ("pretty.json", "flat.json.gz"):
        items, rep = D.load_records((str(tmp_path / name),), enc, "sft", 64, "skip")
        assert items == want and rep.records == 3 and rep.first["bad_json"] == f"{name}:element 2"
        with pytest.raises(DataError, match=rf"^{name}:element 2: the record is a str, not an object; fix the line"):
            D.load_records((str(tmp_path / name),), enc, "sft", 64, "raise")
    (tmp_path / "bad.json").write_text('[{"messages": []},\n')
    with pytest.raises(DataError, match=r"^bad.json:file: the record is not JSON: Expecting value.*; fix the file$"):
        D.load_records((str(tmp_path / "bad.json"),), enc, "sft", 64, "raise")
    for text, problem in ((json.dumps(records), "a list, not an object"),
                          (json.dumps(records, indent=1), "not JSON: Expecting value")):
        (tmp_path / "array.jsonl").write_text(text)
        with pytest.raises(DataError, match=rf"^array.jsonl:1: the record is {problem}.*; the file looks like one "
                                            r"JSON array, which is read as one only from a file whose name ends in "
                                            r"\.json \(before any \.gz/\.zst\): rename it"):
            D.load_records((str(tmp_path / "array.jsonl"),), enc, "sft", 64, "raise")
    with pytest.raises(DataError, match=r"^d.jsonl:2: the record is not JSON.*; fix the line or set data.on_error"):
        D.load_records((str(_write(tmp_path / "d.jsonl", [records[0], "[oops"])),), enc, "sft", 64, "raise")
    cut = gzip.compress(json.dumps(records[0]).encode() + b"\n")[:-12]
    (tmp_path / "cut.jsonl.gz").write_bytes(cut)
    with pytest.raises(DataError, match=r"cut.jsonl.gz: the compressed file is cut or damaged \(EOFError"):
        D.load_records((str(tmp_path / "cut.jsonl.gz"),), enc, "sft", 64, "raise")
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(records[0]) + "\n")  # was "cut or damaged (BadGzipFile"
    with pytest.raises(DataError, match=r"^\S*plain.jsonl.gz: not gzip-compressed despite its name \(it starts "
                                        r"with b'\{\"me'\); rename it to plain.jsonl$"):
        D.load_records((str(tmp_path / "plain.jsonl.gz"),), enc, "sft", 64, "raise")


def test_a_plain_answer_of_several_lines_is_closed_by_end_of_text_which_generation_stops_on():
    """plain ends a turn with "\n", which a multi-line answer holds too: SFT closes the final answer with the
    tokenizer's end-of-text token (trained, where TRL appends EOS), which the engine stops on (request.stop_ids), so
    a plain-SFT model stops by itself with its whole answer (it ran to max_tokens before). A template whose end is
    a marker (chatml) keeps it; a conversation ending with a user turn (loss_on='all') gets nothing."""
    from lmforge.infer.request import stop_ids
    from lmforge.infer.sampling import SamplingParams

    ids, mask = D.Encoder(TOK, "plain").chat(_chat("2+2?", "It is 4.\nBecause 2 and 2 make 4."), "x:1")
    assert TOK.decode([t for t, m in zip(ids, mask) if m]) == "It is 4.\nBecause 2 and 2 make 4.<|endoftext|>"
    assert ids[-1] in stop_ids(SamplingParams(), TOK)
    asked = _chat("2+2?", "4") + [{"role": "user", "content": "and 3+3?"}]
    ids, _ = D.Encoder(TOK, "plain", loss_on="all").chat(asked, "x:2")
    assert TOK.eot_id not in ids and bytes(ids).decode().endswith("User: and 3+3?\n")


def test_a_plain_template_with_no_end_of_text_token_is_warned_about():
    """Without an end-of-text token nothing can close a plain answer (its "\\n" cannot): said at once."""
    with pytest.warns(UserWarning, match=r"chat template 'plain' ends an answer with '\\n'.*will not stop by itself"):
        D.Encoder(ByteTokenizer(()), "plain")


def test_build_sources_without_a_template_renders_chatml_or_plain_as_the_tokenizer_allows(tmp_path):
    """data.template '' given to build_sources directly: chatml where the tokenizer has its markers as special
    tokens, else plain (choose_template, the one rule of posttrain and `lmforge chat`); a given one is checked."""
    from lmforge.align.config import PostDataConfig
    from lmforge.tokenizer.bpe import Tokenizer

    path = tmp_path / "c.jsonl"
    _write(path, [{"messages": _chat("hi", "yo")}])
    chatml = Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|im_start|>", "<|im_end|>"])
    for tok, text in ((TOK, "User: hi\nAssistant: yo<|endoftext|>"),
                      (chatml, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")):
        with warnings.catch_warnings(record=True) as said:  # the fallback to plain is said, as LLM.chat says it
            warnings.simplefilter("always")
            src, _, _ = D.build_sources(PostDataConfig(train=(str(path),), val_fraction=0), tok, "sft", seed=0)
        assert tok.decode(src.items[0][0]) == text
        assert [str(w.message) for w in said if "plain" in str(w.message)] == (
            ["this tokenizer has no chatml special tokens: using the plain template"] if tok is TOK else [])
    with pytest.raises(DataError, match=r"^chat template 'chatml' uses <\|im_start\|> but the tokenizer encodes"):
        D.build_sources(PostDataConfig(train=(str(path),), template="chatml"), TOK, "sft", seed=0)

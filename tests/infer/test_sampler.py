"""The batched sampler against its per-row reference: the same tokens, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.infer.sampler import Row, draw, logprob_entries, sample_rows, token_logprobs
from lmforge.infer.sampling import SamplingParams


def _gens(seeds):
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def test_draw_equals_per_row_multinomial_with_each_rows_generator():
    torch.manual_seed(0)
    probs = torch.randn(6, 300).mul(3).softmax(-1)
    seeds = [1, None, 2, 3, None, 4]  # unseeded rows draw from the default stream, in row order
    torch.manual_seed(5)
    ref = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).view(1) for i, g in enumerate(_gens(seeds))])
    torch.manual_seed(5)
    assert torch.equal(draw(probs.clone(), _gens(seeds)), ref)


def test_draw_without_generators_equals_batched_multinomial():
    probs = torch.randn(8, 500).softmax(-1)
    torch.manual_seed(3)
    ref = torch.multinomial(probs, 1).squeeze(-1)
    torch.manual_seed(3)
    assert torch.equal(draw(probs.clone(), [None] * 8), ref)


def _row(params: SamplingParams, seed: int | None = None) -> Row:
    return Row(params, None if seed is None else torch.Generator().manual_seed(seed), [1, 2, 3], 3)


def test_seeded_rows_do_not_depend_on_their_batch_companions():
    torch.manual_seed(0)
    logits = torch.randn(5, 400) * 2
    plain = SamplingParams(temperature=0.9, top_p=0.9)
    alone = [sample_rows(logits[i:i + 1], [_row(plain, seed=10 + i)]).tokens.item() for i in range(5)]
    # the same rows among unseeded, greedy and differently processed companions, in another order
    others = [_row(SamplingParams(temperature=0)), _row(SamplingParams(top_k=3)), _row(plain)]
    order = [4, 0, 3, 1, 2]
    mixed_logits = torch.cat([torch.randn(3, 400), logits[order]])
    out = sample_rows(mixed_logits, others + [_row(plain, seed=10 + i) for i in order]).tokens.tolist()
    assert out[3:] == [alone[i] for i in order]
    assert out[0] == mixed_logits[0].argmax().item()


def test_a_vocab_limit_masks_draws_and_listed_ids_not_the_raw_distribution():
    """Ids at or past vocab_limit are never drawn, listed or greedy's argmax, but raw log-probs are log_softmax
    over every row (a plain forward's); processed ones are of the masked, shaped distribution drawn from."""
    torch.manual_seed(0)
    logits = torch.randn(4, 40)
    logits[:, 30:] += 4.0  # the padded ids hold the argmax and most of the mass
    full = logits.log_softmax(-1)
    rows = [_row(SamplingParams(temperature=0, logprobs=5)), _row(SamplingParams(temperature=1.0, logprobs=5), 1),
            _row(SamplingParams(temperature=0.5, logprobs=5, logprobs_mode="processed"), 2),
            _row(SamplingParams(temperature=1.0, top_k=3, logprobs=0), 3)]
    out = sample_rows(logits, rows, vocab_limit=30)
    tokens = out.tokens
    assert (tokens < 30).all() and tokens[0] == logits[0, :30].argmax()
    want = full.gather(-1, tokens[:, None])[:, 0]
    want[2] = (logits[2, :30] / 0.5).log_softmax(-1)[tokens[2]]
    assert torch.allclose(out.logprobs, want, atol=1e-6)
    assert (out.top_ids < 30).all() and torch.equal(out.top_ids[:, 0], logits[:, :30].argmax(-1))
    for r in (0, 1, 3):
        assert torch.allclose(out.top_values[r], full[r].gather(-1, out.top_ids[r]), atol=1e-6)
        assert torch.allclose(out.top_values[r], full[r, :30].topk(5).values, atol=1e-6)
    assert torch.isneginf(out.logits[:, 30:]).all() and torch.equal(out.full, logits)  # strategies draw masked
    lp, values, ids = token_logprobs(logits, torch.tensor([1, 2, 31, 5]), 50, vocab_limit=30)
    assert ids.shape == (4, 30) and torch.equal(ids[:, 0], logits[:, :30].argmax(-1))  # at most the drawable ids
    assert torch.allclose(lp, full[torch.arange(4), torch.tensor([1, 2, 31, 5])])
    entry = logprob_entries(logits[:1], [3], [2], vocab_limit=30)[0]
    assert list(entry)[-2:] == logits[0, :30].topk(2).indices.tolist() and entry[3] == float(full[0, 3])


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(64, 1000)
    rows = [_row(SamplingParams(temperature=0)) for _ in range(64)]
    assert torch.equal(sample_rows(logits, rows).tokens, logits.argmax(-1))


def test_plain_rows_with_their_own_values_equal_each_rows_own_chain():
    """Temperature / top-k / top-p rows of different values run as one batched group (kind PLAIN): each
    row's processed logits and seeded token equal its own build_processors chain, bit for bit (CPU)."""
    from lmforge.infer.processors import apply_processors, batched_processors, build_processors
    from lmforge.infer.sampler import PLAIN, kind_of

    torch.manual_seed(0)
    logits = torch.randn(7, 300) * 3
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(), SamplingParams(top_p=0.8),
              SamplingParams(temperature=1.3, top_k=40, top_p=0.9), SamplingParams(top_k=1000),
              SamplingParams(temperature=0.5), SamplingParams(temperature=0.7, top_k=5, seed=3)]
    assert {kind_of(p) for p in params} == {PLAIN}
    batched = apply_processors(batched_processors(params), logits, None)
    for i, p in enumerate(params):
        assert torch.equal(batched[i], apply_processors(build_processors(p), logits[i:i + 1], None)[0])
    ref = [torch.multinomial(apply_processors(build_processors(p), logits[i:i + 1], None).softmax(-1), 1,
                             generator=torch.Generator().manual_seed(i)).item() for i, p in enumerate(params)]
    out = sample_rows(logits, [Row(p, torch.Generator().manual_seed(i), [1], 1) for i, p in enumerate(params)])
    assert out.tokens.tolist() == ref


def test_greedy_rows_share_one_group_whatever_their_filters():
    from lmforge.infer.sampler import GREEDY, kind_of

    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, top_p=0.5, min_p=0.2)]
    assert {kind_of(p) for p in params} == {GREEDY}
    assert kind_of(SamplingParams(temperature=0, repetition_penalty=1.2)) != GREEDY
    assert kind_of(SamplingParams(min_p=0.1)) not in (GREEDY, ("plain",))


def test_infinite_logits_and_tiny_temperatures_sample_their_limit_not_token_zero():
    """A +inf logit (a processor's, or a logit_bias past float32's range) and a temperature so small that
    logits / t overflow made the row's softmax NaN: the draw then returned token 0 with NaN log-probs (found
    2026-12-05). A row holding +inf draws among its +inf tokens; a tiny temperature is the argmax, as greedy."""
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    force = lambda ids, row: row.index_fill(0, torch.tensor([65, 70]), float("inf"))  # noqa: E731
    cases = [SamplingParams(logits_processors=(force,), logprobs=0, logprobs_mode="processed"),
             SamplingParams(logit_bias={65: 1e39}, logprobs=0, logprobs_mode="processed"),
             SamplingParams(temperature=1e-45, logprobs=0, logprobs_mode="processed"),
             SamplingParams(temperature=1e-45, top_k=5, top_p=0.5)]
    for seed in range(20):
        out = sample_rows(logits, [_row(p, seed=seed) for p in cases])
        tokens = out.tokens.tolist()
        assert tokens[0] in (65, 70) and tokens[1] == 65 and tokens[2:] == logits[2:].argmax(-1).tolist()
        assert torch.isfinite(out.logprobs).all()  # log p = log 1/2 for the two forced tokens, 0 for the others
        assert out.logprobs[:3].tolist() == [torch.tensor(0.5).log().item(), 0.0, 0.0]
    # typical sampling (the one filter that keeps no argmax) ranked a +inf row as NaN and masked every token
    for p in (SamplingParams(logit_bias={65: 1e39}, typical_p=0.5, logprobs=0, logprobs_mode="processed"),
              SamplingParams(logits_processors=(force,), typical_p=0.9, logprobs=0, logprobs_mode="processed")):
        out = sample_rows(logits[:1], [_row(p, seed=0)])
        assert out.tokens.item() in (65, 70) and torch.isfinite(out.logprobs).all()
    # mixed temperatures in one batched group, one of them tiny
    plain = [SamplingParams(temperature=t) for t in (1e-45, 0.7)]
    assert sample_rows(logits[:2], [_row(p, seed=1) for p in plain]).tokens[0] == logits[0].argmax()



def test_a_temperature_that_is_zero_in_float32_is_greedy_not_token_zero():
    """1e-300 (or 1e-46) is 0.0 once in float32: the shifted top logit became 0 / 0 = NaN and every row drew
    token 0 (served text '<unk><unk>...'; found 2026-12-06). Alone, in a batched group of mixed temperatures (a
    per-row tensor) and with processed log-probs, such a row takes the argmax as greedy does."""
    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 3
    want = logits.argmax(-1).tolist()
    for t in (1e-46, 1e-300):
        alone = [SamplingParams(temperature=t, logprobs=0, logprobs_mode="processed") for _ in range(3)]
        out = sample_rows(logits, [_row(p, seed=s) for s, p in enumerate(alone)])
        assert out.tokens.tolist() == want and out.logprobs.tolist() == [0.0, 0.0, 0.0]
        mixed = [SamplingParams(temperature=x) for x in (t, 0.7, t)]
        tokens = sample_rows(logits, [_row(p, seed=1) for p in mixed]).tokens.tolist()
        assert tokens[0] == want[0] and tokens[2] == want[2]



def test_a_temperature_that_is_inf_in_float32_is_uniform_over_the_allowed_tokens():
    """1e300 (inf in float32) or inf divided a masked token's -inf into NaN (and a +inf logit_bias's +inf), so
    the row drew token 0 with a NaN log-prob; alone or beside another temperature, the limit is uniform over the
    tokens the filters and biases leave (the +inf ones, where there are any)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 3
    top5 = set(logits[0].topk(5).indices.tolist())
    for t in (1e300, float("inf")):
        cases = [SamplingParams(temperature=t, top_k=5, logprobs=0, logprobs_mode="processed"),
                 SamplingParams(temperature=t, logit_bias={65: 1e39}, logprobs=0, logprobs_mode="processed")]
        drawn = set()
        for seed in range(30):
            out = sample_rows(logits[:2], [_row(p, seed=seed) for p in cases])
            drawn.add(out.tokens[0].item())
            assert out.tokens[1] == 65 and out.logprobs.tolist() == pytest.approx([math.log(1 / 5), 0.0])
        assert drawn == top5  # every one of the five, none outside them
        mixed = [SamplingParams(temperature=x, top_k=5) for x in (t, 0.7)]
        assert sample_rows(logits[:2], [_row(p, seed=1) for p in mixed]).tokens[0].item() in top5


def test_a_repetition_penalty_past_float32s_range_is_its_limit_not_nan():
    """repetition_penalty=1e300 is inf in float32: a seen token whose logit is exactly 0 became 0 * inf = NaN, which
    greedy decoding picked (argmax takes NaN as the largest). The limit: seen positive logits -> 0+, zero stays 0,
    negative -> -inf (found 2026-12-06)."""
    logits = torch.full((1, 50), -2.0)
    logits[0, 1], logits[0, 2], logits[0, 3], logits[0, 9] = 0.0, 5.0, -1.0, -0.5  # tokens 1, 2, 3 are seen
    for penalty in (1e300, float("inf"), 1e30):
        out = sample_rows(logits, [_row(SamplingParams(temperature=0, repetition_penalty=penalty))])
        assert out.tokens.item() == 2  # 5 / penalty (> 0) beats the seen 0 and every unseen logit (all below 0)


def _same_history(rows, vocab: int) -> bool:
    from lmforge.infer.sampler import _history, token_history

    got, ref = token_history(rows, vocab, "cpu"), _history(rows, vocab, "cpu")
    return torch.equal(got.counts, ref.counts) and torch.equal(got.seen, ref.seen)


def test_token_history_advances_with_appends_and_rebuilds_on_any_other_change():
    """The penalties' kept state (Row.history) equals the rebuild-every-step reference (_history) bit for bit:
    rows appending 0, 1 or several tokens a step in changing groups (a row missing some steps, as a preempted
    one does), and after every change that is not an append: a cut list regrown (a speculative rollback), a
    replaced list, an in-place rewrite the row is told of (`forget`), another default dtype."""
    import random

    from lmforge.infer.sampler import forget

    rng, V = random.Random(0), 50
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)
    rows = [Row(p, None, [rng.randrange(V) for _ in range(rng.randrange(1, 9))], 0) for _ in range(5)]
    for r in rows:
        r.prompt_len = len(r.tokens)
    for step in range(40):
        for r in rows:
            r.tokens += [rng.randrange(V) for _ in range(rng.choice([0, 1, 1, 1, 3]))]
        group = [r for r in rows if rng.random() < 0.8] or rows[:1]
        rng.shuffle(group)
        assert _same_history(group, V), step
        r = rng.choice(rows)
        if step % 7 == 3:  # cut back below its state's length and regrown
            del r.tokens[max(r.prompt_len, len(r.tokens) - 3):]
            r.tokens += [rng.randrange(V) for _ in range(rng.randrange(3))]
        elif step % 7 == 5:  # a new list object
            r.tokens = list(r.tokens)
        elif step % 7 == 6 and len(r.tokens) > r.prompt_len + 1:  # rewritten in place, same length: told
            r.tokens[r.prompt_len] = (r.tokens[r.prompt_len] + 1) % V
            forget(r)
    assert all(r.history is not None for r in rows)
    dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert _same_history(rows, V)
    finally:
        torch.set_default_dtype(dtype)
    assert _same_history(rows, V)
    rows[0].tokens += [1, 1]
    assert _same_history([rows[0], rows[1], rows[0]], V)  # a row twice (its state advances once)
    assert _same_history(rows, V)
    short = Row(p, None, [], 3)  # state built before its prompt is whole: appended prompt tokens are seen only
    for grow in ([], [4], [4, 5], [6, 4, 4], [], [7]):
        short.tokens += grow
        assert _same_history([short] + rows, V)


def test_token_history_check_catches_a_skipped_update(monkeypatch):
    """The debug comparison (CHECK_HISTORY) raises on a state that missed an appended token."""
    import pytest

    from lmforge.infer import sampler

    rows = [Row(SamplingParams(presence_penalty=1.0), None, [1, 2, 3], 2) for _ in range(3)]
    monkeypatch.setattr(sampler, "CHECK_HISTORY", True)
    sampler.token_history(rows, 10, "cpu")
    rows[1].tokens.append(7)
    sampler.token_history(rows, 10, "cpu")
    real = sampler._appended
    monkeypatch.setattr(sampler, "_appended", lambda h, r: real(h, r)[:-1])  # drops each row's newest token
    rows[2].tokens.append(4)
    with pytest.raises(AssertionError, match=r"rows \[2\]"):
        sampler.token_history(rows, 10, "cpu")


def test_fit_vocab_is_the_one_masking_of_ids_past_the_tokenizer():
    """sample_rows and a draft model's logits (speculative, draft) mask through one helper: the logits themselves
    where there is nothing to mask (a draft of the target's own width ran an arange and an index_fill, a full
    copy, every round); else one fresh tensor, the input left as it was."""
    from lmforge.infer.sampler import fit_vocab

    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    before = logits.clone()
    assert fit_vocab(logits, 6) is logits and fit_vocab(logits, 6, 6) is logits and fit_vocab(logits) is logits
    inf = float("-inf")
    cases = {(6, 4): torch.cat([before[:, :4], torch.full((2, 2), inf)], -1),  # ids past the tokenizer's 4
             (5, None): before[:, :5], (8, None): torch.cat([before, torch.full((2, 2), inf)], -1),  # other widths
             (8, 5): torch.cat([before[:, :5], torch.full((2, 3), inf)], -1), (4, 5): before[:, :4]}
    for (width, limit), want in cases.items():
        out = fit_vocab(logits, width, limit)
        assert torch.equal(out, want) and out.data_ptr() != logits.data_ptr(), (width, limit)
    assert torch.equal(logits, before)
    out = sample_rows(logits, [_row(SamplingParams(temperature=0)), _row(SamplingParams(temperature=0), 1)], 4)
    assert torch.equal(out.logits, cases[6, 4]) and torch.equal(logits, before)


def test_fit_vocab_masks_a_draft_rounds_own_logits_in_place():
    """A draft round owns its forward's logits: masking the ids past the tokenizer copied the (rows, V) logits at
    every depth (~155 MB at 256 rows x 152k in fp32). With own=True a width that fits is masked in place; without
    it the input is never written."""
    from lmforge.infer.sampler import fit_vocab

    logits = torch.arange(12.0).reshape(2, 6)
    kept = logits.clone()
    out = fit_vocab(logits, None, 4)
    assert out is not logits and torch.equal(logits, kept) and torch.isinf(out[:, 4:]).all()
    same = fit_vocab(logits, 6, 4, own=True)
    assert same is logits and torch.equal(same[:, :4], kept[:, :4]) and torch.isinf(same[:, 4:]).all()
    wider = fit_vocab(kept.clone(), 8, 4, own=True)  # another width: a fresh tensor all the same
    assert wider.shape == (2, 8) and torch.isinf(wider[:, 4:]).all()

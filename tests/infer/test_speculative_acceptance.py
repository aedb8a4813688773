"""The acceptance rule is a drafter's seam (lmforge.infer.speculative.AcceptanceRule): the default keeps the
exact rules (the other speculative tests), TypicalAcceptance is Medusa's typical acceptance (Cai et al. 2024,
§2.3.1), checked here against hand computations, greedy matching at temperature 0 and, on an engine, the
target's own probabilities of every draft it kept."""

from __future__ import annotations

import math

import pytest
import torch
from .infer_helpers import full_greedy, run_requests, tiny_model

from lmforge.errors import ConfigError
from lmforge.infer.detok import IdTokenizer
from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.acceptance import EXACT, TypicalAcceptance, verify
from lmforge.infer.token_tree import DraftTree, TreeDrafter, greedy_path


def _threshold(row: list[float], epsilon: float = 0.09, delta: float = 0.3) -> float:
    """min(epsilon, delta exp(-H)), by hand."""
    entropy = -sum(x * math.log(x) for x in row if x > 0)
    return min(epsilon, delta * math.exp(-entropy))


ROWS = {"spread": [0.7, 0.1, 0.1, 0.1], "flat": [0.25] * 4, "peaked": [0.96, 0.02, 0.01, 0.01]}


def test_typical_chain_keeps_drafts_above_the_entropy_threshold():
    """spread: H = 0.94, 0.3 exp(-H) = 0.117, so epsilon = 0.09 caps the threshold and token 1 (p = 0.1)
    passes, where greedy matching (argmax 0) would stop; flat: the threshold is 0.3 / 4 = 0.075 < 0.25;
    peaked: 0.09 > 0.02 fails. The next token is the target's own at the failing row."""
    spread, flat, peaked = ROWS["spread"], ROWS["flat"], ROWS["peaked"]
    assert _threshold(spread) == 0.09 and _threshold(flat) == pytest.approx(0.075)
    assert 0.1 > _threshold(spread) and 0.25 > _threshold(flat) and 0.02 < _threshold(peaked)
    p = torch.tensor([spread, flat, peaked, flat])
    rule = TypicalAcceptance()
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        a, tok = rule.chain(p, None, [1, 2, 1], False, g)
        assert a == 2
        counts[tok] += 1
    torch.testing.assert_close(counts / 2000, p[2], atol=0.02, rtol=0)  # drawn from the failing row
    assert rule.chain(p, None, [1, 2, 1], True, None) == (2, 0)  # greedy: the failing row's argmax
    assert rule.chain(p, None, [], False, g)[0] == 0
    # the same drafts under greedy matching (one-hot p): the first is already rejected
    one_hot = torch.nn.functional.one_hot(p.argmax(-1), 4).float()
    assert EXACT.chain(one_hot, one_hot[:3], [1, 2, 1], True, None) == (0, 0)
    assert rule.chain(one_hot, None, [1, 2, 1], True, None) == (0, 0)
    # a cap below 0.1 keeps token 1 of the spread row; one above it (0.11 < 0.117) rejects it
    assert TypicalAcceptance(epsilon=0.11).chain(p, None, [1, 2, 1], True, None) == (0, 0)
    # delta scales the entropy term: 0.3 -> 1.2 puts the flat row's threshold at 0.3 > 0.25
    assert TypicalAcceptance(epsilon=0.5, delta=1.2).chain(p, None, [0, 2], True, None) == (1, 0)


def test_typical_tree_keeps_the_longest_accepted_path_ties_to_the_likelier():
    """Root children 0 (token 1) and 1 (token 0); node 2 (token 3) under node 0 fails, node 3 (token 0) under
    node 1 passes: the longest accepted path runs through the root's second child. Between two accepted
    paths of equal depth the one with the larger sum of log p is kept."""
    spread, flat, peaked = ROWS["spread"], ROWS["flat"], ROWS["peaked"]
    tree = DraftTree([1, 0, 3, 0], [-1, -1, 0, 1])
    p = torch.tensor([spread, peaked, flat, peaked, flat])  # rows: root, then nodes 0..3
    rule = TypicalAcceptance()
    assert rule.tree(tree, p, None, True, None) == ([1, 3], 0)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        path, tok = rule.tree(tree, p, None, False, g)
        assert path == [1, 3] and p[4, tok] > 0
    # equal depths, every node passing: log 0.1 + log 0.25 < log 0.7 + log 0.25 keeps node 3's path, and
    # log 0.1 + log 0.97 > log 0.7 + log 0.1 node 2's
    tree = DraftTree([1, 0, 2, 0], [-1, -1, 0, 1])
    assert rule.tree(tree, torch.tensor([spread, flat, flat, flat, flat]), None, True, None)[0] == [1, 3]
    sure, unsure = [0.01, 0.01, 0.97, 0.01], [0.1, 0.7, 0.1, 0.1]
    assert rule.tree(tree, torch.tensor([spread, sure, unsure, flat, flat]), None, True, None)[0] == [0, 2]
    assert rule.tree(DraftTree([], []), p, None, True, None) == ([], 0)
    # one-hot p (a greedy request) with distinct siblings: the path greedy matching walks
    one_hot = torch.nn.functional.one_hot(p.argmax(-1), 4).float()
    tree = DraftTree([0, 1, 0, 0], [-1, -1, 0, 1])
    want = greedy_path(tree.tokens, tree.parents, one_hot.argmax(-1).tolist())
    assert rule.tree(tree, one_hot, None, True, None)[0] == want == [0, 2]


def test_exact_greedy_chain_keeps_what_the_rejection_test_it_replaced_kept():
    """A greedy chain is verified by greedy matching (`greedy_path`, as a greedy tree is), no longer by verify() over
    a one-hot q built for each step: on random inputs - drafts partly the target's argmax, q None (a one-hot of the
    drafts was built) or a drafter's distribution - it keeps the drafts and emits the token verify() did."""
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        k, V = int(torch.randint(0, 6, (1,), generator=g)), 7
        p = torch.nn.functional.one_hot(torch.randn(k + 1, V, generator=g).argmax(-1), V).float()  # greedy: one-hot
        target = p.argmax(-1).tolist()
        drafts = [target[i] if torch.rand((), generator=g) < 0.7 else int(torch.randint(V, (1,), generator=g))
                  for i in range(k)]
        q = None if trial % 2 else torch.softmax(3 * torch.randn(k, V, generator=g), -1)
        shown = torch.nn.functional.one_hot(torch.tensor(drafts, dtype=torch.long), V).float() if q is None else q
        before = verify(p, shown if drafts else p[:0], drafts, torch.Generator().manual_seed(trial))
        assert EXACT.chain(p, q, drafts, True, None) == before, (p, drafts, q)


@pytest.mark.parametrize("bad, match", [
    (dict(epsilon=1.0), r"TypicalAcceptance epsilon must be in \(0, 1\), got 1.0: .*Medusa uses 0.09"),
    (dict(epsilon=0), r"epsilon must be in \(0, 1\), got 0"),
    (dict(delta=0.0), r"TypicalAcceptance delta must be > 0, got 0.0: .*Medusa uses 0.3"),
    (dict(delta=float("nan")), r"TypicalAcceptance delta must be a finite number, got nan"),
    (dict(epsilon="0.1"), r"TypicalAcceptance epsilon must be a finite number, got '0.1'"),
])
def test_typical_parameters_are_checked(bad, match):
    with pytest.raises(ConfigError, match=match):
        TypicalAcceptance(**bad)


def test_a_drafter_with_a_wrong_acceptance_is_refused():
    drafter = tiny_model("llama", seed=5, n_layers=1)
    drafter.acceptance = "typical"
    with pytest.raises(ConfigError, match=r"Transformer.acceptance must be an acceptance rule .*got 'typical'; "
                                          r"use e.g. TypicalAcceptance\(epsilon=0.09, delta=0.3\)"):
        Engine(tiny_model("llama"), IdTokenizer(257), draft=drafter, num_draft_tokens=3)


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_typical_acceptance_at_temperature_0_is_greedy_matching(tok, shape):
    """One-hot p: typical acceptance keeps what greedy matching keeps, chain (a draft model on the pool)
    and tree (TreeDrafter) alike: the target's greedy output, with the exact rule's accepted counts."""
    target = tiny_model("llama", init_std=0.3)
    prompts = ["abcabcabc", "hello", "xyzzy"]
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    runs = []
    for acceptance in (None, TypicalAcceptance()):
        draft = tiny_model("llama", seed=5, n_layers=1, init_std=0.3)
        if shape == "tree":
            draft = TreeDrafter(draft, widths=(2, 2, 1), acceptance=acceptance)
        else:
            draft.acceptance = acceptance
        runs.append(LLM(target, tok, draft=draft, num_draft_tokens=3).generate(prompts, greedy))
    exact, typical = runs
    for p, a, b in zip(prompts, exact, typical):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == full_greedy(target, tok.encode(p), 14)
        assert a.metrics["accepted"] == b.metrics["accepted"] and a.metrics["drafted"] == b.metrics["drafted"]
    assert sum(r.metrics["accepted"] for r in typical) > 0


class _Stride:
    """Drafts (ctx[-1] * 7 + i) % V (q one-hot) and records what it proposed and what was kept."""

    def __init__(self, vocab: int, acceptance=None):
        self.vocab, self.acceptance, self.events = vocab, acceptance, []

    def propose(self, ctx, k, procs, greedy, gen):
        drafts = [(ctx[-1] * 7 + i) % self.vocab for i in range(k)]
        self.events.append(("propose", len(ctx), drafts))
        return drafts, torch.nn.functional.one_hot(torch.tensor(drafts), self.vocab).float()

    def accept(self, seq_id, ctx_len):
        self.events.append(("accept", ctx_len, None))

    def kept(self, final_len: int) -> list[tuple[int, int]]:
        """(position, token) of every accepted draft: a round's context of L tokens verified to L + a; the
        last round, ended by max_tokens, is not told (its a + 1 tokens end the sequence)."""
        out = []
        for j, (kind, length, drafts) in enumerate(self.events):
            if kind != "propose":
                continue
            nxt = self.events[j + 1] if j + 1 < len(self.events) else ("end", final_len - 1, None)
            a = nxt[1] - length
            out += [(length + i, drafts[i]) for i in range(a)]
        return out


def test_typical_acceptance_on_a_flat_target_keeps_drafts_above_the_threshold_only():
    """A near-uniform target (H ~ 5.4 nats over 257 tokens): the exact rule keeps a one-hot draft with
    probability p(x) ~ 0.004, typical acceptance whenever p(x) > min(0.09, 0.3 exp(-H)) ~ 0.0014, most of
    them. Every draft the engine kept has that probability under the target (its own forward over the
    output, temperature 1), and some were rejected: the threshold, not everything, decides."""
    V = 257
    target = tiny_model("llama", init_std=0.1)
    prompt = [5, 9, 17, 3]
    sp = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=3)
    stats = {}
    for name, rule in (("exact", None), ("typical", TypicalAcceptance())):
        drafter = _Stride(V, rule)
        out = run_requests(Engine(target, IdTokenizer(V), draft=drafter, num_draft_tokens=4), [(prompt, sp)])[0]
        stats[name] = out.metrics
        full = prompt + out.outputs[0].token_ids
        kept = drafter.kept(len(full))
        assert len(kept) == out.metrics["accepted"]
        if name == "typical":
            with torch.no_grad():
                p = target(torch.tensor([full]))[0].float().softmax(-1)
            for pos, tok in kept:
                assert full[pos] == tok
                row = p[pos - 1]
                threshold = min(0.09, 0.3 * math.exp(float(torch.special.xlogy(row, row).sum())))
                assert float(row[tok]) > threshold * (1 - 1e-4), (pos, tok)
    typical, exact = stats["typical"], stats["exact"]
    assert typical["accepted"] > 3 * max(exact["accepted"], 1)
    assert typical["accepted"] < typical["drafted"]  # some drafts fell below the threshold
    assert typical["target_forwards"] < exact["target_forwards"]


def test_the_engine_takes_the_rule_for_any_drafter(tok):
    """acceptance= on LLM/Engine: Medusa is parallel heads (draft='mtp') verified by typical acceptance. On a
    flat target it keeps more of the heads' drafts than the exact rule, greedy output stays the target's; a
    rule without a draft, or not a rule, is refused."""
    from lmforge.model.config import MTPConfig

    target = tiny_model("llama", init_std=0.05, mtp=MTPConfig(kind="parallel", depth=2))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    medusa = LLM(target, tok, draft="mtp", num_draft_tokens=2, acceptance=TypicalAcceptance())
    assert medusa.engine.make_drafter.acceptance == TypicalAcceptance()
    assert medusa.generate("abc", greedy)[0].outputs[0].token_ids == full_greedy(target, tok.encode("abc"), 12)
    hot = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=1)
    exact = LLM(target, tok, draft="mtp", num_draft_tokens=2).generate("abc", hot)[0].metrics
    typical = medusa.generate("abc", hot)[0].metrics
    assert typical["accepted"] > exact["accepted"]
    with pytest.raises(ConfigError, match="acceptance= applies to speculative decoding: give a draft too"):
        LLM(target, tok, acceptance=TypicalAcceptance())
    with pytest.raises(ConfigError, match=r"^acceptance must be an acceptance rule"):
        LLM(target, tok, draft="ngram", acceptance="typical")

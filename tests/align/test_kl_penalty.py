"""kl_penalty: Schulman's per-token KL estimators (k1, k2, k3) on the RL grid, 0 outside the response mask, so the
KL-penalised rewards of docs/rl.md reach gae; and the grid helpers' one-line refusals of tensors on another device."""

import pytest
import torch

from lmforge.align.advantages import gae, kl_penalty, masked_whiten, outcome_rewards
from lmforge.align.logprobs import response_mask, token_logprobs
from lmforge.errors import ConfigError


def grid():
    g = torch.Generator().manual_seed(0)
    logps, ref = -torch.rand(3, 6, generator=g) * 3, -torch.rand(3, 6, generator=g) * 3
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, :2] = False  # the prompt
    mask[1, 4:] = False  # a shorter response
    return logps, ref, mask


def test_kl_penalty_is_schulmans_estimators_zero_outside_the_mask():
    logps, ref, mask = grid()
    log_r = ref - logps  # Schulman (2020): r = ref(x) / pi(x), x ~ pi
    want = {"k1": -log_r, "k2": log_r ** 2 / 2,
            "k3": torch.exp(ref - logps) - (ref - logps) - 1}  # TRL GRPOTrainer's per_token_kl, as written there
    for kind, w in want.items():
        got = kl_penalty(logps, ref, mask, kind=kind)
        torch.testing.assert_close(got[mask], w[mask], rtol=1e-6, atol=1e-6)
        assert got.dtype == torch.float32 and torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
    assert kl_penalty(logps, ref, mask).equal(torch.where(mask, logps - ref, 0.0))  # the default is k1


def test_k1_and_k3_average_to_the_true_kl_over_samples_of_the_policy():
    g = torch.Generator().manual_seed(1)
    pi, ref = torch.log_softmax(torch.randn(5, generator=g), 0), torch.log_softmax(torch.randn(5, generator=g), 0)
    true = float((pi.exp() * (pi - ref)).sum())
    x = torch.multinomial(pi.exp(), 200_000, replacement=True, generator=g)[None]
    mask = torch.ones_like(x, dtype=torch.bool)
    for kind in ("k1", "k3"):  # unbiased; k3 also never negative
        k = kl_penalty(pi[x], ref[x], mask, kind=kind)
        assert abs(float(k.mean()) - true) < 0.02 * max(true, 0.1), kind
    assert float(kl_penalty(pi[x], ref[x], mask, kind="k3").min()) >= 0


def test_kl_penalised_rewards_of_token_logprobs_reach_gae():
    """docs/rl.md's PPO rewards: the score minus kl_coef * (policy - reference) per token. token_logprobs is
    meaningless at the prompt's -100 targets, so the raw difference puts rewards outside the mask, which gae
    refuses; kl_penalty keeps it inside, and gae's refusal of the raw one names it."""
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 8))
    targets = torch.cat([ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1)
    targets[:, :3] = -100
    targets[1, 6:] = -100
    mask = response_mask({"targets": targets})
    logps, ref = token_logprobs(torch.randn(2, 8, 16), targets), token_logprobs(torch.randn(2, 8, 16), targets)
    scores = outcome_rewards(torch.tensor([1.0, -0.5]), mask)
    with pytest.raises(ConfigError, match=r"lies outside the mask.*kl_penalty\(logps, ref_logps, mask\) is 0 outside"):
        gae(scores - 0.1 * (logps - ref), torch.zeros(2, 8), mask)
    rewards = scores - 0.1 * kl_penalty(logps, ref, mask)
    adv, _ = gae(rewards, torch.zeros(2, 8), mask, gamma=1.0, lam=1.0)  # lam = 1, V = 0: the rewards-to-go
    want = torch.where(mask, rewards.flip(-1).cumsum(-1).flip(-1), 0.0)
    torch.testing.assert_close(adv, want)


def test_kl_penalty_ignores_nan_padding_in_value_and_gradient():
    logps, ref, mask = grid()
    logps = torch.where(mask, logps, float("nan")).requires_grad_()
    ref = torch.where(mask, ref, float("-inf"))
    for kind in ("k1", "k2", "k3"):
        k = kl_penalty(logps, ref, mask, kind=kind)
        (grad,) = torch.autograd.grad(k.sum(), logps)
        assert torch.isfinite(k).all() and torch.isfinite(grad).all() and not grad[~mask].any(), kind


def test_bad_input_is_refused_in_one_line():
    logps, ref, mask = grid()
    with pytest.raises(ConfigError, match=r"kind='kl' must be one of \['k1', 'k2', 'k3'\]"):
        kl_penalty(logps, ref, mask, kind="kl")
    with pytest.raises(ConfigError, match=r"ref_logps must be a \(B, T\) tensor shaped like the mask \(3, 6\), got "
                                          r"\(3, 5\)"):
        kl_penalty(logps, ref[:, 1:], mask)
    away = torch.empty(3, 6, device="meta")  # e.g. a reference's log-probs left on the reference's device
    with pytest.raises(ConfigError, match=r"^ref_logps is on meta but the mask on cpu: move it there"):
        kl_penalty(logps, away, mask)
    with pytest.raises(ConfigError, match=r"^values is on meta but the mask on cpu"):
        gae(torch.zeros(3, 6), away, mask)
    with pytest.raises(ConfigError, match=r"^x is on meta but the mask on cpu"):
        masked_whiten(away, mask)
    with pytest.raises(ConfigError, match=r"^scores are on meta but the mask on cpu"):
        outcome_rewards(torch.empty(3, device="meta"), mask)


def test_gae_given_one_score_per_sequence_names_outcome_rewards():
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ConfigError, match=r"^rewards must be a \(B, T\) tensor shaped like the mask \(2, 5\), got "
                                          r"\(2,\); one score per sequence goes on its last response token: "
                                          r"outcome_rewards\(scores, mask\)$"):
        gae(torch.tensor([1.0, 0.0]), torch.zeros(2, 5), mask)

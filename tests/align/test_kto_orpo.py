"""KTO and ORPO: paper equations on fixed numbers, and the objectives on a tiny model against TRL's
KTOTrainer / ORPOTrainer code fed the same model's log-probs (loss, metrics, parameter gradients)."""

import math
from pathlib import Path

import pytest
import torch

from lmforge.align.config import DistillConfig, DPOConfig, RewardConfig, SFTConfig
from lmforge.align.kto import KTOConfig, KTOObjective, mismatched_rows
from lmforge.align.logprobs import token_logprobs
from lmforge.align.losses import kto_kl, kto_loss, log1mexp, orpo_ratio_loss
from lmforge.align.orpo import ORPOConfig, ORPOObjective
from lmforge.errors import ConfigError

from .helpers import grads, pair_batch, sequences, tiny_model
from .trl_ref import trl_kto, trl_orpo_ratio


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_equation_on_fixed_numbers():
    pi, ref = torch.tensor([-4.0, -6.0, -5.0]), torch.tensor([-5.0, -5.0, -5.5])
    good = torch.tensor([True, False, True])
    z0 = kto_kl(torch.tensor([-3.0, -4.0]), torch.tensor([-3.2, -4.4]))  # mean(0.2, 0.4) = 0.3
    assert z0.item() == pytest.approx(0.3)
    assert kto_kl(torch.tensor([-5.0]), torch.tensor([-4.0])).item() == 0.0  # clamped at 0
    got = kto_loss(pi, ref, good, z0, beta=0.5, desirable_weight=1.5, undesirable_weight=0.8)
    r = [1.0, -1.0, 0.5]
    want = [1.5 * (1 - _sig(0.5 * (r[0] - 0.3))), 0.8 * (1 - _sig(0.5 * (0.3 - r[1]))),
            1.5 * (1 - _sig(0.5 * (r[2] - 0.3)))]
    torch.testing.assert_close(got, torch.tensor(want))


def test_orpo_equation_and_log1mexp():
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50  # exact enough where the naive log(1 - exp(x)) cancels (x near 0, x << 0)
    want = torch.tensor([float(mpmath.log(1 - mpmath.exp(v))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), want, rtol=1e-12, atol=0)
    c, r = torch.tensor([-0.5]), torch.tensor([-1.5])
    pc, pr = math.exp(-0.5), math.exp(-1.5)
    odds = (pc / (1 - pc)) / (pr / (1 - pr))
    assert orpo_ratio_loss(c, r).item() == pytest.approx(-math.log(_sig(math.log(odds))), rel=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.3, 0.7)])
def test_kto_objective_matches_trl(weights):
    model, ref = tiny_model(0), tiny_model(1)
    B, T, V = 4, 10, 41
    batch = {**sequences(B, T, V, [2, 3, 2, 4], 5), **sequences(B, T, V, [2, 3, 2, 4], 6, "kl_"),
             "label": torch.tensor([True, False, True, False])}
    obj = KTOObjective(KTOConfig(beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1]),
                       reference=ref)
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    g_ours = grads(model)

    def seq(m, p):
        return (token_logprobs(m(batch[f"{p}input_ids"]), batch[f"{p}targets"]) * batch[f"{p}loss_mask"]).sum(-1)

    with torch.no_grad():
        ref_lp, ref_kl, kl_lp = seq(ref, ""), seq(ref, "kl_"), seq(model, "kl_")
    tok = token_logprobs(model(batch["input_ids"]), batch["targets"])
    t_loss, t_metrics = trl_kto(0.3, tok, batch["loss_mask"], batch["label"], ref_lp, kl_lp, ref_kl, *weights)
    t_loss.backward()
    torch.testing.assert_close(loss, t_loss)
    for a, b in zip(g_ours, grads(model)):
        torch.testing.assert_close(a, b)
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[k].item() == pytest.approx(t_metrics[k], abs=1e-5), k


def test_kto_builds_mismatched_rows_itself():
    """Without kl_* keys the objective pairs each prompt with the previous row's completion (TRL's KTOTrainer:
    completions[-1:] + completions[:-1]; it was the next row's): the same loss as those rows given explicitly,
    built here from the raw token lists."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 41, (n,), generator=g) for n in (3, 5, 2)]
    comps = [torch.randint(0, 41, (n,), generator=g) for n in (4, 2, 6)]

    def build(pairs):
        T = max(len(p) + len(c) for p, c in pairs) - 1
        ids, tgt = torch.zeros(len(pairs), T, dtype=torch.long), torch.full((len(pairs), T), -100)
        for i, (p, c) in enumerate(pairs):
            full = torch.cat([p, c])
            ids[i, :len(full) - 1] = full[:-1]
            tgt[i, len(p) - 1:len(full) - 1] = c
        return ids, tgt

    ids, tgt = build(list(zip(prompts, comps)))
    batch = {"input_ids": ids, "targets": tgt, "loss_mask": tgt >= 0, "label": torch.tensor([True, False, True])}
    kl_ids, kl_tgt = build(list(zip(prompts, comps[-1:] + comps[:-1])))
    rows = mismatched_rows(batch)
    assert torch.equal(rows["kl_input_ids"], kl_ids) and torch.equal(rows["kl_targets"], kl_tgt)
    model, ref = tiny_model(0), tiny_model(1)
    auto = KTOObjective(reference=ref).loss(model, batch)
    explicit = KTOObjective(reference=ref).loss(model, {**batch, **rows})
    torch.testing.assert_close(auto[0], explicit[0])
    assert auto[1]["kl"] == explicit[1]["kl"]
    no_kl = KTOObjective(KTOConfig(kl=False), reference=ref).loss(model, batch)[1]["kl"]
    assert no_kl.item() == 0.0


def test_orpo_objective_matches_trl():
    model = tiny_model(0)
    batch = pair_batch()
    obj = ORPOObjective(ORPOConfig(beta=0.25))
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    g_ours = grads(model)
    # TRL: average_log_prob=True for the odds, chosen NLL = token-mean cross-entropy, loss = nll - mean(ratio)
    toks = {p: token_logprobs(model(batch[f"{p}input_ids"]), batch[f"{p}targets"]) for p in ("chosen_", "rejected_")}
    avg = {p: (toks[p] * batch[f"{p}loss_mask"]).sum(-1) / batch[f"{p}loss_mask"].sum(-1) for p in toks}
    nll = torch.nn.functional.cross_entropy(model(batch["chosen_input_ids"]).flatten(0, 1),
                                            batch["chosen_targets"].flatten(), ignore_index=-100)
    ratio, rc, rr, log_odds_ratio, log_odds_chosen = trl_orpo_ratio(0.25, avg["chosen_"], avg["rejected_"])
    t_loss = nll - ratio.mean()
    t_loss.backward()
    torch.testing.assert_close(loss, t_loss)
    for a, b in zip(g_ours, grads(model)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(metrics["rewards/chosen"], rc.mean())
    torch.testing.assert_close(metrics["log_odds_ratio"], log_odds_ratio)
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds_chosen)


def test_bad_configs():
    with pytest.raises(ConfigError, match="beta"):
        KTOConfig(beta=-1)
    with pytest.raises(ConfigError, match="desirable_weight"):
        KTOConfig(desirable_weight=0)
    with pytest.raises(ConfigError, match="beta must be > 0, got 0.0; e.g. 0.1 \\(the weight of the odds-ratio"):
        ORPOConfig(beta=0)


@pytest.mark.parametrize("section,config,field", [
    ("dpo", DPOConfig, "beta"), ("dpo", DPOConfig, "simpo_gamma"), ("kto", KTOConfig, "beta"),
    ("kto", KTOConfig, "desirable_weight"), ("orpo", ORPOConfig, "beta"),
    ("rm", RewardConfig, "center_rewards_coefficient"), ("distill", DistillConfig, "temperature"),
    ("distill", DistillConfig, "weight"), ("distill", DistillConfig, "sft_weight"),
    ("sft", SFTConfig, "neftune_alpha")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_option_is_refused_naming_it(section, config, field, value):
    """inf passes `beta > 0` and NaN passes `coefficient < 0`: either trained to a NaN loss at the first step."""
    with pytest.raises(ConfigError, match=f"^{section}.{field} must be a finite number, got {value}$"):
        config(**{field: value})


def test_mismatched_rows_of_conversational_completions_hold_real_tokens():
    """A conversational completion trains its assistant turns, not the user turn between them: its targets
    have a -100 gap. The mismatched rows are then each prompt + the previous row's completion exactly as that
    record would encode (the gap's tokens as inputs, untrained), never -100 in kl_input_ids."""
    from lmforge.align import data as D
    from lmforge.tokenizer.byte import ByteTokenizer

    enc = D.Encoder(ByteTokenizer(), "plain")
    u, a = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    prompts = [[u("hi"), a("OLD"), u("again")], [u("yo")], [u("q")]]
    comps = [[a("NEW")], [a("ok"), u("and?"), a("done")], [a("x"), u("y"), a("zz")]]
    items = [(enc.prompt_completion(p, c, f"x:{i}"), i != 1) for i, (p, c) in enumerate(zip(prompts, comps))]
    b = D.kto_batch(items)
    want = D.pad_batch([enc.prompt_completion(prompts[i], comps[i - 1], "w") for i in range(3)])
    assert int(b["kl_input_ids"].min()) >= 0
    for k in ("input_ids", "targets", "loss_mask"):
        assert b[f"kl_{k}"].tolist() == want[k].tolist(), k
    row0 = [t for t, m in zip(want["targets"][0].tolist(), want["loss_mask"][0].tolist()) if m]
    # row 0's prompt + row 2's completion: the user turn untrained, the final answer closed by end-of-text
    assert ByteTokenizer().decode(row0) == "x\nzz<|endoftext|>"
    loss, metrics = KTOObjective(reference=tiny_model(1, vocab_size=257)).loss(tiny_model(0, vocab_size=257), b)
    assert torch.isfinite(loss) and torch.isfinite(metrics["kl"])



@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_mismatched_rows_fit_seq_len(tmp_path, truncation):
    """A long prompt followed by another record's long completion made a mismatched row of up to twice seq_len
    (a learned-positions model then stopped: 'position 109 is beyond model.max_seq_len=64'). The data's KL rows
    are truncated to seq_len + 1 tokens as its examples are (TRL truncates its KL rows to max_length): each is
    the record pair's own encoding, truncated."""
    import json

    from lmforge.align import data as D
    from lmforge.align.config import PostDataConfig
    from lmforge.tokenizer.byte import ByteTokenizer

    tok, seq_len = ByteTokenizer(), 24
    records = [("p" * 18, "c" * 3), ("q" * 3, "d" * 18), ("r" * 10, "e" * 10)]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": i % 2 == 0}) + "\n"
                            for i, (p, c) in enumerate(records)))
    cfg = PostDataConfig(train=(str(path),), template="plain", seq_len=seq_len, batch_size=3, val_fraction=0,
                         truncation=truncation)
    src, _, _ = D.build_sources(cfg, tok, "kto", seed=0)
    batch = src.next_batch()
    assert batch["kl_input_ids"].shape[1] <= seq_len  # was 28: 10 + 18 + 1 (end of text) - 1
    enc, keep_end = D.Encoder(tok, "plain"), truncation == "keep_end"
    order = [next(i for i, (p, _) in enumerate(records) if bytes(row[:3].tolist()) == p[:3].encode())
             for row in batch["input_ids"]]  # the shuffled batch's records
    want = D.pad_batch([D._truncate(enc.prompt_completion(records[order[i]][0], records[order[i - 1]][1], "w"),
                                    seq_len + 1, [], "w", keep_end) for i in range(3)])
    for k in ("input_ids", "targets", "loss_mask"):
        assert batch[f"kl_{k}"].tolist() == want[k].tolist(), k


def _kto_step(tmp_path, name, batches, grad_accum, layout=None):
    """The first step's metrics of a Trainer running KTO on a tiny model over `batches` (micro-batches): in one
    process, or on this rank's rows (RankRows) through a ParallelRunner of `layout`."""
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.harness import FixedBatches
    from lmforge.train.trainer import Trainer

    model, data, runner = tiny_model(0), FixedBatches(batches), None
    if layout is not None:
        from lmforge.parallel.config import ParallelConfig
        from lmforge.parallel.runner import ParallelRunner
        from lmforge.train.distributed import RankRows

        runner = ParallelRunner(model, ParallelConfig(**layout), device="cpu")
        model, data = runner.model, RankRows(data, runner.dp_rank, runner.dp_size, len(batches[0]["label"]))
    cfg = LoopConfig(optim=OptimConfig(lr=1e-2, warmup_steps=0), run_dir=str(tmp_path / name), max_steps=1,
                     grad_accum=grad_accum, log_every=1, eval_every=100, ckpt_every=100, device="cpu", dtype="fp32",
                     progress=False, plot=False)
    obj = KTOObjective(KTOConfig(beta=0.3, kl=False), reference=tiny_model(1))
    tr = Trainer(model, build_optimizer(model, cfg.optim), data, obj, config=cfg, runner=runner)
    tr.train_step()
    return tr.flush()


@pytest.mark.parametrize("labels", [([1, 1, 1], [0, 0, 0]), ([1, 1, 1], [1, 0, 0])])
def test_kto_per_label_metrics_combine_over_micro_batches(tmp_path, labels):
    """rewards/margins was computed per micro-batch, so a step whose desirable and undesirable rows fell in
    different micro-batches logged it NaN, and per-label means were averaged by micro-batch, not by row. They
    come from sums and counts over the step: equal to one batch of all the rows, and the margin is chosen -
    rejected. A step without an undesirable row logs that label's means and the margin as null (NaN)."""
    parts = [{**sequences(3, 10, 41, [2, 3, 4], seed), "label": torch.tensor(lab, dtype=torch.bool)}
             for seed, lab in zip((5, 6), labels)]
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    one = _kto_step(tmp_path, "one", [whole], 1)
    split = _kto_step(tmp_path, "split", parts, 2)
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins",
              "num_chosen", "num_rejected"):
        assert split[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    assert math.isfinite(split["rewards/margins"])
    assert split["rewards/margins"] == pytest.approx(split["rewards/chosen"] - split["rewards/rejected"])
    assert (split["num_chosen"], split["num_rejected"]) == (sum(map(sum, labels)), 6 - sum(map(sum, labels)))

    good = [{**p, "label": torch.ones(3, dtype=torch.bool)} for p in parts]
    only = _kto_step(tmp_path, "only", good, 2)
    assert math.isfinite(only["rewards/chosen"]) and only["num_rejected"] == 0
    assert math.isnan(only["rewards/rejected"]) and math.isnan(only["rewards/margins"])


def test_kto_validation_margin_from_the_label_means():
    """ObjectiveEvaluator took the margin per validation batch: with the desirable rows in one batch and the
    undesirable in another it was NaN. It is the difference of the per-label means over the batches."""
    from lmforge.align.sft import ObjectiveEvaluator

    obj = KTOObjective(KTOConfig(beta=0.3, kl=False), reference=tiny_model(1))
    good = {**sequences(3, 10, 41, [2, 3, 4], 5), "label": torch.ones(3, dtype=torch.bool)}
    bad = {**sequences(2, 10, 41, [2, 3], 6), "label": torch.zeros(2, dtype=torch.bool)}
    model = tiny_model(0)
    out = ObjectiveEvaluator(obj, [good, bad])(model)
    _, m_good = obj.loss(model, good)
    _, m_bad = obj.loss(model, bad)
    assert out["val_rewards/chosen"] == pytest.approx(float(m_good["rewards/chosen"]), rel=1e-5)
    assert out["val_rewards/rejected"] == pytest.approx(float(m_bad["rewards/rejected"]), rel=1e-5)
    assert math.isfinite(out["val_rewards/margins"])
    assert out["val_rewards/margins"] == pytest.approx(out["val_rewards/chosen"] - out["val_rewards/rejected"])


def test_kto_validation_leaves_out_a_label_no_batch_has():
    """A validation set whose batches are all desirable (a small val set, or eval_batches = 1 over a first batch of
    one label) logged val_rewards/rejected, val_logps/rejected and val_rewards/margins as NaN (`nan` on the console,
    null in metrics.jsonl). A label without rows has no mean: its metrics are left out, as TRL's KTOTrainer leaves
    them out; its count is 0. With one batch of each kind every metric is the finite per-label mean."""
    from lmforge.align.sft import ObjectiveEvaluator

    obj = KTOObjective(KTOConfig(beta=0.3, kl=False), reference=tiny_model(1))
    good = {**sequences(3, 10, 41, [2, 3, 4], 5), "label": torch.ones(3, dtype=torch.bool)}
    more = {**sequences(2, 10, 41, [3, 2], 7), "label": torch.ones(2, dtype=torch.bool)}
    both = {**sequences(2, 10, 41, [2, 3], 6), "label": torch.tensor([True, False])}
    model = tiny_model(0)
    with torch.no_grad():
        out = ObjectiveEvaluator(obj, [good, more])(model)
        mixed = ObjectiveEvaluator(obj, [good, both])(model)
        m_good, m_more = (obj.loss(model, b)[1] for b in (good, more))
    assert not {"val_rewards/rejected", "val_logps/rejected", "val_rewards/margins"} & set(out)
    assert all(math.isfinite(v) for v in out.values()) and out["val_num_rejected"] == 0
    assert out["val_rewards/chosen"] == pytest.approx(  # (the mean over batches of each batch's mean)
        (float(m_good["rewards/chosen"]) + float(m_more["rewards/chosen"])) / 2, rel=1e-5)
    assert set(mixed) == {f"val_{k}" for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen",
                                               "logps/rejected", "rewards/margins", "num_chosen", "num_rejected")}
    assert all(math.isfinite(v) for v in mixed.values())


def _kto_rank_worker(rank: int, world: int, root: str, batches: list[dict]) -> dict:
    return _kto_step(Path(root), "ranks", batches, 1, dict(dp_replicate=2))


def test_kto_per_label_metrics_combine_over_ranks(tmp_path):
    """Under a ParallelRunner each rank computed the per-label means of its own rows: with the desirable rows on
    one rank and the undesirable on the other the margin was NaN. The step's values are one process's."""
    from lmforge.parallel.launch import run_local

    batch = {**sequences(4, 10, 41, [2, 3, 4, 2], 7), "label": torch.tensor([True, True, True, False])}
    one = _kto_step(tmp_path, "one", [batch], 1)
    got = run_local(_kto_rank_worker, 2, str(tmp_path), [batch], timeout=120, start_method="fork")[0]
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins",
              "num_chosen", "num_rejected"):
        assert got[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k


def test_a_lone_row_has_no_mismatched_completion_and_batch_size_1_is_refused():
    """A batch of one row (an epoch's or the validation set's short last batch) has no other row's completion:
    pairing it with its own would make KTO's reference point z0 its own implied reward. Its KL row counts nothing
    (z0 = 0, as kl=False); `lmforge kto` refuses data.batch_size = 1 as TRL's KTOTrainer refuses it."""
    from lmforge.align.config import PostDataConfig, config_class

    batch = sequences(1, 8, 41, [3], seed=0)
    batch["label"] = torch.tensor([True])
    rows = mismatched_rows(batch)
    assert not rows["kl_loss_mask"].any() and (rows["kl_targets"] == -100).all()
    model, ref = tiny_model(3), tiny_model(0)
    with torch.no_grad():
        r = ((token_logprobs(model(batch["input_ids"]), batch["targets"])
              - token_logprobs(ref(batch["input_ids"]), batch["targets"])) * batch["loss_mask"]).sum()
    assert r > 0.1  # the row's own log-ratio: what z0 was (clamped at 0) when the row paired with itself
    loss, metrics = KTOObjective(reference=ref).loss(model, batch)
    assert metrics["kl"].item() == 0.0
    torch.testing.assert_close(loss, KTOObjective(KTOConfig(kl=False), reference=ref).loss(model, batch)[0])
    cls = config_class("kto")
    with pytest.raises(ConfigError, match="data.batch_size=1: KTO .* set data.batch_size >= 2, or kto.kl = false"):
        cls(data=PostDataConfig(batch_size=1))
    assert cls(data=PostDataConfig(batch_size=1), kto=KTOConfig(kl=False)).data.batch_size == 1

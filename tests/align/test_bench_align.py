"""The post-training benches train through lmforge's Trainer (bench/align_common.fit): their data and
their training must equal a plain implementation of what the bench documents."""

import copy

import torch
import torch.nn.functional as F

from bench.align_common import TOK, encode, fit, source
from tests.align.helpers import tiny_model

T = 24


def test_records_train_the_completion_only():
    """A prompt/completion record: inputs are the tokens but the last, targets the next tokens on the
    completion (+ end-of-text when the tokenizer has one), -100 on the prompt."""
    (ids, mask), = encode([{"prompt": "Q: 12\nA: ", "completion": "3\n"}], "sft", T)
    p, c = TOK.encode("Q: 12\nA: "), TOK.encode("3\n") + ([TOK.eot_id] if TOK.eot_id is not None else [])
    assert ids == p + c
    assert mask == [False] * len(p) + [True] * len(c)
    batch = source([{"prompt": "Q: 12\nA: ", "completion": "3\n"}] * 2, "sft", T, 2, 0).next_batch()
    want = torch.tensor([-100] * (len(p) - 1) + c)
    assert torch.equal(batch["targets"][0], want) and torch.equal(batch["input_ids"][0], torch.tensor(ids[:-1]))


def test_fit_equals_a_plain_adamw_loop():
    """fit(model, SFT objective, source) = torch AdamW (betas 0.9/0.95, no decay), constant lr after a
    linear warm-up over steps // 20, clipping at 1.0, masked token-mean cross-entropy on the same batches."""
    from lmforge.align.sft import SFTObjective

    records = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}\n"} for a in range(6) for b in range(5)]
    steps, lr = 40, 3e-3
    model = tiny_model(vocab_size=TOK.vocab_size)
    ref = copy.deepcopy(model)
    fit(model, SFTObjective(), source(records, "sft", T, 4, seed=3), steps, lr, "cpu")

    data = source(records, "sft", T, 4, seed=3)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    warm = max(1, steps // 20)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm)
        b = data.next_batch()
        logits = ref(b["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bench_sizes_follow_device_and_explicit_flags_win():
    from bench import align_compare, align_distill

    gpu = align_compare.parse(["--device", "cuda"])
    assert (gpu.d, gpu.layers, gpu.sft_examples) == (256, 6, 100_000)
    assert align_compare.parse([]).d == 96 and align_compare.parse(["--smoke"]).d == 32
    assert align_compare.parse(["--device", "cuda", "--layers", "2"]).layers == 2
    d = align_distill.parse(["--device", "cuda:0", "--steps", "7"])
    assert (d.teacher, d.teacher_lr, d.train, d.steps) == ("384,6", 1e-3, 100_000, 7)
    assert align_distill.parse(["--smoke"]).teacher == "48,2"


def _results(path) -> dict:
    import json

    return json.loads(path.read_text())["results"]


def test_align_compare_smoke_runs_every_method(tmp_path, monkeypatch):
    """bench/align_compare.py --smoke, the script's CPU check: SFT, the verifier's pairs, the reward model and every
    preference method; a method that fails is caught into its row (an error, not an exit status)."""
    from bench import align_compare

    monkeypatch.setenv("OUT", str(tmp_path))
    align_compare.main(["--smoke"])
    results = _results(tmp_path / "align_compare_count_s0_smoke.json")
    assert set(results) == {"before", *align_compare.METHODS}
    assert all(0 <= r["accuracy"] <= 1 and "error" not in r for r in results.values())


def test_align_distill_smoke_runs_every_student(tmp_path, monkeypatch):
    """bench/align_distill.py --smoke: the teacher and every student variant train (a failing one is skipped with
    its error in the row)."""
    from bench import align_distill

    monkeypatch.setenv("OUT", str(tmp_path))
    align_distill.main(["--smoke"])
    results = _results(tmp_path / "align_distill_count_s0_smoke.json")
    assert set(results) == {"teacher", *align_distill.parse(["--smoke"]).variants.split(",")}
    assert all(0 <= r["accuracy"] <= 1 and "skipped" not in r for r in results.values())

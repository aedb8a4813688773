"""Benchmarks that train models do so through the one Trainer; their training must equal the plain
loop each documents (bench/speculative.py; bench/align_common.py and lmforge.optim.benchmark have their
own tests)."""

import copy

import torch

from bench import speculative as S
from lmforge.optim.adamw import AdamW
from lmforge.optim.groups import role_groups
from lmforge.train.loss import lm_loss


def _setup(steps: int):
    args = S.parse(["--quick", "--max-steps", str(steps), "--warmup", "3", "--seq-len", "16", "--batch-size", "4",
                    "--eval-batches", "1"])
    data = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(1)).to(torch.int16)
    torch.manual_seed(0)
    model = S.Transformer(S.llama_config(32, 1, args.vocab, 64))
    return args, data, model


def test_speculative_training_equals_a_plain_loop():
    """With the clock's decay made negligible (a 1e9 s budget), train_for = AdamW (decay 0.1) with a linear
    warm-up, clipping at 1.0, on the same random windows, for --max-steps steps."""
    args, data, model = _setup(6)
    ref = copy.deepcopy(model)
    res = S.train_for("t", model, data, data, 1e9, 3e-3, args, torch.device("cpu"))
    assert res["steps"] == 6

    opt = AdamW(role_groups(ref, 0.1), lr=3e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(6):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 3)
        x, y = S.windows(data, torch.randint(0, len(data) - 17, (4,), generator=gen), 16)
        lm_loss(ref(x), y)[0].backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_speculative_training_stops_when_the_clock_runs_out():
    """A spent budget ends training after the first (untimed) step and one more."""
    args, data, model = _setup(100)
    assert S.train_for("t", model, data, data, 0.0, 3e-3, args, torch.device("cpu"))["steps"] == 2

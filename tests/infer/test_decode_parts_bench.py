"""bench/decode_parts.py leaves out exactly the kinds of kernel it is asked to: run through one kernel step (Triton's
interpreter on CPU), its launch filter sees every launch of the step under the right kind, and a left-out kind
launches nothing."""

import pytest
import torch

from lmforge.infer import kernel_step as kstep
from lmforge.kernels import decode as kd
from lmforge.kernels.tuning import KernelConfigs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kd.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def test_filter_sees_every_kernel_by_kind_and_skips_what_it_is_told():
    from bench import decode_parts as P

    model, kv = P.build(tiny=True, context=5, dev=DEV)
    step = kstep.KernelStep(model, kv)
    # wide tiles, one attention slice: few programs per launch, which Triton's interpreter runs one by one (what the
    # filter sees does not depend on block shapes)
    wide = {"gemv": (64, 256, 4), "add": (64, 256, 4, 1), "qkv_rope": (8, 512, 4), "attend": (1, 64, 8)}
    step = kstep.KernelStep(model, kv, configs=KernelConfigs(model=step.signature,
                                                             table={repr(key): wide[key[0]] for key in step.keys()}))
    tok, pos = torch.zeros(1, dtype=torch.long, device=DEV), torch.full((1,), 5, dtype=torch.long, device=DEV)
    f = P.Filter(step)
    seen = []
    kind = f.kind
    f.kind = lambda x, **kw: seen.append(kind(x, **kw)) or seen[-1]
    with f:
        want = step.step(tok, pos).clone()
        f.skip = {"head"}
        step.logits.zero_()
        step.step(tok, pos)
        headless = step.logits.clone()
        # a null kernel in a kind's place: that kind's launches become null launches, the others run
        launched = []
        null = P.null_launch
        P.null_launch = lambda s: launched.append("null") or null(s)
        try:
            f.skip, f.null = set(), {"o", "attn"}
            step.step(tok, pos)
        finally:
            P.null_launch = null
    assert seen[:3 * model.cfg.n_layers + 1] == ["o", "gu", "down"] * model.cfg.n_layers + ["head"]
    assert torch.equal(headless, torch.zeros_like(headless))  # the head left out: logits never written
    assert launched == ["null", "null"] * model.cfg.n_layers and step.logits.abs().sum() > 0
    assert kd.gemv is f.orig["gemv"]  # the launchers are restored on exit
    torch.testing.assert_close(step.step(tok, pos), want)
    # every matrix but the embedding's once, plus the one embedding row in the model's dtype (norm gains are not
    # counted; with them, the bytes bench/decode.py's roofline divides by)
    emb = model.tok_emb.weight
    matrices = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    matrices -= emb.numel() * emb.element_size()
    assert sum(P.weight_bytes(model).values()) == matrices + model.cfg.d_model * emb.element_size()
    norms = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 1)
    assert sum(P.weight_bytes(model).values()) + norms == P.decode_weight_bytes(model)

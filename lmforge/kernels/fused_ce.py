"""Fused linear + cross-entropy that never holds the full (tokens × vocab) logits (Liger-style, Hsu et al.
2024, "Liger Kernel", sec. 3.4).

The LM head's logits are the largest activation of a training step: 65k tokens × 50k vocab in fp32 is
13 GB. Here the tokens are cut into chunks of C rows and, chunk by chunk, in the forward:

    z   = h_c W^T                           (C, V) in the matmul dtype, the only logits ever held
    a Triton kernel per row: lse by an online max/sum over vocab blocks, loss = lse - z[target], and
        overwrites z in place with  dL/dz · n = p · (1 + 2·zl·lse) - onehot(target)   (p = softmax(z))
    dh_c  = dz W,   dW += dz^T h_c          (W's gradient accumulated in fp32)

so the forward already produces the gradients w.r.t. h and W; the backward only scales them by the
incoming gradient. The loss is lm_loss's: mean cross-entropy over targets != ignore_index, plus PaLM's
z-loss zl · mean(lse²) (its gradient 2·zl·lse·p is the second term above). Peak extra memory is one
chunk of logits plus dh (h's size) and dW (fp32, W's size) instead of N × V logits and their gradient.
Reference: lmforge.train.loss.lm_loss(h @ W^T, targets, z_loss).
"""

from __future__ import annotations

import functools

import torch

from lmforge.errors import ConfigError
from lmforge.kernels.decode import available, falls_back, triton
from lmforge.model.layers.fused import plain_linear
from lmforge.train.loss import LMObjective, lm_loss, with_aux
from lmforge.utils import compiler_disable

if triton is not None:
    import triton.language as tl

__all__ = ["available", "fused_linear_cross_entropy", "fused_lm_loss", "FusedLMObjective",
           "linear_cross_entropy_ref"]


def linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
                             ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused definition: full logits h W^T, then lm_loss -> (loss, cross-entropy)."""
    return lm_loss(h @ weight.to(h.dtype).T, targets, z_loss, ignore_index)


if triton is not None:

    @triton.jit
    def _ce_kernel(z_ptr, stride, tgt_ptr, loss_ptr, lse_ptr, V, zl, ignore_index, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        tgt = tl.load(tgt_ptr + row).to(tl.int64)
        valid = tgt != ignore_index
        cols = tl.arange(0, BLOCK_V)
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):  # online logsumexp (Milakov & Gimelshein 2018)
            x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        z_t = tl.load(base + tl.where(valid, tgt, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
        tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
        scale = tl.where(valid, 1.0 + 2.0 * zl * lse, 0.0)
        for v0 in range(0, V, BLOCK_V):  # the gradient, in place of the logits it came from
            vv = v0 + cols
            x = tl.load(base + vv, mask=vv < V, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse) * scale - tl.where((vv == tgt) & valid, 1.0, 0.0)
            tl.store(base + vv, g.to(z_ptr.dtype.element_ty), mask=vv < V)


def _chunk_rows(N: int, V: int, elt: int) -> int:
    """Rows per chunk: about 512 MB of logits (2k rows at vocab 128k in bf16), a power of two."""
    rows = max(256, min(8192, (1 << 29) // (V * elt)))
    return min(1 << (rows.bit_length() - 1), max(N, 1))


def _accumulate(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dw (fp32) += a @ b: on CUDA in the GEMM's fp32 epilogue where torch has it (addmm with out_dtype),
    else through a (V, d) product in the matmul dtype (fp32 for fp16 inputs)."""
    if a.is_cuda and a.dtype != dw.dtype and _fp32_addmm(a.device.index or 0, a.dtype):
        torch.addmm(dw, a, b, out_dtype=dw.dtype, out=dw)
    elif a.dtype == torch.float16:  # a chunk's sum of (p - onehot) h overflows fp16's 65504 (bf16 has fp32's range)
        dw.add_(a.float() @ b.float())
    else:
        dw.add_(a @ b)


@functools.lru_cache(maxsize=None)
def _fp32_addmm(device: int, dtype: torch.dtype) -> bool:
    """Whether this torch accumulates a `dtype` GEMM into an fp32 tensor in place, correctly (probed once)."""
    g = torch.Generator(device=f"cuda:{device}").manual_seed(0)
    a, b = (torch.randn(64, 64, device=f"cuda:{device}", generator=g).to(dtype) for _ in range(2))
    acc = torch.ones(64, 64, device=f"cuda:{device}")
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(acc, 1 + a.float() @ b.float(), atol=1e-2, rtol=1e-2))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, z_loss: float, ignore_index: int, chunk: int, grads: tuple[bool, bool]):
        """grads: whether dh and dW are wanted (evaluation under no_grad, a frozen LM head): each one not
        wanted skips a GEMM the size of the logits' and, for dW, an fp32 buffer of W's size."""
        N, V = h.shape[0], weight.shape[0]
        dh = torch.empty_like(h) if grads[0] else None
        dw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if grads[1] else None
        loss = torch.empty(N, device=h.device, dtype=torch.float32)
        lse = torch.empty(N, device=h.device, dtype=torch.float32)
        block_v = min(triton.next_power_of_2(V), 4096 if h.is_cuda else 1024)
        for s in range(0, N, chunk):
            hc = h[s:s + chunk]
            z = hc @ weight.T  # (C, V): this chunk's logits, overwritten by their gradient
            _ce_kernel[(hc.shape[0],)](z, z.stride(0), targets[s:s + chunk], loss[s:], lse[s:], V, z_loss,
                                       ignore_index, BLOCK_V=block_v, num_warps=16 if h.is_cuda else 4)
            if dh is not None:
                torch.mm(z, weight, out=dh[s:s + chunk])
            if dw is not None:
                _accumulate(dw, z.T, hc)
        n = (targets != ignore_index).sum()
        ce = loss.sum() / n
        total = ce + z_loss * lse.square().sum() / n if z_loss > 0 else ce.clone()
        ctx.save_for_backward(dh, dw, n)
        ctx.w_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return total, ce

    @staticmethod
    def backward(ctx, g_total, _g_ce):
        dh, dw, n = ctx.saved_tensors
        # no counted target (a chunk of prompt-only tokens): the loss is 0/0 = NaN, as F.cross_entropy's, but
        # its gradients are zero as F.cross_entropy's are (dh and dw are all zeros; 0 / 0 would make them NaN)
        scale = g_total / n.clamp(min=1)
        return (None if dh is None else dh * scale.to(dh.dtype), None if dw is None else (dw * scale).to(ctx.w_dtype),
                None, None, None, None, None)


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
                               ignore_index: int = -100, chunk_size: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """h (..., d), weight (V, d), targets (...) -> (loss, cross-entropy), equal to lm_loss(h @ W^T, ...)
    without the full logits. Under autocast h and W are cast to the autocast dtype, as F.linear would be;
    the loss is differentiable in h and W (the plain cross-entropy is for logging)."""
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1] or h.shape[:-1] != targets.shape:
        raise ValueError(f"fused linear + cross-entropy takes h (..., d), weight (V, d), targets (...); got h "
                         f"{tuple(h.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if falls_back(h.device, "fused linear + cross-entropy"):  # the full logits, as lm_loss would have them
        return linear_cross_entropy_ref(h, weight, targets, z_loss, ignore_index)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    h2 = h.reshape(-1, h.shape[-1]).to(dtype).contiguous()
    tgt = targets.reshape(-1).contiguous()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows (or None: sized to the vocabulary), got "
                         f"{chunk_size}")
    chunk = chunk_size or _chunk_rows(h2.shape[0], weight.shape[0], h2.element_size())
    # a target outside [0, V) would read another row's logit (the kernel has no bounds check): fail as
    # F.cross_entropy does, without a host sync (on a GPU a device-side assert)
    torch._assert_async(((tgt == ignore_index) | (tgt >= 0) & (tgt < weight.shape[0])).all(),
                        f"fused_linear_cross_entropy: a target is outside [0, {weight.shape[0]}) and is not "
                        f"ignore_index={ignore_index}: check the data's padding id and the vocabulary size")
    grads = (torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    with torch.autocast(dev, enabled=False):
        return _FusedLinearCE.apply(h2, weight.to(dtype), tgt, float(z_loss), ignore_index, chunk, grads)


def fused_lm_loss(model, x: torch.Tensor, y: torch.Tensor, z_loss: float = 0.0, chunk_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ce) of an lmforge Transformer on inputs x and next-token targets y, as
    lm_loss(model(x), y, z_loss), through the fused head: the trunk's last hidden states go straight
    into fused_linear_cross_entropy. Aux losses (MoE) are the caller's, as with lm_loss."""
    if model.cfg.logit_softcap > 0 or getattr(model, "mtp", None) is not None:
        raise ConfigError("the fused linear + cross-entropy loss supports neither logit soft-capping nor MTP "
                          "heads: set model.logit_softcap = 0 and no MTP, or train without fused kernels")
    if not plain_linear(model.lm_head):  # the fused head reads the bare weight
        raise ConfigError(f"the fused linear + cross-entropy loss reads lm_head's weight, but lm_head is a "
                          f"{type(model.lm_head).__name__}: merge its adapter (merge_lora), leave lm_head out of the "
                          "LoRA targets, or train without the fused loss")
    h, _ = model.hidden(x)
    if model.final_norm is not None:
        h = model.final_norm(h)
    return _eager_head(h, model.lm_head.weight, y, z_loss, chunk_size)


@compiler_disable
def _eager_head(h, weight, y, z_loss, chunk_size):
    """The chunk loop stays out of torch.compile's graph (the trunk before it is compiled as usual)."""
    return fused_linear_cross_entropy(h, weight, y, z_loss, chunk_size=chunk_size)


class FusedLMObjective(LMObjective):
    """Pretraining's objective (lmforge.train.loss.LMObjective: cross-entropy + z-loss + the model's aux
    losses) with the LM head and loss fused: for Trainer(model, optimizer, data, FusedLMObjective(z), ...)."""

    def __init__(self, z_loss: float = 0.0, chunk_size: int | None = None):
        super().__init__(z_loss)
        self.chunk_size = chunk_size

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, ce = fused_lm_loss(model, batch["input_ids"], batch["targets"], self.z_loss, self.chunk_size)
        return with_aux(model, loss, ce)

"""Triton kernels, each beside the plain-PyTorch reference it must match (the `kernels` extra).

  decode.py           batch-1 decode: fused norm/GEMV/SwiGLU/residual, q/k/v + RoPE + paged cache write
                      (used by lmforge.infer.kernel_step)
  paged_attention.py  decode attention over a paged KV cache (flash-decoding in one launch, GQA, windows,
                      soft-caps, sinks)
  tuning.py           KernelConfigs: block shapes per GPU model and model shape, cached on disk

Modules here import triton; import them lazily, after checking `decode.available(device)`.
"""

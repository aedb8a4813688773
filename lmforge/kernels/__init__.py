"""Triton kernels, each beside the plain-PyTorch reference it must match (the `kernels` extra).

  decode.py   batch-1 decode: fused norm/GEMV/SwiGLU/residual, q/k/v + RoPE + cache write, flash-decoding
              attention (used by lmforge.infer.kernel_step)

Modules here import triton; import them lazily, after checking `decode.available(device)`.
"""

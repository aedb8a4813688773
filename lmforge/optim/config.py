"""OptimConfig: which optimizer, its hyper-parameters, the schedule and the parameter-group rules.

One flat dataclass serves every optimizer in `lmforge.optim.OPTIMIZERS`; each optimizer reads the fields
it needs (documented per field). Parameter roles ("matrix", "embedding", "head", "vector", "value") decide weight
decay and per-role learning rates; see `lmforge.optim.groups`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import check, check_finite, coerce_fields

DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exp")
GRAFTS = ("adam", "none")
MUON_SCALES = ("shape", "rms")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """optimizer, a key of lmforge.optim.OPTIMIZERS"""
    lr: float = 3e-4
    """peak learning rate (for Muon/Dion: the rate of the orthonormalised matrix updates)"""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam/Lion/SOAP/Shampoo-graft (b1, b2); Adafactor uses b1 as its momentum (0 = none)"""
    eps: float = 1e-8
    """added to the denominator of Adam-style updates for numerical stability"""
    weight_decay: float = 0.1
    """decoupled weight decay, applied to matrices, embeddings and head (never to norms, biases)"""
    grad_clip: float = 1.0
    """global-norm gradient clipping threshold; 0 disables (done by the trainer)"""
    schedule: str = "cosine"
    """learning-rate schedule, a key of lmforge.optim.SCHEDULES"""
    warmup_steps: int = 0
    """steps of linear warmup to the peak learning rate: step s < warmup_steps trains at (s + 1) / warmup_steps of it"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of the peak (cosine, linear, WSD), reached at step max_steps, one past the
    last step trained (as in Hägele et al.'s WSD code): over a decay of D steps (max_steps - warmup_steps, or WSD's
    last decay_fraction) the last step is (1 - min_lr_ratio) / D above it for a linear decay, ~2.5 / D^2 for cosine"""
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent in the final decay"""
    decay_shape: str = "linear"
    """WSD decay shape: 'linear', 'cosine', '1-sqrt' (Hägele et al. 2024) or 'exp'"""
    # per-role learning rates -------------------------------------------------------------------
    adam_lr: float = 0.0
    """Muon/Dion: AdamW rate for the non-matrix params (embeddings, head, vectors); 0 = same as lr"""
    embed_lr: float = 0.0
    """learning rate of embedding tables; 0 = the default for the optimizer (lr, or adam_lr)"""
    head_lr: float = 0.0
    """learning rate of the output head; 0 = the default"""
    vector_lr: float = 0.0
    """learning rate of vectors (norm gains, biases); 0 = the default"""
    value_lr: float = 0.0
    """learning rate of a critic's value head (role "value", lmforge.align.value); 0 = the default"""
    # Muon / Dion -------------------------------------------------------------------------------
    momentum: float = 0.95
    """Muon/Dion momentum coefficient"""
    nesterov: bool = True
    """Muon: Nesterov momentum (update = g + momentum·buf)"""
    ns_steps: int = 5
    """Muon: Newton–Schulz iterations"""
    muon_scale: str = "shape"
    """Muon update scale: 'shape' = sqrt(max(1, rows/cols)) (Jordan et al.), 'rms' = 0.2·sqrt(max(rows, cols))
    to match AdamW's update RMS (Moonlight, Liu et al. 2025)"""
    qk_clip_tau: float = 0.0
    """MuonClip (Kimi K2): cap on the max attention logit per head, enforced by rescaling W_q, W_k in
    `Muon.clip_qk_` after each step, given the max logits the forward pass measured; 0 = off"""
    rank: int = 16
    """Dion: rank of the low-rank orthonormalised update (capped at min(rows, cols))"""
    # Shampoo / SOAP / Adafactor ----------------------------------------------------------------
    precondition_frequency: int = 10
    """Shampoo: steps between inverse-root recomputations; SOAP: steps between eigenbasis updates"""
    block_size: int = 256
    """Shampoo: matrices are split into blocks at most this big per side; SOAP: sides longer than this
    are not rotated"""
    precond_eps: float = 1e-6
    """Shampoo: epsilon·I added to each Kronecker factor before its inverse root (relative to its
    largest eigenvalue)"""
    precond_beta: float = 0.95
    """Shampoo/SOAP: EMA coefficient of the Kronecker factors (L = b·L + (1-b)·G Gᵀ); 1 = plain sum"""
    graft: str = "adam"
    """Shampoo: 'adam' = each block's step takes Adam's norm (grafting); 'none' = raw Shampoo step"""
    adafactor_decay: float = 0.8
    """Adafactor: second-moment decay b2_t = 1 - t^(-c) (Shazeer & Stern 2018, c = 0.8)"""
    clip_threshold: float = 1.0
    """Adafactor: update clipping threshold d (RMS of the update capped at d)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "optim")  # each field's type, named when wrong
        check_finite(self, "optim")
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"optim.betas must be two values in [0, 1), got {self.betas}")
        check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        check(0 <= self.decay_fraction <= 1, f"optim.decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        check(self.decay_shape in DECAY_SHAPES,
              f"optim.decay_shape={self.decay_shape!r} is unknown; choose one of {DECAY_SHAPES}")
        for name in ("adam_lr", "embed_lr", "head_lr", "vector_lr", "value_lr", "qk_clip_tau"):
            check(getattr(self, name) >= 0, f"optim.{name} must be >= 0 (0 = default/off), got {getattr(self, name)}")
        check(not self.qk_clip_tau or self.name == "muon",
              f"optim.qk_clip_tau is MuonClip's QK-clip: it needs optim.name='muon', got {self.name!r}")
        check(0 <= self.momentum < 1, f"optim.momentum must lie in [0, 1), got {self.momentum}")
        check(self.ns_steps >= 1, f"optim.ns_steps must be >= 1, got {self.ns_steps}")
        check(self.muon_scale in MUON_SCALES, f"optim.muon_scale={self.muon_scale!r}; choose one of {MUON_SCALES}")
        check(self.rank >= 1, f"optim.rank must be >= 1, got {self.rank}")
        check(self.precondition_frequency >= 1,
              f"optim.precondition_frequency must be >= 1, got {self.precondition_frequency}")
        check(self.block_size >= 1, f"optim.block_size must be >= 1, got {self.block_size}")
        check(self.precond_eps > 0, f"optim.precond_eps must be > 0, got {self.precond_eps}")
        check(0 < self.precond_beta <= 1, f"optim.precond_beta must lie in (0, 1], got {self.precond_beta}")
        check(self.graft in GRAFTS, f"optim.graft={self.graft!r}; choose one of {GRAFTS}")
        check(0 < self.adafactor_decay <= 1, f"optim.adafactor_decay must lie in (0, 1], got {self.adafactor_decay}")
        check(self.clip_threshold > 0, f"optim.clip_threshold must be > 0, got {self.clip_threshold}")
        from lmforge.optim import OPTIMIZERS, SCHEDULES

        check(self.name in OPTIMIZERS, f"optim.name={self.name!r} is unknown; choose one of {sorted(OPTIMIZERS)}")
        check(self.schedule in SCHEDULES,
              f"optim.schedule={self.schedule!r} is unknown; choose one of {sorted(SCHEDULES)}")

"""Scaling laws: FLOP accounting, power-law and Chinchilla fits, sweeps and plots.

    flops       6ND and the exact per-architecture count
    powerlaw    single-variable laws L(N), L(D), L(C) (Kaplan et al. 2020)
    table       the (N, D, C, loss) table that sweeps write and fits read, with its checks
    chinchilla  approaches 1-3 of Hoffmann et al. 2022, compute-optimal N and D, bootstrap CIs
    inference   the inference-aware optimum (Sardana et al. 2023)
    plots       IsoFLOP curves, frontier, predicted vs observed (matplotlib)
    sweep       train a grid of models over FLOP budgets with the trainer
"""

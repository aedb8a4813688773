"""Parallelism applied from outside the model (model code knows nothing of it; torchtitan's parallelize
functions are the example). Every transform here is tested on CPU with gloo against one process.

  launch.py        join torchrun's group; `--nproc N`'s launcher (signals, torchrun's outcome in one line);
                   run_local(fn, N) for tests and examples (N local processes)
  reports.py       what the processes of one `--nproc N` launch print once between them (errors, warnings)
  ddp.py           data parallel from scratch: all-reduce per parameter; bucketed, overlapped with backward
  zero.py          ZeRO-1/2/3 from scratch (per-tensor partitions: any lmforge optimizer) + memory formula
  config.py        ParallelConfig (pp x dp_replicate x dp_shard x cp x tp), validation, device mesh
  parallelize.py   apply a ParallelConfig: TP -> activation checkpointing -> compile -> FSDP2 / DDP
  runner.py        ParallelRunner: one rank's forward/backward, global-norm clipping, global loss and
                   validation rows; the Trainer's step strategy on N processes (lmforge.train.distributed)
  fsdp.py          FSDP2 (fully_shard per block + root, mixed precision, reshard-after-forward)
  tp.py            tensor + sequence parallel (DTensor parallelize_module), vocabulary-parallel loss
  pp.py            pipeline stages and GPipe / 1F1B schedules (torch.distributed.pipelining)
  cp.py            context parallel: all-gather K/V over load-balanced sequence chunks
  ep.py            expert parallel MoE: experts split over ranks, all-to-all dispatch
  ac.py            full / selective activation checkpointing
  checkpoint.py    distributed checkpoints (torch.distributed.checkpoint) that load into any layout
  data.py          rank-aware batches: each window once per epoch across ranks, resumable anywhere
  matrix_optim.py  Muon (whole matrices gathered) and Dion (distributed, rank-r factors) on FSDP2 shards
  qk_logits.py     per-head max attention logits from forward hooks, for MuonClip's QK-clip
"""

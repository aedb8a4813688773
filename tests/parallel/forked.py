"""Import, in the test process, the torch.distributed modules a forked rank of lmforge.parallel imports lazily.

run_local(..., start_method="fork") children inherit the parent's imported modules: each rank of each launch
imported FSDP2, DTensor, tensor and pipeline parallelism, activation checkpointing and Dynamo (which FSDP2 and
DTensor pull in) on its own, ~2 s of CPU per rank (most of a small layout's run). Importing them once here makes
every later launch of the test process start with them. Nothing else changes: spawned ranks (a GPU machine)
import what they need as before."""

import torch._dynamo  # noqa: F401
import torch.distributed.algorithms._checkpoint.checkpoint_wrapper  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.pipelining  # noqa: F401
import torch.distributed.tensor.parallel  # noqa: F401

"""Parallelism applied from outside the model: DDP/ZeRO (teaching), FSDP2, tensor, pipeline and context parallel."""

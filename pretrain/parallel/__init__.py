"""Parallelism applied to a plain model: ParallelDims (the mesh), TP / SP, ZeRO (DDP, ZeroRedundancyOptimizer,
FSDP2, HSDP), activation checkpointing, compile, and ``parallelize`` that composes them (torchtitan's order)."""

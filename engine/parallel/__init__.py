"""Tensor parallelism of the engine: one engine replica over `tp_size` processes.

Rank 0 is the engine's own process (a Triton model instance): it owns the scheduler, the block
manager and the sampler, and supervises the worker processes of ranks 1..N-1 (executor.py). Each
step it sends the workers the step's plan (engine/step_plan.py, over their stdin: integers only,
never pickle), and all ranks run the forward pass together on their shard of the weights and KV
heads (engine/sharding.py), summing the row-parallel projections over torch.distributed
(group.py: gloo on CPU, NCCL on CUDA).
"""

"""Several processes (torchrun): DDP for LoRA/QLoRA, FSDP2 for full fine-tuning, sharded checkpoints.

The training loop talks to one object, ``setup_distributed(config)``: a
:class:`~fastsft.distributed.context.SingleProcess` when the run is not under
torchrun (every method is the single-device behaviour), else a
:class:`~fastsft.distributed.context.Distributed` that wraps the model, gives each
rank its share of every accumulation window, all-reduces the window's token
counts and writes sharded checkpoints. ``fastsft train CONFIG --nproc N``
starts torchrun (``fastsft.distributed.launch``).

Names are loaded lazily: the CLI imports ``fastsft.distributed.launch`` before
torch is needed.
"""
__all__ = ["Distributed", "NullMetrics", "SingleProcess", "setup_distributed"]


def __getattr__(name):
    if name in __all__:
        from fastsft.distributed import context

        return getattr(context, name)
    raise AttributeError(f"module 'fastsft.distributed' has no attribute {name!r}")

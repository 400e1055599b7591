"""Several processes on one run (`accelerate launch`, `torchrun`): which one is the main process, and waiting for it.

Stages that pass over a dataset train with DistributedDataParallel through transformers' Trainer, each process on its
share of every batch; the grpo stage's loop shares out its prompts and minibatches itself and averages its adapter's
gradients with `average_gradients`. Files the processes share (stage.json, adapters, caches, replay buffers, metrics,
forgetting, eval, summary) are written by the main process alone, and the others wait where they next need what it
wrote. Without a launcher there is one process: it is the main one, waits for nobody, and every helper here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

# The other processes wait at a barrier while the main one measures forgetting between stages, which on a real model
# can outlast torch's default of 30 minutes.
TIMEOUT = timedelta(hours=3)


def init() -> None:
    """Join the process group that the launcher's environment describes (gloo on CPUs, NCCL on GPUs) and take this
    process's GPU, before any model loads or anything waits; the Trainer reuses both. A no-op without a launcher."""
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def finish() -> None:
    """Leave the process group together: a process that exits while another still talks to it (a rerun whose stages
    were all skipped ends in one process long before the main one has written the summary) can abort in gloo's
    threads."""
    if _active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block (writing what the others read), then the others run it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def share(items):
    """This process's contiguous share of `items` (a list, range or tensor whose length the processes divide)."""
    size = len(items) // world_size()
    return items[rank() * size : (rank() + 1) * size]


def broadcast(obj):
    """The main process's `obj`, in every process."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list:
    """Every process's `obj`, in rank order, in every process."""
    if not _active():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def mean(values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the processes, which hold the same keys."""
    parts = gather(values)
    return {key: sum(part[key] for part in parts) / len(parts) for key in values}


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the processes, as DDP does in backward, for a loop whose
    forward passes do not run through a DDP wrapper: one all-reduce of all the gradients flattened together."""
    if not _active():
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(averaged.view_as(grad))

"""Data-parallel training under ``torchrun``: process group, batch sharding, gathers, rank-0-only writes.

``oncotransfer train`` runs unchanged under ``torchrun --nproc_per_node N``: torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK, and ``session()`` joins the process group (NCCL on CUDA, gloo on CPU). Every rank walks the same
global batch order (it comes from (seed, epoch)); each takes a contiguous slice of every batch, and its loss is
scaled by its share of the batch, so DDP's gradient mean equals the gradient of the global batch: the result
matches one process with the same global batch size and seed, up to floating-point summation order.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from oncotransfer.errors import ConfigError
from oncotransfer.train.device import pick_device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Only rank 0 writes run directories, checkpoints, reports and log lines."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA each process drives the GPU given by LOCAL_RANK."""
    if device.type == "cuda" and world_size() > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


@contextlib.contextmanager
def session(device_name: str = "auto") -> Iterator[None]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set; launch with torchrun "
                          "--nproc_per_node N oncotransfer train CONFIG (or set the torch.distributed variables)")
    backend = backend_for(pick_device(device_name))
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
    w = world_size()
    return x if w == 1 else torch.tensor_split(x, w)[rank()]


def all_sum(*values: float) -> list[float]:
    """Sum scalars over ranks (float64, so counts stay exact)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order; shapes may differ along dim 0 (pickled via gloo/NCCL)."""
    if world_size() == 1:
        return x
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sharded_map(fn, positions: list[int]) -> torch.Tensor:
    """``fn(positions)`` computed as strided shards across ranks and gathered back into ``positions`` order:
    each rank extracts features for 1/N of the images."""
    w = world_size()
    if w == 1:
        return fn(positions)
    mine = positions[rank()::w]
    out = fn(mine) if mine else None
    parts: list[Any] = [None] * w
    dist.all_gather_object(parts, None if out is None else out.cpu())
    shape = next(p for p in parts if p is not None).shape[1:]
    result = torch.empty((len(positions), *shape), dtype=next(p for p in parts if p is not None).dtype)
    for r, p in enumerate(parts):
        if p is not None:
            result[r::w] = p
    return result


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the trainable module when running multi-process; the module itself
    otherwise. DDP broadcasts rank 0's parameters at construction, so every rank starts identical."""
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False)

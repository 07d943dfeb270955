"""torch.distributed for the search: process group from torchrun's environment, DDP of the
masked supernet, reduced metrics and the cross-rank identity check of masks and gammas.

Launch: ``torchrun --nproc_per_node=N -m hrnas search ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; the backend is NCCL when CUDA is available (one GPU per local rank), else gloo.

Dead units under DDP. A masked channel stays in the graph (its weights are gathered with the
alive ones' index, its gradient is exactly zero), so it needs nothing. A block whose channels
are all dead is replaced by its shortcut: its expand, depthwise and project parameters get no
gradient at all, which DDP's reducer (without ``find_unused_parameters``) reports as an error at
the next step. Instead of ``find_unused_parameters=True`` (a graph traversal every step) or
``static_graph`` (wrong here: the used set changes when a block dies), ``unused_parameters``
finds the set once per mask change with one probe forward/backward of two samples, and
``wrap`` builds a new DDP wrapper ignoring exactly those parameters when the set changed. Units
only die, so this happens a handful of times per search; an ignored parameter has no gradient
on any rank and the optimizer skips it, as in a one-process run.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` processes, computing on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs progress."""
        return self.rank == 0


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now, for ``MASTER_PORT`` of a single-machine process group
    spawned by hand (``torchrun --standalone`` picks its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env() -> Dist:
    """The process group of a torchrun launch (``WORLD_SIZE`` > 1), else a one-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, device)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def mean(d: Dist, values: list[float]) -> list[float]:
    """The mean over ranks of each of ``values`` (one all-reduce)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return (t / d.world).tolist()


def gather(d: Dist, obj) -> list:
    """``obj`` of every rank, in rank order (on every rank)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def check_identical(d: Dist, values: torch.Tensor, what: str) -> None:
    """Raise unless ``values`` (a small tensor) is bitwise the same on every rank: one MAX
    all-reduce of ``[v, -v]`` gives every element's max and min over ranks."""
    if not d.active:
        return
    v = values.detach().double().flatten().to(d.device)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[: v.numel()], -both[v.numel() :]
    if not torch.equal(hi, lo):
        bad = int((hi != lo).sum())
        raise RuntimeError(f"{what} differ across ranks in {bad} of {v.numel()} entries")


def unused_parameters(net: nn.Module, example: torch.Tensor) -> frozenset[str]:
    """Names of the parameters that get no gradient from ``net(example)`` (a couple of
    samples: BN in training mode needs more than one value per channel).

    The probe leaves no trace: BN running statistics are restored, gradients are taken with
    ``torch.autograd.grad`` (nothing accumulates into ``.grad``)."""
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    names, params = zip(*[(n, p) for n, p in net.named_parameters() if p.requires_grad])
    out = net(example)
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    with torch.no_grad():
        for k, v in net.named_buffers():
            v.copy_(buffers[k])
    return frozenset(n for n, g in zip(names, grads) if g is None)


def wrap(net: nn.Module, d: Dist, ignore: frozenset[str]) -> nn.Module:
    """``net`` in a DDP wrapper that all-reduces every parameter but ``ignore`` (see the module
    docstring); ``net`` itself when not distributed. Buffers are synced from rank 0 when the
    wrapper is built, not at every forward: the masks are checked identical instead, and BN
    running statistics (unused by the training forward) stay per rank in between."""
    if not d.active:
        return net
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, sorted(ignore))
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=device_ids, forward_sync_buffers=False)

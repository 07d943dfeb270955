"""Training, evaluation and the task pieces shared by the search and the retraining.

Tasks, by the dataset's ``task``:

- ``cls``: cross-entropy of ``logits [N, C]`` against ``label [N]``; metric top-1 accuracy.
- ``seg``: logits ``[N, C, H/4, W/4]`` bilinearly upsampled to the mask size (as the authors'
  mmseg head), cross-entropy ignoring 255; metric mIoU.
- ``kpt``: ``0.5 * mean(target_weight * (heatmap_pred - heatmap)^2)`` (the authors'
  JointsMSELoss); metric PCK@0.5 of the heatmap argmax.

The networks' stem takes 3 channels; one-channel images (the embedded Fashion-MNIST tasks) are
repeated to 3 channels by ``as_input``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .ema import EMA
from .metrics import PCK, Accuracy, MeanIoU

TASKS = {"cls": "classification", "seg": "segmentation", "kpt": "keypoints"}
METRICS = {"cls": "top1", "seg": "mIoU", "kpt": "PCK"}


def as_input(image: torch.Tensor) -> torch.Tensor:
    """``[N, 1 or 3, H, W]`` -> ``[N, 3, H, W]``."""
    if image.dim() != 4 or image.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {list(image.shape)}")
    return image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image


def to_net(batch: dict, net: nn.Module) -> tuple[torch.Tensor, dict]:
    """(network input, ``batch`` on the network's device, its floating tensors in the
    network's dtype)."""
    p = next(net.parameters())
    batch = {
        k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)
        for k, v in batch.items()
    }
    return as_input(batch["image"]), batch


def task_loss(task: str, out: torch.Tensor, batch: dict) -> torch.Tensor:
    """The training loss of ``task`` (see the module docstring)."""
    if task == "cls":
        return F.cross_entropy(out, batch["label"])
    if task == "seg":
        mask = batch["mask"]
        logits = F.interpolate(out, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, mask, ignore_index=255)
    if task == "kpt":
        weight = batch["target_weight"][..., None, None]
        return 0.5 * (weight * (out - batch["heatmap"]) ** 2).mean()
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")


class BatchStream:
    """Endless shuffled batches of ``dataset`` (a ``hrnas.data`` dataset with ``batch``),
    reshuffled every epoch (the last incomplete batch of an epoch dropped) with a generator
    seeded by ``seed``. ``state_dict`` holds the generator, the epoch's order and the position
    in it, so a resumed stream yields exactly the batches the original would have."""

    def __init__(self, dataset, batch_size: int, seed: int):
        if not 1 <= batch_size <= len(dataset):
            raise ValueError(f"batch_size must be in [1, {len(dataset)}], got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.zeros(0, dtype=torch.long)
        self.pos = 0

    def indices(self) -> torch.Tensor:
        """The dataset indices of the next batch, ``[batch_size]``."""
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.dataset), generator=self.gen)
            self.pos = 0
        self.pos += self.batch_size
        return self.order[self.pos - self.batch_size : self.pos]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return self.dataset.batch(self.indices())

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.order, self.pos = state["order"].clone(), state["pos"]


def make_optimizer(net: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (the authors' dense-task optimizer, eps 1e-3) with weight decay on conv and linear
    weights only (the authors exempt BN parameters and biases). On CPU and CUDA it is torch's
    fused AdamW, one kernel over all parameters: the default per-parameter loop took 11.4 ms a
    step for the default job's 244 parameter tensors, the fused one 1.95 ms (1 thread)."""
    params = list(net.parameters())
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(groups, lr=lr, eps=1e-3, fused=fused or None)
    if fused:
        optimizer.register_step_pre_hook(_grads_in_param_layout)
    return optimizer


def _grads_in_param_layout(optimizer, _args, _kwargs) -> None:
    """The fused AdamW reads each gradient in its parameter's memory order: on CPU (torch
    2.13) a gradient with other strides, a contiguous one for a channels_last weight say, is
    silently misread, and CUDA refuses it. Autograd's gradients already have their parameter's
    strides; any other is copied into them here."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(p.grad)


def one_cycle(optimizer, lr: float, steps: int):
    """The authors' OneCycle schedule (div 25) over ``steps``."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 2))


@torch.no_grad()
def evaluate(net: nn.Module, dataset, batch_size: int = 64) -> dict[str, float]:
    """The task metric of ``net`` (eval mode) over all of ``dataset``: ``{"metric", name}``."""
    task = dataset.task
    meters = {
        "cls": Accuracy,
        "seg": lambda: MeanIoU(dataset.num_classes),
        "kpt": lambda: PCK(stride=dataset.heatmap_stride),
    }
    meter = meters[task]()
    was_training = net.training
    net.eval()
    for start in range(0, len(dataset), batch_size):
        x, batch = to_net(dataset.batch(range(start, min(start + batch_size, len(dataset)))), net)
        out = net(x)
        if task == "cls":
            meter.update(out, batch["label"])
        elif task == "seg":
            mask = batch["mask"]
            meter.update(F.interpolate(out, size=mask.shape[-2:], mode="bilinear"), mask)
        else:
            meter.update(out, batch["keypoints"], batch["visible"])
    net.train(was_training)
    value = meter.compute()[METRICS[task]]
    return {"metric": METRICS[task], "value": float(value)}


def train(
    net: nn.Module,
    dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    ema: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``net`` on ``dataset`` for ``steps`` (AdamW, OneCycle); returns the last loss.
    ``ema`` > 0: ``net`` ends with the moving average of its weights (decay ``ema``).
    ``on_step(step, loss)`` is called after every step (progress output)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    average = EMA(net, ema) if ema else None
    opt = make_optimizer(net, lr, weight_decay)
    sched = one_cycle(opt, lr, steps)
    data = BatchStream(dataset, batch_size, seed)
    net.train()
    loss = torch.zeros(())
    for step in range(steps):
        x, batch = to_net(next(data), net)
        loss = task_loss(dataset.task, net(x), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if average is not None:
            average.update()
        if on_step is not None:
            on_step(step, loss.item())
    if average is not None:
        average.copy_to()
    return loss.item()

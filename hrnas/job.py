"""What a run config (``hrnas.config``) names, built: its datasets, its supernet, the batches
that recalibrate BN before an evaluation and the retrained network of an architecture.
``hrnas search/retrain/eval/bench-latency`` and the benchmarks build their runs through these,
so a benchmark measures what the CLI runs."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from .config import MEMORY_FORMATS
from .data import build_dataset
from .export import build_from_arch, export_subnet
from .search.recalibrate import recalibrate_bn
from .supernet.registry import build_supernet
from .supernet.supernet import Supernet
from .train import TASKS, as_input, train


def datasets(config: dict):
    """``(train, test)`` datasets of ``config["data"]`` (``train_count`` / ``test_count``,
    when not null, become the datasets' ``count`` option)."""
    data = config["data"]

    def one(split, count):
        options = dict(data["options"])
        if count is not None:
            options["count"] = count
        return build_dataset(data["name"], split, **options)

    return one("train", data["train_count"]), one("test", data["test_count"])


def in_layout(net: nn.Module, config: dict) -> nn.Module:
    """``net`` with its weights in ``config["memory_format"]``. The inputs need no
    conversion: a convolution with channels_last weights gives a channels_last output, and the
    fused ops keep their input's layout, so the whole network runs in it."""
    return net.to(memory_format=MEMORY_FORMATS[config["memory_format"]])


def supernet(config: dict, dataset) -> Supernet:
    """The supernet of ``config["space"]`` (no transformers, ``config["impl"]``) for
    ``dataset``: its classes (or keypoints) and its input size, so MACs everywhere are those of
    the real input, in ``config["memory_format"]``. The space's task must be the dataset's."""
    task = TASKS[dataset.task]
    size = tuple(dataset.batch([0])["image"].shape[-2:])
    net = build_supernet(
        config["space"],
        num_classes=getattr(dataset, "num_classes", None) or dataset.num_keypoints,
        transformers=False,
        impl=config["impl"],
        input_size=size,
    )
    if net.space.task != task:
        raise ValueError(
            f"space {config['space']!r} is for {net.space.task}, "
            f"dataset {config['data']['name']!r} for {task}"
        )
    return in_layout(net, config)


def recalibration_inputs(dataset, config: dict):
    """The first ``eval.recalibrate_batches`` batches of ``eval.batch_size`` images of
    ``dataset``, as network inputs (a generator)."""
    n, bs = config["eval"]["recalibrate_batches"], config["eval"]["batch_size"]
    return (
        as_input(dataset.batch(range(i * bs, min((i + 1) * bs, len(dataset))))["image"])
        for i in range(n)
        if i * bs < len(dataset)
    )


def retrain(
    config: dict,
    arch: dict,
    train_set,
    *,
    supernet: Supernet | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, float]:
    """``arch`` in ``config["memory_format"]``, trained with ``config["retrain"]`` and its BN
    statistics recalibrated on ``train_set``; returns ``(net, seconds of training)``.
    ``retrain.init``: ``scratch`` builds the network fresh under ``retrain.seed``, ``inherit``
    takes ``supernet``'s weights (``export_subnet``). ``on_step(step, loss)`` as
    ``hrnas.train.train``."""
    rc = config["retrain"]
    if rc["init"] == "inherit":
        if supernet is None:
            raise ValueError(
                "retrain.init=inherit needs --supernet (a supernet.pt of a search run)"
            )
        net = export_subnet(supernet)
    else:
        torch.manual_seed(rc["seed"])
        net = build_from_arch(arch)
    in_layout(net, config)
    start = time.perf_counter()
    train(
        net,
        train_set,
        steps=rc["steps"],
        batch_size=rc["batch_size"],
        lr=rc["lr"],
        weight_decay=rc["weight_decay"],
        seed=rc["seed"],
        ema=rc["ema"],
        on_step=on_step,
    )
    seconds = time.perf_counter() - start
    # BN momentum 0.01 (the authors') leaves short runs with unsettled running statistics.
    recalibrate_bn(net, recalibration_inputs(train_set, config))
    return net, seconds

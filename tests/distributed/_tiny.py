"""A tiny search shared by the distributed, resume and NaN tests: ``hrnas-seg-tiny`` at 32x32
on 16 canvases, float64, the controller checking every 2 steps with a budget."""

import torch

import hrnas
from hrnas.data import FashionSegmentation
from hrnas.search import SearchConfig

SEARCH = dict(
    steps=6,
    batch_size=4,
    interval=2,
    patience=1,
    rho=0.05,
    rho_warmup_steps=0,
    threshold=0.05,
    target_ratio=0.5,
)


def dataset():
    return FashionSegmentation("train", count=16, size=32)


def supernet():
    torch.manual_seed(0)
    return hrnas.build_supernet(
        "hrnas-seg-tiny", num_classes=11, transformers=False, impl="auto", input_size=(32, 32)
    ).double()


def config(**changes) -> SearchConfig:
    return SearchConfig(**{**SEARCH, **changes})

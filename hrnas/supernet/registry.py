"""The named search spaces and ``build_supernet``.

The four full spaces mirror the authors' configs (HRNAS_SPEC.md section 1.7); the ``-small``
(widths x0.5, inputs halved) and ``-tiny`` (widths x0.25, three stages, 64x64 inputs) variants
keep the same structure for small machines, fast tests and the embedded 64x64 tasks.
"""

from __future__ import annotations

import dataclasses

from ..space import ClassificationHead, DenseHead, SpaceSpec, scaled
from .supernet import Supernet

IMPLS = ("auto", "native", "triton", "reference")

_FULL = (
    SpaceSpec(
        name="hrnas-cls",
        task="classification",
        num_classes=1000,
        head=ClassificationHead(head_channels=(36, 72, 144, 320), last_channel=1600, dropout=0.2),
        input_size=(224, 224),
    ),
    SpaceSpec(
        name="hrnas-seg",
        task="segmentation",
        num_classes=19,
        head=DenseHead(last_channel=90),
        input_size=(512, 1024),
    ),
    SpaceSpec(
        name="hrnas-seg-ade",
        task="segmentation",
        num_classes=150,
        head=DenseHead(last_channel=180),
        input_size=(512, 512),
    ),
    SpaceSpec(
        name="hrnas-kpt",
        task="keypoints",
        num_classes=17,
        head=DenseHead(last_channel=90),
        input_size=(256, 192),
        bn_momentum=0.1,
        bn_eps=1e-5,
        init="heatmap",
    ),
)


def _variants(spec: SpaceSpec):
    yield spec
    h, w = spec.input_size
    yield scaled(spec, f"{spec.name}-small", width_mult=0.5, input_size=(h // 2, w // 2))
    yield scaled(spec, f"{spec.name}-tiny", width_mult=0.25, num_stages=3, input_size=(64, 64))


SPACES: dict[str, SpaceSpec] = {s.name: s for spec in _FULL for s in _variants(spec)}


def list_spaces() -> list[str]:
    """Names of the registered search spaces."""
    return sorted(SPACES)


def get_space(name: str, **overrides) -> SpaceSpec:
    """The ``SpaceSpec`` called ``name`` with ``overrides`` (``SpaceSpec`` field names) applied."""
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; known: {', '.join(list_spaces())}")
    fields = {f.name for f in dataclasses.fields(SpaceSpec)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for {name!r}; SpaceSpec fields: {sorted(fields)}"
        )
    return dataclasses.replace(SPACES[name], **overrides) if overrides else SPACES[name]


def build_supernet(
    name: str,
    num_classes: int | None = None,
    transformers: bool | str = True,
    impl: str = "auto",
    **overrides,
) -> Supernet:
    """The supernet of space ``name``.

    Args:
        num_classes: default the space's (1000 / 19 / 150 / 17).
        transformers: ``True`` (64-token transformers on the residual blocks: 44 in the full
            spaces), ``"downsampling"`` (also on every other block: 61 seg, 67 cls), or
            ``False``.
        impl: ``"auto"``, ``"native"``, ``"triton"`` or ``"reference"`` for every fused op.
        overrides: ``SpaceSpec`` fields, e.g. ``width_mult=0.5``, ``input_size=(64, 64)``,
            ``stages=...``; an inconsistent combination raises ``ValueError``.
    """
    spec = get_space(name, **overrides)
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        spec = dataclasses.replace(spec, num_classes=num_classes)
    if transformers not in (True, False, "downsampling"):
        raise ValueError(
            f"transformers must be True, False or 'downsampling', got {transformers!r}"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    spec = dataclasses.replace(
        spec,
        transformer=dataclasses.replace(
            spec.transformer,
            enabled=bool(transformers),
            downsampling=transformers == "downsampling",
        ),
    )
    return Supernet(spec, spec.num_classes, impl=impl)

"""Search spaces as data: frozen dataclasses describing an HR-NAS supernet.

A ``SpaceSpec`` holds everything the supernet builder needs; nothing about a space lives in code
paths. The authors' five configs (HRNAS_SPEC.md section 1.7, ``configs/*.yml`` of
dingmyu/HR-NAS @ 003c3b6) share the stem, the ``inverted_residual_setting`` and the searching
block; they differ in the head, the class count and the BatchNorm momentum/eps:

    stem   ConvBNReLU(3->24, 3x3, s2), ConvBNReLU(24->24, 3x3, s2)            (1/4 resolution)
    stage  [branches, blocks per branch, channels per branch]
      0    1, [1],         [24]
      1    2, [2, 2],      [18, 36]
      2    3, [2, 2, 3],   [18, 36, 72]
      3    4, [2, 2, 3, 4], [18, 36, 72, 144]
      4    4, [2, 2, 3, 4], [18, 36, 72, 144]
    block  inverted residual, expand ratio 4 per kernel size, kernel sizes 3/5/7
    head   cls: HeadModule([36, 72, 144, 320]) + 1x1 conv to 1600 + linear
           seg/kpt: concatenate the branches at 1/4, one block to last_channel, 1x1 classifier

Scaled variants (``scaled``) multiply every width, keep fewer stages and use smaller inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TASKS = ("classification", "segmentation", "keypoints")


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), never more
    than 10% below ``value`` (the MobileNet rule the authors' ``_make_divisible`` follows)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class StageSpec:
    """One ``inverted_residual_setting`` entry: a Fuse module to ``len(channels)`` branches, then
    a Parallel module with ``num_blocks[b]`` residual blocks on branch b."""

    num_blocks: tuple[int, ...]
    channels: tuple[int, ...]


@dataclass(frozen=True)
class ClassificationHead:
    """``HeadModule``: per-branch blocks to ``head_channels``, strided blocks chaining them down
    to the lowest resolution, ``ConvBNReLU(head_channels[-1] -> last_channel, 1x1)``, global
    average pool, dropout, linear classifier."""

    head_channels: tuple[int, ...]
    last_channel: int
    dropout: float = 0.2


@dataclass(frozen=True)
class DenseHead:
    """Segmentation / heatmap head: all branches bilinearly upsampled to 1/4 and concatenated,
    one searching block to ``last_channel``, then a 1x1 classifier (with bias) at 1/4."""

    last_channel: int


@dataclass(frozen=True)
class TransformerSpec:
    """Token transformers (HRNAS_SPEC.md section 2): when ``enabled``, one with ``num_tokens``
    tokens on the identity path of every residual block (44 in the full spaces);
    ``downsampling`` also puts one (with the block's output channels and stride) on every
    non-residual block (61 in the seg spaces)."""

    enabled: bool = False
    num_tokens: int = 64
    downsampling: bool = False
    # The authors' layers use dropout 0.1; the fused kernels run without dropout, so the
    # search does too (set 0.1 to match the authors, on the reference implementation).
    dropout: float = 0.0


@dataclass(frozen=True)
class SpaceSpec:
    """One search space. Channel counts here are before ``width_mult``; ``stem_channels``,
    ``stage_channels`` and the head properties give the scaled ones the network uses."""

    name: str
    task: str
    num_classes: int
    head: ClassificationHead | DenseHead
    input_size: tuple[int, int]
    stages: tuple[StageSpec, ...] = (
        StageSpec((1,), (24,)),
        StageSpec((2, 2), (18, 36)),
        StageSpec((2, 2, 3), (18, 36, 72)),
        StageSpec((2, 2, 3, 4), (18, 36, 72, 144)),
        StageSpec((2, 2, 3, 4), (18, 36, 72, 144)),
    )
    stem: tuple[int, int] = (24, 24)
    expand_ratio: float = 4.0
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    bn_momentum: float = 0.01
    bn_eps: float = 1e-3
    transformer: TransformerSpec = field(default_factory=TransformerSpec)
    width_mult: float = 1.0
    round_nearest: int = 2
    init: str = "mnas"
    # The authors profile every task at 224x224 to set the per-unit penalties (section 3.1).
    profile_size: tuple[int, int] = (224, 224)

    def __post_init__(self):
        problems = list(_problems(self))
        if problems:
            raise ValueError(f"search space {self.name!r}: " + "; ".join(problems))

    def width(self, channels: int) -> int:
        if self.width_mult == 1.0:
            return channels
        return make_divisible(channels * self.width_mult, self.round_nearest)

    @property
    def stem_channels(self) -> tuple[int, int]:
        return tuple(self.width(c) for c in self.stem)

    def stage_channels(self, index: int) -> tuple[int, ...]:
        return tuple(self.width(c) for c in self.stages[index].channels)

    @property
    def head_channels(self) -> tuple[int, ...]:
        return tuple(self.width(c) for c in self.head.head_channels)

    @property
    def last_channel(self) -> int:
        # HRNet-style nets keep the classifier width when narrowing (max(last, last * w)).
        if isinstance(self.head, ClassificationHead):
            return max(self.head.last_channel, self.width(self.head.last_channel))
        return self.width(self.head.last_channel)

    def to_dict(self) -> dict:
        """JSON-able description (lists instead of tuples); ``from_dict`` inverts it."""
        data = dataclasses.asdict(self)
        data["head_type"] = type(self.head).__name__
        return _lists(data)

    @classmethod
    def from_dict(cls, data: dict) -> SpaceSpec:
        data = dict(data)
        head_type = data.pop("head_type", None)
        heads = {"ClassificationHead": ClassificationHead, "DenseHead": DenseHead}
        if head_type not in heads:
            raise ValueError(f"space: head_type must be one of {sorted(heads)}, got {head_type!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"space: unknown fields {unknown}")
        head = dict(data["head"])
        if "head_channels" in head:
            head["head_channels"] = tuple(head["head_channels"])
        data["head"] = heads[head_type](**head)
        data["stages"] = tuple(
            StageSpec(tuple(s["num_blocks"]), tuple(s["channels"])) for s in data["stages"]
        )
        data["transformer"] = TransformerSpec(**data["transformer"])
        for key in ("input_size", "stem", "kernel_sizes", "profile_size"):
            data[key] = tuple(data[key])
        return cls(**data)


def _lists(value):
    if isinstance(value, (tuple, list)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _positive_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _problems(spec: SpaceSpec):
    """Every inconsistency of a spec, as readable strings."""
    if spec.task not in TASKS:
        yield f"task must be one of {TASKS}, got {spec.task!r}"
    if not isinstance(spec.num_classes, int) or spec.num_classes < 1:
        yield f"num_classes must be a positive int, got {spec.num_classes!r}"
    if len(spec.input_size) != 2 or not _positive_ints(spec.input_size):
        yield f"input_size must be two positive ints, got {spec.input_size!r}"
    if len(spec.stem) != 2 or not _positive_ints(spec.stem):
        yield f"stem must be two positive channel counts, got {spec.stem!r}"
    if not spec.kernel_sizes or not all(
        isinstance(k, int) and k > 0 and k % 2 for k in spec.kernel_sizes
    ):
        yield f"kernel_sizes must be positive odd ints, got {spec.kernel_sizes!r}"
    if not spec.expand_ratio > 0:
        yield f"expand_ratio must be positive, got {spec.expand_ratio!r}"
    if not spec.width_mult > 0:
        yield f"width_mult must be positive, got {spec.width_mult!r}"
    if not 0.0 <= spec.bn_momentum <= 1.0 or not spec.bn_eps > 0:
        yield f"bn_momentum must be in [0, 1] and bn_eps > 0, got {spec.bn_momentum}/{spec.bn_eps}"
    if spec.init not in ("mnas", "heatmap"):
        yield f"init must be 'mnas' or 'heatmap', got {spec.init!r}"
    if not spec.stages:
        yield "stages must not be empty"
    branches = 1
    for s, stage in enumerate(spec.stages):
        if not isinstance(stage, StageSpec):
            yield f"stages[{s}] must be a StageSpec, got {type(stage).__name__}"
            return
        if len(stage.num_blocks) != len(stage.channels):
            yield (
                f"stages[{s}] has {len(stage.num_blocks)} block counts but "
                f"{len(stage.channels)} channel counts"
            )
        if not _positive_ints(stage.channels) or not all(
            isinstance(b, int) and b >= 0 for b in stage.num_blocks
        ):
            yield f"stages[{s}] needs positive channels and non-negative block counts"
        if not branches <= len(stage.channels) <= branches + 1:
            yield (
                f"stages[{s}] goes from {branches} to {len(stage.channels)} branches; a stage "
                "keeps its branches or adds one"
            )
        branches = len(stage.channels)
    if isinstance(spec.head, ClassificationHead):
        if spec.task != "classification":
            yield f"a ClassificationHead needs task 'classification', got {spec.task!r}"
        if len(spec.head.head_channels) != branches:
            yield (
                f"head_channels {spec.head.head_channels} must have one entry per branch of "
                f"the last stage ({branches})"
            )
    elif isinstance(spec.head, DenseHead):
        if spec.task == "classification":
            yield "task 'classification' needs a ClassificationHead"
    else:
        yield f"head must be a ClassificationHead or DenseHead, got {type(spec.head).__name__}"
    if spec.transformer.num_tokens < 1:
        yield f"transformer.num_tokens must be positive, got {spec.transformer.num_tokens}"


def scaled(
    spec: SpaceSpec,
    name: str,
    *,
    width_mult: float = 1.0,
    num_stages: int | None = None,
    input_size: tuple[int, int] | None = None,
    head_channels: tuple[int, ...] | None = None,
) -> SpaceSpec:
    """A smaller variant: widths times ``width_mult``, the first ``num_stages`` stages, another
    input size. A classification head keeps one head channel per remaining branch (the first
    ones, unless ``head_channels`` is given)."""
    stages = spec.stages if num_stages is None else spec.stages[:num_stages]
    head = spec.head
    if isinstance(head, ClassificationHead):
        branches = len(stages[-1].channels) if stages else 0
        channels = head_channels or head.head_channels[:branches]
        head = dataclasses.replace(head, head_channels=tuple(channels))
    return dataclasses.replace(
        spec,
        name=name,
        stages=stages,
        head=head,
        width_mult=spec.width_mult * width_mult,
        input_size=input_size or spec.input_size,
        profile_size=input_size or spec.profile_size,
    )

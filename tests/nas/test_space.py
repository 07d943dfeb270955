"""Space definitions against HRNAS_SPEC.md section 1 and the authors' measured sizes."""

import dataclasses

import pytest

import hrnas
from hrnas.space import ClassificationHead, SpaceSpec, StageSpec

FULL = ["hrnas-cls", "hrnas-seg", "hrnas-seg-ade", "hrnas-kpt"]


def _build(name, **kw):
    return hrnas.build_supernet(name, transformers=False, **kw)


def test_registry_lists_every_space_and_variant():
    names = hrnas.list_spaces()
    for base in FULL:
        assert {base, f"{base}-small", f"{base}-tiny"} <= set(names)


@pytest.mark.parametrize("name", FULL)
def test_stages_widths_and_heads_follow_the_spec(name):
    spec = hrnas.get_space(name)
    assert [s.num_blocks for s in spec.stages] == [
        (1,),
        (2, 2),
        (2, 2, 3),
        (2, 2, 3, 4),
        (2, 2, 3, 4),
    ]
    assert [spec.stage_channels(i) for i in range(5)] == [
        (24,),
        (18, 36),
        (18, 36, 72),
        (18, 36, 72, 144),
        (18, 36, 72, 144),
    ]
    assert spec.stem_channels == (24, 24)
    assert spec.kernel_sizes == (3, 5, 7) and spec.expand_ratio == 4
    expected = {
        "hrnas-cls": (1000, 1600, 0.01, 1e-3),
        "hrnas-seg": (19, 90, 0.01, 1e-3),
        "hrnas-seg-ade": (150, 180, 0.01, 1e-3),
        "hrnas-kpt": (17, 90, 0.1, 1e-5),
    }[name]
    assert (spec.num_classes, spec.last_channel, spec.bn_momentum, spec.bn_eps) == expected


@pytest.mark.parametrize("name", FULL)
def test_block_counts_strides_and_transformer_slots(name):
    net = _build(name)
    blocks = net.blocks()
    dense = name != "hrnas-cls"
    # 34 parallel + 26 fuse blocks, plus 7 in the cls head or the seg/kpt transform
    assert len(blocks) == (61 if dense else 67)
    assert sum(".branches." in n for n, _ in blocks) == 34
    assert sum(n.startswith("features.") and ".branches." not in n for n, _ in blocks) == 26
    # transformer placement: every residual block (44); the downsampling option adds the rest
    assert sum(b.residual for _, b in blocks) == 44
    # 3 new branches + 6 fuse paths from the higher resolution, + 3 downsamp blocks in cls
    assert sum(b.stride == 2 for _, b in blocks) == (9 if dense else 12)
    # every block has 3 x 4 * inp hidden channels
    for _, b in blocks:
        assert b.hidden == 3 * 4 * sum(b.in_channels)
    if dense:
        assert blocks[-1][0] == "head.transform"
        assert blocks[-1][1].in_channels == (18, 36, 72, 144)


# Authors' measured supernet sizes (HRNAS_SPEC.md 1.7, no transformers, MACs at 224x224). Their
# parameter count includes the unused per-kernel BNs (`self.bns`, 2 x hidden per block); their
# seg/kpt head expands the 270 concatenated channels at 1/4 instead of each branch at its own
# resolution (the same function; docs/SUPERNET.md).
AUTHORS = {"hrnas-cls": (13.34e6, 2.42e9), "hrnas-seg": (10.20e6, 5.92e9)}


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_dense_size_matches_the_authors(name):
    net = _build(name)
    params, macs = AUTHORS[name]
    unused_bns = sum(2 * b.hidden for _, b in net.blocks())
    assert abs(net.num_parameters() + unused_bns - params) < 0.005e6
    concat_extra = 0
    if name != "hrnas-cls":
        found, _ = net.block_input_sizes((224, 224))
        head = net.head.transform
        sizes = found[head]
        concat_extra = head.hidden * sum(
            c * (sizes[0][0] * sizes[0][1] - h * w) for c, (h, w) in zip(head.in_channels, sizes)
        )
    assert abs(net.macs((224, 224)) + concat_extra - macs) < 0.005e9


def test_spec_round_trips_through_a_dict():
    for name in hrnas.list_spaces():
        spec = hrnas.get_space(name)
        assert SpaceSpec.from_dict(spec.to_dict()) == spec


def test_scaled_variants_are_smaller():
    full, small, tiny = (_build(f"hrnas-seg{s}") for s in ("", "-small", "-tiny"))
    assert full.num_parameters() > small.num_parameters() > tiny.num_parameters()
    assert len(tiny.space.stages) == 3 and tiny.space.input_size == (64, 64)
    assert tiny.space.stage_channels(2) == (6, 10, 18)


def test_overrides_apply():
    net = _build("hrnas-cls-tiny", num_classes=7, width_mult=0.5)
    assert net.head.classifier.out_features == 7
    assert net.space.width_mult == 0.5


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: _build("hrnas-nope"), "unknown search space"),
        (lambda: _build("hrnas-cls", colour="red"), "unknown override"),
        (lambda: _build("hrnas-cls", stages=(StageSpec((1, 2), (24,)),)), "block counts"),
        (
            lambda: _build(
                "hrnas-cls", stages=(StageSpec((1,), (24,)), StageSpec((1,) * 3, (8,) * 3))
            ),
            "adds one",
        ),
        (lambda: _build("hrnas-cls", num_stages=3), "unknown override"),
        (
            lambda: _build("hrnas-cls", stages=hrnas.get_space("hrnas-cls").stages[:3]),
            "head_channels",
        ),
        (lambda: _build("hrnas-cls", num_classes=0), "num_classes"),
        (lambda: _build("hrnas-cls", impl="fast"), "impl"),
        (lambda: _build("hrnas-cls", width_mult=-1.0), "width_mult"),
        (lambda: _build("hrnas-seg", head=ClassificationHead((8,), 16)), "ClassificationHead"),
        (lambda: hrnas.build_supernet("hrnas-cls", transformers="yes"), "transformers must be"),
    ],
)
def test_bad_spaces_and_overrides_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "name, transformers, count",
    [
        ("hrnas-cls", True, 44),
        ("hrnas-seg", True, 44),
        ("hrnas-seg", "downsampling", 61),
        ("hrnas-cls", "downsampling", 67),
        ("hrnas-kpt", False, 0),
    ],
)
def test_transformer_placement(name, transformers, count):
    net = hrnas.build_supernet(name, transformers=transformers)
    placed = [b for _, b in net.blocks() if b.transformer is not None]
    assert len(placed) == count
    for b in placed:
        t = b.transformer
        assert t.num_tokens == 64 and t.in_channels == sum(b.in_channels)
        assert t.out_channels == b.out_channels and t.downsample == (b.stride == 2)
        assert b.residual or transformers == "downsampling"


# Authors' sizes with transformers (HRNAS_SPEC.md 1.7); their MACs undercount each transformer
# (decoder attention and the FFNs count 0 in their profiler): ours adds exactly that part.
AUTHORS_T = {("hrnas-cls", True): 16.07e6, ("hrnas-seg", True): 12.93e6}
AUTHORS_T[("hrnas-seg", "downsampling")] = 13.98e6


@pytest.mark.parametrize("name, transformers", sorted(AUTHORS_T, key=str))
def test_sizes_with_transformers_match_the_authors(name, transformers):
    net = hrnas.build_supernet(name, transformers=transformers)
    plain = _build(name)
    unused_bns = sum(2 * b.hidden for _, b in net.blocks())
    assert abs(net.num_parameters() + unused_bns - AUTHORS_T[(name, transformers)]) < 0.005e6
    extra = net.macs((224, 224)) - plain.macs((224, 224))
    d, n = 64, 64
    undercount = 0
    for _, b in net.blocks():
        t = b.transformer
        if t is not None:
            # what the authors' profiler sees: encoder attention and the two projections
            authors = 2 * n * n * d + 4 * n * d * d + n * d * (t.in_channels + 2 + t.out_channels)
            undercount += 4 * n * d * d + 2 * n * n * d + 4 * n * d * d  # decoder MHA + 2 FFNs
            extra -= authors
    assert extra == undercount


def test_spec_is_frozen_data():
    spec = hrnas.get_space("hrnas-seg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_classes = 3

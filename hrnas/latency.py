"""Latency tables: per-unit latency costs of a supernet measured on this device.

The model is linear in the alive units, like the MACs:

    latency(masks) = base + sum_g a_g * alive_g

over the unit groups ``g`` of ``Supernet.search_units()`` (one block's channels of one kernel
size, or one transformer's tokens). It is the latency of the masked supernet as the search runs
it (eval mode, no gradient, the network's fused-op ``impl``), which computes only the alive
units. ``measure_table`` sets ``samples`` random masks (every group keeps a fraction drawn
uniformly from [0, 1]) and times every searching block alone at each, with its inputs at the
sizes the network gives it; per block, least squares over the samples fits

    t_block = c_block + sum_{g in block} a_g * alive_g          (a_g clamped at >= 0)

then one more least-squares fit over the samples of the whole network's time,
``t_net = base + scale * sum_g a_g * alive_g`` (``base >= 0``: stem, fusions, head and the
blocks' fixed parts; ``scale``: blocks timed alone vs inside the network), calibrates the
slopes to the network (``a_g <- scale * a_g``). All units alive is
not a sample: the blocks then skip their index gathers, a different code path. A time is the
minimum over ``repeats`` calls (the least disturbed run on a shared machine), in CPU time of
the calling thread at one torch thread (``clock: "thread"``), wall-clock time otherwise. The
fit is checked on the whole network at fresh random masks keeping about 75%, 50% and 25% of
every group: the table stores measured and predicted times (``fit``) and their largest
relative error (``fit_error``).

Table (JSON)::

    {"format": "hrnas-latency", "version": 1, "space": {...}, "input_size": [H, W],
     "batch": 1, "threads": 1, "impl": "auto", "device": "cpu", "repeats": 10,
     "samples": 8, "base_ms": ..., "full_ms": ...,    # full_ms: the model at all units alive
     "units": [{"name": ..., "kind": "channels", "kernel_size": 3, "size": 24,
                "ms_per_unit": ...}, ...],
     "fit": [{"keep": 0.75, "measured_ms": ..., "predicted_ms": ...}, ...], "fit_error": ...}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

FORMAT, VERSION = "hrnas-latency", 1
FIT_KEEP = (0.75, 0.5, 0.25)


def _clock():
    """CPU time of this thread at one torch thread (what one-thread latency is on an idle
    machine, and blind to other processes on a shared one); wall-clock time otherwise."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _best_ms(fn, repeats: int) -> float:
    clock = _clock()
    fn()  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best * 1e3


@torch.no_grad()
def measure_ms(net, input_size, batch: int = 1, repeats: int = 10, seed: int = 0) -> float:
    """One forward of ``net`` in eval mode on ``batch`` random images at ``input_size``: the
    minimum over ``repeats`` calls (clock as ``measure_table``'s); keeps ``net``'s mode."""
    image = torch.randn(batch, 3, *input_size, generator=torch.Generator().manual_seed(seed))
    was_training = net.training
    net.eval()
    try:
        return _best_ms(lambda: net(image), repeats)
    finally:
        net.train(was_training)


def _layout(net) -> torch.memory_format:
    """channels_last when ``net``'s conv weights are (``hrnas.job.in_layout``): its blocks then
    get channels_last inputs inside the network, so they are timed on such inputs alone too."""
    last = torch.channels_last
    cl = any(
        p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=last)
        for p in net.parameters()
    )
    return last if cl else torch.contiguous_format


def _block_inputs(block, sizes, batch: int, gen, fmt: torch.memory_format):
    xs = [
        torch.randn(batch, c, *s, generator=gen).contiguous(memory_format=fmt)
        for c, s in zip(block.in_channels, sizes)
    ]
    return xs if block.multi_input else xs[0]


def _set_masks(units, masks) -> None:
    for u, m in zip(units, masks):
        u.set_mask(m)


def _random_masks(units, gen, keep=None) -> None:
    for u in units:
        fraction = torch.rand((), generator=gen) if keep is None else keep
        u.set_mask(torch.rand(u.size, generator=gen) < fraction)


@torch.no_grad()
def _calibrate(blocks_ms: torch.Tensor, net_ms: torch.Tensor) -> tuple[float, float]:
    """(base, scale) of ``net_ms ~ base + scale * blocks_ms`` over the samples, least squares
    with ``base >= 0`` and ``scale > 0`` (a negative base or scale, which noise in a few
    samples can give, is not a latency: the fit through the origin replaces it)."""
    x = torch.stack([torch.ones_like(blocks_ms), blocks_ms], dim=1)
    base, scale = torch.linalg.lstsq(x, net_ms.unsqueeze(1)).solution.flatten().tolist()
    if base < 0 or scale <= 0:
        base, scale = 0.0, float((blocks_ms @ net_ms) / (blocks_ms @ blocks_ms))
    return base, max(scale, 0.0)


def measure_table(
    net, input_size=None, batch: int = 1, repeats: int = 10, samples: int = 8, seed: int = 0
) -> dict:
    """The latency table of ``net`` (a ``Supernet``) at ``input_size`` (default: the
    space's); see the module docstring. ``net``'s masks are left as found."""
    for key, value in (("batch", batch), ("repeats", repeats), ("samples", samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    size = tuple(input_size or net.space.input_size)
    units = net.search_units(size)
    groups = {}
    for u in units:
        groups.setdefault(u.name.removesuffix(".transformer"), []).append(u)
    if samples < 1 + max(len(g) for g in groups.values()):
        raise ValueError(f"samples must exceed the unit groups of a block, got {samples}")
    saved = [u.mask.clone() for u in units]
    was_training = net.training
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    try:
        found, _ = net.block_input_sizes(size)
        fmt = _layout(net)
        inputs = {name: _block_inputs(b, found[b], batch, gen, fmt) for name, b in net.blocks()}
        image = torch.randn(batch, 3, *size, generator=gen)
        rows = {name: [] for name in groups}
        times = {name: [] for name in groups}
        alive_totals, net_ms = [], []
        for _ in range(samples):
            _random_masks(units, gen)
            for name, block in net.blocks():
                rows[name].append([1.0] + [float(u.mask.sum()) for u in groups[name]])
                times[name].append(_best_ms(lambda: block(inputs[name]), repeats))
            alive_totals.append([float(u.mask.sum()) for u in units])
            net_ms.append(_best_ms(lambda: net(image), repeats))
        slopes = {}
        for name, group in groups.items():
            x = torch.tensor(rows[name], dtype=torch.float64)
            y = torch.tensor(times[name], dtype=torch.float64).unsqueeze(1)
            coef = torch.linalg.lstsq(x, y).solution.flatten()
            for u, a in zip(group, coef[1:].tolist()):
                slopes[id(u)] = max(0.0, a)
        per_unit = torch.tensor([slopes[id(u)] for u in units], dtype=torch.float64)
        alive = torch.tensor(alive_totals, dtype=torch.float64)
        base, scale = _calibrate(alive @ per_unit, torch.tensor(net_ms, dtype=torch.float64))
        per_unit *= scale
        slopes = {k: a * scale for k, a in slopes.items()}
        fit = []
        for keep in FIT_KEEP:
            _random_masks(units, gen, keep)
            predicted = base + sum(slopes[id(u)] * int(u.mask.sum()) for u in units)
            measured = _best_ms(lambda: net(image), repeats)
            fit.append({"keep": keep, "measured_ms": measured, "predicted_ms": predicted})
    finally:
        _set_masks(units, saved)
        net.train(was_training)
    full_ms = base + float(per_unit @ torch.tensor([float(u.size) for u in units]).double())
    return {
        "format": FORMAT,
        "version": VERSION,
        "space": net.space.to_dict(),
        "input_size": list(size),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "impl": getattr(net, "impl", None),
        "device": "cpu",
        "repeats": repeats,
        "clock": "thread" if _clock() is time.thread_time else "wall",
        "samples": samples,
        "base_ms": base,
        "full_ms": full_ms,
        "units": [
            {
                "name": u.name,
                "kind": u.kind,
                "kernel_size": u.kernel_size,
                "size": u.size,
                "ms_per_unit": slopes[id(u)],
            }
            for u in units
        ],
        "fit": fit,
        "fit_error": max(abs(f["predicted_ms"] - f["measured_ms"]) / f["measured_ms"] for f in fit),
    }


def save_table(table: dict, path) -> None:
    check_table(table)
    Path(path).write_text(json.dumps(table, indent=2) + "\n")


def load_table(path) -> dict:
    """Read and check a table written by ``save_table``."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"latency table {path} not found (hrnas bench-latency writes one)")
    except json.JSONDecodeError as e:
        raise ValueError(f"latency table {path}: not JSON ({e})") from None
    return check_table(table)


def check_table(table: dict) -> dict:
    """``table`` if it is a well-formed latency table, else a ValueError naming the problem."""
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ValueError(f"latency table: 'format' must be {FORMAT!r}")
    if table.get("version") != VERSION:
        raise ValueError(f"latency table: version must be {VERSION}, got {table.get('version')!r}")
    for key in ("input_size", "base_ms", "units"):
        if key not in table:
            raise ValueError(f"latency table: missing {key!r}")
    for i, u in enumerate(table["units"]):
        missing = {"name", "kind", "kernel_size", "size", "ms_per_unit"} - set(u)
        if missing:
            raise ValueError(f"latency table: unit {i} lacks {sorted(missing)}")
        if not u["ms_per_unit"] >= 0 or not (isinstance(u["size"], int) and u["size"] > 0):
            raise ValueError(f"latency table: unit {i} ({u['name']}) has a bad size or cost")
    return table


def unit_costs(table: dict, units, input_size) -> tuple[list[float], float]:
    """(per-unit latency of every group of ``units`` in their order, base ms) from ``table``,
    which must have been measured at ``input_size`` on the same units."""
    if tuple(table["input_size"]) != tuple(input_size):
        raise ValueError(
            f"latency table measured at {tuple(table['input_size'])}, the search runs at "
            f"{tuple(input_size)}: measure one at the search's input size"
        )
    rows = {(u["name"], u["kind"], u["kernel_size"]): u for u in table["units"]}
    costs = []
    for u in units:
        row = rows.get((u.name, u.kind, u.kernel_size))
        if row is None or row["size"] != u.size:
            raise ValueError(
                f"latency table has no entry of {u.size} units for {u.name} "
                f"({u.kind}, kernel {u.kernel_size}): was it measured on this space?"
            )
        costs.append(float(row["ms_per_unit"]))
    if len(rows) != len(costs):
        raise ValueError(f"latency table has {len(rows)} unit groups, the network {len(costs)}")
    return costs, float(table["base_ms"])


def predict_ms(table: dict, units, input_size) -> float:
    """The table's latency of the alive units of ``units``."""
    costs, base = unit_costs(table, units, input_size)
    return base + sum(c * int(u.mask.sum()) for c, u in zip(costs, units))

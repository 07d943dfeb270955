"""The run folder's report of a search: TensorBoard events and PNG plots.

``SearchReport`` follows the search through its ``on_step(step, record)`` callback: every step
it writes the scalars of the loop's record (``search/loss``, ``search/task_loss``,
``search/rho``, ``search/macs`` or ``search/latency_ms``, ``search/alive_units``); at every
controller check (every ``interval`` steps and the last step) it also reads the live masks of
``net.search_units()`` and writes the alive hidden channels of every block
(``channels/<block>``) and the alive tokens of every transformer (``tokens/<block>``).
``finish`` writes the final metrics (``final/<name>``) and the plots:

- ``search.png``: the cost (MACs, or the latency table's prediction) against its target, and
  the task and total losses over the search. The metric over the search is the task loss (a
  per-checkpoint evaluation of the supernet with BN recalibration costs more than the search
  itself); the final metrics (retrained network, searched supernet) are in the title.
- ``channels.png``: alive channels of every block over the search, as a fraction of the
  block's hidden width (rows: blocks in construction order; columns: checks).
- ``tokens.png``: alive tokens of every transformer over the search (only when the space
  has transformers).
- ``arch.png``: the searched architecture (``arch.json``) as the multi-branch network: one row
  per branch (resolution 1/4, 1/8, ...), blocks as boxes with their kept kernel sizes and
  channels (``k3:12`` is 12 channels of 3x3), fuse modules between stages, the head last.

The plot data come from plain functions (``curves``, ``alive_matrix``, ``arch_layout``) so
that they can be checked on a hand-made history.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from .checkpoint import write_atomic  # noqa: E402

COST_LABEL = {"macs": ("macs", "MACs (M)", 1e-6), "latency": ("latency_ms", "latency (ms)", 1.0)}


def curves(history: list[dict]) -> dict[str, np.ndarray]:
    """``history`` (the loop's records) as arrays: step, loss, task, rho, cost, alive."""
    if not history:
        raise ValueError("empty search history: nothing to plot")
    keys = {"step": "step", "loss": "loss", "task": "task", "rho": "rho", "cost": "macs"}
    keys["alive"] = "alive"
    try:
        return {k: np.array([r[src] for r in history], dtype=float) for k, src in keys.items()}
    except KeyError as e:
        raise ValueError(f"search history record without {e.args[0]!r}") from None


def alive_snapshot(units) -> dict:
    """Alive channels per block and alive tokens per transformer from ``SearchUnit``s:
    ``{"channels": {block: (alive, total)}, "tokens": {block: (alive, total)}}``."""
    snap = {"channels": {}, "tokens": {}}
    for u in units:
        if u.kind == "tokens":
            snap["tokens"][u.name.removesuffix(".transformer")] = (int(u.mask.sum()), u.size)
        else:
            alive, total = snap["channels"].get(u.name, (0, 0))
            snap["channels"][u.name] = (alive + int(u.mask.sum()), total + u.size)
    return snap


def alive_matrix(snapshots: list[dict], kind: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``snapshots`` (``{"step": s, "channels": {...}, "tokens": {...}}``, as ``alive_snapshot``
    plus the step) -> (names, steps ``[T]``, alive fraction ``[names, T]``) for ``kind``
    ``"channels"`` or ``"tokens"``. Names in first-seen order."""
    if kind not in ("channels", "tokens"):
        raise ValueError(f"kind must be 'channels' or 'tokens', got {kind!r}")
    names = list(dict.fromkeys(n for s in snapshots for n in s[kind]))
    steps = np.array([s["step"] for s in snapshots], dtype=float)
    frac = np.zeros((len(names), len(snapshots)))
    for t, snap in enumerate(snapshots):
        for i, name in enumerate(names):
            alive, total = snap[kind].get(name, (0, 1))
            frac[i, t] = alive / total
    return names, steps, frac


_BLOCK = re.compile(r"features\.(\d+)\.(paths\.(\d+)_(\d+)|new\.(\d+)|branches\.(\d+)\.(\d+))$")


def _kept(entry: dict) -> str:
    text = " ".join(f"k{k}:{c}" for k, c in zip(entry["kernel_sizes"], entry["channels"]))
    if entry.get("tokens"):
        text += f" t:{entry['tokens']}"
    return text or "shortcut"


def arch_layout(arch: dict) -> list[dict]:
    """Boxes of the architecture drawing: ``{"kind", "col", "row", "label", "sources"}``.

    ``kind`` is ``fuse`` (one box per output branch of a fuse module, listing its paths
    ``j>i``), ``block`` (a parallel block, or a branch a stage adds) or ``head``; ``row`` the
    branch (resolution ``1/(4 * 2**row)``); ``sources`` the rows a box reads from (for the
    lines). Stage ``s`` takes one fuse column then one column per block of its longest
    branch."""
    if not isinstance(arch, dict) or not isinstance(arch.get("blocks"), list):
        raise ValueError("arch must be an export_arch dict with a 'blocks' list")
    depth: dict[int, int] = {}
    for entry in arch["blocks"]:
        m = _BLOCK.match(entry["name"])
        if m and m.group(6) is not None:
            module = int(m.group(1))
            depth[module] = max(depth.get(module, 0), int(m.group(7)) + 1)
    starts, col = {}, 0
    for module in sorted(
        {int(m.group(1)) for e in arch["blocks"] if (m := _BLOCK.match(e["name"]))}
    ):
        starts[module] = col
        col += depth.get(module, 1)
    head_col = col
    fuse: dict[tuple[int, int], dict] = {}
    boxes = []
    for entry in arch["blocks"]:
        name, m = entry["name"], _BLOCK.match(entry["name"])
        if m is None:
            if not name.startswith("head."):
                raise ValueError(f"arch block {name!r} is not part of the HR-NAS topology")
            index = int(name.rsplit(".", 1)[1]) if name[-1].isdigit() else 0
            row = index + 1 if ".downsamp." in name else index
            sources = [index]
            if ".transform" in name:  # the dense head reads every branch
                sources = list(range(len(entry["in_channels"])))
            boxes.append(
                {
                    "kind": "head",
                    "col": head_col + (".downsamp." in name),
                    "row": row,
                    "label": f"{name.removeprefix('head.')}\n{_kept(entry)}",
                    "sources": sources,
                }
            )
        elif m.group(3) is not None:
            i, j = int(m.group(3)), int(m.group(4))
            box = fuse.setdefault(
                (int(m.group(1)), i),
                {"kind": "fuse", "col": starts[int(m.group(1))], "row": i, "label": "fuse"},
            )
            box["label"] += f"\n{j}>{i} {_kept(entry)}"
            box.setdefault("sources", []).append(j)
        elif m.group(5) is not None:
            i = int(m.group(5))
            boxes.append(
                {
                    "kind": "block",
                    "col": starts[int(m.group(1))],
                    "row": i,
                    "label": f"new\n{_kept(entry)}",
                    "sources": [i - 1],
                }
            )
        else:
            b, k = int(m.group(6)), int(m.group(7))
            boxes.append(
                {
                    "kind": "block",
                    "col": starts[int(m.group(1))] + k,
                    "row": b,
                    "label": _kept(entry),
                    "sources": [b],
                }
            )
    return sorted([*fuse.values(), *boxes], key=lambda b: (b["col"], b["row"]))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_search(history, path, target=None, cost="macs", title="") -> Path:
    """``search.png``: cost against ``target`` and the losses over the search."""
    c = curves(history)
    _, label, scale = COST_LABEL[cost]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax0.plot(c["step"], c["cost"] * scale, label="alive")
    if target is not None:
        ax0.axhline(target * scale, color="tab:red", ls="--", label="target")
    ax0.set(xlabel="step", ylabel=label, title="cost of the alive units")
    ax0.legend()
    ax1.plot(c["step"], c["task"], label="task loss")
    ax1.plot(c["step"], c["loss"], label="task + rho * penalty", alpha=0.7)
    ax1.set(xlabel="step", ylabel="loss", title="losses")
    ax1.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_channels(snapshots, path) -> Path:
    """``channels.png``: alive fraction of every block's hidden channels over the checks."""
    names, steps, frac = alive_matrix(snapshots, "channels")
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.22 * len(names)))
    im = ax.imshow(frac, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    ax.set_xticks(ticks, [str(int(steps[t])) for t in ticks])
    ax.set(xlabel="step", title="alive channels per block (fraction of the hidden width)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_tokens(snapshots, path) -> Path | None:
    """``tokens.png``: alive tokens of every transformer over the checks (None: no
    transformer, nothing written)."""
    names, steps, frac = alive_matrix(snapshots, "tokens")
    if not names:
        return None
    total = {n: snapshots[0]["tokens"][n][1] for n in names if n in snapshots[0]["tokens"]}
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, row in zip(names, frac):
        ax.plot(steps, row * total.get(name, 1), label=name)
    ax.set(xlabel="step", ylabel="alive tokens", title="tokens per transformer")
    if len(names) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_arch(arch, path, title="") -> Path:
    """``arch.png``: the architecture drawn from ``arch_layout``."""
    boxes = arch_layout(arch)
    cols = max(b["col"] for b in boxes) + 1
    rows = max(b["row"] for b in boxes) + 1
    fig, ax = plt.subplots(figsize=(1.6 * cols + 1, 1.4 * rows + 1))
    colour = {"fuse": "#f4d9a6", "block": "#cfe3f5", "head": "#d7ecd0"}
    for b in boxes:
        for src in b["sources"]:  # from the previous column (the stem, left of column 0)
            ax.plot([b["col"] - 0.58, b["col"] - 0.42], [src, b["row"]], color="0.5", lw=0.8)
            ax.plot([b["col"] - 1, b["col"] - 0.58], [src, src], color="0.5", lw=0.8)
    for b in boxes:
        ax.add_patch(
            FancyBboxPatch(
                (b["col"] - 0.42, b["row"] - 0.38),
                0.84,
                0.76,
                boxstyle="round,pad=0.02",
                fc=colour[b["kind"]],
                ec="0.3",
                zorder=2,
            )
        )
        ax.text(b["col"], b["row"], b["label"], ha="center", va="center", fontsize=7, zorder=3)
    ax.set_xlim(-1, cols - 0.4)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_yticks(range(rows), [f"1/{4 * 2**r}" for r in range(rows)])
    ax.set_xticks([])
    ax.set(ylabel="branch (resolution)", title=title or "searched architecture")
    fig.tight_layout()
    return _save(fig, path)


class SearchReport:
    """TensorBoard events (``<folder>/tensorboard``) and plots of one search run.

    ``units``: the supernet's ``search_units()`` (live mask views); ``interval`` and ``steps``:
    the search's, to find the check steps; ``cost``: ``"macs"`` or ``"latency"``. The alive
    snapshots go to ``<folder>/alive.json`` at every check, so a run killed and continued from
    its checkpoint (``resumed``: the checkpoint's history) keeps them: snapshots and TensorBoard
    events after the checkpoint's step are dropped and written again by the continued search."""

    def __init__(
        self,
        folder,
        units,
        interval: int,
        steps: int,
        cost: str = "macs",
        resumed: list[dict] | None = None,
    ):
        if cost not in COST_LABEL:
            raise ValueError(f"cost must be one of {sorted(COST_LABEL)}, got {cost!r}")
        self.folder, self.units = Path(folder), list(units)
        self.interval, self.steps, self.cost = interval, steps, cost
        self.history: list[dict] = list(resumed or [])
        done = len(self.history)
        self.snapshots: list[dict] = []
        if done and (self.folder / "alive.json").is_file():
            saved = json.loads((self.folder / "alive.json").read_text())
            self.snapshots = [s for s in saved if s["step"] <= done]
        self.writer = SummaryWriter(
            str(self.folder / "tensorboard"), purge_step=done + 1 if done else None
        )

    def on_step(self, step: int, record: dict) -> None:
        """The search's ``on_step`` callback (0-based ``step``, the loop's record)."""
        self.history.append(record)
        w, n = self.writer, step + 1
        w.add_scalar("search/loss", record["loss"], n)
        w.add_scalar("search/task_loss", record["task"], n)
        w.add_scalar("search/rho", record["rho"], n)
        w.add_scalar(f"search/{COST_LABEL[self.cost][0]}", record["macs"], n)
        w.add_scalar("search/alive_units", record["alive"], n)
        if n % self.interval == 0 or n == self.steps:
            snap = {"step": n, **alive_snapshot(self.units)}
            self.snapshots.append(snap)
            # atomic: a run killed here must find a whole file when it is resumed
            write_atomic(self.folder / "alive.json", (json.dumps(self.snapshots) + "\n").encode())
            for kind in ("channels", "tokens"):
                for name, (alive, _) in snap[kind].items():
                    w.add_scalar(f"{kind}/{name}", alive, n)

    def finish(self, arch: dict, final: dict, target=None, title: str = "") -> list[Path]:
        """Write ``final`` (name -> number) as ``final/<name>`` and the plots; returns the
        PNG paths written."""
        for name, value in final.items():
            self.writer.add_scalar(f"final/{name}", value, self.steps)
        self.writer.close()
        paths = [
            plot_search(self.history, self.folder / "search.png", target, self.cost, title),
            plot_channels(self.snapshots, self.folder / "channels.png"),
            plot_tokens(self.snapshots, self.folder / "tokens.png"),
            plot_arch(arch, self.folder / "arch.png"),
        ]
        return [p for p in paths if p is not None]

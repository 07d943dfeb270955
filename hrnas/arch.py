"""The searched architecture as JSON-able data.

``export_arch(net)`` describes a masked supernet::

    {
      "format": "hrnas-arch", "version": 1,
      "space": {...},                # the SpaceSpec (SpaceSpec.to_dict), widths before width_mult
      "num_classes": 19,
      "blocks": [                    # every searching block, in construction order
        {"name": "features.0.paths.0_0", "in_channels": 24, "out_channels": 24, "stride": 1,
         "kernel_sizes": [3, 7], "channels": [40, 12], "tokens": 0},
        ...
      ]
    }

``kernel_sizes`` lists the kernel sizes with at least one alive channel, ``channels`` how many
each keeps; a block with nothing alive has two empty lists and becomes its shortcut. ``tokens``
is the number of alive transformer tokens (0: no transformer). This is the authors'
``best_model.json`` content (one ``[out, 1, stride, kernel_sizes, channels, expand]`` entry per
block, in the same order) with names, so a reader can check it against the topology.
"""

from __future__ import annotations

from .space import SpaceSpec

FORMAT, VERSION = "hrnas-arch", 1
BLOCK_KEYS = ("name", "in_channels", "out_channels", "stride", "kernel_sizes", "channels", "tokens")


def export_arch(net) -> dict:
    """The architecture a ``Supernet``'s current masks select (see the module docstring)."""
    blocks = []
    for name, block in net.blocks():
        kept = [(k, c) for k, c in block.alive_per_kernel() if c]
        blocks.append(
            {
                "name": name,
                **block.shape_dict(),
                "kernel_sizes": [k for k, _ in kept],
                "channels": [c for _, c in kept],
                "tokens": block.tokens(),
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "space": net.space.to_dict(),
        "num_classes": net.num_classes,
        "blocks": blocks,
    }


def parse_arch(arch: dict) -> tuple[SpaceSpec, int, dict[str, dict]]:
    """Validate an architecture dict: (space, num_classes, ``{block name: entry}``)."""
    if not isinstance(arch, dict):
        raise TypeError(f"arch must be a dict (from export_arch / json.load), got {type(arch)}")
    if arch.get("format") != FORMAT:
        raise ValueError(f"arch: 'format' must be {FORMAT!r}, got {arch.get('format')!r}")
    if arch.get("version") != VERSION:
        raise ValueError(
            f"arch: version {arch.get('version')!r} is not supported (this hrnas reads {VERSION})"
        )
    missing = [k for k in ("space", "num_classes", "blocks") if k not in arch]
    if missing:
        raise ValueError(f"arch: missing keys {missing}")
    space = SpaceSpec.from_dict(arch["space"])
    entries = {}
    for i, entry in enumerate(arch["blocks"]):
        if not isinstance(entry, dict) or set(entry) != set(BLOCK_KEYS):
            raise ValueError(f"arch: blocks[{i}] must have exactly the keys {list(BLOCK_KEYS)}")
        if entry["name"] in entries:
            raise ValueError(f"arch: block {entry['name']!r} appears twice")
        if not set(entry["kernel_sizes"]) <= set(space.kernel_sizes):
            raise ValueError(
                f"arch: block {entry['name']!r} keeps kernel sizes {entry['kernel_sizes']}, "
                f"the space has {list(space.kernel_sizes)}"
            )
        tokens = entry["tokens"]
        if not isinstance(tokens, int) or not 0 <= tokens <= space.transformer.num_tokens:
            raise ValueError(
                f"arch: block {entry['name']!r} keeps {tokens!r} transformer tokens; the space "
                f"allows 0 to {space.transformer.num_tokens}"
            )
        entries[entry["name"]] = entry
    return space, arch["num_classes"], entries

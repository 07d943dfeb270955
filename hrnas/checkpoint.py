"""Search checkpoints: one file, written atomically, verified when read.

File layout: the line ``HRNAS-CHECKPOINT <format> <sha256 of the payload>\\n`` followed by the
payload, a ``torch.save`` of the state dict. ``save`` writes a temporary file in the same
folder, flushes it to disk and renames it over the target (``os.replace`` is atomic on POSIX),
so a run killed at any instant leaves either the previous checkpoint or the new one, never a
mix. ``load`` checks the header, the digest (a truncated or bit-flipped file fails here) and
then the recorded format version, hrnas version and search space against the caller's, so a
resume never continues from something it cannot reproduce; every failure is a
``CheckpointError`` (a ``ValueError``) naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

MAGIC = b"HRNAS-CHECKPOINT"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, damaged or incompatible)."""


def save(path: str | Path, state: dict, *, space: dict, version: str) -> None:
    """Write ``state`` (plus the format, ``version`` and ``space``) to ``path`` atomically."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save({**state, "format": FORMAT, "version": version, "space": space}, buf)
    payload = buf.getvalue()
    header = b"%s %d %s\n" % (MAGIC, FORMAT, hashlib.sha256(payload).hexdigest().encode())
    write_atomic(path, header + payload)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, flush it to disk and rename it over
    ``path``: a reader (or a run killed meanwhile) sees the old file or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path, *, space: dict, version: str) -> dict:
    """The state saved at ``path``, after checking integrity and compatibility."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    data = path.read_bytes()
    header, sep, payload = data.partition(b"\n")
    fields = header.split(b" ")
    if not sep or len(fields) != 3 or fields[0] != MAGIC:
        raise CheckpointError(f"{path}: not an hrnas search checkpoint (bad header)")
    if fields[1] != str(FORMAT).encode():
        raise CheckpointError(
            f"{path}: checkpoint format {fields[1].decode(errors='replace')}, this hrnas reads "
            f"format {FORMAT}"
        )
    if hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise CheckpointError(
            f"{path}: checkpoint is truncated or corrupted (sha256 of its {len(payload)} payload "
            "bytes does not match its header); resume from an intact copy or start a new run"
        )
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    if state.get("version") != version:
        raise CheckpointError(
            f"{path}: written by hrnas {state.get('version')}, this is hrnas {version}; "
            "resume with the version that wrote it"
        )
    if state.get("space") != space:
        raise CheckpointError(
            f"{path}: checkpoint of another search space "
            f"({state.get('space', {}).get('name')!r}, this run builds {space.get('name')!r} "
            "or a different variant of it)"
        )
    return state

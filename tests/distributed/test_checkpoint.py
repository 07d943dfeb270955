"""Checkpoint files: round trip, atomic write, and clear errors for truncated, corrupted and
incompatible files; the search state restored into a fresh run continues bitwise."""

import pytest
import torch

from hrnas import checkpoint as ckpt
from hrnas.search import search

from . import _tiny

SPACE = {"name": "hrnas-seg-tiny", "width": 1}


def _write(path):
    ckpt.save(path, {"step": 3, "w": torch.arange(5.0)}, space=SPACE, version="0.1.0")


def test_round_trip_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _write(path)
    state = ckpt.load(path, space=SPACE, version="0.1.0")
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupted"):
        ckpt.load(path, space=SPACE, version="0.1.0")
    flipped = bytearray(data)
    flipped[-100] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupted"):
        ckpt.load(path, space=SPACE, version="0.1.0")
    path.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ckpt.CheckpointError, match="bad header"):
        ckpt.load(path, space=SPACE, version="0.1.0")
    path.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="bad header"):
        ckpt.load(path, space=SPACE, version="0.1.0")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load(tmp_path / "missing.pt", space=SPACE, version="0.1.0")


def test_incompatible_checkpoints_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _write(path)
    with pytest.raises(ckpt.CheckpointError, match="another search space"):
        ckpt.load(path, space={**SPACE, "width": 2}, version="0.1.0")
    with pytest.raises(ckpt.CheckpointError, match="written by hrnas 0.1.0, this is hrnas 9"):
        ckpt.load(path, space=SPACE, version="9")
    data = path.read_bytes().replace(b"HRNAS-CHECKPOINT 1 ", b"HRNAS-CHECKPOINT 7 ", 1)
    path.write_bytes(data)
    with pytest.raises(ckpt.CheckpointError, match="format 7"):
        ckpt.load(path, space=SPACE, version="0.1.0")


def test_resume_from_every_checkpoint_is_bitwise(tmp_path):
    """One run saving at every step; for two intermediate steps, a fresh net resumed from that
    step's file ends with the same masks, weights and history, bit for bit."""
    import hrnas

    data = _tiny.dataset()
    cfg = _tiny.config(checkpoint_every=1, ema=0.9)
    saved = {}

    def keep(step, record):
        # called before the step's own checkpoint: the file holds the one of ``step`` steps
        if step in (2, 3):
            saved[step] = (tmp_path / "c.pt").read_bytes()

    net = _tiny.supernet()
    full = search(net, data, cfg, keep, checkpoint=tmp_path / "c.pt")
    for step, blob in saved.items():
        path = tmp_path / f"at{step}.pt"
        path.write_bytes(blob)
        fresh = _tiny.supernet()
        state = ckpt.load(path, space=fresh.space.to_dict(), version=hrnas.__version__)
        assert state["step"] == step
        again = search(fresh, data, cfg, checkpoint=tmp_path / "r.pt", resume=state)
        assert again.history == full.history
        for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), name
        for ua, ub in zip(net.search_units(), fresh.search_units()):
            assert torch.equal(ua.mask, ub.mask)
    state["world"] = 2
    with pytest.raises(ckpt.CheckpointError, match="written by 2 ranks, resuming on 1"):
        search(_tiny.supernet(), data, cfg, resume=state)
    with pytest.raises(ckpt.CheckpointError, match=r"other settings: \['lr'\]"):
        search(
            _tiny.supernet(), data, _tiny.config(checkpoint_every=1, ema=0.9, lr=1.0), resume=state
        )


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"shards": 0}, "shards must be a positive int"),
        ({"shards": 3}, "batch_size 4 is not a multiple of shards 3"),
        ({"ema": 1.0}, r"ema must be in \[0, 1\)"),
        ({"checkpoint_every": -1}, "checkpoint_every must be an int >= 0"),
    ],
)
def test_bad_distributed_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        _tiny.config(**bad)

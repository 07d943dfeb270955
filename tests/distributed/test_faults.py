"""A NaN loss stops the search with a clear error and leaves the last good checkpoint intact;
bad data folders and ``--resume`` misuse exit 2 with a message naming the problem."""

import pytest
import torch

import hrnas
import hrnas.job
from hrnas import checkpoint as ckpt
from hrnas.cli import main
from hrnas.search import search
from hrnas.search.loop import NonFiniteLoss

from . import _tiny


class Poisoned:
    """``dataset`` whose images become NaN once ``poison`` is set."""

    def __init__(self, dataset, poison=False):
        self.dataset, self.poison = dataset, poison

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def batch(self, index):
        batch = self.dataset.batch(index)
        if self.poison:
            batch["image"] = torch.full_like(batch["image"], float("nan"))
        return batch


def test_nan_mid_search_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = Poisoned(_tiny.dataset())
    path = tmp_path / "checkpoint.pt"
    saved = {}

    def poison_after_third(step, record):
        if step + 1 == 3:
            data.poison = True
            saved[2] = path.read_bytes()

    net = _tiny.supernet()
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss nan .* at step 4; the last good "):
        search(net, data, _tiny.config(checkpoint_every=2), poison_after_third, checkpoint=path)
    assert path.read_bytes() == saved[2]
    state = ckpt.load(path, space=net.space.to_dict(), version=hrnas.__version__)
    assert state["step"] == 2 and len(state["history"]) == 2
    for name, value in state["net"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name


def test_cli_nan_exits_3_with_a_message(tmp_path, monkeypatch, capsys):
    datasets = hrnas.job.datasets

    def poisoned(config):
        train, test = datasets(config)
        return Poisoned(train, poison=True), test

    monkeypatch.setattr(hrnas.job, "datasets", poisoned)
    args = ["--set", "data.train_count=16", "--set", "data.options={size: 32}"]
    assert main(["search", "--out", str(tmp_path), "--set", "search.batch_size=4", *args]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss nan" in err and "no checkpoint was written" in err
    assert "Traceback" not in err


def _cls_folder(root):
    return [
        "search",
        "--out",
        str(root / "runs"),
        "--set",
        "space=hrnas-cls-tiny",
        "--set",
        "data.name=imagefolder",
        "--set",
        "data.train_count=null",
        "--set",
        "data.test_count=null",
        "--set",
        f"data.options={{root: {root / 'images'}}}",
    ]


@pytest.mark.parametrize(
    "layout,message",
    [
        (None, "image folder: directory not found"),
        ("images/train/", "has no class subfolders"),
        ("images/train/cat/notes.txt", "class folder 'cat' holds no image"),
    ],
)
def test_bad_data_folders_exit_2(tmp_path, capsys, layout, message):
    if layout is not None:
        path = tmp_path / layout
        if layout.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True)
            path.write_text("x")
    assert main(_cls_folder(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "not a search run folder"),
        (["--set", "search.lr=0.1"], "drop --config/--set/--out"),
    ],
)
def test_resume_misuse_exits_2(tmp_path, capsys, extra, message):
    assert main(["search", "--resume", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_resume_without_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("search:\n  steps: 4\n")
    assert main(["search", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint there" in capsys.readouterr().err

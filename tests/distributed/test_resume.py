"""``hrnas search`` killed with SIGKILL at a random step and resumed with ``--resume`` ends with
the same ``arch.json``, history, weights and metrics as the uninterrupted run (bitwise, CPU;
the uninterrupted run in this process, one thread, as the command's config sets);
a damaged checkpoint is refused by ``--resume`` with a clear message."""

import json
import random
import re
import signal
import subprocess
import sys

import torch
import yaml

from hrnas.cli import main

STEPS = 10
TINY = {
    "data": {"train_count": 16, "test_count": 8, "options": {"size": 32}},
    "search": {
        "steps": STEPS,
        "batch_size": 4,
        "interval": 2,
        "rho_warmup_steps": 2,
        "checkpoint_every": 1,
        "ema": 0.5,
    },
    "retrain": {"steps": 2, "batch_size": 4},
    "eval": {"batch_size": 8, "recalibrate_batches": 2},
}
COMMAND = [sys.executable, "-m", "hrnas", "search"]


def _only_run(folder):
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    return run


def _results(run) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    # Times (search/retrain seconds, the measured batch-1 latency) are not part of the result.
    timeless = {k: v for k, v in summary.items() if not k.endswith(("_seconds", "latency_ms"))}
    weights = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    return {
        "arch": json.loads((run / "arch.json").read_text()),
        "history": json.loads((run / "history.json").read_text()),
        "alive": json.loads((run / "alive.json").read_text()),
        "summary": timeless,
        "weights": weights,
    }


def _same(a: dict, b: dict) -> None:
    assert a["arch"] == b["arch"] and a["history"] == b["history"]
    assert a["alive"] == b["alive"]
    assert a["summary"] == b["summary"]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


def _kill_at(step: int, config, out) -> None:
    """Run the search and SIGKILL it once the log reports the checkpoint of ``step``."""
    child = subprocess.Popen(
        [*COMMAND, "--config", str(config), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in child.stdout:
        seen.append(line)
        found = re.search(r"checkpoint step (\d+) ->", line)
        if found and int(found.group(1)) >= step:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL, "".join(seen)


def test_sigkill_at_a_random_step_then_resume_is_bitwise(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    step = random.randint(1, STEPS - 2)
    _kill_at(step, config, tmp_path / "killed")
    run = _only_run(tmp_path / "killed")
    assert not (run / "summary.json").exists()
    done = subprocess.run([*COMMAND, "--resume", str(run)], capture_output=True, text=True)
    assert done.returncode == 0, f"killed at step {step}: {done.stderr}"
    assert "resuming" in (run / "log.txt").read_text()

    assert main(["search", "--config", str(config), "--out", str(tmp_path / "whole")]) == 0
    expected = _results(_only_run(tmp_path / "whole"))
    _same(_results(run), expected)

    # a finished search resumed: the retraining runs again, to the same result
    assert main(["search", "--resume", str(run)]) == 0
    _same(_results(run), expected)

    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) - 1000])
    capsys.readouterr()
    assert main(["search", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and "Traceback" not in err

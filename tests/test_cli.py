"""The ``hrnas`` command line end to end on a tiny config (search, export, retrain, eval), its
``--help`` pages, and clear errors for bad configs."""

import json
import subprocess
import sys

import pytest
import yaml

from hrnas.cli import main, parser
from hrnas.config import load_config
from tests.nas.conftest import _one_thread  # noqa: F401  (autouse: one thread per test)

TINY = {
    "data": {"train_count": 16, "test_count": 8, "options": {"size": 32}},
    "search": {"steps": 4, "batch_size": 4, "interval": 2, "rho_warmup_steps": 2},
    "retrain": {"steps": 2, "batch_size": 4},
    "eval": {"batch_size": 8, "recalibrate_batches": 2},
}


def _only_run(folder):
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    return run


def test_search_export_retrain_eval(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "runs"
    assert main(["search", "--config", str(config), "--out", str(out)]) == 0
    run = _only_run(out)
    for name in ("config.yaml", "log.txt", "history.json", "arch.json", "supernet.pt", "model.pt"):
        assert (run / name).is_file(), name
    for name in ("search.png", "channels.png", "arch.png"):  # no transformers: no tokens.png
        assert (run / name).read_bytes()[:4] == b"\x89PNG", name
    assert not (run / "tokens.png").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    alive = json.loads((run / "alive.json").read_text())
    assert [s["step"] for s in alive] == [2, 4]  # the controller's checks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["latency_ms"] > 0
    assert summary["metric"] == "mIoU" and 0.0 <= summary["value"] <= 1.0
    assert abs(summary["macs"] - summary["target_macs"]) / summary["target_macs"] < 0.02
    assert summary["target_macs"] == pytest.approx(0.5 * summary["supernet_macs"])
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["search"]["steps"] == 4 and resolved["space"] == "hrnas-seg-tiny"

    exported = tmp_path / "arch.json"
    assert (
        main(["export", "--checkpoint", str(run / "supernet.pt"), "--output", str(exported)]) == 0
    )
    assert json.loads(exported.read_text()) == json.loads((run / "arch.json").read_text())

    again = tmp_path / "retrain"
    args = ["--config", str(config), "--out", str(again), "--set", "retrain.init=inherit"]
    code = main(["retrain", "--arch", str(exported), "--supernet", str(run / "supernet.pt"), *args])
    assert code == 0
    retrained = json.loads((_only_run(again) / "summary.json").read_text())
    assert retrained["macs"] == summary["macs"]

    capsys.readouterr()
    assert main(["eval", "--config", str(config), "--checkpoint", str(run / "model.pt")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "mIoU" and result["value"] == pytest.approx(summary["value"])


@pytest.mark.parametrize("command", ["search", "retrain", "eval", "export", "bench-latency"])
def test_help_documents_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    sub = parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{command} {action.option_strings} has no help"


def test_python_dash_m_help():
    done = subprocess.run(
        [sys.executable, "-m", "hrnas", "search", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--set" in done.stdout


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["search.stepz=3"], "unknown key 'search.stepz'"),
        (["search.steps=abc"], "search.steps must be a number"),
        (["search.steps=2.5"], "search.steps must be an integer"),
        (["search.target_macs=1e6"], "give one of search.target_macs"),
        (["search.target_latency=2.0"], "not target_ratio and target_latency"),
        (["search.latency_table=3"], "search.latency_table must be a path or null"),
        (["retrain.init=warm"], "retrain.init"),
        (["memory_format=nhwc"], "memory_format must be one of"),
        (["data=3"], "data must be a mapping"),
        (["nokey"], "key.sub=value"),
    ],
)
def test_bad_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_cli_reports_bad_values_without_traceback(tmp_path, capsys):
    code = main(["search", "--out", str(tmp_path), "--set", "space=hrnas-nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown search space 'hrnas-nope'" in err and "Traceback" not in err
    config = tmp_path / "bad.yaml"
    config.write_text("search:\n  lr: fast\n")
    assert main(["search", "--config", str(config)]) == 2
    assert "search.lr must be a number" in capsys.readouterr().err


def test_bench_latency_then_search_to_a_latency_target(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    table_path = tmp_path / "latency.json"
    bench = ["bench-latency", "--config", str(config), "--output", str(table_path)]
    assert main([*bench, "--repeats", "1", "--samples", "4"]) == 0
    table = json.loads(table_path.read_text())
    assert table["input_size"] == [32, 32] and table["threads"] == 1
    target = table["base_ms"] + 0.5 * (table["full_ms"] - table["base_ms"])
    out = tmp_path / "runs"
    args = ["--config", str(config), "--out", str(out), "--latency-table", str(table_path)]
    assert main(["search", *args, "--target-latency", str(target)]) == 0
    run = _only_run(out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["target_latency_ms"] == pytest.approx(target)
    # The controller lands within one unit's cost of the target. That is under 2% with a table
    # measured on an idle host; on a loaded one (CI beside other work) noisy block timings can
    # give a unit more (2.6% seen once), so the bound is the larger of the two.
    unit_ms = max(row["ms_per_unit"] for row in table["units"])
    assert abs(summary["searched_latency_ms"] - target) <= max(0.02 * target, unit_ms)
    assert summary["searched_macs"] < summary["supernet_macs"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())["search"]
    assert resolved["cost"] == "latency" and resolved["target_ratio"] is None
    assert (
        main(
            ["bench-latency", "--config", str(config), "--output", str(table_path), "--batch", "0"]
        )
        == 2
    )

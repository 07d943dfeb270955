"""The ``hrnas`` command line: ``search``, ``retrain``, ``eval``, ``export``, ``bench-latency``.

``hrnas search`` with no arguments runs ``hrnas/configs/default.yaml``: search the scaled
``hrnas-seg`` space on the embedded segmentation task to half the supernet's MACs, retrain the
exported architecture, evaluate it, and write ``runs/<timestamp>/`` (``config.yaml``,
``log.txt``, ``history.json``, ``alive.json``, ``arch.json``, ``supernet.pt``, ``model.pt``,
``summary.json``, ``checkpoint.pt``, ``tensorboard/`` events and the PNG plots of
``hrnas.report``). ``hrnas search --resume RUN_DIR`` continues a killed run from its checkpoint;
under ``torchrun`` the search runs on every rank (``hrnas.distributed``) and rank 0 alone writes
the folder. Exit status: 2 for bad input, 3 for a non-finite loss during the search.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import __version__, build_from_arch, checkpoint, export_arch, job
from .config import load_config
from .distributed import Dist, gather, init_from_env, shutdown
from .latency import load_table, measure_ms, measure_table, predict_ms, save_table
from .report import SearchReport
from .search import SearchConfig, recalibrate_bn, search
from .search.loop import NonFiniteLoss
from .space import SpaceSpec
from .supernet.supernet import Supernet
from .train import evaluate

log = logging.getLogger("hrnas")
# The progress bar's name of the search's cost (MACs in millions, or the table's ms).
COST_KEY = {"macs": "MMACs", "latency": "ms"}


class Progress:
    """A tqdm bar on stderr: steps done, rate, elapsed and ETA, with the live ``values``."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=1.0)

    def update(self, **values) -> None:
        self.bar.set_postfix_str(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
            ),
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _save(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _load_net(path: Path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("kind") == "supernet":
        net = Supernet(SpaceSpec.from_dict(ckpt["space"]), ckpt["num_classes"])
    elif ckpt.get("kind") == "compact":
        net = build_from_arch(ckpt["arch"])
    else:
        raise ValueError(f"{path}: not an hrnas checkpoint (no 'kind' supernet/compact)")
    net.load_state_dict(ckpt["state_dict"])
    return net


def _retrain_and_eval(config, arch, supernet, train_set, test_set, out: Path, writer) -> dict:
    """Retrain ``arch`` (``retrain.init``), recalibrate BN, evaluate; the loss goes to
    ``writer`` (TensorBoard ``retrain/loss``). Also measures the retrained network's latency
    (batch 1, ``hrnas.latency.measure_ms``)."""
    bar = Progress(config["retrain"]["steps"], "retrain")
    net, seconds = job.retrain(
        config,
        arch,
        train_set,
        supernet=supernet,
        on_step=lambda s, loss: (
            bar.update(loss=loss),
            writer.add_scalar("retrain/loss", loss, s + 1),
        ),
    )
    bar.close()
    torch.save({"kind": "compact", "arch": arch, "state_dict": net.state_dict()}, out / "model.pt")
    result = evaluate(net, test_set, config["eval"]["batch_size"])
    size = tuple(net.space.input_size)
    return {
        **result,
        "macs": net.macs(size),
        "params": net.num_parameters(),
        "latency_ms": measure_ms(net, size),
        "retrain_seconds": seconds,
    }


def _search_config(config: dict, args) -> SearchConfig:
    """``config["search"]`` with the command line's latency flags (a latency budget replaces
    the config's MACs budget)."""
    values = dict(config["search"])
    if args.latency_table is not None:
        values.update(cost="latency", latency_table=args.latency_table)
    if args.target_latency is not None:
        values.update(cost="latency", target_latency=args.target_latency)
        values.update(target_macs=None, target_ratio=None)
    config["search"] = values  # the run folder's config.yaml says what ran
    return SearchConfig(**values)


def _searched_summary(result, sc: SearchConfig, net, size, supernet_macs) -> dict:
    """What the search reached: MACs always, the table's latency with ``cost: latency``."""
    out = {
        "supernet_macs": supernet_macs,
        "target_macs": result.target_macs,
        "searched_macs": result.final_macs,
    }
    if sc.cost == "latency":  # the result's "MACs" are then the table's milliseconds
        table = load_table(sc.latency_table)
        out = {
            "supernet_macs": supernet_macs,
            "supernet_latency_ms": result.full_macs,
            "target_latency_ms": result.target_macs,
            "searched_latency_ms": predict_ms(table, net.search_units(size), size),
            "searched_macs": net.macs(size),
        }
    return out


def cmd_search(args) -> int:
    d = init_from_env()
    try:
        return _search(args, d)
    finally:
        shutdown(d)


def _search(args, d: Dist) -> int:
    if args.resume and (
        args.config or args.set or args.out or args.latency_table or args.target_latency
    ):
        raise ValueError(
            "--resume continues a run with its own config.yaml and folder; "
            "drop --config/--set/--out/--latency-table/--target-latency"
        )
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.yaml").is_file():
            raise ValueError(f"--resume {out}: not a search run folder (no config.yaml)")
        args.config = str(out / "config.yaml")
    config = _config(args)
    sc = _search_config(config, args)
    if not d.main:
        logging.getLogger().setLevel(logging.WARNING)
    if args.resume:
        if d.main:
            logging.getLogger().addHandler(logging.FileHandler(out / "log.txt"))
            log.info("resuming %s", out)
    else:
        out = Path(gather(d, str(_run_folder(args, config)) if d.main else None)[0])
    train_set, test_set = job.datasets(config)
    torch.manual_seed(config["search"]["seed"])
    net = job.supernet(config, train_set).to(d.device)
    size = tuple(net.space.input_size)
    supernet_macs = net.macs(size)
    resume = None
    if args.resume:
        resume = checkpoint.load(
            out / "checkpoint.pt", space=net.space.to_dict(), version=__version__
        )
    done = 0 if resume is None else resume["step"]
    report = bar = None
    if d.main:
        report = SearchReport(
            out,
            net.search_units(size),
            sc.interval,
            sc.steps,
            sc.cost,
            resumed=None if resume is None else resume["history"],
        )
        bar = Progress(sc.steps - done, "search") if done < sc.steps else None

    def on_step(step, record):
        if report is not None:
            report.on_step(step, record)
        if bar is not None:
            cost = record["macs"] / 1e6 if sc.cost == "macs" else record["macs"]
            bar.update(loss=record["loss"], **{COST_KEY[sc.cost]: cost}, alive=record["alive"])

    result = search(
        net, train_set, sc, on_step, checkpoint=out / "checkpoint.pt", resume=resume, dist=d
    )
    if bar is not None:
        bar.close()
    shutdown(d)  # the rest (export, evaluation, retraining) runs in rank 0 alone, on the CPU
    if not d.main:
        return 0
    net.cpu()
    log.info(
        "searched: %.4g %s (target %s, full %.4g), %d/%d units alive, %.0f s",
        result.final_macs,
        "MACs" if sc.cost == "macs" else "ms",
        result.target_macs,
        result.full_macs,
        result.alive_units,
        result.total_units,
        result.seconds,
    )
    arch = export_arch(net)
    _save(arch, out / "arch.json")
    _save(result.history, out / "history.json")
    state = {
        "kind": "supernet",
        "space": net.space.to_dict(),
        "num_classes": net.num_classes,
        "state_dict": net.state_dict(),
    }
    torch.save(state, out / "supernet.pt")
    probe = copy.deepcopy(net)
    recalibrate_bn(probe, job.recalibration_inputs(train_set, config))
    searched = evaluate(probe, test_set, config["eval"]["batch_size"])
    log.info("searched supernet (BN recalibrated): %s %.4f", searched["metric"], searched["value"])
    final = _retrain_and_eval(config, arch, net, train_set, test_set, out, report.writer)
    summary = {
        "metric": final["metric"],
        "value": final["value"],
        "macs": final["macs"],
        "params": final["params"],
        "latency_ms": final["latency_ms"],
        **_searched_summary(result, sc, net, size, supernet_macs),
        "searched_supernet_metric": searched["value"],
        "search_seconds": result.seconds,
        "retrain_seconds": final["retrain_seconds"],
    }
    _save(summary, out / "summary.json")
    metric = final["metric"]
    plots = report.finish(
        arch,
        {metric: final["value"], f"searched_supernet_{metric}": searched["value"]},
        result.target_macs,
        f"retrained {metric} {final['value']:.4f}, searched supernet (BN recalibrated) "
        f"{searched['value']:.4f}; {final['macs'] / 1e6:.3g} M MACs",
    )
    log.info("plots: %s", ", ".join(p.name for p in plots))
    log.info(
        "retrained: %s %.4f at %.4g MACs, %d params, %.3g ms (batch 1); run folder %s",
        final["metric"],
        final["value"],
        final["macs"],
        final["params"],
        final["latency_ms"],
        out,
    )
    return 0


def _config(args) -> dict:
    """The resolved config of ``--config`` and ``--set``; applies its ``threads``."""
    config = load_config(args.config, args.set)
    if config["threads"] < 0:
        raise ValueError(f"config: threads must be >= 0, got {config['threads']}")
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    return config


def _run_folder(args, config) -> Path:
    out = Path(args.out or config["out"]) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger().addHandler(logging.FileHandler(out / "log.txt"))
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("run folder %s", out)
    return out


def cmd_retrain(args) -> int:
    config = _config(args)
    arch = json.loads(Path(args.arch).read_text())
    supernet = _load_net(Path(args.supernet)) if args.supernet else None
    if supernet is not None and not isinstance(supernet, Supernet):
        raise ValueError(f"{args.supernet}: a compact checkpoint, --supernet needs a supernet.pt")
    out = _run_folder(args, config)
    train_set, test_set = job.datasets(config)
    writer = SummaryWriter(str(out / "tensorboard"))
    final = _retrain_and_eval(config, arch, supernet, train_set, test_set, out, writer)
    writer.add_scalar(f"final/{final['metric']}", final["value"], config["retrain"]["steps"])
    writer.close()
    _save(final, out / "summary.json")
    log.info(
        "retrained: %s %.4f at %.4g MACs; run folder %s",
        final["metric"],
        final["value"],
        final["macs"],
        out,
    )
    return 0


def cmd_eval(args) -> int:
    config = _config(args)
    net = job.in_layout(_load_net(Path(args.checkpoint)), config)
    train_set, test_set = job.datasets(config)
    if isinstance(net, Supernet):
        recalibrate_bn(net, job.recalibration_inputs(train_set, config))
    result = evaluate(net, test_set, config["eval"]["batch_size"])
    result["macs"] = net.macs(tuple(net.space.input_size))
    print(json.dumps(result))
    return 0


def cmd_export(args) -> int:
    net = _load_net(Path(args.checkpoint))
    if not isinstance(net, Supernet):
        raise ValueError(f"{args.checkpoint}: export needs a supernet checkpoint (supernet.pt)")
    _save(export_arch(net), Path(args.output))
    log.info("wrote %s (%.4g MACs)", args.output, net.macs(tuple(net.space.input_size)))
    return 0


def cmd_bench_latency(args) -> int:
    config = _config(args)
    train_set, _ = job.datasets(config)
    torch.manual_seed(config["search"]["seed"])
    net = job.supernet(config, train_set)
    size = tuple(net.space.input_size)
    table = measure_table(net, size, args.batch, args.repeats, args.samples)
    save_table(table, args.output)
    for f in table["fit"]:
        log.info(
            "fit at %.0f%% of the units: measured %.3f ms, predicted %.3f ms",
            100 * f["keep"],
            f["measured_ms"],
            f["predicted_ms"],
        )
    log.info(
        "wrote %s: %s at %s, batch %d, %d thread(s): base %.3f ms, full %.3f ms, fit error %.1f%%",
        args.output,
        config["space"],
        size,
        args.batch,
        table["threads"],
        table["base_ms"],
        table["full_ms"],
        100 * table["fit_error"],
    )
    return 0


def _config_flags(p) -> None:
    p.add_argument(
        "--config",
        metavar="YAML",
        help="a YAML config merged over the default (hrnas/configs/default.yaml)",
    )
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config key (dotted, value as YAML), e.g. --set search.steps=50; "
        "repeatable",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="hrnas", description="HR-NAS: resource-aware search of high-resolution networks"
    )
    sub = root.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "search", help="search, export, retrain and evaluate (the default job with no arguments)"
    )
    _config_flags(p)
    p.add_argument(
        "--out", metavar="DIR", help="parent folder of the run folder (default: config key out)"
    )
    p.add_argument(
        "--latency-table",
        metavar="JSON",
        help="search with latency costs from this table (hrnas bench-latency); sets "
        "search.cost=latency and search.latency_table",
    )
    p.add_argument(
        "--target-latency",
        type=float,
        metavar="MS",
        help="latency budget in ms of the table's model (sets search.cost=latency and "
        "search.target_latency, clears search.target_macs/target_ratio)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the killed search run in RUN_DIR from its checkpoint.pt (with its "
        "config.yaml); a finished search re-runs the retraining",
    )
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("retrain", help="retrain an arch.json and evaluate it")
    _config_flags(p)
    p.add_argument(
        "--arch", required=True, metavar="JSON", help="the architecture (arch.json of a search run)"
    )
    p.add_argument(
        "--supernet",
        metavar="PT",
        help="supernet.pt whose weights retrain.init=inherit starts from",
    )
    p.add_argument(
        "--out", metavar="DIR", help="parent folder of the run folder (default: config key out)"
    )
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint (model.pt or supernet.pt) on the config's test split"
    )
    _config_flags(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PT",
        help="model.pt (retrained) or supernet.pt (searched; BN recalibrated first)",
    )
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="write the arch.json of a searched supernet checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="PT", help="supernet.pt of a search run")
    p.add_argument(
        "--output", required=True, metavar="JSON", help="where to write the architecture"
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "bench-latency",
        help="measure the latency table of the config's space on this device (see hrnas.latency)",
    )
    _config_flags(p)
    p.add_argument("--output", required=True, metavar="JSON", help="where to write the table")
    p.add_argument("--batch", type=int, default=1, help="images per timed forward (default 1)")
    p.add_argument(
        "--repeats", type=int, default=10, help="timed calls per measurement, the min kept (10)"
    )
    p.add_argument(
        "--samples", type=int, default=8, help="random masks the per-block fit uses (default 8)"
    )
    p.set_defaults(func=cmd_bench_latency)
    return root


def main(argv=None) -> int:
    """Entry point of the `hrnas` console script and `python -m hrnas`."""
    args = parser().parse_args(argv)
    if args.command is None:
        args = parser().parse_args(["search", *(argv or [])])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"hrnas {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"hrnas {args.command}: error: {e}", file=sys.stderr)
        return 3

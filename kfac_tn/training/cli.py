"""Command line ``kfac-tn`` (= ``python -m kfac_tn``): ``train``, ``compare``, ``reference``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

_TRAIN_EPILOG = """\
examples:
  kfac-tn train                                   # offline default: digits CNN + KFAC
  kfac-tn train configs/digits_sgd.yaml --epochs 5
  kfac-tn train configs/cifar10_resnet18_kfac.yaml data.root=~/data data.download=true
  kfac-tn train configs/digits_kfac.yaml optimizer.damping=3e-3 optimizer.kfac_approx=reduce
  kfac-tn train configs/digits_sgd.yaml optimizer=adam optimizer.lr=1e-3
  kfac-tn train --resume runs/digits_cnn-kfac-20250101-120000 --epochs 20
  torchrun --nproc-per-node 2 -m kfac_tn train configs/digits_kfac.yaml distributed=ddp

Overrides are dotted keys with YAML-typed values (optimizer.lr=0.1, schedule.milestones=[30,60],
optimizer.kl_clip=null), applied left to right. `kfac-tn reference` lists every key.
Layer overrides: optimizer.layer_settings.PATTERN=skip or optimizer.layer_settings.PATTERN.KEY=V
(optimizer.layer_settings.conv1.damping=0.01); a pattern with dots or wildcards goes in brackets,
quoted for the shell: 'optimizer.layer_settings[layer1.0.conv1].damping=0.01',
'optimizer.layer_settings[features.*]=skip', or give the mapping as JSON:
optimizer.layer_settings='{"layer1.0.conv1": {"damping": 0.01}}'.
Config groups: SECTION=NAME (optimizer, model, data, schedule) replaces the whole section by NAME
with every other key at its default, e.g. optimizer=adam gives Adam with its documented defaults
(and lr 1e-3, Adam's usual value); later overrides refine it
(optimizer=adam optimizer.lr=3e-4). optimizer.name=adam changes only the name, and keys of
the old optimizer that Adam does not take are then refused.
With --resume and no CONFIG, the run's own config.yaml is used; the config must match the
checkpoint except for epochs, device, quiet, log_every, checkpoint_period, out_dir, run_name,
dist_timeout_s, test_batch_size, data.root, data.download and data.num_workers.
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the ``kfac-tn`` argument parser.

    Returns:
        The parser with the subcommands ``train``, ``compare`` and ``reference``.
    """
    parser = argparse.ArgumentParser(
        prog="kfac-tn",
        description="Train CNNs with KFAC (tensor-network curvature engine) or SGD/Adam baselines.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="console log level (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_compare_parser(sub)
    _add_reference_parser(sub)
    return parser


def _add_train_parser(sub: Any) -> None:
    tr = sub.add_parser(
        "train",
        help="train and evaluate a model from a YAML config",
        description="Train and evaluate. Writes RUN_DIR/{config.yaml, metrics.jsonl, "
        "checkpoint.pt, curves.png, train.log} with RUN_DIR = out_dir/run_name.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="optional YAML config (default: the built-in offline digits + KFAC config), then "
        "dotted overrides and config groups (optimizer=adam), left to right",
    )
    tr.add_argument("--epochs", type=int, help="number of epochs (= epochs=N)")
    tr.add_argument("--out", metavar="DIR", help="parent of run directories (= out_dir=DIR)")
    tr.add_argument("--run-name", metavar="NAME", help="run directory name (= run_name=NAME)")
    tr.add_argument("--device", metavar="D", help="auto | cpu | cuda | cuda:N (= device=D)")
    tr.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint; given a folder of runs (the --out "
        "folder), the run with the newest checkpoint.pt (logged; an error lists the runs if "
        "none or a tie)",
    )
    tr.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop (with a checkpoint) after N epochs of this invocation; continue with --resume",
    )
    tr.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch intra-op CPU threads (default: torch's; 1 is fastest for small models on a "
        "busy CPU)",
    )
    tr.add_argument("--quiet", action="store_true", help="no progress bars (= quiet=true)")


def _add_compare_parser(sub: Any) -> None:
    cmp_ = sub.add_parser(
        "compare",
        help="overlay runs (test accuracy and training loss vs epoch and wall-clock)",
        description="Overlay runs: test accuracy (test loss for reconstruction) and training loss "
        "against epoch and against wall-clock time, in one PNG.",
    )
    cmp_.add_argument(
        "--target",
        type=float,
        metavar="ACC",
        help="also report the first epoch (and wall-clock) at which each run reaches this test "
        "accuracy, e.g. 0.97",
    )
    cmp_.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    cmp_.add_argument(
        "--out", default="compare.png", metavar="FILE.png", help="output PNG (default compare.png)"
    )


def _add_reference_parser(sub: Any) -> None:
    ref = sub.add_parser("reference", help="print the config reference (every key, type, default)")
    ref.add_argument(
        "--format",
        choices=["markdown", "yaml"],
        default="markdown",
        help="markdown table of all keys, or the default config as YAML",
    )


def _split_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    from kfac_tn.training.config import ConfigError

    configs = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    if len(configs) > 1:
        raise ConfigError(f"config: {configs!r} names more than one config file; pass at most one")
    return (configs[0] if configs else None), overrides


def _cmd_train(ns: argparse.Namespace) -> int:
    from kfac_tn.training.config import load_config
    from kfac_tn.training.train import CONFIG_NAME, resolve_resume_dir, train

    config_path, overrides = _split_args(ns.args)
    for flag, key in (
        ("epochs", "epochs"),
        ("out", "out_dir"),
        ("run_name", "run_name"),
        ("device", "device"),
    ):
        value = getattr(ns, flag)
        if isinstance(value, str):  # a string flag is taken as it is, never YAML-typed
            value = json.dumps(value)  # (`--run-name ''` stays '', `--run-name 'a: b'` a string)
        if value is not None:
            overrides.append(f"{key}={value}")
    if ns.quiet:
        overrides.append("quiet=true")
    if ns.resume is not None:  # a run directory, or a folder of them: the newest run
        ns.resume = str(resolve_resume_dir(ns.resume))
        if config_path is None:
            config_path = str(Path(ns.resume) / CONFIG_NAME)
    cfg = load_config(config_path, overrides)
    if ns.threads is not None:
        if ns.threads < 1:
            raise ValueError(f"--threads: {ns.threads} is out of range; allowed: >= 1")
        import torch

        torch.set_num_threads(ns.threads)
    result = train(cfg, resume=ns.resume, stop_after=ns.stop_after)
    if result.run_dir is not None and result.metrics:
        last = result.metrics[-1]
        acc = "" if last["test_acc"] is None else f", test acc {last['test_acc']:.4f}"
        print(
            f"run {result.run_dir}: {len(result.metrics)} epochs, "
            f"test loss {last['test_loss']:.4f}{acc}"
        )
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    from kfac_tn.training.plots import compare_runs, summarize_runs

    summary = summarize_runs(ns.run_dirs, ns.target)
    out = compare_runs(ns.run_dirs, ns.out)
    print(summary)
    print(f"wrote {out}")
    return 0


def _cmd_reference(ns: argparse.Namespace) -> int:
    import yaml

    from kfac_tn.training.config import TrainConfig, config_reference, config_to_dict

    if ns.format == "markdown":
        print(config_reference())
    else:
        print(yaml.safe_dump(config_to_dict(TrainConfig()), sort_keys=False), end="")
    return 0


EXIT_DISTRIBUTED_FAILURE = 1


def console_main() -> None:
    """Console entry point (``kfac-tn``, ``python -m kfac_tn``): exits with :func:`main`'s status.

    After a failed distributed run the process leaves with ``os._exit``: a process group whose
    peer died can keep C++ (gloo) threads alive that abort the interpreter's shutdown
    ("terminate called without an active exception", status -6 instead of 1). The error is
    reported and every log flushed before.
    """
    status = main()
    if status == EXIT_DISTRIBUTED_FAILURE:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ``kfac-tn`` command.

    Args:
        argv: The arguments after the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on an invalid config/arguments/checkpoint, 1 on a
        failed distributed run.
    """
    from kfac_tn.training.checkpoint import CheckpointError
    from kfac_tn.training.config import ConfigError
    from kfac_tn.training.train import DistributedRunError

    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # positional overrides may follow options (`train --epochs 3 seed=1`); argparse leaves them over
    stray = [a for a in extra if a.startswith("-") or ns.command != "train"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        ns.args = [*ns.args, *extra]
    console = logging.StreamHandler()
    level = getattr(logging, ns.log_level)
    if os.environ.get("RANK", "0") != "0":  # torchrun workers other than rank 0: warnings only
        level = max(level, logging.WARNING)
    console.setLevel(level)  # the run's train.log still gets INFO
    logging.basicConfig(
        level=logging.INFO,
        handlers=[console],
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    handlers = {"train": _cmd_train, "compare": _cmd_compare, "reference": _cmd_reference}
    try:
        return handlers[ns.command](ns)
    except (ConfigError, CheckpointError, ValueError) as exc:
        print(f"kfac-tn {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except DistributedRunError as exc:
        print(f"kfac-tn {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_DISTRIBUTED_FAILURE


if __name__ == "__main__":  # pragma: no cover
    console_main()

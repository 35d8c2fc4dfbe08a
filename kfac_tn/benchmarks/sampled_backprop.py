"""Randomized backpropagation experiment: gradient error against saved activation memory.

Reproduces the paper's experiment (Dangel 2024, §5 / design.md §3) with the package's
:class:`~kfac_tn.nn.SampledConv2d` layers:

1. **Gradient error vs. memory.** An untrained All-CNN-C (CIFAR-100 shapes: ``3×32×32``
   inputs, 100 classes; dropout disabled so that exact and sampled gradients share the forward
   pass) on two inputs -- synthetic Gaussian images with random labels, and real images (the
   scikit-learn 8×8 digits upsampled to 32×32, replicated to 3 channels; the offline stand-in
   for CIFAR-100). For each sampling axis and ``keep_prob`` in {0.9, 0.75, 0.5, 0.25, 0.1}:
   the relative error ``‖ĝ - g‖ / ‖g‖`` of all conv weight gradients together (mean ± std
   over draws) and the *measured* saved-memory fraction ``1 - saved/saved_exact``, where
   ``saved`` counts the bytes of every non-parameter tensor the convolutions save for the
   backward pass (via :func:`torch.autograd.graph.saved_tensors_hooks`; includes the int64
   indices of the kept slices).
2. **Training.** The small digits CNN (:class:`kfac_tn.training.models.DigitsCNN`, 16×16 digits)
   trained with SGD using exact backpropagation and sampled backpropagation at
   ``keep_prob=0.5`` (spatial, spatial per-dimension, channel): test accuracy per epoch.

Outputs ``results.json``, ``error_vs_memory.png`` and ``training.png`` in ``--out`` and a table
on stdout. Run ``python -m kfac_tn.benchmarks.sampled_backprop [--quick] [--out DIR]
[--device cuda]``.

The x-axis counts the tensors saved *by the convolutions*. The table also reports the saving
of the whole network (distinct storages of all saved tensors): in All-CNN-C a ReLU precedes
most convolutions and saves its own output -- the next conv's input -- so that activation stays
alive and the kept slices come on top; the network-level saving is then negative. With
:class:`~kfac_tn.nn.MaskReLU` (saves a boolean mask instead of its output; identical gradients)
the saving becomes real; it is reported as a third memory column.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn.nn import convert_mask_relu, convert_sampled
from kfac_tn.tn.sampled import position_contribution_norms
from kfac_tn.training.data import load_digits_tensors
from kfac_tn.training.models import AllCNNC, DigitsCNN

log = logging.getLogger(__name__)

KEEP_PROBS = (0.9, 0.75, 0.5, 0.25, 0.1)
SERIES = {  # label -> (axis, spatial_mode)
    "spatial": ("spatial", "position"),
    "spatial (per dim)": ("spatial", "dims"),
    "channel": ("channel", "position"),
}


@dataclass(frozen=True)
class ErrorPoint:
    """One point of the gradient-error experiment."""

    data: str
    series: str
    keep_prob: float
    rel_error_mean: float
    rel_error_std: float
    rel_error_rms: float
    rel_error_theory: float | None
    memory_saved: float
    network_memory_saved: float
    network_memory_saved_mask_relu: float
    draws: int
    layer_rel_error_mean: list[float]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_weight_grads_and_saved_bytes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[torch.Tensor], int, int]:
    """Conv weight gradients of the cross-entropy loss and the bytes saved for backward.

    Args:
        model: The network (in training mode).
        x: Inputs ``[B, C, H, W]``.
        y: Labels ``[B]``.

    Returns:
        ``(grads, conv_saved, network_saved)``: one gradient per conv weight (module order);
        the bytes of the non-parameter tensors saved for backward while a convolution's
        forward was running; and the bytes of the distinct storages of all non-parameter
        tensors the whole network saved (a tensor saved by a ReLU and the next conv counts
        once).
    """
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    active = [False]
    saved = [0]
    storages: dict[int, int] = {}

    def pre(*_):
        active[0] = True

    def post(*_):
        active[0] = False

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in param_ptrs:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            if active[0]:
                saved[0] += t.numel() * t.element_size()
        return t

    handles = [c.register_forward_pre_hook(pre) for c in convs]
    handles += [c.register_forward_hook(post) for c in convs]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [c.weight for c in convs])
    finally:
        for h in handles:
            h.remove()
    return list(grads), saved[0], sum(storages.values())


def position_error_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per conv layer: ``Σ_i ‖T_i‖²`` over input positions (exact pass, see below).

    With ``S_l`` this sum for layer ``l``, the spatial ``"position"`` estimator has
    ``E‖ĝ - g‖² = (1-p)/p · Σ_l S_l`` exactly
    (:func:`kfac_tn.tn.sampled.position_contribution_norms`).

    Args:
        model: The network (in training mode, exact convolutions, zero padding mode).
        x: Inputs ``[B, C, H, W]``.
        y: Labels ``[B]``.

    Returns:
        ``S_l`` per conv layer (module order).
    """
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    inputs: dict[int, torch.Tensor] = {}
    grads: dict[int, torch.Tensor] = {}

    def hook(module, args, output, index):
        inputs[index] = args[0].detach()
        output.register_hook(lambda g: grads.__setitem__(index, g.detach()))

    handles = [
        c.register_forward_hook(functools.partial(hook, index=i)) for i, c in enumerate(convs)
    ]
    try:
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, [c.weight for c in convs])
    finally:
        for h in handles:
            h.remove()
    return [
        float(
            position_contribution_norms(
                inputs[i], grads[i], c.kernel_size, c.stride, c.padding, c.dilation, c.groups
            ).sum()
        )
        for i, c in enumerate(convs)
    ]


def _relative_error(est: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]) -> float:
    num = sum((a - b).pow(2).sum() for a, b in zip(est, exact))
    den = sum(b.pow(2).sum() for b in exact)
    return math.sqrt(float(num / den))


def gradient_error(
    model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    keep_probs: Sequence[float],
    series: dict[str, tuple[str, str]],
    draws: int,
    seed: int = 0,
) -> list[ErrorPoint]:
    """Relative conv-weight gradient error and measured memory saving per setting.

    Args:
        model: The network; its convolutions are converted in place (and restored to exact).
        data: Name -> ``(x, y)`` batch.
        keep_probs: Keep probabilities to test.
        series: Label -> ``(axis, spatial_mode)``.
        draws: Independent draws per setting (``>= 2``): the first runs ``model`` as is (for
            the network-level memory with its own activations), the others a copy whose
            ``nn.ReLU`` are :class:`~kfac_tn.nn.MaskReLU` (same gradients; network-level
            memory with mask-saving ReLUs). All draws enter the error statistics.
        seed: Seed of the sampling generator.

    Returns:
        One :class:`ErrorPoint` per data set, series and ``keep_prob``.

    Raises:
        ValueError: If ``draws < 2``.
    """
    if draws < 2:
        raise ValueError(f"Invalid draws: {draws} (need >= 2)")
    model.train()
    gen = torch.Generator().manual_seed(seed)
    convert_sampled(model, 1.0)
    masked = convert_mask_relu(copy.deepcopy(model))
    points = []
    for name, (x, y) in data.items():
        convert_sampled(model, 1.0)
        exact, exact_bytes, exact_network = conv_weight_grads_and_saved_bytes(model, x, y)
        exact_sq = sum(float(g.pow(2).sum()) for g in exact)
        position_terms = sum(position_error_terms(model, x, y))
        for label, (axis, mode) in series.items():
            for p in keep_probs:
                for m in (model, masked):
                    convert_sampled(m, p, axis, spatial_mode=mode, generator=gen)
                errors, saved, network = [], [], []
                layer_errors = [0.0] * len(exact)
                for draw in range(draws):
                    net = model if draw == 0 else masked
                    est, nbytes, net_bytes = conv_weight_grads_and_saved_bytes(net, x, y)
                    errors.append(_relative_error(est, exact))
                    saved.append(nbytes)
                    network.append(net_bytes)
                    for i, (a, b) in enumerate(zip(est, exact)):
                        layer_errors[i] += _relative_error([a], [b]) / draws
                mean = sum(errors) / draws
                std = math.sqrt(sum((e - mean) ** 2 for e in errors) / max(draws - 1, 1))
                rms = math.sqrt(sum(e**2 for e in errors) / draws)
                # exact E‖ĝ - g‖² / ‖g‖²: channel (c_in not contracted): (1-p)/p; position:
                # (1-p)/p Σ_i ‖T_i‖² / ‖g‖²; per-dimension sampling: not derived here
                theory = None
                if axis == "channel":
                    theory = math.sqrt((1 - p) / p)
                elif mode == "position":
                    theory = math.sqrt((1 - p) / p * position_terms / exact_sq)
                memory_saved = 1.0 - sum(saved) / draws / exact_bytes
                network_saved = 1.0 - network[0] / exact_network
                network_saved_mask = 1.0 - sum(network[1:]) / (draws - 1) / exact_network
                points.append(
                    ErrorPoint(
                        name,
                        label,
                        p,
                        mean,
                        std,
                        rms,
                        theory,
                        memory_saved,
                        network_saved,
                        network_saved_mask,
                        draws,
                        layer_errors,
                    )
                )
                log.info("%s %s p=%.2f: error %.4f, saved %.3f", name, label, p, mean, memory_saved)
    convert_sampled(model, 1.0)
    return points


def train_digits(
    variants: dict[str, tuple[float, str, str]],
    epochs: int,
    device: torch.device,
    batch_size: int = 64,
    lr: float = 0.05,
    image_size: int = 16,
    seed: int = 0,
    train_size: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Train the digits CNN with exact or sampled backpropagation.

    Args:
        variants: Label -> ``(keep_prob, axis, spatial_mode)`` (``keep_prob=1``: exact).
        epochs: Number of epochs.
        device: Device to train on.
        batch_size: Mini-batch size.
        lr: SGD learning rate (momentum 0.9).
        image_size: Digits are upsampled to this size.
        seed: Seed for the initialisation, the data order and the sampling.
        train_size: Use only the first ``train_size`` training images (``None``: all 1437).

    Returns:
        Label -> ``{"test_accuracy": [...], "train_loss": [...], "epoch_time_s": [...]}``.
    """
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in load_digits_tensors(image_size))
    x_tr, y_tr = x_tr[:train_size], y_tr[:train_size]
    results = {}
    for label, (keep_prob, axis, mode) in variants.items():
        torch.manual_seed(seed)
        model = DigitsCNN(1, image_size, 10).to(device)
        convert_sampled(model, keep_prob, axis, spatial_mode=mode,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        order_gen = torch.Generator().manual_seed(seed)
        curve: dict[str, list[float]] = {"test_accuracy": [], "train_loss": [], "epoch_time_s": []}
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(y_tr), generator=order_gen).to(device)
            total = torch.zeros((), device=device)
            _sync(device)
            start = time.perf_counter()
            for i in range(0, len(perm), batch_size):
                idx = perm[i : i + batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            _sync(device)
            curve["epoch_time_s"].append(time.perf_counter() - start)
            model.eval()
            with torch.no_grad():
                acc = (model(x_te).argmax(1) == y_te).float().mean()
            curve["test_accuracy"].append(float(acc))
            curve["train_loss"].append(float(total / len(y_tr)))
        results[label] = curve
        log.info("%s: final test accuracy %.4f", label, curve["test_accuracy"][-1])
    return results


def _plot(points: list[ErrorPoint], training: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({p.data for p in points})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        for label in SERIES:
            pts = sorted(
                (p for p in points if p.data == name and p.series == label),
                key=lambda p: p.memory_saved,
            )
            if not pts:
                continue
            bars = ax.errorbar(
                [p.memory_saved for p in pts],
                [p.rel_error_mean for p in pts],
                yerr=[p.rel_error_std for p in pts],
                marker="o",
                capsize=3,
                label=label,
            )
            theory = [(1 - p.keep_prob, p.rel_error_theory) for p in pts if p.rel_error_theory]
            if theory:
                ax.plot(
                    *zip(*sorted(theory)),
                    linestyle="--",
                    color=bars[0].get_color(),
                    label=f"{label}: exact RMS (theory)",
                )
        ax.set_title(f"All-CNN-C (untrained), {name} data")
        ax.set_xlabel("saved conv-input memory (measured)")
        ax.set_ylabel("relative weight-gradient error")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "error_vs_memory.png", dpi=120)
    plt.close(fig)

    if training:
        fig, ax = plt.subplots(figsize=(5, 4))
        for label, curve in training.items():
            acc = curve["test_accuracy"]
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.set_title("Digits CNN, SGD")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=120)
        plt.close(fig)


def _table(points: list[ErrorPoint]) -> str:
    lines = [
        f"{'data':<10} {'series':<18} {'keep_prob':>9} {'conv mem saved':>14} "
        f"{'net saved':>9} {'net saved (mask ReLU)':>21} {'rel error':>17} {'rms':>7} "
        f"{'theory':>7}",
    ]
    for p in points:
        theory = f"{p.rel_error_theory:7.4f}" if p.rel_error_theory is not None else "      -"
        lines.append(
            f"{p.data:<10} {p.series:<18} {p.keep_prob:>9.2f} {p.memory_saved:>14.3f} "
            f"{p.network_memory_saved:>9.3f} {p.network_memory_saved_mask_relu:>21.3f} "
            f"{p.rel_error_mean:>8.4f} ± {p.rel_error_std:.4f} {p.rel_error_rms:7.4f} {theory}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kfac_tn.benchmarks.sampled_backprop", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small batch, few draws and epochs")
    parser.add_argument("--out", type=Path, default=Path("results/sampled_backprop"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="All-CNN-C batch (32)")
    parser.add_argument("--draws", type=int, default=None, help="draws per setting (5)")
    parser.add_argument("--epochs", type=int, default=None, help="digits epochs (15; 0 skips)")
    parser.add_argument(
        "--train-size", type=int, default=None, help="digits training images (all 1437)"
    )
    parser.add_argument("--width", type=float, default=1.0, help="All-CNN-C width multiplier")
    parser.add_argument(
        "--keep-probs", type=float, nargs="+", default=list(KEEP_PROBS), help="keep probabilities"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="digits SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run both experiments and write ``results.json`` and the plots."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch_size or (8 if args.quick else 32)
    draws = args.draws or (2 if args.quick else 5)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 15)

    gen = torch.Generator().manual_seed(args.seed)
    x_syn = torch.randn(batch, 3, 32, 32, generator=gen)
    y_syn = torch.randint(0, 100, (batch,), generator=gen)
    x_dig, y_dig, _, _ = load_digits_tensors(32)
    pick = torch.randperm(len(y_dig), generator=gen)[:batch]
    data = {
        "synthetic": (x_syn.to(device), y_syn.to(device)),
        "digits": (
            x_dig[pick].expand(-1, 3, -1, -1).contiguous().to(device),
            y_dig[pick].to(device),
        ),
    }
    torch.manual_seed(args.seed)
    model = AllCNNC(3, 32, 100, width=args.width, dropout=0.0).to(device)
    start = time.perf_counter()
    points = gradient_error(model, data, args.keep_probs, SERIES, draws, seed=args.seed)
    error_time = time.perf_counter() - start

    variants = {"exact": (1.0, "spatial", "position")}
    variants.update({f"{label} p=0.5": (0.5, *SERIES[label]) for label in SERIES})
    training = (
        train_digits(
            variants, epochs, device, lr=args.lr, seed=args.seed, train_size=args.train_size
        )
        if epochs > 0
        else {}
    )

    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": {
            "device": str(device),
            "batch_size": batch,
            "draws": draws,
            "epochs": epochs,
            "width": args.width,
            "train_size": args.train_size,
            "lr": args.lr,
            "keep_probs": list(args.keep_probs),
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "gradient_error": [asdict(p) for p in points],
        "gradient_error_time_s": error_time,
        "training": training,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(points, training, args.out)

    report = [_table(points)]
    if training:
        report.append("\ndigits CNN, test accuracy per epoch:")
        for label, curve in training.items():
            accs = " ".join(f"{a:.3f}" for a in curve["test_accuracy"])
            secs = sum(curve["epoch_time_s"]) / len(curve["epoch_time_s"])
            report.append(f"  {label:<26} {accs}  ({secs:.2f} s/epoch)")
    print("\n".join(report))  # the benchmark's report goes to stdout (a CLI, not the library)
    print(f"wrote {args.out / 'results.json'} and plots to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m training train|export`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the CNN on a dataset and write a run folder")
    train.add_argument("--dataset", default="digits", help="digits (default), idx:PATH or folder:PATH")
    train.add_argument("--out", type=Path, default=Path("runs/digits"), help="run folder to write")
    train.add_argument("--epochs", type=int, default=None, help="default: 40 for digits, 12 otherwise")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--size", type=int, default=32, help="input side for folder datasets")
    train.add_argument("--color-mode", choices=["L", "RGB"], default="RGB", help="for folder datasets")
    train.add_argument(
        "--reuse", action="store_true", help="do nothing when OUT already holds a finished run"
    )

    export = commands.add_parser("export", help="export a run to ONNX in a model repository and verify it")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--repository", type=Path, default=Path("models"))
    export.add_argument("--name", required=True)
    export.add_argument("--version", type=int, default=None, help="default: the next free version")
    reference = commands.add_parser("reference", help="export a random-weight reference model for benchmarks")
    reference.add_argument("arch", choices=["digits", "resnet18", "resnet50"])
    reference.add_argument("--repository", type=Path, default=Path("benchmarks/models"))
    reference.add_argument("--name", default=None, help="default: the architecture's name")
    return parser


def run_train(args: argparse.Namespace) -> int:
    from training.datasets import load_dataset
    from training.train import METRICS, TrainConfig, train

    metrics_path = args.out / METRICS
    if args.reuse and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        print(f"reusing {args.out}: test accuracy {metrics['test_accuracy']:.4f}")
        return 0
    dataset = load_dataset(args.dataset, seed=args.seed, size=args.size, color_mode=args.color_mode)
    epochs = args.epochs or (40 if dataset.name == "digits" else 12)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    print(
        f"training on {dataset.name}: {len(dataset.train)} train / {len(dataset.val)} val / "
        f"{len(dataset.test)} test images of {dataset.height}x{dataset.width} {dataset.color_mode}, "
        f"{len(dataset.class_names)} classes; {asdict(config)}"
    )
    metrics = train(dataset, config, args.out)
    print(
        f"best epoch {metrics['best_epoch']}: val accuracy {metrics['best_val_accuracy']:.4f}; "
        f"test accuracy {metrics['test_accuracy']:.4f}; wall time {metrics['wall_time_s']:.1f}s; "
        f"run folder {args.out}"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from training.export import export_run

    report = export_run(args.run_dir, args.repository, args.name, args.version)
    print(f"exported {report.path}")
    for check in report.parity:
        print(
            f"  batch {check.batch_size:3d}: max |onnxruntime - torch| = {check.max_abs_diff:.2e}, "
            f"top-1 identical: {check.top1_identical}"
        )
    print(f"  test accuracy: torch {report.torch_test_accuracy:.4f}, onnx {report.onnx_test_accuracy:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):  # the exporter's pass-by-pass INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    from training.datasets import DatasetError
    from training.export import VerificationError

    try:
        if args.command == "reference":
            from training.reference import build_reference

            print(f"reference model: {build_reference(args.arch, args.repository, args.name)}")
            return 0
        return run_train(args) if args.command == "train" else run_export(args)
    except (DatasetError, VerificationError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

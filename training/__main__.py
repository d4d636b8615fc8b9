"""`python -m training train|report|export|ood|reference`: the training half of `convserve`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from serving.core.version import VERSION

DIGITS_EPOCHS = 40
OTHER_EPOCHS = 24


def build_parser(prog: str = "python -m training") -> argparse.ArgumentParser:
    """Argparse only, no torch: `convserve train --help` works without the training extra."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--version", action="version", version=f"convserve {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train the CNN on a dataset and write a run folder with its report",
        description="Also runs as `torchrun --nproc_per_node N -m training train …` (DDP).",
    )
    train.add_argument("--dataset", default="digits", help="digits (default), idx:PATH or folder:PATH")
    train.add_argument("--out", type=Path, default=Path("runs/digits"), help="run folder to write")
    train.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default: {DIGITS_EPOCHS} for digits, {OTHER_EPOCHS} otherwise",
    )
    train.add_argument("--batch-size", type=int, default=64, help="global batch, split over processes")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--size", type=int, default=32, help="input side for folder datasets")
    train.add_argument("--color-mode", choices=["L", "RGB"], default="RGB", help="for folder datasets")
    train.add_argument(
        "--crop-padding",
        type=int,
        default=None,
        help="random crop after zero padding by this many pixels; default: what the dataset allows",
    )
    train.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips; default: on for Fashion-MNIST and image folders",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=10,
        help="stop after this many epochs without a better validation accuracy (0: never)",
    )
    train.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="default 0: smoothing leaves the softmax under-confident unevenly, which export's single "
        "temperature cannot undo (Fashion-MNIST: test ECE 0.0157 after calibration with 0.1, 0.0081 with 0)",
    )
    train.add_argument(
        "--block-convs",
        type=int,
        default=None,
        help="convolutions in each pooling block after the first; default: 1 for digits, 2 otherwise",
    )
    train.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train under bfloat16 autocast (weights stay float32); default: on where the device computes "
        "bfloat16 natively, for inputs larger than 16x16",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue OUT from its last epoch (rerun the same command)"
    )
    train.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    train.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per process; default: 1 for inputs of 16x16 or less, else one per core",
    )
    train.add_argument(
        "--reuse", action="store_true", help="do nothing when OUT already holds a finished run"
    )

    report = commands.add_parser(
        "report", help="write the run report (filters, activations, mistakes, report.html)"
    )
    report.add_argument("run_dir", type=Path)
    report.add_argument("--images", type=Path, nargs="+", default=(), help="your own image files to show")
    report.add_argument("--out", type=Path, default=None, help="default: the run folder")

    export = commands.add_parser("export", help="export a run to ONNX in a model repository and verify it")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--repository", type=Path, default=Path("models"))
    export.add_argument("--name", required=True)
    export.add_argument("--version", type=int, default=None, help="default: the next free version")
    export.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default="fp32",
        help="int8: static quantization calibrated on training images; fp16: for GPUs",
    )
    export.add_argument(
        "--explain",
        choices=["on", "off"],
        default="on",
        help="also write explain.onnx (probabilities, Grad-CAM of every class, block maps), verified "
        "against PyTorch autograd; always float32",
    )
    export.add_argument(
        "--calibrate",
        choices=["on", "off"],
        default="on",
        help="divide the graph's logits by a temperature fitted on the validation split (off: T = 1); "
        "ECE before and after and the abstain threshold are measured either way",
    )
    export.add_argument(
        "--abstain-score",
        choices=["auto", "msp", "energy"],
        default="auto",
        help="the score an answer abstains below: the top probability (msp), the energy score (a second "
        "graph output, `score`), or auto: whichever better separates validation images from uniform "
        "noise and inverted validation images",
    )
    export.add_argument(
        "--dataset",
        default=None,
        help="the run's dataset spec, for runs that did not keep their validation split (val_split.npz)",
    )
    export.add_argument(
        "--speed", action="store_true", help="also time the exported model in ONNX Runtime at batch 1 and 32"
    )
    ood = commands.add_parser(
        "ood",
        help="AUROC and share flagged of the abstain score: runs' test images against noise, inverted "
        "images and other datasets",
    )
    ood.add_argument(
        "runs",
        nargs="+",
        help="RUN_DIR=OTHER[,OTHER...], OTHER a dataset spec whose test images are foreign to the run "
        "(e.g. runs/fashion=digits); RUN_DIR@SPEC=... also gives the run's own dataset, for runs that "
        "kept no validation split",
    )
    ood.add_argument(
        "--out", type=Path, default=Path("benchmarks/OOD.md"), help="also writes .json beside it"
    )
    ood.add_argument(
        "--abstain-score",
        choices=["auto", "msp", "energy"],
        default="auto",
        help="the served score whose threshold `flagged` applies, as export's option of that name",
    )
    reference = commands.add_parser("reference", help="export a random-weight reference model for benchmarks")
    reference.add_argument("arch", choices=["digits", "resnet18", "resnet50"])
    reference.add_argument("--repository", type=Path, default=Path("benchmarks/models"))
    reference.add_argument("--name", default=None, help="default: the architecture's name (+ -RESIZE)")
    reference.add_argument(
        "--resize",
        choices=["stretch", "letterbox", "crop"],
        default="stretch",
        help="the contract's resize mode (the bench compares their decoding cost)",
    )
    return parser


def run_train(args: argparse.Namespace) -> int:
    from training.augment import default_augmentation
    from training.datasets import load_dataset
    from training.distributed import setup, teardown
    from training.train import METRICS, TrainConfig, default_bf16, train

    metrics_path = args.out / METRICS
    if args.reuse and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        print(f"reusing {args.out}: test accuracy {metrics['test_accuracy']:.4f}")
        report = args.out / "report.html"
        if report.exists():
            print(f"run report: {report.resolve()}")
        else:
            print_report(args.out)
        return 0
    context = setup(args.device)
    dataset = load_dataset(args.dataset, seed=args.seed, size=args.size, color_mode=args.color_mode)
    digits = dataset.name == "digits"
    augmentation = default_augmentation(dataset)
    config = TrainConfig(
        epochs=args.epochs or (DIGITS_EPOCHS if digits else OTHER_EPOCHS),
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        crop_padding=augmentation.crop_padding if args.crop_padding is None else args.crop_padding,
        flip=augmentation.flip if args.flip is None else args.flip,
        patience=args.patience,
        label_smoothing=args.label_smoothing,
        block_convs=args.block_convs or (1 if digits else 2),
        bf16=default_bf16(context.device, dataset.height, dataset.width) if args.bf16 is None else args.bf16,
    )
    if context.is_main:
        print(
            f"training on {dataset.name}: {len(dataset.train)} train / {len(dataset.val)} val / "
            f"{len(dataset.test)} test images of {dataset.height}x{dataset.width} {dataset.color_mode}, "
            f"{len(dataset.class_names)} classes; {context.world_size} process(es) on {context.device}; "
            f"{asdict(config)}"
        )
    metrics = train(dataset, config, args.out, context=context, resume=args.resume, threads=args.threads)
    teardown(context)
    if not context.is_main:
        return 0
    print(
        f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}: val accuracy "
        f"{metrics['best_val_accuracy']:.4f}; test accuracy {metrics['test_accuracy']:.4f}; "
        f"training {metrics['train_time_s']:.1f}s, wall time {metrics['wall_time_s']:.1f}s; "
        f"run folder {args.out}"
    )
    print_report(args.out)
    return 0


def print_report(run_dir: Path, out: Path | None = None, images: tuple[Path, ...] = ()) -> None:
    from training.report import write_report

    report = write_report(run_dir, out, images)
    print(f"{len(report.layers)} layers:")
    for row in report.layers:
        shape = "×".join(map(str, row.output_shape))
        print(f"  {row.name:14s} {row.kind:38s} {shape:>12s} {row.parameters:>9,d}")
    print(f"run report: {report.path.resolve()}")


def run_export(args: argparse.Namespace) -> int:
    from training.export import export_run

    report = export_run(
        args.run_dir,
        args.repository,
        args.name,
        args.version,
        precision=args.precision,
        explain=args.explain == "on",
        calibrate_temperature=args.calibrate == "on",
        dataset=args.dataset,
        abstain_score=args.abstain_score,
    )
    print(f"exported {report.path} ({report.precision}, {report.path.stat().st_size:,} bytes)")
    if report.reduced is not None:
        print("  the float32 graph, verified before conversion:")
    for check in report.parity:
        score = f", score relative |diff| = {check.score_rel_diff:.2e}" if check.score_rel_diff else ""
        print(
            f"  batch {check.batch_size:3d}: max |onnxruntime - torch| = {check.max_abs_diff:.2e}, "
            f"top-1 identical: {check.top1_identical}{score}"
        )
    print(f"  test accuracy: torch {report.torch_test_accuracy:.4f}, onnx {report.onnx_test_accuracy:.4f}")
    if report.reduced is not None:
        r = report.reduced
        print(
            f"  {report.precision} vs float32 on {r.images} test images: top-1 agreement {r.agreement:.4f} "
            f"(at least {r.min_agreement}), accuracy {r.accuracy:.4f} vs {r.float_accuracy:.4f} "
            f"({r.accuracy_drop_pp:.2f} points lost, at most {r.max_drop_pp}), "
            f"max |diff| {r.max_abs_diff:.2e}"
        )
    if report.explain is not None:
        print(f"  {report.explain.summary()}")
    if report.calibration is not None:
        print(f"  {report.calibration.summary()}")
    print(f"  preprocessing certificate: fixtures/ {', '.join(report.fixtures)}")
    if args.speed:
        from training.speed import measure

        for timing in measure(report.path):
            print(
                f"  onnxruntime (CPU, in process) batch {timing.batch_size:2d}: {timing.ms_per_batch:.3f} ms "
                f"per batch, {timing.images_per_s:,.0f} images/s"
            )
    return 0


def run_ood(args: argparse.Namespace, argv: list[str] | None) -> int:
    import json
    import shlex

    from training.ood import as_json, markdown, measure

    figures = []
    for spec in args.runs:
        run, _, others = spec.partition("=")
        run_dir, _, own = run.partition("@")
        named = {
            other.split(":")[-1].rstrip("/").split("/")[-1]: other for other in others.split(",") if other
        }
        figures += measure(Path(run_dir), named, own or None, args.abstain_score)
    command = "python -m training " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(figures, command))
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "figures": as_json(figures)}, indent=2)
    )
    print(markdown(figures, command))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Runs a parsed command (`convserve` parses with its own parser, then calls this)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):  # the exporter's pass-by-pass INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from training.datasets import DatasetError
    from training.export import VerificationError
    from training.train import ResumeError

    try:
        if args.command == "reference":
            from training.reference import build_reference

            path = build_reference(args.arch, args.repository, args.name, resize=args.resize)
            print(f"reference model: {path}")
            return 0
        if args.command == "ood":
            return run_ood(args, argv)
        if args.command == "report":
            print_report(args.run_dir, args.out, tuple(args.images))
            return 0
        return run_train(args) if args.command == "train" else run_export(args)
    except (DatasetError, VerificationError, ResumeError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`convserve`: the one command, training's and serving's subcommands under one name.

Serving never imports torch, and the serving images hold no `training` package at all: this module
names the training commands itself and imports `training` only when one of them runs. Without the
training extra such a command says so in one line and exits 2. `python -m serving …` and
`python -m training …` (console script `convserve-train`) stay each half alone.
"""

from __future__ import annotations

import argparse
import sys

from serving.core.version import VERSION

PROG = "convserve"
INSTALL = "pip install 'convserve[train]'"
# training/__main__.py's subcommands and their help, listed by `convserve --help` without importing
# training (tests/test_cli.py fails when the two differ).
TRAINING_COMMANDS = {
    "train": "train the CNN on a dataset and write a run folder with its report",
    "report": "write the run report (filters, activations, mistakes, report.html)",
    "export": "export a run to ONNX in a model repository and verify it",
    "ood": "AUROC and share flagged of the abstain score: runs' test images against noise, inverted "
    "images and other datasets",
    "reference": "export a random-weight reference model for benchmarks",
}
# The `train` extra's top-level modules: an ImportError naming one means the extra is not installed.
TRAINING_MODULES = frozenset(
    {"torch", "onnx", "onnxscript", "onnxruntime", "sklearn", "matplotlib", "PIL", "tqdm"}
)


def build_parser() -> argparse.ArgumentParser:
    """Lists every command; it parses the serving ones (main hands training's to their own parser)."""
    from serving.__main__ import add_commands

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a CNN image classifier, export it to ONNX and serve it. The training commands "
        f"({', '.join(TRAINING_COMMANDS)}) need the training extra: {INSTALL}",
    )
    parser.add_argument("--version", action="version", version=f"convserve {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in TRAINING_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    add_commands(commands)
    return parser


def needs_training_extra(command: str, error: ImportError) -> int:
    reason = next(iter(str(error).splitlines()), "") or type(error).__name__
    print(f"{PROG} {command} needs the training extra: {INSTALL} ({reason})", file=sys.stderr)
    return 2


def is_missing_extra(error: ImportError) -> bool:
    """A module of the extra is absent (or refuses to import: a bare ImportError names no module), not
    a broken import inside training, which keeps its traceback."""
    return error.name is None or error.name.partition(".")[0] in TRAINING_MODULES


def run_training(argv: list[str]) -> int:
    command = argv[0]
    try:
        from training import __main__ as training_cli
    except ImportError as error:  # a serving-only install (the serving images have no training/)
        return needs_training_extra(command, error)
    args = training_cli.build_parser(PROG).parse_args(argv)  # argparse only: --help needs no torch
    try:
        return training_cli.run(args, argv)
    except ImportError as error:  # the commands import torch, onnx, … first, before any work
        if not is_missing_extra(error):
            raise
        return needs_training_extra(command, error)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        return run_training(argv)
    from serving.__main__ import run

    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

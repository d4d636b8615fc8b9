"""`python -m serving serve|classify|explain|health|score|bench|inspect`: the serving half of `convserve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

# gRPC core logs through absl at INFO, one line for every failed TLS handshake: anyone who can open a
# connection could fill the log. It reads GRPC_VERBOSITY once, when grpc is imported, hence here,
# first. ERROR keeps core's errors; set GRPC_VERBOSITY=INFO (or DEBUG) to see the handshakes again.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from serving.client import DEFAULT_SERVER, add_connection_arguments, connection_from_args
from serving.core.version import VERSION

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT (env CONVSERVE_SERVER)")
    parser.add_argument("--model", default="", help="model name (default: the server's only model)")
    parser.add_argument("--version", type=int, default=0, help="model version (default: newest)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    add_connection_arguments(parser)


def client_command(work: Callable[[], str | tuple[str, int]]) -> int:
    """Runs a command that talks to a server and prints its text: 1 on a gRPC error or when images
    failed, 2 when a file cannot be read."""
    try:
        outcome = work()
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text, failed = (outcome, 0) if isinstance(outcome, str) else outcome
    print(text)
    return 1 if failed else 0


def class_index(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"a class index is 0 or more (and below 2**31), not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--version", action="version", version=f"convserve {VERSION}")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The serving subcommands, here and in `convserve` (serving/cli.py), which adds training's."""
    from serving.config import add_config_arguments

    serve = commands.add_parser("serve", help="serve every model of a repository over gRPC and HTTP")
    add_config_arguments(serve)

    classify = commands.add_parser("classify", help="classify image files through a server")
    classify.add_argument("images", nargs="+")
    add_client_arguments(classify)
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")

    explain = commands.add_parser(
        "explain", help="why the model answers what it does: heat maps and activation maps as PNG files"
    )
    explain.add_argument("images", nargs="+")
    explain.add_argument("--out", required=True, help="folder for the pictures (created)")
    add_client_arguments(explain)
    explain.add_argument(
        "--method",
        action="append",
        choices=("cam", "occlusion"),
        help="repeatable; default: every method the version offers",
    )
    explain.add_argument(
        "--class-index", type=class_index, default=None, help="class to explain (default: top-1)"
    )

    check = commands.add_parser("health", help="exit 0 when the server answers SERVING (for HEALTHCHECK)")
    check.add_argument("--server", default=DEFAULT_SERVER)
    check.add_argument("--timeout", type=float, default=3.0)
    add_connection_arguments(check)

    from serving.tools.score import add_score_arguments

    add_score_arguments(
        commands.add_parser("score", help="score a folder, glob or list of images into a file")
    )
    from serving.tools.bench import add_bench_arguments

    add_bench_arguments(
        commands.add_parser("bench", help="measure the server against in-process ONNX Runtime")
    )
    from serving.inspection import add_inspect_arguments

    add_inspect_arguments(
        commands.add_parser(
            "inspect", help="an ONNX file's inputs, outputs, metadata and a starting model.json"
        )
    )


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from serving.config import ConfigError, config_from_args

        try:
            config = config_from_args(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from serving.logs import configure_logging

        configure_logging(config.log_level, config.log_format)
        if config.workers > 1:
            from serving.workers import run_workers

            return run_workers(config)
        from serving.server import run_server

        return run_server(config)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.command == "inspect":  # a file on disk: no server, no connection
        from serving.inspection import run_inspect

        return run_inspect(args)
    try:
        connection = connection_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "classify":
        from serving.tools.classify import classify_files

        return client_command(
            lambda: classify_files(
                args.images,
                args.server,
                args.model,
                args.version,
                args.top_k,
                args.json,
                args.timeout,
                connection,
            )[0]
        )
    if args.command == "explain":
        from pathlib import Path

        from serving.tools.explain import explain_files

        return client_command(
            lambda: explain_files(
                args.images,
                Path(args.out),
                args.server,
                args.model,
                args.version,
                args.method or (),
                args.class_index,
                args.timeout,
                connection,
            )
        )
    if args.command == "health":
        from serving.client import ClassifierClient

        try:
            with ClassifierClient(
                args.server, timeout=args.timeout, retries=0, connection=connection
            ) as client:
                status = client.health()
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)
            return 1
        print(status)
        return 0 if status == "SERVING" else 1
    if args.command == "score":
        from serving.tools.score import run_score

        return run_score(args)
    from serving.tools.bench import run_bench

    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())

"""Writes the reference pages of the docs site (docs/reference/*.md) from the code they describe.

    python -m scripts.docs_reference [--out DIR]     # `make docs` runs it, then `mkdocs build --strict`

Each page comes from one table the code itself uses, so the page cannot say what the code does not:
the server's flags from `ServerConfig`, the metric families from the collector's own `families`, the
`model.json` fields from the contract's `FIELDS`, the error table from `STATUS_OF` (and
`HTTP_STATUS_OF` once the HTTP edge has one), the CLI's `--help` from its parsers. tests/test_docs.py
regenerates them into a temporary folder and fails, naming the page, when the committed ones differ.
The serving pages need no torch; the training CLI's help needs only its argument parser.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "reference"
COMMAND = "make docs"  # or: python -m scripts.docs_reference
HELP_COLUMNS = "100"  # argparse wraps --help to the terminal's width: fixed, so the page is the same anywhere


def header(source: str) -> str:
    return (
        f"<!-- Generated from {source} by `python -m scripts.docs_reference`; do not edit by hand: "
        f"run `{COMMAND}`. -->\n"
    )


def cell(text: object) -> str:
    """One Markdown table cell: no line breaks, and a `|` cannot end the cell. Python-Markdown keeps a
    `|` inside a code span as it is (an escape there would show), so only the text between is escaped."""
    parts = str(text).replace("\n", " ").split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def table(head: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- the server's flags -------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:  # Optional[X]
        return type_name(args[0]) + " (optional)"
    return {Path: "path", bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def value_range(metadata: list[Any]) -> str:
    """The bounds pydantic checks (`ge`, `gt`, `le`, `lt`, `min_length`, `pattern`), in words."""
    parts = []
    for item in metadata:
        for attribute, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(f"{symbol} {bound:,}" if isinstance(bound, int) else f"{symbol} {bound}")
        if getattr(item, "min_length", None) is not None:
            parts.append(f"at least {item.min_length} character(s)")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts) or "—"


def shown_default(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`"


def config_page() -> str:
    from serving.config import ServerConfig, env_name, flag

    rows = []
    for name, field in ServerConfig.model_fields.items():
        option = f"`{flag(name)}`"
        if field.annotation is bool:
            option += f" / `--no-{flag(name)[2:]}`"
        rows.append(
            (
                option,
                f"`{env_name(name)}`",
                type_name(field.annotation),
                value_range(field.metadata),
                shown_default(field.default),
                field.description or "",
            )
        )
    return (
        header("`ServerConfig` (serving/config.py)") + "\n# Server configuration\n\n"
        "`convserve serve` takes every setting as a flag and as an environment variable; a flag wins "
        "over the variable, the variable over the default. Booleans take `true/false/1/0/yes/no` in "
        "variables and `--x`/`--no-x` as flags. Every value is checked before anything binds: a bad one "
        "is one line naming the flag (or variable) and exit code 2.\n\n"
        + table(("flag", "environment variable", "type", "range", "default", "meaning"), rows)
    )


# --- metrics ------------------------------------------------------------------------------------


def metrics_page() -> str:
    from serving.metrics import Snapshot, families

    rows = []
    # No model, no calls: every family the collector yields, each still with its type and labels.
    for family in families(Snapshot(versions=[], calls=[], pending_bytes=0, budget_bytes=0)):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = ", ".join(family._labelnames) or "—"  # prometheus_client keeps them only here
        rows.append((f"`{name}`", family.type, labels, family.documentation))
    return (
        header("the collector's families (`serving.metrics.families`)") + "\n# Metrics\n\n"
        "What `GET /metrics` on `--metrics-port` serves, in Prometheus's text format. A histogram "
        "`NAME` is served as `NAME_bucket`, `NAME_sum` and `NAME_count`. See the "
        "[metrics guide](../guides/metrics.md) for the labels' values and example queries.\n\n"
        + table(("metric", "type", "labels", "meaning"), rows)
    )


# --- model.json ---------------------------------------------------------------------------------


def json_type(kinds: type | tuple[type, ...]) -> str:
    names = {list: "list", str: "string", int: "integer", float: "number", bool: "boolean"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def literal_values(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(f"`{value}`" for value in typing.get_args(annotation))
    return ""


def contract_default(name: str, field: Any) -> str:
    from serving.core import contract

    if name in contract.REQUIRED:
        return "required"
    if field is None or field.default is MISSING:
        return "—"
    value = field.default
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]`"
    if isinstance(value, float):
        return f"`{value:.17g}`" if name != "scale" else f"`{value:.17g}` (1/255)"
    return f"`{value}`"


def model_json_page() -> str:
    from serving.core import contract

    # The sidecar's fields are flat; the contract holds the image's `Fit` and the rest.
    classes = (contract.Fit, contract.ModelContract)
    hints = {name: hint for cls in classes for name, hint in typing.get_type_hints(cls).items()}
    by_name = {field.name: field for cls in classes for field in fields(cls)}
    rows = []
    for name, kinds in contract.FIELDS.items():
        rows.append(
            (
                f"`{name}`",
                json_type(kinds),
                literal_values(hints.get(name)) or "—",
                contract_default(name, by_name.get(name)),
                contract.FIELD_MEANINGS.get(name, ""),
            )
        )
    return (
        header("the contract's field table (`FIELDS`, `FIELD_MEANINGS`: serving/core/contract.py)")
        + "\n# `model.json` fields\n\n"
        f"The fields of a sidecar `{contract.SIDECAR_NAME}` beside a model's `model.onnx`; a model from "
        f"`training export` carries the same in its `metadata_props` as `{contract.PREFIX}<field>` "
        "(strings: JSON for lists, numbers and booleans). Keys starting with `_` are comments; any other "
        "unknown key is refused when the model loads. See [Models exported elsewhere]"
        "(../guides/models-exported-elsewhere.md) for how they combine and common recipes.\n\n"
        + table(("field", "type", "values", "default", "meaning"), rows)
    )


# --- errors -------------------------------------------------------------------------------------


def http_status(value: Any) -> str:
    code = int(value)
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def errors_page() -> str:
    from serving.protocols import status

    head = ["domain error", "gRPC status", "HTTP status", "when"]
    rows = []
    for error, (code, http) in status.STATUS_OF.items():  # domain error -> (gRPC code, HTTP status)
        row = [f"`{error.__name__}`", f"`{code.name}`", http_status(http)]
        row.append(" ".join((error.__doc__ or "").split()))
        rows.append(row)
    internal = ["anything else", "`INTERNAL`", "500 Internal Server Error"]
    bug = f'a bug: the client gets "{status.INTERNAL_MESSAGE}", the server logs the details'
    rows.append([*internal, bug])
    return (
        header("the error table (`STATUS_OF` in serving/protocols/status.py)") + "\n# Errors\n\n"
        "The data plane raises domain errors (`serving/core/errors.py`); every protocol edge maps them "
        "through this one table. A domain error's message reaches the client; anything else is a bug, "
        "answered with a generic message and logged once (rate-limited) with its details, never a "
        "traceback to the client. Codes the table does not make — `UNAUTHENTICATED` and "
        "`PERMISSION_DENIED` (tokens), `RESOURCE_EXHAUSTED` for a message over `--max-message-mb` — "
        "are listed in the [serve guide](../guides/serve.md).\n\n" + table(head, rows)
    )


# --- the CLI ------------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_section(title: str, parser: argparse.ArgumentParser) -> str:
    return f"## `{title}`\n\n```text\n{parser.format_help().rstrip()}\n```\n"


def cli_page() -> str:
    from serving.cli import PROG, build_parser
    from training.__main__ import build_parser as training_parser

    top = build_parser()
    # convserve lists the training commands and hands them to training's own parser: document that one.
    training = subcommands(training_parser(PROG))
    sections = [help_section(PROG, top)]
    sections += [
        help_section(f"{PROG} {name}", training.get(name, sub)) for name, sub in subcommands(top).items()
    ]
    return (
        header("the CLI's parsers (serving/cli.py, serving/__main__.py, training/__main__.py)")
        + "\n# Command line\n\n"
        "The `--help` of `convserve` and of each of its commands. The training commands (`train`, `report`, "
        "`export`, `ood`, `reference`) need the training extra, `pip install 'convserve[train]'`; the others "
        "never import torch. `python -m training COMMAND` (console script `convserve-train`) and "
        "`python -m serving COMMAND` take the same arguments. The server's flags are described further in "
        "the [configuration reference](config.md).\n\n" + "\n".join(sections)
    )


PAGES: dict[str, Callable[[], str]] = {
    "config.md": config_page,
    "metrics.md": metrics_page,
    "model-json.md": model_json_page,
    "errors.md": errors_page,
    "cli.md": cli_page,
}


def pin_environment() -> None:
    """What would make a page depend on the machine: client defaults read from CONVSERVE_* variables,
    and the terminal's width. Call before importing serving."""
    for name in [name for name in os.environ if name.startswith("CONVSERVE_")]:
        del os.environ[name]
    os.environ["COLUMNS"] = HELP_COLUMNS


def write_pages(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in PAGES.items():
        path = out / name
        path.write_text(build(), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.docs_reference", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write the pages into")
    args = parser.parse_args(argv)
    pin_environment()
    sys.path.insert(0, str(ROOT))
    for path in write_pages(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

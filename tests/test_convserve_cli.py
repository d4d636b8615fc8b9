"""`convserve`, the one command (serving/cli.py): every training and serving command, run as the
installed console script; training imported only when one of its commands runs, and a missing torch
one line and exit code 2; `serve --help` in sections. tests/test_cli.py runs the commands end to end."""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
INSTALL_LINE = re.compile(
    r"^convserve (\w+) needs the training extra: pip install 'convserve\[train\]' \(.+\)$"
)


def run(
    *command: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    # A wide terminal, so that no help line wraps in the middle of what a test looks for.
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


def convserve(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    script = BIN / "convserve"
    assert script.is_file(), f"{script} is missing: run `.venv/bin/pip install -e . --no-deps`"
    return run(script, *args, env=env, cwd=cwd)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, str]:
    """A parser's subcommands and their one-line help."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {choice.dest: choice.help for choice in action._choices_actions}


def serving_commands() -> dict[str, str]:
    from serving.__main__ import build_parser

    return subcommands(build_parser())


def training_commands() -> dict[str, str]:
    from training.__main__ import build_parser

    return subcommands(build_parser())


@pytest.fixture
def without(tmp_path: Path):
    """An environment where the named top-level packages cannot be imported: a folder on PYTHONPATH,
    ahead of the installed ones, holds a package of that name whose import raises."""

    def shim(*packages: str, absent: bool = False) -> dict[str, str]:
        folder = tmp_path / "shim"
        for package in packages:
            (folder / package).mkdir(parents=True)
            error = (
                f"ModuleNotFoundError({f'No module named {package!r}'!r}, name={package!r})"
                if absent
                else f"ImportError({f'{package} is made unimportable by tests/test_cli.py'!r})"
            )
            (folder / package / "__init__.py").write_text(f"raise {error}\n")
        return {"PYTHONPATH": str(folder)}

    return shim


def test_help_lists_every_training_and_serving_command() -> None:
    done = convserve("--help")
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^    (\w+)(?: |$)", done.stdout, re.MULTILINE)
    assert listed == [*training_commands(), *serving_commands()]
    assert {"train", "report", "export", "reference", "serve", "classify", "explain", "health"} <= set(listed)
    assert {"score", "bench", "inspect"} <= set(listed)
    assert "pip install 'convserve[train]'" in done.stdout


def test_the_listed_training_commands_are_the_training_parsers() -> None:
    """convserve names the training commands without importing training: the names and help must be
    training's own."""
    from serving.cli import TRAINING_COMMANDS

    assert training_commands() == TRAINING_COMMANDS
    assert not set(TRAINING_COMMANDS) & set(serving_commands())


def test_version_everywhere_is_the_package_version() -> None:
    expected = f"convserve {metadata.version('convserve')}"
    for command in (
        [BIN / "convserve", "--version"],
        [BIN / "convserve-train", "--version"],
        [sys.executable, "-m", "serving", "--version"],
        [sys.executable, "-m", "training", "--version"],
    ):
        done = run(*command)
        assert (done.returncode, done.stdout.strip()) == (0, expected), (command, done.stderr)


def test_training_and_serving_commands_have_their_own_help_under_convserve() -> None:
    train = convserve("train", "--help")
    assert train.returncode == 0, train.stderr
    assert train.stdout.startswith("usage: convserve train ") and "--dataset DATASET" in train.stdout
    export = convserve("export", "--help")
    assert export.returncode == 0 and "--precision {fp32,fp16,int8}" in export.stdout
    health = convserve("health", "--help")
    assert health.returncode == 0 and health.stdout.startswith("usage: convserve health ")
    # A bad flag is argparse's usual two lines under convserve's name, exit 2.
    bad = convserve("train", "--no-such-flag")
    assert bad.returncode == 2 and bad.stderr.startswith("usage: convserve ")
    assert bad.stderr.splitlines()[-1] == "convserve: error: unrecognized arguments: --no-such-flag"


def test_python_m_serving_and_training_keep_working() -> None:
    serving = run(sys.executable, "-m", "serving", "--help")
    assert serving.returncode == 0 and serving.stdout.startswith("usage: python -m serving ")
    assert re.findall(r"^    (\w+)(?: |$)", serving.stdout, re.MULTILINE) == list(serving_commands())
    training = run(sys.executable, "-m", "training", "train", "--help")
    assert training.returncode == 0 and training.stdout.startswith("usage: python -m training train ")
    alias = run(BIN / "convserve-train", "report", "--help")
    assert alias.returncode == 0 and "run_dir" in alias.stdout


def test_serving_imports_neither_training_nor_torch_to_build_the_cli() -> None:
    code = (
        "import sys\n"
        "from serving.cli import build_parser\n"
        "build_parser().parse_args(['health'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'training', 'torch', 'onnx', 'sklearn'}))\n"
    )
    done = run(sys.executable, "-c", code)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


def test_only_the_cli_imports_training_and_only_when_a_command_runs() -> None:
    for path in sorted((ROOT / "serving").rglob("*.py")):
        tree = ast.parse(path.read_text())
        at_top = {
            alias.name if isinstance(node, ast.Import) else node.module or ""
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [node])
        }
        anywhere = {
            alias.name if isinstance(node, ast.Import) else node.module or ""
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [node])
        }
        roots = {name.split(".")[0] for name in anywhere}
        where = path.relative_to(ROOT)
        assert "torch" not in roots, f"{where} imports torch"
        assert not {name.split(".")[0] for name in at_top} & {"training", "torch"}, where
        if path.name != "cli.py" or path.parent.name != "serving":
            assert "training" not in roots, f"{where} imports training: only serving/cli.py may, lazily"


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--out", "{tmp}/run", "--epochs", "1"],
        ["report", "{tmp}/run"],
        ["export", "{tmp}/run", "--repository", "{tmp}/models", "--name", "digits"],
        ["ood", "{tmp}/run=digits", "--out", "{tmp}/OOD.md"],
        ["reference", "digits", "--repository", "{tmp}/models"],
    ],
    ids=lambda args: args[0],
)
def test_a_training_command_without_torch_is_one_line_and_exit_2(
    args: list[str], without, tmp_path: Path
) -> None:
    env = without("torch")
    assert run(sys.executable, "-c", "import torch", env=env).returncode != 0  # the shim blocks it
    work = tmp_path / "work"
    work.mkdir()
    done = convserve(*(arg.format(tmp=work) for arg in args), env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert INSTALL_LINE.match(line) and line.startswith(f"convserve {args[0]} "), line
    assert list(work.iterdir()) == [], "the command did work before it failed"


def test_without_torch_the_serving_commands_and_every_help_work(without, tmp_path: Path) -> None:
    env = without("torch")
    for args in (["--help"], ["health", "--help"], ["serve", "--help"], ["train", "--help"]):
        done = convserve(*args, env=env)
        assert done.returncode == 0 and "usage: convserve" in done.stdout, (args, done.stderr)
    # A real serving command runs: nothing listens on port 1, so the server is unhealthy (exit 1).
    health = convserve("health", "--server", "127.0.0.1:1", "--timeout", "2", env=env)
    assert health.returncode == 1 and health.stderr.strip() == "unhealthy: UNAVAILABLE", health.stderr


def test_a_serving_only_install_without_the_training_package_says_what_to_install(without) -> None:
    # The serving images hold no training/ at all.
    done = convserve("train", "--help", env=without("training", absent=True))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert INSTALL_LINE.match(line) and "No module named 'training'" in line, line


def test_serve_help_is_grouped_and_shows_the_choices() -> None:
    from serving.config import HELP_GROUPS, OTHER_GROUP, ServerConfig, flag, help_groups

    done = convserve("serve", "--help")
    assert done.returncode == 0, done.stderr
    sections = re.findall(r"^(\S[^:\n]*):$", done.stdout, re.MULTILINE)
    titles = list(help_groups())
    assert sections == ["options", *titles]
    assert {"network", "models", "batching", "limits", "security", "metrics and logging"} <= set(titles)
    assert set(titles) <= {*HELP_GROUPS, OTHER_GROUP}
    assert "--model-control {none,poll,explicit}" in done.stdout
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in done.stdout
    for name in ServerConfig.model_fields:  # every flag once, a new one without a group too
        assert len(re.findall(rf"^  {flag(name)}[ ,]", done.stdout, re.MULTILINE)) == 1, name
    network = done.stdout.split("\nnetwork:\n", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^  --port PORT ", network, re.MULTILINE)


def test_every_grouped_name_is_a_field_and_a_field_in_no_group_is_listed_under_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving import config

    grouped = [name for names in config.HELP_GROUPS.values() for name in names]
    assert len(grouped) == len(set(grouped)), "a field is in two groups"
    assert set(grouped) <= set(config.ServerConfig.model_fields), set(grouped) - set(
        config.ServerConfig.model_fields
    )
    monkeypatch.setitem(config.HELP_GROUPS, "network", ("host", "http_port"))  # `port` in no group
    parser = argparse.ArgumentParser(prog="serve")
    config.add_config_arguments(parser)
    other = parser.format_help().split(f"\n{config.OTHER_GROUP}:\n", 1)[1]
    assert re.search(r"^  --port PORT ", other, re.MULTILINE)
    assert sum(len(names) for names in config.help_groups().values()) == len(config.ServerConfig.model_fields)


def test_an_enumerated_flag_is_still_checked_by_the_config_one_line_exit_2(tmp_path: Path) -> None:
    done = convserve("serve", "--models", tmp_path, "--model-control", "sometimes")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: --model-control 'sometimes': "), line
    # Case is the config's business, as before the choices were shown: `info` is INFO.
    from serving.cli import build_parser
    from serving.config import config_from_args

    args = build_parser().parse_args(["serve", "--models", str(tmp_path), "--log-level", "info"])
    assert config_from_args(args).log_level == "INFO"


@pytest.mark.slow
def test_a_training_command_and_a_serving_command_run_through_convserve(tmp_path: Path) -> None:
    built = convserve("reference", "digits", "--repository", tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    model = tmp_path / "digits" / "1" / "model.onnx"
    assert model.is_file() and f"reference model: {model}" in built.stdout
    inspected = convserve("inspect", model)
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    assert inspected.stdout.startswith("inputs:\n  image  tensor(float)  [batch, 1, 8, 8]\n")

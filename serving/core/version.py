"""convserve's version, read once from the installed package's metadata (pyproject.toml's `version`).

Every place that reports it (the Open Inference Protocol's server metadata over gRPC and REST, the
OpenAPI document, `--version`) takes it from here.
"""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("convserve")
except metadata.PackageNotFoundError:  # a checkout that was never installed
    VERSION = "0+unknown"

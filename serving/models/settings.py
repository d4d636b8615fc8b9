"""Per-model settings: `MODELS/<name>/config.json`, where Triton keeps `config.pbtxt`.

Every key is optional; a key left out takes the server's flag. Unknown keys and bad values are
refused with a message naming the file and the key (`SettingsError`), and the registry makes that
model's versions UNAVAILABLE with that message as the reason: one bad file never stops the server.

    {"max_batch_size": 16, "max_delay_ms": 5, "max_queue_size": 512, "instances": 2,
     "device": "cpu", "version_policy": {"latest": 2}, "warm_up_batch_sizes": [1, 8, 16]}

`version_policy` is Triton's: `"all"` (the default here: every version on disk, as convserve always
served), `{"latest": N}` (the N highest-numbered versions) or `{"specific": [1, 3]}`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.core import defaults
from serving.core.batch_settings import BatchingConfig
from serving.core.runtime import RuntimeOptions

SETTINGS_FILE = "config.json"


class SettingsError(ValueError):
    """config.json cannot be used; the message names the file and the key."""


class Latest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    latest: int = Field(ge=1)


class Specific(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    specific: list[int] = Field(min_length=1)


VersionPolicy = Literal["all"] | Latest | Specific


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_delay_ms: float | None = Field(None, ge=0, le=10_000)
    max_queue_size: int | None = Field(None, ge=1)
    instances: int | None = Field(None, ge=1, le=64)
    device: str | None = Field(None, pattern=defaults.DEVICE_PATTERN)
    version_policy: VersionPolicy = "all"
    warm_up_batch_sizes: list[int] | None = Field(None, min_length=1)

    @field_validator("version_policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> object:
        """One message for every wrong shape, not one per member of the union."""
        if value == "all" or isinstance(value, Latest | Specific):
            return value
        if isinstance(value, dict) and len(value) == 1:
            (key, arg), positive = next(iter(value.items())), lambda n: type(n) is int and n >= 1
            if key == "latest" and positive(arg):
                return Latest(latest=arg)
            if key == "specific" and isinstance(arg, list) and arg and all(positive(v) for v in arg):
                return Specific(specific=arg)
        raise ValueError(
            'must be "all", {"latest": N} with N >= 1, or {"specific": [versions]}, '
            f"got {json.dumps(value)[:80]}"
        )

    def select(self, versions: Iterable[int]) -> set[int]:
        """The versions this policy serves, of those given."""
        available = set(versions)
        policy = self.version_policy
        if isinstance(policy, Latest):
            return set(sorted(available)[-policy.latest :])
        if isinstance(policy, Specific):
            return available & set(policy.specific)
        return available


@dataclass(frozen=True)
class LoadOptions:
    """What one version is loaded with: the server's flags, overridden by its model's config.json."""

    runtime: RuntimeOptions
    batching: BatchingConfig
    warm_up_sizes: tuple[int, ...] | None = None  # None: every size a batch can take (ServedModel.warm_up)


def resolve(settings: ModelSettings, defaults: LoadOptions, where: str = SETTINGS_FILE) -> LoadOptions:
    """The load options of a model: the defaults, overridden key by key; checked as a whole."""
    batching = defaults.batching
    size = batching.max_batch_size if settings.max_batch_size is None else settings.max_batch_size
    queue = batching.max_queue_rows if settings.max_queue_size is None else settings.max_queue_size
    delay_s = batching.max_delay_s if settings.max_delay_ms is None else settings.max_delay_ms / 1000
    if queue < size:
        raise SettingsError(f"{where}: max_queue_size ({queue}) must be at least max_batch_size ({size})")
    if (settings.max_batch_size, settings.max_delay_ms, settings.max_queue_size) != (None, None, None):
        batching = dataclasses.replace(
            batching, max_batch_size=size, max_delay_s=delay_s, max_queue_rows=queue
        )
    runtime = defaults.runtime
    if settings.instances is not None:
        runtime = dataclasses.replace(runtime, instances=settings.instances)
    if settings.device is not None:
        runtime = dataclasses.replace(runtime, device=settings.device)
    sizes = defaults.warm_up_sizes
    if settings.warm_up_batch_sizes is not None:
        too_big = [s for s in settings.warm_up_batch_sizes if not 1 <= s <= batching.max_batch_size]
        if too_big:
            raise SettingsError(
                f"{where}: warm_up_batch_sizes: {too_big} not within 1…max_batch_size "
                f"({batching.max_batch_size})"
            )
        sizes = tuple(sorted(set(settings.warm_up_batch_sizes)))
    return LoadOptions(runtime, batching, sizes)


def describe(error: ValidationError, where: str) -> str:
    """One line: the file, then each bad key and what is wrong with it."""
    problems = []
    for item in error.errors(include_url=False):
        # Union members add their own names to the location ("version_policy.Latest.latest"): drop them.
        loc = [str(p) for p in item["loc"] if not (isinstance(p, str) and p[:1].isupper())]
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(loc) or 'the file'}: {message}")
    return f"{where}: " + "; ".join(dict.fromkeys(problems))


def read_settings(model_dir: Path) -> ModelSettings:
    """The model's config.json, or every default when there is none; SettingsError when it is unusable."""
    path = model_dir / SETTINGS_FILE
    if not path.exists():
        return ModelSettings()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    try:
        return ModelSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(describe(exc, str(path))) from None


def load_options(model_dir: Path, defaults: LoadOptions) -> tuple[ModelSettings, LoadOptions]:
    """The model's settings and the load options they give; SettingsError names file and key."""
    settings = read_settings(model_dir)
    return settings, resolve(settings, defaults, str(model_dir / SETTINGS_FILE))

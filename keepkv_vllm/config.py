"""KV compression settings: one source of truth for every knob (CLI, YAML, LLM(), per request).

The same model validates ``--kv-compression``/``--kv-compression-config`` at startup,
``additional_config={"kv_compression": {...}}`` for the offline ``LLM`` API, and the
per-request options in ``SamplingParams.extra_args`` (OpenAI ``vllm_xargs``). Errors name
the bad key in one line. No vLLM import here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keepkv_vllm.methods import METHODS, get_method

#: every value ``--kv-compression`` takes: "none" (stock vLLM) and the registered methods
METHOD_NAMES = ("none", *sorted(METHODS))

#: key of the settings inside vLLM's ``additional_config``
ADDITIONAL_CONFIG_KEY = "kv_compression"
#: per-request keys inside ``SamplingParams.extra_args`` (OpenAI ``vllm_xargs``)
REQUEST_SWITCH_KEY = "kv_compression"
REQUEST_BUDGET_KEY = "kv_budget"
REQUEST_METHOD_KEY = "kv_method"
#: every per-request option (``vllm_xargs``); another ``kv_`` key is refused
REQUEST_KEYS = (REQUEST_SWITCH_KEY, REQUEST_BUDGET_KEY, REQUEST_METHOD_KEY)


def shown(v: Any, limit: int = 40) -> str:
    """repr for error messages, cut short: a 1 MB string must not come back in an HTTP 400."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_budget(v: Any) -> float | int:
    """A budget is a fraction of the request's tokens (float in (0, 1]) or a count (int >= 1)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, got {shown(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"must be finite, got {shown(v)}")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"a token count must be >= 1, got {v}")
        return v
    if not 0.0 < v <= 1.0:
        raise ValueError(f"a fraction must be in (0, 1], got {v}")
    return v


class KVCompressionConfig(BaseModel):
    """Engine-wide settings. ``method="none"`` means stock vLLM, untouched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(default="none", description="none (stock vLLM) or a registered method")
    budget: float | int = Field(
        default=0.3,
        description="slots kept per head after a compression: a fraction of the request's tokens "
        "(0 < x <= 1, float) or a token count (int >= 1)",
    )
    min_budget_tokens: int = Field(default=64, ge=1, description="never compress a request below this")
    trigger: Literal["pressure", "always"] = Field(
        default="pressure",
        description="pressure: only when free KV blocks fall below the watermark or an allocation "
        "would preempt; always: whenever a decoding request exceeds its budget (evaluation)",
    )
    policy: Literal["measured", "memory"] = Field(
        default="measured",
        description="under pressure, measured: compress only where the step costs the engine measures "
        "say it pays (against preempting, or letting a waiting request wait); memory: wherever "
        "memory asks (the same decisions on every machine and run, for comparisons)",
    )
    watermark: float = Field(default=0.05, ge=0.0, lt=1.0, description="free-block fraction that triggers")
    sink: int = Field(default=4, ge=0, le=1024)
    recent: int | None = Field(default=None, ge=0, description="None: max(recent_fraction * budget, window)")
    recent_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    window: int = Field(default=16, ge=1, le=256, description="observation window: last W queries kept")
    window_memory: float = Field(
        default=0.02,
        gt=0.0,
        le=0.5,
        description="share of the KV memory for the query window; it sets how many requests can be "
        "compressible at once (at least one, at most max_num_seqs)",
    )
    method_options: dict[str, Any] = Field(default_factory=dict, description="method-specific knobs")

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> str:
        if not isinstance(v, str) or v not in METHOD_NAMES:
            raise ValueError(f"must be one of {list(METHOD_NAMES)}, got {shown(v)}")
        return v

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> float | int:
        return check_budget(v)

    @model_validator(mode="after")
    def _consistent(self) -> KVCompressionConfig:
        if self.min_budget_tokens < self.sink + self.window + 1:
            raise ValueError(
                f"min_budget_tokens ({self.min_budget_tokens}) must exceed sink + window "
                f"({self.sink} + {self.window})"
            )
        if self.method != "none":
            # Build the method once so bad method_options fail at startup, not mid-serving.
            get_method(self.method, **self.method_kwargs())
        elif self.method_options:
            raise ValueError("method_options given but method is 'none'")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def method_kwargs(self, method: str | None = None) -> dict[str, Any]:
        """Options to build ``method`` (default: the configured one) with.

        ``method_options`` belong to the configured method; another method chosen per request
        gets the shared knobs (sink, recent) and its own defaults.
        """
        shared = {"sink": self.sink, "recent": self.recent, "recent_fraction": self.recent_fraction}
        if method is None or method == self.method:
            return {**shared, **self.method_options}
        return shared


class RequestOptions(BaseModel):
    """Per-request options from ``SamplingParams.extra_args``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    enabled: bool = True
    budget: float | int | None = None
    method: str | None = None  # another registered method for this request (its default options)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> float | int | None:
        return None if v is None else check_budget(v)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or v not in METHODS:
            raise ValueError(f"must be one of {sorted(METHODS)}, got {shown(v)}")
        return v


class ConfigError(ValueError):
    """A bad setting; the message is one line that names the key."""


def _one_line(err: ValidationError, prefix: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{loc}: {msg}")
    return "; ".join(parts)


def parse_config(data: dict[str, Any] | KVCompressionConfig | None) -> KVCompressionConfig:
    """Validate a settings dict; raise ConfigError naming the bad key."""
    if isinstance(data, KVCompressionConfig):
        return data
    if data is None:
        return KVCompressionConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"kv_compression settings must be a mapping, got {type(data).__name__}")
    try:
        return KVCompressionConfig(**data)
    except ValidationError as e:
        raise ConfigError("invalid kv_compression setting " + _one_line(e, "")) from None
    except ValueError as e:  # e.g. a bad method option raised by the method itself
        raise ConfigError(f"invalid kv_compression setting: {e}") from None


def load_config_arg(value: str | dict[str, Any] | None) -> dict[str, Any]:
    """``--kv-compression-config``: a JSON object, a path to a YAML/JSON file, or the mapping
    the CLI already loaded from one of them."""
    if isinstance(value, dict):
        return dict(value)
    if value is None or value == "":
        return {}
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--kv-compression-config is not valid JSON: {e}") from None
    else:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"--kv-compression-config: no such file and not a JSON object: {shown(value)}")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--kv-compression-config {value}: invalid YAML: {e}".replace("\n", " ")
            ) from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ConfigError("--kv-compression-config must be a JSON object / YAML mapping")
    return data


def parse_request_options(extra_args: dict[str, Any] | None) -> RequestOptions:
    """Read the per-request options; raise ConfigError (→ HTTP 400) on bad values.

    Every ``kv_`` key must be one of REQUEST_KEYS (a misspelt option would otherwise do nothing
    while the client believes it is in force); other keys belong to other extensions. Options
    that cannot all hold (a budget or method for a request with compression off) are refused.
    """
    if not extra_args:
        return RequestOptions()
    for key in extra_args:
        if isinstance(key, str) and key.startswith("kv_") and key not in REQUEST_KEYS:
            raise ConfigError(
                f"vllm_xargs.{key[:60]}: unknown kv compression option; "
                f"the options are {', '.join(REQUEST_KEYS)}"
            )
    switch = extra_args.get(REQUEST_SWITCH_KEY, "on")
    if switch == "off":
        moot = [k for k in (REQUEST_BUDGET_KEY, REQUEST_METHOD_KEY) if k in extra_args]
        if moot:
            raise ConfigError(
                f"vllm_xargs.{moot[0]}: has no effect with {REQUEST_SWITCH_KEY} 'off'; send one or the other"
            )
    # strings only: over HTTP vLLM's request model turns a JSON false into 0 before anyone
    # sees it, so a boolean could not mean the same on both paths
    if not (isinstance(switch, str) and switch in ("on", "off")):
        raise ConfigError(f"vllm_xargs.{REQUEST_SWITCH_KEY} must be 'on' or 'off', got {shown(switch)}")
    try:
        return RequestOptions(
            enabled=switch == "on",
            budget=extra_args.get(REQUEST_BUDGET_KEY),
            method=extra_args.get(REQUEST_METHOD_KEY),
        )
    except ValidationError as e:
        err = e.errors()[0]
        key = {"budget": REQUEST_BUDGET_KEY, "method": REQUEST_METHOD_KEY}[str(err["loc"][0])]
        raise ConfigError(f"vllm_xargs.{key}: " + err["msg"].removeprefix("Value error, ")) from None

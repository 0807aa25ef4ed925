"""Read the validated compression settings out of a VllmConfig (every process does this)."""

from __future__ import annotations

from typing import Any

from keepkv_vllm.config import ADDITIONAL_CONFIG_KEY, KVCompressionConfig, parse_config


def config_from_vllm(vllm_config: Any) -> KVCompressionConfig:
    additional = getattr(vllm_config, "additional_config", None) or {}
    return parse_config(additional.get(ADDITIONAL_CONFIG_KEY))

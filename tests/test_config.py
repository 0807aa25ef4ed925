"""Settings and per-request options: exact parsing, and fuzzing for clean errors.

Every bad value must come back as one ConfigError (→ startup error or HTTP 400) whose one
line names the key and stays short, never another exception type.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keepkv_vllm.config import (
    ConfigError,
    KVCompressionConfig,
    RequestOptions,
    load_config_arg,
    parse_config,
    parse_request_options,
)
from keepkv_vllm.methods import METHODS
from keepkv_vllm.policy.planner import target_slots

ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50)
    | st.text(min_size=5000, max_size=6000),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = list(KVCompressionConfig.model_fields)


def test_request_options_parse_exactly():
    assert parse_request_options(None) == RequestOptions()
    assert parse_request_options({"kv_budget": 0.25}).budget == 0.25
    assert parse_request_options({"kv_budget": 512}).budget == 512
    assert parse_request_options({"kv_compression": "off"}).enabled is False
    assert parse_request_options({"kv_compression": "on", "kv_budget": 0.5}).budget == 0.5
    assert parse_request_options({"kv_method": "h2o"}).method == "h2o"
    assert parse_request_options({"unrelated": object()}) == RequestOptions()  # other plugins' keys


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"kv_budget": 0}, "kv_budget"),
        ({"kv_budget": -0.5}, "kv_budget"),
        ({"kv_budget": 1.5}, "kv_budget"),
        ({"kv_budget": math.nan}, "kv_budget"),
        ({"kv_budget": True}, "kv_budget"),
        ({"kv_budget": "x" * 10_000}, "kv_budget"),
        ({"kv_compression": 1}, "kv_compression"),
        ({"kv_compression": "maybe"}, "kv_compression"),
        ({"kv_method": "none"}, "kv_method"),
        ({"kv_method": "KeepKV"}, "kv_method"),
        ({"kv_method": ["keepkv"]}, "kv_method"),
        ({"kv_compression": False}, "kv_compression"),  # 'on'/'off' only: JSON false is 0 over HTTP
        ({"kv_buget": 0.2}, "kv_buget"),  # a misspelt option would silently do nothing
        ({"kv_bogus": 1}, "kv_bogus"),
        ({"kv_compression": "off", "kv_budget": 0.2}, "kv_budget"),  # moot with compression off
        ({"kv_compression": "off", "kv_method": "h2o"}, "kv_method"),
    ],
)
def test_bad_request_options_name_the_key(extra, key):
    with pytest.raises(ConfigError) as err:
        parse_request_options(extra)
    message = str(err.value)
    assert message.startswith(f"vllm_xargs.{key}") and "\n" not in message and len(message) < 300


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["kv_budget", "kv_compression", "kv_method", "kv_other", "other"]),
        ANY_JSON,
        max_size=3,
    )
)
def test_fuzzed_request_options_parse_or_raise_config_error(extra):
    try:
        options = parse_request_options(extra)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 300
        return
    if options.budget is not None:
        b = options.budget
        assert (isinstance(b, int) and b >= 1) or (isinstance(b, float) and 0 < b <= 1)
    assert options.method is None or options.method in METHODS


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS + ["bogus"]), ANY_JSON, max_size=4))
def test_fuzzed_engine_settings_parse_or_raise_config_error(data):
    try:
        config = parse_config(data)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 2000
        bad = [k for k in data if k in message or k == "bogus"]
        assert bad or "settings" in message, message  # names a key (or the whole mapping)
        return
    assert config.min_budget_tokens > config.sink + config.window
    assert target_slots(10_000, config.budget, config.min_budget_tokens) >= config.min_budget_tokens


@pytest.mark.parametrize("value", [[], "not json {", "{bad json", "/no/such/file.yaml", "{" + "x" * 5000])
def test_bad_config_argument_is_one_short_line(value):
    with pytest.raises(ConfigError) as err:
        load_config_arg(value) if isinstance(value, str) else parse_config(value)
    assert "\n" not in str(err.value)


def test_method_options_belong_to_the_configured_method():
    config = parse_config({"method": "keepkv", "method_options": {"similarity_threshold": 0.9}})
    assert config.method_kwargs()["similarity_threshold"] == 0.9
    assert "similarity_threshold" not in config.method_kwargs("h2o")  # per-request kv_method
    assert config.method_kwargs("h2o")["sink"] == config.sink


def test_an_unknown_kv_option_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"^vllm_xargs.kv_buget: .*kv_compression, kv_budget, kv_method$"):
        parse_request_options({"kv_buget": 0.2})
    assert parse_request_options({"other_extension": True}) == RequestOptions()  # not ours: untouched


def test_the_request_guard_reads_the_json_the_client_sent():
    from keepkv_vllm.server.request_guard import refusal

    assert refusal(b'{"prompt": "hi", "vllm_xargs": {"kv_budget": true}}').startswith("vllm_xargs.kv_budget")
    assert refusal(b'{"prompt": "hi", "vllm_xargs": {"kv_budget": 1}}') is None
    assert refusal(b'{"prompt": "kv_ in the text", "vllm_xargs": {"other": true}}') is None
    assert refusal(b"not json") is None  # vLLM answers that itself

"""vLLM general plugin: ``vllm serve MODEL --kv-compression keepkv``.

vLLM runs ``register()`` in every process (API server, engine core, workers), so it is
idempotent and only patches classes. What it adds, all through vLLM's own extension points
or thin wrappers of them:
- ``--kv-compression`` and ``--kv-compression-config`` on every engine CLI (vLLM loads
  general plugins before it builds the parser), so ``--config`` YAML files work too;
- ``EngineArgs.from_cli_args`` copies the flags into ``additional_config["kv_compression"]``;
- ``EngineArgs.create_engine_config`` validates those settings (one-line error naming the
  key) and, when a method is on, selects the keepkv scheduler and worker. This single place
  serves the CLI, YAML and ``LLM(additional_config=...)``. With method "none" nothing is
  changed: stock vLLM;
- per-request options (``vllm_xargs`` → ``SamplingParams.extra_args``) are validated where
  the OpenAI request is turned into sampling params, so a bad value is an HTTP 400;
- a read-only ``GET /v1/kv_compression`` endpoint and counters on ``/metrics``
  (keepkv_vllm.server), and an engine-core utility that reports the scheduler's counters.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from typing import Any

from keepkv_vllm.config import (
    ADDITIONAL_CONFIG_KEY,
    METHOD_NAMES,
    ConfigError,
    load_config_arg,
    parse_config,
    parse_request_options,
)
from keepkv_vllm.vllm_version import check_vllm_version

SCHEDULER_CLS = "keepkv_vllm.engine.scheduler.KeepKVScheduler"
CPU_WORKER_CLS = "keepkv_vllm.engine.cpu.worker.KeepKVCPUWorker"
GPU_WORKER_CLS = "keepkv_vllm.engine.gpu.worker.KeepKVGPUWorker"
GPU_BACKEND = "keepkv_vllm.engine.gpu.flash_attention.KeepKVFlashAttentionBackend"
_PATCHED = "_keepkv_patched"
#: KV cache dtypes compression reads and writes (fp8: per-tensor scales, e4m3 or e5m2 bytes)
KV_CACHE_DTYPES = (None, "auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")
logger = logging.getLogger("vllm.keepkv")


def register() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _PATCHED, False):
        return
    setattr(EngineArgs, _PATCHED, True)
    _patch_cli(EngineArgs)
    _patch_engine_config(EngineArgs)
    _patch_request_validation()
    _patch_engine_core()
    _patch_endpoints()


# -- CLI -----------------------------------------------------------------------------


def _config_arg(value: str) -> dict[str, Any]:
    """argparse type: the settings mapping, loaded once; a bad one fails while parsing, with
    the parser's own one-line error. (They are validated once, with the engine config.)"""
    try:
        return load_config_arg(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(
        "KVCompression", "Merge or evict KV entries of running requests under memory pressure (keepkv-vllm)."
    )
    group.add_argument(
        "--kv-compression",
        choices=METHOD_NAMES,
        default=None,
        help="KV compression method; 'none' (default) is stock vLLM.",
    )
    group.add_argument(
        "--kv-compression-config",
        type=_config_arg,
        default=None,
        help="Settings as a JSON object or a YAML/JSON file, e.g. '{\"budget\": 0.2}'. "
        "Keys: budget, min_budget_tokens, trigger, watermark, sink, recent, recent_fraction, window, "
        "method_options.",
    )
    return parser


def _patch_cli(engine_args: type) -> None:
    stock_add = engine_args.add_cli_args

    @functools.wraps(stock_add)
    def add_cli_args(parser: Any) -> Any:
        parser = stock_add(parser)
        if not any("--kv-compression" in a.option_strings for a in parser._actions):
            add_arguments(parser)
        return parser

    engine_args.add_cli_args = staticmethod(add_cli_args)

    stock_from_cli = engine_args.from_cli_args.__func__

    @functools.wraps(stock_from_cli)
    def from_cli_args(cls: type, args: argparse.Namespace) -> Any:
        merged = merge_cli_settings(args)
        if merged is not None:
            # also on args: API-server children rebuild their engine args from them
            args.additional_config = merged
        engine_args = stock_from_cli(cls, args)
        engine_args._keepkv_from_cli = True  # refusals at config time: one line, no traceback
        return engine_args

    engine_args.from_cli_args = classmethod(from_cli_args)


def merge_cli_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """Fold --kv-compression[-config] into a copy of args.additional_config (None: untouched)."""
    method = getattr(args, "kv_compression", None)
    raw = getattr(args, "kv_compression_config", None)
    if method is None and raw is None:
        return None
    try:
        settings = dict(load_config_arg(raw))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if method is not None:
        settings["method"] = method
    additional = dict(getattr(args, "additional_config", None) or {})
    additional[ADDITIONAL_CONFIG_KEY] = {**(additional.get(ADDITIONAL_CONFIG_KEY) or {}), **settings}
    return additional


def _patch_engine_config(engine_args: type) -> None:
    stock_create = engine_args.create_engine_config

    @functools.wraps(stock_create)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return _create_engine_config(self, *args, **kwargs)
        except ConfigError as e:
            if getattr(self, "_keepkv_from_cli", False):
                raise SystemExit(f"error: {e}") from None
            raise  # the offline API: a ValueError naming the setting

    def _create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        settings = (self.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        config = parse_config(settings)  # ConfigError: one line naming the key
        if config.enabled:
            check_vllm_version()
            # compression frees blocks the moment it decides; an overlapped step could
            # still be writing them, so the engine runs steps one at a time
            self.async_scheduling = False
            select_v1_model_runner()
        vllm_config = stock_create(self, *args, **kwargs)
        if config.enabled:
            _select_engine_classes(vllm_config, config)
        return vllm_config

    engine_args.create_engine_config = create_engine_config


def select_v1_model_runner() -> None:
    """Compression hooks into the V1 model runner (``_update_states``, ``_prepare_inputs``);
    vLLM 0.32 defaults to Model Runner V2 on GPUs, which has neither. Child processes
    (engine core, workers) inherit the variable."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise ConfigError("--kv-compression runs on vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER=1")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "0":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("kv compression: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")


def _select_engine_classes(vllm_config: Any, config: Any) -> None:
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise ConfigError(
            f"--kv-compression {config.method}: supported on the CPU and NVIDIA CUDA engines, "
            f"not on {current_platform.device_name}"
        )
    cache = vllm_config.cache_config
    if cache.cache_dtype not in KV_CACHE_DTYPES:
        supported = ", ".join(KV_CACHE_DTYPES[1:])
        raise ConfigError(f"--kv-compression supports --kv-cache-dtype {supported}; got {cache.cache_dtype}")
    if vllm_config.speculative_config is not None:
        raise ConfigError("--kv-compression cannot be combined with speculative decoding")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        # each stage would compact its own layers, but no pipeline-parallel run was tested
        # here: refuse rather than serve an untested path
        raise ConfigError(
            "--kv-compression does not support pipeline parallelism (--pipeline-parallel-size 1)"
        )
    if (
        getattr(parallel, "decode_context_parallel_size", 1) > 1
        or getattr(parallel, "prefill_context_parallel_size", 1) > 1
    ):
        raise ConfigError(
            "--kv-compression does not support context parallelism (its KV is sharded by position)"
        )
    worker_cls = CPU_WORKER_CLS
    if current_platform.is_cuda():
        worker_cls = GPU_WORKER_CLS
        _select_gpu_backend(vllm_config)
    vllm_config.scheduler_config.scheduler_cls = SCHEDULER_CLS
    vllm_config.scheduler_config.async_scheduling = False
    vllm_config.parallel_config.worker_cls = worker_cls


def _select_gpu_backend(vllm_config: Any) -> None:
    """The vote-weighted FlashAttention-layout backend, as vLLM's CUSTOM attention backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    attention = vllm_config.attention_config
    if attention.backend not in (None, AttentionBackendEnum.CUSTOM):
        raise ConfigError(
            "--kv-compression brings its own attention backend; "
            f"drop --attention-backend {attention.backend.name}"
        )
    register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND)  # the workers register it again
    attention.backend = AttentionBackendEnum.CUSTOM


# -- per request -----------------------------------------------------------------------


def validate_extra_args(extra_args: dict[str, Any] | None) -> None:
    """Raise vLLM's validation error (HTTP 400) for bad per-request options."""
    from vllm.exceptions import VLLMValidationError

    try:
        parse_request_options(extra_args)
    except ConfigError as e:
        raise VLLMValidationError(str(e), parameter="vllm_xargs") from None


def _patch_request_validation() -> None:
    # Where the OpenAI request becomes SamplingParams: before any stream starts, so even
    # stream=true requests get a real 400.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.engine.input_processor import InputProcessor

    for request_cls in (ChatCompletionRequest, CompletionRequest):
        stock = request_cls.to_sampling_params

        def to_sampling_params(self: Any, *args: Any, _stock: Any = stock, **kwargs: Any) -> Any:
            params = _stock(self, *args, **kwargs)
            validate_extra_args(params.extra_args)
            return params

        request_cls.to_sampling_params = functools.wraps(stock)(to_sampling_params)

    # Every other entry (offline LLM, other endpoints) passes through the input processor.
    stock_validate = InputProcessor._validate_params

    @functools.wraps(stock_validate)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = stock_validate(self, params, *args, **kwargs)
        validate_extra_args(getattr(params, "extra_args", None))
        return result

    InputProcessor._validate_params = _validate_params


# -- observability ------------------------------------------------------------------------


def _patch_engine_core() -> None:
    from vllm.v1.engine.core import EngineCore

    from keepkv_vllm.server.stats import engine_core_request_stats, engine_core_stats

    # utility calls (call_utility_async from the API server, call_utility offline)
    EngineCore.kv_compression_stats = engine_core_stats
    EngineCore.kv_compression_request_stats = engine_core_request_stats


def _patch_endpoints() -> None:
    # vLLM loads endpoint plugins only when VLLM_PLUGINS names them. Our endpoint is
    # read-only and part of the feature, so the general plugin adds it itself.
    import vllm.plugins as plugins

    stock_load = plugins.load_endpoint_plugins

    @functools.wraps(stock_load)
    def load_endpoint_plugins(*args: Any, **kwargs: Any) -> list[Any]:
        from keepkv_vllm.server.endpoint import KVCompressionEndpoint

        loaded = list(stock_load(*args, **kwargs))
        if not any(isinstance(p, KVCompressionEndpoint) for p in loaded):
            loaded.append(KVCompressionEndpoint())
        return loaded

    plugins.load_endpoint_plugins = load_endpoint_plugins

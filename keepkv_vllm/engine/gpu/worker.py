"""The GPU worker (set as worker_cls on CUDA): vLLM's GPU worker building the keepkv V1 runner,
with the FlashAttention-layout vote backend as vLLM's ``CUSTOM`` backend. Before the engine
reports ready, a self-check compiles every kernel variant the server can launch and runs them
on this GPU against torch (kernels/gpu_check.py); a failure refuses to serve."""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from keepkv_vllm.engine.model_runner import CompressionRunnerMixin
from keepkv_vllm.engine.worker import CompressionWorkerMixin, refuse_v2_model_runner

logger = logging.getLogger("vllm.keepkv")

FLASH_BACKEND = "keepkv_vllm.engine.gpu.flash_attention.KeepKVFlashAttentionBackend"


class KeepKVGPUModelRunner(CompressionRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU runner with compression (the worker selects V1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kvc_init()


class KeepKVGPUWorker(CompressionWorkerMixin, Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        register_backend(AttentionBackendEnum.CUSTOM, FLASH_BACKEND)
        super().__init__(*args, **kwargs)

    def _make_model_runner(self) -> KeepKVGPUModelRunner:
        refuse_v2_model_runner(self.use_v2_model_runner)
        from keepkv_vllm.engine.gpu.flash_attention import KeepKVFlashAttentionBackend

        runner = KeepKVGPUModelRunner(self.vllm_config, self.device)
        runner.kvc_backend = KeepKVFlashAttentionBackend
        return runner

    def initialize_from_config(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().initialize_from_config(kv_cache_config, *args, **kwargs)
        self._kvc_self_check(kv_cache_config)
        return result

    def _kvc_self_check(self, kv_cache_config: Any) -> None:
        """Every kernel variant this server can launch, compiled and checked on this GPU with the
        served shapes; refuse to serve on a miss (the whole reason, in one block)."""
        from keepkv_vllm.engine.gpu.flash_attention import num_sms
        from keepkv_vllm.kernels.gpu_check import SelfCheckError, ServedShape, self_check
        from keepkv_vllm.kernels.triton_vote_attention import device_shared_memory

        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        config = self.vllm_config
        model = config.model_config
        shape = ServedShape(
            dtype=model.dtype,
            head_size=spec.head_size,
            block_size=spec.block_size,
            num_q_heads=model.get_num_attention_heads(config.parallel_config),
            num_kv_heads=spec.num_kv_heads,
            kv_cache_dtype=self.cache_config.cache_dtype,
            max_num_seqs=config.scheduler_config.max_num_seqs,
            max_model_len=model.max_model_len,
            num_sms=num_sms(self.device),
            shared_memory=device_shared_memory(self.device),
        )
        try:
            report = self_check(shape, device=self.device)
        except SelfCheckError as e:
            raise RuntimeError(f"kv compression GPU self-check failed; refusing to serve.\n{e}") from None
        logger.info("kv compression GPU self-check passed: %s", report)

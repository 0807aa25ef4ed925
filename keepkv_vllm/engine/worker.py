"""Workers that build the keepkv model runner and attention backend (set as worker_cls).

- ``KeepKVCPUWorker``: vLLM's CPU worker; the vote-weighted CPU backend over ``CPU_ATTN``.
- ``KeepKVGPUWorker``: vLLM's GPU worker with the V1 model runner and the FlashAttention-layout
  vote backend (flash_attention.py) as vLLM's ``CUSTOM`` backend; before serving, a
  self-check runs the Triton kernels on this GPU against torch (kernels/gpu_check.py).

Both take compression's side memory (the query window, fixed scratch) out of the KV budget
before vLLM sizes its pool from it (engine/memory.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from keepkv_vllm.engine.model_runner import KeepKVCPUModelRunner, KeepKVGPUModelRunner

logger = logging.getLogger("vllm.keepkv")

CPU_BACKEND = "keepkv_vllm.engine.cpu_attention.VoteCPUAttentionBackend"
FLASH_BACKEND = "keepkv_vllm.engine.flash_attention.KeepKVFlashAttentionBackend"
#: test setting: the CPU worker serves through the GPU backend, its Triton kernels run by
#: Triton's interpreter (TRITON_INTERPRET=1); proves the GPU path's Python in CI
BACKEND_ENV = "KEEPKV_ATTENTION_BACKEND"


class CompressionWorkerMixin:
    """What both workers add: the memory accounting and the counters' RPC targets."""

    def determine_available_memory(self) -> int:
        budget = super().determine_available_memory()  # type: ignore[misc]
        available = self.model_runner.kvc_budget(budget)
        logger.info(
            "kv compression: %.1f MiB of the %.1f MiB KV budget go to the query window and scratch",
            (budget - available) / 2**20,
            budget / 2**20,
        )
        return available

    # collective_rpc targets of the API server (server/stats.py); the runner keeps the figures
    def kv_compression_worker_stats(self) -> dict[str, float]:
        return self.model_runner.kvc_stats()

    def kv_compression_vote_check(self) -> dict[str, int]:
        return self.model_runner.kvc_vote_check()

    def kv_compression_request_stats(self, req_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
        return self.model_runner.kvc_requests.get(req_ids)


def cpu_backend_choice() -> tuple[str, Any]:
    """(class path, class) of the backend the CPU worker serves with."""
    choice = os.environ.get(BACKEND_ENV, "cpu")
    if choice == "cpu":
        from keepkv_vllm.engine.cpu_attention import VoteCPUAttentionBackend

        return CPU_BACKEND, VoteCPUAttentionBackend
    if choice == "flash":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{BACKEND_ENV}=flash on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter)"
            )
        from keepkv_vllm.engine.flash_attention import KeepKVFlashAttentionBackend

        return FLASH_BACKEND, KeepKVFlashAttentionBackend
    raise RuntimeError(f"{BACKEND_ENV} must be 'cpu' or 'flash', got {choice!r}")


class KeepKVCPUWorker(CompressionWorkerMixin, CPUWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        path, self._kvc_backend = cpu_backend_choice()
        # vLLM resolves the CPU backend by this enum's (overridable) class path.
        register_backend(AttentionBackendEnum.CPU_ATTN, path)
        super().__init__(*args, **kwargs)

    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise RuntimeError("kv compression runs on vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        # CPUWorker.init_device builds `CPUModelRunner` by its module-global name; point that
        # name at our subclass for the duration of the call instead of copying the method.
        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = KeepKVCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original
        self.model_runner.kvc_backend = self._kvc_backend


class KeepKVGPUWorker(CompressionWorkerMixin, Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        register_backend(AttentionBackendEnum.CUSTOM, FLASH_BACKEND)
        super().__init__(*args, **kwargs)

    def _make_model_runner(self) -> KeepKVGPUModelRunner:
        # Model Runner V2 has no _update_states/_prepare_inputs, where compression hooks in;
        # the plugin selects V1 (VLLM_USE_V2_MODEL_RUNNER=0) whenever compression is on.
        if self.use_v2_model_runner:
            raise RuntimeError("kv compression runs on vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
        from keepkv_vllm.engine.flash_attention import KeepKVFlashAttentionBackend

        runner = KeepKVGPUModelRunner(self.vllm_config, self.device)
        runner.kvc_backend = KeepKVFlashAttentionBackend
        return runner

    def initialize_from_config(self, kv_cache_config: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().initialize_from_config(kv_cache_config, *args, **kwargs)
        self._kvc_self_check(kv_cache_config)
        return result

    def _kvc_self_check(self, kv_cache_config: Any) -> None:
        """The kernels on this GPU, with the served shapes, against torch; refuse to serve on a miss."""
        from keepkv_vllm.kernels.gpu_check import SelfCheckError, self_check

        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        model = self.vllm_config.model_config
        try:
            report = self_check(
                dtype=model.dtype,
                head_size=spec.head_size,
                block_size=spec.block_size,
                num_q_heads=model.get_num_attention_heads(self.vllm_config.parallel_config),
                num_kv_heads=spec.num_kv_heads,
                device=self.device,
                kv_cache_dtype=self.cache_config.cache_dtype,
            )
        except SelfCheckError as e:
            raise RuntimeError(f"kv compression GPU self-check failed: {e}") from None
        logger.info("kv compression GPU self-check passed: %s", report)

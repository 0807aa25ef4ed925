"""The CPU worker (set as worker_cls on the CPU platform): vLLM's CPU worker, building the
keepkv CPU runner, with the vote-weighted CPU backend registered over ``CPU_ATTN``."""

from __future__ import annotations

import os
from typing import Any

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from keepkv_vllm.engine.model_runner import CompressionRunnerMixin
from keepkv_vllm.engine.worker import CompressionWorkerMixin, refuse_v2_model_runner

CPU_BACKEND = "keepkv_vllm.engine.cpu.attention.VoteCPUAttentionBackend"
FLASH_BACKEND = "keepkv_vllm.engine.gpu.flash_attention.KeepKVFlashAttentionBackend"
#: test setting: the CPU worker serves through the GPU backend, its Triton kernels run by
#: Triton's interpreter (TRITON_INTERPRET=1); proves the GPU path's Python in CI
BACKEND_ENV = "KEEPKV_ATTENTION_BACKEND"


class KeepKVCPUModelRunner(CompressionRunnerMixin, CPUModelRunner):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kvc_init()


def cpu_backend_choice() -> tuple[str, Any]:
    """(class path, class) of the backend the CPU worker serves with."""
    choice = os.environ.get(BACKEND_ENV, "cpu")
    if choice == "cpu":
        from keepkv_vllm.engine.cpu.attention import VoteCPUAttentionBackend

        return CPU_BACKEND, VoteCPUAttentionBackend
    if choice == "flash":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{BACKEND_ENV}=flash on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter)"
            )
        from keepkv_vllm.engine.gpu.flash_attention import KeepKVFlashAttentionBackend

        return FLASH_BACKEND, KeepKVFlashAttentionBackend
    raise RuntimeError(f"{BACKEND_ENV} must be 'cpu' or 'flash', got {choice!r}")


class KeepKVCPUWorker(CompressionWorkerMixin, CPUWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        path, self._kvc_backend = cpu_backend_choice()
        # vLLM resolves the CPU backend by this enum's (overridable) class path.
        register_backend(AttentionBackendEnum.CPU_ATTN, path)
        super().__init__(*args, **kwargs)

    def init_device(self) -> None:
        refuse_v2_model_runner(self.use_v2_model_runner)
        # CPUWorker.init_device builds `CPUModelRunner` by its module-global name; point that
        # name at our subclass for the duration of the call instead of copying the method.
        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = KeepKVCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original
        self.model_runner.kvc_backend = self._kvc_backend

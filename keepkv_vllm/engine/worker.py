"""What both keepkv workers add to vLLM's: the memory accounting and the counters' RPC targets.

The workers themselves live with their platform (engine/cpu/worker.py, engine/gpu/worker.py):
vLLM's CPU worker module replaces torch's CUDA functions with CPU stand-ins when it is
imported, so nothing a GPU process imports may import it. This module imports no vLLM.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.keepkv")


class CompressionWorkerMixin:
    """Mixed in front of a vLLM worker; its model runner carries a ``CompressionRunnerMixin``."""

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


def refuse_v2_model_runner(use_v2_model_runner: bool) -> None:
    # Model Runner V2 has no _update_states/_prepare_inputs, where compression hooks in; the
    # plugin selects V1 (VLLM_USE_V2_MODEL_RUNNER=0) whenever compression is on.
    if use_v2_model_runner:
        raise RuntimeError("kv compression runs on vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")

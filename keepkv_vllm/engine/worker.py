"""Worker that builds the keepkv model runner and attention backend (set as worker_cls)."""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker

from keepkv_vllm.engine.model_runner import KeepKVCPUModelRunner

VOTE_BACKEND = "keepkv_vllm.engine.attention.VoteCPUAttentionBackend"


class KeepKVCPUWorker(CPUWorker):
    def __init__(self, *args: object, **kwargs: object) -> None:
        # vLLM resolves the CPU backend by this enum's (overridable) class path.
        register_backend(AttentionBackendEnum.CPU_ATTN, VOTE_BACKEND)
        super().__init__(*args, **kwargs)

    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise RuntimeError(
                "kv compression supports vLLM's V1 model runner only (VLLM_USE_V2_MODEL_RUNNER=0)"
            )
        # CPUWorker.init_device builds `CPUModelRunner` by its module-global name; point that
        # name at our subclass for the duration of the call instead of copying the method.
        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = KeepKVCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original

    def kv_compression_worker_stats(self) -> dict[str, float]:
        """Cumulative compaction counters (collective_rpc target for the API server)."""
        stats = self.model_runner.kvc_totals.as_dict()
        stats["vote_attention_seconds"] = self.model_runner._kvc.vote_attention_seconds
        return stats

    def kv_compression_vote_check(self) -> dict[str, int]:
        """Scan every stored vote (free blocks included): each must be > 0 and finite.

        A full pass over the vote tensors, so only on request (``?check_votes=1``), never in
        the once-a-second metrics poll.
        """
        votes = list(self.model_runner._kvc.votes.values())
        return {
            "votes_nonpositive": sum(int((v <= 0).sum()) for v in votes),
            "votes_nonfinite": sum(int((~torch.isfinite(v)).sum()) for v in votes),
            "vote_layers": len(votes),
        }

    def kv_compression_request_stats(self, req_ids: list[str] | None = None) -> dict[str, dict[str, int]]:
        """Per-request tokens merged/removed over all layers and heads (collective_rpc target)."""
        return self.model_runner.kvc_requests.get(req_ids)

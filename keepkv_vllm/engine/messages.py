"""What the scheduler tells the workers each step, riding on vLLM's ``SchedulerOutput``.

Plain data, no torch and no vLLM import: the scheduler builds these, every worker (each
tensor-parallel rank, each Ray worker) reads the same ones from the output it is handed.
"""

from __future__ import annotations

from dataclasses import dataclass

#: attribute of vLLM's SchedulerOutput carrying this step's compression orders to the workers
ORDERS_ATTR = "kv_compression_orders"
#: attribute of vLLM's SchedulerOutput carrying this step's new query-window row assignments
ROWS_ATTR = "kv_compression_window_rows"
#: attribute of vLLM's SchedulerOutput saying whether this step's queries enter the window rows
RECORD_ATTR = "kv_compression_record_window"


@dataclass(frozen=True)
class CompressionOrder:
    """Compress one request to ``kv_len_after`` slots per head, this step, before forward."""

    req_id: str
    src_block_ids: tuple[int, ...]  # the request's blocks before compression, covering kv_len_before
    kv_len_before: int
    kv_len_after: int
    frozen_slots: int  # leading slots in blocks shared through the prefix cache: left verbatim
    num_computed_tokens: int  # real tokens in the cache (RoPE positions keep counting these)
    method: str = ""  # registered method name; "" = the engine's configured method
    # its block list once the step is scheduled (a prefix of src + this step's new blocks)
    block_ids: tuple[int, ...] = ()

    @property
    def kv_offset(self) -> int:
        """Tokens removed from the request's cache in total: positions - slots."""
        return self.num_computed_tokens - self.kv_len_after

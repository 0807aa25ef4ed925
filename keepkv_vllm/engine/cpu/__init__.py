"""The CPU platform: vLLM's CPU worker and runner with compression, the vote-weighted CPU
attention backend and its reader of vLLM's packed CPU pages. Imported only in CPU engines
(vLLM's CPU worker module patches torch's CUDA functions when imported)."""

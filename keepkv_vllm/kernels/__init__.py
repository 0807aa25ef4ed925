"""Vote-weighted paged attention kernels, no vLLM import.

CPU: ``cpu_vote_attention`` (C++ compiled on first use, reads vLLM's packed CPU pages).
GPU: ``triton_vote_attention`` (decode, chunked prefill, cache store), checked on the device by
``gpu_check``/``gpu_first_run``, timed by ``bench_vote_attention``, every served variant listed
by ``variants`` and compiled for real GPUs without one by ``cross_compile``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import pytest
import torch

# Triton kernels run in Triton's interpreter on machines without a GPU. The switch must be
# set before anything imports triton (it decides how triton's own library is compiled).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def bind_worker_cpus() -> None:
    """Under pytest-xdist, this worker's vLLM engines compute on their own slice of the CPUs.

    vLLM's CPU worker binds one OpenMP thread per core it is given; left to itself ("auto") it
    binds every engine to the same cores (all but one kept for the scheduler: core 0 alone on
    a 2-core machine), so engines of parallel test files would share them and leave the rest
    idle. An explicit VLLM_CPU_OMP_THREADS_BIND (a test's own, or the user's) still wins.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cpus, index, workers = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    size = max(1, len(cpus) // workers)
    start = (index * size) % len(cpus)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus[start : start + size]))


bind_worker_cpus()

# vLLM's CPU engine stores an fp8 KV cache only on x86 with AVX-512 or AMX (its
# _get_attn_isa refuses the rest); machines of this project's kind come with and without it.
CPU_FP8_KV = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


def pytest_collection_modifyitems(config, items):
    """Files with end-to-end (``slow``) tests run first, so parallel workers finish together on
    the quick ones. Tests marked ``cpu_fp8_kv`` need vLLM's CPU fp8 cache: skipped, saying why,
    where it is absent."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order stays
    if CPU_FP8_KV:
        return
    skip = pytest.mark.skip(reason="vLLM's CPU fp8 KV cache needs x86 AVX-512 or AMX; this CPU has neither")
    for item in items:
        if "cpu_fp8_kv" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu_fp8_kv() -> bool:
    return CPU_FP8_KV


def make_inputs(
    h_kv: int = 2,
    group: int = 2,
    t: int = 96,
    d: int = 16,
    window: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    votes: str = "ones",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random keys/values/votes/queries; keys get a shared direction so some are similar."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(h_kv, 1, d, generator=g, dtype=torch.float64)
    keys = 0.7 * base + torch.randn(h_kv, t, d, generator=g, dtype=torch.float64)
    values = torch.randn(h_kv, t, d, generator=g, dtype=torch.float64)
    if votes == "ones":
        v = torch.ones(h_kv, t, dtype=torch.float64)
    else:  # earlier merges: integer-ish and fractional votes >= 1
        v = 1 + torch.rand(h_kv, t, generator=g, dtype=torch.float64) * 4
    queries = torch.randn(h_kv * group, window, d, generator=g, dtype=torch.float64) * 2
    return (
        keys.to(dtype),
        values.to(dtype),
        v.to(torch.float32 if dtype != torch.float64 else dtype),
        queries.to(dtype),
    )


@pytest.fixture(scope="session")
def needle_factory():
    """Needle prompts over the Paul Graham essays, tokenised once per session.

    ``needle_factory.haystack_ids`` is the whole essay text as token ids (plain prompts).
    """
    from transformers import AutoTokenizer

    from keepkv_vllm.assets import model_dir
    from keepkv_vllm.eval.needle import NeedleFactory

    return NeedleFactory(AutoTokenizer.from_pretrained(str(model_dir())))


@contextlib.contextmanager
def serving(args_by_name: dict[str, list[str]]) -> Iterator[dict]:
    """Real ``vllm serve`` processes, started side by side, by name. A server that fails to
    start raises its error (with the end of its log); every one is stopped afterwards."""
    from keepkv_vllm.bench.server import ServerProcess

    servers = {name: ServerProcess(args) for name, args in args_by_name.items()}
    errors = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except Exception as e:  # raised below, once every start has finished
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for server in servers.values():
            server.stop()

"""The first run on a GPU machine: what CI proves on the CPU, checked on the silicon.

    bash scripts/gpu-first-run.sh OUT_DIR     # torch + triton only: no vLLM, no network

One JSON (``OUT_DIR/gpu-first-run.json``) with, in order of what stops a server first:
1. import hygiene: every plugin module that imports without vLLM leaves torch's CUDA functions
   as they are, and ``torch.accelerator.get_memory_info`` still reports device memory;
2. the kernel grid (``keepkv-gpu-check``: every served shape's variants compiled and checked
   against torch), the 64-bit addressing probe (a layer cache past 2**31 elements) and the
   decode benchmark against torch's SDPA at 4k-32k contexts and batches 1-256;
3. host synchronisations of a compression order on the device, counted by CUDA itself
   (``torch.cuda.set_sync_debug_mode``) and by the CPU tests' counter, side by side;
4. each method's compression order timed on the device (what the cost policy learns online).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

FUNCTIONS = [
    "accelerator.get_memory_info",
    "accelerator.synchronize",
    "accelerator.empty_cache",
    "cuda.Event",
    "cuda.Stream",
    "cuda.current_stream",
    "cuda.stream",
    "Event",
    "Tensor.pin_memory",
    "Tensor.record_stream",
]


def _resolve(name: str) -> Any:
    obj: Any = torch
    for part in name.split("."):
        obj = getattr(obj, part, None)  # (an older torch may lack one: compared as None)
    return obj


def import_hygiene() -> dict[str, Any]:
    import keepkv_vllm

    before = {n: _resolve(n) for n in FUNCTIONS}
    imported, need_vllm = [], []
    names = sorted(m.name for m in pkgutil.walk_packages(keepkv_vllm.__path__, "keepkv_vllm."))
    # the CPU platform's modules import vLLM's CPU worker, which patches torch by design: a GPU
    # engine never imports them (tests/test_import_hygiene.py)
    for module in (n for n in names if not n.startswith("keepkv_vllm.engine.cpu")):
        try:
            importlib.import_module(module)
            imported.append(module)
        except ImportError as e:  # this machine has no vLLM: the engine glue cannot be imported here
            need_vllm.append(f"{module}: {e}")
    changed = [n for n in FUNCTIONS if _resolve(n) is not before[n]]
    total = cuda_total = 0
    if torch.cuda.is_available():  # what vLLM's memory profiling reads, against CUDA's own answer
        cuda_total = torch.cuda.mem_get_info(0)[1]
        memory_info = getattr(torch.accelerator, "get_memory_info", None)
        total = memory_info(0)[1] if memory_info is not None else cuda_total
    return {
        "imported": imported,
        "not_importable_without_vllm": need_vllm,
        "functions_replaced": changed,
        "memory_info_is_the_devices": total == cuda_total,
        "ok": not changed and total == cuda_total,
    }


def _order_problem(device: torch.device) -> tuple[list, Any]:
    """32 bf16 layers of Llama-3.1-8B's attention shape (8 kv heads, d 128, 16 window rows) and
    one order compressing a 1,000-slot request to 300 slots into 19 of its 64 blocks."""
    from keepkv_vllm.attention.kv_layout import FlashPagedKV, allocate_padded_cache
    from keepkv_vllm.engine.messages import CompressionOrder

    g = torch.Generator(device=device).manual_seed(0)
    layers = []
    for _ in range(32):
        paged = FlashPagedKV(allocate_padded_cache(80, 8, 16, 128, torch.bfloat16, device=device))
        paged.key_cache.copy_(torch.randn(paged.key_cache.shape, generator=g, device=device))
        paged.value_cache.copy_(torch.randn(paged.value_cache.shape, generator=g, device=device))
        layers.append((paged, torch.randn(32, 16, 128, generator=g, device=device).to(torch.bfloat16)))
    blocks = tuple(range(0, 64))
    return layers, CompressionOrder("r", blocks, 1000, 300, 0, 1000, block_ids=blocks[:19])


#: CUDA's sync debug mode announces itself with a warning that is not a synchronisation
_NOT_A_SYNC = "debug mode is a prototype"


def order_syncs(device: torch.device) -> dict[str, Any]:
    """One KeepKV compression order over 32 layers on the device, its syncs counted twice."""
    from keepkv_vllm.engine.compaction import compact_request
    from keepkv_vllm.host_sync import count_host_syncs
    from keepkv_vllm.methods import get_method

    layers, order = _order_problem(device)
    method = get_method("keepkv")
    compact_request(layers, order, method)  # warm-up: allocator, kernels
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            start = time.perf_counter()
            compact_request(layers, order, method)
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message).splitlines()[0] for w in caught]
    cuda_syncs = [m for m in messages if "synchroniz" in m.lower() and _NOT_A_SYNC not in m]
    with count_host_syncs() as counted:
        compact_request(layers, order, method)
    return {
        "layers": 32,
        "cuda_sync_warnings": len(cuda_syncs),
        "cuda_sync_messages": cuda_syncs[:10],
        "counted_by_the_cpu_counter": counted.count,
        "order_seconds": seconds,
        "ok": len(cuda_syncs) <= 1,
    }


def compaction_costs(device: torch.device, repeats: int = 5) -> list[dict[str, Any]]:
    """Each method's compression order (32 layers, 1,000 slots to 300) timed on the device: what
    the measured cost policy learns online, as a first figure for this GPU."""
    from keepkv_vllm.engine.compaction import compact_request
    from keepkv_vllm.methods import METHODS, get_method

    layers, order = _order_problem(device)
    rows = []
    for name in sorted(METHODS):
        method = get_method(name)
        compact_request(layers, order, method)  # warm-up
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            compact_request(layers, order, method)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        slot_layers = order.kv_len_before * len(layers)
        rows.append(
            {"method": name, "order_ms": 1e3 * seconds, "us_per_slot_layer": 1e6 * seconds / slot_layers}
        )
        print(
            f"compaction {name}: {1e3 * seconds:.1f} ms per order, "
            f"{1e6 * seconds / slot_layers:.2f} us per slot-layer",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for gpu-first-run.json and gpu-check.json")
    p.add_argument("--smoke", action="store_true", help="tiny grid (also on the CPU interpreter)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__
    start = time.perf_counter()
    try:
        result["import_hygiene"] = import_hygiene()
        print("import hygiene:", json.dumps(result["import_hygiene"]["functions_replaced"]), flush=True)
        from keepkv_vllm.kernels import gpu_check

        check = ["--json", str(args.out / "gpu-check.json"), "--probe-64bit"] + (
            ["--smoke"] if args.smoke else []
        )
        result["gpu_check_exit"] = gpu_check.main(check)
        result["gpu_check"] = json.loads((args.out / "gpu-check.json").read_text())
        if torch.cuda.is_available():
            result["order_syncs"] = order_syncs(torch.device("cuda"))
            print("host syncs of one order:", json.dumps(result["order_syncs"]), flush=True)
            result["compaction_costs"] = compaction_costs(torch.device("cuda"))
    finally:
        result["seconds"] = time.perf_counter() - start
        (args.out / "gpu-first-run.json").write_text(json.dumps(result, indent=1, default=str))
    ok = result["import_hygiene"]["ok"] or not torch.cuda.is_available()
    ok = ok and result["gpu_check_exit"] == 0 and result.get("order_syncs", {"ok": True})["ok"]
    print(f"gpu first run: {'ok' if ok else 'FAILED'} in {result['seconds']:.0f} s -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

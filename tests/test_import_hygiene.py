"""Importing the plugin's GPU-path modules leaves torch's and vLLM's functions as they are.

vLLM's CPU worker module (``vllm.v1.worker.cpu_worker`` → ``cpu/shm.py``) replaces torch's CUDA
functions with CPU stand-ins when it is imported. On a GPU that would make vLLM's memory
profiling read host RAM, ``synchronize`` a no-op and graph capture use a placeholder stream.
So no module a GPU engine imports may import it: each module here is imported in a fresh
process, after vLLM's own GPU worker (which patches ``torch.cuda.set_stream`` itself), and
the functions are compared by identity. The CPU worker module is the positive control.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import keepkv_vllm

pytest.importorskip("vllm")

PROBE = r"""
import importlib, json, sys
import torch
import vllm.utils.torch_utils
import vllm.v1.worker.gpu_worker  # what a GPU engine imports anyway (it patches set_stream itself)

NAMES = [
    "torch.accelerator.get_memory_info", "torch.accelerator.synchronize", "torch.accelerator.empty_cache",
    "torch.cuda.Event", "torch.cuda.Stream", "torch.cuda.current_stream", "torch.cuda.set_stream",
    "torch.cuda.stream", "torch.Event", "torch.Tensor.pin_memory", "torch.Tensor.record_stream",
    "vllm.utils.torch_utils.async_tensor_h2d",
]

def resolve(name):
    obj = sys.modules[name.split(".")[0]]
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj

before = {n: resolve(n) for n in NAMES}
result = {}
for module in sys.argv[1:]:
    importlib.import_module(module)
    if module == "keepkv_vllm.plugin":
        importlib.import_module(module).register()  # what vLLM runs in every process
    result[module] = [n for n in NAMES if resolve(n) is not before[n]]
print(json.dumps(result))
"""


def gpu_path_modules() -> list[str]:
    """Every module of the package but the CPU platform's (engine/cpu/)."""
    names = [m.name for m in pkgutil.walk_packages(keepkv_vllm.__path__, "keepkv_vllm.")]
    return sorted(n for n in names if not n.startswith("keepkv_vllm.engine.cpu"))


def probe(modules: list[str]) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gpu_path_modules_patch_nothing():
    modules = gpu_path_modules()
    assert {
        "keepkv_vllm.plugin",
        "keepkv_vllm.engine.gpu.worker",
        "keepkv_vllm.engine.gpu.flash_attention",
        "keepkv_vllm.engine.model_runner",
        "keepkv_vllm.engine.worker",
        "keepkv_vllm.kernels.triton_vote_attention",
        "keepkv_vllm.kernels.gpu_check",
    } <= set(modules)
    changed = probe(modules)
    # a patch stays in place, so the first module listed with changes is the one that made them
    first = next(((m, names) for m, names in changed.items() if names), None)
    assert first is None, f"importing {first[0]} replaced {', '.join(first[1])}"


def test_the_probe_sees_the_cpu_workers_patches():
    changed = probe(["keepkv_vllm.engine.cpu.worker"])["keepkv_vllm.engine.cpu.worker"]
    patched = {"torch.accelerator.get_memory_info", "torch.cuda.Event", "torch.Tensor.pin_memory"}
    assert patched <= set(changed)

"""The GPU backend's own Python, end to end inside the real vLLM CPU engine.

``KEEPKV_ATTENTION_BACKEND=flash`` makes the CPU worker serve through the FlashAttention-layout
vote backend (engine/gpu/flash_attention.py) on slot-major pages with votes in the padding; its
Triton kernels (store, vote-weighted decode, prefill) run in Triton's interpreter. Only
FlashAttention itself (prefill rows on CUDA) is replaced, by the same Triton kernel without
votes. vLLM's default compiled mode (torch.compile, attention opaque between the compiled
pieces), greedy decoding, every request submitted at once so each engine runs the same
schedule:
- requests compressed every step (``trigger=always``) produce the same tokens as the CPU
  backend's torch vote path;
- a request with compression off produces stock vLLM's tokens;
- on an fp8 cache (``--kv-cache-dtype fp8``) the Triton store quantizes, the vote kernel reads
  fp8 slots with the layer's scales and compaction requantizes merged slots: the same
  compressions as the CPU backend's fp8 path. Tokens are not compared there: vLLM's CPU cache
  write truncates to fp8 where the Triton store (like CUDA's) rounds to nearest.
Small on purpose: the interpreter runs every kernel program in Python, so the engines serve
SmolLM2-135M cut to its first ``LAYERS`` layers (its own trained weights; every engine here
serves the same cut model, and a path comparison needs no more layers than a few).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keepkv_vllm.bench.server import SMOLLM2_KV_BYTES_PER_TOKEN

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("helpers") / "offline_generate.py"
BLOCK = 32  # the CPU kernels need a multiple of 32
LAYERS = 4  # of 30: the interpreted kernels' cost is per layer
POOL_BYTES = 48 * BLOCK * SMOLLM2_KV_BYTES_PER_TOKEN // 30 * LAYERS  # 48 blocks of the cut model
COMPRESSION = {"method": "keepkv", "trigger": "always", "budget": 48, "min_budget_tokens": 40}
AUDIT = {"KEEPKV_AUDIT_HOST_SYNCS": "1"}  # count the plugin's host synchronisations per step and order


def generate(spec: dict, **env: str) -> dict:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KEEPKV_ATTENTION_BACKEND")
    }
    proc = subprocess.run(
        [sys.executable, str(HELPER), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**environment, **env},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def cut_model(tmp_path_factory) -> str:
    """The bundled model's folder with only its first LAYERS decoder layers."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from keepkv_vllm.assets import model_dir

    source, folder = model_dir(), tmp_path_factory.mktemp("smollm2-cut")
    for item in source.iterdir():
        if item.name not in ("config.json", "model.safetensors"):
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS
    (folder / "config.json").write_text(json.dumps(config))
    kept = {f"model.layers.{i}." for i in range(LAYERS)}
    with safe_open(str(source / "model.safetensors"), "pt") as weights:
        tensors = {
            name: weights.get_tensor(name)
            for name in weights.keys()
            if not name.startswith("model.layers.") or any(name.startswith(k) for k in kept)
        }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def spec(needle_factory, cut_model):
    prompts = [needle_factory.make(110 + 7 * i, 0.5, seed).token_ids for i, seed in enumerate((11, 12, 13))]
    return {
        "model": cut_model,
        "prompts": [list(p) for p in prompts],
        "extra_args": [{}, {"kv_budget": 56}, {"kv_compression": "off"}],  # the last one is the witness
        "max_tokens": 8,
        "max_model_len": 256,
        "block_size": BLOCK,
        "kv_cache_memory_bytes": POOL_BYTES,
        "max_num_batched_tokens": 256,
        "enforce_eager": False,
    }


@pytest.fixture(scope="module")
def runs(spec):
    stock = generate({**spec, "enforce_eager": True})
    torch_path = generate({**spec, "kv_compression": COMPRESSION, "enforce_eager": True})
    flash = generate(
        {**spec, "kv_compression": COMPRESSION},
        TRITON_INTERPRET="1",
        KEEPKV_ATTENTION_BACKEND="flash",
        **AUDIT,
    )
    return stock, torch_path, flash


def test_compressed_requests_match_the_torch_vote_path(runs):
    _, torch_path, flash = runs
    counters = flash["stats"]["counters"]
    assert counters["requests_compressed"] == 2 and counters["compressions"] >= 2
    assert flash["stats"]["counters"]["compressions"] == torch_path["stats"]["counters"]["compressions"]
    merged = sum(w["entries_merged"] for w in flash["stats"]["worker"])
    assert merged > 0  # KeepKV merged slots: their votes != 1 were read by the Triton kernel
    assert flash["tokens"][:2] == torch_path["tokens"][:2]


def test_an_uncompressed_request_matches_stock_vllm(runs):
    stock, _, flash = runs
    assert flash["tokens"][2] == stock["tokens"][2]


def test_the_gpu_layout_keeps_votes_and_window_inside_the_budget(runs):
    _, torch_path, flash = runs
    memory = flash["stats"]["worker"][0]
    taken = memory["memory_pool_bytes"] + memory["memory_window_bytes"] + memory["memory_scratch_bytes"]
    assert taken <= POOL_BYTES
    assert memory["memory_vote_bytes"] > 0 and memory["memory_scratch_bytes"] > 0
    assert torch_path["stats"]["worker"][0]["memory_scratch_bytes"] == 0  # the CPU path needs none


def test_the_gpu_path_waits_for_the_device_once_per_order_and_never_in_a_step(runs):
    """What a GPU would stall on (item, tolist, bool(t), nonzero, mask indexing, pageable copies),
    counted in the plugin's own code on the GPU path: the runner's step plan, the backend's
    metadata, cache writes and attention, and each compression order (compressed every step)."""
    _, _, flash = runs
    worker = flash["stats"]["worker"][0]
    assert worker["host_sync_orders"] == worker["orders"] > 0
    assert worker["host_syncs_per_order_max"] == 1  # the order's counters
    assert worker["host_sync_steps"] > 8  # prefill and every decode step
    assert worker["host_syncs_per_step_max"] == 0


@pytest.fixture(scope="module")
def fp8_spec(spec):
    return {**spec, "kv_compression": COMPRESSION, "kv_cache_dtype": "fp8"}


@pytest.fixture(scope="module")
def fp8_flash(fp8_spec):
    # the Triton kernels store and read the fp8 pages themselves: no vLLM CPU fp8 kernel involved
    return generate(fp8_spec, TRITON_INTERPRET="1", KEEPKV_ATTENTION_BACKEND="flash", **AUDIT)


def test_fp8_cache_compresses_and_merges_through_the_gpu_kernels(fp8_flash):
    counters = fp8_flash["stats"]["counters"]
    assert counters["requests_compressed"] == 2 and counters["compressions"] > 0
    worker = fp8_flash["stats"]["worker"][0]
    assert worker["entries_merged"] > 0 and worker["saturated_elements"] == 0
    assert worker["host_syncs_per_order_max"] == 1 and worker["host_syncs_per_step_max"] == 0
    assert [len(t) for t in fp8_flash["tokens"]] == [8, 8, 8]
    # fp8 pages: one byte per element plus float16 log-votes (2 bytes per slot and kv-head)
    assert worker["memory_vote_bytes"] * 64 == worker["memory_pool_bytes"] - worker["memory_vote_bytes"]


@pytest.mark.cpu_fp8_kv
def test_fp8_gpu_kernels_make_the_cpu_paths_compressions(fp8_spec, fp8_flash):
    torch_path = generate({**fp8_spec, "enforce_eager": True})
    assert fp8_flash["stats"]["counters"]["compressions"] == torch_path["stats"]["counters"]["compressions"]

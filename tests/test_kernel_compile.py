"""Every Triton kernel variant a server can launch compiles for real NVIDIA GPUs, here, without one.

Triton's interpreter (every other kernel test) accepts kernels the GPU compiler rejects; this
compiles each distinct variant of ``variants.all_served_launches`` (16-bit and fp32 models, KV
in the model's dtype or fp8 e4m3/e5m2, head sizes 64-256, GQA 1-8, every split count) through
Triton's real pipeline to a cubin, with the Triton a GPU user has: 3.7.1 (vLLM 0.32's torch) for
sm_80, sm_90 and sm_100, 3.8.0 (vLLM 0.33's) for sm_90. ``scripts/fetch-triton.sh`` (run by
scripts/setup.sh) unpacks those wheels; each carries its ptxas and cuobjdump. The resource
table (registers, spills, shared memory) lands in results/ and in docs/kernel.md.
"""

from __future__ import annotations

import json

import pytest
import torch

from keepkv_vllm.kernels.cross_compile import GPU_TRITON, ROOT, SHARED_LIMIT, TRITON_DIR, run_with_triton

pytestmark = pytest.mark.slow

TARGETS = {"3.7.1": [80, 90, 100], "3.8.0": [90]}
RESULTS = ROOT / "results"


@pytest.fixture(scope="module", params=sorted(TARGETS))
def compiled(request) -> dict:
    version = request.param
    if not (TRITON_DIR / version / ".complete").exists():
        pytest.fail(f"triton {version} is not unpacked: run scripts/fetch-triton.sh (scripts/setup.sh does)")
    RESULTS.mkdir(exist_ok=True)
    result = run_with_triton(version, TARGETS[version], RESULTS / f"kernel-compile-triton-{version}.json")
    assert result["triton"] == version  # the wheel's Triton, not this environment's
    return result


def test_the_gpu_users_triton_versions_are_the_ones_compiled():
    assert set(TARGETS) == set(GPU_TRITON)


def test_every_served_variant_compiles_for_each_target(compiled):
    assert compiled["variants"] >= 200  # the span of variants.py: not a hand-picked few
    failed = [
        f"{r['kernel']} ({r['what']}, {r['example']}) sm_{r['arch']}: {r['error']}"
        for r in compiled["rows"]
        if not r["ok"]
    ]
    assert not failed, "\n\n".join(failed[:3])
    assert {r["arch"] for r in compiled["rows"]} == set(compiled["archs"])


def test_every_variant_fits_the_targets_shared_memory(compiled):
    over = [r for r in compiled["rows"] if r["shared_bytes"] > SHARED_LIMIT[r["arch"]]]
    assert not over, [(r["what"], r["example"], r["arch"], r["shared_bytes"]) for r in over[:5]]


def test_decode_does_not_spill_in_its_kv_loop_at_head_sizes_up_to_128_on_sm_90(compiled):
    """Decode's 128-slot tiles (measured fastest on an H200, docs/kernel.md) leave no decode
    variant up to head size 128 spilling inside its KV loop on sm_90, and at most 48 bytes
    outside it (fp8 and head 80/96 split-K variants: stored before the loop, reloaded after it,
    two local accesses per program against the tens of KB of KV it reads)."""
    decode = [
        r
        for r in compiled["rows"]
        if r["arch"] == 90 and r["what"].startswith("decode") and r["kernel"] == "_vote_attention_kernel"
    ]
    small = [r for r in decode if r["constexprs"]["HEAD_DIM"] <= 128]
    assert small and all(r["loop_spills"] == 0 for r in small)
    spilled = [(r["example"], r["what"], r["stack_bytes"]) for r in small if r["stack_bytes"] > 48]
    assert not spilled, spilled
    measured = [r for r in small if r["constexprs"]["HEAD_DIM"] == 128 and r["signature"]["K"] == "*bf16"]
    assert measured and all(r["stack_bytes"] == 0 for r in measured)  # the H200's timed shape


def test_fp8_e4m3_variants_are_not_served_on_sm_80(compiled):
    from keepkv_vllm.kernels.triton_vote_attention import FP8_E4M3_MIN_CAPABILITY

    skipped = {(r["arch"], r["kernel"]) for r in compiled["not_served"]}
    assert all(arch < FP8_E4M3_MIN_CAPABILITY for arch, _ in skipped)
    assert bool(skipped) == (80 in compiled["archs"])


def test_fp32_dots_run_on_tf32_and_16_bit_ones_on_their_own_tensor_cores(compiled):
    from keepkv_vllm.kernels.triton_vote_attention import FP32_DOT

    attention = [r for r in compiled["rows"] if r["kernel"] == "_vote_attention_kernel" and r["arch"] == 90]
    fp32 = [r["tf32"] for r in attention if r["signature"]["Q"] == "*fp32"]
    half = [r["tf32"] for r in attention if r["signature"]["Q"] != "*fp32"]
    assert fp32 and all(fp32) == (FP32_DOT == "tf32") and not any(half)


def test_the_enumerated_variants_are_what_the_self_check_launches(monkeypatch):
    """variants.served_launches and gpu_check.self_check (what a server compiles before serving)
    describe the same launches, so compiling the first proves what the second warms."""
    from keepkv_vllm.kernels import triton_vote_attention
    from keepkv_vllm.kernels.cross_compile import specialize
    from keepkv_vllm.kernels.gpu_check import ServedShape, self_check
    from keepkv_vllm.kernels.variants import served_launches

    launched: set[str] = set()
    stock = triton_vote_attention.Launch.__call__

    def record(launch):
        launched.add(specialize(launch)[0].key)
        stock(launch)

    monkeypatch.setattr(triton_vote_attention.Launch, "__call__", record)
    for shape in (
        ServedShape(torch.float32, 64, 16, 9, 3, max_model_len=1024),
        ServedShape(torch.float16, 32, 32, 4, 4, "fp8_e5m2", max_model_len=512),
    ):
        launched.clear()
        self_check(shape, "cuda" if torch.cuda.is_available() else "cpu")
        enumerated = {specialize(launch)[0].key: what for what, launch in served_launches(shape)}
        # the interpreter stores fp8 through torch (its fp32 -> fp8 rounding is wrong): no launch
        unseen = {"store"} if shape.kv_cache_dtype != "auto" and not torch.cuda.is_available() else set()
        assert launched <= set(enumerated), shape.describe()
        assert {enumerated[k] for k in set(enumerated) - launched} == unseen, shape.describe()


def test_the_resource_table_is_written(compiled):
    path = RESULTS / f"kernel-compile-triton-{compiled['triton']}.json"
    rows = json.loads(path.read_text())["rows"]
    assert all(r["registers"] > 0 for r in rows if r["ok"])

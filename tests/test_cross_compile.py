"""The cross-compile harness itself: tiny kernels through each fetched Triton for sm_90, no GPU.

Each Triton a GPU user has (``scripts/fetch-triton-wheels.sh`` unpacks them into .cache/triton)
compiles this file's kernels in a fresh process (``run_with_triton`` loads this file there as the
variants module, without TRITON_INTERPRET); the specialization mirror is checked here against
Triton's own launcher code.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from keepkv_vllm.kernels.cross_compile_harness import (
    GPU_TRITON,
    TRITON_DIR,
    Variant,
    run_with_triton,
    to_ast_source,
    variant_from_args,
)

_PLAIN = -1.0e30  # a plain Python global: the interpreter reads it, the GPU compiler refuses it
_CONST = tl.constexpr(-1.0e30)


@triton.jit
def _scaled_copy(X, Y, n, scale, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + o, mask=o < n, other=_CONST)
    tl.store(Y + o, x * scale, mask=o < n)


@triton.jit
def _plain_global(X, Y, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(Y + o, tl.load(X + o, mask=o < n, other=_PLAIN), mask=o < n)


@triton.jit
def _dot(A, B, C, PRECISION: tl.constexpr):
    i = tl.arange(0, 16)
    a = tl.load(A + i[:, None] * 16 + i[None, :])
    b = tl.load(B + i[:, None] * 16 + i[None, :])
    tl.store(C + i[:, None] * 16 + i[None, :], tl.dot(a, b, input_precision=PRECISION))


@triton.jit(do_not_specialize=["g"], do_not_specialize_on_alignment=["h"])
def _spec_probe(p, q, a, b, c, d, e, f, g, h, t):
    pass


def variants() -> list[Variant]:
    """Loaded by name in the compiling subprocess (see ``run_with_triton``)."""
    x = torch.empty(1000)
    copy_args = dict(X=x, Y=torch.empty(1000), n=1000, scale=0.5)
    dot_args = dict(A=torch.empty(256), B=torch.empty(256), C=torch.empty(256))
    return [
        variant_from_args(_scaled_copy, copy_args, dict(BLOCK=256), "copy"),
        variant_from_args(_scaled_copy, copy_args, dict(BLOCK=256), "copy 8 warps", num_warps=8),
        Variant(_plain_global, "plain global", {"X": "*fp32", "Y": "*fp32", "n": "i32"}, {"BLOCK": 64}),
        variant_from_args(_dot, dot_args, dict(PRECISION="tf32"), "dot tf32"),
        variant_from_args(_dot, dot_args, dict(PRECISION="ieee"), "dot ieee"),
    ]


FETCHED = sorted(p.name for p in TRITON_DIR.glob("*") if (p / ".complete").exists())


@pytest.fixture(scope="module", params=FETCHED or [None])
def rows(request) -> dict[str, dict]:
    if request.param is None:
        pytest.skip(f"no Triton wheel unpacked in {TRITON_DIR}: run scripts/fetch-triton-wheels.sh")
    found = run_with_triton(request.param, f"{__file__}:variants", [90], fresh=True, timeout=300)
    assert {r["triton"] for r in found} == {request.param}  # the wheel's Triton, not the venv's
    return {r["name"]: r for r in found}


def test_a_kernel_compiles_for_sm_90_and_reports_its_resources(rows):
    copy = rows["copy"]
    assert copy["ok"], copy["error"]
    assert copy["registers"] > 0 and copy["target"] == "sm_90a"
    assert copy["num_warps"] == 4 and copy["num_stages"] == 3  # the launcher's defaults
    assert copy["spill_stores"] == copy["spill_loads"] == copy["stack_bytes"] == 0
    assert rows["copy 8 warps"]["num_warps"] == 8


def test_ptx_based_fields(rows):
    tf32, ieee = rows["dot tf32"], rows["dot ieee"]
    assert tf32["ok"] and ieee["ok"], (tf32["error"], ieee["error"])
    assert tf32["tf32"] and not ieee["tf32"] and not rows["copy"]["tf32"]
    assert tf32["shared_bytes"] > 0  # the dot's operands are staged in shared memory


def test_a_plain_global_is_reported_not_raised(rows):
    failed = rows["plain global"]
    assert not failed["ok"] and failed["registers"] == 0
    assert "Cannot access global variable _PLAIN" in failed["error"]


def test_the_gpu_users_tritons_are_listed():
    assert set(GPU_TRITON) == {"3.7.1", "3.8.0"}


def test_specialization_mirrors_triton_launcher():
    """variant_from_args == Triton's launcher (native_specialize_impl) argument by argument."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    base = torch.empty(64, dtype=torch.bfloat16)
    unaligned = base[1:].view(torch.float8_e4m3fn)[1:]  # 3 bytes in
    args = dict(p=base, q=unaligned, a=1, b=32, c=17, d=2**31, e=0.5, f=True, g=1, h=48, t=0)
    variant = variant_from_args(_spec_probe, args)
    for name, value in args.items():
        kind, spec = native_specialize_impl(CUDABackend, value, False, name != "g", name not in ("g", "h"))
        if kind == "constexpr":
            assert variant.constexprs[name] == spec and name not in variant.signature, name
        else:
            assert variant.signature[name] == kind and (name in variant.attrs) == (spec == "D"), name
    assert variant.signature["q"] == "*fp8e4nv" and variant.constexprs == {"a": 1}


def test_attrs_are_keyed_by_argument_index():
    """Triton ignores name-keyed attrs without a word: they must reach ASTSource as (index,)."""
    variant = variant_from_args(_scaled_copy, dict(X=torch.empty(4), Y=torch.empty(4), n=16, scale=1.0))
    source = to_ast_source(Variant(_scaled_copy, "x", variant.signature, {"BLOCK": 16}, variant.attrs))
    divisible = [["tt.divisibility", 16]]
    assert source.attrs == {(0,): divisible, (1,): divisible, (2,): divisible}
    assert source.signature["BLOCK"] == "constexpr"

"""The cross-compiler itself (keepkv_vllm/kernels/cross_compile.py), on tiny kernels, with this
environment's Triton: it sees what a GPU compiler refuses and what the interpreter lets through.
The served kernels' compile is tests/test_kernel_compile.py (the GPU users' Triton releases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from keepkv_vllm.kernels.cross_compile import (  # noqa: E402
    compile_variant,  # noqa: F401 (compile_here runs it from this module in a clean process)
    loop_spills,
    specialize,
)
from keepkv_vllm.kernels.triton_vote_attention import Launch  # noqa: E402

_PLAIN = 2.0  # a plain Python global: the interpreter takes it, the compiler does not
_CONST = tl.constexpr(2.0)


@triton.jit
def _scale_plain(X, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, tl.load(X + i, mask=i < n) * _PLAIN, mask=i < n)


@triton.jit
def _scale_const(X, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, tl.load(X + i, mask=i < n) * _CONST, mask=i < n)


def launch(kernel, n=7):
    return Launch(kernel, (1,), dict(X=torch.zeros(16), n=n), dict(BLOCK=16))


def compile_here(kernel: str) -> dict:
    """Compile one of this file's kernels for sm_90 in a fresh process without TRITON_INTERPRET,
    as scripts and CI run the cross-compiler: a process that has run Triton's interpreter (other
    test files on this worker) keeps triton.language patched, and the compiler then fails on
    every kernel with an unrelated error."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")
    }
    script = (
        "import dataclasses, importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"_, c = m.compile_variant(m.launch(getattr(m, {kernel!r})), 90)\n"
        "print(json.dumps(dataclasses.asdict(c)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_plain_global_is_reported_as_the_compiler_refuses_it():
    compiled = compile_here("_scale_plain")
    assert not compiled["ok"] and "Cannot access global variable _PLAIN" in compiled["error"]


def test_a_constexpr_global_compiles_and_its_resources_are_read():
    c = compile_here("_scale_const")
    assert c["ok"] and c["registers"] > 0 and c["stack_bytes"] == 0 and c["fits"], c


def test_launches_are_specialized_as_tritons_launcher_does():
    one, _ = specialize(launch(_scale_const, n=1))
    sixteen, _ = specialize(launch(_scale_const, n=16))
    seven, _ = specialize(launch(_scale_const, n=7))
    assert one.signature["n"] == "constexpr" and one.constexprs["n"] == 1  # an int equal to 1
    assert "n" in sixteen.divisible and "n" not in seven.divisible  # divisible by 16
    assert seven.signature["X"] == "*fp32" and "X" in seven.divisible  # a 16-byte aligned pointer
    assert len({one.key, sixteen.key, seven.key}) == 3


def test_spills_are_found_inside_loops_only():
    sass = """
        /*0100*/                   STL [R1], R13 ;
        /*0200*/                   LDL R2, [R1] ;
        /*0300*/               @P2 BRA 0x200 ;
        /*0400*/                   LDL.LU R17, [R1] ;
    """
    assert loop_spills(sass) == 1  # the LDL at 0x200 is in the loop 0x200-0x300; the others are not

"""Compile every served Triton kernel variant for NVIDIA GPUs on a machine without one.

    PYTHONPATH=.cache/triton/3.7.1 python -m keepkv_vllm.kernels.cross_compile --arch 80 90 --json x.json

Triton's interpreter runs a kernel in numpy and accepts what the GPU compiler rejects (a plain
Python global inside a kernel, for one); ``triton.compile`` with a ``GPUTarget`` runs the real
pipeline (TTIR, TTGIR, LLVM, PTX, then the ``ptxas`` inside Triton's wheel) without a GPU. Each
launch of ``variants.all_served_launches`` is specialized exactly as Triton's launcher would
specialize it (Triton's own ``native_specialize_impl``: pointer alignment, integers equal to 1
or divisible by 16), distinct variants are compiled once per target, and ``cuobjdump`` (also
in the wheel) reads each cubin's registers, stack (spills) and shared memory.

Which Triton matters: a GPU user's is the one their vLLM's torch pins, not this machine's
(``scripts/fetch-triton.sh`` unpacks those wheels; put one first on ``PYTHONPATH``).
torch + triton only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Triton version -> where a GPU user gets it (vLLM's CUDA wheel pins torch, torch pins Triton)
GPU_TRITON = {
    "3.7.1": "vLLM 0.32.0 -> torch 2.13.0 -> triton 3.7.1",
    "3.8.0": "vLLM 0.33.0 -> torch 2.14.0 -> triton 3.8.0",
}
#: largest shared memory one block may take, by target (CUDA's per-block opt-in maximum): a
#: kernel that asks more compiles but fails at launch ("out of resource: shared memory")
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
ROOT = Path(__file__).resolve().parents[2]
TRITON_DIR = ROOT / ".cache" / "triton"


@dataclass
class Variant:
    """One compiled kernel: what Triton's launcher would compile for these arguments."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]  # by argument name (incl. integers Triton specialized to 1)
    divisible: list[str]  # arguments Triton knows to be 16-aligned / divisible by 16
    options: dict[str, Any]  # compile options the launch passes (num_warps)

    @property
    def key(self) -> str:
        parts = [self.kernel, self.signature, self.constexprs, self.divisible, self.options]
        return json.dumps(parts, sort_keys=True)


@dataclass
class Compiled:
    kernel: str
    arch: int
    ok: bool
    registers: int = 0
    stack_bytes: int = 0  # spills (local memory the compiler needed for registers)
    loop_spills: int = 0  # spill loads/stores inside a loop (paid per KV tile)
    local_bytes: int = 0
    shared_bytes: int = 0  # dynamic shared memory (Triton's metadata) plus static
    num_warps: int = 0
    tf32: bool = False  # an MMA on TF32 inputs in the PTX
    fits: bool = True  # within the target's shared memory per block
    seconds: float = 0.0
    error: str = ""


@functools.cache
def compiler_view(kernel: Any) -> Any:
    """The kernel as the compiler sees it: under TRITON_INTERPRET=1 ``@triton.jit`` gives an
    interpreted function, which knows no parameters; rebuild the JIT function from its source."""
    if hasattr(kernel, "params"):
        return kernel
    from triton.runtime.jit import JITFunction

    options = ("do_not_specialize", "do_not_specialize_on_alignment")
    return JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if k in options})


def specialize(launch: Any) -> tuple[Variant, tuple[dict, dict, dict]]:
    """The variant a launch compiles to, and (signature, constexprs, attrs) for ASTSource."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    fn = compiler_view(launch.kernel)
    values = {**launch.args, **launch.constexprs}
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    named: dict[str, Any] = {}
    divisible: list[str] = []
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)], named[param.name] = "constexpr", value, value
            continue
        kind, spec = native_specialize_impl(
            CUDABackend,
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = named[param.name] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
            if attrs[(i,)]:
                divisible.append(param.name)
    constants = {k: _plain(v) for k, v in named.items()}
    variant = Variant(fn.__name__, signature, constants, divisible, dict(launch.options))
    return variant, (signature, constexprs, attrs)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the cubin's kernel, as ``cuobjdump`` reports them, and
    LOOP_SPILLS: local-memory loads/stores (spills) inside a loop of its SASS (a spill before or
    after the KV loop costs a couple of accesses per program; one inside it, one per tile)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout)}
    found["LOOP_SPILLS"] = loop_spills(sass)
    return found


def loop_spills(sass: str) -> int:
    """Spill instructions (STL/LDL) between a backward branch's target and the branch."""
    spills, loops = [], []
    for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        at = int(address, 16)
        if re.search(r"\b(STL|LDL)\b", text):
            spills.append(at)
        branch = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < at:
            loops.append((int(branch.group(1), 16), at))
    return sum(any(lo <= at <= hi for lo, hi in loops) for at in spills)


def compile_variant(launch: Any, arch: int) -> tuple[Variant, Compiled]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from keepkv_vllm.kernels.triton_vote_attention import MAX_SHARED_MEMORY

    variant, (signature, constexprs, attrs) = specialize(launch)
    start = time.perf_counter()
    try:
        source = ASTSource(compiler_view(launch.kernel), signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    except Exception as e:  # the compiler's whole message: that is what a user would need
        return variant, Compiled(
            variant.kernel, arch, False, seconds=time.perf_counter() - start, error=str(e)
        )
    usage = resources(kernel.asm["cubin"])
    return variant, Compiled(
        variant.kernel,
        arch,
        True,
        registers=usage.get("REG", 0),
        stack_bytes=usage.get("STACK", 0),
        loop_spills=usage["LOOP_SPILLS"],
        local_bytes=usage.get("LOCAL", 0),
        shared_bytes=kernel.metadata.shared + usage.get("SHARED", 0),
        num_warps=kernel.metadata.num_warps,
        fits=kernel.metadata.shared + usage.get("SHARED", 0) <= SHARED_LIMIT.get(arch, MAX_SHARED_MEMORY),
        tf32=bool(re.search(r"mma[^\n]*tf32", kernel.asm["ptx"])),
        seconds=time.perf_counter() - start,
    )


def distinct_variants(arch: int) -> dict[str, dict[str, Any]]:
    """Every distinct variant of every served launch on ``arch`` (whose shared memory sizes
    decode's KV tile), with the shapes that use it."""
    from keepkv_vllm.kernels.variants import all_served_launches

    found: dict[str, dict[str, Any]] = {}
    for shape, what, launch in all_served_launches(SHARED_LIMIT[arch]):
        variant, _ = specialize(launch)
        entry = found.setdefault(variant.key, {"variant": variant, "launch": launch, "what": what, "uses": 0})
        entry["uses"] += 1
        entry.setdefault("example", shape.describe())
    return found


def run(archs: list[int]) -> dict[str, Any]:
    import triton

    rows, not_served, count = [], [], 0
    for arch in archs:
        variants = distinct_variants(arch)
        count = max(count, len(variants))
        for entry in variants.values():
            if not served_on(entry["variant"], arch):
                not_served.append({"kernel": entry["variant"].kernel, "what": entry["what"], "arch": arch})
                continue
            variant, compiled = compile_variant(entry["launch"], arch)
            rows.append(
                {
                    **asdict(compiled),
                    "what": entry["what"],
                    "example": entry["example"],
                    "uses": entry["uses"],
                    "constexprs": variant.constexprs,
                    "signature": variant.signature,
                }
            )
    result = {"triton": triton.__version__, "archs": archs, "variants": count, "rows": rows}
    return {**result, "not_served": not_served}


def served_on(variant: Variant, arch: int) -> bool:
    """Whether a server on this target can launch the variant (the backend refuses fp8 e4m3 below
    compute capability 8.9: engine/gpu/flash_attention.py)."""
    from keepkv_vllm.kernels.triton_vote_attention import FP8_E4M3_MIN_CAPABILITY

    return "*fp8e4nv" not in variant.signature.values() or arch >= FP8_E4M3_MIN_CAPABILITY


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    failed = [r for r in rows if not (r["ok"] and r["fits"])]
    targets = ", ".join(f"sm_{a}" for a in result["archs"])
    print(f"triton {result['triton']}: {result['variants']} variants x {targets}: {len(failed)} failed")
    print("| kernel | what | example shape | arch | regs | stack (spills) | in loops | shared | tf32 | s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(
            f"| {r['kernel']} | {r['what']} | {r['example']} | {r['arch']} | {r['registers']} | "
            f"{r['stack_bytes']} | {r['loop_spills']} | {r['shared_bytes']} | {r['tf32']} | "
            f"{r['seconds']:.2f} |"
        )
    for r in failed[:5]:
        why = r["error"] or f"{r['shared_bytes']} bytes of shared memory > {SHARED_LIMIT[r['arch']]}"
        print(f"\nFAILED {r['kernel']} ({r['what']}, {r['example']}) on sm_{r['arch']}:\n{why}")


def run_with_triton(version: str, archs: list[int], out: Path, timeout: float = 1800) -> dict[str, Any]:
    """Run the compile in a fresh process with Triton ``version`` (unpacked by
    scripts/fetch-triton.sh) first on the path and its own cache; returns the JSON result."""
    # (a knob that lets plain globals through would hide what a user's compile refuses)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(TRITON_DIR / version), str(ROOT)])
    env["TRITON_CACHE_DIR"] = str(ROOT / ".cache" / "triton-cache" / version)
    cmd = [
        sys.executable,
        "-m",
        "keepkv_vllm.kernels.cross_compile",
        "--arch",
        *map(str, archs),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, 1) or not out.exists():
        raise RuntimeError(
            f"cross-compile with triton {version} died ({proc.returncode}): {proc.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100], help="sm_XX targets")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--summary", type=Path, nargs="+", help="print docs/kernel.md's tables from these JSONs")
    args = p.parse_args(argv)
    if args.summary:
        print(summary([json.loads(path.read_text()) for path in args.summary]))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for real GPUs")
    result = run(args.arch)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print_table(result)
    return 1 if any(not (r["ok"] and r["fits"]) for r in result["rows"]) else 0


def summary(results: list[dict[str, Any]]) -> str:
    """docs/kernel.md's tables from the JSON of one or more runs: totals per Triton and target,
    then registers / stack bytes / shared KB of the main variants at each head size."""
    lines = [
        "| Triton | target | variants | failed | over shared limit | spilling | spills in a loop | max regs |"
    ]
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        for arch in result["archs"]:
            rows = [r for r in result["rows"] if r["arch"] == arch]
            lines.append(
                f"| {result['triton']} | sm_{arch} | {len(rows)} | {sum(not r['ok'] for r in rows)} | "
                f"{sum(not r['fits'] for r in rows)} | {sum(r['stack_bytes'] > 0 for r in rows)} | "
                f"{sum(r['loop_spills'] > 0 for r in rows)} | {max(r['registers'] for r in rows)} |"
            )
    columns = [(res["triton"], arch) for res in results for arch in res["archs"]]
    lines += ["", "| variant | model / KV | head | " + " | ".join(f"{t} sm_{a}" for t, a in columns) + " |"]
    lines.append("|---|---|---:|" + "---:|" * len(columns))
    cells: dict[tuple, dict[tuple, str]] = {}
    for result in results:
        for r in result["rows"]:
            if r["kernel"] != "_vote_attention_kernel" or r["what"] not in (
                "decode, 1 splits",
                "decode, 2 splits",
                "prefill with votes",
            ):
                continue
            dtypes = f"{r['signature']['Q'][1:]} / {r['signature']['K'][1:]}"
            key = (
                r["what"].replace("2 splits", "split-K").replace("1 splits", "one split"),
                dtypes,
                r["constexprs"]["HEAD_DIM"],
            )
            cells.setdefault(key, {})[(result["triton"], r["arch"])] = (
                f"{r['registers']}/{r['stack_bytes']}/{r['shared_bytes'] // 1024}"
            )
    for (what, dtypes, head), by in sorted(cells.items()):
        if dtypes not in ("bf16 / bf16", "bf16 / fp8e4nv", "fp32 / fp32") or head not in (64, 128, 256):
            continue  # the rest: in the JSON (fp16 as bf16, e5m2 as e4m3, heads 80/96 as 128)
        lines.append(f"| {what} | {dtypes} | {head} | " + " | ".join(by.get(c, "-") for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

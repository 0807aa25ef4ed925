"""Compile ``@triton.jit`` kernels for real NVIDIA targets on a machine without a GPU.

    PYTHONPATH=.cache/triton/3.7.1 python -m keepkv_vllm.kernels.cross_compile_harness \\
        --variants MODULE:FUNCTION --arch 80 90 100 --json out.json

``FUNCTION`` returns a list of :class:`Variant` (``MODULE`` may also be a ``path/to/file.py``).
Each variant goes through Triton's real pipeline (TTIR, TTGIR, LLVM IR, PTX, then the ``ptxas``
inside Triton's wheel) for ``GPUTarget("cuda", arch, 32)``, and ``cuobjdump`` (also in the
wheel) reads the cubin's registers, stack and shared memory. A variant that does not compile
is reported with the compiler's whole message, never raised: Triton's interpreter accepts
kernels the GPU compiler rejects (a plain Python global inside a kernel, for one).

Which Triton matters: a GPU user's is the one their vLLM's torch pins (:data:`GPU_TRITON`), not
this machine's. ``scripts/fetch-triton-wheels.sh`` unpacks those wheels into
``.cache/triton/VERSION``; :func:`run_with_triton` runs the CLI with one of them first on the
path, in a fresh process with its own compile cache.

Triton API, checked on 3.7.1, 3.8.0 and 3.9.0 (identical in all three unless said):

- ``ASTSource(fn, signature, constexprs=None, attrs=None)``: ``signature`` maps argument names to
  type strings (``"constexpr"`` entries may be left out); ``constexprs`` is keyed by argument name
  or by ``(index,)``; ``attrs`` must be keyed by ``(index,)`` tuples with values as the backend's
  ``parse_attr("D")`` gives them, ``[["tt.divisibility", 16]]``: **name keys are accepted and
  silently ignored** (the kernel then compiles without the alignment the launcher would give).
- The launcher's specialization (``native_specialize_impl``, C++) is the same in all three: see
  :func:`variant_from_args`.
- Options go in ``triton.compile(src, target=..., options={"num_warps": ..., "num_stages": ...})``;
  defaults 4 warps, 3 stages. 3.9.0 warns once that ``TRITON_DEFAULT_FP_FUSION`` is unset (its
  default will flip to off in 3.10); the CLI pins it to 1, the launcher's default in all three.
- ``triton.knobs.nvidia.dump_ptxas_log`` makes Triton print ``ptxas -v`` (spill stores/loads)
  after a compile; a compile served from Triton's cache prints nothing (``cached`` below).
- sm_100 compiles with all three (``ptxas-blackwell``; 3.7.1 ships CUDA 12.8's ptxas, 3.8.0 and
  3.9.0 CUDA 12.9's), as do sm_103 and sm_120.
- Globals used inside a kernel must be ``X = tl.constexpr(v)``; ``X: tl.constexpr = v`` (an
  annotation only) fails like a plain float with "Cannot access global variable X" in all three.

torch + triton only (no vLLM import).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Triton version -> where a GPU user gets it (vLLM's CUDA wheel pins torch, torch pins Triton)
GPU_TRITON = {
    "3.7.1": "vLLM 0.32 -> torch 2.13.0 -> triton 3.7.1",
    "3.8.0": "vLLM 0.33 / 0.34 -> torch 2.14.0 -> triton 3.8.0",
}
ROOT = Path(__file__).resolve().parents[2]
TRITON_DIR = ROOT / ".cache" / "triton"  # unpacked wheels, one folder per version
TRITON_CACHE = ROOT / ".cache" / "triton-cache"  # Triton's compile cache, one per version
#: what Triton's launcher compiles with when a launch passes no options (CUDAOptions defaults)
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
#: lets a compile accept a plain Python global inside a kernel: never set here
_MASKS_GLOBALS = "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"


@dataclass
class Variant:
    """One launch as the compiler sees it.

    ``signature`` types the runtime arguments ("*bf16", "*fp8e4nv", "*fp8e5", "*i32", "*fp32",
    "i32", "i64", "fp32", ...); ``constexprs`` gives the ``tl.constexpr`` arguments and any
    runtime argument the launcher turned into a constant (an int equal to 1); ``attrs`` names the
    arguments Triton may assume 16-byte aligned (pointers) or divisible by 16 (ints).
    """

    kernel: Any  # a @triton.jit function
    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    attrs: frozenset[str] = frozenset()
    num_warps: int = DEFAULT_NUM_WARPS
    num_stages: int = DEFAULT_NUM_STAGES


@dataclass
class CompiledInfo:
    name: str
    kernel: str
    arch: int
    ok: bool
    triton: str = ""
    registers: int = 0
    stack_bytes: int = 0  # cuobjdump STACK: the frame, spills included
    local_bytes: int = 0  # cuobjdump LOCAL
    spill_stores: int | None = None  # bytes, from ptxas -v (None: served from Triton's cache)
    spill_loads: int | None = None
    shared_bytes: int = 0  # dynamic shared memory Triton launches with (metadata.shared)
    static_shared_bytes: int = 0  # cuobjdump SHARED
    num_warps: int = 0
    num_stages: int = 0
    tf32: bool = False  # an MMA on TF32 operands in the PTX
    target: str = ""  # the PTX .target line, e.g. sm_90a
    seconds: float = 0.0  # triton.compile only
    cached: bool = False
    error: str = ""


def _jit_view(kernel: Any) -> Any:
    """The kernel as the compiler sees it: under TRITON_INTERPRET=1, ``@triton.jit`` gives an
    interpreted function without parameters; rebuild the JIT function from its source."""
    if hasattr(kernel, "params"):
        return kernel
    from triton.runtime.jit import JITFunction

    keep = ("do_not_specialize", "do_not_specialize_on_alignment")
    return JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if k in keep})


def triton_type(value: Any) -> str:
    """Triton's type string for a launch argument (pointer type of a tensor, width of an int)."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        from triton._utils import canonicalize_dtype

        return "*" + canonicalize_dtype(value.dtype)
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return "i32"
        if -(2**63) <= value < 2**63:
            return "i64"
        if 0 <= value < 2**64:
            return "u64"
        raise ValueError(f"integer {value} does not fit 64 bits")
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a launch argument of type {type(value).__name__}")


def variant_from_args(
    kernel: Any,
    args: dict[str, Any],
    constexprs: dict[str, Any] | None = None,
    name: str | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
    num_stages: int = DEFAULT_NUM_STAGES,
) -> Variant:
    """The variant Triton's launcher compiles for these arguments (by name, as launched).

    Mirrors ``native_specialize_impl``, identical in Triton 3.7.1, 3.8.0 and 3.9.0: a tensor is a
    pointer to its dtype, aligned when ``data_ptr() % 16 == 0``; an int is i32, else i64 (u64 from
    2**63), divisible when ``% 16 == 0`` (0 too), and an int equal to 1 becomes a constant
    (signature "constexpr"); a float is fp32 and a bool u1, neither ever specialized; None is a
    constant. Arguments in the kernel's ``do_not_specialize`` get neither the constant 1 nor the
    divisibility; in ``do_not_specialize_on_alignment``, no divisibility.
    """
    fn = _jit_view(kernel)
    constexprs = dict(constexprs or {})
    signature: dict[str, str] = {}
    attrs: set[str] = set()
    for param in fn.params:
        if param.is_constexpr:
            if param.name not in constexprs and param.has_default:
                constexprs[param.name] = param.default
            continue
        if param.name not in args and not param.has_default:
            raise KeyError(f"{fn.__name__}: no value for argument {param.name!r}")
        value = args[param.name] if param.name in args else param.default
        specialize = not param.do_not_specialize
        align = specialize and not param.do_not_specialize_on_alignment
        annotated = param.annotation_type if isinstance(param.annotation_type, str) else ""
        if value is None:
            constexprs[param.name] = None
            continue
        kind = annotated or triton_type(value)
        if annotated == "u1" or annotated[:2] in ("fp", "bf"):
            specialize = align = False  # the launcher never specializes annotated floats/bools
        if isinstance(value, int) and not isinstance(value, bool) and specialize and value == 1:
            constexprs[param.name] = 1
            continue
        signature[param.name] = kind
        if not align or isinstance(value, (bool, float)):
            continue
        if isinstance(value, int) and value % 16 == 0:
            attrs.add(param.name)
        elif hasattr(value, "data_ptr") and value.data_ptr() % 16 == 0:
            attrs.add(param.name)
    return Variant(
        kernel, name or fn.__name__, signature, constexprs, frozenset(attrs), num_warps, num_stages
    )


def to_ast_source(variant: Variant) -> Any:
    """The variant in this Triton's own ``ASTSource`` form (see the module docstring)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = _jit_view(variant.kernel)
    names = list(fn.arg_names)
    unknown = (set(variant.signature) | set(variant.constexprs) | set(variant.attrs)) - set(names)
    if unknown:
        raise KeyError(f"{fn.__name__} has no argument(s) {sorted(unknown)}")
    missing = [n for n in names if n not in variant.signature and n not in variant.constexprs]
    if missing:
        raise KeyError(f"{fn.__name__}: no type or constant given for {missing}")
    signature = {n: "constexpr" if n in variant.constexprs else variant.signature[n] for n in names}
    constexprs = {(names.index(n),): v for n, v in variant.constexprs.items()}
    divisible = CUDABackend.parse_attr("D")  # [["tt.divisibility", 16]]
    attrs = {(names.index(n),): divisible for n in variant.attrs if n not in variant.constexprs}
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's (one) kernel, as ``cuobjdump`` prints them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def uses_tf32(ptx: str) -> bool:
    """An MMA on TF32 operands: mma.sync (sm_80), wgmma (sm_90) or tcgen05 kind::tf32 (sm_100)."""
    return any("mma" in line and "tf32" in line for line in ptx.splitlines())


def compile_variant(variant: Variant, arch: int) -> CompiledInfo:
    """Compile for ``sm_{arch}`` with the imported Triton; a failure is recorded, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn_name = getattr(variant.kernel, "__name__", str(variant.kernel))
    info = CompiledInfo(variant.name, fn_name, arch, ok=False, triton=triton.__version__)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        source = to_ast_source(variant)
        options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # the compiler's whole message: what a user needs to fix the kernel
        info.seconds = time.perf_counter() - start
        info.error = "".join(traceback.format_exception_only(type(e), e)).strip()
        cause = e.__cause__ or e.__context__
        if cause is not None and str(cause) not in info.error:
            info.error += "\ncaused by: " + "".join(traceback.format_exception_only(type(cause), cause))
        return info
    info.seconds = time.perf_counter() - start
    usage = cubin_resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    info.ok = True
    info.registers = usage.get("REG", 0)
    info.stack_bytes = usage.get("STACK", 0)
    info.local_bytes = usage.get("LOCAL", 0)
    info.static_shared_bytes = usage.get("SHARED", 0)
    info.shared_bytes = compiled.metadata.shared
    info.num_warps = compiled.metadata.num_warps
    info.num_stages = compiled.metadata.num_stages
    info.tf32 = uses_tf32(ptx)
    info.target = target.group(1) if target else ""
    info.cached = spills is None
    if spills:
        info.spill_stores, info.spill_loads = int(spills.group(1)), int(spills.group(2))
    return info


def load_variants(spec: str) -> list[Variant]:
    """``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION`` -> the function's list of variants."""
    where, _, function = spec.rpartition(":")
    if not where or not function:
        raise ValueError(f"--variants wants MODULE:FUNCTION, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where).resolve()
        module_spec = importlib.util.spec_from_file_location(f"_variants_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # dataclasses and inspect look modules up by name
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return list(getattr(module, function)())


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| name | arch | regs | spills (stack / st / ld) | shared | tf32 | s | |")
    print("|---|---:|---:|---|---:|---|---:|---|")
    for r in rows:
        if not r["ok"]:
            print(f"| {r['name']} | {r['arch']} | - | - | - | - | {r['seconds']:.2f} | FAIL |")
            continue
        st = "?" if r["spill_stores"] is None else r["spill_stores"]
        ld = "?" if r["spill_loads"] is None else r["spill_loads"]
        print(
            f"| {r['name']} | {r['arch']} | {r['registers']} | {r['stack_bytes']} / {st} / {ld} | "
            f"{r['shared_bytes']} | {r['tf32']} | {r['seconds']:.2f} | ok |"
        )
    for r in rows:
        if not r["ok"]:
            print(f"\nFAIL {r['name']} on sm_{r['arch']}:\n{r['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", required=True, help="MODULE:FUNCTION or FILE.py:FUNCTION")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100], help="sm_XX targets")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--fresh", action="store_true", help="ignore Triton's cache (true compile times)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles for real GPUs")
    os.environ.pop(_MASKS_GLOBALS, None)  # a plain global inside a kernel must fail here as on a GPU
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's warning; the default of all three
    import triton

    print(f"triton {triton.__version__} ({Path(triton.__file__).parent})", flush=True)
    if args.fresh:
        triton.knobs.compilation.always_compile = True
    rows = []
    for variant in load_variants(args.variants):
        for arch in args.arch:
            rows.append(asdict(compile_variant(variant, arch)))
            r = rows[-1]
            print(f"  {r['name']} sm_{arch}: {'ok' if r['ok'] else 'FAIL'} {r['seconds']:.2f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1, default=str))
    print_table(rows)
    return 0 if all(r["ok"] for r in rows) else 1


def run_with_triton(
    version: str, variants_spec: str, archs: list[int], fresh: bool = False, timeout: float = 1800
) -> list[dict[str, Any]]:
    """Run the CLI with the unpacked Triton ``version`` first on the path, in a fresh process
    (TRITON_INTERPRET unset, a compile cache of its own); returns its rows."""
    wheel = TRITON_DIR / version
    if not (wheel / ".complete").exists():
        raise FileNotFoundError(f"no triton {version} in {wheel}: run scripts/fetch-triton-wheels.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", _MASKS_GLOBALS)}
    env["PYTHONPATH"] = os.pathsep.join([str(wheel), str(ROOT)])
    env["TRITON_CACHE_DIR"] = str(TRITON_CACHE / version)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "keepkv_vllm.kernels.cross_compile_harness", "--variants", variants_spec]
        cmd += ["--arch", *map(str, archs), "--json", str(out), *(["--fresh"] if fresh else [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode not in (0, 1) or not out.exists():
            why = proc.stderr[-4000:]
            raise RuntimeError(f"cross-compile with triton {version} died ({proc.returncode}):\n{why}")
        result = json.loads(out.read_text())
    if result["triton"] != version:
        raise RuntimeError(f"asked for triton {version}, the subprocess imported {result['triton']}")
    return result["rows"]


if __name__ == "__main__":
    raise SystemExit(main())

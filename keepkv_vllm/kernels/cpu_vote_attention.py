"""The CPU vote-weighted decode kernel (cpu_vote_attention.cpp): build, load, call.

Built when the KV cache is allocated, with the machine's C++ compiler (``$CXX``, else
``g++``/``c++``; about a second) into ``$KEEPKV_KERNEL_CACHE`` (default
``~/.cache/keepkv-vllm/kernels``), keyed by the source, the flags and the CPU, so later
processes load it in milliseconds. It links the OpenMP runtime
torch already loaded (``libgomp.so.1``), so it runs on torch's threads. No vLLM import.

``load()`` returns None when no compiler works; the caller then keeps the torch path
(correct, slower) and says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from keepkv_vllm.attention.quant import KVQuant

logger = logging.getLogger("vllm.keepkv")

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]  # and -march: the machine's own
_KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}
_VOTE_KINDS = {torch.float32: 0, torch.float16: 1}
_QUERY_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1}  #: output rows it writes itself


class VoteDecodeArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "num_reqs",
            "num_kv_heads",
            "group",
            "head_dim",
            "block_size",
            "max_blocks",
            "block_stride",
            "head_stride",
            "key_start",
            "value_start",
            "k_t",
            "k_c",
            "v_t",
            "v_c",
            "vote_block_stride",
            "vote_head_stride",
            "query_row_stride",
            "out_row_stride",
        )
    ] + [
        ("kv_kind", ctypes.c_int32),
        ("vote_kind", ctypes.c_int32),
        ("query_kind", ctypes.c_int32),
        ("out_kind", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("v_scale", ctypes.c_float),
        ("cache", ctypes.c_void_p),
        ("votes", ctypes.c_void_p),
        ("lut", ctypes.c_void_p),
        ("query", ctypes.c_void_p),
        ("row_index", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p),
        ("seq_lens", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
    ]


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("KEEPKV_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keepkv-vllm" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str, march: str = "native") -> Path:
    """Compile the kernel (or find it built) for ``-march=march`` and return the shared
    library's path. Serving builds for the machine; tests also build for a narrower target
    (e.g. AVX2 on an AVX-512 host) to run the other vector width's code."""
    flags = [*FLAGS, f"-march={march}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, version, _cpu_id()]).encode()).hexdigest()
    directory = _cache_dir()
    target = directory / f"cpu_vote_attention-{key[:16]}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (some containers): this process's temp folder
        directory = Path(tempfile.mkdtemp(prefix="keepkv-vllm-kernels-"))
        target = directory / target.name
    # several workers may build at once (tensor parallel): each writes its own file, then renames
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when it cannot be built here."""
    compiler = find_compiler()
    try:
        if compiler is None:
            raise OSError("no C++ compiler found (set CXX, or install g++)")
        lib = open_library(build(compiler))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning(
            "kv compression: the CPU vote kernel could not be built (%s); voted rows use the "
            "slower torch path",
            detail.strip().splitlines()[-1] if detail.strip() else type(exc).__name__,
        )
        return None
    return lib


def open_library(path: Path) -> ctypes.CDLL:
    """Load a built kernel and declare its entry point."""
    torch.get_num_threads()  # torch (and its libgomp.so.1) is loaded before the kernel links it
    lib = ctypes.CDLL(str(path))
    lib.keepkv_vote_decode.argtypes = [ctypes.POINTER(VoteDecodeArgs)]
    lib.keepkv_vote_decode.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=4)
def _fp8_table(fp8: torch.dtype) -> torch.Tensor:
    """What each of the 256 bytes means in the fp8 format (NaN codes included)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).float().contiguous()


def supports(kv_cache: torch.Tensor, log_votes: torch.Tensor) -> bool:
    """Whether the kernel reads this cache (element and vote types it knows, on the CPU)."""
    return (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype in _KV_KINDS
        and log_votes.dtype in _VOTE_KINDS
        and log_votes.stride(2) == 1
    )


class VoteDecodeKernel:
    """The kernel bound to one layer's cache: the layout is fixed once, a call passes the step.

    kv_cache is vLLM's CPU view ``[num_blocks, H_kv, block_size, 2 d]`` whose (block, head)
    region holds the keys' packed tile, then the values' (``block_size * d`` elements each;
    slot t, dim c at ``t * X_t + c * X_c``: the strides given); log_votes
    ``[num_blocks, H_kv, block_size]``. Arguments are built once because a call is per layer
    and step: building them each time cost ~8x the kernel on a short batch.
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        kv_cache: torch.Tensor,
        key_strides: tuple[int, int],
        value_strides: tuple[int, int],
        log_votes: torch.Tensor,
        quant: KVQuant,
    ) -> None:
        if not supports(kv_cache, log_votes):
            raise ValueError(f"CPU vote kernel: unsupported cache {kv_cache.dtype} / votes {log_votes.dtype}")
        self._lib, self._tensors = lib, (kv_cache, log_votes)  # keep what the pointers point into
        _, h_kv, bs, content = kv_cache.shape
        d = content // 2
        self._lut = _fp8_table(quant.fp8) if quant.quantized else None
        self._args = VoteDecodeArgs(
            num_kv_heads=h_kv,
            head_dim=d,
            block_size=bs,
            block_stride=kv_cache.stride(0),
            head_stride=kv_cache.stride(1),
            key_start=0,
            value_start=bs * d,
            k_t=key_strides[0],
            k_c=key_strides[1],
            v_t=value_strides[0],
            v_c=value_strides[1],
            vote_block_stride=log_votes.stride(0),
            vote_head_stride=log_votes.stride(1),
            kv_kind=_KV_KINDS[kv_cache.dtype],
            vote_kind=_VOTE_KINDS[log_votes.dtype],
            v_scale=quant.v_scale,
            cache=kv_cache.data_ptr(),
            votes=log_votes.data_ptr(),
            lut=self._lut.data_ptr() if self._lut is not None else None,
        )
        self._k_scale = quant.k_scale
        self._num_kv_heads = h_kv

    def __call__(
        self,
        query: torch.Tensor,
        out: torch.Tensor,
        row_index: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> bool:
        """out[row_index[r]] = softmax(q.k * scale + log p) @ V for q = query[row_index[r]], one
        query token per request r over its paged slots, written in place; True when written.

        query and out [num_tokens, H_q, d] (query float32/bfloat16/float16, out
        float32/bfloat16), each row's heads contiguous; otherwise nothing is written and the
        answer is False (the caller takes the torch path). row_index [R] and block_table [R, n]
        int64, seq_lens [R] int32, contiguous (slots per request, at most ``n * block_size``).
        No tensor is made: the call is one C function, per layer and step, and its Python side
        (about 1.5 us) is a fifth of a short step's attention, so the checks here are inline.
        """
        a = self._args
        query_kind, out_kind = _QUERY_KINDS.get(query.dtype), _OUT_KINDS.get(out.dtype)
        qs, out_s = query.stride(), out.stride()
        heads_contiguous = qs[2] == out_s[2] == 1 and qs[1] == out_s[1] == a.head_dim
        if query_kind is None or out_kind is None or not heads_contiguous:
            return False
        a.num_reqs, a.max_blocks = row_index.shape[0], block_table.shape[1]
        a.group = query.shape[1] // self._num_kv_heads
        a.scale = scale * self._k_scale
        a.query_kind, a.out_kind = query_kind, out_kind
        a.query_row_stride, a.out_row_stride = qs[0], out_s[0]
        a.query, a.out = query.data_ptr(), out.data_ptr()
        a.row_index, a.block_table = row_index.data_ptr(), block_table.data_ptr()
        a.seq_lens = seq_lens.data_ptr()
        status = self._lib.keepkv_vote_decode(ctypes.byref(a))
        if status:
            raise ValueError(f"CPU vote kernel refused its arguments (status {status})")
        return True

"""Host synchronisations: how the GPU path avoids them, and how a CPU test counts them.

On CUDA, a call that needs a tensor's value on the host (``item``, ``tolist``, ``bool(t)``,
``nonzero``, boolean-mask indexing, ...) or copies host memory to the device from pageable
memory waits for the GPU to drain its queue: the engine stalls. The GPU path must do at most
one per compression order (the order's counters) and none in a step without one.

``upload`` is the one way the GPU path moves host data to the device. ``count_host_syncs``
is a ``TorchFunctionMode`` that sees every torch call on the CPU, with the stack that made
it, and counts the ones that would synchronise on a GPU: a CPU test runs the GPU path's code
under it. Calls made by Triton's interpreter are not counted (on a GPU they are a launch).
torch and numpy only.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode


def upload(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host data on ``device`` without a synchronisation: on CUDA through pinned memory (torch's
    caching host allocator keeps the pinned block until the copy has run) and a non-blocking
    copy; on the CPU the data itself."""
    tensor = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


# Tensor methods whose result is a host value, or whose output size depends on tensor values.
_READS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "bincount",
    "equal",
    "allclose",
    "is_nonzero",
}
_MASK_INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}
_UPLOADS = {"tensor", "as_tensor"}


@dataclass
class HostSync:
    what: str  # the call, e.g. "tolist"
    where: str  # innermost caller outside torch: "file.py:123 in function"
    path: str = ""  # that caller's file, absolute

    @property
    def in_plugin(self) -> bool:
        """Made by this package's code (not by vLLM's helpers, which read host-side mirrors)."""
        return self.path.startswith(PACKAGE_DIR)


@dataclass
class HostSyncCount:
    calls: list[HostSync] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)

    def summary(self) -> str:
        lines: dict[str, int] = {}
        for call in self.calls:
            key = f"{call.what} at {call.where}"
            lines[key] = lines.get(key, 0) + 1
        return "\n".join(f"{n} x {key}" for key, n in sorted(lines.items(), key=lambda kv: -kv[1]))


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _syncs(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The name of the synchronising call, or None for a call that does not synchronise."""
    name = _name(func)
    if name in _READS:
        return name
    if name in _MASK_INDEXING and len(args) > 1 and _has_bool_index(args[1]):
        return f"{name} with a bool mask"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "where(condition)"
    if name == "repeat_interleave" and "output_size" not in kwargs:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor):
            return "repeat_interleave without output_size"
    if name in _UPLOADS and kwargs.get("device") is not None:
        return f"{name}(..., device=) from host data"
    if name in ("to", "copy_"):
        return _pageable_copy(name, args, kwargs)
    return None


def _pageable_copy(name: str, args: tuple, kwargs: dict) -> str | None:
    """``t.to(device)`` / ``dst.copy_(host)`` from host memory that is not pinned, or blocking."""
    if name == "copy_":
        if len(args) < 2:
            return None
        src, dst = args[1], args[0]
        if src.is_cpu and dst.is_cpu:
            return None  # a host-to-host copy
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return "Tensor.copy_ from pageable host memory" if blocking or not src.is_pinned() else None
    src = args[0]
    device = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            device = a
        if isinstance(a, torch.Tensor):
            device = a.device
    if device is None or not src.is_cpu:
        return None
    non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
    if not non_blocking or (torch.device(device).type != "cpu" and not src.is_pinned()):
        return "Tensor.to(device) from pageable host memory"
    return None


_TORCH_DIR = os.path.dirname(torch.__file__)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB_DIR = os.path.dirname(os.__file__)
_HERE = os.path.abspath(__file__)


def _caller() -> tuple[str, str, bool]:
    """(innermost caller outside torch and the standard library, its file, whether Triton's
    interpreter is on the stack)."""
    where, path, in_triton = "?", "", False
    for frame in reversed(traceback.extract_stack()):
        file = os.path.abspath(frame.filename)
        if f"{os.sep}triton{os.sep}" in file:
            in_triton = True
        elif where == "?" and file != _HERE and not file.startswith((_TORCH_DIR, _STDLIB_DIR)):
            where, path = f"{os.path.relpath(file)}:{frame.lineno} in {frame.name}", file
    return where, path, in_triton


_CPU_ONLY = threading.local()


@contextmanager
def cpu_only() -> Iterator[None]:
    """Code that never runs on a GPU (a stand-in for a kernel under Triton's interpreter): not
    counted, as the interpreter's own calls are not."""
    _CPU_ONLY.depth = getattr(_CPU_ONLY, "depth", 0) + 1
    try:
        yield
    finally:
        _CPU_ONLY.depth -= 1


class _Counter(TorchFunctionMode):
    def __init__(self, count: HostSyncCount) -> None:
        super().__init__()
        self.found = count

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        what = _syncs(func, args, kwargs) if not getattr(_CPU_ONLY, "depth", 0) else None
        if what is not None:
            where, path, in_triton = _caller()
            if not in_triton:
                self.found.calls.append(HostSync(what, where, path))
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs() -> Iterator[HostSyncCount]:
    """Count the calls inside the block that would synchronise with a GPU."""
    count = HostSyncCount()
    with _Counter(count):
        yield count


def print_host_syncs(count: HostSyncCount, file: Any = sys.stderr) -> None:
    print(f"{count.count} host synchronisations:\n{count.summary()}", file=file)

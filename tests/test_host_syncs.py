"""The GPU path waits for the device at most once per compression order (keepkv_vllm.host_sync).

A CPU test cannot see a GPU stall, but it can see every torch call that would cause one: the
counter is a TorchFunctionMode over the GPU path's own code. The end-to-end count, per step and
per order inside the real engine, is in tests/test_e2e_gpu_path.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keepkv_vllm.attention.kv_layout import FlashPagedKV, allocate_padded_cache
from keepkv_vllm.attention.quant import KVQuant
from keepkv_vllm.engine.compaction import compact_request
from keepkv_vllm.engine.messages import CompressionOrder
from keepkv_vllm.host_sync import count_host_syncs, upload
from keepkv_vllm.methods import METHODS, get_method

BS, H_KV, GROUP, D, LAYERS = 16, 2, 2, 64, 4


def test_the_counter_sees_each_kind_of_host_synchronisation():
    x = torch.randn(8)
    cases = {
        "item": lambda: x.sum().item(),
        "tolist": lambda: x.tolist(),
        "__bool__": lambda: bool(x[0] > 0),
        "__float__": lambda: float(x.max()),
        "__int__": lambda: int(x.argmax()),
        "nonzero": lambda: x.nonzero(),
        "__getitem__ with a bool mask": lambda: x[x > 0],
        "__setitem__ with a bool mask": lambda: x.clone().__setitem__(x > 0, 1.0),
        "where(condition)": lambda: torch.where(x > 0),
        "tensor(..., device=) from host data": lambda: torch.tensor([1, 2], device="cpu"),
        "Tensor.to(device) from pageable host memory": lambda: torch.from_numpy(np.arange(3)).to("cpu"),
        "cpu": lambda: x.cpu(),
    }
    for what, call in cases.items():
        with count_host_syncs() as found:
            call()
        assert [c.what for c in found.calls] == [what], what
        assert found.calls[0].where.startswith("tests/test_host_syncs.py:")


def test_the_counter_lets_device_side_work_through():
    x = torch.randn(8, 4)
    with count_host_syncs() as found:
        y = torch.zeros(3, device=x.device) + x[:3, 0]
        torch.sort((x > 0).to(torch.uint8), dim=1, stable=True)
        x.to(torch.float64)  # a dtype change, no transfer
        (x > 0).any()  # a tensor: only reading it on the host would wait
        x.sum(dim=0).topk(2)
        upload(np.arange(4), x.device)
    assert found.count == 0, found.summary()
    assert y.shape == (3,)


def test_upload_on_the_cpu_is_the_data_itself():
    data = np.arange(5, dtype=np.int64)
    assert upload(data, torch.device("cpu")).data_ptr() == data.ctypes.data


def layers(dtype: torch.dtype, kv_cache_dtype: str = "auto"):
    g = torch.Generator().manual_seed(0)
    quant = KVQuant.for_cache(kv_cache_dtype, k_scale=0.5, v_scale=2.0)
    storage = torch.uint8 if quant.quantized else dtype
    out = []
    for _ in range(LAYERS):
        paged = FlashPagedKV(allocate_padded_cache(12, H_KV, BS, D, storage), quant)
        for cache in (paged.key_cache, paged.value_cache):
            values = torch.randn(cache.shape, generator=g)
            cache.copy_(quant.quantize(values, 1.0)[0] if quant.quantized else values.to(dtype))
        paged.log_votes.copy_((1 + torch.rand(paged.log_votes.shape, generator=g)).log())
        out.append((paged, torch.randn(H_KV * GROUP, 16, D, generator=g).to(dtype)))
    return out


ORDER = CompressionOrder("r", (7, 2, 5, 9, 1, 3, 4, 0), 120, 64, 0, 120, block_ids=(7, 2, 5, 9))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "dtype, kv", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "fp8")], ids=str
)
def test_a_compression_order_synchronises_once_whatever_the_layers(method, dtype, kv):
    cache = layers(dtype, kv)
    with count_host_syncs() as found:
        stats = compact_request(cache, ORDER, get_method(method))
    assert found.count == 1, found.summary()  # the order's counters, read back at the end
    assert found.calls[0].what == "tolist" and "compaction.py" in found.calls[0].where
    assert stats.entries_removed == LAYERS * H_KV * (120 - 64) and stats.invalid_inputs == 0


def test_invalid_inputs_are_counted_not_raised_in_the_engine():
    cache = layers(torch.float32)
    paged = cache[0][0]
    paged.key_cache[7, 3, 0, 0] = float("nan")  # slot 3 of the request, layer 0
    paged.log_votes[2, 1, 0] = float("-inf")  # vote 0: slot 16, layer 0, head 1
    stats = compact_request(cache, ORDER, get_method("keepkv"))
    assert stats.invalid_inputs == 2
    with pytest.raises(ValueError, match="NaN or inf"):  # the public API still refuses them
        keys, values = paged.gather(torch.tensor(ORDER.src_block_ids), 0, 120)
        get_method("keepkv").compress(keys, values, torch.ones(H_KV, 120), cache[0][1], 64)


def test_code_marked_cpu_only_is_not_counted():
    from keepkv_vllm.host_sync import cpu_only

    x = torch.randn(4)
    with count_host_syncs() as found:
        with cpu_only():  # e.g. the interpreter's torch stand-in for the fp8 store kernel
            x.nonzero()
        x.nonzero()
    assert found.count == 1

"""The GPU path against vLLM 0.32's installed source, without a GPU.

Every vLLM method the GPU worker, runner and backend override or call exists with the
parameters we use; our backend, impl and builder implement vLLM's abstract interfaces; the
GPU worker module imports and the plugin selects it (and vLLM's V1 runner) on CUDA; the
padded page with votes is laid out as vLLM lays it out.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention import backend as vllm_backend
from vllm.v1.attention.backends import flash_attn
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout, compute_layout_strides
from vllm.v1.worker.block_table import BlockTable
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from keepkv_vllm import plugin
from keepkv_vllm.attention.kv_layout import allocate_padded_cache
from keepkv_vllm.config import ConfigError
from keepkv_vllm.engine import model_runner, worker
from keepkv_vllm.engine.gpu import flash_attention
from keepkv_vllm.engine.gpu import worker as gpu_worker


def params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize(
    "owner, name, expected",
    [
        (GPUModelRunner, "_update_states", ["scheduler_output"]),
        (GPUModelRunner, "_prepare_inputs", ["scheduler_output", "num_scheduled_tokens"]),
        (
            GPUModelRunner,
            "initialize_kv_cache",
            ["kv_cache_config", "is_profiling", "kv_cache_allocation_context"],
        ),
        (GPUModelRunner, "execute_model", None),
        (GPUModelRunner, "get_kv_cache_spec", []),
        (GPUModelRunner, "_cleanup_profiling_kv_cache", []),
        (Worker, "_make_model_runner", []),
        (Worker, "determine_available_memory", []),
        (Worker, "initialize_from_config", ["kv_cache_config"]),
        (BlockTable, "compute_slot_mapping", ["num_reqs", "query_start_loc", "positions"]),
        (flash_attn.FlashAttentionImpl, "forward", None),
        (
            flash_attn.FlashAttentionMetadataBuilder,
            "build",
            ["common_prefix_len", "common_attn_metadata", "fast_build"],
        ),
        (vllm_backend.AttentionMetadataBuilder, "_init_reorder_batch_threshold", None),
    ],
)
def test_vllm_methods_we_override_or_call_exist_with_our_parameters(owner, name, expected):
    fn = getattr(owner, name)
    assert callable(fn)
    if expected is not None:
        assert params(fn)[: len(expected)] == expected


def test_the_runner_state_we_touch_is_built_by_vllms_gpu_runner():
    source = inspect.getsource(GPUModelRunner.__init__)
    for attr in (
        "self.seq_lens =",
        "self.optimistic_seq_lens_cpu =",
        "self.positions =",
        "self.query_start_loc =",
    ):
        assert attr in source, attr
    prepare = inspect.getsource(GPUModelRunner._prepare_inputs)
    assert "compute_slot_mapping(" in prepare and "self.seq_lens[:num_reqs]" in prepare
    assert "self.use_v2_model_runner = vllm_config.use_v2_model_runner" in inspect.getsource(Worker.__init__)


def test_flash_attention_pieces_we_delegate_prefill_to():
    assert params(flash_attn.FlashAttentionImpl.__init__)[:7] == [
        "num_heads",
        "head_size",
        "scale",
        "num_kv_heads",
        "alibi_slopes",
        "sliding_window",
        "kv_cache_dtype",
    ]
    assert params(flash_attn.FlashAttentionMetadataBuilder.__init__) == [
        "kv_cache_spec",
        "layer_names",
        "vllm_config",
        "device",
    ]
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.v1.attention.backends.utils import split_decodes_and_prefills
    from vllm.v1.worker.ubatch_utils import UBatchSlice, _make_metadata_with_slice

    assert get_flash_attn_version() is None  # no FlashAttention on this CPU: the Triton kernel stands in
    assert params(split_decodes_and_prefills)[:2] == ["common_attn_metadata", "decode_threshold"]
    assert params(_make_metadata_with_slice) == ["ubatch_slice", "attn_metadata"]
    assert params(UBatchSlice) == ["request_slice", "token_slice"]
    # FlashAttention reads its K/V views the way our layout does
    assert "kv_cache.transpose(1, 2).split(self.head_size, dim=-1)" in inspect.getsource(
        flash_attn.FlashAttentionImpl.forward
    )


def test_backend_impl_and_builder_implement_vllms_interfaces():
    backend = flash_attention.KeepKVFlashAttentionBackend
    assert issubclass(backend, vllm_backend.AttentionBackend) and not inspect.isabstract(backend)
    assert issubclass(backend.get_impl_cls(), vllm_backend.AttentionImpl)
    assert not inspect.isabstract(backend.get_impl_cls())
    assert issubclass(backend.get_builder_cls(), vllm_backend.AttentionMetadataBuilder)
    assert not inspect.isabstract(backend.get_builder_cls())
    assert backend.get_builder_cls()._cudagraph_support == vllm_backend.AttentionCGSupport.NEVER
    assert backend.forward_includes_kv_cache_update is False
    impl_params = params(flash_attn.FlashAttentionImpl.__init__)
    assert params(backend.get_impl_cls().__init__) == impl_params
    assert params(backend.get_impl_cls().forward) == params(flash_attn.FlashAttentionImpl.forward)
    assert params(backend.get_impl_cls().do_kv_cache_update) == params(
        flash_attn.FlashAttentionImpl.do_kv_cache_update
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_size, block_size", [(128, 16), (64, 32), (256, 16)])
def test_vllm_cuda_selection_accepts_the_backend_for_served_shapes(dtype, head_size, block_size):
    config = AttentionSelectorConfig(
        head_size=head_size, dtype=dtype, kv_cache_dtype="auto", block_size=block_size
    )
    reasons = flash_attention.KeepKVFlashAttentionBackend.validate_configuration(
        device_capability=DeviceCapability(9, 0), **config._asdict()
    )
    assert reasons == []


def test_fp8_e4m3_is_refused_below_compute_capability_8_9_with_e5m2_named():
    backend = flash_attention.KeepKVFlashAttentionBackend

    def reasons(kv_cache_dtype, capability):
        config = AttentionSelectorConfig(
            head_size=128, dtype=torch.bfloat16, kv_cache_dtype=kv_cache_dtype, block_size=16
        )
        return backend.validate_configuration(device_capability=capability, **config._asdict())

    assert any("fp8_e5m2" in r for r in reasons("fp8", DeviceCapability(8, 0)))
    assert any("8.6" in r for r in reasons("fp8_e4m3", DeviceCapability(8, 6)))
    assert reasons("fp8_e5m2", DeviceCapability(8, 0)) == []
    assert reasons("fp8", DeviceCapability(8, 9)) == reasons("fp8", DeviceCapability(9, 0)) == []


@pytest.mark.parametrize("layout, slot_major", [(KVCacheLayout.LBNHC, True), (KVCacheLayout.LBHNC, False)])
def test_padded_pages_are_laid_out_as_vllm_allocates_them(layout, slot_major):
    spec = FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=64, dtype=torch.bfloat16)
    padded = flash_attention.KeepKVFlashAttentionBackend.customize_spec(spec)
    assert padded.page_size_padded == spec.page_size_bytes + 4 * 16 * 4  # one float32 vote per slot and head
    strides = compute_layout_strides(padded, num_blocks=10, num_layers=1, layout=layout)
    ours = allocate_padded_cache(10, 4, 16, 64, torch.bfloat16, slot_major=slot_major)
    assert tuple(s * ours.element_size() for s in ours.stride()) == strides[1:-1] + (ours.element_size(),)


def test_gpu_worker_and_runner_build_on_vllms_classes():
    assert issubclass(gpu_worker.KeepKVGPUWorker, Worker)
    assert issubclass(gpu_worker.KeepKVGPUModelRunner, GPUModelRunner)
    # our overrides sit in front of vLLM's in the method resolution order
    for name in (
        "_update_states",
        "_prepare_inputs",
        "initialize_kv_cache",
        "execute_model",
        "_cleanup_profiling_kv_cache",
    ):
        assert getattr(gpu_worker.KeepKVGPUModelRunner, name) is getattr(
            model_runner.CompressionRunnerMixin, name
        )
    assert (
        gpu_worker.KeepKVGPUWorker.determine_available_memory
        is worker.CompressionWorkerMixin.determine_available_memory
    )
    assert AttentionBackendEnum.CUSTOM.name == "CUSTOM"


def _fake_config(backend=None):
    return SimpleNamespace(
        cache_config=SimpleNamespace(cache_dtype="auto"),
        speculative_config=None,
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, worker_cls="auto"),
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=True),
        attention_config=SimpleNamespace(backend=backend),
    )


def test_plugin_selects_the_gpu_worker_and_backend_on_cuda(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self=None: True)
    config = _fake_config()
    plugin._select_engine_classes(config, SimpleNamespace(method="keepkv"))
    assert config.parallel_config.worker_cls == plugin.GPU_WORKER_CLS
    assert config.attention_config.backend == AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.GPU_BACKEND
    with pytest.raises(ConfigError, match="drop --attention-backend FLASHINFER"):
        plugin._select_engine_classes(
            _fake_config(AttentionBackendEnum.FLASHINFER), SimpleNamespace(method="keepkv")
        )


def test_plugin_selects_vllms_v1_runner_and_refuses_v2(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plugin.select_v1_model_runner()
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ConfigError, match="V1 model runner"):
        plugin.select_v1_model_runner()


def test_split_k_workspace_covers_every_decode_batch():
    from keepkv_vllm.kernels.triton_vote_attention import max_split_rows, pick_num_splits

    rows = max_split_rows(256, 8, 8192, 132)
    assert all(n * pick_num_splits(n, 8, s, 132) <= rows for n in range(1, 257) for s in (100, 4096, 8192))
    assert rows == 256  # an H100 running an 8-kv-head model: about 4 MiB of fp32 partials

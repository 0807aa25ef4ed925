"""The plugin against whatever vLLM is first on the path: the installed one, or a release's Python
files (scripts/check-vllm-release.sh puts the newest release's first on PYTHONPATH).

- every vLLM module and name the plugin imports, and every attribute it reads from one, read from
  its own source (tests/vllm_names.py: a new import cannot escape this test), exists;
- every plugin module imports;
- every vLLM method a plugin class overrides exists on its vLLM base, and the override accepts
  every call the base accepts; so do the vLLM methods the plugin patches or calls on vLLM's
  internals, and the state it reads on vLLM's objects (INTERNALS, STATE: listed by hand);
- the bodies of the vLLM methods the plugin hooks are ones that were read and found compatible
  (tests/vllm_hooked_sources.json: a digest per reviewed release): a release that changes one
  fails here, naming it, before a user meets it;
- compression refuses what it cannot run beside (async scheduling, speculative decoding).

After reviewing a changed or newly hooked method, record its digests on each supported release:
    KEEPKV_RECORD_VLLM_HOOKS=1 .venv/bin/python -m pytest tests/test_vllm_contract.py -k hooks
    KEEPKV_RECORD_VLLM_HOOKS=1 bash scripts/check-vllm-release.sh 0.33.0
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from vllm_names import vllm_attribute_reads, vllm_imports

import keepkv_vllm

pytest.importorskip("vllm")

HOOKED_SOURCES = Path(__file__).with_name("vllm_hooked_sources.json")
RECORD_ENV = "KEEPKV_RECORD_VLLM_HOOKS"
# vLLM methods the plugin patches or calls on vLLM's internals (owner module, class, attribute),
# where no import names them: plugin.py's patches, the scheduler's allocation and block handling
INTERNALS = [
    ("vllm.engine.arg_utils", "EngineArgs", "add_cli_args"),
    ("vllm.engine.arg_utils", "EngineArgs", "from_cli_args"),
    ("vllm.engine.arg_utils", "EngineArgs", "create_engine_config"),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", "to_sampling_params"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", "to_sampling_params"),
    ("vllm.v1.engine.input_processor", "InputProcessor", "_validate_params"),
    ("vllm.plugins", None, "load_endpoint_plugins"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "allocate_slots"),  # wrapped per scheduler
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "create_kv_cache_blocks"),
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator", "allocate_new_blocks"),
    ("vllm.v1.core.block_pool", "BlockPool", "free_blocks"),
    ("vllm.v1.core.block_pool", "BlockPool", "evict_blocks"),
    ("vllm.v1.core.block_pool", "BlockPool", "get_num_free_blocks"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "_preempt_request"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "_free_request_blocks"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker", "init_device"),
    ("vllm.v1.worker.gpu_worker", "Worker", "_make_model_runner"),
    ("vllm.v1.worker.gpu_worker", "Worker", "initialize_from_config"),
    ("vllm.v1.worker.gpu_worker", "Worker", "determine_available_memory"),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable", "add_row"),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable", "compute_slot_mapping"),
    ("vllm.v1.kv_cache_interface", "KVCacheSpec", "max_memory_usage_bytes"),
]
# state the plugin reads or writes on vLLM's objects: a class attribute, property, dataclass
# field, or an attribute some __init__ of the class sets (engine/scheduler.py, engine/model_runner.py)
STATE = [
    ("vllm.v1.core.sched.scheduler", "Scheduler", "kv_cache_manager running vllm_config kv_cache_config"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "coordinator block_pool"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheBlocks", "blocks"),
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator", "single_type_managers"),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager", "block_size req_to_blocks"),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager", "num_cached_block"),
    ("vllm.v1.core.block_pool", "BlockPool", "num_gpu_blocks"),
    ("vllm.v1.core.kv_cache_utils", "KVCacheBlock", "block_id ref_cnt block_hash"),
    ("vllm.v1.request", "Request", "request_id status num_computed_tokens num_prompt_tokens"),
    ("vllm.v1.request", "Request", "num_output_tokens max_tokens sampling_params"),
    (
        "vllm.v1.core.sched.output",
        "SchedulerOutput",
        "finished_req_ids preempted_req_ids scheduled_new_reqs scheduled_cached_reqs",
    ),
    ("vllm.v1.core.sched.output", "CachedRequestData", "resumed_req_ids"),
    ("vllm.v1.core.sched.output", "NewRequestData", "req_id"),
    (
        "vllm.v1.worker.gpu_model_runner",
        "GPUModelRunner",
        "requests input_batch seq_lens optimistic_seq_lens_cpu positions query_start_loc "
        "compilation_config model_config vllm_config device",
    ),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch", "req_ids req_id_to_index num_computed_tokens_cpu"),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch", "num_reqs block_table"),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState", "block_ids"),
    ("vllm.v1.worker.gpu_worker", "Worker", "use_v2_model_runner model_runner vllm_config device"),
    ("vllm.v1.kv_cache_interface", "AttentionSpec", "page_size_padded unpadded_page_size_bytes"),
    ("vllm.v1.kv_cache_interface", "AttentionSpec", "num_kv_heads block_size head_size dtype"),
]


def plugin_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(keepkv_vllm.__path__, "keepkv_vllm."))


def where(found: dict, key: object) -> str:
    return ", ".join(found[key][:3])


# -- names the plugin imports, read from its source --------------------------------------------
def test_the_plugin_imports_are_found_in_its_source():
    names = vllm_imports()
    assert len(names) >= 50  # read from the code, deferred imports included
    assert ("vllm.v1.worker.gpu_worker", "Worker") in names and ("vllm.plugins", None) in names
    reads = vllm_attribute_reads()
    assert ("vllm.plugins", None, "load_endpoint_plugins") in reads
    assert ("vllm.v1.worker", "cpu_worker", "CPUModelRunner") in reads


@pytest.mark.parametrize("module, name", sorted(vllm_imports(), key=str), ids=str)
def test_every_vllm_name_the_plugin_imports_exists(module, name):
    imported = importlib.import_module(module)  # ModuleNotFoundError names the module
    if name is None or hasattr(imported, name):
        return
    if hasattr(imported, "__path__"):  # `from package import submodule`
        importlib.import_module(f"{module}.{name}")
        return
    pytest.fail(f"{module} has no {name} (imported at {where(vllm_imports(), (module, name))})")


@pytest.mark.parametrize("module, name, attribute", sorted(vllm_attribute_reads(), key=str), ids=str)
def test_every_attribute_the_plugin_reads_from_a_vllm_name_exists(module, name, attribute):
    owner = importlib.import_module(module)
    if name is not None:
        parent = owner
        if hasattr(parent, name):
            owner = getattr(parent, name)
        else:  # `from package import submodule`
            owner = importlib.import_module(f"{module}.{name}")
    if hasattr(owner, attribute):
        return
    label = f"{module}.{name}" if name else module
    read_at = where(vllm_attribute_reads(), (module, name, attribute))
    pytest.fail(f"{label} has no {attribute} (read at {read_at})")


@pytest.mark.parametrize("module", plugin_modules())
def test_every_plugin_module_imports(module):
    importlib.import_module(module)


# -- overrides -----------------------------------------------------------------------------
def vllm_based_classes() -> list[type]:
    """The plugin's classes that subclass a vLLM class (CPU ones included: this is no GPU process)."""
    found = []
    for module in plugin_modules():
        try:
            imported = importlib.import_module(module)
        except ImportError:
            continue  # reported by test_every_plugin_module_imports, one line per module
        for _, cls in inspect.getmembers(imported, inspect.isclass):
            own = cls.__module__.startswith("keepkv_vllm")
            if own and any(b.__module__.startswith("vllm") for b in cls.__mro__[1:]):
                found.append(cls)
    return sorted(set(found), key=lambda c: c.__qualname__)


def overrides() -> list[tuple[type, str, type]]:
    """(plugin class, method name, the vLLM class that defines it) for every override."""
    out = []
    for cls in vllm_based_classes():
        plugin_part = [c for c in cls.__mro__ if c.__module__.startswith("keepkv_vllm")]
        vllm_part = [c for c in cls.__mro__ if c.__module__.startswith("vllm")]
        names = {
            n
            for c in plugin_part
            for n, v in vars(c).items()
            if callable(v) or isinstance(v, (staticmethod, classmethod))
        }
        for name in sorted(names - {"__init__"}):  # the plugin's __init__s take (*args, **kwargs)
            owner = next((c for c in vllm_part if name in vars(c)), None)
            if owner is not None:
                out.append((cls, name, owner))
    return out


def test_the_plugin_overrides_vllm_methods():
    found = {(c.__name__, n) for c, n, _ in overrides()}
    expected = {
        ("KeepKVScheduler", "schedule"),
        ("KeepKVScheduler", "update_from_output"),
        ("KeepKVGPUModelRunner", "_update_states"),
        ("KeepKVCPUModelRunner", "_prepare_inputs"),
        ("KeepKVGPUWorker", "_make_model_runner"),
    }
    assert not expected - found, f"no vLLM method found under these overrides: {sorted(expected - found)}"


def signature(owner: type, name: str) -> inspect.Signature:
    """The signature as callers see it on an instance (or the class, for a staticmethod)."""
    raw = inspect.getattr_static(owner, name)
    fn = getattr(raw, "__func__", raw)
    sig = inspect.signature(fn)
    if not isinstance(raw, staticmethod):
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])  # self / cls
    return sig


def accepts(override: inspect.Signature, base: inspect.Signature) -> list[str]:
    """How calls the base accepts would fail on the override (empty: none)."""
    P = inspect.Parameter
    positional = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    ours = list(override.parameters.values())
    var_args = any(p.kind == P.VAR_POSITIONAL for p in ours)
    var_kwargs = any(p.kind == P.VAR_KEYWORD for p in ours)
    our_positional = [p for p in ours if p.kind in positional]
    by_keyword = {p.name for p in ours if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    problems = []
    base_params = list(base.parameters.values())
    base_positional = [p for p in base_params if p.kind in positional]
    for i, p in enumerate(base_positional):
        if i >= len(our_positional) and not var_args:
            problems.append(f"positional {p.name} (#{i + 1}) has no place")
        elif i < len(our_positional) and p.kind == P.POSITIONAL_OR_KEYWORD:
            if our_positional[i].name != p.name and not var_kwargs:
                problems.append(f"{p.name} is {our_positional[i].name} here")
    for p in base_params:
        if p.kind == P.KEYWORD_ONLY and p.name not in by_keyword and not var_kwargs:
            problems.append(f"keyword {p.name} is not accepted")
        if p.kind == P.VAR_POSITIONAL and not var_args:
            problems.append(f"*{p.name} is not accepted")
        if p.kind == P.VAR_KEYWORD and not var_kwargs:
            problems.append(f"**{p.name} is not accepted")
    base_names = {p.name for p in base_params}
    for i, p in enumerate(ours):
        required = p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
        covered = p.name in base_names or (p.kind in positional and i < len(base_positional))
        if required and not covered:
            problems.append(f"{p.name} is required here, vLLM does not pass it")
    return problems


@pytest.mark.parametrize("cls, name, owner", overrides(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_override_accepts_what_vllm_passes(cls, name, owner):
    problems = accepts(signature(cls, name), signature(owner, name))
    assert not problems, f"{cls.__name__}.{name} against {owner.__module__}.{owner.__qualname__}: {problems}"


def test_the_signature_check_catches_incompatible_overrides():
    def sig(fn):
        return inspect.signature(fn)

    def base(scheduler_output, num_scheduled_tokens, *, flag=False): ...

    assert accepts(sig(lambda scheduler_output, num_scheduled_tokens, *, flag=False: 0), sig(base)) == []
    assert accepts(sig(lambda *args, **kwargs: 0), sig(base)) == []
    assert accepts(sig(lambda scheduler_output, *args, **kwargs: 0), sig(base)) == []
    assert accepts(sig(lambda scheduler_output: 0), sig(base))  # one positional short
    assert accepts(sig(lambda scheduler_output, n, *, flag=False: 0), sig(base))  # renamed
    assert accepts(sig(lambda scheduler_output, num_scheduled_tokens: 0), sig(base))  # no flag
    assert accepts(sig(lambda scheduler_output, num_scheduled_tokens, extra, **kw: 0), sig(base))


# -- internals the plugin patches, calls or reads --------------------------------------------------
def internal(module: str, owner: str | None) -> object:
    imported = importlib.import_module(module)
    return imported if owner is None else getattr(imported, owner)


@pytest.mark.parametrize("module, owner, attribute", INTERNALS, ids=str)
def test_the_vllm_internals_the_plugin_calls_exist(module, owner, attribute):
    assert callable(getattr(internal(module, owner), attribute))


@functools.cache
def assigned_in_init(cls: type) -> frozenset[str]:
    """``self.x`` targets of every __init__ in the class's MRO (vLLM sets most state there)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return frozenset(names)


def provides(cls: type, attribute: str) -> bool:
    if hasattr(cls, attribute):
        return True
    if dataclasses.is_dataclass(cls) and attribute in {f.name for f in dataclasses.fields(cls)}:
        return True
    return attribute in assigned_in_init(cls)


@pytest.mark.parametrize("module, owner, attributes", STATE, ids=str)
def test_the_vllm_state_the_plugin_reads_exists(module, owner, attributes):
    cls = internal(module, owner)
    missing = [a for a in attributes.split() if not provides(cls, a)]
    assert not missing, f"{module}.{owner} no longer has {missing}"


# -- the hooked methods' bodies ---------------------------------------------------------------------
def hooked() -> dict[str, object]:
    """``module.Class.method`` -> the vLLM function, for every override and internal above."""
    out = {f"{o.__module__}.{o.__qualname__}.{n}": vars(o)[n] for _, n, o in overrides()}
    for module, owner, attribute in INTERNALS:
        try:
            parent = internal(module, owner)
            out[f"{module}.{owner + '.' if owner else ''}{attribute}"] = inspect.getattr_static(
                parent, attribute
            )
        except (ImportError, AttributeError):
            continue  # reported by test_the_vllm_internals_the_plugin_calls_exist
    return out


def digest(fn: object) -> str:
    fn = inspect.unwrap(getattr(fn, "__func__", fn))  # vLLM's own, under the plugin's patch
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return "no source"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def test_the_vllm_methods_the_plugin_hooks_are_unchanged():
    import vllm

    version = vllm.__version__
    recorded = json.loads(HOOKED_SOURCES.read_text())
    current = {k: digest(fn) for k, fn in hooked().items()}
    if os.environ.get(RECORD_ENV) == "1":
        for key, value in current.items():
            recorded["digests"].setdefault(key, {})[version] = value
        recorded["digests"] = dict(sorted(recorded["digests"].items()))
        recorded["verified_on"] = sorted(set(recorded["verified_on"]) | {version})
        HOOKED_SOURCES.write_text(json.dumps(recorded, indent=1) + "\n")
        return
    known = recorded["digests"]
    changed = sorted(k for k, d in current.items() if k in known and d not in known[k].values())
    new = sorted(set(current) - set(known))
    assert not changed, (
        f"vLLM {version} changed {len(changed)} method(s) the plugin hooks (reviewed on "
        f"{', '.join(recorded['verified_on'])}): {', '.join(changed)}"
    )
    assert not new, f"newly hooked vLLM methods, not reviewed yet (see this file's docstring): {new}"


# -- what compression refuses ----------------------------------------------------------------------
def _config(async_scheduling=False, speculative=None):
    return SimpleNamespace(
        cache_config=SimpleNamespace(cache_dtype="auto"),
        speculative_config=speculative,
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, worker_cls="auto"),
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=async_scheduling),
        attention_config=SimpleNamespace(backend=None),
    )


@pytest.fixture(params=["cpu", "cuda"])
def on_platform(request, monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: request.param == "cpu")
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self=None: request.param == "cuda")
    return request.param


def test_speculative_decoding_is_refused(on_platform):
    # vLLM 0.33's update_from_output caches a running request's blocks under speculative
    # decoding: a compressed request's rewritten blocks must never be cached
    from keepkv_vllm import plugin
    from keepkv_vllm.config import ConfigError

    with pytest.raises(ConfigError, match="speculative decoding"):
        plugin._select_engine_classes(_config(speculative=object()), SimpleNamespace(method="keepkv"))


def test_async_scheduling_is_turned_off_with_compression(on_platform):
    # vLLM 0.33's update_from_output also caches blocks under async scheduling (output
    # placeholders); and compression frees blocks an overlapped step could still be writing
    from keepkv_vllm import plugin

    config = _config(async_scheduling=True)
    plugin._select_engine_classes(config, SimpleNamespace(method="keepkv"))
    assert config.scheduler_config.async_scheduling is False
    assert config.scheduler_config.scheduler_cls == plugin.SCHEDULER_CLS  # the synchronous base


def test_the_engine_config_is_built_without_async_scheduling_and_refuses_speculation(monkeypatch):
    # through the patched EngineArgs.create_engine_config, as `vllm serve` and LLM(...) reach it
    from keepkv_vllm import plugin
    from keepkv_vllm.config import ConfigError

    monkeypatch.setenv("KEEPKV_ALLOW_UNTESTED_VLLM", "1")  # also run against releases outside the range
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.setattr(plugin, "_select_gpu_backend", lambda config: None)
    seen = {}

    class Args:
        additional_config = {"kv_compression": {"method": "keepkv"}}
        async_scheduling = True  # --async-scheduling
        speculative = None

        def create_engine_config(self, *args, **kwargs):
            seen["async_scheduling"] = self.async_scheduling
            return _config(async_scheduling=self.async_scheduling, speculative=self.speculative)

    plugin._patch_engine_config(Args)
    config = Args().create_engine_config()
    assert seen["async_scheduling"] is False and config.scheduler_config.async_scheduling is False
    Args.speculative = object()  # --speculative-config
    with pytest.raises(ConfigError, match="speculative decoding"):
        Args().create_engine_config()


def test_the_scheduler_compression_hooks_into_is_vllms_synchronous_one():
    # AsyncScheduler is what counts output placeholders (0.33 caches blocks on them)
    from vllm.v1.core.sched.scheduler import Scheduler

    from keepkv_vllm.engine.scheduler import KeepKVScheduler

    assert [c for c in KeepKVScheduler.__mro__ if c.__module__.startswith("vllm")][0] is Scheduler

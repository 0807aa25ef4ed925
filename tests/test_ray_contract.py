"""vLLM's Ray executors against the plugin, by contract (docs/engine.md, "Multi-node and Ray").

Nothing runs on Ray here: ray is not installed, and vLLM's CPU platform has no Ray device
(``CpuPlatform.ray_device_key`` is empty, so ``initialize_ray_cluster`` refuses with "current
platform cpu does not support ray"). What compression needs from Ray is checked against vLLM's
installed source instead, with real vLLM objects wherever one works without Ray:

(a) the workers: both Ray executors (``RayExecutorV2``, vLLM 0.32's default, and the
    compiled-graph ``RayDistributedExecutor``) build every worker through
    ``WorkerWrapperBase.init_worker``, which loads the general plugins and then builds
    ``parallel_config.worker_cls``: the class the plugin's engine-config hook chose, in the process
    that built the config, before vLLM picked the executor class;
(b) the orders: every rank is handed the ``SchedulerOutput`` the scheduler returned, and the
    plugin's attributes on it survive pickle, cloudpickle (Ray's serializer) and vLLM's
    ``MessageQueue`` (RayExecutorV2's channel, over shared memory and over TCP);
(c) the counters: ``collective_rpc`` answers once per rank, in rank order, so ``ranks_agree``
    compares every rank.

Source checks read ``ast.unparse`` of vLLM's files (formatting does not matter, ray_executor_v2
cannot be imported without ray); each comes with an edit of the source that must make it fail.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import logging
import math
import pickle
import sys
import threading
import types
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

import cloudpickle  # vLLM's dependency (Ray pickles with its own copy of it)
from vllm.distributed.device_communicators.shm_broadcast import MessageQueue
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.executor.abstract import Executor
from vllm.v1.executor.multiproc_executor import MultiprocExecutor, WorkerProc
from vllm.v1.serial_utils import run_method
from vllm.v1.worker.worker_base import WorkerWrapperBase

from keepkv_vllm import plugin
from keepkv_vllm.engine.messages import ORDERS_ATTR, RECORD_ATTR, ROWS_ATTR
from keepkv_vllm.server.stats import merge_ranks

MESSAGE_ATTRS = (ORDERS_ATTR, ROWS_ATTR, RECORD_ATTR)
#: the compiled-graph RayDistributedExecutor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) is in vLLM 0.32,
#: not in 0.33 (there "ray" always means RayExecutorV2)
RAY_V1 = "vllm.v1.executor.ray_executor"
HAS_RAY_V1 = importlib.util.find_spec(RAY_V1) is not None
needs_ray_v1 = pytest.mark.skipif(not HAS_RAY_V1, reason="this vLLM has no RayDistributedExecutor")


# -- source contracts ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Contract:
    """What one definition in vLLM's source must do: make these calls in this order (each the first
    call whose text contains the pattern), contain these pieces of code and not those. ``edit``
    (old, new) changes the definition so that the contract must fail: the check can fail."""

    name: str
    module: str
    path: tuple[str, ...]
    calls: tuple[str, ...] = ()
    has: tuple[str, ...] = ()
    lacks: tuple[str, ...] = ()
    edit: tuple[str, str] = ("", "")
    ray_v1: bool = False  # about RayDistributedExecutor, which only vLLM 0.32 has


CONTRACTS = [
    # (a) the plugin's config exists before the executor; every worker loads plugins, then builds worker_cls
    Contract(
        "vllm serve builds the config, then the engine",
        "vllm.entrypoints.launchers.api_server.entry",
        ("build_async_engine_client_from_engine_args",),
        calls=("engine_args.create_engine_config(", "AsyncLLM.from_vllm_config("),
        edit=(
            "vllm_config = engine_args.create_engine_config(",
            "AsyncLLM.from_vllm_config(vllm_config=None); vllm_config = engine_args.create_engine_config(",
        ),
    ),
    Contract(
        "AsyncLLM picks the executor class from the config",
        "vllm.v1.engine.async_llm",
        ("AsyncLLM", "from_vllm_config"),
        calls=("Executor.get_class(vllm_config)",),
        edit=("Executor.get_class(vllm_config)", "Executor.get_class(None)"),
    ),
    *[
        Contract(
            f"{label} builds the config, then picks the executor class",
            module,
            path,
            calls=("engine_args.create_engine_config(", "Executor.get_class(vllm_config)"),
            edit=(
                "vllm_config = engine_args.create_engine_config(",
                "Executor.get_class(vllm_config); vllm_config = engine_args.create_engine_config(",
            ),
        )
        for label, module, path in [
            ("AsyncLLM.from_engine_args", "vllm.v1.engine.async_llm", ("AsyncLLM", "from_engine_args")),
            ("LLMEngine.from_engine_args", "vllm.v1.engine.llm_engine", ("LLMEngine", "from_engine_args")),
            ("vllm serve --headless (a data-parallel node)", "vllm.entrypoints.cli.serve", ("run_headless",)),
            ("vllm serve, several API servers", "vllm.entrypoints.cli.serve", ("run_multi_api_server",)),
        ]
    ],
    Contract(
        "the engine core loads the plugins before it builds its executor",
        "vllm.v1.engine.core",
        ("EngineCore", "__init__"),
        calls=("load_general_plugins()", "executor_class(vllm_config)"),
        edit=("load_general_plugins()", "None"),
    ),
    Contract(
        "a worker wrapper loads the plugins, then builds parallel_config.worker_cls",
        "vllm.v1.worker.worker_base",
        ("WorkerWrapperBase", "init_worker"),
        calls=(
            "load_general_plugins()",
            "resolve_obj_by_qualname(parallel_config.worker_cls)",
            "worker_class(**",
        ),
        edit=("resolve_obj_by_qualname(parallel_config.worker_cls)", "resolve_obj_by_qualname('x.Worker')"),
    ),
    Contract(
        "RayDistributedExecutor's actors are worker wrappers",
        "vllm.v1.executor.ray_utils",
        ("RayWorkerWrapper",),
        has=("class RayWorkerWrapper(WorkerWrapperBase):",),
        lacks=("def init_worker(",),
        edit=("class RayWorkerWrapper(WorkerWrapperBase):", "class RayWorkerWrapper:"),
        ray_v1=True,
    ),
    Contract(
        "RayDistributedExecutor sends vLLM's environment, then builds each worker from the config",
        "vllm.v1.executor.ray_executor",
        ("RayDistributedExecutor", "_init_workers_ray"),
        # the environment carries VLLM_USE_V2_MODEL_RUNNER=0, which the plugin set in the engine
        calls=(
            "(RayWorkerWrapper).remote(",
            "self.collective_rpc('update_environment_variables'",
            "dict(vllm_config=self.vllm_config",
            "self.collective_rpc('init_worker', args=(all_kwargs,))",
        ),
        edit=(
            "self.collective_rpc('update_environment_variables'",
            "self.collective_rpc('init_worker', args=(all_kwargs,)); "
            "self.collective_rpc('update_environment_variables'",
        ),
        ray_v1=True,
    ),
    Contract(
        "RayExecutorV2 is the multiprocessing executor on Ray actors, built from the config",
        "vllm.v1.executor.ray_executor_v2",
        ("RayExecutorV2",),
        calls=("ray.remote(RayWorkerProc)", ".initialize_worker.remote("),
        has=("class RayExecutorV2(MultiprocExecutor):", ".remote(vllm_config=self.vllm_config"),
        # its steps and RPCs are MultiprocExecutor's (checked with real objects below)
        lacks=("def collective_rpc(", "def execute_model(", "def sample_tokens("),
        edit=(
            "class RayExecutorV2(MultiprocExecutor):",
            "class RayExecutorV2(MultiprocExecutor):\n\n    def collective_rpc(self, *args, **kwargs):\n"
            "        return []",
        ),
    ),
    Contract(
        "a RayExecutorV2 actor applies the engine's environment, then becomes a WorkerProc",
        "vllm.v1.executor.ray_executor_v2",
        ("RayWorkerProc", "initialize_worker"),
        calls=("os.environ.setdefault(key, value)", "super().__init__("),
        edit=("os.environ.setdefault(key, value)", "None"),
    ),
    Contract(
        "a WorkerProc builds its worker through a worker wrapper, with the config",
        "vllm.v1.executor.multiproc_executor",
        ("WorkerProc", "__init__"),
        calls=("WorkerWrapperBase(", "wrapper.init_worker(all_kwargs)"),
        has=("'vllm_config': vllm_config",),
        edit=("wrapper.init_worker(all_kwargs)", "None"),
    ),
    # (b) the scheduler's own SchedulerOutput object reaches every rank
    Contract(
        "the engine core hands the executor the scheduler's own output",
        "vllm.v1.engine.core",
        ("EngineCore", "step"),
        calls=(
            "self.scheduler.schedule(",
            "self.model_executor.execute_model(scheduler_output",
            "self.scheduler.update_from_output(scheduler_output",
        ),
        # dataclasses.replace keeps the fields and drops the plugin's attributes
        edit=("execute_model(scheduler_output", "execute_model(dataclasses.replace(scheduler_output)"),
    ),
    Contract(
        "RayDistributedExecutor runs its compiled graph on that object",
        "vllm.v1.executor.ray_executor",
        ("RayDistributedExecutor",),
        has=(
            "self.scheduler_output = scheduler_output",
            "return self._execute_dag(scheduler_output, None, non_block)",
            "scheduler_output = self.scheduler_output",
            "return self._execute_dag(scheduler_output, grammar_output, non_block)",
            "refs = self.forward_dag.execute((scheduler_output, grammar_output))",
        ),
        edit=("self.forward_dag.execute((scheduler_output,", "self.forward_dag.execute((None,"),
        ray_v1=True,
    ),
    Contract(
        "the compiled graph gives its input to every tensor-parallel worker",
        "vllm.v1.executor.ray_executor",
        ("RayDistributedExecutor", "_compiled_ray_dag"),
        has=(
            "outputs = [input_data for _ in self.pp_tp_workers[0]]",
            "outputs = [worker.execute_model_ray.bind(outputs[i]) for i, worker in enumerate(tp_group)]",
        ),
        edit=("for _ in self.pp_tp_workers[0]]", "for _ in self.pp_tp_workers[0][:1]]"),
        ray_v1=True,
    ),
    Contract(
        "a Ray worker hands it to its model runner (where compression hooks in)",
        "vllm.v1.executor.ray_utils",
        ("RayWorkerWrapper", "execute_model_ray"),
        has=("self.worker.model_runner.execute_model(scheduler_output, intermediate_tensors)",),
        edit=("execute_model(scheduler_output, intermediate", "execute_model(None, intermediate"),
        ray_v1=True,
    ),
    # (c) one answer per rank, in rank order
    Contract(
        "RayDistributedExecutor keeps its workers in rank order",
        "vllm.v1.executor.ray_executor",
        ("RayDistributedExecutor", "_init_workers_ray"),
        has=(
            "for i, item in enumerate(sorted_worker_metadata):\n        item.adjusted_rank = i",
            "self.workers = [item.worker for item in sorted_worker_metadata]",
            "self.collective_rpc('adjust_rank', args=(rerank_mapping,))",
            # ranks are positions in this list, which is self.workers while the dummy stays None
            "for worker in [self.driver_dummy_worker] + self.workers:",
            "for rank, (node_id, _) in enumerate(worker_node_and_physical_gpu_ids):",
            "rank=rank,",
        ),
        lacks=("self.driver_dummy_worker = ",),
        edit=("for item in sorted_worker_metadata]", "for item in worker_metadata]"),
        ray_v1=True,
    ),
    Contract(
        "RayDistributedExecutor.collective_rpc asks every worker, in that order",
        "vllm.v1.executor.ray_executor",
        ("RayDistributedExecutor", "collective_rpc"),
        has=(
            "ray_worker_outputs = [worker.execute_method.remote(sent_method, *args, **kwargs) "
            "for worker in self.workers]",
            "return ray.get(ray_worker_outputs, timeout=timeout)",
        ),
        edit=("for worker in self.workers]", "for worker in self.workers[:1]]"),
        ray_v1=True,
    ),
    Contract(
        "RayExecutorV2 keeps one answer queue per rank, in rank order",
        "vllm.v1.executor.ray_executor_v2",
        ("RayExecutorV2", "_init_executor"),
        has=(
            "for rank, (bundle_id_idx, node_id, node_ip) in enumerate(bundle_to_node_id):",
            "for bundle_idx in range(self.world_size):\n        bundle = bundle_assignments[bundle_idx]",
            "rank=bundle['rank']",
            "self.ray_worker_handles.append(handle)",
            "init_results = ray.get([h.actor.wait_for_init.remote() for h in self.ray_worker_handles])",
            "for i, result in enumerate(init_results):",
            "self.response_mqs.append(MessageQueue.create_from_handle(result['handle'], 0))",
        ),
        edit=("enumerate(init_results)", "enumerate(reversed(init_results))"),
    ),
]


@functools.cache
def module_tree(module: str) -> ast.Module:
    """A vLLM module's syntax tree, read without importing it (ray_executor_v2 imports ray)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"vLLM has no module {module}"
    return ast.parse(Path(spec.origin).read_text())


def definition(tree: ast.AST, path: tuple[str, ...]) -> ast.AST | None:
    """The class or function ``path[-1]`` inside ``path[:-1]``, found at any depth (RayWorkerWrapper
    is defined inside a try)."""
    node: ast.AST | None = tree
    for name in path:
        kinds = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        node = next((n for n in ast.walk(node) if isinstance(n, kinds) and n.name == name), None)
        if node is None:
            return None
    return node


def code(contract: Contract) -> str:
    """The contract's definition as ``ast.unparse`` writes it ("" when vLLM has none)."""
    node = definition(module_tree(contract.module), contract.path)
    return "" if node is None else ast.unparse(node)


def violations(contract: Contract, source: str) -> list[str]:
    """How ``source`` (the definition's code) breaks the contract; empty: it keeps it."""
    where = f"{contract.module}:{'.'.join(contract.path)}"
    if not source:
        return [f"{where} not found"]
    tree = ast.parse(source)
    problems = [f"{where} lacks {s!r}" for s in contract.has if s not in source]
    problems += [f"{where} has {s!r}" for s in contract.lacks if s in source]
    calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call)]
    found = []
    for pattern in contract.calls:
        at = [(c.lineno, c.col_offset) for c in calls if pattern in ast.unparse(c)]
        if at:
            found.append((min(at), pattern))
        else:
            problems.append(f"{where} makes no call {pattern!r}")
    if [p for _, p in sorted(found)] != [p for _, p in found]:
        problems.append(
            f"{where} calls {[p for _, p in sorted(found)]}, not in the order {list(contract.calls)}"
        )
    return problems


def contracts() -> list[Any]:
    return [pytest.param(c, id=c.name, marks=[needs_ray_v1] if c.ray_v1 else []) for c in CONTRACTS]


@pytest.mark.parametrize("contract", contracts())
def test_vllm_keeps_the_contract(contract):
    assert violations(contract, code(contract)) == []


@pytest.mark.parametrize("contract", contracts())
def test_each_source_check_fails_on_an_edited_source(contract):
    old, new = contract.edit
    source = code(contract)
    assert old and old in source, f"the edit of {contract.name!r} no longer applies to vLLM's source"
    assert violations(contract, source.replace(old, new, 1))


def test_the_order_check_catches_calls_out_of_order():
    contract = Contract("order", "m", ("f",), calls=("a(", "b("))
    assert violations(contract, "def f():\n    a()\n    b()") == []
    assert violations(contract, "def f():\n    b()\n    a()")
    assert violations(contract, "def f():\n    a()")


# -- (a) the worker class --------------------------------------------------------------------------
def test_vllms_cpu_platform_has_no_ray_device():
    # why no Ray run is possible here, whatever is installed
    from vllm.platforms.cpu import CpuPlatform

    assert not CpuPlatform.ray_device_key


@pytest.fixture
def ray_v2_stub(monkeypatch) -> type:
    """vLLM's RayExecutorV2 module needs ray to import; stand a module in for it."""
    stub = types.ModuleType("vllm.v1.executor.ray_executor_v2")
    stub.RayExecutorV2 = type("RayExecutorV2", (), {})
    monkeypatch.setitem(sys.modules, stub.__name__, stub)
    return stub.RayExecutorV2


def test_ray_means_ray_executor_v2_unless_vllm_is_told_otherwise(monkeypatch, ray_v2_stub):
    config = SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend="ray"))
    monkeypatch.delenv("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", raising=False)
    assert Executor.get_class(config) is ray_v2_stub
    if HAS_RAY_V1:  # vLLM 0.32: the compiled-graph executor on request
        from vllm.v1.executor.ray_executor import RayDistributedExecutor

        monkeypatch.setenv("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", "0")
        assert Executor.get_class(config) is RayDistributedExecutor


@pytest.fixture(scope="module")
def keepkv_config() -> Any:
    """The engine config ``--kv-compression keepkv`` gives the bundled model, through the plugin's hook."""
    from vllm.engine.arg_utils import EngineArgs

    from keepkv_vllm.assets import model_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # what the hook sets; kept out of other tests
        plugin.register()
        args = EngineArgs(
            model=str(model_dir()),
            dtype="float32",
            max_model_len=1024,
            additional_config={"kv_compression": {"method": "keepkv"}},
        )
        return args.create_engine_config()


@pytest.mark.parametrize("worker_cls", [plugin.CPU_WORKER_CLS, plugin.GPU_WORKER_CLS])
def test_a_worker_wrapper_builds_the_plugins_worker_after_loading_the_plugins(
    worker_cls, keepkv_config, monkeypatch
):
    # The hook chose the CPU worker on this machine (it chooses the GPU one on CUDA: tests/
    # test_vllm_contract.py); the config crosses to the worker as Ray ships actor arguments.
    import vllm.plugins
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert keepkv_config.parallel_config.worker_cls == plugin.CPU_WORKER_CLS
    keepkv_config.parallel_config.worker_cls = worker_cls
    try:
        shipped = cloudpickle.loads(cloudpickle.dumps(keepkv_config))
    finally:
        keepkv_config.parallel_config.worker_cls = plugin.CPU_WORKER_CLS
    events: list[Any] = []
    cls = resolve_obj_by_qualname(worker_cls)
    monkeypatch.setattr(vllm.plugins, "load_general_plugins", lambda: events.append("plugins"))
    # the platform's kernel overrides are the platform's business (and global): not run here
    monkeypatch.setattr(current_platform, "register_triton_kernel_overrides", lambda: None)
    # building a real worker would start a device; record what the wrapper builds instead
    monkeypatch.setattr(cls, "__init__", lambda self, **kwargs: events.append(("worker", kwargs)))
    wrapper = WorkerWrapperBase(rpc_rank=0)
    kwargs = {"vllm_config": shipped, "local_rank": 0, "rank": 0, "distributed_init_method": "tcp://x:1"}
    wrapper.init_worker([{**kwargs, "is_driver_worker": True}])
    assert type(wrapper.worker) is cls
    assert [e if e == "plugins" else e[0] for e in events] == ["plugins", "worker"]
    config = events[1][1]["vllm_config"]
    assert config.additional_config["kv_compression"] == {"method": "keepkv"}
    assert config.scheduler_config.scheduler_cls == plugin.SCHEDULER_CLS


def test_the_plugins_workers_leave_execute_model_to_vllm():
    # RayDistributedExecutor's graph calls the model runner directly (execute_model_ray), skipping
    # Worker.execute_model: compression must not live there, and does not (the runner has it)
    from keepkv_vllm.engine.cpu.worker import KeepKVCPUWorker
    from keepkv_vllm.engine.gpu.worker import KeepKVGPUWorker
    from keepkv_vllm.engine.worker import CompressionWorkerMixin

    for cls in (KeepKVCPUWorker, KeepKVGPUWorker, CompressionWorkerMixin):
        own = [c for c in cls.__mro__ if c.__module__.startswith("keepkv_vllm")]
        assert not any("execute_model" in vars(c) for c in own), cls


# -- (b) the orders on the SchedulerOutput -------------------------------------------------------
def test_scheduler_output_pickles_its_whole_instance_dict():
    # pickle and cloudpickle save a plain class's __dict__: attributes set on it travel
    assert dataclasses.is_dataclass(SchedulerOutput)
    assert not any("__slots__" in vars(c) for c in SchedulerOutput.__mro__)
    for name in ("__reduce__", "__reduce_ex__", "__getstate__", "__setstate__", "__getnewargs_ex__"):
        assert getattr(SchedulerOutput, name, None) is getattr(object, name, None), name
    msgspec = pytest.importorskip("msgspec")
    assert not issubclass(SchedulerOutput, msgspec.Struct)


@pytest.fixture(scope="module")
def scheduled() -> dict[str, Any]:
    """Real KeepKVScheduler outputs: the first step's (new window rows) and the first with orders."""
    from keepkv_vllm.bench import schedulers
    from keepkv_vllm.engine.scheduler import KeepKVScheduler

    block_size, num_requests = 32, 8
    lengths = schedulers.prompt_lengths(num_requests, block_size, prompt_blocks=2)
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 2  # pressure within a few blocks
    settings = schedulers.compression_settings(watermark=0.05, window_memory=0.5, budget=0.3)
    config = schedulers.build_vllm_config(
        num_requests, sum(lengths), settings, block_size, max_model_len=1024
    )
    scheduler = schedulers.make_scheduler(KeepKVScheduler, config, num_blocks)
    for request in schedulers.make_requests(lengths, 200, config):
        scheduler.add_request(request)
    logger = logging.getLogger("vllm.keepkv")
    level, logger.level = logger.level, logging.WARNING  # a line per compression otherwise
    outputs = {}
    try:
        for _ in range(150):
            _, out = schedulers.step(scheduler)
            if getattr(out, ROWS_ATTR):
                outputs.setdefault("rows", out)
            if getattr(out, ORDERS_ATTR):
                outputs["orders"] = out
                break
    finally:
        logger.setLevel(level)
    assert set(outputs) == {"rows", "orders"}, "the workload no longer compresses"
    return outputs


def messages(output: SchedulerOutput) -> dict[str, Any]:
    """The plugin's attributes as set on the output (a missing one is reported as missing)."""
    return {name: vars(output).get(name, "<missing>") for name in MESSAGE_ATTRS}


@pytest.mark.parametrize(
    "codec",
    [
        pytest.param(lambda o: pickle.loads(pickle.dumps(o, protocol=5)), id="pickle-5"),
        pytest.param(lambda o: cloudpickle.loads(cloudpickle.dumps(o, protocol=5)), id="cloudpickle-5"),
    ],
)
def test_the_orders_survive_ray_serialization(scheduled, codec):
    # Ray pickles actor-call arguments and compiled-graph channel data at protocol 5 with its
    # vendored cloudpickle; ray is not installed here, so cloudpickle itself stands in
    for output in scheduled.values():
        copy = codec(output)
        assert messages(copy) == messages(output)
        assert copy.num_scheduled_tokens == output.num_scheduled_tokens
    assert getattr(scheduled["orders"], ORDERS_ATTR) and getattr(scheduled["rows"], ROWS_ATTR)


class Rank:
    """One rank's end of RayExecutorV2's control plane: a broadcast reader, an answer queue (over
    TCP from another node), and vLLM's own WorkerProc request handling around a worker wrapper."""

    def __init__(self, rank: int, broadcast: MessageQueue, worker: Any) -> None:
        self.rank, self.use_async_scheduling = rank, False
        self.requests = MessageQueue.create_from_handle(broadcast.export_handle(), rank)
        # as RayWorkerProc._init_message_queues: shared memory on the executor's node, else TCP
        self.worker_response_mq = MessageQueue(
            n_reader=1, n_local_reader=int(rank == 0), connect_ip="127.0.0.1"
        )
        self.worker = WorkerWrapperBase(rpc_rank=0, global_rank=rank)
        self.worker.worker, self.worker.mm_receiver_cache = worker, None
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.error: BaseException | None = None

    handle_output = WorkerProc.handle_output
    enqueue_output = WorkerProc.enqueue_output
    _execute_worker_rpc = WorkerProc._execute_worker_rpc

    def serve(self) -> None:
        try:
            self.requests.wait_until_ready()
            self.worker_response_mq.wait_until_ready()
            while (request := self.requests.dequeue(timeout=60)) is not None:
                self._execute_worker_rpc(request)
        except BaseException as e:  # reported by the test
            self.error = e


@contextlib.contextmanager
def ray_v2_control_plane(workers: list[Any]) -> Iterator[MultiprocExecutor]:
    """vLLM's MultiprocExecutor (RayExecutorV2's steps and RPCs) on real message queues to
    ``len(workers)`` ranks: rank 0 on the executor's node, the others "remote" (TCP)."""
    broadcast = MessageQueue(n_reader=len(workers), n_local_reader=1, connect_ip="127.0.0.1")
    ranks = [Rank(rank, broadcast, worker) for rank, worker in enumerate(workers)]
    answers = [MessageQueue.create_from_handle(r.worker_response_mq.export_handle(), 0) for r in ranks]
    for rank in ranks:
        rank.thread.start()
    executor = object.__new__(MultiprocExecutor)  # its __init__ would start worker processes
    try:
        broadcast.wait_until_ready()
        for answer in answers:
            answer.wait_until_ready()
        vars(executor).update(
            rpc_broadcast_mq=broadcast,
            response_mqs=answers,
            futures_queue=deque(),
            is_failed=False,
            output_rank=0,
            kv_output_aggregator=None,
            ec_output_aggregator=None,
        )
        yield executor
    finally:
        broadcast.enqueue(None)  # every rank's loop ends
        for rank in ranks:
            rank.thread.join(timeout=60)
        errors = [r.error for r in ranks if r.error is not None or r.thread.is_alive()]
        for queue in [
            broadcast,
            *answers,
            *(r.requests for r in ranks),
            *(r.worker_response_mq for r in ranks),
        ]:
            queue.shutdown()
        del broadcast, answers, ranks, executor
        gc.collect()  # the shared-memory rings go with their queues
        assert not errors, errors


class RecordingWorker:
    """Stands for a device worker: keeps what execute_model was handed."""

    def __init__(self) -> None:
        self.handed: list[SchedulerOutput] = []

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        self.handed.append(scheduler_output)


def test_every_rank_gets_the_orders_through_vllms_message_queue(scheduled):
    # RayExecutorV2.execute_model is MultiprocExecutor's: one broadcast of the SchedulerOutput to
    # every rank (only output_rank answers; every rank runs it), pickled by MessageQueue.enqueue
    workers = [RecordingWorker(), RecordingWorker()]
    with ray_v2_control_plane(workers) as executor:
        for output in scheduled.values():
            executor.execute_model(output)
    for worker in workers:
        assert [messages(o) for o in worker.handed] == [messages(o) for o in scheduled.values()]
        assert all(
            o is not s for o, s in zip(worker.handed, scheduled.values(), strict=True)
        )  # it did travel


# -- (c) counters from every rank ------------------------------------------------------------------
def plugin_worker(stats: dict[str, float]) -> Any:
    """The plugin's CPU worker class, not started: its RPC targets answer from a runner stand-in."""
    from keepkv_vllm.engine.cpu.worker import KeepKVCPUWorker

    worker = object.__new__(KeepKVCPUWorker)
    worker.model_runner = SimpleNamespace(kvc_stats=lambda: dict(stats))
    return worker


def rank_stats(orders: int, digest: int, merged: int) -> dict[str, float]:
    return {"orders": orders, "order_digest": digest, "entries_merged": merged}


def test_ray_v2_collective_rpc_answers_once_per_rank_in_rank_order():
    stats = [rank_stats(3, 11, 40), rank_stats(3, 11, 50), rank_stats(4, 12, 60)]  # rank 2 ran one more
    with ray_v2_control_plane([plugin_worker(s) for s in stats]) as executor:
        answers = executor.collective_rpc("kv_compression_worker_stats")
    assert answers == stats
    assert merge_ranks(answers[:2])[1] is True and merge_ranks(answers)[1] is False


@needs_ray_v1
def test_ray_v1_collective_rpc_answers_once_per_rank_in_rank_order(monkeypatch):
    # RayDistributedExecutor.collective_rpc itself, with Ray's remote call and get stood in for:
    # each actor runs RayWorkerWrapper.execute_method, i.e. run_method on its worker wrapper
    from vllm.v1.executor import ray_executor

    class Actor:
        def __init__(self, stats: dict[str, float]) -> None:
            self.wrapper = WorkerWrapperBase(rpc_rank=0)
            self.wrapper.worker = plugin_worker(stats)
            remote = lambda method, *args, **kwargs: lambda: run_method(self.wrapper, method, args, kwargs)
            self.execute_method = SimpleNamespace(remote=remote)

    fake_ray = SimpleNamespace(get=lambda refs, timeout=None: [ref() for ref in refs])
    monkeypatch.setattr(ray_executor, "ray", fake_ray)
    stats = [rank_stats(2, 7, 10), rank_stats(2, 7, 11), rank_stats(2, 8, 12)]
    executor = object.__new__(ray_executor.RayDistributedExecutor)
    executor.workers = [Actor(s) for s in stats]
    answers = executor.collective_rpc("kv_compression_worker_stats")
    assert answers == stats and merge_ranks(answers)[1] is False


def test_the_stats_calls_reach_every_executors_collective_rpc():
    # server/stats.py: call_utility("collective_rpc", method, None, (), None) on the engine core,
    # which passes (method, timeout, args, kwargs) on to its executor positionally
    import inspect

    from vllm.v1.engine.core import EngineCore

    def params(fn: Any) -> list[str]:
        return [p for p in inspect.signature(fn).parameters if p != "self"][:4]

    executors = [MultiprocExecutor]  # and so RayExecutorV2, which keeps its collective_rpc (above)
    if HAS_RAY_V1:
        from vllm.v1.executor.ray_executor import RayDistributedExecutor

        executors.append(RayDistributedExecutor)
    for fn in [EngineCore.collective_rpc, *(e.collective_rpc for e in executors)]:
        assert params(fn) == ["method", "timeout", "args", "kwargs"], fn.__qualname__
    source = ast.unparse(definition(module_tree("vllm.v1.engine.core"), ("EngineCore", "collective_rpc")))
    assert "return self.model_executor.collective_rpc(method, timeout, args, kwargs)" in source

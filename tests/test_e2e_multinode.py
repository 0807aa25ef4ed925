"""Data parallel over two nodes, as vLLM deploys it: real `vllm serve` process trees on loopback.

A head node (`--data-parallel-size 2 --data-parallel-size-local 1`, the API server and engine
rank 0) and a secondary node (`--headless --data-parallel-start-rank 1`, engine rank 1), each its
own process tree as on two machines, joined through vLLM's handshake at the head's
`--data-parallel-address/--data-parallel-rpc-port`. Both run `--kv-compression keepkv` on a pool
that holds one request uncompressed; six needle requests at once reach both engines through the
head's API server, so both compress under pressure. The head's `GET /v1/kv_compression` and
`/metrics` count every engine, each under its rank. A request with compression off is
token-identical to stock vLLM on the same two-node layout. A secondary started without the
plugin, or with other compression settings, is refused by the head before it serves, in one line.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from keepkv_vllm.bench import server as bench_server
from keepkv_vllm.bench.server import SERVED_NAME, ServerProcess, smollm2_flags

pytestmark = pytest.mark.slow

POOL_BLOCKS = 14  # per engine: one 1,280-token request (11 blocks) fits uncompressed, two do not
PROMPT_TOKENS = 1280
OUTPUT_TOKENS = 32
NUM_REQUESTS = 6  # three per engine
COMMON = smollm2_flags(1408, POOL_BLOCKS * 128 * bench_server.SMOLLM2_KV_BYTES_PER_TOKEN)
SETTINGS = {"budget": 0.3, "window_memory": 0.05}
RESULTS = Path(__file__).resolve().parents[1] / "results"


def keepkv(settings: dict) -> list[str]:
    return ["--kv-compression", "keepkv", "--kv-compression-config", json.dumps(settings)]


class TwoNodes:
    """A head node and a headless secondary, each its own `vllm serve` process tree."""

    def __init__(self, head_flags: list[str], node_flags: list[str], **node_env: str) -> None:
        dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1"]
        dp += [
            "--data-parallel-address",
            "127.0.0.1",
            "--data-parallel-rpc-port",
            str(bench_server.free_port()),
        ]
        secondary = ["--headless", "--data-parallel-start-rank", "1"]
        self.head = ServerProcess(COMMON + head_flags + dp, startup_timeout=900)
        self.node = ServerProcess(COMMON + node_flags + dp + secondary)
        # each "machine" computes on its own core (or both on the test worker's share of them)
        share = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        self.binds = (share or "0", share or "1")
        self.node_env = node_env

    def __enter__(self) -> TwoNodes:
        self.head.launch(VLLM_CPU_OMP_THREADS_BIND=self.binds[0])
        self.node.launch(VLLM_CPU_OMP_THREADS_BIND=self.binds[1], **self.node_env)
        try:
            self.head.wait_healthy()  # healthy once both engines joined
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.head.stop()
        self.node.stop()


def complete(server: ServerProcess, prompt: list[int], xargs: dict | None = None) -> str:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600)
    out = client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=OUTPUT_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})},
    )
    return out.choices[0].text


def metrics_text(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=30) as r:
        return r.read().decode()


def per_engine_compressions(text: str) -> dict[int, float]:
    found = re.findall(r'^keepkv_compressions_total\{engine="(\d+)"\} ([\d.]+)$', text, re.M)
    return {int(engine): float(n) for engine, n in found}


def mirrored(server: ServerProcess, stats: dict) -> str:
    """/metrics once it mirrors ``stats`` (the API server copies the engines' counters once a
    second), or after 30 s."""
    text = metrics_text(server)
    if not stats.get("enabled"):
        return text
    want = {e["engine"]: e["counters"]["compressions"] for e in stats["per_engine"]}
    deadline = time.monotonic() + 30
    while per_engine_compressions(text) != want and time.monotonic() < deadline:
        time.sleep(1)
        text = metrics_text(server)
    return text


@pytest.fixture(scope="module")
def prompts(needle_factory):
    return [needle_factory.make(PROMPT_TOKENS, 0.2 + 0.1 * i, 40 + i) for i in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def two_nodes(prompts):
    results = {}
    for name, flags in (("keepkv", keepkv(SETTINGS)), ("stock", [])):
        with TwoNodes(flags, flags) as nodes:
            with ThreadPoolExecutor(NUM_REQUESTS) as pool:
                texts = list(pool.map(lambda p: complete(nodes.head, p.token_ids), prompts))
            witness = complete(nodes.head, prompts[0].token_ids, {"kv_compression": "off"})
            stats = nodes.head.get_json("/v1/kv_compression")
            results[name] = {
                "score": sum(p.passcode in t for p, t in zip(prompts, texts, strict=True)),
                "witness": witness,
                "stats": stats,
                "metrics": mirrored(nodes.head, stats),
            }
    RESULTS.mkdir(exist_ok=True)
    summary = {
        n: {"score": r["score"], "per_engine": r["stats"].get("per_engine")} for n, r in results.items()
    }
    (RESULTS / "e2e_two_nodes.json").write_text(json.dumps(summary, indent=1))
    return results


def test_both_nodes_compress_under_pressure_and_the_head_counts_each(two_nodes):
    stats = two_nodes["keepkv"]["stats"]
    assert stats["enabled"] and stats["engines"] == 2 and stats["ranks_agree"] is True
    engines = stats["per_engine"]
    assert [e["engine"] for e in engines] == [0, 1]
    assert all(e["counters"]["compressions"] > 0 for e in engines), engines  # both compressed
    assert all(e["worker"]["orders"] == e["counters"]["compressions"] for e in engines)
    assert stats["counters"]["compressions"] == sum(e["counters"]["compressions"] for e in engines)
    assert all(e["kv_cache"]["free_blocks"] == e["kv_cache"]["total_blocks"] for e in engines)
    assert sum(e["counters"]["preemptions"] for e in engines) == 0


def test_metrics_on_the_head_count_every_engine_under_its_rank(two_nodes):
    engines = two_nodes["keepkv"]["stats"]["per_engine"]
    counted = per_engine_compressions(two_nodes["keepkv"]["metrics"])
    assert counted == {e["engine"]: e["counters"]["compressions"] for e in engines} and len(counted) == 2
    assert "keepkv_compressions_total" not in two_nodes["stock"]["metrics"]


def test_an_uncompressed_request_is_stock_vllm_on_the_same_two_nodes(two_nodes):
    assert two_nodes["keepkv"]["witness"] == two_nodes["stock"]["witness"]
    assert two_nodes["keepkv"]["score"] >= two_nodes["stock"]["score"] - 1


@pytest.mark.parametrize(
    "node_flags, node_env, says",
    [
        (keepkv({**SETTINGS, "budget": 0.2}), {}, "engine 1 runs other kv compression settings than this "
         "API server: budget=0.2 (expected 0.3)"),
        ([], {"VLLM_PLUGINS": "none"}, "an engine of this deployment runs without the keepkv plugin"),
    ],
    ids=["other-settings", "no-plugin"],
)  # fmt: skip
def test_a_secondary_that_differs_is_refused_before_serving(node_flags, node_env, says):
    with pytest.raises(RuntimeError) as refused:
        with TwoNodes(keepkv(SETTINGS), node_flags, **node_env):
            pass
    assert says in str(refused.value).splitlines()[0]  # the head's first error line says why

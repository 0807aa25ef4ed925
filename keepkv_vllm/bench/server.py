"""Start and stop a real ``vllm serve`` subprocess on a free loopback port.

Used by the end-to-end tests, the quality harness and the throughput benchmark, so all of
them exercise the same thing a user runs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from keepkv_vllm.assets import model_dir

SERVED_NAME = "smollm2"
#: SmolLM2-135M in fp32: 30 layers x 3 kv-heads x 64 dims x 2 (K, V) x 4 bytes per token
SMOLLM2_KV_BYTES_PER_TOKEN = 46_080


def smollm2_flags(
    max_model_len: int,
    kv_bytes: int | None = None,
    *,
    batched_tokens: int | None = 512,
    dtype: str = "float32",
    eager: bool = True,
) -> list[str]:
    """``vllm serve`` flags of a small CPU server of the bundled model, the end-to-end tests'
    common part: eager (a ~35 s start instead of ~100 s of torch.compile, the same for every
    server compared), prompts prefilled in chunks of ``batched_tokens``, a KV pool of ``kv_bytes``."""
    flags = ["--dtype", dtype, "--max-model-len", str(max_model_len)]
    flags += ["--enforce-eager"] if eager else []
    flags += ["--max-num-batched-tokens", str(batched_tokens)] if batched_tokens else []
    flags += ["--gpu-memory-utilization", "0.3"]  # on the CPU: the share of host memory vLLM may take
    flags += ["--kv-cache-memory-bytes", str(kv_bytes)] if kv_bytes is not None else []
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    return str(Path(sys.executable).with_name("vllm"))


class ServerProcess:
    """``vllm serve MODEL ARGS`` on 127.0.0.1:<free port>; a context manager."""

    def __init__(
        self,
        args: list[str],
        model: str | None = None,
        startup_timeout: float = 600.0,
        dev_mode: bool = False,
    ) -> None:
        self.dev_mode = dev_mode  # vLLM's development endpoints (benchmarks: /reset_prefix_cache)
        self.port = free_port()
        self.model = model or str(model_dir())
        self.args = args
        self.startup_timeout = startup_timeout
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def reset_prefix_cache(self) -> None:
        """Empty the server's prefix cache (``dev_mode`` servers, nothing running): a benchmark row
        must not find the previous row's prompts cached."""
        request = urllib.request.Request(f"{self.base_url}/reset_prefix_cache", data=b"", method="POST")
        for _ in range(20):  # refused while the last requests still hold blocks: try again shortly
            with urllib.request.urlopen(request, timeout=60) as r:
                if json.loads(r.read()).get("success"):
                    return
            time.sleep(0.5)
        raise RuntimeError("vllm serve did not reset its prefix cache (requests still running?)")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            vllm_executable(),
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            SERVED_NAME,
            *self.args,
        ]

    def start(self) -> ServerProcess:
        """Launch and wait until the API server answers /health (every engine is up)."""
        return self.launch().wait_healthy()

    def launch(self, **env: str) -> ServerProcess:
        """Start the process and return at once (a ``--headless`` data-parallel node serves no
        HTTP: its head's /health says when it has joined); ``env`` adds to the environment."""
        full = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "INFO"), **env}
        full.pop("TRITON_INTERPRET", None)  # the test suite's kernel switch is not for the engine
        if self.dev_mode:
            full["VLLM_SERVER_DEV_MODE"] = "1"
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=full)
        return self

    def wait_healthy(self) -> ServerProcess:
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {self.proc.returncode}: {self.first_error()}\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve did not become healthy in {self.startup_timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 40) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def first_error(self) -> str:
        """The log's first exception line: a failed engine core's root cause comes long before
        the API server's traceback that ends the log."""
        for line in Path(self.log.name).read_text(errors="replace").splitlines():
            if re.match(r"^(\(.*?\))?\s*(\w+\.)*\w*(Error|Exception): ", line):
                return line.strip()
        return "(no exception line in the log)"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        """Unlabelled sums of every Prometheus sample on /metrics, by metric name."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=30) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

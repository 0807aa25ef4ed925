"""Serving checks run inside the CPU image by deploy/test-image.sh (a RUN step of a test image).

    python image_checks.py image.json   # {"entrypoint": [...], "cmd": [...], "healthcheck": [...]}

Starts the image's entrypoint with its default command in the background, then checks, one
line each (``image-check: ok|FAIL <what>``): /health, a chat completion through the openai
client, GET /v1/kv_compression showing keepkv, the server process's uid, and the image's
HEALTHCHECK command. Exits non-zero if any check fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

BASE = "http://127.0.0.1:8000"


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"image-check: {'ok' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def wait_healthy(server: subprocess.Popen, timeout: float = 900) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{BASE}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(2)
    return False


def main() -> int:
    with open(sys.argv[1]) as f:
        image = json.load(f)
    entrypoint, command, healthcheck = image["entrypoint"], image["cmd"], image["healthcheck"]
    log = open("/tmp/serve.log", "w")  # lives as long as the server
    start = time.monotonic()
    server = subprocess.Popen(entrypoint + command, stdout=log, stderr=subprocess.STDOUT)
    results = [check("/health", wait_healthy(server), f"{time.monotonic() - start:.0f} s after start")]
    if not results[0]:
        print(open("/tmp/serve.log").read()[-4000:])
        return 1
    import openai

    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="none")
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    text = reply.choices[0].message.content or ""
    results.append(check("chat completion", bool(text.strip()), repr(text)))
    with urllib.request.urlopen(f"{BASE}/v1/kv_compression", timeout=30) as r:
        stats = json.loads(r.read())
    method = stats.get("config", {}).get("method")
    results.append(
        check("GET /v1/kv_compression", stats.get("enabled") is True and method == "keepkv", method)
    )
    uid = os.stat(f"/proc/{server.pid}").st_uid
    results.append(check("server runs as uid 1000", uid == 1000, f"uid {uid}"))
    if healthcheck and healthcheck[0] == "CMD":
        probe = subprocess.run(healthcheck[1:], capture_output=True, text=True, timeout=30)
        results.append(check("HEALTHCHECK command", probe.returncode == 0, f"exit {probe.returncode}"))
    else:
        results.append(check("HEALTHCHECK command", False, f"none in the image: {healthcheck}"))
    server.terminate()
    server.wait(timeout=60)
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

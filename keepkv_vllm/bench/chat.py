"""A chat-like workload driven by vLLM's own client (``vllm bench serve``).

Prompt and output lengths are drawn, seeded, from log-normal distributions (heavy-tailed: most
requests are short, a few are long, as in chat traffic); prompts are Paul Graham essay excerpts
with an instruction, written as vLLM's ``custom`` dataset (JSONL with ``prompt`` and
``output_tokens``; vLLM applies the chat template). ``vllm bench serve`` sends them with
``--ignore-eos``, so every run produces exactly the same output tokens, and per-request
compression options travel in ``--extra-body``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "\n\nSummarize the passage above in your own words."


@dataclass(frozen=True)
class ChatMix:
    """Log-normal lengths: ``median`` and ``sigma`` of the log, clipped to [low, high]."""

    prompt_median: int = 384
    prompt_sigma: float = 0.9
    prompt_range: tuple[int, int] = (32, 2048)
    output_median: int = 128
    output_sigma: float = 0.9
    output_range: tuple[int, int] = (8, 768)

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """One request's (prompt tokens, output tokens)."""

        def one(median: int, sigma: float, bounds: tuple[int, int]) -> int:
            return int(min(bounds[1], max(bounds[0], round(rng.lognormvariate(0.0, sigma) * median))))

        return (
            one(self.prompt_median, self.prompt_sigma, self.prompt_range),
            one(self.output_median, self.output_sigma, self.output_range),
        )


def make_requests(tokenizer: object, text: str, count: int, seed: int, mix: ChatMix) -> list[dict]:
    """``count`` requests: {"prompt": excerpt + instruction, "output_tokens": n}, seeded."""
    rng = random.Random(seed)
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    out = []
    for _ in range(count):
        prompt_tokens, output_tokens = mix.draw(rng)
        start = rng.randrange(0, len(ids) - prompt_tokens)
        excerpt = tokenizer.decode(ids[start : start + prompt_tokens])  # type: ignore[attr-defined]
        out.append({"prompt": excerpt + INSTRUCTION, "output_tokens": output_tokens})
    return out


def held_tokens(tokenizer: object, request: dict) -> int:
    """Tokens a request holds at its end: its prompt in the chat template, plus its output.
    (``apply_chat_template`` returns a dict of encodings unless told otherwise: its length
    would be 2.)"""
    messages = [{"role": "user", "content": request["prompt"]}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)  # type: ignore[attr-defined]
    return len(ids) + request["output_tokens"]


def write_dataset(requests: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def bench_serve(
    base_url: str,
    served_name: str,
    tokenizer_dir: str,
    dataset: Path,
    num_prompts: int,
    concurrency: int,
    seed: int,
    xargs: dict | None = None,
) -> dict:
    """Run ``vllm bench serve`` against a running server; its saved result (a dict)."""
    with tempfile.TemporaryDirectory(prefix="keepkv-bench-serve-") as out:
        command = [
            str(Path(sys.executable).with_name("vllm")),
            "bench",
            "serve",
            "--backend",
            "openai",
            "--base-url",
            base_url,
            "--endpoint",
            "/v1/completions",
            "--model",
            served_name,
            "--tokenizer",
            tokenizer_dir,
            "--dataset-name",
            "custom",
            "--dataset-path",
            str(dataset),
            "--custom-output-len",
            "-1",
            "--disable-shuffle",
            "--num-prompts",
            str(num_prompts),
            "--max-concurrency",
            str(concurrency),
            "--request-rate",
            "inf",
            "--ignore-eos",
            "--seed",
            str(seed),
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,99",
            "--disable-tqdm",
            "--save-result",
            "--result-dir",
            out,
            "--result-filename",
            "result.json",
        ]
        if xargs:
            command += ["--extra-body", json.dumps({"vllm_xargs": xargs})]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}")
        return json.loads((Path(out) / "result.json").read_text())

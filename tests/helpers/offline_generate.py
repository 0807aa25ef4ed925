"""Run one offline vLLM engine over a JSON spec; print greedy tokens and compression stats.

    python tests/helpers/offline_generate.py '{"prompts": [[...]], ...}'

A helper for tests that compare engines on the same schedule (all requests submitted at
once, greedy). The engine core runs in its own process, as vLLM does by default; settings
that must reach it (TRITON_INTERPRET, KEEPKV_ATTENTION_BACKEND) come from the environment.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from keepkv_vllm.assets import model_dir

    compression = spec.get("kv_compression")
    llm = LLM(
        spec.get("model") or str(model_dir()),
        dtype="float32",
        max_model_len=spec["max_model_len"],
        block_size=spec["block_size"],
        enforce_eager=spec.get("enforce_eager", True),
        enable_prefix_caching=False,
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 512),
        kv_cache_memory_bytes=spec["kv_cache_memory_bytes"],
        kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
        gpu_memory_utilization=0.3,
        additional_config={"kv_compression": compression} if compression else {},
        seed=0,
    )
    params = [
        SamplingParams(
            max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True, extra_args=extra or None
        )
        for extra in spec["extra_args"]
    ]
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False
    )
    stats = {}
    if compression:
        stats = llm.llm_engine.engine_core.call_utility("kv_compression_stats")
        stats["worker"] = llm.llm_engine.engine_core.collective_rpc("kv_compression_worker_stats")
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "stats": stats}))


if __name__ == "__main__":
    main()

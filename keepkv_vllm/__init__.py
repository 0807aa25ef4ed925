"""keepkv-vllm: KV-cache merging (KeepKV and friends) for vLLM."""

__version__ = "0.1.0"

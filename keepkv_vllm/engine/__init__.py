"""The vLLM glue: scheduler, worker, model runner and attention backend subclasses.

Only this package (and keepkv_vllm.plugin / keepkv_vllm.server) imports vLLM; the
algorithms stay pure torch in keepkv_vllm.methods and keepkv_vllm.attention.
"""

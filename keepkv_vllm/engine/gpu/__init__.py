"""The CUDA platform: vLLM's GPU worker and V1 runner with compression, and the vote-weighted
backend on FlashAttention's page layout (kernels in keepkv_vllm/kernels/triton_vote_attention.py).
Nothing here imports vLLM's CPU modules: importing it leaves torch's CUDA functions as they are."""

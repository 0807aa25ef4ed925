"""KV compression methods: one file per method, one interface, one registry (pure torch).

Importing this package registers every method; ``get_method(name, **options)`` builds one.
"""

from keepkv_vllm.methods.base import METHODS, CompressionResult, KVCompressionMethod, get_method
from keepkv_vllm.methods.cam import CaM
from keepkv_vllm.methods.h2o import H2O
from keepkv_vllm.methods.keepkv import KeepKV
from keepkv_vllm.methods.kvmerger import KVMerger
from keepkv_vllm.methods.snapkv import SnapKV
from keepkv_vllm.methods.streamingllm import StreamingLLM

__all__ = [
    "METHODS",
    "CaM",
    "CompressionResult",
    "H2O",
    "KVCompressionMethod",
    "KVMerger",
    "KeepKV",
    "SnapKV",
    "StreamingLLM",
    "get_method",
]

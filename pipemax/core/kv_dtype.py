"""The KV cache's storage type: names, bytes per element and bytes per chunk, without torch.

`kv_cache_dtype` is what the user asks for ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"); the storage
name is what a pool holds: "auto" is the model's dtype ("bfloat16", "float16", "float32"), "fp8"
is "fp8_e4m3". An fp8 chunk carries one float32 scale per row (token), layer, K/V and KV head
beside its data (in a parallel block that moves with the chunk), so its bytes are the data at one
byte an element plus those scales (4 / head_dim more: 3% at head_dim 128). Every budget (VRAM,
PCIe per step, planner, simulator) counts chunks through kv_chunk_bytes, so it counts the KV dtype.
"""

from __future__ import annotations

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
FP8_STORAGE = ("fp8_e4m3", "fp8_e5m2")
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}
SCALE_BYTES = 4  # one float32 scale per (token, layer, K or V, KV head) of an fp8 chunk


def kv_storage_name(kv_cache_dtype: str, model_dtype: str) -> str:
    """The storage name of a KV pool: the model's dtype for "auto", "fp8_e4m3" for "fp8"."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        if model_dtype not in ELEMENT_BYTES or model_dtype in FP8_STORAGE:
            raise ValueError(f"the model dtype {model_dtype!r} is not one a KV cache can take")
        return model_dtype
    return "fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype


def is_fp8(storage: str) -> bool:
    return storage in FP8_STORAGE


def kv_element_bytes(storage: str) -> int:
    return ELEMENT_BYTES[storage]


def kv_scale_bytes(num_layers: int, num_kv_heads: int, chunk_tokens: int, storage: str) -> int:
    """Bytes of one chunk's scales: none unless fp8."""
    return 2 * num_layers * chunk_tokens * num_kv_heads * SCALE_BYTES if is_fp8(storage) else 0


def kv_chunk_bytes(num_layers: int, num_kv_heads: int, head_dim: int, chunk_tokens: int, storage: str) -> int:
    """Bytes of one chunk of `num_layers` layers: K and V of chunk_tokens tokens, plus fp8 scales."""
    data = 2 * num_layers * chunk_tokens * num_kv_heads * head_dim * kv_element_bytes(storage)
    return data + kv_scale_bytes(num_layers, num_kv_heads, chunk_tokens, storage)


def kv_token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, storage: str, chunk_tokens: int = 1) -> int:
    """Bytes per token of KV over num_layers layers, its fp8 scales included (the same for every
    chunk size: scales are per token; chunk_tokens is accepted for callers that think in chunks)."""
    return kv_chunk_bytes(num_layers, num_kv_heads, head_dim, chunk_tokens, storage) // chunk_tokens

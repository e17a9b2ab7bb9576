"""KV pools of one pipeline stage: the tensors behind the ids that kv_manager hands out.

    gpu  [num_gpu_chunks,  layers, 2, chunk_tokens, num_kv_heads, head_dim]  on the stage's device
    host [num_host_chunks, layers, 2, chunk_tokens, num_kv_heads, head_dim]  pinned host memory
                                                                            when the device is CUDA
    gpu_scales, host_scales [chunks, layers, 2, chunk_tokens, num_kv_heads] float32   fp8 pools
        only: every row's scale per KV head (kernels/fp8.py), in a parallel block beside each
        pool; every copy of a chunk or a row copies its scales too, so they move with it
        (prefix-cached chunks keep theirs)

On a CPU-only machine both are ordinary CPU tensors and every copy is synchronous; the logic is
the same. The pool runs copies on the caller's current stream; the stage executor chooses the
streams and records the events. Chunk ids are checked against the pool's size before any kernel
runs, so a bad id raises instead of writing into another sequence's chunk (slot mappings for
`store` come from the KV manager and are not re-checked: that would cost a device sync).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipemax import kernels
from pipemax.core.kv_dtype import kv_chunk_bytes

# KV storage names (core/kv_dtype.py) -> torch dtypes
KV_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_storage_of(dtype: torch.dtype) -> str:
    """The storage name (core/kv_dtype.py) of a torch dtype."""
    return next(name for name, torch_dtype in KV_TORCH_DTYPES.items() if torch_dtype == dtype)

log = logging.getLogger("pipemax")
KERNEL_BACKENDS = ("triton", "torch")
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 8, 256


@dataclass(frozen=True)
class KVPoolSpec:
    """Shape of one stage's chunks."""

    num_layers: int  # layers in this stage
    num_kv_heads: int
    head_dim: int
    chunk_tokens: int
    dtype: torch.dtype  # the model's: new K/V arrive in it
    kv_dtype: torch.dtype | None = None  # what the pools hold: None = dtype, or an fp8 dtype (with scales)

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        tokens = self.chunk_tokens
        if tokens & (tokens - 1) or not MIN_CHUNK_TOKENS <= tokens <= MAX_CHUNK_TOKENS:
            raise ValueError(
                f"chunk_tokens must be a power of two from {MIN_CHUNK_TOKENS} to {MAX_CHUNK_TOKENS}, got {tokens}"
            )
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"KV dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.dtype)  # frozen: normalise in place
        elif self.kv_dtype != self.dtype and not kernels.is_fp8(self.kv_dtype):
            raise ValueError(f"a KV pool holds the model's dtype or fp8, got {self.kv_dtype} for a {self.dtype} model")

    @property
    def fp8(self) -> bool:
        return kernels.is_fp8(self.kv_dtype)

    @property
    def scales_shape(self) -> tuple[int, ...]:
        """One chunk's scales (fp8): per layer, K/V, row and KV head."""
        return (self.num_layers, 2, self.chunk_tokens, self.num_kv_heads)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.chunk_tokens, self.num_kv_heads, self.head_dim)

    @property
    def chunk_bytes(self) -> int:
        """A chunk's bytes, its fp8 scales included."""
        return kv_chunk_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.chunk_tokens,
                              kv_storage_of(self.kv_dtype))

    def chunks_in(self, budget_bytes: int) -> int:
        """How many whole chunks fit in budget_bytes."""
        return max(0, int(budget_bytes) // self.chunk_bytes)


class KVPool:
    def __init__(
        self,
        spec: KVPoolSpec,
        num_gpu_chunks: int,
        num_host_chunks: int,
        device: torch.device | str,
        backend: str = "triton",
    ):
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
        if num_gpu_chunks < 1 or num_host_chunks < 0:
            raise ValueError(f"need >= 1 GPU chunk and >= 0 host chunks, got {num_gpu_chunks}, {num_host_chunks}")
        self.spec = spec
        self.device = torch.device(device)
        self.backend = backend
        self.gpu = torch.zeros(num_gpu_chunks, *spec.chunk_shape, dtype=spec.kv_dtype, device=self.device)
        self.host = self._host_tensor((num_host_chunks, *spec.chunk_shape), spec.kv_dtype)
        self.gpu_scales = self.host_scales = None
        if spec.fp8:
            self.gpu_scales = torch.zeros(num_gpu_chunks, *spec.scales_shape, dtype=torch.float32, device=self.device)
            self.host_scales = self._host_tensor((num_host_chunks, *spec.scales_shape), torch.float32)
        # A checkpoint's k_scale / v_scale per layer ([layers, 2] float32 on the device), or None.
        self.fixed_scales = None

    def _host_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.zeros(shape, dtype=dtype)
        # Pinned, so that kernels on the GPU can read and write it directly over PCIe.
        tensor = pinned_empty(shape, dtype)
        weakref.finalize(self, unpin, tensor)
        return tensor

    @classmethod
    def from_budget(cls, spec: KVPoolSpec, gpu_bytes: int, host_bytes: int, device, backend: str = "triton"):
        num_gpu_chunks = spec.chunks_in(gpu_bytes)
        if num_gpu_chunks < 1:
            raise ValueError(
                f"a GPU KV budget of {gpu_bytes / 2**20:.1f} MiB holds no chunk of {spec.chunk_bytes / 2**20:.2f} MiB"
            )
        return cls(spec, num_gpu_chunks, spec.chunks_in(host_bytes), device, backend)

    @property
    def num_gpu_chunks(self) -> int:
        return self.gpu.shape[0]

    @property
    def num_host_chunks(self) -> int:
        return self.host.shape[0]

    # ---- copies ----------------------------------------------------------------------------
    def prefetch(self, host_chunk_ids: Sequence[int], gpu_chunk_ids: Sequence[int]) -> None:
        """host[host_chunk_ids[i]] -> gpu[gpu_chunk_ids[i]]."""
        self._copy_chunks(self.host, "host", host_chunk_ids, self.gpu, "GPU", gpu_chunk_ids,
                          self.host_scales, self.gpu_scales)

    def offload(self, gpu_chunk_ids: Sequence[int], host_chunk_ids: Sequence[int]) -> None:
        """gpu[gpu_chunk_ids[i]] -> host[host_chunk_ids[i]]."""
        self._copy_chunks(self.gpu, "GPU", gpu_chunk_ids, self.host, "host", host_chunk_ids,
                          self.gpu_scales, self.host_scales)

    def copy_gpu_chunks(self, src_chunk_ids: Sequence[int], dst_chunk_ids: Sequence[int]) -> None:
        """gpu[src] -> gpu[dst], e.g. to compact or fork a sequence. The sets must not overlap:
        the copies run concurrently."""
        if set(src_chunk_ids) & set(dst_chunk_ids):
            raise ValueError("a chunk is both a source and a destination of one GPU->GPU copy")
        self._copy_chunks(self.gpu, "GPU", src_chunk_ids, self.gpu, "GPU", dst_chunk_ids, self.gpu_scales,
                          self.gpu_scales)

    def write_back(
        self,
        gpu_chunk_ids: Sequence[int],
        host_chunk_ids: Sequence[int],
        rows: Sequence[int],
        layer_start: int = 0,
        num_layers: int | None = None,
    ) -> None:
        """Write-through of single token rows (K and V, layers [layer_start, +num_layers)) to host."""
        self.write_rows(self.row_ids(gpu_chunk_ids, host_chunk_ids, rows), layer_start, num_layers)

    def row_ids(self, gpu_chunk_ids: Sequence[int], host_chunk_ids: Sequence[int], rows: Sequence[int]):
        """Checked (GPU chunk, host chunk, row) id tensors on the device, for write_rows: built
        once when a step writes its rows through layer by layer."""
        self._check_ids(gpu_chunk_ids, self.num_gpu_chunks, "GPU")
        self._check_ids(host_chunk_ids, self.num_host_chunks, "host")
        if any(not 0 <= row < self.spec.chunk_tokens for row in rows):
            raise IndexError(f"a row is outside [0, {self.spec.chunk_tokens})")
        if not len(gpu_chunk_ids) == len(host_chunk_ids) == len(rows):
            raise ValueError("write_back needs as many GPU chunk ids, host chunk ids and rows")
        return self._ids(gpu_chunk_ids), self._ids(host_chunk_ids), self._ids(rows)

    def write_rows(self, ids, layer_start: int = 0, num_layers: int | None = None) -> None:
        """The write-through of rows given by row_ids, for layers [layer_start, +num_layers)."""
        num_layers = self.spec.num_layers - layer_start if num_layers is None else num_layers
        impl = kernels.copy_rows if self.backend == "triton" else kernels.copy_rows_ref
        impl(self.gpu, self.host, *ids, layer_start, num_layers, self.gpu_scales, self.host_scales)

    # ---- new tokens --------------------------------------------------------------------------
    def store(self, k: torch.Tensor, v: torch.Tensor, layer: int, slot_mapping: torch.Tensor) -> None:
        """Write new tokens' K/V ([tokens, kv_heads, head_dim]) into their GPU slots at `layer`."""
        impl = kernels.store_kv if self.backend == "triton" else kernels.store_kv_ref
        impl(k, v, self.gpu, layer, slot_mapping, self.gpu_scales, self.fixed_scales)

    # ---- helpers -----------------------------------------------------------------------------
    def _copy_chunks(self, src, src_name, src_ids, dst, dst_name, dst_ids, src_scales, dst_scales) -> None:
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"{len(src_ids)} source chunks but {len(dst_ids)} destinations")
        self._check_ids(src_ids, src.shape[0], src_name)
        self._check_ids(dst_ids, dst.shape[0], dst_name)
        if len(set(dst_ids)) != len(dst_ids):
            raise ValueError("a destination chunk appears twice: the copies would race")
        if not len(src_ids):
            return
        impl = kernels.copy_chunks if self.backend == "triton" else kernels.copy_chunks_ref
        impl(src, dst, self._ids(src_ids), self._ids(dst_ids), src_scales, dst_scales)

    @staticmethod
    def _check_ids(chunk_ids: Sequence[int], count: int, what: str) -> None:
        for chunk_id in chunk_ids:
            if not 0 <= chunk_id < count:
                raise IndexError(f"{what} chunk id {chunk_id} outside the {what} pool of {count} chunks")

    def _ids(self, values: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor(list(values), dtype=torch.int32)
        if self.device.type != "cuda":
            return ids
        # From pinned memory without blocking: the host keeps queueing work (torch's pinned
        # allocator keeps the buffer alive until the copy has run).
        return ids.pin_memory().to(self.device, non_blocking=True)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory of exactly the requested size.

    torch's pinned allocator rounds each block up to a power of two (a 20 GiB pool would pin
    32 GiB), so the host pool is allocated as ordinary memory and registered with CUDA instead.
    """
    tensor = torch.empty(shape, dtype=dtype)
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return tensor
    try:
        error = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister returned {error}")
    except (RuntimeError, AttributeError) as error:
        log.warning("cudaHostRegister failed (%s): falling back to torch's pinned allocator", error)
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    tensor.registered_with_cuda = True
    return tensor


def unpin(tensor: torch.Tensor) -> None:
    if getattr(tensor, "registered_with_cuda", False):
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())

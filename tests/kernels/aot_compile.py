"""Compile every kernel ahead of time for real NVIDIA GPUs, on a machine without one.

Run as a script (TRITON_INTERPRET must be off so @triton.jit gives real JIT functions):
    python tests/kernels/aot_compile.py 90 80
fp8 KV pools (e4m3 and e5m2) compile for the targets with fp8 conversion (sm_89, sm_90, sm_120):
the store and RoPE kernels that quantise, attention that dequantises in registers with the same
tiles in flight, and the copies that move fp8 bytes and their scales.
Each launcher is called on small CPU tensors of the shapes the engine uses, with its kernels
swapped for recorders; the recorded arguments give each kernel's signature and constexprs, which
triton.compile turns into PTX and a cubin for each target. This catches what the interpreter
lets through (tl.dot on tiles under 16, unsupported casts, type errors in the IR).
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

# The package re-exports launchers under their modules' names, so fetch the modules themselves.
decode_attention, prefill_attention, kv_store, kv_copy, norm, activation, rope, sampling_noise, moe_gemm = (
    importlib.import_module(f"pipemax.kernels.{name}")
    for name in ("decode_attention", "prefill_attention", "kv_store", "kv_copy", "norm", "activation", "rope",
                 "sampling_noise", "moe_gemm")
)

from pipemax.kernels._common import shared_memory_per_block  # noqa: E402
from pipemax.kernels.fp8 import is_fp8  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 80, 96, 128, 256)
# Targets: H100/H200, A100, the smallest we aim at (sm_86, 99 KiB: RTX 3090, A6000), and for fp8
# KV the Ada (sm_89: L4, L40S, RTX 4090) and consumer Blackwell (sm_120: RTX 5090) cards, 99 KiB too.
CAPABILITIES = {90: (9, 0), 80: (8, 0), 86: (8, 6), 89: (8, 9), 120: (12, 0)}
FP8_ONLY_TARGETS = (89, 120)
# (pool, model dtype) pairs: e4m3 under both GPU model dtypes; e5m2 differs only in constants
FP8_CASES = ((torch.float8_e4m3fn, torch.bfloat16), (torch.float8_e4m3fn, torch.float16),
             (torch.float8_e5m2, torch.bfloat16))
FP8_HEAD_DIMS = (64, 128, 256)  # 80 and 96 take 128's tiles (BLOCK_D is a power of two)
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **constexprs)` records instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((args, constexprs))


def compile_launch(kernel, args, constexprs, target, check_with_ptxas: bool = False):
    names = kernel.arg_names
    signature, attrs = {}, {}
    for index, (name, value) in enumerate(zip(names, args)):
        signature[name] = mangle_type(value)
        # Mirror the runtime's alignment hints, so the compiled code is the vectorised one.
        aligned = value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else (
            isinstance(value, int) and value % 16 == 0)
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in constexprs.items() if k in LAUNCH_OPTIONS}
    constexprs = {k: v for k, v in constexprs.items() if k not in LAUNCH_OPTIONS}
    for name in constexprs:
        signature[name] = "constexpr"
    source = ASTSource(kernel, signature, constexprs, attrs)
    options = triton.compiler.make_backend(target).parse_options(options)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"
    shared = compiled.metadata.shared
    limit = shared_memory_per_block(CAPABILITIES[target.arch])
    assert shared <= limit, f"{kernel.__name__} {constexprs}: {shared} bytes of shared memory, over {limit}"
    if args[0].dtype != torch.float32:  # (float32 runs IEEE FMA dots, from registers: nothing to pipeline)
        check_pipelined(kernel, compiled.asm["ptx"], constexprs, options.num_stages)
    registers, stack_frame = cubin_resources(compiled.asm["cubin"])
    if check_with_ptxas:  # the cubin's figures are the ones ptxas reports
        reported = ptxas_resources(compiled.asm["ptx"], target.arch)
        assert reported[0] == registers and (reported[1] > 0) == (stack_frame > 0), (
            f"{kernel.__name__}: the cubin says {registers} registers and a {stack_frame}-byte stack frame, "
            f"ptxas {reported[0]} registers and {reported[1]} bytes of spill stores")
    assert stack_frame == 0 or may_spill(args, constexprs), (
        f"{kernel.__name__} {constexprs}: a {stack_frame}-byte stack frame (register spills)")
    assert registers * 32 * options.num_warps <= 65536, f"{kernel.__name__}: {registers} registers a thread"
    return compiled


def may_spill(args, constexprs) -> bool:
    """float32 (the equality tests' dtype) at head_dim 256 spills whatever the tiles: allowed there only."""
    return args[0].dtype == torch.float32 and constexprs.get("HEAD_DIM", 0) >= 256


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of the cubin's one kernel, read from its ELF
    `.nv.info` section (EIATTR_REGCOUNT 0x2f, EIATTR_FRAME_SIZE 0x11): what `ptxas -v` prints,
    without running ptxas a second time. Triton's kernels keep no local arrays, so a stack frame
    means register spills. main() checks this reading against ptxas on each target's first kernel
    and on every kernel that may spill."""
    import struct

    section_headers, = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    # (name offset, offset, size) of each section header (ELF64: sh_name, sh_offset, sh_size)
    headers = [struct.unpack_from("<I20xQQ", cubin, section_headers + i * entry_size) for i in range(count)]
    names_offset = headers[names_index][1]

    def name(offset: int) -> bytes:
        start = names_offset + offset
        return cubin[start:cubin.index(b"\0", start)]

    _, offset, size = next(h for h in headers if name(h[0]) == b".nv.info")
    values, end = {}, offset + size
    while offset < end:
        form, attribute = cubin[offset], cubin[offset + 1]
        if form == 0x04:  # EIFMT_SVAL: a 2-byte size, then (symbol index, value) for these attributes
            length, = struct.unpack_from("<H", cubin, offset + 2)
            if attribute in (0x2F, 0x11):
                values[attribute] = struct.unpack_from("<I", cubin, offset + 8)[0]
            offset += 4 + length
        else:  # EIFMT_NVAL (no value), EIFMT_BVAL / EIFMT_HVAL (a 2-byte value)
            offset += 2 if form == 0x01 else 4
    return values[0x2F], values[0x11]


PIPELINED_KERNELS = ("_decode_attention_split_kernel", "_prefill_attention_kernel", "_grouped_gemm_kernel")


def check_pipelined(kernel, ptx: str, constexprs: dict, num_stages: int) -> None:
    """The attention and grouped-GEMM loops keep tiles in flight: inside the loop the kernel waits
    for all but num_stages - 1 groups of async copies, not for every one (wait_group 0 = one buffer)."""
    import re

    if kernel.__name__ not in PIPELINED_KERNELS or num_stages < 2:
        return
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    assert waits and max(waits) >= 1, f"{kernel.__name__} {constexprs}: no tile in flight (waits {waits})"


def ptxas_resources(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) that ptxas reports for the kernel (the check of
    cubin_resources: ptxas again costs 50 ms a kernel, most of this script's time when Triton's
    compiles are cached)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path  # the one Triton compiles with (Blackwell has its own)
    # the PTX's own target (Triton picks sm_90a, sm_120a, ... where the architecture has one)
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run([str(ptxas), f"-arch={arch}", "-v", source.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spills


def record_launches(capability: tuple[int, int] | None = None, fp8_only: bool = False):
    """Call each launcher on engine-like shapes, choosing tiles as on a GPU of that capability;
    return [(kernel, args, constexprs)]. fp8_only: only the fp8 KV kernels (sm_89 and sm_120 run
    the other kernels with sm_86's tiles: the same shared memory)."""
    for module in (decode_attention, prefill_attention):
        module.device_capability = lambda device: capability
    recorders = {}
    for module, name in [
        (decode_attention, "_decode_attention_split_kernel"),
        (decode_attention, "_decode_attention_merge_kernel"),
        (prefill_attention, "_prefill_attention_kernel"),
        (kv_store, "_store_kv_kernel"),
        (kv_store, "_store_kv_fp8_kernel"),
        (kv_copy, "_copy_chunks_kernel"),
        (kv_copy, "_copy_rows_kernel"),
        (norm, "_rms_norm_kernel"),
        (activation, "_silu_and_mul_kernel"),
        (rope, "_rope_store_kv_kernel"),
        (sampling_noise, "_gumbel_noise_kernel"),
        (moe_gemm, "_grouped_gemm_kernel"),
    ]:
        kernel = getattr(module, name)
        recorders[name] = Recorder(kernel.kernel if isinstance(kernel, Recorder) else kernel)  # called again
        setattr(module, name, recorders[name])

    chunk_tokens, layers, num_kv_heads, group = 16, 2, 2, 4
    for dtype in DTYPES if not fp8_only else ():
        for head_dim in HEAD_DIMS:
            pool = torch.zeros(4, layers, 2, chunk_tokens, num_kv_heads, head_dim, dtype=dtype)
            table = torch.zeros(2, 2, dtype=torch.int32)
            lens = torch.full((2,), 20, dtype=torch.int32)
            q = torch.zeros(2, num_kv_heads * group, head_dim, dtype=dtype)
            for num_splits in (1, 2):  # one split writes the output itself: no merge
                decode_attention.decode_attention(q, pool, 1, table, lens, 0.1, num_splits=num_splits, max_seq_len=20)
            plan = torch.tensor([2, 16], dtype=torch.int32)  # under CUDA graphs: the split plan on the device
            decode_attention.decode_attention(q, pool, 1, table, lens, 0.1, num_splits=4, max_seq_len=20,
                                              split_plan=plan)
            cu = torch.tensor([0, 5, 9], dtype=torch.int32)
            q_packed = torch.zeros(9, num_kv_heads * group, head_dim, dtype=dtype)
            prefill_attention.prefill_attention(q_packed, pool, 1, table, cu, lens, 0.1, max_q_len=5)
            k = torch.zeros(3, num_kv_heads, head_dim, dtype=dtype)
            kv_store.store_kv(k, k, pool, 1, torch.zeros(3, dtype=torch.int64))
            ids = torch.zeros(2, dtype=torch.int32)
            kv_copy.copy_chunks(pool, pool.clone(), ids, ids)
            kv_copy.copy_rows(pool, pool.clone(), ids, ids, ids, 0, layers)
            heads = num_kv_heads * group
            qkv = torch.zeros(3, (heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
            rows = torch.zeros(3, head_dim, dtype=torch.float32)
            for norm_weight in (None, torch.zeros(head_dim, dtype=dtype)):  # Llama; Qwen3's q/k norm
                rope.rope_store_kv(qkv, rows, rows, pool, 1, torch.zeros(3, dtype=torch.int64), heads,
                                   norm_weight, norm_weight)
        for hidden in (2048, 4096, 8192):  # the layer's element-wise kernels at model widths
            x = torch.zeros(3, hidden, dtype=dtype)
            norm.rms_norm(x, torch.zeros(hidden, dtype=dtype), 1e-6)
            norm.rms_norm(x, torch.zeros(hidden, dtype=dtype), 1e-6, residual=x.clone(), out=x)
            activation.silu_and_mul(torch.zeros(3, 2 * hidden, dtype=dtype))
        # The experts' grouped GEMM: the tiles of real widths (N >= 128, K >= 64), with and without
        # the router's scale (small tensors: only the signature and constexprs matter here).
        topk_ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
        sorted_pairs, block_experts = moe_gemm.align_by_expert(topk_ids, 2, moe_gemm.MOE_BLOCK_M)
        for scaled in (False, True):
            a = torch.zeros(3, 128, dtype=dtype)
            moe_gemm.grouped_gemm(a, torch.zeros(2, 256, 128, dtype=dtype), sorted_pairs, block_experts, 2,
                                  torch.zeros(6, 256, dtype=dtype), torch.zeros(6) if scaled else None)
    if capability is not None and capability >= (8, 9):
        record_fp8_launches(chunk_tokens, layers, num_kv_heads, group)
    sampling_noise.gumbel_noise(torch.zeros(2, dtype=torch.int64), 128_256)
    return [(rec.kernel, args, constexprs) for rec in recorders.values() for args, constexprs in rec.launches]


def record_fp8_launches(chunk_tokens: int, layers: int, num_kv_heads: int, group: int) -> None:
    """The kernels an fp8 KV cache runs, for every fp8 format, model dtype and head_dim."""
    for pool_dtype, dtype in FP8_CASES:
        for head_dim in FP8_HEAD_DIMS:
            pool = torch.zeros(4, layers, 2, chunk_tokens, num_kv_heads, head_dim, dtype=pool_dtype)
            scales = torch.zeros(pool.shape[:5])
            fixed = torch.ones(layers, 2)
            table = torch.zeros(2, 2, dtype=torch.int32)
            lens = torch.full((2,), 20, dtype=torch.int32)
            q = torch.zeros(2, num_kv_heads * group, head_dim, dtype=dtype)
            for num_splits in (1, 2):
                decode_attention.decode_attention(q, pool, 1, table, lens, 0.1, num_splits=num_splits,
                                                  max_seq_len=20, kv_scales=scales)
            cu = torch.tensor([0, 5, 9], dtype=torch.int32)
            q_packed = torch.zeros(9, num_kv_heads * group, head_dim, dtype=dtype)
            prefill_attention.prefill_attention(q_packed, pool, 1, table, cu, lens, 0.1, max_q_len=5,
                                                kv_scales=scales)
            k = torch.zeros(3, num_kv_heads, head_dim, dtype=dtype)
            slots = torch.zeros(3, dtype=torch.int64)
            for fixed_scales in (None, fixed):  # computed scales; a checkpoint's
                kv_store.store_kv(k, k, pool, 1, slots, scales, fixed_scales)
                heads = num_kv_heads * group
                qkv = torch.zeros(3, (heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
                rows = torch.zeros(3, head_dim, dtype=torch.float32)
                rope.rope_store_kv(qkv, rows, rows, pool, 1, slots, heads, kv_scales=scales,
                                   fixed_scales=fixed_scales)
            ids = torch.zeros(2, dtype=torch.int32)
            kv_copy.copy_chunks(pool, pool.clone(), ids, ids, scales, scales.clone())
            kv_copy.copy_rows(pool, pool.clone(), ids, ids, ids, 0, layers, scales, scales.clone())


def main(capabilities):
    compiled = fp8 = 0
    for capability in capabilities:
        launches = record_launches(CAPABILITIES[capability], fp8_only=capability in FP8_ONLY_TARGETS)
        target = GPUTarget("cuda", capability, 32)
        seen = set()
        for kernel, args, constexprs in launches:
            key = (kernel.__name__, tuple(mangle_type(a) for a in args), tuple(sorted(constexprs.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                # ptxas checks the cubin's figures on the target's first kernel and on each that may spill
                compile_launch(kernel, args, constexprs, target,
                               check_with_ptxas=len(seen) == 1 or may_spill(args, constexprs))
            except Exception as error:  # report which kernel and configuration broke
                print(f"FAILED sm_{capability} {kernel.__name__} {constexprs}: {error}", file=sys.stderr)
                raise
            compiled += 1
            fp8 += any(isinstance(arg, torch.Tensor) and is_fp8(arg.dtype) for arg in args)
    print(f"compiled {compiled} kernel variants for sm_{', sm_'.join(map(str, capabilities))}, {fp8} of them fp8")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or list(CAPABILITIES))

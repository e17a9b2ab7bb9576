"""Decode steps under CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is dozens of short kernel launches; replaying a captured graph
removes the launch overhead. On the last stage the graph also holds the LM head and the greedy
argmax. Each bucket (1, 2, 4, 8, ... up to max_num_seqs) is captured once,
reading its inputs from static buffers; a step with n sequences pads to the next bucket (padding
rows store nothing, slot -1, and attend over one token of chunk 0; their outputs are dropped).

Only pure-decode steps replay graphs: prefill steps vary in shape and run eagerly. Attention in a
graph launches the split count chosen for max_model_len, but each step computes on the device,
from its real lengths, how many splits to use and how long each is (decode_split_plan): short
contexts run on fewer, fuller programs, and the unused ones exit at once.
"""

from __future__ import annotations

import importlib

import torch

from pipemax.kernels._common import decode_tiles, device_capability, device_guard
from pipemax.models import AttentionMetadata, ChunkedAttention, LlamaFamilyModel

decode_module = importlib.import_module("pipemax.kernels.decode_attention")  # (the package shadows its name)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in BUCKETS if b < max_batch]
    return sizes + [max_batch]


class GraphCapture:
    """Captures CUDA graphs on a side stream, each sharing the memory pool of those before it;
    the device is synchronised once at the end (start-up, not the step loop)."""

    def __enter__(self):
        self.pool = None
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        self.context = torch.cuda.stream(self.stream)
        self.context.__enter__()
        return self

    def graph(self, work):
        """(the graph of work(), what work returned: its static output)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = work()
        self.pool = graph.pool()
        return graph, output

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.synchronize()
        return False


class DecodeGraphs:
    def __init__(self, model: LlamaFamilyModel, attention: ChunkedAttention, max_batch: int, max_model_len: int,
                 chunk_tokens: int, device: torch.device):
        if attention.backend != "triton":
            raise ValueError("CUDA graphs need the Triton attention backend (the torch references sync with the host)")
        self.model = model
        self.attention = attention
        self.max_model_len = max_model_len
        self.buckets = bucket_sizes(max_batch)
        max_chunks = -(-max_model_len // chunk_tokens)
        # The first stage reads token ids; later stages read the previous stage's hidden states.
        if model.is_first:
            self.inputs = torch.zeros(max_batch, dtype=torch.int64, device=device)
        else:
            dtype = next(model.parameters()).dtype
            self.inputs = torch.zeros(max_batch, model.config.hidden_size, dtype=dtype, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.chunk_tables = torch.zeros(max_batch, max_chunks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.empty_int = torch.zeros(0, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.split_counts: dict[int, int] = {}  # decode splits launched per bucket
        if model.is_last:
            dtype = next(model.parameters()).dtype  # (the LM head's: no float32 copy of the logits)
            self.logits = torch.zeros(max_batch, model.config.vocab_size, dtype=dtype, device=device)

    def metadata(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], num_decode_tokens=batch,
            decode_chunk_tables=self.chunk_tables[:batch], decode_seq_lens=self.seq_lens[:batch],
            decode_max_seq_len=self.max_model_len,
            prefill_chunk_tables=self.chunk_tables[:0], prefill_cu_seqlens_q=self.empty_int,
            prefill_seq_lens=self.empty_int, prefill_max_q_len=0,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        meta = self.metadata(batch)
        # The split plan is computed inside the graph from the static lengths: every replay
        # follows the step's real contexts (one plan per step, shared by all layers).
        config, dtype = self.model.config, next(self.model.parameters()).dtype
        block_n = decode_tiles(config.head_dim, dtype, device_capability(self.positions.device))["block_n"]
        # (after the warm-up launch, from the kernel's real occupancy: see _target_programs)
        tiles_key = (dtype, config.head_dim, config.num_heads // config.num_kv_heads, block_n)
        target = decode_module._target_programs(self.positions.device, tiles_key)
        if batch not in self.split_counts:  # fixed at warm-up: the capture must launch the same variant
            self.split_counts[batch] = decode_module.choose_num_splits(batch, config.num_kv_heads, self.max_model_len,
                                                                       block_n, target)
        meta.decode_max_splits = self.split_counts[batch]
        # One split (a batch that fills the GPU by itself): attention writes its output directly,
        # and the graph holds no plan kernels (max, clamp, stack) for every replay to run.
        meta.decode_split_plan = None if meta.decode_max_splits == 1 else decode_module.decode_split_plan(
            self.seq_lens[:batch], config.num_kv_heads, meta.decode_max_splits, block_n, target)
        hidden = self.model(self.inputs[:batch], self.positions[:batch], self.attention, meta)
        if not self.model.is_last:
            return hidden
        # The last stage's LM head and the greedy choice run inside the graph too: every row of a
        # decode step samples.
        logits = self.logits[:batch]  # one buffer for every bucket (each bucket's own would pile up)
        logits.copy_(self.model.compute_logits(hidden))
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def capture(self) -> None:
        with device_guard(self.positions):
            self._capture()

    def _capture(self) -> None:
        # A first launch records the attention kernel's real occupancy (CTAs per SM), which the
        # split counts are chosen from: each bucket's count is then fixed at its warm-up, so the
        # capture launches only kernels already compiled (loading one while capturing fails).
        self._forward(self.buckets[-1])
        self.split_counts.clear()
        with GraphCapture() as capture:
            for batch in reversed(self.buckets):  # largest first: later graphs reuse its memory pool
                self._forward(batch)  # warm-up: compiles the kernels outside the capture
                self.graphs[batch], self.outputs[batch] = capture.graph(lambda: self._forward(batch))

    def bucket_for(self, batch: int) -> int:
        return next(size for size in self.buckets if size >= batch)

    @torch.inference_mode()
    def run(self, inputs, positions, slot_mapping, chunk_tables, seq_lens):
        """A decode step through the bucket's graph: hidden states [batch, hidden], or on the last
        stage (logits [batch, vocab] float32, greedy ids [batch])."""
        with device_guard(self.positions):
            return self._run(inputs, positions, slot_mapping, chunk_tables, seq_lens)

    def _run(self, inputs, positions, slot_mapping, chunk_tables, seq_lens):
        batch = inputs.shape[0]
        bucket = self.bucket_for(batch)
        self.inputs[:batch].copy_(inputs)
        self.inputs[batch:bucket].zero_()  # (padding rows' residuals would otherwise grow step by step)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(slot_mapping)
        self.slot_mapping[batch:bucket].fill_(-1)
        width = min(chunk_tables.shape[1], self.chunk_tables.shape[1])  # columns past max_model_len are unused
        self.chunk_tables[:batch, :width].copy_(chunk_tables[:, :width])
        self.seq_lens[:batch].copy_(seq_lens)
        self.seq_lens[batch:bucket].fill_(1)
        self.graphs[bucket].replay()
        output = self.outputs[bucket]
        if isinstance(output, tuple):  # last stage: (logits, greedy ids)
            return tuple(tensor[:batch] for tensor in output)
        return output[:batch]

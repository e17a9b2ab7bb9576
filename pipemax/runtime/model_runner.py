"""Runs one step plan through one stage's layers: builds the batch tensors and attention metadata
from the plan and the stage's KV manager, runs the layers, and on the last stage returns the
logits of the sequences that sample. Owns the tensors of one device; decisions stay with the
scheduler.

Host-to-device copies go through pinned staging buffers (torch's caching host allocator) with
non_blocking=True: a copy from pageable memory would wait for the device to drain first.
"""

from __future__ import annotations

import torch

from pipemax.models import AttentionMetadata, ChunkedAttention, LlamaFamilyModel

from .cuda_graphs import DecodeGraphs
from .kv_manager import KVManager
from .kv_pool import KVPool
from .step_plan import StagePlan


def chunk_tables(kv: KVManager, seq_ids: list[int]) -> torch.Tensor:
    """[len(seq_ids), max chunks] int32 on the host, rows padded with chunk 0 (never read past seq_len)."""
    tables = [kv.chunk_table(seq_id) for seq_id in seq_ids]
    if not tables:
        return torch.zeros(0, 1, dtype=torch.int32)
    width = max(len(table) for table in tables)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.int32)


class ModelRunner:
    def __init__(self, model: LlamaFamilyModel, kv_pool: KVPool, kv: KVManager, attention_backend: str,
                 decode_graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv_pool = kv_pool
        self.kv = kv
        self.device = kv_pool.device
        self.attention = ChunkedAttention(kv_pool.gpu, attention_backend, scale=model.config.head_dim**-0.5)
        self.decode_graphs = decode_graphs

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture decode graphs for every batch bucket up to max_batch (CUDA, Triton backend)."""
        self.decode_graphs = DecodeGraphs(self.model, self.attention, max_batch, max_model_len,
                                          self.kv_pool.spec.chunk_tokens, self.device)
        self.decode_graphs.capture()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def build_batch(self, plan: StagePlan, shared=None):
        """(input_ids, positions, metadata, sample rows), on the device; input_ids on the first
        stage only, sample rows on the last only. Stages on one device pass the previous stage's
        batch as `shared`: their chunk tables are the same (every stage replays the same KV
        operations), so the positions and metadata are built once per step, not once per stage."""
        def as_tensor(values, dtype=torch.int32):
            return self.to_device(torch.tensor(values, dtype=dtype))

        if shared is not None:
            positions, meta = shared[1], shared[2]
        else:
            positions, meta = self._positions_and_metadata(plan, as_tensor)
        input_ids = as_tensor(plan.token_ids, torch.int64) if self.model.is_first else None
        sample_rows = as_tensor(plan.sample_rows(), torch.int64) if self.model.is_last else None
        return input_ids, positions, meta, sample_rows

    def _positions_and_metadata(self, plan: StagePlan, as_tensor):
        positions: list[int] = []
        slots: list[int] = []
        for seq_id, start, count in zip(plan.seq_ids, plan.starts, plan.counts):
            positions += range(start, start + count)
            slots += self.kv.slots(seq_id, start, start + count)
        num_decode = plan.num_decode
        prefill_counts = plan.counts[num_decode:]
        cu_seqlens = [0]
        for q_len in prefill_counts:
            cu_seqlens.append(cu_seqlens[-1] + q_len)
        ends = [start + count for start, count in zip(plan.starts, plan.counts)]
        meta = AttentionMetadata(
            slot_mapping=as_tensor(slots, torch.int64),
            num_decode_tokens=num_decode,
            decode_chunk_tables=self.to_device(chunk_tables(self.kv, plan.seq_ids[:num_decode])),
            decode_seq_lens=as_tensor(ends[:num_decode]),
            decode_max_seq_len=max(ends[:num_decode], default=0),
            prefill_chunk_tables=self.to_device(chunk_tables(self.kv, plan.seq_ids[num_decode:])),
            prefill_cu_seqlens_q=as_tensor(cu_seqlens),
            prefill_seq_lens=as_tensor(ends[num_decode:]),
            prefill_max_q_len=max(prefill_counts, default=0),
        )
        return as_tensor(positions, torch.int64), meta

    @torch.inference_mode()
    def forward(self, plan: StagePlan, batch, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's device work on a batch from build_batch: hidden states [tokens, hidden] for
        the next stage, or on the last stage the logits [sampling sequences, vocab] float32."""
        input_ids, positions, meta, sample_rows = batch
        inputs = input_ids if self.model.is_first else hidden_in
        if self.decode_graphs is not None and plan.num_decode == len(plan.seq_ids):
            hidden = self.decode_graphs.run(inputs, positions, meta.slot_mapping, meta.decode_chunk_tables,
                                            meta.decode_seq_lens)
        else:
            hidden = self.model(inputs, positions, self.attention, meta)
        if not self.model.is_last:
            return hidden
        return self.model.compute_logits(hidden.index_select(0, sample_rows))

"""Runs one step plan through the model: builds the batch tensors and attention metadata from the
plan and the KV manager's chunk tables, runs the layers, returns the logits of the sequences that
sample. Owns the tensors of one device; decisions stay with the scheduler."""

from __future__ import annotations

import torch

from pipemax.models import AttentionMetadata, ChunkedAttention, LlamaFamilyModel

from .cuda_graphs import DecodeGraphs
from .kv_manager import KVManager
from .kv_pool import KVPool
from .scheduler import ScheduledSequence, StepPlan


def chunk_table_tensor(kv: KVManager, entries: list[ScheduledSequence]) -> torch.Tensor:
    """[len(entries), max chunks] int32, rows padded with chunk 0 (never read past seq_len)."""
    tables = [kv.chunk_table(entry.seq.seq_id) for entry in entries]
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

    def build_batch(self, plan: StepPlan):
        """(input_ids, positions, metadata, rows whose logits are sampled)."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for entry in plan.scheduled:
            seq = entry.seq
            token_ids += seq.token_ids[entry.start:entry.end]
            positions += range(entry.start, entry.end)
            slots += self.kv.slots(seq.seq_id, entry.start, entry.end)
        num_decode = len(plan.decode)
        q_lens = [entry.num_tokens for entry in plan.prefill]
        cu_seqlens = [0]
        for q_len in q_lens:
            cu_seqlens.append(cu_seqlens[-1] + q_len)
        sample_rows = [row for row, entry in enumerate(plan.decode) if entry.samples]
        sample_rows += [num_decode + cu_seqlens[i + 1] - 1 for i, entry in enumerate(plan.prefill) if entry.samples]

        device = self.device

        def as_tensor(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=as_tensor(slots, torch.int64),
            num_decode_tokens=num_decode,
            decode_chunk_tables=chunk_table_tensor(self.kv, plan.decode).to(device),
            decode_seq_lens=as_tensor([entry.end for entry in plan.decode]),
            decode_max_seq_len=max((entry.end for entry in plan.decode), default=0),
            prefill_chunk_tables=chunk_table_tensor(self.kv, plan.prefill).to(device),
            prefill_cu_seqlens_q=as_tensor(cu_seqlens),
            prefill_seq_lens=as_tensor([entry.end for entry in plan.prefill]),
            prefill_max_q_len=max(q_lens, default=0),
        )
        return as_tensor(token_ids, torch.int64), as_tensor(positions, torch.int64), meta, sample_rows

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Logits [sampling sequences, vocab] float32, in plan order (decode first, then prefill)."""
        input_ids, positions, meta, sample_rows = self.build_batch(plan)
        if self.decode_graphs is not None and not plan.prefill:
            hidden = self.decode_graphs.run(input_ids, positions, meta.slot_mapping, meta.decode_chunk_tables,
                                            meta.decode_seq_lens)
        else:
            hidden = self.model(input_ids, positions, self.attention, meta)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

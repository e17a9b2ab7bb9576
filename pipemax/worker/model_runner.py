"""Runs one step plan through one stage's layers: builds the batch tensors and attention metadata
from the plan and the stage's KV manager (chunk tables kept on the device, see device_tables.py),
runs the layers, and on the last stage returns the
logits of the sequences that sample. Owns the tensors of one device; decisions stay with the
scheduler.

Host-to-device copies go through pinned staging buffers (torch's caching host allocator) with
non_blocking=True: a copy from pageable memory would wait for the device to drain first.
"""

from __future__ import annotations

import torch

from pipemax.core.kv_manager import KVManager
from pipemax.core.step_plan import StagePlan
from pipemax.models import ChunkedAttention, LlamaFamilyModel

from .cuda_graphs import DecodeGraphs
from .device_tables import DeviceChunkTables, build_step_tensors
from .kv_pool import KVPool
from .piecewise_graphs import PiecewiseGraphs


class ModelRunner:
    def __init__(self, model: LlamaFamilyModel, kv_pool: KVPool, kv: KVManager, attention_backend: str,
                 decode_graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv_pool = kv_pool
        self.kv = kv
        self.device = kv_pool.device
        if kv_pool.spec.fp8:  # a checkpoint's own k_scale / v_scale, where it has them
            kv_pool.fixed_scales = model.kv_cache_scales()
        self.attention = ChunkedAttention(kv_pool.gpu, attention_backend, scale=model.config.head_dim**-0.5,
                                          kv_scales=kv_pool.gpu_scales, fixed_scales=kv_pool.fixed_scales)
        self.decode_graphs = decode_graphs
        self.piecewise_graphs: PiecewiseGraphs | None = None  # steps with prefill pieces
        self.tables = DeviceChunkTables(self.device)
        self.greedy_ids: torch.Tensor | None = None  # the last graph step's argmax (last stage)

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int, max_tokens: int = 0) -> None:
        """Capture decode graphs for every batch bucket up to max_batch, and (max_tokens > 0)
        piecewise graphs for steps with prefill, for every token bucket up to max_tokens (CUDA,
        Triton backend)."""
        self.decode_graphs = DecodeGraphs(self.model, self.attention, max_batch, max_model_len,
                                          self.kv_pool.spec.chunk_tokens, self.device)
        self.decode_graphs.capture()
        if max_tokens:
            self.piecewise_graphs = PiecewiseGraphs(self.model, self.attention, max_tokens, self.device,
                                                    max_samples=max_batch)
            self.piecewise_graphs.capture()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def build_batch(self, plan: StagePlan, shared=None):
        """(input_ids, positions, metadata, sample rows), on the device; input_ids on the first
        stage only, sample rows on the last only. Stages on one device pass the previous stage's
        batch as `shared`: their chunk tables are the same (every stage replays the same KV
        operations), so the positions and metadata are built once per step, not once per stage."""
        if shared is None:
            return build_step_tensors(self.tables, self.kv, plan, self.kv_pool.spec.chunk_tokens, self.to_device,
                                      self.model.is_first, self.model.is_last)
        # This stage's own device tables fall behind while it shares: rebuilt if ever used again.
        self.tables.reset()
        _, positions, meta, _ = shared
        input_ids = self.upload_long(plan.token_ids) if self.model.is_first else None
        sample_rows = self.upload_long(plan.sample_rows()) if self.model.is_last else None
        return input_ids, positions, meta, sample_rows

    def upload_long(self, values: list[int]) -> torch.Tensor:
        return self.to_device(torch.tensor(values, dtype=torch.int64))

    def runs_graph(self, plan: StagePlan) -> bool:
        """The step replays a captured decode graph (no Python runs between its layers)."""
        return self.decode_graphs is not None and plan.num_decode == len(plan.seq_ids)

    @torch.inference_mode()
    def forward(self, plan: StagePlan, batch, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's device work on a batch from build_batch: hidden states [tokens, hidden] for
        the next stage, or on the last stage the logits [sampling sequences, vocab] in the model's dtype (and,
        from a graph, their argmax in greedy_ids)."""
        input_ids, positions, meta, sample_rows = batch
        inputs = input_ids if self.model.is_first else hidden_in
        self.greedy_ids = None
        if self.runs_graph(plan):
            output = self.decode_graphs.run(inputs, positions, meta.slot_mapping, meta.decode_chunk_tables,
                                            meta.decode_seq_lens)
            if not self.model.is_last:
                return output
            logits, self.greedy_ids = output  # every decode row samples, in order
            return logits
        pieces = self.piecewise_graphs
        samples = sample_rows.shape[0] if sample_rows is not None else 0
        if pieces is not None and pieces.handles(inputs.shape[0], samples):
            output = pieces.run(inputs, positions, meta, sample_rows)
            if not self.model.is_last:
                return output.clone()  # (a graph's static output: the next step overwrites it)
            logits, self.greedy_ids = output  # (the sampler clones the ids before writing any)
            return logits
        hidden = self.model(inputs, positions, self.attention, meta)
        if not self.model.is_last:
            return hidden
        return self.model.compute_logits(hidden.index_select(0, sample_rows))

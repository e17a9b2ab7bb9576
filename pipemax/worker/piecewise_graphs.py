"""Steps that carry prefill pieces under CUDA graphs, captured piecewise around attention.

A mixed or prefill step's attention follows its sequences (how many, how long, where their KV
is), but everything else in a layer (norms, projections, rotary + KV store, the MLP) depends on
the step's token count alone. So for each token bucket (64, 128, ... up to
max_num_batched_tokens) the work between two attention calls is captured once as a graph
"piece": L layers make L + 1 pieces,

    piece 0      stage start (embedding, cos/sin rows) + layer 0 up to its KV store
    piece l      layer l-1 after attention (o_proj, norm, MLP) + layer l up to its KV store
    piece L      layer L-1 after attention + the stage's end (final norm, or the whole state);
                 on the last stage also the LM head and greedy argmax of the sampling rows

and a step replays them in order with attention launched eagerly in between, on the real token
count, reading q from the piece before and writing the o_proj input the piece after reads. A
step of T tokens pads to its bucket: padding tokens have slot -1 (their K/V are not stored),
position 0 and input 0, and their rows are computed and dropped. About 2 L launches a step
instead of ~10 L. Pure-decode steps replay whole graphs instead (cuda_graphs.DecodeGraphs).

The per-layer write-through of host-resident KV (KVTransfers.write_back_by_layer) is called
between the pieces, right after the piece that stored the layer's KV.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipemax.kernels._common import device_guard
from pipemax.models import AttentionMetadata, ChunkedAttention, LlamaFamilyModel

from .cuda_graphs import GraphCapture


def token_buckets(max_tokens: int) -> list[int]:
    """64, 128, ... up to max_tokens: few buckets (each is L + 1 graphs to capture at start-up);
    a step padded to 64 tokens costs what a smaller one does, the weights' reads."""
    sizes, size = [], 64
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_tokens]


class PiecewiseGraphs:
    def __init__(self, model: LlamaFamilyModel, attention: ChunkedAttention, max_tokens: int, device: torch.device,
                 max_samples: int = 0):
        if attention.backend != "triton":
            raise ValueError("CUDA graphs need the Triton attention backend (the torch references sync with the host)")
        self.model, self.attention = model, attention
        self.buckets = token_buckets(max_tokens)
        config = model.config
        dtype = next(model.parameters()).dtype
        if model.is_first:
            self.inputs = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        else:
            self.inputs = torch.zeros(max_tokens, config.hidden_size, dtype=dtype, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.attn_out = torch.zeros(max_tokens, config.num_heads * config.head_dim, dtype=dtype, device=device)
        # One home for every layer's q: a replay writes the memory its piece was captured with, so
        # eager attention must read q from a tensor all pieces share, not from the last capture's.
        self.q = torch.zeros(max_tokens, config.num_heads, config.head_dim, dtype=dtype, device=device)
        # Last stage: the LM head and the greedy argmax of the sampling rows (at most max_samples,
        # one per sequence) run in the last piece, over static row indices padded with row 0.
        self.max_samples = min(max_samples, max_tokens) if model.is_last else 0
        if self.max_samples:
            self.sample_rows = torch.zeros(self.max_samples, dtype=torch.int64, device=device)
            self.logits = torch.zeros(self.max_samples, config.vocab_size, dtype=dtype, device=device)
            self.greedy_ids = torch.zeros(self.max_samples, dtype=torch.int64, device=device)
        self.graphs: dict[int, list] = {}
        self.states: dict[int, SimpleNamespace] = {}  # per bucket: the tensors the pieces hand on

    @property
    def num_pieces(self) -> int:
        return len(self.model.layers) + 1

    def piece(self, bucket: int, index: int) -> None:
        """Run piece `index` of a bucket on its static tensors (eagerly, or while capturing)."""
        model, attention, state = self.model, self.attention, self.states[bucket]
        if index == 0:
            state.hidden, state.cos, state.sin = model.begin(self.inputs[:bucket], self.positions[:bucket])
            state.residual = None
        else:
            state.hidden, state.residual = model.layers[index - 1].after_attention(
                self.attn_out[:bucket], state.residual, attention)
        if index < len(model.layers):
            # Rotary writes q straight into the static buffer attention reads between the pieces.
            _, state.residual = model.layers[index].before_attention(
                index, state.hidden, state.residual, state.cos, state.sin, attention, self.slot_mapping[:bucket],
                q_out=self.q[:bucket])
        else:
            state.output = model.finish(state.hidden, state.residual, attention)
            if self.max_samples:
                rows = self.sample_rows[:min(bucket, self.max_samples)]
                logits = self.logits[:rows.shape[0]]
                logits.copy_(model.compute_logits(state.output.index_select(0, rows)))
                self.greedy_ids[:rows.shape[0]].copy_(logits.argmax(dim=-1))

    @torch.inference_mode()
    def capture(self) -> None:
        with device_guard(self.positions):
            self._capture()

    def _capture(self) -> None:
        with GraphCapture() as capture:
            for bucket in reversed(self.buckets):  # largest first: later graphs reuse its memory pool
                self.states[bucket] = SimpleNamespace()
                for index in range(self.num_pieces):  # warm-up: compiles the kernels outside the capture
                    self.piece(bucket, index)
                self.graphs[bucket] = [capture.graph(lambda index=index: self.piece(bucket, index))[0]
                                       for index in range(self.num_pieces)]

    def bucket_for(self, tokens: int) -> int | None:
        return next((size for size in self.buckets if size >= tokens), None)

    def handles(self, tokens: int, samples: int) -> bool:
        """A step this many tokens (and on the last stage, sampling rows) replays the pieces."""
        return self.bucket_for(tokens) is not None and (not self.max_samples or samples <= self.max_samples)

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            sample_rows: torch.Tensor | None = None):
        """The stage's output [tokens, hidden] for a step of any kind (see handles); on the last
        stage (logits [samples, vocab] float32, greedy ids [samples]) of sample_rows."""
        with device_guard(self.positions):
            return self._run(inputs, positions, meta, sample_rows)

    def _run(self, inputs, positions, meta, sample_rows=None):
        tokens = inputs.shape[0]
        bucket = self.bucket_for(tokens)
        if self.max_samples:
            samples = sample_rows.shape[0]
            self.sample_rows[:samples].copy_(sample_rows)
            self.sample_rows[samples:].zero_()
        self.inputs[:tokens].copy_(inputs)
        self.inputs[tokens:bucket].zero_()
        self.positions[:tokens].copy_(positions)
        self.positions[tokens:bucket].zero_()
        self.slot_mapping[:tokens].copy_(meta.slot_mapping)
        self.slot_mapping[tokens:bucket].fill_(-1)
        attention, state, graphs = self.attention, self.states[bucket], self.graphs[bucket]
        # (Only tensors shared by all pieces are read here: state.output is the last piece's.)
        # The pieces hold no Python: the write-through hook runs here, after each layer's store.
        after_store, attention.after_store = attention.after_store, None
        try:
            for layer in range(self.num_pieces - 1):
                graphs[layer].replay()
                if after_store is not None:
                    after_store(layer)
                attention.attend(layer, self.q[:tokens], meta, out=self.attn_out[:tokens])
            graphs[-1].replay()
        finally:
            attention.after_store = after_store
        if self.max_samples:
            return self.logits[:samples], self.greedy_ids[:samples]
        return state.output[:tokens]

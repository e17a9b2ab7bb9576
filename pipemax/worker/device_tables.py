"""A stage's chunk tables kept on its device, and a step's batch tensors derived there.

Rebuilding every sequence's chunk table on the host each step costs O(sequences x chunks) of
Python and a large host-to-device copy, while a decode step changes at most one chunk per
sequence. So each stage keeps one device table, a row per live sequence, and per step sends only
what changed: the (row, column, chunk id) of chunks that are new since the row was last written.

Per step the host sends ONE packed int32 buffer (through pinned memory, non-blocking): the rows of
the step's sequences, their starts and token counts, the table updates, and the input ids (first
stage) or the sampled rows (last stage). Positions, slot mapping, sequence lengths, prefix sums and
the per-step tables are then computed on the device, so the host does O(sequences + new chunks)
of work and never per-token or per-chunk loops.

The host keeps a mirror of each row as last written, so any change to a sequence's table (an
append, a preempted sequence allocated anew, later a staging copy of a host-resident one) is
found by comparing lists, and only the differing tail is written.
"""

from __future__ import annotations

import heapq

import torch

from pipemax.core.kv_manager import KVManager
from pipemax.core.step_plan import StagePlan
from pipemax.models import AttentionMetadata


class DeviceChunkTables:
    def __init__(self, device: torch.device, rows: int = 64, width: int = 8):
        self.device = device
        self.table = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self.row_of: dict[int, int] = {}
        self.free_rows = list(range(rows))
        self.mirror: list[list[int]] = [[] for _ in range(rows)]

    def reset(self) -> None:
        """Forget every row (after an abort, or when another stage's batch was used instead)."""
        if not self.row_of:
            return  # nothing to forget (a stage that shares another's batch every step)
        self.row_of = {}
        self.free_rows = list(range(self.table.shape[0]))
        self.mirror = [[] for _ in range(self.table.shape[0])]

    def forget(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.mirror[row] = []
            heapq.heappush(self.free_rows, row)

    def sync(self, kv: KVManager, seq_ids: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
        """(rows of seq_ids, update rows, update columns, update chunk ids) bringing the device
        table in line with the KV manager for these sequences. The caller uploads and applies the
        updates (apply_updates) before any kernel reads the table."""
        rows: list[int] = []
        upd_rows: list[int] = []
        upd_cols: list[int] = []
        upd_ids: list[int] = []
        for seq_id in seq_ids:
            row = self.row_of.get(seq_id)
            if row is None:
                row = self._new_row(seq_id)
            rows.append(row)
            table = kv.chunk_table(seq_id)
            mirror = self.mirror[row]
            if table == mirror:
                continue
            first = len(mirror) if table[: len(mirror)] == mirror else _first_difference(table, mirror)
            if len(table) > self.table.shape[1]:
                self._grow(width=len(table))
            upd_rows += [row] * (len(table) - first)
            upd_cols += range(first, len(table))
            upd_ids += table[first:]
            self.mirror[row] = table
        return rows, upd_rows, upd_cols, upd_ids

    def apply_updates(self, rows: torch.Tensor, cols: torch.Tensor, chunk_ids: torch.Tensor) -> None:
        if rows.numel():
            self.table.index_put_((rows.long(), cols.long()), chunk_ids)

    def _new_row(self, seq_id: int) -> int:
        if not self.free_rows:
            self._grow(rows=2 * self.table.shape[0])
        row = heapq.heappop(self.free_rows)
        self.row_of[seq_id] = row
        self.mirror[row] = []
        return row

    def _grow(self, rows: int | None = None, width: int | None = None) -> None:
        """A larger table, old rows copied on the device (stream-ordered: no host wait)."""
        old_rows, old_width = self.table.shape
        new_rows = max(rows or 0, old_rows)
        new_width = max(width or 0, old_width)
        if width is not None:
            new_width = max(new_width, 2 * old_width)
        table = torch.zeros(new_rows, new_width, dtype=torch.int32, device=self.device)
        table[:old_rows, :old_width] = self.table
        self.table = table
        for row in range(old_rows, new_rows):
            heapq.heappush(self.free_rows, row)
        self.mirror += [[] for _ in range(new_rows - old_rows)]


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def build_step_tensors(tables: DeviceChunkTables, kv: KVManager, plan: StagePlan, chunk_tokens: int,
                       upload, with_input_ids: bool, with_sample_rows: bool):
    """(input_ids or None, positions, AttentionMetadata, sample rows or None), on the device.
    `upload` moves one host int32 tensor to the device (pinned, non-blocking on CUDA)."""
    num_seqs = len(plan.seq_ids)
    num_decode = plan.num_decode
    rows, upd_rows, upd_cols, upd_ids = tables.sync(kv, plan.seq_ids)
    sample_rows = plan.sample_rows() if with_sample_rows else []
    token_ids = plan.token_ids if with_input_ids else []
    sizes = [num_seqs, num_seqs, num_seqs, len(upd_rows), len(upd_rows), len(upd_rows), len(token_ids),
             len(sample_rows)]
    packed = upload(torch.tensor(rows + plan.starts + plan.counts + upd_rows + upd_cols + upd_ids + token_ids
                                 + sample_rows, dtype=torch.int32))
    (seq_rows, starts, counts, upd_rows_t, upd_cols_t, upd_ids_t, token_ids_t,
     sample_rows_t) = torch.split(packed, sizes)
    tables.apply_updates(upd_rows_t, upd_cols_t, upd_ids_t)

    device = packed.device
    num_tokens = sum(plan.counts)
    counts64 = counts.long()
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), counts64, output_size=num_tokens)
    token_starts = torch.cumsum(counts64, 0) - counts64  # first token of each sequence in the step
    positions = starts.long()[seq_of_token] + torch.arange(num_tokens, device=device) - token_starts[seq_of_token]
    table_rows = seq_rows.long()
    chunk_ids = tables.table[table_rows[seq_of_token], positions // chunk_tokens].long()
    slot_mapping = chunk_ids * chunk_tokens + positions % chunk_tokens
    seq_lens = starts + counts
    prefill_counts = counts[num_decode:]
    cu_seqlens = torch.zeros(num_seqs - num_decode + 1, dtype=torch.int32, device=device)
    torch.cumsum(prefill_counts, 0, out=cu_seqlens[1:])
    ends = [start + count for start, count in zip(plan.starts, plan.counts)]
    # The columns this step's sequences use: the table only grows, its width is the longest ever.
    used = tables.table[:, : max(1, -(-max(ends, default=1) // chunk_tokens))]
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        num_decode_tokens=num_decode,
        decode_chunk_tables=used.index_select(0, table_rows[:num_decode]),
        decode_seq_lens=seq_lens[:num_decode],
        decode_max_seq_len=max(ends[:num_decode], default=0),
        prefill_chunk_tables=used.index_select(0, table_rows[num_decode:]),
        prefill_cu_seqlens_q=cu_seqlens,
        prefill_seq_lens=seq_lens[num_decode:],
        prefill_max_q_len=max(plan.counts[num_decode:], default=0),
    )
    input_ids = token_ids_t.long() if with_input_ids else None
    sample_rows_out = sample_rows_t.long() if with_sample_rows else None
    return input_ids, positions, meta, sample_rows_out

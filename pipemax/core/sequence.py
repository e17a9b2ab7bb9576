"""A request as the scheduler tracks it: its tokens, how many have KV, and how it ended."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" or "length"
    stop_text_end: int | None = None  # output text is cut here when a stop string matched
    num_preemptions: int = 0
    micro_batch: int = 0  # the group it runs in (set when the scheduler admits it)
    admission: int = 0  # when it was (last) admitted: the newest is preempted first
    # Running ahead (the engine launches a step before the one before it has returned its tokens):
    # the last `pending_tokens` ids are placeholders for tokens still on their way, and a sequence
    # whose pending token is its last by length (max_tokens, max_model_len) is not scheduled again.
    pending_tokens: int = 0
    awaits_last_token: bool = False

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]  # a copy: not for the per-step hot path

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed_tokens == 1 and self.num_output_tokens > 0

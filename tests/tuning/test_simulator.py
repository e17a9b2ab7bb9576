"""The throughput simulator against pipelines timed by hand: one stage; two stages with one
micro-batch (a bubble: each stage idles half the time); two stages with two micro-batches (the
pipeline fills); the steady rate, until the last request started. Each stage's staging ring: a
prefetch starts when its slot is free on that stage (its previous user has computed and written
through there), not when the step is launched, and a compute waits for its prefetch. And more
PCIe bandwidth never predicts less throughput."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.core.offload_schedule import Round, Schedule, ScheduleSettings, Step, plan_schedule
from pipemax.tuning.simulator import SimulatedServer, StageCosts, simulate
from tests.helpers import examples

ONE_SECOND = StageCosts(alpha=0.0, beta=0.0, delta=1.0)
CHUNK_TOKENS = 8


def server(stages: int, pcie: float = 1e9) -> SimulatedServer:
    return SimulatedServer(stages=(ONE_SECOND,) * stages, pcie_bytes_per_second=pcie, link_bytes_per_second=1e12,
                           chunk_bytes=(1000,) * stages, activation_bytes_per_token=0)


def schedule(requests, micro_batches, offload="off", host_chunks=0, staging_chunks=0):
    return plan_schedule(requests, ScheduleSettings(64, host_chunks, CHUNK_TOKENS, max_num_seqs=4,
                                                    max_num_batched_tokens=64, num_micro_batches=micro_batches,
                                                    offload=offload, staging_chunks=staging_chunks))


def test_one_stage_runs_its_steps_back_to_back():
    result = simulate(schedule([(4, 3)], 1), server(1), chunk_tokens=8)  # prefill, then 2 decodes: 3 steps
    assert result.seconds == pytest.approx(3.0) and result.generated_tokens == 3
    assert result.generated_tokens_per_s == pytest.approx(1.0) and result.stage_utilisation == [pytest.approx(1.0)]


def test_two_stages_one_micro_batch_leave_a_bubble():
    result = simulate(schedule([(4, 3)], 1), server(2), chunk_tokens=8)
    assert result.seconds == pytest.approx(6.0)  # each step crosses both stages before the next can start
    assert result.stage_utilisation == [pytest.approx(0.5), pytest.approx(0.5)]


def test_two_micro_batches_fill_a_two_stage_pipeline():
    result = simulate(schedule([(4, 3), (4, 3)], 2), server(2), chunk_tokens=8)
    # mb0: s0 [0,1] s1 [1,2]; mb1: s0 [1,2] s1 [2,3]; then each step starts when its own came back:
    # the last (mb1's third) runs s0 [5,6], s1 [6,7].
    assert result.seconds == pytest.approx(7.0)
    assert result.stage_utilisation == [pytest.approx(6 / 7), pytest.approx(6 / 7)]
    assert result.generated_tokens == 6


def test_the_steady_rate_counts_the_tokens_generated_until_the_last_request_started():
    # One sequence at a time, 8 tokens a step, an eighth of a second a token: each request's
    # 16-token prompt takes two one-second steps, the second yielding its first token, and two
    # decodes (1/8 s each) the rest. The third request starts at 4.5 s, in a step that ends at
    # 5.5 s, when the first two requests' 6 tokens are out. The whole run: 9 tokens in 6.75 s.
    one_at_a_time = plan_schedule([(16, 3)] * 3, ScheduleSettings(64, 0, CHUNK_TOKENS, max_num_seqs=1,
                                                                  max_num_batched_tokens=8))
    result = simulate(one_at_a_time, SimulatedServer((StageCosts(1 / 8, 0.0, 0.0),), 1e9, 1e12, (1000,), 0),
                      CHUNK_TOKENS)
    assert (result.seconds, result.generated_tokens) == (pytest.approx(6.75), 9)
    assert (result.steady_seconds, result.steady_generated_tokens) == (pytest.approx(5.5), 6)
    assert result.steady_generated_tokens_per_s == pytest.approx(6 / 5.5)


def decode(index: int, request: int, staged_chunks: int = 0) -> Step:
    """A decode step of one request, micro-batch `index`. staged_chunks > 0: the request is
    host-resident, its KV so far (that many chunks) staged into slot index mod 2 before the step
    and its new row written through after it."""
    if not staged_chunks:
        return Step(index, index, (), ((request, CHUNK_TOKENS, 1),), ())
    return Step(index, index, (("stage", request, staged_chunks),), ((request, staged_chunks * CHUNK_TOKENS, 1),), (request,),
                staged_chunks)


def one_round(*steps: Step) -> Schedule:
    """Steps launched together (a micro-batch each), all taken back at the round's end."""
    indices = tuple(step.index for step in steps)
    return Schedule([Round(steps, indices, indices)], requests=((CHUNK_TOKENS, 1),) * len(steps))


def one_stage(pcie: float) -> SimulatedServer:
    return SimulatedServer((ONE_SECOND,), pcie, 1e12, (1000,), 0)


def test_a_prefetch_starts_when_its_slot_is_free_on_the_stage_not_at_launch():
    # One-second steps; step 2's prefetch (3 chunks of 1,000 bytes at 2,000 B/s: 1.5 s) goes into
    # slot 0, free once step 0 has computed: [1, 2.5]. Step 1 computes [1, 2], step 2 waits for its
    # prefetch: [2.5, 3.5], half a second exposed. (Issued at launch it would have landed at 1.5.)
    result = simulate(one_round(decode(0, 0), decode(1, 1), decode(2, 2, staged_chunks=3)), one_stage(2000.0),
                      CHUNK_TOKENS)
    assert result.seconds == pytest.approx(3.5) and result.exposed_copy_seconds == [pytest.approx(0.5)]
    assert result.prefetched_bytes == 3000 and result.written_back_bytes == 125  # one row of 1,000 / 8 bytes


def test_a_prefetch_into_a_slot_waits_for_the_write_through_of_its_last_user():
    # Step 0 prefills 8 tokens of a host-resident request in slot 0 and writes them through (1,000
    # bytes at 500 B/s): [0, 1], then [1, 3] to the host. Step 2's prefetch into slot 0 (2 s)
    # waits for them: [3, 5], and its compute for it: [5, 6].
    prefill = Step(0, 0, (("allocate_host", 0, 8),), ((0, 0, 8),), (0,))
    result = simulate(one_round(prefill, decode(1, 1), decode(2, 2, staged_chunks=1)), one_stage(500.0), CHUNK_TOKENS)
    assert result.seconds == pytest.approx(6.0) and result.exposed_copy_seconds == [pytest.approx(3.0)]
    assert result.written_back_bytes == 1000 + 125


def test_a_compute_waits_for_its_prefetch_when_the_link_is_slow():
    forced = schedule([(40, 6)] * 6, 3, offload="force", host_chunks=256, staging_chunks=16)
    fast, slow = simulate(forced, server(2, pcie=1e9), 8), simulate(forced, server(2, pcie=100.0), 8)
    assert fast.prefetched_bytes == slow.prefetched_bytes > 0
    assert max(fast.exposed_copy_seconds) < 0.01 and slow.exposed_copy_seconds[0] > 10
    assert slow.seconds > fast.seconds + 10


@settings(max_examples=examples(20), deadline=None)
# (At least three requests for three micro-batches: with two, the micro-batches alternate and each
# finds its KV still in its slot, copying nothing.)
@given(prompts=st.lists(st.tuples(st.integers(8, 60), st.integers(2, 8)), min_size=3, max_size=6),
       slower=st.sampled_from([1e2, 1e4, 1e5]))
def test_more_pcie_bandwidth_never_predicts_less(prompts, slower):
    forced = schedule(prompts, 3, offload="force", host_chunks=256, staging_chunks=16)  # steps prefetch their KV
    fast, slow = simulate(forced, server(1, pcie=1e7), 8), simulate(forced, server(1, pcie=slower), 8)
    assert fast.generated_tokens_per_s >= slow.generated_tokens_per_s
    assert fast.prefetched_bytes == slow.prefetched_bytes > 0
    assert sum(fast.exposed_copy_seconds) <= sum(slow.exposed_copy_seconds)
    if slower == 1e2:  # ten seconds a chunk: prefetches no one-second step can hide
        assert slow.seconds > fast.seconds

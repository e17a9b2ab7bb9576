"""The throughput simulator against pipelines timed by hand: one stage; two stages with one
micro-batch (a bubble: each stage idles half the time); two stages with two micro-batches
(the pipeline fills). And more PCIe bandwidth never predicts less throughput."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.core.offload_schedule import ScheduleSettings, plan_schedule
from pipemax.tuning.simulator import SimulatedServer, StageCosts, simulate
from tests.helpers import examples

ONE_SECOND = StageCosts(alpha=0.0, beta=0.0, delta=1.0)


def server(stages: int, pcie: float = 1e9) -> SimulatedServer:
    return SimulatedServer(stages=(ONE_SECOND,) * stages, pcie_bytes_per_second=pcie, link_bytes_per_second=1e12,
                           chunk_bytes=(1000,) * stages, activation_bytes_per_token=0)


def schedule(requests, micro_batches, offload="off", host_chunks=0):
    return plan_schedule(requests, ScheduleSettings(64, host_chunks, 8, max_num_seqs=4, max_num_batched_tokens=64,
                                                    num_micro_batches=micro_batches, offload=offload))


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


@settings(max_examples=examples(20), deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(8, 60), st.integers(2, 8)), min_size=2, max_size=6),
       slower=st.sampled_from([1e2, 1e4, 1e5]))
def test_more_pcie_bandwidth_never_predicts_less(prompts, slower):
    forced = schedule(prompts, 2, offload="force", host_chunks=256)  # every step prefetches its KV
    fast, slow = simulate(forced, server(1, pcie=1e7), 8), simulate(forced, server(1, pcie=slower), 8)
    assert fast.generated_tokens_per_s >= slow.generated_tokens_per_s
    assert fast.prefetched_bytes == slow.prefetched_bytes > 0
    if slower == 1e2:  # ten seconds a chunk: prefetches no one-second step can hide
        assert slow.seconds > fast.seconds

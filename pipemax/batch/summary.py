"""The run summary's lines: what the engine's figures of a run say, in words, for the batch job's
summary (`pipemax serve-offline` prints them when a job ends)."""

from __future__ import annotations

from pipemax.core.cost_model import describe_step_time_model


def describe_prefix_cache(stats: dict) -> str:
    """The run summary's prefix cache line ("" when caching was off or nothing ran): the prompt
    tokens whose KV came from the cache, of all the tokens admitted requests needed (a preempted
    request's again), summed over data-parallel replicas."""
    parts = [replica.get("prefix_cache") for replica in stats.get("replicas", [stats])]
    parts = [part for part in parts if part]
    if not parts:
        return ""
    reused = sum(part["reused_tokens"] for part in parts)
    needed = sum(part["prompt_tokens"] for part in parts)
    line = (f"prefix cache: {reused} of {needed} prompt tokens reused "
            f"({reused / needed if needed else 0:.0%} of prefill skipped)")
    demoted = sum(part["demoted_chunks"] for part in parts)
    promoted = sum(part["promoted_chunks"] for part in parts)
    if demoted or promoted:
        line += f"; host tier: {demoted} chunks kept there, {promoted} brought back for a hit"
    return line


def describe_run(stats: dict) -> str:
    """One line of a run's pipeline figures for summaries ("" when nothing ran)."""
    if "replicas" in stats:
        lines = [describe_run(replica) for replica in stats["replicas"]]
        return f"data parallel: {len(lines)} replicas; " + " | ".join(line for line in lines if line)
    if not stats.get("steps"):
        return ""
    line = (f"pipeline: {stats['stages']} stage(s) of {'/'.join(map(str, stats['stage_layers']))} layers, "
            f"{stats['micro_batches']} micro-batch(es), {stats.get('kv_cache_dtype', '?')} KV cache, "
            f"{stats['steps']} steps of {stats['mean_micro_batch_seqs']:.1f} "
            "sequences on average")
    if "stage_busy_seconds" in stats:
        busy = ", ".join(f"{1 - bubble:.0%}" for bubble in stats["stage_bubble_fraction"])
        timed = "stage busy" if len(stats["stage_busy_seconds"]) == stats["stages"] else "stage 0 busy"
        line += f"; {timed} {busy} of {stats['device_seconds']:.2f} s"
    if "device_waited_for_host_fraction" in stats:
        line += f"; device waited for the host {stats['device_waited_for_host_fraction']:.0%}"
    if "offload" in stats:
        moved = stats["transfers"]
        line += (f"; offload: {stats['offload']['host_resident_requests']} requests host-resident, "
                 f"{moved['bytes_prefetched'] / 1e6:.1f} MB prefetched, "
                 f"{(moved['bytes_written_back'] + moved['bytes_offloaded']) / 1e6:.1f} MB to the host, "
                 f"copies at {moved['copy_gb_per_s']:.1f} GB/s")
        hidden = stats.get("copy_time_hidden_fraction")
        if hidden is not None:
            line += f", {hidden:.0%} of copy time hidden behind compute"
    words = describe_step_time_model(stats["cost_model"]) if "cost_model" in stats else ""
    if words:
        line += f"; {words}"
    return line

"""Several nodes under torchrun: two torchrun launches on this machine join one c10d rendezvous,
as two nodes of 2 ranks each would, and run the same `python -m pipemax serve-offline` command.
The job's results equal one process's; a rank that dies ends the job with whole lines written,
and a rerun completes every request once."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipemax.cli import main
from tests.batch.test_batch_job import ROOT, chat, completion, read_results, write_lines
from tests.test_cli_errors import alive, read_proc

pytestmark = pytest.mark.subprocess

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
NODES, RANKS_PER_NODE = 2, 2


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    from pipemax.models.default_model import default_model_path
    from tests.conftest import TOKENIZER_FILES
    from tests.tiny_models import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-four-layers")
    save_tiny_model("llama3", folder, vocab_size=49152, eos_token_id=2, bos_token_id=1, num_hidden_layers=4)
    for name in TOKENIZER_FILES:
        if (default_model_path() / name).exists():
            shutil.copy(default_model_path() / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_args(model, requests, out, *extra):
    return ["serve-offline", "--model", str(model), "-i", str(requests), "-o", str(out), "--no-progress",
            "--max-model-len", "256", "--served-model-name", "tiny", *extra]


def start_nodes(args, run_id):
    """Two torchrun launches, node ranks 0 and 1, meeting at one c10d rendezvous."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([*TORCHRUN, "--nnodes", str(NODES), "--nproc-per-node", str(RANKS_PER_NODE),
                              "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                              f"127.0.0.1:{port}", "--rdzv-id", run_id, "--max-restarts", "0",
                              # Both "nodes" have the endpoint's address here: say which hosts the store.
                              "--rdzv-conf", f"is_host={int(node == 0)}",
                              "-m", "pipemax", *args],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
            for node in range(NODES)]


def finish(nodes, timeout=240):
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in nodes:
                os.killpg(other.pid, signal.SIGKILL)
            raise
    return outputs


def texts(path):
    records = read_results(path)
    assert len({r["custom_id"] for r in records}) == len(records), "a request answered twice"
    return {r["custom_id"]: r["response"]["body"]["choices"][0] for r in records}


REQUESTS = [completion(f"c{i}", f"count to {i}:", max_tokens=12, ignore_eos=True) for i in range(5)] + [
    chat("chat", "say hi", max_tokens=8), completion("seeded", "once upon", temperature=0.8, seed=3, max_tokens=10)]


@pytest.fixture(scope="module")
def reference(four_layer_model, tmp_path_factory):
    """REQUESTS run as one plain job (in this process: one torch thread, as every rank has)."""
    folder = tmp_path_factory.mktemp("reference")
    write_lines(folder / "requests.jsonl", REQUESTS)
    assert main(job_args(four_layer_model, folder / "requests.jsonl", folder / "reference.jsonl")) == 0
    return folder / "reference.jsonl"


@pytest.mark.parametrize("stages,replicas", [(4, 1), (2, 2)], ids=["pp4-across-nodes", "pp2xdp2"])
def test_two_nodes_give_the_results_of_one_process(four_layer_model, reference, tmp_path, stages, replicas):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, REQUESTS)

    out = tmp_path / "out.jsonl"
    nodes = start_nodes(job_args(four_layer_model, requests, out, "--pipeline-parallel", str(stages),
                                 "--data-parallel", str(replicas)), f"same-{stages}-{replicas}")
    (stdout, stderr), (_, stderr1) = finish(nodes)
    assert [node.returncode for node in nodes] == [0, 0], (stderr[-3000:], stderr1[-3000:])
    assert f"results: {out}" in stdout  # rank 0 (on node 0) ran the job and wrote the summary
    if replicas > 1:
        assert "data parallel: 2 replicas" in stdout
    assert texts(out) == texts(reference)


def rank_pid(run_id: str, rank: int) -> int | None:
    """The process torchrun started as `rank` of this run (found by its environment)."""
    wanted = {f"TORCHELASTIC_RUN_ID={run_id}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and wanted <= set((read_proc(entry.name, "environ") or b"").split(b"\0")):
            return int(entry.name)
    return None


def test_a_killed_rank_ends_the_job_with_whole_lines_and_a_rerun_resumes(four_layer_model, tmp_path):
    requests = tmp_path / "requests.jsonl"
    count = 16
    write_lines(requests, [completion(f"q{i}", f"verse {i}:", max_tokens=16, ignore_eos=True) for i in range(count)])
    out = tmp_path / "out.jsonl"
    args = job_args(four_layer_model, requests, out, "--pipeline-parallel", "2", "--data-parallel", "2",
                    "--max-batch", "1", "--stage-timeout", "30")
    nodes = start_nodes(args, "killed-rank")
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
        assert all(node.poll() is None for node in nodes), "the job ended before the kill"
        time.sleep(0.1)
    victim = rank_pid("killed-rank", 3)  # a stage of replica 1, on node 1
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    started = time.time()
    (_, stderr), _ = finish(nodes, timeout=120)
    assert time.time() - started < 60
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    said = next(line for line in stderr.splitlines() if line.startswith("pipemax: "))
    # Two true stories, by a race torchrun runs: rank 2 sees its stage gone and reports it, or
    # node 1's torchrun agent, seeing rank 3 dead, stops rank 2 first and rank 0 loses rank 2.
    assert said.startswith("pipemax: replica 1 on rank 2 failed: ") and said.endswith(
        "run the same command again to resume"), said
    assert ("StageFailure: the pipeline broke while " in said and "stage 1 on rank 3 is gone" in said) or \
        "lost the connection (" in said, said
    assert not alive(victim) and all(rank_pid("killed-rank", rank) is None for rank in range(4)), "a rank was left"
    written = read_results(out)  # whole lines only
    assert 2 <= len(written) < count

    # The file the broken world left resumes like any other (the results file is rank 0's alone):
    # a plain job, here in this process, finishes it.
    assert main(job_args(four_layer_model, requests, out, "--max-batch", "1")) == 0
    assert sorted(texts(out)) == sorted(f"q{i}" for i in range(count))


def test_a_world_that_is_not_p_times_r_is_a_one_line_error(four_layer_model, tmp_path):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, REQUESTS[:1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "RANK": "0",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    job = subprocess.run([sys.executable, "-m", "pipemax", *job_args(four_layer_model, requests, tmp_path / "o.jsonl",
                                                                     "--pipeline-parallel", "2")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 2
    assert job.stderr.strip().splitlines()[-1] == (
        "pipemax: --pipeline-parallel 2 x --data-parallel 1 = 2 ranks, but torchrun started 4: set them so that "
        "P x R = WORLD_SIZE")

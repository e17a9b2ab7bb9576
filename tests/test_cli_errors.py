"""`pipemax serve-offline` under ordinary mistakes, interruption and a second job: one line that
names the fix, before any weights load; exit codes as documented; nothing lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipemax import LLM
from pipemax.cli import main
from pipemax.engine import llm_engine as engine_module
from tests.batch.test_batch_job import ROOT, completion, read_results, write_lines


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load weights fails the test: the errors below must come before that."""
    def load_model(*args, **kwargs):
        raise AssertionError("weights were loaded before the user error was reported")

    monkeypatch.setattr(engine_module, "load_model", load_model)


def one_line_error(capsys, words):
    err = capsys.readouterr().err
    assert err.startswith("pipemax: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err, err
    return err


def test_user_errors_are_one_line_before_weights_load(model_folder, tmp_path, capsys, no_weight_loading):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi")])
    out = tmp_path / "out.jsonl"

    def serve(*flags, model=model_folder, output=out, inputs=requests):
        args = ["serve-offline", "-i", str(inputs), "-o", str(output), "--no-progress", *flags]
        return main(args + (["--model", str(model)] if model else []))

    assert serve("--device", "tpu") == 2
    one_line_error(capsys, "--device 'tpu' is not a device PipeMax runs on: use auto, cpu, cuda or cuda:N")
    if torch.version.cuda is None:
        assert serve("--device", "cuda") == 2
        one_line_error(capsys, "this PyTorch build (" + torch.__version__ + ") has no CUDA support; use cpu")
    assert serve("--max-model-len", "-3") == 2
    one_line_error(capsys, "--max-model-len must be an integer >= 2")

    assert serve("--pipeline-parallel", "9") == 2
    one_line_error(capsys, "--pipeline-parallel: 9 pipeline stages for a model of 3 layers: every stage needs at least "
                           "one layer, so use at most 3")
    assert serve("--pipeline-parallel", "2", "--stage-layers", "2,2") == 2
    one_line_error(capsys, "--stage-layers: stage layers [2, 2] sum to 4, but the model has 3 layers")
    assert serve("--pipeline-parallel", "3", "--micro-batches", "2") == 2
    one_line_error(capsys, "--micro-batches must be an integer from the number of stages (3) to 64, got 2")
    assert serve("--stage-layers", "a,b") == 2
    one_line_error(capsys, "--stage-layers must be comma-separated layer counts such as 10,11,11, got 'a,b'")

    assert serve(model=tmp_path / "nowhere") == 2
    one_line_error(capsys, "does not exist (PipeMax loads local model folders (config.json + safetensors) and "
                           ".gguf files only)")
    assert serve(model=requests) == 2
    one_line_error(capsys, "is a file but not a .gguf file")
    broken = tmp_path / "broken-model"
    shutil.copytree(model_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a download cut short
    assert serve(model=broken) == 2
    one_line_error(capsys, "model.safetensors is not a readable safetensors file")
    weights.write_bytes(b"\x00" * 64)
    assert serve(model=broken) == 2
    one_line_error(capsys, "re-download or re-convert the model")
    shutil.copy(model_folder / "model.safetensors", weights)
    (broken / "config.json").write_text("{not json")
    assert serve(model=broken) == 2
    one_line_error(capsys, "config.json is not valid JSON")

    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"<html>not found</html>")
    assert serve(model=garbage) == 2
    one_line_error(capsys, "is not a GGUF file")
    from pipemax.models.default_model import bundled_gguf
    garbage.write_bytes(bundled_gguf().read_bytes()[:4_000_000])  # a download cut short
    assert serve(model=garbage) == 2
    one_line_error(capsys, "is not a readable GGUF file")

    assert serve(output=tmp_path) == 2
    one_line_error(capsys, "is a folder: name a file")
    assert serve(output=requests) == 2
    one_line_error(capsys, "is the input file")
    assert serve(inputs=tmp_path) == 2
    one_line_error(capsys, "is a folder: name a .jsonl file of requests")
    assert serve(output=Path("/proc/results.jsonl")) == 2
    one_line_error(capsys, "folder you can write to")
    out.write_text("my notes\n")
    assert serve() == 2
    one_line_error(capsys, "exists and is not a PipeMax results file (line 1 is not a result record); choose another "
                           "output file, or pass --overwrite to replace it")
    assert out.read_text() == "my notes\n"
    assert requests.read_text().count("\n") == 1


def test_max_model_len_above_the_model_is_capped_with_a_warning(model_folder, caplog):
    llm = LLM(model=str(model_folder), max_model_len=10**6)
    assert llm.engine.max_model_len == llm.engine.model_config.max_model_len < 10**6
    assert f"max_model_len 1000000 is above this model's limit of {llm.engine.max_model_len}" in caplog.text
    assert LLM(model=str(model_folder), max_model_len=40).engine.max_model_len == 40


def test_exit_code_zero_when_everything_succeeded(model_folder, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi"), completion("b", [3, 4])])
    assert main(["serve-offline", "--model", str(model_folder), "-i", str(requests), "-o", str(tmp_path / "o.jsonl"),
                 "--no-progress", "--served-model-name", "tiny"]) == 0
    assert "2 succeeded, 0 failed" in capsys.readouterr().out


def job_command(model_folder, requests, out, *extra):
    return [sys.executable, "-m", "pipemax.cli", "serve-offline", "--model", str(model_folder), "-i", str(requests),
            "-o", str(out), "--no-progress", "--max-batch", "1", "--max-model-len", "256", "--served-model-name",
            "tiny", *extra]


def default_signals():
    """In the child before exec: SIGINT back to its default. A shell runs a background job (this
    suite, say, under `make test &`) with SIGINT ignored, children inherit that, and Python keeps
    an ignored SIGINT ignored: the job would never see the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_wait_for_results(command, out, count):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, as a job in a terminal
                            preexec_fn=default_signals)
    wait_for_results(proc, out, count)
    return proc, env


def wait_for_results(proc, out, count):
    """Wait (on the file, not on a clock) until a running job has written `count` results."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the job ended or stalled before {count} results: {proc.communicate()[1][-2000:]}")


@pytest.mark.subprocess
@pytest.mark.parametrize("signum, code, pipeline", [(signal.SIGINT, 130, ()), (signal.SIGTERM, 143, ()),
                                                    (signal.SIGINT, 130, ("--pipeline-parallel", "2"))],
                         ids=["sigint", "sigterm", "sigint-stage-processes"])
def test_interrupted_job_says_how_to_resume_and_keeps_every_result(model_folder, tmp_path, signum, code, pipeline):
    requests = tmp_path / "requests.jsonl"
    count = 12
    write_lines(requests, [completion(f"q{i}", f"tale {i}:", max_tokens=25, ignore_eos=True) for i in range(count)])
    out = tmp_path / "out.jsonl"
    command = job_command(model_folder, requests, out, *pipeline)
    proc, env = start_and_wait_for_results(command, out, 2)
    stages = stage_processes(proc.pid)
    # Ctrl-C in a terminal reaches the job's whole process group, stage processes included.
    os.killpg(proc.pid, signum) if pipeline else proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert len(stages) == (1 if pipeline else 0) and not any(alive(pid) for pid in stages)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    written = read_results(out)  # every line whole
    assert 2 <= len(written) < count
    assert f"interrupted: {len(written)} results written to {out}; run the same command again to resume" in stderr
    assert not (tmp_path / ".out.jsonl.pipemax-lock").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{count - len(written)} succeeded, 0 failed, {len(written)} already done" in rerun.stdout
    assert sorted(r["custom_id"] for r in read_results(out)) == sorted(f"q{i}" for i in range(count))


@pytest.mark.subprocess
def test_a_second_job_on_the_same_output_refuses_at_once(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    # One request at a time, far more than can finish while the test runs: the first job is still
    # writing when the second starts, however loaded the machine. It is stopped afterwards.
    count = 500
    write_lines(requests, [completion(f"q{i}", f"list {i}:", max_tokens=64, ignore_eos=True) for i in range(count)])
    out = tmp_path / "out.jsonl"
    first, env = start_and_wait_for_results(job_command(model_folder, requests, out), out, 1)
    try:
        started = time.time()
        second = subprocess.run(job_command(model_folder, requests, out), env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"pipemax: another job (pid {first.pid}) is writing {out}: wait for it to finish" in second.stderr
        assert time.time() - started < 60  # refused before loading the model, not after running
        assert first.poll() is None, "the first job ended before the second started: the test proved nothing"
        # The refusal left the first job's file alone: it goes on writing whole lines, its own only.
        before = len(read_results(out))
        wait_for_results(first, out, before + 1)
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert first.returncode == 143
    ids = [r["custom_id"] for r in read_results(out)]  # every line whole
    assert len(ids) == len(set(ids)) and set(ids) <= {f"q{i}" for i in range(count)}


def test_fix_a_failed_line_and_rerun(model_folder, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("fine", "hello"), completion("typo", "hello", temperature="0.5")])
    out = tmp_path / "out.jsonl"
    args = ["serve-offline", "--model", str(model_folder), "-i", str(requests), "-o", str(out), "--no-progress",
            "--served-model-name", "tiny"]
    assert main(args) == 3
    assert "failed: line 2 (typo): temperature must be a number, got '0.5'" in capsys.readouterr().out
    fine_line = next(line for line in out.read_text().splitlines() if '"custom_id": "fine"' in line)
    write_lines(requests, [completion("fine", "hello"), completion("typo", "hello", temperature=0.5)])
    assert main(args) == 0
    assert "1 succeeded, 0 failed, 1 already done (1 had failed before and ran again)" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert lines[0] == fine_line and len(lines) == 2  # the success untouched, the error record gone
    assert json.loads(lines[1])["custom_id"] == "typo" and json.loads(lines[1])["error"] is None


@pytest.fixture
def tokenizerless_model(tmp_path):
    """A tiny random Llama without a tokenizer (the GPU machine has no bundled one): token-id prompts."""
    from tests.tiny_models import save_tiny_model

    save_tiny_model("llama3", tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batch_job_on_cuda_and_a_cuda_device_that_does_not_exist(tokenizerless_model, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", [5, 6, 7]), completion("b", [8, 9], seed=2**64 - 1, temperature=1.0),
                           completion("c", [3], seed=2**64)])
    args = ["serve-offline", "--model", str(tokenizerless_model), "-i", str(requests), "--no-progress",
            "--served-model-name", "tiny", "--device", "cuda", "-o"]
    assert main(args + [str(tmp_path / "o.jsonl")]) == 3
    records = {r["custom_id"]: r for r in read_results(tmp_path / "o.jsonl")}
    assert records["a"]["error"] is None and records["b"]["error"] is None
    assert records["c"]["error"]["param"] == "seed"
    capsys.readouterr()
    count = torch.cuda.device_count()
    assert main(args[:-3] + ["--device", f"cuda:{count}", "-o", str(tmp_path / "o2.jsonl")]) == 2
    one_line_error(capsys, f"--device 'cuda:{count}' does not exist: this machine has {count} CUDA device(s)")


@pytest.mark.subprocess
def test_warnings_print_once_even_where_transformers_propagates(model_folder, tmp_path):
    """transformers propagates its logs to the root logger when CI is set: a root handler would
    print each of its warnings twice. Our own warnings go through one handler."""
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi", max_tokens=2)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true"}
    result = subprocess.run(job_command(model_folder, requests, tmp_path / "o.jsonl")[:-6] + [
        "--max-model-len", "1000000", "--served-model-name", "tiny"], env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("is above this model's limit") == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), result.stderr
    import logging
    main(["--version"])
    main(["--version"])
    assert len(logging.getLogger("pipemax").handlers) == 1
    assert not any(type(handler) is logging.StreamHandler for handler in logging.getLogger().handlers)


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) processes below pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def read_proc(pid, name: str) -> bytes | None:
    """A process's /proc file, None once the process is gone."""
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return None


def stage_processes(pid: int) -> list[int]:
    """The job's stage processes (spawned workers), not multiprocessing's resource tracker."""
    return [child for child in descendants(pid) if b"spawn_main" in (read_proc(child, "cmdline") or b"")]


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.subprocess
def test_a_killed_stage_process_ends_the_job_cleanly_and_a_rerun_resumes(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    count = 16
    write_lines(requests, [completion(f"q{i}", f"verse {i}:", max_tokens=12, ignore_eos=True) for i in range(count)])
    out = tmp_path / "out.jsonl"
    command = job_command(model_folder, requests, out, "--pipeline-parallel", "2", "--stage-timeout", "30")
    job, env = start_and_wait_for_results(command, out, 2)
    stages = stage_processes(job.pid)
    assert len(stages) == 1, "the job runs one stage process"
    started = time.time()
    for pid in stages:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=60)
    assert time.time() - started < 30 and job.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "pipemax: stage 1 on cpu was killed by SIGKILL while waiting for sampled tokens" in stderr, stderr
    assert "results are safe in" in stderr and "run the same command again to resume" in stderr
    assert not any(alive(pid) for pid in stages)
    written = read_results(out)  # whole lines only
    assert 2 <= len(written) < count

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(r["custom_id"] for r in read_results(out)) == sorted(f"q{i}" for i in range(count))


@pytest.mark.subprocess
def test_killing_the_job_takes_its_stage_processes_with_it(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion(f"q{i}", f"song {i}:", max_tokens=30, ignore_eos=True) for i in range(12)])
    out = tmp_path / "out.jsonl"
    job, _ = start_and_wait_for_results(job_command(model_folder, requests, out, "--pipeline-parallel", "3"), out, 1)
    stages = stage_processes(job.pid)
    assert len(stages) == 2
    job.kill()
    job.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(pid) for pid in stages):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in stages), "a stage process outlived the job"


@pytest.mark.subprocess
def test_a_stage_that_stops_answering_ends_the_job_within_the_timeout(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion(f"q{i}", f"rhyme {i}:", max_tokens=30, ignore_eos=True) for i in range(12)])
    out = tmp_path / "out.jsonl"
    job, _ = start_and_wait_for_results(job_command(model_folder, requests, out, "--pipeline-parallel", "2",
                                                    "--stage-timeout", "4"), out, 1)
    stages = stage_processes(job.pid)
    os.kill(stages[0], signal.SIGSTOP)  # alive, but silent: a hung stage
    started = time.time()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 2 and time.time() - started < 4 + 15, stderr[-2000:]
    assert "no answer from the pipeline for 4 s while waiting for sampled tokens (--stage-timeout)" in stderr
    assert "Traceback" not in stderr and not any(alive(pid) for pid in stages)
    read_results(out)  # whole lines only


@pytest.mark.subprocess
def test_a_killed_replica_ends_the_job_cleanly_and_a_rerun_resumes(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    count = 16
    write_lines(requests, [completion(f"q{i}", f"ode {i}:", max_tokens=12, ignore_eos=True) for i in range(count)])
    out = tmp_path / "out.jsonl"
    command = job_command(model_folder, requests, out, "--data-parallel", "2")
    job, env = start_and_wait_for_results(command, out, 2)
    replicas = stage_processes(job.pid)
    assert len(replicas) == 2
    os.kill(replicas[0], signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert "was killed by SIGKILL while running" in stderr and "run the same command again to resume" in stderr
    deadline = time.time() + 20
    while time.time() < deadline and any(alive(pid) for pid in replicas):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in replicas)
    read_results(out)  # whole lines only
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(r["custom_id"] for r in read_results(out)) == sorted(f"q{i}" for i in range(count))


# ---- --trace: checked with the other paths, before any weights load ------------------------------
def test_trace_may_not_replace_the_requests_the_results_or_a_foreign_file(model_folder, tmp_path, capsys,
                                                                          no_weight_loading):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi")])
    requests_text = requests.read_text()
    out = tmp_path / "out.jsonl"

    def serve(trace, *flags):
        return main(["serve-offline", "--model", str(model_folder), "-i", str(requests), "-o", str(out),
                     "--no-progress", "--trace", str(trace), *flags])

    assert serve(out) == 2
    one_line_error(capsys, f"--trace {out} is the output file: the trace would replace the results")
    assert serve(tmp_path / "." / "out.jsonl", "--overwrite") == 2  # the same file by another name, forced
    one_line_error(capsys, "is the output file")
    assert serve(requests) == 2
    one_line_error(capsys, "is the input file: the trace would replace the requests")
    assert serve(tmp_path) == 2
    one_line_error(capsys, f"--trace {tmp_path} is a folder: name a file")
    assert serve(tmp_path / "no such folder" / "t.json") == 2
    one_line_error(capsys, f"its folder {tmp_path / 'no such folder'} does not exist")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert serve(notes) == 2
    one_line_error(capsys, f"--trace {notes} exists and is not a PipeMax trace")
    assert notes.read_text() == "my notes\n" and requests.read_text() == requests_text and not out.exists()


def test_the_api_checks_the_trace_path_in_its_config():
    from pipemax.engine.config import ConfigError, EngineConfig

    folder = Path(ROOT)
    with pytest.raises(ConfigError, match="is a folder"):
        EngineConfig(model="m", trace=str(folder))
    with pytest.raises(ConfigError, match="does not exist"):
        EngineConfig(model="m", trace=str(folder / "missing" / "t.json"))
    with pytest.raises(ConfigError, match="exists and is not a PipeMax trace"):
        EngineConfig(model="m", trace=str(folder / "README.md"))
    with pytest.raises(ConfigError, match="must be a file path"):
        EngineConfig(model="m", trace=3)
    EngineConfig(model="m", trace=str(folder / "README.md"), overwrite_trace=True)  # told to: allowed


def test_a_trace_replaces_an_earlier_trace_and_a_failed_write_keeps_the_results(model_folder, tmp_path, capsys,
                                                                                monkeypatch):
    from pipemax.worker.timeline import Timeline

    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi"), completion("b", "ho")])
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [], "displayTimeUnit": "ms"}))  # an earlier run's
    flags = ["--model", str(model_folder), "-i", str(requests), "--no-progress", "--served-model-name", "tiny"]
    assert main(["serve-offline", *flags, "-o", str(tmp_path / "a.jsonl"), "--trace", str(trace)]) == 0
    assert json.loads(trace.read_text())["traceEvents"]  # this run's events
    capsys.readouterr()

    def full_disk(self, path, intervals=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Timeline, "write_trace", full_disk)
    assert main(["serve-offline", *flags, "-o", str(tmp_path / "b.jsonl"), "--trace", str(trace)]) == 0
    err = capsys.readouterr().err
    assert f"the trace was not written to {trace} (No space left on device)" in err and "Traceback" not in err
    assert len(read_results(tmp_path / "b.jsonl")) == 2


def test_a_trace_write_that_fails_leaves_the_earlier_trace_whole(tmp_path, monkeypatch):
    from pipemax.worker.timeline import Timeline

    trace = tmp_path / "trace.json"
    trace.write_text('{"traceEvents": [1]}')
    timeline = Timeline(torch.device("cpu"))
    monkeypatch.setattr(json, "dumps", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        timeline.write_trace(trace, [("stage 0", "step", 0.0, 1.0)])
    assert trace.read_text() == '{"traceEvents": [1]}' and sorted(tmp_path.iterdir()) == [trace]


# ---- the model name a vLLM batch file asks for ---------------------------------------------------
def test_requests_may_name_the_model_as_given_to_model_or_by_its_folder(model_folder, tmp_path, capsys):
    """vLLM serves a model under the --model string as given: a batch file written for it names that."""
    requests = tmp_path / "requests.jsonl"
    given = str(model_folder) + "/"  # as typed, with its slash
    write_lines(requests, [completion("given", "hi", model=given), completion("bare", "hi", model=str(model_folder)),
                           completion("folder", "hi", model=model_folder.name),
                           completion("hub", "hi", model="meta-llama/Llama-3.1-8B-Instruct")])
    out = tmp_path / "out.jsonl"
    assert main(["serve-offline", "--model", given, "-i", str(requests), "-o", str(out), "--no-progress"]) == 3
    by_id = {record["custom_id"]: record for record in read_results(out)}
    for custom_id, name in (("given", given), ("bare", str(model_folder)), ("folder", model_folder.name)):
        assert by_id[custom_id]["response"]["body"]["model"] == name  # answered under the name asked for
    assert by_id["hub"]["error"]["code"] == "model_not_found"
    assert repr(given) in by_id["hub"]["error"]["message"]
    capsys.readouterr()


# ---- memory budgets larger than the machine ------------------------------------------------------
def test_a_kv_budget_above_the_free_memory_is_one_line_before_weights_load(model_folder, tmp_path, capsys,
                                                                           no_weight_loading):
    from pipemax.engine.config import available_host_memory_gib
    from tests.tuning.test_autotune import write_profile

    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi")])
    too_much = round(available_host_memory_gib() * 2 + 50)
    flags = ["serve-offline", "--model", str(model_folder), "-i", str(requests), "-o", str(tmp_path / "o.jsonl"),
             "--no-progress"]
    assert main([*flags, "--kv-cache-gib", str(too_much), "--no-profile"]) == 2
    one_line_error(capsys, f"--kv-cache-gib of {too_much} is more than the")
    write_profile(model_folder, {"kv_cache_gib": too_much})
    assert main(flags) == 2
    one_line_error(capsys, f"the server profile's kv_cache_gib of {too_much} is more than the")


# ---- Ctrl-C outside the job's loop -----------------------------------------------------------------
CTRL_C_WHILE_CLOSING = """
import os, signal, sys
from pipemax import api
from pipemax.cli import entry

close = api.LLM.close
def close_after_a_ctrl_c(self):
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C as the job tears down
    close(self)
api.LLM.close = close_after_a_ctrl_c
sys.argv = ["pipemax"] + sys.argv[1:]
entry()
"""


@pytest.mark.subprocess
def test_ctrl_c_as_the_job_ends_is_one_line_and_the_jobs_own_status(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi"), completion("b", [3, 4])])
    out = tmp_path / "out.jsonl"
    command = job_command(model_folder, requests, out)
    command[1:3] = ["-c", CTRL_C_WHILE_CLOSING]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          preexec_fn=default_signals)
    assert proc.returncode == 0, proc.stderr  # the job succeeded: its status, not death by SIGINT
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert proc.stderr.count("the job has ended and its results are written") == 1
    assert "2 succeeded, 0 failed" in proc.stdout and len(read_results(out)) == 2


@pytest.mark.parametrize("command", ["plan", "autotune"])
def test_ctrl_c_in_plan_and_autotune_is_one_line(command, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    module = "pipemax.tuning.plan_command.run_plan" if command == "plan" else "pipemax.tuning.autotune.run_autotune"
    monkeypatch.setattr(module, interrupted)
    assert main([command, "--model", "m"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"pipemax: {command} interrupted") and "Traceback" not in err


def test_ctrl_c_outside_main_is_one_line_and_status_130(monkeypatch, capsys):
    from pipemax import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    try:
        with pytest.raises(SystemExit) as exit_status:
            cli.entry()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert exit_status.value.code == 130 and capsys.readouterr().err == "pipemax: interrupted\n"


def test_serve_offline_help_names_every_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["serve-offline", "--help"])
    epilog = " ".join(capsys.readouterr().out.split())
    for status in ("0 all requests succeeded", "1 an unexpected error", "2 job error", "3 the job finished",
                   "130 interrupted", "143 terminated"):
        assert status in epilog


def test_a_torchrun_worker_rank_interrupted_before_the_job_says_nothing(monkeypatch, capsys):
    """Rank 0 reports an interruption for the whole job; a worker rank has no requests of its own."""
    from pipemax import cli

    def interrupted(args):
        raise cli.Terminated

    monkeypatch.setattr(cli, "_serve_with_one_line_errors", interrupted)
    monkeypatch.setattr(cli, "exit_now_under_torchrun", lambda rc: None)
    args = ["serve-offline", "-i", "in.jsonl", "-o", "out.jsonl"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 143 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 143 and capsys.readouterr().err == "interrupted before any request ran\n"

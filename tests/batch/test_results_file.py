"""The output file: never the input, never a file that is not ours, one job at a time, failed
requests retried, and every rewrite atomic."""

import json
import os
from pathlib import Path

import pytest

from pipemax.batch import results_file
from pipemax.batch.results_file import JobLock, OutputFileError, ResultsFile


def record(custom_id, ok=True):
    error = None if ok else {"code": "invalid_request", "message": "bad", "param": None, "line": 1}
    return {"id": f"pipemax-{custom_id}", "custom_id": custom_id,
            "response": {"status_code": 200 if ok else 400, "request_id": "r", "body": {} if ok else None},
            "error": error}


def lines_of(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def requests(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    return path


def test_the_input_is_never_the_output(requests, tmp_path):
    before = requests.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(requests)
    hard = tmp_path / "hard.jsonl"
    os.link(requests, hard)
    for output in (requests, link, hard, tmp_path / "." / "requests.jsonl"):
        with pytest.raises(OutputFileError, match="is the input file"):
            ResultsFile.open(requests, output)
    assert requests.read_bytes() == before
    assert not list(tmp_path.glob(".*pipemax-lock"))


@pytest.mark.parametrize("content", [
    "notes I care about\n",
    "a last line without its newline",
    lines_of(record("a")) + "a text line\n",
    lines_of(record("a")) + '{"custom_id": "x", "torn',  # a fragment we did not write
    '{"custom_id": "x"}\n',  # JSON, but no result record
    lines_of(record("a") | {"id": "vllm-a"}),  # vllm run-batch's results: not ours to rewrite
])
def test_a_file_that_is_not_ours_is_left_alone_unless_overwritten(requests, tmp_path, content):
    output = tmp_path / "out.jsonl"
    output.write_text(content)
    with pytest.raises(OutputFileError, match="not a PipeMax results file.*--overwrite"):
        ResultsFile.open(requests, output)
    assert output.read_text() == content
    results, _ = ResultsFile.open(requests, output, overwrite=True)
    results.close()
    assert output.read_text() == ""


def test_resume_keeps_successes_drops_errors_and_a_torn_line(requests, tmp_path):
    output = tmp_path / "out.jsonl"
    torn = json.dumps(record("c"))[:25]
    output.write_text(lines_of(record("a"), record("b", ok=False), record("c")) + torn)
    os.chmod(output, 0o640)
    results, dropped = ResultsFile.open(requests, output)
    assert dropped == 1 and results.done == {"a", "c"} and results.num_records == 2
    results.write(record("b"))
    results.close()
    assert [json.loads(line)["custom_id"] for line in output.read_text().splitlines()] == ["a", "c", "b"]
    assert output.stat().st_mode & 0o777 == 0o640  # the rewrite kept the file's permissions
    assert not list(tmp_path.glob(".out.jsonl.tmp-*")) and not (tmp_path / ".out.jsonl.pipemax-lock").exists()


# Records as another tool (or a person) writes them in the OpenAI batch output format: an HTTP
# error is a response with its status code and `error: null`; a failure before any response has
# `response: null` and `error` set. Only the first is done.
HAND_WRITTEN = [
    '{"id":"pipemax-1","custom_id":"ok","response":{"status_code":200,"request_id":"q1","body":{}},"error":null}',
    '{"id": "pipemax-2", "custom_id": "http 400", "error": null, "response": {"status_code": 400, '
    '"request_id": "q2", "body": {"error": {"message": "bad", "type": "invalid_request_error"}}}}',
    '{"id": "pipemax-3", "custom_id": "http 500", "response": {"status_code": 500, "request_id": "q3", '
    '"body": null}, "error": null}',
    '{"id": "pipemax-4", "custom_id": "200 with an error", "response": {"status_code": 200, "request_id": "q4", '
    '"body": {}}, "error": {"code": "server_error", "message": "lost"}}',
    '{"id": "pipemax-5", "custom_id": "no response", "response": null, "error": {"code": "expired", '
    '"message": "not run"}}',
    '{"id": "pipemax-6", "custom_id": "no status", "response": {"request_id": "q6", "body": {}}, "error": null}',
]


def test_resume_reruns_every_record_but_status_200_without_error_whoever_wrote_it(requests, tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text("".join(line + "\n" for line in HAND_WRITTEN))
    results, dropped = ResultsFile.open(requests, output)
    assert results.done == {"ok"} and dropped == len(HAND_WRITTEN) - 1
    results.write(json.loads(HAND_WRITTEN[1]) | {"custom_id": "written now"})  # a 400 without error: not done
    assert results.done == {"ok"}
    results.close()
    assert output.read_text().splitlines()[0] == HAND_WRITTEN[0] and len(output.read_text().splitlines()) == 2


def test_a_failed_rewrite_leaves_the_old_file_whole(requests, tmp_path, monkeypatch):
    output = tmp_path / "out.jsonl"
    content = lines_of(record("a"), record("b", ok=False))
    output.write_text(content)

    def killed(*args):
        raise KeyboardInterrupt  # as if Ctrl-C came between the temporary file and the rename

    monkeypatch.setattr(results_file.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ResultsFile.open(requests, output)
    assert output.read_text() == content
    assert not list(tmp_path.glob(".out.jsonl.tmp-*")) and not (tmp_path / ".out.jsonl.pipemax-lock").exists()


def test_one_job_per_output(requests, tmp_path):
    output = tmp_path / "out.jsonl"
    first, _ = ResultsFile.open(requests, output)
    with pytest.raises(OutputFileError, match=f"another job \\(pid {os.getpid()}\\) is writing"):
        ResultsFile.open(requests, output)
    first.close()
    second, _ = ResultsFile.open(requests, output)  # free again once the first closed
    second.close()


def test_a_lock_file_removed_under_a_waiting_opener_is_not_trusted(tmp_path, monkeypatch):
    """Between our open and our flock, a finishing job may remove the lock file: we must lock the new one."""
    output = tmp_path / "out.jsonl"
    real_flock, calls = results_file.fcntl.flock, []

    def flock_after_the_file_was_replaced(fd, flags):
        if not calls:
            (tmp_path / ".out.jsonl.pipemax-lock").unlink()
        calls.append(fd)
        return real_flock(fd, flags)

    monkeypatch.setattr(results_file.fcntl, "flock", flock_after_the_file_was_replaced)
    lock = JobLock(output)
    assert len(calls) == 2 and os.fstat(lock.fd).st_ino == os.stat(lock.path).st_ino
    lock.release()


def test_output_path_problems_are_one_line_errors(requests, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(OutputFileError, match="is a folder: name a file"):
        ResultsFile.open(requests, folder)
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    with pytest.raises(OutputFileError, match="cannot create the folder"):
        ResultsFile.open(requests, a_file / "out.jsonl")
    with pytest.raises(OutputFileError, match="input file .* not found"):
        ResultsFile.open(tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    with pytest.raises(OutputFileError, match="is a folder: name a .jsonl file"):
        ResultsFile.open(folder, tmp_path / "out.jsonl")
    nested, _ = ResultsFile.open(requests, tmp_path / "new" / "deeper" / "out.jsonl")  # folders are made
    nested.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_and_unreadable_input(requests, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputFileError, match="folder you can write to"):
            ResultsFile.open(requests, locked / "out.jsonl")
    finally:
        locked.chmod(0o700)
    requests.chmod(0o000)
    try:
        with pytest.raises(OutputFileError, match="cannot read input file"):
            ResultsFile.open(requests, tmp_path / "out.jsonl")
    finally:
        requests.chmod(0o600)


def test_a_write_that_fails_is_a_job_error_that_keeps_the_results(requests, tmp_path):
    output = tmp_path / "out.jsonl"
    results, _ = ResultsFile.open(requests, output)
    results.write(record("a"))
    results.file.close()
    results.file = open("/dev/full", "ab", buffering=0)  # every write: No space left on device
    with pytest.raises(OutputFileError, match="No space left on device.*1 results before it are safe"):
        results.write(record("b"))
    results.close()
    assert output.read_text() == lines_of(record("a"))


def test_an_output_folder_nobody_may_write_to(requests):
    """/proc refuses new files even to root: the same path as a read-only folder, on any machine."""
    with pytest.raises(OutputFileError, match="cannot create .* folder you can write to"):
        ResultsFile.open(requests, Path("/proc/results.jsonl"))


def test_a_user_file_named_like_a_lock_is_never_touched(requests, tmp_path):
    output = tmp_path / "poetry"
    (tmp_path / "poetry.lock").write_text("[[package]]\n")
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / ".poetry.pipemax-lock").symlink_to(target)  # a link where our lock goes: not followed
    with pytest.raises(OutputFileError, match="cannot create"):
        ResultsFile.open(requests, output)
    (tmp_path / ".poetry.pipemax-lock").unlink()
    results, _ = ResultsFile.open(requests, output)
    results.close()
    assert (tmp_path / "poetry.lock").read_text() == "[[package]]\n" and target.read_text() == "keep me"


def test_records_with_lone_surrogates_round_trip(requests, tmp_path):
    """JSON may hold a lone surrogate ("\\ud800"), which UTF-8 cannot: the record is escaped, not lost."""
    output = tmp_path / "out.jsonl"
    results, _ = ResultsFile.open(requests, output)
    results.write(record("odd\ud800id"))
    results.close()
    again, _ = ResultsFile.open(requests, output)
    again.close()
    assert again.done == {"odd\ud800id"}
    with pytest.raises(ValueError):
        ResultsFile.serialize(record("x") | {"response": {"logprob": float("nan")}})

"""serve-offline end to end: OpenAI batch JSONL with good and bad lines, vLLM-shaped results,
resume after a kill, stop strings and chat through a real tokenizer on a tiny random model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipemax import LLM, SamplingParams
from pipemax.cli import main

ROOT = Path(__file__).resolve().parents[2]


def completion(custom_id, prompt, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 6, **body}}


def chat(custom_id, content, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 5,
                     "temperature": 0, **body}}


def write_lines(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else json.dumps(record))
            handle.write("\n")


def read_results(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def serve(model_folder, input_path, output_path, *extra):
    return main(["serve-offline", "--model", str(model_folder), "-i", str(input_path), "-o", str(output_path),
                 "--no-progress", "--max-model-len", "256", "--served-model-name", "tiny", "tiny-alias", *extra])


@pytest.mark.parametrize("pipeline", [[], pytest.param(["--pipeline-parallel", "2"], marks=pytest.mark.subprocess),
                                      pytest.param(["--data-parallel", "2"], marks=pytest.mark.subprocess)],
                         ids=["one-stage", "two-stages", "two-replicas"])
def test_good_and_bad_lines(model_folder, tmp_path, capsys, pipeline):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [
        completion("ok-text", "Hello there"),
        chat("ok-chat", "What is 2+2?", logprobs=True, top_logprobs=2, presence_penalty=0, frequency_penalty=0.1),
        completion("ok-ids", [5, 6, 7, 8], seed=3, temperature=0.8, top_k=20, logprobs=3, repetition_penalty=1.1),
        {"prompt": "plain line", "max_tokens": 3},
        "{this is not json",
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        completion("too-long", "word " * 400),
        completion("bad-temperature", "hi", temperature=-1),
        completion("bad-n", "hi", n=2),
        completion("ok-text", "a duplicate custom_id"),
        "",
    ])
    assert serve(model_folder, requests, tmp_path / "out.jsonl", *pipeline) == 3  # some requests failed
    summary = capsys.readouterr().out
    assert "4 succeeded, 6 failed, 0 already done" in summary and "tokens/s" in summary
    assert "failed: line 5 (line-5): line 5 is not valid JSON" in summary
    if "--data-parallel" in pipeline:
        assert "data parallel: 2 replicas; pipeline: 1 stage(s)" in summary
    else:
        assert f"pipeline: {2 if pipeline else 1} stage(s)" in summary
        assert "stage busy" in summary
        assert ("device waited for the host" in summary) == (not pipeline)  # stage processes: each on its own device

    results = {r["custom_id"]: r for r in read_results(tmp_path / "out.jsonl")}
    assert len(results) == 10
    for custom_id in ("ok-text", "ok-chat", "ok-ids", "line-4"):
        record = results[custom_id]
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert results["ok-chat"]["response"]["body"]["object"] == "chat.completion"
    assert results["ok-chat"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert len(results["ok-chat"]["response"]["body"]["choices"][0]["logprobs"]["content"]) == \
        results["ok-chat"]["response"]["body"]["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2
               for c in results["ok-chat"]["response"]["body"]["choices"][0]["logprobs"]["content"])
    completion_logprobs = results["ok-ids"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(completion_logprobs["tokens"]) == len(completion_logprobs["top_logprobs"]) > 0
    assert all(len(top) <= 3 for top in completion_logprobs["top_logprobs"])
    assert results["ok-text"]["response"]["body"]["object"] == "text_completion"
    assert results["ok-ids"]["response"]["body"]["usage"]["prompt_tokens"] == 4

    errors = {cid: r["error"]["message"] for cid, r in results.items() if r["error"]}
    assert "not valid JSON" in errors["line-5"]
    assert "unsupported url '/v1/embeddings'" in errors["bad-url"]
    assert "maximum context" in errors["too-long"]
    assert "temperature must be a number >= 0" in errors["bad-temperature"]
    assert "only n=1" in errors["bad-n"]
    assert "duplicate custom_id 'ok-text'" in errors["ok-text#line-10"]
    assert results["too-long"]["error"]["code"] == "context_length_exceeded"
    assert results["bad-temperature"]["error"]["param"] == "temperature"
    assert results["bad-url"]["error"]["line"] == 6
    for cid in errors:
        assert results[cid]["response"]["status_code"] == 400 and results[cid]["response"]["body"] is None

    # Rerun: the successes are kept as they are; the failed requests run (and fail) again, once each.
    before = [line for line in (tmp_path / "out.jsonl").read_text().splitlines() if '"error": null' in line]
    assert serve(model_folder, requests, tmp_path / "out.jsonl", *pipeline) == 3
    assert "0 succeeded, 6 failed, 4 already done (6 had failed before and ran again)" in capsys.readouterr().out
    after = (tmp_path / "out.jsonl").read_text().splitlines()
    assert after[:4] == before and len(after) == 10
    assert sorted(json.loads(line)["custom_id"] for line in after) == sorted(results)


def test_resume_drops_a_line_cut_short(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion(f"r{i}", f"prompt number {i}") for i in range(3)])
    out = tmp_path / "out.jsonl"
    serve(model_folder, requests, out)
    lines = out.read_text().splitlines()
    # As if killed while writing r-last: keep two whole lines and half of the third.
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    serve(model_folder, requests, out)
    ids = [r["custom_id"] for r in read_results(out)]
    assert sorted(ids) == ["r0", "r1", "r2"]


@pytest.mark.subprocess  # killed as a process, every case
@pytest.mark.parametrize("pipeline", [[], ["--pipeline-parallel", "3", "--micro-batches", "4"]],
                         ids=["one-stage", "three-stages"])
def test_killed_job_resumes_with_every_result_exactly_once(model_folder, tmp_path, pipeline):
    requests = tmp_path / "requests.jsonl"
    count = 24
    write_lines(requests, [completion(f"req-{i}", f"story {i}:", max_tokens=10, ignore_eos=True) for i in range(count)])
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "pipemax.cli", "serve-offline", "--model", str(model_folder), "-i", str(requests),
               "-o", str(out), "--no-progress", "--max-batch", "2", "--max-model-len", "256", "--served-model-name", "tiny",
               *pipeline]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_results(out)) if out.read_text().endswith("\n") else None
    assert done_before is None or 3 <= done_before < count

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / ".out.jsonl.pipemax-lock").exists()  # the killed job's lock did not block the rerun
    ids = [r["custom_id"] for r in read_results(out)]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(count))  # all, each exactly once
    assert "already done" in result.stdout


def test_stop_strings_cut_the_text_and_chat_uses_the_template(model_folder):
    llm = LLM(model=str(model_folder), max_model_len=256)
    free = llm.generate("The weather today", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0]
    text = free.text
    assert len(text) > 8
    stop = text[len(text) // 2: len(text) // 2 + 3]
    stopped = llm.generate("The weather today", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                              stop=[stop]), use_tqdm=False)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]

    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    expected_prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                        tokenize=True)
    if not isinstance(expected_prompt, list):
        expected_prompt = expected_prompt["input_ids"]
    assert out.prompt_token_ids == list(expected_prompt)
    assert "<|im_start|>assistant" in llm.tokenizer.decode(out.prompt_token_ids)


def test_cli_rejects_missing_input_file_and_model(model_folder, tmp_path, capsys):
    assert main(["serve-offline", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                 "--model", str(model_folder)]) == 2
    assert "not found" in capsys.readouterr().err
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi")])
    assert main(["serve-offline", "--model", str(tmp_path / "no-model"), "-i", str(requests),
                 "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "does not exist (PipeMax loads local model folders" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_duplicate_custom_id_error_is_not_rewritten_on_resume(model_folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("r1", "first"), completion("r1", "second")])
    out = tmp_path / "out.jsonl"
    serve(model_folder, requests, out)
    # As if killed before r1 finished: only the duplicate's error record was written.
    records = read_results(out)
    out.write_text("".join(json.dumps(r) + "\n" for r in records if r["custom_id"] != "r1"))
    serve(model_folder, requests, out)
    assert sorted(r["custom_id"] for r in read_results(out)) == ["r1", "r1#line-2"]


def test_multibyte_stop_string_is_found(model_folder):
    llm = LLM(model=str(model_folder), max_model_len=256)
    emoji = llm.tokenizer.encode("a😀b", add_special_tokens=False)
    assert len(emoji) > 3  # the emoji alone spans several byte-level tokens
    seq_text = "ok a😀b"
    ids = llm.tokenizer.encode(seq_text, add_special_tokens=False)
    from pipemax.core.sequence import Sequence

    seq = Sequence(0, [1], SamplingParams(stop=["😀"]))
    for token in ids:
        seq.token_ids.append(token)
        found = llm.engine._stop_string_end(seq)
        if found is not None:
            break
    assert found == seq_text.index("😀")


def test_an_interrupted_generate_leaves_nothing_behind(model_folder):
    llm = LLM(model=str(model_folder), max_model_len=256)

    def explode(index, result, text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.stream([([5, 6, 7], SamplingParams(max_tokens=3)), ([8, 9], SamplingParams(max_tokens=50))], explode)
    assert not llm.engine.has_unfinished() and llm.engine.kv.gpu.num_free == llm.engine.kv.gpu.num_chunks
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)) == 1


def test_prefix_caching_reorders_reuses_and_resumes_without_changing_a_result(model_folder, tmp_path, capsys):
    """Requests sharing a few-shot prefix, interleaved with others: with caching on (the default)
    the job runs them in prefix order and reuses the prefix; every result is what caching off
    gives, and a job resumed with half its results written gives the rest, once each."""
    shots = "Q: what is one plus one? A: two. Q: what is two plus two? A: four. " * 3
    records = []
    for i in range(6):
        records.append(completion(f"shot-{i}", f"{shots}Q: what is {i} plus {i}? A:"))
        records.append(completion(f"other-{i}", f"a different story number {i}, told slowly"))
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, records)

    def texts(path):
        return {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in read_results(path)}

    assert serve(model_folder, requests, tmp_path / "off.jsonl", "--prefix-caching", "off") == 0
    assert "prefix cache" not in capsys.readouterr().out
    assert serve(model_folder, requests, tmp_path / "on.jsonl") == 0
    summary = capsys.readouterr().out
    line = next(line for line in summary.splitlines() if line.startswith("prefix cache: "))
    reused, needed = (int(word) for word in line.split()[2:5:2])
    assert 0 < reused < needed and "% of prefill skipped)" in line
    assert texts(tmp_path / "on.jsonl") == texts(tmp_path / "off.jsonl")

    kept = (tmp_path / "on.jsonl").read_text().splitlines()[::2]  # as if killed after half the results
    (tmp_path / "resumed.jsonl").write_text("\n".join(kept) + "\n")
    assert serve(model_folder, requests, tmp_path / "resumed.jsonl") == 0
    assert f"{len(records) - len(kept)} succeeded, 0 failed, {len(kept)} already done" in capsys.readouterr().out
    assert texts(tmp_path / "resumed.jsonl") == texts(tmp_path / "off.jsonl")
    assert len(read_results(tmp_path / "resumed.jsonl")) == len(records)

"""The batch job: OpenAI batch JSONL in, one result line per request out, as `vllm run-batch`.

Input lines are read by pipemax/batch/requests.py; the output file (lock, resume, retries) is
pipemax/batch/results_file.py. Output lines:
    {"id": "pipemax-...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "...",
     "body": <completion or chat.completion with usage>}, "error": null}
    a request that cannot run: status_code 400, body null,
     "error": {"code": "invalid_request", "message": "<why>", "param": "<field>" or null, "line": <n>}

Results are appended and fsynced as requests finish. A rerun with the same output file skips the
custom_ids that succeeded and runs every other request again, failed ones included.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .requests import CHAT, BadRequest, BatchItem, ServingContext, build_item, decode_line
from .results_file import ResultsFile
from .summary import describe_prefix_cache, describe_run

# Exit status of `pipemax serve-offline` (documented in the README).
EXIT_OK = 0  # every request succeeded (or was already done)
EXIT_JOB_ERROR = 2  # nothing ran or the job stopped: bad flags, paths, model, a second job on the output
EXIT_SOME_FAILED = 3  # the job finished; some requests have error records
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); SIGTERM gives 143. Rerun to resume.
FAILURES_SHOWN = 3


@dataclass
class BatchSummary:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # succeeded in an earlier run
    retried: int = 0  # failed in an earlier run, so ran again
    input_tokens: int = 0
    output_tokens: int = 0
    wall_seconds: float = 0.0
    first_failures: list[str] = field(default_factory=list)
    pipeline: str = ""  # the engine's figures of the run (summary.describe_run)
    prefix_cache: str = ""  # what the prefix cache saved (summary.describe_prefix_cache)

    def add_failure(self, item: BatchItem) -> None:
        self.failed += 1
        if len(self.first_failures) < FAILURES_SHOWN:
            self.first_failures.append(f"line {item.line_number} ({item.custom_id}): {item.error}")

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else EXIT_OK

    def lines(self) -> list[str]:
        rate = self.output_tokens / self.wall_seconds if self.wall_seconds else 0.0
        total_rate = (self.input_tokens + self.output_tokens) / self.wall_seconds if self.wall_seconds else 0.0
        retried = f" ({self.retried} had failed before and ran again)" if self.retried else ""
        lines = [f"requests: {self.succeeded} succeeded, {self.failed} failed, {self.skipped} already done{retried}"]
        if self.failed:
            more = self.failed - len(self.first_failures)
            lines.append("failed: " + "; ".join(self.first_failures) + (f"; and {more} more" if more > 0 else ""))
        lines += [
            f"tokens: {self.input_tokens} input, {self.output_tokens} output",
            f"wall time: {self.wall_seconds:.1f} s; {rate:.1f} output tokens/s, {total_rate:.1f} total tokens/s",
        ]
        return lines + [line for line in (self.prefix_cache, self.pipeline) if line]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- output records ------------------------------------------------------------------------------
def error_record(item: BatchItem) -> dict:
    """The OpenAI batch shape: response.status_code 400 (500: our fault), error {code, message, param, line}."""
    error = item.error
    status_code = 500 if error.code == "internal_error" else 400
    return {"id": new_id("pipemax"), "custom_id": item.custom_id,
            "response": {"status_code": status_code, "request_id": new_id("pipemax-batch"), "body": None},
            "error": {"code": error.code, "message": str(error), "param": error.param, "line": item.line_number}}


def success_record(item: BatchItem, text: str, result, model_name: str, tokenizer) -> dict:
    """result: the engine's FinishedRequest."""
    output_ids, finish_reason = result.output_token_ids, result.finish_reason
    usage = {"prompt_tokens": len(item.token_ids), "completion_tokens": len(output_ids),
             "total_tokens": len(item.token_ids) + len(output_ids)}
    created = int(time.time())
    model = item.model or model_name
    if item.url == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": _chat_logprobs(result, tokenizer), "finish_reason": finish_reason}
        body = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage}
    else:
        choice = {"index": 0, "text": text, "logprobs": _completion_logprobs(result, tokenizer),
                  "finish_reason": finish_reason}
        body = {"id": new_id("cmpl"), "object": "text_completion", "created": created, "model": model,
                "choices": [choice], "usage": usage}
    return {"id": new_id("pipemax"), "custom_id": item.custom_id,
            "response": {"status_code": 200, "request_id": new_id("pipemax-batch"), "body": body}, "error": None}


def _json_logprob(value: float) -> float:
    """JSON has no -inf: a token the model gives no chance gets -9999.0, as vLLM writes it."""
    return value if math.isfinite(value) else -9999.0


def _token_string(token_id: int, tokenizer) -> str:
    return str(token_id) if tokenizer is None else tokenizer.decode([token_id])


def _completion_logprobs(result, tokenizer):
    if result.logprobs is None:
        return None
    tokens = [_token_string(t, tokenizer) for t in result.output_token_ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    top = None
    if result.top_logprobs is not None:
        top = [{_token_string(t, tokenizer): _json_logprob(value) for t, value in alternatives}
               for alternatives in result.top_logprobs]
    return {"tokens": tokens, "token_logprobs": [_json_logprob(v) for v in result.logprobs], "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(result, tokenizer):
    if result.logprobs is None:
        return None

    def entry(token_id, value):
        token = _token_string(token_id, tokenizer)
        return {"token": token, "logprob": _json_logprob(value), "bytes": list(token.encode(errors="replace"))}

    tops = result.top_logprobs or [[] for _ in result.output_token_ids]
    return {"content": [entry(t, value) | {"top_logprobs": [entry(a, v) for a, v in alternatives]}
                        for t, value, alternatives in zip(result.output_token_ids, result.logprobs, tops)]}


def read_items(input_path: Path, results: ResultsFile, context: ServingContext,
               summary: BatchSummary) -> list[BatchItem]:
    """Every request of the input still to run; lines that cannot run get their error record now."""
    items: list[BatchItem] = []
    seen: set[str] = set()
    with open(input_path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record, custom_id, error = decode_line(raw.rstrip(b"\r\n"), line_number)
            if custom_id in seen:  # renamed, so that a resumed run recognises its record
                error = BadRequest(f"duplicate custom_id {custom_id!r} (line {line_number}): custom_ids must be "
                                   "unique", "duplicate_custom_id", "custom_id")
                custom_id = f"{custom_id}#line-{line_number}"
            seen.add(custom_id)
            if custom_id in results.done:
                summary.skipped += 1
                continue
            item = build_item(line_number, record, custom_id, error, context)
            if item.error is not None:
                results.write(error_record(item))
                summary.add_failure(item)
            else:
                items.append(item)
    return items


def run_batch_job(llm, input_path: Path, results: ResultsFile, served_model_names: list[str], use_tqdm: bool = True,
                  summary: BatchSummary | None = None) -> BatchSummary:
    """Run every request of input_path not yet done in results. Pass a summary to read the counts
    of an interrupted run."""
    start = time.perf_counter()
    summary = summary if summary is not None else BatchSummary()
    items = read_items(input_path, results, ServingContext(llm, served_model_names), summary)
    progress = None
    if use_tqdm and items:
        from tqdm import tqdm

        progress = tqdm(total=len(items), desc="Running batch", unit="req")

    def on_finish(index: int, result, text: str) -> None:
        item = items[index]
        try:
            line = results.serialize(success_record(item, text, result, served_model_names[0], llm.tokenizer))
        except Exception as error:  # one result we cannot write up must not stop the others
            item.error = BadRequest(f"internal error while writing the result: {error!r}", "internal_error")
            on_reject(index, None)
            return
        results.write_line(line, item.custom_id, succeeded=True)
        summary.succeeded += 1
        summary.input_tokens += len(item.token_ids)
        summary.output_tokens += len(result.output_token_ids)
        if progress is not None:
            progress.update(1)

    def on_reject(index: int, error: Exception | None) -> None:
        item = items[index]
        if error is not None:
            item.error = BadRequest(str(error), "invalid_request")
        results.write(error_record(item))
        summary.add_failure(item)
        if progress is not None:
            progress.update(1)

    try:
        llm.stream(((item.token_ids, item.params) for item in items), on_finish, on_reject)
        if items:
            summary.pipeline = describe_run(llm.last_run_stats)
            summary.prefix_cache = describe_prefix_cache(llm.last_run_stats)
    finally:
        if progress is not None:
            progress.close()
        summary.wall_seconds = time.perf_counter() - start
    return summary



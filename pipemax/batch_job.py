"""The batch job: OpenAI batch JSONL in, one result line per request out, as `vllm run-batch`.

Input lines:
    {"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "...", ...}}
    {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], ...}}
    {"prompt": "..."}                       plain prompt; custom_id defaults to "line-<n>"
Output lines:
    {"id": "pipemax-...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "...",
     "body": <completion or chat.completion with usage>}, "error": null}
    a request that cannot run: status_code 400, body null, "error": "<why>"

Results are appended and flushed as requests finish. A rerun with the same output file skips the
custom_ids already there (a line cut short by a kill is dropped first), so a killed job resumes
without losing or duplicating anything.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipemax.runtime.sampling import SamplingParams, SamplingParamsError

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# Body fields we read; anything else is reported rather than silently ignored.
SAMPLING_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "n", "logprobs", "top_logprobs", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens"}
KNOWN_FIELDS = SAMPLING_FIELDS | {"model", "prompt", "messages", "stream", "user", "add_generation_prompt"}


class BadRequest(ValueError):
    pass


@dataclass
class BatchItem:
    line_number: int
    custom_id: str
    url: str = COMPLETIONS
    model: str | None = None
    token_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    error: str | None = None


@dataclass
class BatchSummary:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output file
    input_tokens: int = 0
    output_tokens: int = 0
    wall_seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.output_tokens / self.wall_seconds if self.wall_seconds else 0.0
        total_rate = (self.input_tokens + self.output_tokens) / self.wall_seconds if self.wall_seconds else 0.0
        return [
            f"requests: {self.succeeded} succeeded, {self.failed} failed, {self.skipped} already done",
            f"tokens: {self.input_tokens} input, {self.output_tokens} output",
            f"wall time: {self.wall_seconds:.1f} s; {rate:.1f} output tokens/s, {total_rate:.1f} total tokens/s",
        ]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def parse_line(line: str, line_number: int, llm) -> BatchItem:
    """One input line -> a runnable item, or an item carrying the error that stops it."""
    default_id = f"line-{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return BatchItem(line_number, default_id, error=f"line {line_number} is not valid JSON: {error}")
    if not isinstance(record, dict):
        return BatchItem(line_number, default_id, error=f"line {line_number} is not a JSON object")
    custom_id = record.get("custom_id", default_id)
    if not isinstance(custom_id, str) or not custom_id:
        return BatchItem(line_number, default_id, error="custom_id must be a non-empty string")
    if "body" not in record and "prompt" in record:  # plain {"prompt": ...} line
        url, body = COMPLETIONS, {k: v for k, v in record.items() if k != "custom_id"}
    else:
        url, body = record.get("url"), record.get("body")
    item = BatchItem(line_number, custom_id, url=url if isinstance(url, str) else COMPLETIONS)
    try:
        if url not in (COMPLETIONS, CHAT):
            raise BadRequest(f"unsupported url {url!r}: supported are {COMPLETIONS} and {CHAT}")
        if record.get("method", "POST") != "POST":
            raise BadRequest(f"unsupported method {record.get('method')!r}: only POST")
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            raise BadRequest(f"unsupported body field(s): {', '.join(unknown)}")
        if body.get("stream"):
            raise BadRequest("stream is not supported in a batch job")
        item.model = body.get("model")
        item.token_ids = _prompt_tokens(url, body, llm)
        item.params = _sampling_params(url, body, len(item.token_ids), llm.engine.max_model_len)
        llm.engine.check_prompt(item.token_ids)
    except (BadRequest, SamplingParamsError, ValueError, TypeError) as error:
        item.error = str(error)
    return item


def _prompt_tokens(url: str, body: dict, llm) -> list[int]:
    if url == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects")
        for message in messages:
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise BadRequest("each message needs a string role and string content")
        return llm.apply_chat_template(messages, body.get("add_generation_prompt", True))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty")
        return llm.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise BadRequest("prompt must be a string or a list of token ids (one prompt per line)")


def _sampling_params(url: str, body: dict, prompt_len: int, max_model_len: int) -> SamplingParams:
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported: put one request per line")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    room = max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = 16 if url == COMPLETIONS else room  # the OpenAI defaults
    elif isinstance(max_tokens, int) and prompt_len + max_tokens > max_model_len:
        raise BadRequest(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the maximum context "
                         f"of {max_model_len} tokens")
    logprobs = body.get("logprobs")
    if url == CHAT:  # chat: logprobs is a flag, top_logprobs the number of alternatives
        wants_logprobs, top = bool(logprobs), body.get("top_logprobs") or 0
    else:  # completions: logprobs is the number of alternatives (0: the chosen token only)
        wants_logprobs, top = logprobs is not None, logprobs or 0
    values = dict(
        max_tokens=max_tokens,
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        top_k=body.get("top_k", 0),
        seed=body.get("seed"),
        stop=body.get("stop") or [],
        stop_token_ids=body.get("stop_token_ids") or [],
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=wants_logprobs,
        top_logprobs=top,
        presence_penalty=body.get("presence_penalty") or 0.0,
        frequency_penalty=body.get("frequency_penalty") or 0.0,
        repetition_penalty=body.get("repetition_penalty", 1.0),
        min_tokens=body.get("min_tokens", 0),
    )
    return SamplingParams(**values)


# ---- output --------------------------------------------------------------------------------------
def error_record(custom_id: str, message: str) -> dict:
    return {"id": new_id("pipemax"), "custom_id": custom_id,
            "response": {"status_code": 400, "request_id": new_id("pipemax-batch"), "body": None},
            "error": message}


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
        top = [{_token_string(t, tokenizer): value for t, value in alternatives} for alternatives in result.top_logprobs]
    return {"tokens": tokens, "token_logprobs": result.logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(result, tokenizer):
    if result.logprobs is None:
        return None

    def entry(token_id, value):
        token = _token_string(token_id, tokenizer)
        return {"token": token, "logprob": value, "bytes": list(token.encode())}

    tops = result.top_logprobs or [[] for _ in result.output_token_ids]
    return {"content": [entry(t, value) | {"top_logprobs": [entry(a, v) for a, v in alternatives]}
                        for t, value, alternatives in zip(result.output_token_ids, result.logprobs, tops)]}


class ResultWriter:
    """Appends one JSON line per result, flushed at once; knows which custom_ids are done."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()
        if path.exists():
            self._drop_partial_last_line()
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    self.done.add(json.loads(line)["custom_id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # not ours to judge: keep the line, it is not a finished result
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def _drop_partial_last_line(self) -> None:
        """A job killed mid-write may leave a line without its newline: cut it, it will be redone."""
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done.add(record["custom_id"])

    def close(self) -> None:
        self.file.close()


def run_batch_job(llm, input_path: Path, output_path: Path, model_name: str, use_tqdm: bool = True) -> BatchSummary:
    start = time.perf_counter()
    summary = BatchSummary()
    writer = ResultWriter(output_path)
    items: list[BatchItem] = []
    seen: set[str] = set()
    try:
        with open(input_path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                item = parse_line(line, line_number, llm)
                if item.custom_id in seen:  # rename first, so a resumed run recognises it as done
                    item.error = f"duplicate custom_id {item.custom_id!r} (line {line_number})"
                    item.custom_id = f"{item.custom_id}#line-{line_number}"
                seen.add(item.custom_id)
                if item.custom_id in writer.done:
                    summary.skipped += 1
                    continue
                if item.error is not None:
                    writer.write(error_record(item.custom_id, item.error))
                    summary.failed += 1
                else:
                    items.append(item)

        progress = None
        if use_tqdm and items:
            from tqdm import tqdm

            progress = tqdm(total=len(items), desc="Running batch", unit="req")

        def on_finish(index, result, text):
            item = items[index]
            writer.write(success_record(item, text, result, model_name, llm.tokenizer))
            summary.succeeded += 1
            summary.input_tokens += len(item.token_ids)
            summary.output_tokens += len(result.output_token_ids)
            if progress is not None:
                progress.update(1)

        try:
            llm.stream(((item.token_ids, item.params) for item in items), on_finish)
        finally:
            if progress is not None:
                progress.close()
    finally:
        writer.close()
    summary.wall_seconds = time.perf_counter() - start
    return summary

"""Reading the batch job's input: OpenAI batch JSONL lines -> runnable items or per-line errors.

    {"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "...", ...}}
    {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], ...}}
    {"prompt": "..."} or {"messages": [...]}    plain lines; custom_id optional, default "line-<n>"

Nothing a single line holds can stop the batch: undecodable bytes, bad JSON, nesting too deep,
wrong types, out-of-range values, unknown fields or models all become that line's error, with
its custom_id kept wherever the line names one. Every body field is checked for its type, and an
explicit null means the field's default, as in the OpenAI API.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from pipemax.core.sampling_params import MAX_TOP_LOGPROBS, SamplingParams, SamplingParamsError

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
SAMPLING_FIELDS = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                   "stop_token_ids", "ignore_eos", "n", "logprobs", "top_logprobs", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens"}
KNOWN_FIELDS = SAMPLING_FIELDS | {"model", "prompt", "messages", "stream", "user", "add_generation_prompt"}
ENVELOPE_FIELDS = ("custom_id", "method", "url", "body")  # any of these: an OpenAI batch line
BOM = b"\xef\xbb\xbf"


class BadRequest(ValueError):
    """One request's problem: an OpenAI-style error code, a message, the field it concerns."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class BatchItem:
    line_number: int
    custom_id: str
    url: str = COMPLETIONS
    model: str | None = None
    token_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    error: BadRequest | None = None


@dataclass
class ServingContext:
    """What parsing needs from the loaded model (the LLM object itself, in the job)."""
    llm: object  # encode(text), apply_chat_template(messages, add_generation_prompt), engine
    served_model_names: list[str]


# ---- the line ------------------------------------------------------------------------------------
# The custom_id of a line that is not valid JSON, so its error record keeps the user's name for it.
CUSTOM_ID_PATTERN = re.compile(r'"custom_id"\s*:\s*("(?:[^"\\]|\\.)*")')


def _salvage_custom_id(text: str, default_id: str) -> str:
    found = CUSTOM_ID_PATTERN.findall(text)
    if len(found) != 1:
        return default_id
    try:
        custom_id = json.loads(found[0])
    except ValueError:
        return default_id
    return custom_id if custom_id and "\ufffd" not in custom_id else default_id


def decode_line(raw: bytes, line_number: int) -> tuple[dict | None, str, BadRequest | None]:
    """(record, custom_id, error): the JSON object of one line and the id its error record takes.

    Non-finite numbers (NaN, 1e999) parse here and are refused by the field that holds them."""
    default_id = f"line-{line_number}"
    if line_number == 1 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    problem = None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = BadRequest(f"line {line_number} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
                             f"{error.start + 1}): save the file as UTF-8", "invalid_encoding")
        text = raw.decode("utf-8", errors="replace")
    try:
        record = json.loads(text)
    except RecursionError:
        return None, _salvage_custom_id(text, default_id), problem or BadRequest(
            f"line {line_number} nests JSON too deeply", "invalid_json")
    except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
        return None, _salvage_custom_id(text, default_id), problem or BadRequest(
            f"line {line_number} is not valid JSON: {error}", "invalid_json")
    if not isinstance(record, dict):
        return None, default_id, problem or BadRequest(f"line {line_number} is not a JSON object", "invalid_json")
    custom_id = record.get("custom_id")
    is_envelope = any(key in record for key in ENVELOPE_FIELDS if key != "custom_id")
    if custom_id is None and is_envelope:
        return record, default_id, problem or BadRequest(
            f"line {line_number} has no custom_id: the OpenAI batch format needs one per request", "missing_custom_id",
            "custom_id")
    if custom_id is not None and (not isinstance(custom_id, str) or not custom_id):
        return record, default_id, problem or BadRequest(
            f"custom_id must be a non-empty string, got {_show(custom_id)}", "invalid_request", "custom_id")
    if custom_id is not None and "\ufffd" in custom_id and problem is not None:
        custom_id = None  # the undecodable byte is in the id itself: do not invent a name
    return record, custom_id or default_id, problem


def build_item(line_number: int, record: dict | None, custom_id: str, error: BadRequest | None,
               context: ServingContext) -> BatchItem:
    """A decoded line (see decode_line) -> a runnable item, or one carrying its error."""
    item = BatchItem(line_number, custom_id)
    if error is not None:
        item.error = error
        return item
    try:
        _fill(item, record, context)
    except BadRequest as problem:
        item.error = problem
    except (SamplingParamsError, ValueError, TypeError, OverflowError) as problem:
        item.error = BadRequest(str(problem), "invalid_request", getattr(problem, "param", None))
    except RecursionError:
        item.error = BadRequest("the request nests too deeply", "invalid_request")
    except Exception as problem:  # a fault of ours (or of the tokenizer) with this one request: it alone fails
        item.error = BadRequest(f"internal error while reading this request: {problem!r}", "internal_error")
    return item


def parse_line(raw: bytes, line_number: int, context: ServingContext) -> BatchItem:
    """One input line (bytes) -> a runnable item, or one carrying its error."""
    return build_item(line_number, *decode_line(raw.rstrip(b"\r\n"), line_number), context)


def _fill(item: BatchItem, record: dict, context: ServingContext) -> None:
    if any(key in record for key in ENVELOPE_FIELDS if key != "custom_id"):
        url, body = record.get("url"), record.get("body")
        if url not in (COMPLETIONS, CHAT):
            raise BadRequest(f"unsupported url {_show(url)}: supported are {COMPLETIONS} and {CHAT}", "unsupported_url",
                             "url")
        if record.get("method") not in (None, "POST"):
            raise BadRequest(f"unsupported method {_show(record.get('method'))}: only POST", "invalid_request",
                             "method")
        extra = sorted(set(record) - set(ENVELOPE_FIELDS))
        if extra:
            raise BadRequest(f"unsupported field(s) beside custom_id, method, url and body: {', '.join(extra)}")
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object", "invalid_request", "body")
    else:  # a plain line: the record is the body
        body = {key: value for key, value in record.items() if key != "custom_id"}
        url = CHAT if "messages" in body and "prompt" not in body else COMPLETIONS
    item.url = url
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"unsupported body field(s): {', '.join(unknown)}", "invalid_request", unknown[0])
    optional(body, "user", str, "a string", None)
    if optional(body, "stream", bool, "a boolean", False):
        raise BadRequest("stream is not supported in a batch job", "invalid_request", "stream")
    item.model = _model_name(body, context.served_model_names)
    item.token_ids = _prompt_tokens(url, body, context.llm)
    engine = context.llm.engine
    item.params = sampling_params(url, body, len(item.token_ids), engine.max_model_len)
    try:
        engine.check_prompt(item.token_ids)
    except ValueError as error:
        code = "context_length_exceeded" if "maximum context" in str(error) else "invalid_prompt"
        raise BadRequest(str(error), code, "prompt" if url == COMPLETIONS else "messages") from None


# ---- typed fields --------------------------------------------------------------------------------
def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_type(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def optional(body: dict, name: str, kind, expected: str, default):
    """body[name] checked against kind; absent or null gives the default."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_type(value, kind):
        raise BadRequest(f"{name} must be {expected}, got {_show(value)}", "invalid_request", name)
    return value


def _model_name(body: dict, served: list[str]) -> str | None:
    model = optional(body, "model", str, "a string", None)
    if model is not None and model not in served:
        names = ", ".join(repr(name) for name in served)
        raise BadRequest(f"model {model!r} is not served by this job (it serves {names}; --served-model-name sets "
                         "the names)", "model_not_found", "model")
    return model


def _prompt_tokens(url: str, body: dict, llm) -> list[int]:
    if url == CHAT:
        if "prompt" in body:
            raise BadRequest(f"prompt is a field of {COMPLETIONS}; {CHAT} takes messages", "invalid_request", "prompt")
        messages = body.get("messages")
        add_generation_prompt = optional(body, "add_generation_prompt", bool, "a boolean", True)
        try:
            return llm.apply_chat_template(messages, add_generation_prompt)
        except (ValueError, TypeError) as error:
            raise BadRequest(str(error), "invalid_request", "messages") from None
    if "messages" in body:
        raise BadRequest(f"messages is a field of {CHAT}; {COMPLETIONS} takes prompt", "invalid_request", "messages")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt is empty", "invalid_prompt", "prompt")
        return llm.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_type(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise BadRequest(f"prompt holds {len(prompt)} prompts: put one request per line", "invalid_request", "prompt")
    raise BadRequest(f"prompt must be a string or a non-empty list of token ids, got {_show(prompt)}",
                     "invalid_request", "prompt")


def sampling_params(url: str, body: dict, prompt_len: int, max_model_len: int) -> SamplingParams:
    """The body's sampling fields, each type-checked by name, as SamplingParams."""
    if optional(body, "n", int, "an integer", 1) != 1:
        raise BadRequest("only n=1 is supported: put one request per line", "invalid_request", "n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = optional(body, name, int, "an integer", None)
    room = max_model_len - prompt_len
    if max_tokens is None:
        max_tokens = 16 if url == COMPLETIONS else room  # the OpenAI defaults
    elif max_tokens < 1:
        raise BadRequest(f"{name} must be at least 1, got {max_tokens}", "invalid_request", name)
    elif prompt_len + max_tokens > max_model_len:
        raise BadRequest(f"prompt ({prompt_len} tokens) + {name} ({max_tokens}) exceeds the maximum context of "
                         f"{max_model_len} tokens", "context_length_exceeded", name)
    if url == CHAT:  # logprobs is a flag, top_logprobs the number of alternatives
        wants_logprobs = optional(body, "logprobs", bool, "a boolean", False)
        top = optional(body, "top_logprobs", int, f"an integer in [0, {MAX_TOP_LOGPROBS}]", 0)
        if top and not wants_logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "invalid_request", "top_logprobs")
    else:  # completions: logprobs is the number of alternatives (0: the chosen token only)
        if body.get("top_logprobs") is not None:
            raise BadRequest(f"top_logprobs is a field of {CHAT}; in {COMPLETIONS}, logprobs: N asks for N "
                             "alternatives", "invalid_request", "top_logprobs")
        top = optional(body, "logprobs", int, f"an integer in [0, {MAX_TOP_LOGPROBS}]", None)
        wants_logprobs, top = top is not None, top or 0
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                          and all(isinstance(s, str) for s in stop))):
        raise BadRequest(f"stop must be a string or a list of strings, got {_show(stop)}", "invalid_request", "stop")
    stop_token_ids = optional(body, "stop_token_ids", list, "a list of token ids", [])
    if not all(_is_type(t, int) for t in stop_token_ids):
        raise BadRequest(f"stop_token_ids must be a list of integers, got {_show(stop_token_ids)}", "invalid_request",
                         "stop_token_ids")
    values = dict(
        max_tokens=max_tokens,
        temperature=optional(body, "temperature", float, "a number", 1.0),
        top_p=optional(body, "top_p", float, "a number", 1.0),
        top_k=optional(body, "top_k", int, "an integer", 0),
        seed=optional(body, "seed", int, "an integer", None),
        stop=stop or [],
        stop_token_ids=stop_token_ids,
        ignore_eos=optional(body, "ignore_eos", bool, "a boolean", False),
        logprobs=wants_logprobs,
        top_logprobs=top,
        presence_penalty=optional(body, "presence_penalty", float, "a number", 0.0),
        frequency_penalty=optional(body, "frequency_penalty", float, "a number", 0.0),
        repetition_penalty=optional(body, "repetition_penalty", float, "a number", 1.0),
        min_tokens=optional(body, "min_tokens", int, "an integer", 0),
    )
    try:
        return SamplingParams(**values)
    except SamplingParamsError as error:
        raise BadRequest(str(error), "invalid_request", getattr(error, "param", None)) from None

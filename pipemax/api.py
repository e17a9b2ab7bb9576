"""The offline Python API: `from pipemax import LLM, SamplingParams`.

    llm = LLM(model="path/to/hf-folder")         # or LLM() for the bundled default model
    outputs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outputs[0].outputs[0].text                    # as in vLLM; also outputs[0].text
    llm.generate({"prompt_token_ids": [1, 2, 3]})  # one prompt of any form, or a list mixing them
    llm.chat([[{"role": "user", "content": "Hi"}]])
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipemax.core.sampling_params import SamplingParams
from pipemax.engine.llm_engine import EngineConfig, FinishedRequest, LLMEngine
from pipemax.models.default_model import default_model_path
from pipemax.models.loader import find_weights

# The prompt forms of vLLM's LLM.generate: text, token ids, TextPrompt and TokensPrompt dicts.
Prompt = str | list[int] | dict
PROMPT_FORMS = 'a string, a list of token ids, {"prompt": "text"} or {"prompt_token_ids": [ids]}'


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per position: [(token id, logprob)]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs


def load_tokenizer(model_path: Path):
    """transformers' AutoTokenizer on the model folder (or GGUF file); None if it has none."""
    from transformers import AutoTokenizer

    kind, source = find_weights(model_path)
    try:
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        return AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError, TypeError):
        return None


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a token


def _token_ids(value) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"token ids must be a list of ints, got {type(value).__name__}")
    bad = next((position for position, token in enumerate(value) if not _is_token_id(token)), None)
    if bad is not None:
        raise TypeError(f"token ids must be ints, got {type(value[bad]).__name__} {value[bad]!r} at position {bad}")
    return list(value)


def parse_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt in any accepted form; token ids win when a dict has both,
    as in vLLM. Raises TypeError or ValueError naming the accepted forms."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, (list, tuple)):
        return None, _token_ids(prompt)
    if not isinstance(prompt, dict):
        raise TypeError(f"a prompt is {PROMPT_FORMS}; got {type(prompt).__name__}")
    unknown = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids"}))
    if unknown or not prompt:
        found = f"keys {unknown}" if unknown else "an empty dict"
        raise ValueError(f'a prompt dict is {{"prompt": "text"}} or {{"prompt_token_ids": [ids]}}, got {found}')
    text = prompt.get("prompt")
    if "prompt" in prompt and not isinstance(text, str):
        raise TypeError(f'"prompt" must be a string, got {type(text).__name__}')
    token_ids = _token_ids(prompt["prompt_token_ids"]) if "prompt_token_ids" in prompt else None
    return text, token_ids


def parse_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    """parse_prompt over one prompt or a list of them (an empty list is no prompts). A list
    starting with an int is one prompt of token ids, as in vLLM."""
    single = isinstance(prompts, (str, dict)) or (
        isinstance(prompts, (list, tuple)) and len(prompts) > 0 and isinstance(prompts[0], int))
    if single:
        return [parse_prompt(prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be one prompt or a list of them, where a prompt is {PROMPT_FORMS}; "
                        f"got {type(prompts).__name__}")
    parsed = []
    for index, prompt in enumerate(prompts):
        try:
            parsed.append(parse_prompt(prompt))
        except (TypeError, ValueError) as error:
            raise type(error)(f"prompt {index}: {error}") from None
    return parsed


def _content_text(content, where: str) -> str:
    """A message's content as the one string chat templates expect."""
    if content is None:  # OpenAI allows null content (assistant messages); templates want a string
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: 'content' must be a string, a list of text parts or null, "
                         f"got {type(content).__name__}")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ValueError(f"{where}: content part {index} must be an object with a 'type', "
                             f'such as {{"type": "text", "text": "..."}}')
        if part["type"] != "text":
            raise ValueError(f"{where}: only text content parts are supported, got {part['type']!r}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: content part {index} has no string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)  # vLLM joins text parts with a newline too: the same prompt either way


def normalize_messages(messages) -> list[dict]:
    """OpenAI chat messages as chat templates take them: each content a string (text parts joined,
    null as ""); other keys pass through. Raises ValueError saying what is wrong and where."""
    if not isinstance(messages, (list, tuple)) or not messages:
        found = "an empty list" if isinstance(messages, (list, tuple)) else type(messages).__name__
        raise ValueError(f'messages must be a non-empty list of {{"role": ..., "content": ...}} objects, got {found}')
    normalized = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{where}: 'role' must be a string, got {type(message.get('role')).__name__}")
        if "content" not in message:
            raise ValueError(f"{where} has no 'content'")
        normalized.append({**message, "content": _content_text(message["content"], where)})
    return normalized


def serve_torchrun_worker(model: str | Path | None = None, **engine_options) -> bool:
    """Under torchrun, on a rank other than 0: serve as a stage or a replica's head until rank 0
    closes its LLM, then return True. Anywhere else: return False at once."""
    from pipemax.parallel.cluster import join_cluster, launched_by_torchrun

    if not launched_by_torchrun() or os.environ.get("RANK") == "0":
        return False
    from pipemax.engine.data_parallel import serve_worker

    model_path = Path(model) if model is not None else default_model_path()
    config = EngineConfig(model=str(model_path), **engine_options)
    cluster = join_cluster(config.pipeline_parallel, config.data_parallel, config.device)
    serve_worker(cluster, config, load_tokenizer(model_path))
    return True


class LLM:
    """The offline engine. Under torchrun, every rank runs the same script: on rank 0 LLM(...)
    returns the engine of the whole world (P x R ranks); on the other ranks it serves as a stage or
    replica head until rank 0 closes its LLM, then ends the process (SystemExit(0)). One LLM per
    torchrun job."""

    def __init__(self, model: str | Path | None = None, dtype: str = "auto", gpu_memory_gib: float | None = None,
                 **engine_options):
        from pipemax.parallel.cluster import join_cluster, launched_by_torchrun

        if serve_torchrun_worker(model, dtype=dtype, gpu_memory_gib=gpu_memory_gib, **engine_options):
            raise SystemExit(0)
        model_path = Path(model) if model is not None else default_model_path()
        self.closed = False
        self.tokenizer = load_tokenizer(model_path)
        config = EngineConfig(model=str(model_path), dtype=dtype, gpu_memory_gib=gpu_memory_gib, **engine_options)
        self.cluster = None
        if launched_by_torchrun():  # rank 0: this process heads replica 0 and hands out the work
            self.cluster = join_cluster(config.pipeline_parallel, config.data_parallel, config.device)
            config = dataclasses.replace(config, device=str(self.cluster.device()))
        if config.data_parallel > 1:  # replicas in processes of their own; this one hands out the work
            from pipemax.engine.data_parallel import DataParallelEngine

            self.engine = DataParallelEngine(config, tokenizer=self.tokenizer)
        else:
            self.engine = LLMEngine(config, tokenizer=self.tokenizer)

    # ---- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """The token ids of one prompt in any form of PROMPT_FORMS."""
        text, token_ids = parse_prompt(prompt)
        return token_ids if token_ids is not None else self._encode_text(text)

    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer: pass token ids instead of text")
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation of OpenAI messages; ValueError for malformed messages."""
        messages = normalize_messages(messages)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        from jinja2 import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True)
        except TemplateError as error:  # the template's raise_exception: "roles must alternate", ...
            raise ValueError(f"the model's chat template refused these messages: {error}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, token_ids: list[int], stop_text_end: int | None = None) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return text if stop_text_end is None else text[:stop_text_end]

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        self._check_open()
        parsed = parse_prompts(prompts)  # every prompt is checked before any is tokenized
        token_ids = [ids if ids is not None else self._encode_text(text) for text, ids in parsed]
        return self._run(token_ids, [text for text, _ in parsed], sampling_params, use_tqdm)

    def chat(self, conversations: list[dict] | Sequence[list[dict]], sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        self._check_open()
        if not isinstance(conversations, (list, tuple)) or (conversations and isinstance(conversations[0], dict)):
            conversations = [conversations]  # one conversation (or something normalize_messages rejects)
        token_ids = []
        for index, conversation in enumerate(conversations):
            try:
                token_ids.append(self.apply_chat_template(conversation, add_generation_prompt))
            except ValueError as error:
                where = f"conversation {index}: " if len(conversations) > 1 else ""
                raise ValueError(f"{where}{error}") from None
        return self._run(token_ids, [None] * len(token_ids), sampling_params, use_tqdm)

    def close(self) -> None:
        """End the stage processes of a distributed pipeline (they also end with this process);
        under torchrun, tell every rank to stop. Closing twice does nothing more."""
        if self.closed:
            return
        self.closed = True
        self.engine.close()
        if getattr(self, "cluster", None) is not None:
            from pipemax.parallel.cluster import leave_cluster

            leave_cluster()
            self.cluster = None

    def _check_open(self) -> None:
        # A closed engine's stage processes and process groups are gone: its own errors would say
        # so only as a missing group or a dead replica.
        if self.closed:
            raise RuntimeError("this LLM is closed: create a new LLM to generate again")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def last_run_stats(self) -> dict:
        """Figures of the last completed run: stages, micro-batches, steps, mean micro-batch size,
        preemptions, and per stage busy seconds and bubble fraction, the share of the run the
        device waited for the host."""
        return self.engine.last_run_stats

    def stream(self, requests: Iterable[tuple[list[int], SamplingParams]],
               on_finish: Callable[[int, FinishedRequest, str], None],
               on_reject: Callable[[int, Exception], None] | None = None) -> None:
        """Run (token ids, params) requests; call on_finish(index, result, text) as each finishes.

        With on_reject, a request the engine refuses is reported as on_reject(index, error) and
        the others run; without it, the error propagates before anything runs."""
        self._check_open()
        index_of = {}
        try:
            for index, (token_ids, params) in enumerate(requests):
                try:
                    index_of[self.engine.add_request(token_ids, params)] = index
                except (ValueError, TypeError, OverflowError) as error:
                    if on_reject is None:
                        raise
                    on_reject(index, error)
            for result in self.engine.run():
                on_finish(index_of[result.seq_id], result, self.decode(result.output_token_ids, result.stop_text_end))
        finally:
            self.engine.abort_all()  # after an interruption, nothing leaks into the next call

    def _run(self, token_ids: list[list[int]], texts: list[str | None], sampling_params, use_tqdm: bool):
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(token_ids)
        if len(sampling_params) != len(token_ids):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(token_ids)} prompts")
        for index, ids in enumerate(token_ids):
            try:
                self.engine.check_prompt(ids)  # fail before any work starts
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
        outputs: list[RequestOutput | None] = [None] * len(token_ids)
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(token_ids), desc="Generating", unit="req")

        def on_finish(index: int, result: FinishedRequest, text: str) -> None:
            outputs[index] = RequestOutput(
                request_id=str(index), prompt=texts[index], prompt_token_ids=result.prompt_token_ids,
                outputs=[CompletionOutput(0, text, result.output_token_ids, result.finish_reason, result.logprobs,
                                          result.top_logprobs)],
            )
            if progress is not None:
                progress.update(1)

        try:
            self.stream(zip(token_ids, sampling_params), on_finish)
        finally:
            if progress is not None:
                progress.close()
        return outputs

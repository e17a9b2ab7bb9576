"""The offline Python API: `from pipemax import LLM, SamplingParams`.

    llm = LLM(model="path/to/hf-folder")         # or LLM() for the bundled default model
    outputs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outputs[0].outputs[0].text                    # as in vLLM; also outputs[0].text
    llm.chat([[{"role": "user", "content": "Hi"}]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipemax.models.default_model import default_model_path
from pipemax.models.loader import find_weights
from pipemax.runtime.engine import EngineConfig, FinishedRequest, LLMEngine
from pipemax.runtime.sampling import SamplingParams

Prompt = str | list[int]


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


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: str = "auto", gpu_memory_gib: float | None = None,
                 **engine_options):
        model_path = Path(model) if model is not None else default_model_path()
        self.tokenizer = load_tokenizer(model_path)
        config = EngineConfig(model=str(model_path), dtype=dtype, gpu_memory_gib=gpu_memory_gib, **engine_options)
        self.engine = LLMEngine(config, tokenizer=self.tokenizer)

    # ---- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:  # vLLM's TokensPrompt
            return list(prompt["prompt_token_ids"])
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
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
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_ids = [self.encode(prompt) for prompt in prompts]
        texts = [prompt if isinstance(prompt, str) else None for prompt in prompts]
        return self._run(token_ids, texts, sampling_params, use_tqdm)

    def chat(self, conversations: list[dict] | Sequence[list[dict]], sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        token_ids = [self.apply_chat_template(list(c), add_generation_prompt) for c in conversations]
        return self._run(token_ids, [None] * len(token_ids), sampling_params, use_tqdm)

    def stream(self, requests: Iterable[tuple[list[int], SamplingParams]],
               on_finish: Callable[[int, FinishedRequest, str], None]) -> None:
        """Run (token ids, params) requests; call on_finish(index, result, text) as each finishes."""
        index_of = {}
        try:
            for index, (token_ids, params) in enumerate(requests):
                index_of[self.engine.add_request(token_ids, params)] = index
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
        for ids in token_ids:
            self.engine.check_prompt(ids)  # fail before any work starts
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

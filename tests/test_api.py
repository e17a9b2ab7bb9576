"""LLM.generate's prompt forms and LLM.chat's message forms, on a tiny random model with
SmolLM2's real tokenizer and chat template."""

import pytest

from pipemax import LLM, SamplingParams
from pipemax.api import normalize_messages

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(model_folder):
    return LLM(model=str(model_folder), max_model_len=256)


@pytest.fixture
def no_work(llm, monkeypatch):
    """Fails the test if a prompt is tokenized or reaches the engine."""
    def fail(*args, **kwargs):
        raise AssertionError("work started before every prompt was checked")

    monkeypatch.setattr(llm, "_encode_text", fail)
    monkeypatch.setattr(llm.engine, "add_request", fail)


def generate(llm, prompts):
    return llm.generate(prompts, GREEDY, use_tqdm=False)


# ---- prompts ---------------------------------------------------------------------------------
def test_each_single_prompt_form_matches_its_list_form(llm):
    text = "The weather today"
    ids = llm.tokenizer.encode(text)
    forms = {"text": text, "ids": ids, "tokens dict": {"prompt_token_ids": ids}, "text dict": {"prompt": text}}
    expected = generate(llm, [ids])[0].token_ids
    for name, prompt in forms.items():
        single, = generate(llm, prompt)
        listed, = generate(llm, [prompt])
        assert single.prompt_token_ids == listed.prompt_token_ids == ids, name
        assert single.token_ids == listed.token_ids == expected, name
        assert single.prompt == listed.prompt == (text if "text" in name else None), name


def test_mixed_list_keeps_order_and_matches_each_prompt_alone(llm):
    ids = llm.tokenizer.encode("Once upon a time")
    prompts = ["Hello there", ids, {"prompt_token_ids": (5, 6, 7)}, {"prompt": "What is 2+2?"}]
    outputs = generate(llm, prompts)
    assert [o.prompt for o in outputs] == ["Hello there", None, None, "What is 2+2?"]
    for prompt, output in zip(prompts, outputs):
        assert output.token_ids == generate(llm, prompt)[0].token_ids


def test_tokens_dict_with_text_reports_the_text(llm):
    output, = generate(llm, {"prompt_token_ids": [5, 6, 7], "prompt": "five six seven"})
    assert output.prompt_token_ids == [5, 6, 7] and output.prompt == "five six seven"


def test_no_prompts_give_no_outputs(llm):
    assert generate(llm, []) == []


@pytest.mark.parametrize("prompts, error, message", [
    (3.5, TypeError, "got float"),
    (None, TypeError, "got NoneType"),
    ({"text": "hi"}, ValueError, "got keys ['text']"),
    ({}, ValueError, "got an empty dict"),
    ({"prompt": 5}, TypeError, '"prompt" must be a string, got int'),
    ({"prompt": None}, TypeError, '"prompt" must be a string, got NoneType'),
    ({"prompt_token_ids": "abc"}, TypeError, "token ids must be a list of ints, got str"),
    ([1, "a"], TypeError, "got str 'a' at position 1"),
    ([True, 2], TypeError, "got bool True at position 0"),
    (["fine", [1, 2.0]], TypeError, "prompt 1: token ids must be ints, got float"),
    (["fine", 7], TypeError, "prompt 1: a prompt is a string, a list of token ids"),
    (["fine", {"prompt": "ok"}, {"multi_modal_data": {}}], ValueError, "prompt 2: a prompt dict is"),
])
def test_bad_prompts_fail_before_any_work(llm, no_work, prompts, error, message):
    with pytest.raises(error) as raised:
        generate(llm, prompts)
    assert message in str(raised.value)


def test_prompt_the_engine_refuses_is_named_before_any_work(llm, no_work):
    with pytest.raises(ValueError, match=r"prompt 1: token id 1000000 is outside the vocabulary"):
        generate(llm, [[5, 6], [7, 1_000_000]])
    with pytest.raises(ValueError, match="prompt 0: the prompt is empty"):
        generate(llm, [[]])


# ---- chat ------------------------------------------------------------------------------------
def test_text_parts_give_the_same_prompt_as_joined_text(llm):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    with_parts = llm.chat([{"role": "user", "content": parts}], GREEDY, use_tqdm=False)[0]
    plain = llm.chat([{"role": "user", "content": "What is\n2+2?"}], GREEDY, use_tqdm=False)[0]
    assert with_parts.prompt_token_ids == plain.prompt_token_ids
    assert with_parts.token_ids == plain.token_ids


def test_null_content_is_empty_text_and_extra_keys_pass_through(llm):
    messages = [{"role": "user", "content": "Hi", "name": "ana"}, {"role": "assistant", "content": None}]
    assert normalize_messages(messages) == [{"role": "user", "content": "Hi", "name": "ana"},
                                            {"role": "assistant", "content": ""}]
    assert messages[1]["content"] is None  # the caller's messages are left as they were
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    assert llm.apply_chat_template(messages, False) == llm.apply_chat_template(empty, False)


@pytest.mark.parametrize("messages, message", [
    ([], "messages must be a non-empty list"),
    ("Hi", "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects, got str"),
    (["Hi"], "message 0 must be an object with 'role' and 'content', got str"),
    ([{"content": "Hi"}], "message 0: 'role' must be a string, got NoneType"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": 5}], "'content' must be a string, a list of text parts or null, got int"),
    ([{"role": "user", "content": ["Hi"]}], "content part 0 must be an object with a 'type'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "content part 0 has no string 'text'"),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                   {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}],
     "message 1: only text content parts are supported, got 'image_url'"),
])
def test_bad_messages_raise_clear_value_errors(llm, no_work, messages, message):
    with pytest.raises(ValueError) as raised:
        llm.apply_chat_template(messages)
    assert message in str(raised.value)


def test_bad_conversation_is_named_before_any_work(llm, no_work):
    good = [{"role": "user", "content": "Hi"}]
    bad = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(ValueError, match="conversation 1: message 0: only text content parts are supported, "
                                         "got 'input_audio'"):
        llm.chat([good, bad], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("options", [{}, {"pipeline_parallel": 2, "pipeline_transport": "inprocess"}],
                         ids=["one-process", "inprocess-pipeline"])
def test_a_closed_llm_says_it_is_closed(model_folder, options):
    """(Stage processes: tests/parallel/test_pipeline.py.)"""
    llm = LLM(model=str(model_folder), max_model_len=256, **options)
    assert generate(llm, [[1, 2, 3]])
    llm.close()
    llm.close()  # a second close does nothing
    calls = [lambda: generate(llm, "Hi"), lambda: llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False),
             lambda: llm.stream([([1, 2, 3], GREEDY)], on_finish=lambda *result: None)]
    for call in calls:
        with pytest.raises(RuntimeError, match="^this LLM is closed: create a new LLM"):
            call()

"""The batch job's input under bad lines: every per-line problem becomes that line's one error
record, with its custom_id kept wherever the line names one; the good lines all run."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.batch.job import error_record
from pipemax.batch.requests import KNOWN_FIELDS, ServingContext, parse_line
from pipemax.batch.results_file import ResultsFile
from pipemax.cli import main
from tests.batch.test_batch_job import chat, completion, read_results, serve
from tests.helpers import examples


def envelope(custom_id, body, url="/v1/completions"):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_every_bad_line_gets_one_error_record_and_the_good_lines_run(model_folder, tmp_path, capsys):
    good = [
        completion("good-nulls", "Once upon", temperature=None, top_p=None, top_k=None, seed=None, stop=None,
                   max_tokens=None, presence_penalty=None, logprobs=None, user=None),
        chat("good-parts", None) | {"body": {"model": "tiny-alias", "max_tokens": 3, "temperature": 0, "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]}},
        completion("good-negative-seed", "abc", seed=-(2**63), temperature=0.9),
        completion("good-largest-seed", "abc", seed=2**64 - 1, temperature=0.9, top_k=10**40),
        envelope("good-null-method", {"prompt": "abc", "max_tokens": 2}) | {"method": None},
        {"prompt": "a plain line", "max_tokens": 2},
        {"messages": [{"role": "user", "content": "a plain chat line"}], "max_tokens": 2},
    ]
    bad = {  # custom_id -> (line, expected error code, words of the message)
        "seed-over": (completion("seed-over", "x", seed=2**64), "invalid_request", "seed must be an integer"),
        "seed-under": (completion("seed-under", "x", seed=-(2**63) - 1), "invalid_request", "seed must be"),
        "deep": ('{"custom_id": "deep", "url": "/v1/completions", "body": {"prompt": ' + "[" * 50000 + "]" * 50000
                 + "}}", "invalid_json", "nests JSON too deeply"),
        "broken": ('{"custom_id": "broken", "body": {"prompt": "x",,}}', "invalid_json", "not valid JSON"),
        "latin1": ('{"custom_id": "latin1", "url": "/v1/completions", "body": {"prompt": "na\xefve"}}'
                   .encode("latin-1"), "invalid_encoding", "not valid UTF-8 (byte 0xef"),
        "max-str": (completion("max-str", "x", max_tokens="12"), "invalid_request",
                    "max_tokens must be an integer, got '12'"),
        "max-float": (completion("max-float", "x", max_tokens=2.5), "invalid_request", "max_tokens must be an integer"),
        "max-bool": (completion("max-bool", "x", max_tokens=False), "invalid_request", "max_tokens must be an integer"),
        "stop-list-int": (completion("stop-list-int", "x", stop=["ok", 7]), "invalid_request",
                          "stop must be a string or a list of strings"),
        "stop-dict": (completion("stop-dict", "x", stop={"a": 1}), "invalid_request", "stop must be"),
        "temp-str": (completion("temp-str", "x", temperature="hot"), "invalid_request", "temperature must be a number"),
        "temp-nan": ('{"custom_id": "temp-nan", "url": "/v1/completions", "body": {"prompt": "x", '
                     '"temperature": NaN}}', "invalid_request", "temperature must be a number >= 0"),
        "topp-inf": ('{"custom_id": "topp-inf", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 1e400}}',
                     "invalid_request", "top_p must be in (0, 1]"),
        "eos-str": (completion("eos-str", "x", ignore_eos="yes"), "invalid_request", "ignore_eos must be a boolean"),
        "top-no-lp": (chat("top-no-lp", "hi", top_logprobs=3), "invalid_request", "top_logprobs needs logprobs"),
        "lp-bool": (completion("lp-bool", "x", logprobs=True), "invalid_request", "logprobs must be an integer"),
        "image": (chat("image", None) | {"body": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}}, "invalid_request", "image_url"),
        "other-model": (completion("other-model", "x", model="llama-70b"), "model_not_found", "not served by this job"),
        "two-prompts": (completion("two-prompts", ["a", "b"]), "invalid_request", "one request per line"),
        "bad-token": (completion("bad-token", [1, 2, 10**6]), "invalid_prompt", "outside the vocabulary"),
        "chat-with-prompt": (envelope("chat-with-prompt", {"prompt": "x"}, "/v1/chat/completions"), "invalid_request",
                             "takes messages"),
        "extra-field": (envelope("extra-field", {"prompt": "x"}) | {"priority": 1}, "invalid_request", "priority"),
        "stream": (completion("stream", "x", stream=True), "invalid_request", "stream is not supported"),
        "put": (envelope("put", {"prompt": "x"}) | {"method": "PUT"}, "invalid_request", "only POST"),
        "temp-huge": (completion("temp-huge", "x", temperature=10**400), "invalid_request",
                      "temperature must be a number >= 0"),
        "odd\ud800id": (completion("odd\ud800id", "x", top_p=0), "invalid_request", "top_p must be in (0, 1]"),
    }
    lines = [good[0], bad["seed-over"][0], good[1], *[entry[0] for key, entry in bad.items() if key != "seed-over"],
             *good[2:], "[1, 2, 3]", envelope(None, {"prompt": "x"}) | {"custom_id": 17},
             {"url": "/v1/completions", "body": {"prompt": "no custom_id"}}]
    requests = tmp_path / "requests.jsonl"
    with open(requests, "wb") as handle:
        handle.write(b"\xef\xbb\xbf")  # a byte-order mark before line 1 (good-nulls) must not hurt it
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            handle.write((line.encode() if isinstance(line, str) else line) + b"\n")
    out = tmp_path / "out.jsonl"
    assert serve(model_folder, requests, out) == 3
    records = read_results(out)
    by_id = {}
    for record in records:
        assert record["custom_id"] not in by_id, "one record per request"
        by_id[record["custom_id"]] = record
    ok_ids = ["good-nulls", "good-parts", "good-negative-seed", "good-largest-seed", "good-null-method"]
    for custom_id in ok_ids + [f"line-{len(bad) + 2 + 4}", f"line-{len(bad) + 2 + 5}"]:
        assert by_id[custom_id]["error"] is None, by_id[custom_id]["error"]
    assert by_id["good-parts"]["response"]["body"]["model"] == "tiny-alias"
    assert by_id["good-nulls"]["response"]["body"]["model"] == "tiny"  # no model: the first served name
    for custom_id, (_, code, words) in bad.items():
        error = by_id[custom_id]["error"]
        assert error["code"] == code and words in error["message"], (custom_id, error)
        assert by_id[custom_id]["response"]["status_code"] == 400
    total = len(lines)
    assert by_id[f"line-{total - 2}"]["error"]["message"] == f"line {total - 2} is not a JSON object"
    assert "custom_id must be a non-empty string" in by_id[f"line-{total - 1}"]["error"]["message"]
    assert by_id[f"line-{total}"]["error"]["code"] == "missing_custom_id"
    assert len(records) == total
    assert f"{len(ok_ids) + 2} succeeded, {len(bad) + 3} failed" in capsys.readouterr().out


class FakeEngine:
    max_model_len = 64

    def check_prompt(self, ids):
        if len(ids) >= self.max_model_len:
            raise ValueError("the prompt is too long for the maximum context")


class FakeLLM:
    engine = FakeEngine()

    def encode(self, text):
        return [ord(c) % 50 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        return [1, 2, 3]


any_text = st.text(st.characters(exclude_categories=()), max_size=5)  # lone surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)
bodies = st.dictionaries(st.sampled_from(sorted(KNOWN_FIELDS)), json_values, max_size=6)


@settings(max_examples=examples(300), deadline=None)
@given(body=bodies, url=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/x", None]),
       custom_id=st.one_of(any_text, st.integers(), st.none()))
def test_no_request_body_can_raise_out_of_the_parser(body, url, custom_id):
    """Whatever a line holds, parsing gives an item that either runs or carries a one-line error."""
    line = json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}, allow_nan=True)
    item = parse_line(line.encode(), 4, ServingContext(FakeLLM(), ["m"]))
    if item.error is None:
        assert item.params is not None and item.token_ids
    else:
        assert item.error.code != "internal_error", item.error
        assert "\n" not in str(item.error) and "Traceback" not in str(item.error)
        ResultsFile.serialize(error_record(item))  # and its record can be written
    assert item.custom_id == (custom_id if isinstance(custom_id, str) and custom_id else "line-4")


@settings(max_examples=examples(200), deadline=None)
@given(raw=st.binary(max_size=60))
def test_no_byte_string_can_raise_out_of_the_parser(raw):
    item = parse_line(raw, 9, ServingContext(FakeLLM(), ["m"]))
    assert item.error is not None or item.params is not None


def test_flags_are_named_in_errors(tmp_path, capsys):
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(completion("a", "x")) + "\n")
    for flags, words in [(["--max-model-len", "-7"], "--max-model-len must be an integer >= 2"),
                         (["--max-model-len", "0"], "--max-model-len must be an integer >= 2"),
                         (["--max-batch", "0"], "--max-batch must be a positive integer"),
                         (["--chunk-tokens", "12"], "--chunk-tokens must be a power of two"),
                         (["--kv-cache-gib", "-1"], "--kv-cache-gib must be a positive number"),
                         (["--seed", str(2**64)], "--seed must be an integer")]:
        assert main(["serve-offline", "-i", str(requests), "-o", str(tmp_path / "o.jsonl"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pipemax: ") and words in err and err.count("\n") == 1, err
        assert "max_num_seqs" not in err and "max_model_len" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_chat_template_that_refuses_the_messages_fails_that_line_only(model_folder):
    from pipemax import LLM

    llm = LLM(model=str(model_folder), max_model_len=64)
    llm.tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool messages "
                                   "are not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    context = ServingContext(llm, ["tiny"])
    line = json.dumps({"custom_id": "t", "url": "/v1/chat/completions", "method": "POST",
                       "body": {"messages": [{"role": "tool", "content": "x"}]}})
    item = parse_line(line.encode(), 1, context)
    assert item.error.code == "invalid_request" and "tool messages are not supported" in str(item.error)
    line = json.dumps({"messages": [{"role": "user", "content": "fine"}]})
    assert parse_line(line.encode(), 2, context).error is None

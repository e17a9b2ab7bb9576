"""Server profiles: a round trip keeps everything; a profile from another GPU, GPU count, model or
KV cache dtype is refused with one line saying what it was made for and what this is (one made
before the key named the KV dtype is its model's dtype's, found where it always was); damaged
files, and settings of the wrong kind or a layout of other GPUs, are refused plainly, naming the
field at fault."""

import hashlib
import json
from types import SimpleNamespace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipemax.cli import main
from pipemax.tuning.profile_settings import (
    INTEGER_FIELDS,
    NUMBER_FIELDS,
    PROFILE_FIELDS,
    ProfileSettingsError,
    check_profile_plan,
)
from pipemax.tuning.server_profile import (
    ProfileError,
    ServerProfile,
    default_profile_path,
    describe_key,
    kv_cache_dtype_of,
    load_profile,
    profile_key,
    save_profile,
)
from tests.helpers import examples

LLAMA_8B = SimpleNamespace(architecture="LlamaForCausalLM", hidden_size=4096, intermediate_size=14336, num_layers=32,
                           num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=128256)


def test_round_trip_in_the_profiles_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEMAX_PROFILES", str(tmp_path))
    key = profile_key("NVIDIA L20", 8, LLAMA_8B, "bfloat16")
    profile = ServerProfile(key, {"host": {"cores": 64}}, {"h2d_gbs": {"2097152": 24.5}},
                            {"chunk_tokens": 32, "micro_batches": 6})
    path = save_profile(profile)
    assert path == default_profile_path(key) and path.parent == tmp_path
    assert load_profile(path, key) == profile
    assert default_profile_path(profile_key("NVIDIA L20", 4, LLAMA_8B, "bfloat16")) != path  # keyed by count too


@pytest.mark.parametrize("change, words", [
    (dict(gpu="NVIDIA RTX 4090"), "8 x NVIDIA L20"),
    (dict(gpus=2), "2 x NVIDIA L20"),
    (dict(model=dict(num_layers=80)), "80 layers"),
])
def test_a_profile_from_another_server_or_model_is_refused(tmp_path, change, words):
    key = profile_key("NVIDIA L20", 8, LLAMA_8B, "bfloat16")
    path = save_profile(ServerProfile(key), tmp_path / "p.json")
    other = json.loads(json.dumps(key))
    for name, value in change.items():
        if isinstance(value, dict):
            other[name].update(value)
        else:
            other[name] = value
    with pytest.raises(ProfileError, match="was made for") as error:
        load_profile(path, other)
    assert words in str(error.value) and "pipemax autotune" in str(error.value) and "\n" not in str(error.value)


def test_missing_damaged_and_foreign_files_are_refused_plainly(tmp_path):
    with pytest.raises(ProfileError, match="no profile at"):
        load_profile(tmp_path / "none.json")
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    with pytest.raises(ProfileError, match="cannot be read"):
        load_profile(damaged)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ProfileError, match="not a PipeMax server profile"):
        load_profile(foreign)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "pipemax server profile", "version": 0, "key": {}}))
    with pytest.raises(ProfileError, match="format version 0"):
        load_profile(old)


def test_the_key_names_the_experts():
    dense = profile_key("NVIDIA L20", 8, LLAMA_8B, "bfloat16")
    moe = profile_key("NVIDIA L20", 8, SimpleNamespace(**vars(LLAMA_8B), num_experts=8, num_experts_per_tok=2,
                                                       moe_layers=(0, 1)), "bfloat16")
    assert dense != moe and moe["model"]["moe_layers"] == [0, 1]  # JSON values: the key survives a round trip
    assert json.loads(json.dumps(moe)) == moe


# JSON values that are no positive count: text, fractions, truth values, zero and below, lists.
NOT_A_COUNT = st.one_of(st.text(max_size=5), st.floats(0.1, 1e6).filter(lambda value: value != int(value)),
                        st.booleans(), st.integers(-10, 0), st.lists(st.integers(1, 9), max_size=2))
NOT_A_SIZE = st.one_of(st.text(max_size=5), st.booleans(), st.floats(-1e3, 0.0), st.just(float("inf")),
                       st.lists(st.floats(1, 9), max_size=2))


def refusal(plan: dict, gpus: int = 1) -> str:
    with pytest.raises(ProfileSettingsError) as error:
        check_profile_plan(ServerProfile(profile_key("cpu", gpus, LLAMA_8B, "float32"), plan=plan), "p.json")
    message = str(error.value)
    assert "\n" not in message and "p.json" in message and "pipemax autotune" in message
    return message


@settings(max_examples=examples(40), deadline=None)
@example(field="max_num_seqs", value="lots")
@given(field=st.sampled_from(INTEGER_FIELDS), value=NOT_A_COUNT)
def test_a_count_of_the_wrong_kind_is_named(field, value):
    message = refusal({field: value})
    assert message.startswith(f"--profile: the server profile's {field} must be a positive integer")


@settings(max_examples=examples(20), deadline=None)
@given(field=st.sampled_from(sorted(NUMBER_FIELDS)), value=NOT_A_SIZE)
def test_a_size_of_the_wrong_kind_is_named(field, value):
    assert f"the server profile's {field} must be a positive number" in refusal({field: value})


@settings(max_examples=examples(30), deadline=None)
@example(gpus=1, stages=64, replicas=1, micro_batches=None)
@given(gpus=st.integers(1, 16), stages=st.integers(1, 64), replicas=st.integers(1, 8),
       micro_batches=st.one_of(st.none(), st.integers(1, 64)))
def test_a_layout_of_other_gpus_or_more_stages_than_layers_names_the_stages(gpus, stages, replicas, micro_batches):
    # (not the micro-batch count, whose range follows from the stage count)
    plan = {"pipeline_parallel": stages, "data_parallel": replicas, "micro_batches": micro_batches}
    if stages * replicas == gpus and stages <= LLAMA_8B.num_layers:
        check_profile_plan(ServerProfile(profile_key("cpu", gpus, LLAMA_8B, "float32"), plan=plan), "p.json")
        return
    assert refusal(plan, gpus).startswith("--profile: the server profile's pipeline_parallel of ")


def test_other_kinds_are_named():
    assert "offload must be one of off, auto, force, got 'yes'" in refusal({"offload": "yes"})
    assert "stage_layers must be a list of layer counts" in refusal({"stage_layers": "16,16"}, gpus=2)


@pytest.mark.parametrize("plan, flags, words", [
    ({"max_num_seqs": "lots"}, [], "max_num_seqs must be a positive integer, got 'lots'"),
    ({"max_num_seqs": "lots"}, ["--max-batch", "8"], "max_num_seqs must be a positive integer, got 'lots'"),
    ({"pipeline_parallel": 64}, [], "pipeline_parallel of 64 x data_parallel 1 is not the 1 GPU(s)"),
    ({"pipeline_parallel": 64, "micro_batches": 64}, [], "pipeline_parallel of 64 x data_parallel 1"),
])
def test_serve_offline_refuses_a_bad_profile_field_in_one_line(model_folder, tmp_path, capsys, plan, flags, words):
    # Even where a flag overrides the field: the profile is damaged, and saying so beats a traceback.
    from pipemax.models import model_config_at

    path = save_profile(ServerProfile(profile_key("cpu", 1, model_config_at(model_folder), "float32"), plan=plan),
                        tmp_path / "profile.json")
    (tmp_path / "in.jsonl").write_text("")
    assert main(["serve-offline", "--model", str(model_folder), "--profile", str(path), "-i",
                 str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipemax: --profile: the server profile's ") and words in err and err.count("\n") == 1


def test_every_profile_field_is_checked():
    assert set(INTEGER_FIELDS) | set(NUMBER_FIELDS) | {"offload", "stage_layers"} == set(PROFILE_FIELDS)


def test_the_key_names_the_kv_caches_storage_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEMAX_PROFILES", str(tmp_path))
    bf16 = profile_key("NVIDIA L40S", 8, LLAMA_8B, "bfloat16")
    fp8 = profile_key("NVIDIA L40S", 8, LLAMA_8B, "bfloat16", "fp8")
    assert bf16["kv_cache_dtype"] == "bfloat16" and fp8["kv_cache_dtype"] == "fp8_e4m3"
    assert profile_key("NVIDIA L40S", 8, LLAMA_8B, "bfloat16", "fp8_e4m3") == fp8  # fp8 is e4m3
    assert profile_key("NVIDIA L40S", 8, LLAMA_8B, "bfloat16", "fp8_e5m2") != fp8
    assert (kv_cache_dtype_of(bf16), kv_cache_dtype_of(fp8)) == ("auto", "fp8_e4m3")
    assert describe_key(fp8).endswith("(32 layers, hidden 4096), bfloat16, fp8_e4m3 KV")
    assert default_profile_path(fp8) != default_profile_path(bf16)
    # A profile made for one KV dtype is refused for the other, both ways, naming both.
    for made, wanted in ((bf16, fp8), (fp8, bf16)):
        path = save_profile(ServerProfile(made))
        with pytest.raises(ProfileError, match="was made for") as error:
            load_profile(path, wanted)
        assert (f"bfloat16, {made['kv_cache_dtype']} KV; this is 8 x NVIDIA L40S" in str(error.value)
                and str(error.value).count(f"{wanted['kv_cache_dtype']} KV") == 1 + (made == wanted))


def test_a_profile_from_before_the_kv_dtype_was_keyed_is_the_models_dtypes(tmp_path, monkeypatch):
    # Its KV was in the model's dtype (there was no other): read as such, at the path it always
    # had; refused for fp8.
    monkeypatch.setenv("PIPEMAX_PROFILES", str(tmp_path))
    key = profile_key("NVIDIA L40S", 8, LLAMA_8B, "bfloat16")
    old_key = {name: value for name, value in key.items() if name != "kv_cache_dtype"}
    digest = hashlib.sha256(json.dumps(old_key, sort_keys=True).encode()).hexdigest()[:16]
    path = tmp_path / f"server-{digest}.json"
    path.write_text(json.dumps({"format": "pipemax server profile", "version": 2, "key": old_key, "hardware": {},
                                "measurements": {}, "plan": {"chunk_tokens": 32}}))
    assert default_profile_path(key) == path
    profile = load_profile(path, key)
    assert profile.key == key and profile.plan == {"chunk_tokens": 32}
    with pytest.raises(ProfileError, match="bfloat16, bfloat16 KV; this is .* bfloat16, fp8_e4m3 KV"):
        load_profile(path, profile_key("NVIDIA L40S", 8, LLAMA_8B, "bfloat16", "fp8"))


def test_serve_offline_looks_up_the_profile_of_its_kv_dtype(model_folder):
    from pipemax.cli import build_parser
    from pipemax.tuning.profile_settings import profile_lookup_key

    args = build_parser().parse_args(["serve-offline", "--model", str(model_folder), "-i", "in", "-o", "out"])
    assert profile_lookup_key(args)["kv_cache_dtype"] == "float32"  # the CPU's dtype
    args.kv_cache_dtype = "fp8"  # (serve-offline's --kv-cache-dtype)
    assert profile_lookup_key(args)["kv_cache_dtype"] == "fp8_e4m3"

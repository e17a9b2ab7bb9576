"""Server profiles: a round trip keeps everything; a profile from another GPU, GPU count or model
is refused with one line saying what it was made for and what this is; damaged files are refused
plainly."""

import json
from types import SimpleNamespace

import pytest

from pipemax.tuning.server_profile import (
    ProfileError,
    ServerProfile,
    default_profile_path,
    load_profile,
    profile_key,
    save_profile,
)

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

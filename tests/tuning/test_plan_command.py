"""`pipemax plan`: a table comparing the layouts, one JSON object with a key per layout, workloads
from a JSONL file, and one-line errors for what it cannot use."""

import json

import pytest
import transformers

from pipemax.cli import main

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
SERVER = ["--gpus", "4", "--gpu-memory-gib", "2", "--pcie-gbs", "25", "--hbm-tbs", "1", "--tflops", "100"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    transformers.LlamaConfig(**TINY).save_pretrained(folder)
    return folder / "config.json"


def test_table_compares_the_three_layouts(config_file, capsys):
    assert main(["plan", *SERVER, "--model", str(config_file), "--num-prompts", "60"]) == 0
    out = capsys.readouterr().out
    assert "server: 4 GPUs of 2 GiB, PCIe 25 GB/s" in out and "workload: 60 requests" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
            ("pp_offload", "pp", "dp")}
    assert set(rows) == {"pp_offload", "pp", "dp"}
    assert "4 x 1" in rows["pp"] and "1 x 4" in rows["dp"]
    assert "best: " in out and "stage" in out.split("best: ")[1]


def test_json_holds_a_key_per_layout(config_file, capsys):
    assert main(["plan", *SERVER, "--model", str(config_file.parent), "--num-prompts", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"pp_offload", "pp", "dp"}
    for layout in result.values():
        assert layout["fits"]
        assert layout["generated_tokens_per_s"] > 0 and layout["total_tokens_per_s"] > layout["generated_tokens_per_s"]
        assert all(0 < u <= 1 for u in layout["stage_utilisation"]) and layout["pcie_gbs"] >= 0
    assert len(result["pp"]["stage_utilisation"]) == 4 and len(result["dp"]["stage_utilisation"]) == 1
    assert result["pp"]["pcie_gbs"] == 0 and result["pp"]["settings"]["pipeline_parallel"] == 4


def test_a_layout_that_does_not_fit_says_why(tmp_path, capsys):
    # 8 layers of 14 MiB: each fits a GPU with room to spare, all 8 together do not.
    transformers.LlamaConfig(**{**TINY, "hidden_size": 512, "intermediate_size": 4096}).save_pretrained(tmp_path)
    assert main(["plan", "--gpus", "8", "--gpu-memory-gib", "1.82", "--pcie-gbs", "25", "--hbm-tbs", "1",
                 "--tflops", "100", "--model", str(tmp_path), "--num-prompts", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not result["dp"]["fits"] and "leave no room for a KV cache" in result["dp"]["error"]
    assert result["dp"]["generated_tokens_per_s"] is None and result["pp"]["fits"]


def test_workload_from_a_jsonl_file(config_file, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    lines = [{"prompt_tokens": 100, "output_tokens": 20}] * 5 + [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 30}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "y" * 40}},
    ]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["plan", *SERVER, "--model", str(config_file), "--workload", str(requests)]) == 0
    out = capsys.readouterr().out
    assert "workload: 7 requests" in out and "4 characters a token" in out
    assert "1 requests name no max_tokens: counted as 256 output tokens" in out


@pytest.mark.parametrize("args, message", [
    (["--gpus", "4", "--pcie-gbs", "25", "--hbm-tbs", "1", "--tflops", "100"], "--gpu-memory-gib is needed"),
    ([*SERVER[:-2]], "--tflops is needed"),
    ([*SERVER, "--workload", "wikipedia"], "--workload: use sharegpt, longbench or a .jsonl file"),
    ([*SERVER, "--pcie-gbs", "0"], "--pcie-gbs must be positive"),
    ([*SERVER, "--link-gbs", "0"], "--link-gbs must be positive"),
    ([*SERVER, "--host-memory-gib", "-1"], "--host-memory-gib must be positive"),
    ([*SERVER, "--chunk-tokens", "12"], "--chunk-tokens must be a power of two"),
    ([*SERVER, "--gpus", "0"], "--gpus must be at least 1"),
])
def test_what_it_cannot_use_is_one_line(config_file, capsys, args, message):
    assert main(["plan", *args, "--model", str(config_file), "--num-prompts", "10"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["plan", *SERVER, "--model", str(tmp_path / "nothing")]) == 2
    assert "--model:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plan", *SERVER, "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipemax: --model:") and err.count("\n") == 1


def test_requests_past_the_models_limit_are_left_out_or_stopped(config_file, tmp_path, capsys):
    requests = tmp_path / "long.jsonl"
    lines = [{"prompt_tokens": 100, "output_tokens": 20}] * 3 + [{"prompt_tokens": 5000, "output_tokens": 9},
                                                                 {"prompt_tokens": 4000, "output_tokens": 500}]
    requests.write_text("\n".join(json.dumps(line) for line in lines))
    assert main(["plan", *SERVER, "--model", str(config_file), "--workload", str(requests)]) == 0
    out = capsys.readouterr().out
    assert "workload: 4 requests" in out and "1 prompts of 4,096 tokens or more left out" in out
    assert "1 outputs stopped at the model's 4,096 tokens" in out

"""`pipemax plan`: a table comparing the layouts, one JSON object with a key per layout, workloads
from a JSONL file, and one-line errors for what it cannot use. And what it predicts for the
staging ring on a Llama-2-70B shape over 8 PCIe GPUs of 32 GB: decode-heavy work, where KV
capacity binds, gains a fifth and more at 55 GB/s and less at half the link; ShareGPT- and
LongBench-like work, compute-bound, loses nothing. With an fp8 KV cache (--kv-cache-dtype, named
in the table and the JSON, and a profile's key) decode-heavy work gains half again with pp and
nearly doubles with the staging ring."""

import itertools
import json

import pytest
import torch
import transformers

from pipemax.cli import main
from pipemax.models import model_config_at, model_config_from_hf
from pipemax.models.default_model import default_model_path
from pipemax.tuning import plan_command
from pipemax.tuning.plan_command import SERVER_FLAGS, compare_layouts
from pipemax.tuning.server_plan import (
    MAX_SEQS_PER_STEP,
    MIN_BATCHED_TOKENS,
    Plan,
    PlanError,
    ServerFacts,
    Workload,
    choose_plan,
    fit_to_model,
    roofline_costs,
    simulate_plan,
)
from pipemax.tuning.server_profile import ServerProfile, profile_key, save_profile
from pipemax.tuning.workloads import synthetic_lengths
from pipemax.worker.memory_budget import kv_budget_bytes

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
    ([*SERVER, "--workload", "wikipedia"], "--workload: use sharegpt, longbench, decode-heavy or a .jsonl file"),
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


@pytest.mark.parametrize("missing", [subset for size in range(1, 5)
                                     for subset in itertools.combinations(SERVER_FLAGS, size)])
def test_every_missing_server_figure_is_named_in_one_error(config_file, capsys, missing):
    given = [part for flag, value in zip(SERVER[2::2], SERVER[3::2]) if flag not in missing for part in (flag, value)]
    assert main(["plan", "--gpus", "4", *given, "--model", str(config_file), "--num-prompts", "10"]) == 2
    err = capsys.readouterr().err.strip()
    names = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
    verb = "is" if len(missing) == 1 else "are"
    assert err == f"pipemax: {names} {verb} needed (or --profile from `pipemax autotune`)"


def test_the_help_says_what_a_server_without_a_profile_needs(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Without --profile, --gpu-memory-gib, --pcie-gbs, --hbm-tbs and --tflops are all needed" in text
    for flag in SERVER_FLAGS:
        assert text.count(flag) >= 2  # in the description and in its own help
    assert ("--dtype {bfloat16,float16,float32} the weights' and activations' dtype, and the KV cache's with "
            "--kv-cache-dtype auto (default: the profile's") in text


def write_plan_profile(path, config, dtype="float32", costs=None, kv_cache_dtype="auto", **measured):
    """A profile as autotune writes one on a CPU, for `config`: 4 GiB of memory, 5 GB/s copies."""
    costs = costs or {"layer": {"alpha": 1e-6, "beta": 1e-9, "delta": 1e-4}, "head": {"alpha": 0.0, "beta": 0.0,
                                                                                      "delta": 1e-3}}
    measurements = {"gpu_memory_bytes": 4 * 2**30, "pcie_bytes_per_s": 5e9, "link_bytes_per_s": None,
                    "host_kv_bytes": 2**30, "chunk_tokens": 16, "costs": costs, **measured}
    return save_profile(ServerProfile(profile_key("cpu", 1, config, dtype, kv_cache_dtype), {}, measurements,
                                      {"pipeline_parallel": 1, "data_parallel": 1}), path)


def test_a_profile_for_another_model_is_refused_as_serve_offline_refuses_it(config_file, tmp_path, capsys):
    # The issue's: a SmolLM2 CPU profile for a 70B shape (which predicted 0 tok/s and named a best).
    smollm2 = write_plan_profile(tmp_path / "smollm2.json", model_config_at(default_model_path()))
    assert main(["plan", "--profile", str(smollm2), "--model", "bench/configs/llama-2-70b.json", "--gpus", "8",
                 "--gpu-memory-gib", "32", "--num-prompts", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipemax: --profile: the profile {smollm2} was made for 1 x cpu, LlamaForCausalLM (30 "
                          "layers, hidden 576), float32, float32 KV; this is 1 x cpu, LlamaForCausalLM (80 layers, "
                          "hidden 8192)")
    assert err.count("\n") == 1
    # Other shapes of the tiny model, and its own shape in another dtype, are refused too.
    for change in (dict(num_hidden_layers=4), dict(hidden_size=512), dict(num_key_value_heads=8)):
        other = write_plan_profile(tmp_path / "other.json", model_config_from_hf(transformers.LlamaConfig(
            **{**TINY, **change})))
        assert main(["plan", "--profile", str(other), "--model", str(config_file), "--num-prompts", "10"]) == 2
        assert "was made for" in capsys.readouterr().err
    own = write_plan_profile(tmp_path / "own.json", model_config_from_hf(transformers.LlamaConfig(**TINY)))
    assert main(["plan", "--profile", str(own), "--model", str(config_file), "--dtype", "bfloat16",
                 "--num-prompts", "10"]) == 2
    assert ("float32, float32 KV; this is 1 x cpu, LlamaForCausalLM (8 layers, hidden 256), bfloat16, bfloat16 KV"
            in capsys.readouterr().err)
    # Its own model: the profile's dtype unless --dtype says otherwise, and it runs.
    assert main(["plan", "--profile", str(own), "--model", str(config_file), "--num-prompts", "10"]) == 0
    assert "hidden 256, float32" in capsys.readouterr().out
    # One peak figure cannot make a roofline to replace its measured costs.
    assert main(["plan", "--profile", str(own), "--model", str(config_file), "--hbm-tbs", "1", "--num-prompts",
                 "10"]) == 2
    assert "--hbm-tbs and --tflops go together" in capsys.readouterr().err


FREE = {"alpha": 0.0, "beta": 0.0, "delta": 0.0}  # a stage part that costs nothing


@pytest.mark.parametrize("measured, words", [
    ({"costs": {"layer": FREE, "head": FREE}}, "no usable step costs"),
    ({"costs": {"layer": {"alpha": "fast", "beta": 0.0, "delta": 1e-4}, "head": {}}}, "no usable step costs"),
    ({"costs": {"layer": {"alpha": -1e-6, "beta": 0.0, "delta": 1e-4}, "head": FREE}}, "no usable step costs"),
    ({"pcie_bytes_per_s": "fast"}, "measurement pcie_bytes_per_s must be a positive number, got 'fast'"),
    ({"gpu_memory_bytes": 0}, "measurement gpu_memory_bytes must be a positive number, got 0"),
    ({"chunk_tokens": 12}, "chunk_tokens must be a power of two from 8 to 256, got 12"),
])
def test_a_profile_measurement_it_cannot_use_is_one_line(config_file, tmp_path, capsys, measured, words):
    costs = measured.pop("costs", None)
    path = write_plan_profile(tmp_path / "p.json", model_config_from_hf(transformers.LlamaConfig(**TINY)), costs=costs,
                              **measured)
    assert main(["plan", "--profile", str(path), "--model", str(config_file), "--num-prompts", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipemax: --profile: ") and words in err and err.count("\n") == 1


def test_no_layout_is_named_best_when_none_predicts_any_throughput(config_file, capsys, monkeypatch):
    # Layouts that fit but predict 0 tokens/s (as the profile of another model did): the
    # table says so, names no best, and one line says why, exit status 1.
    real = plan_command.compare_layouts

    def predicting_nothing(*args):
        results = real(*args)
        for layout, result in results.items():
            if layout == "dp":
                results[layout] = PlanError("dp: 12.0 GiB of weights on a GPU of 2.0 GiB leave no room for a KV cache")
            else:
                result.simulation = {**result.simulation, "generated_tokens_per_s": 0.0,
                                     "steady_generated_tokens_per_s": 0.0, "total_tokens_per_s": 0.0}
        return results

    monkeypatch.setattr(plan_command, "compare_layouts", predicting_nothing)
    for json_flag in ([], ["--json"]):
        assert main(["plan", *SERVER, "--model", str(config_file), "--num-prompts", "10", *json_flag]) == 1
        out, err = capsys.readouterr()
        assert "best:" not in out and err.count("\n") == 1
        assert err == ("pipemax: no layout runs this workload on this server: pp_offload: predicts no generated "
                       "tokens; pp: predicts no generated tokens; dp: 12.0 GiB of weights on a GPU of 2.0 GiB leave no "
                       "room for a KV cache\n")


def test_a_slow_figure_is_not_printed_as_zero():
    assert plan_command._rate(0.42, 6) == "  0.42" and plan_command._rate(1234.4, 6) == " 1,234"
    assert plan_command._rate(0.0, 3) == "  0"


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


def test_the_decode_heavy_workload_is_built_in(config_file, capsys):
    assert main(["plan", *SERVER, "--model", str(config_file), "--workload", "decode-heavy", "--num-prompts", "8",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pp"]["requests"] == 8 and result["pp"]["generated_tokens_per_s"] > 0


LLAMA_2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=32000)  # bench/configs/llama-2-70b.json


def llama_2_70b_case(workload: str, pcie_gbs: float, scale: int, num_prompts: int, host_gib: float = 256,
                     link_gbs: float = 55, kv_cache_dtype: str = "auto"):
    """`pipemax plan --gpus 8 --gpu-memory-gib 32 --pcie-gbs P --hbm-tbs 1.8 --tflops 200` with a
    Llama-2-70B shape, scaled down by `scale` so that it runs in seconds: the requests' lengths,
    the model's context, each GPU's KV pool, the host pool, the PCIe link and the chunk size all
    divided by it. Batches, the ring's share of the pool, the chunks a step's prefetch brings
    back and its share of the host pool stay as they are; steps get no shorter but for their
    attention, and a request takes 1/scale the steps. (Unscaled, `pipemax plan` takes minutes and
    gives similar ratios.) (server facts, model config, dtype, workload)."""
    config = model_config_from_hf(transformers.LlamaConfig(**LLAMA_2_70B, max_position_embeddings=4096 // scale))
    dtype = torch.bfloat16
    memory = 32 * 2**30
    kv = kv_budget_bytes(memory, config, [(0, 10)], dtype, 2 * MIN_BATCHED_TOKENS, MAX_SEQS_PER_STEP, True)
    facts = ServerFacts(8, memory - kv + kv // scale, pcie_gbs * 1e9 / scale, link_gbs * 1e9,
                        int(host_gib * 2**30) // scale, roofline_costs(config, dtype, 1.8e12, 200e12, kv_cache_dtype),
                        chunk_tokens=16 // scale)
    requests = Workload(tuple((max(1, prompt // scale), max(1, output // scale))
                              for prompt, output in synthetic_lengths(workload, num_prompts)))
    return facts, config, dtype, fit_to_model(requests, config.max_model_len)[0]


def llama_2_70b_plans(workload: str, pcie_gbs: float, scale: int, num_prompts: int, host_gib: float = 256,
                      link_gbs: float = 55, kv_cache_dtype: str = "auto") -> dict:
    """compare_layouts' result on llama_2_70b_case: {layout: Plan, simulated}."""
    case = llama_2_70b_case(workload, pcie_gbs, scale, num_prompts, host_gib, link_gbs, kv_cache_dtype)
    return compare_layouts(*case, kv_cache_dtype)


def llama_2_70b_ratios(workload: str, pcie_gbs: float, scale: int, num_prompts: int) -> tuple[float, float, Plan]:
    """pp_offload's generated tokens/s over pp's (llama_2_70b_plans), for the whole run and for
    its steady state (while requests wait to start: with few requests the last ones, finishing in
    thinning batches, weigh on the whole run), and the pp_offload plan."""
    results = llama_2_70b_plans(workload, pcie_gbs, scale, num_prompts)
    plain, offload = results["pp"].simulation, results["pp_offload"].simulation
    return (offload["generated_tokens_per_s"] / plain["generated_tokens_per_s"],
            offload["steady_generated_tokens_per_s"] / plain["steady_generated_tokens_per_s"], results["pp_offload"])


def test_more_host_memory_never_predicts_less_on_the_llama_2_70b_shape():
    # The issue's: on the README's server pp_offload predicted 1,818 / 1,782 / 1,512 generated
    # tokens/s with 8 / 32 / 256 GiB of host memory (its fallback, pp, took offload's per-step
    # limits, larger with more host memory, and preempted more with them; scaled by 16 with 1,000
    # requests that gave 1,513 then 1,467). pp's plan owes nothing to host memory.
    low, high = (llama_2_70b_plans("sharegpt", 55, scale=16, num_prompts=1000, host_gib=gib) for gib in (32, 256))
    assert low["pp"].engine_options() == high["pp"].engine_options()
    assert high["pp_offload"].simulation["generated_tokens_per_s"] >= low["pp_offload"].simulation[
        "generated_tokens_per_s"] >= low["pp"].simulation["generated_tokens_per_s"]


def test_at_low_pcie_offload_is_pp_unless_requests_are_host_resident():
    # The issue's: with 800 requests, 4 GB/s predicted more than 16 GB/s (1,437 against 702), and
    # "best" at 4 GB/s was pp_offload with 0 requests host-resident and a batch of 104 where pp
    # got 80 on the same KV. (The links at the PCIe rate, as without --link-gbs.)
    slow, fast = (llama_2_70b_plans("sharegpt", gbs, scale=8, num_prompts=800, link_gbs=gbs) for gbs in (4, 16))
    assert fast["pp_offload"].simulation["generated_tokens_per_s"] >= slow["pp_offload"].simulation[
        "generated_tokens_per_s"]
    for results in (slow, fast):
        offload, plain = results["pp_offload"], results["pp"]
        if offload.simulation["host_resident_requests"] == 0:
            assert offload.engine_options() == plain.engine_options()
        assert offload.max_num_seqs >= plain.max_num_seqs


def test_decode_heavy_work_gains_a_fifth_from_the_staging_ring_at_55_gbs():
    _, steady, plan = llama_2_70b_ratios("decode-heavy", 55, scale=8, num_prompts=600)
    # (M = P = 8 would leave the first stage no step to hide a prefetch behind: it is planned
    # only when the step M before it has come back from the last stage.)
    assert plan.offload == "auto" and plan.micro_batches > 8 and plan.staging_chunks > 0
    assert plan.simulation["prefetch_gbs"] > 0.25 * plan.prefetch_bytes_per_s / 1e9
    assert steady >= 1.2


def test_at_half_the_link_the_gain_shrinks_and_offload_never_loses():
    _, steady, plan = llama_2_70b_ratios("decode-heavy", 27.5, scale=8, num_prompts=600)
    assert plan.offload == "auto"
    assert 0.99 <= steady < 1.2  # (1.2: what the test above holds 55 GB/s to)


@pytest.mark.parametrize("workload, num_prompts", [("sharegpt", 2000), ("longbench", 1000)])
@pytest.mark.parametrize("pcie_gbs", [55, 27.5])
def test_compute_bound_work_loses_nothing_to_offload(workload, num_prompts, pcie_gbs):
    whole, steady, _ = llama_2_70b_ratios(workload, pcie_gbs, scale=4, num_prompts=num_prompts)
    assert whole >= 0.99 and steady >= 0.99


# fp8 KV on the same server, decode-heavy work (512 in / 2,048 out), against bf16 KV with plain pp.
# The issue asked for >= 1.7x with pp and >= 2x with pp_offload; the model gives less. Unscaled,
# `pipemax plan --gpus 8 --gpu-memory-gib 32 --pcie-gbs 55 --hbm-tbs 1.8 --tflops 200 --model
# bench/configs/llama-2-70b.json --workload decode-heavy [--kv-cache-dtype fp8]` (2,000 requests,
# 6 and 8 minutes here) simulates 1,282 generated tokens/s for bf16 pp, 1,567 for bf16 pp_offload,
# 1,911 for fp8 pp (1.49x) and 2,432 for fp8 pp_offload (1.90x). Why: fp8 doubles the batch (25
# -> 48 sequences a micro-batch with pp, KV capacity binds), but the roofline adds a step's
# matmuls (86 us a token on a stage of 10 layers) to its weights' read (9.7 ms), so the stage-step
# grows from 12.8 to 14.8 ms while the KV read it saves was 0.9 ms; and prefill (44 ms of compute
# a request on every stage) does not shrink with the KV.


def test_fp8_kv_nearly_doubles_decode_heavy_work_in_the_steady_state_model():
    # The closed form at full size (about a second): the batch per micro-batch nearly doubles, and
    # the predicted rate gains 1.63x with pp, 1.92x with the staging ring.
    plans = {}
    for kv_cache_dtype in ("auto", "fp8"):
        facts, config, dtype, workload = llama_2_70b_case("decode-heavy", 55, scale=1, num_prompts=2000,
                                                          kv_cache_dtype=kv_cache_dtype)
        for layout in ("pp", "pp_offload"):
            plans[kv_cache_dtype, layout] = choose_plan(facts, config, dtype, workload, layout, kv_cache_dtype)
    bf16, fp8, fp8_offload = plans["auto", "pp"], plans["fp8", "pp"], plans["fp8", "pp_offload"]
    assert (bf16.kv_storage, fp8.kv_storage, fp8.micro_batches) == ("bfloat16", "fp8_e4m3", 8)
    assert fp8.batch_per_micro_batch >= 1.9 * bf16.batch_per_micro_batch
    assert fp8_offload.offload == "auto" and fp8_offload.batch_per_micro_batch > fp8.batch_per_micro_batch
    rate = {key: plan.estimated_generated_tokens_per_s for key, plan in plans.items()}
    assert rate["fp8", "pp"] >= 1.55 * rate["auto", "pp"]
    assert rate["fp8", "pp_offload"] >= 1.85 * rate["auto", "pp"] and rate["fp8", "pp_offload"] > rate["auto",
                                                                                                         "pp_offload"]


def test_fp8_kv_gains_half_again_on_decode_heavy_work_with_pp_simulated():
    # Simulated, scaled by 8 (600 requests, half again what fp8's pipeline holds at once; about 8
    # s): 1.50x for the whole run, 1.53x in the steady state (unscaled: 1.49x, 1.50x).
    simulated = {}
    for kv_cache_dtype in ("auto", "fp8"):
        facts, config, dtype, workload = llama_2_70b_case("decode-heavy", 55, scale=8, num_prompts=600,
                                                          kv_cache_dtype=kv_cache_dtype)
        plan = choose_plan(facts, config, dtype, workload, "pp", kv_cache_dtype)
        simulated[kv_cache_dtype] = simulate_plan(plan, facts, config, dtype, workload)
    for figure in ("generated_tokens_per_s", "steady_generated_tokens_per_s"):
        assert simulated["fp8"][figure] >= 1.45 * simulated["auto"][figure]


def test_plan_names_the_kv_caches_dtype(config_file, capsys):
    assert main(["plan", *SERVER, "--model", str(config_file), "--num-prompts", "40", "--kv-cache-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "hidden 256, bfloat16, fp8_e4m3 KV" in out and "GiB of fp8_e4m3 KV per GPU" in out.split("best: ")[1]
    for flags, storage, setting in (([], "bfloat16", "auto"), (["--kv-cache-dtype", "fp8_e5m2"], "fp8_e5m2",
                                                                "fp8_e5m2")):
        assert main(["plan", *SERVER, "--model", str(config_file), "--num-prompts", "40", "--json", *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        assert {layout["kv_storage"] for layout in result.values()} == {storage}
        assert {layout["settings"]["kv_cache_dtype"] for layout in result.values()} == {setting}
    with pytest.raises(SystemExit):
        main(["plan", *SERVER, "--model", str(config_file), "--kv-cache-dtype", "fp16"])
    assert "--kv-cache-dtype: invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["plan", "autotune"])
def test_the_help_says_what_fp8_kv_does_and_needs(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kv-cache-dtype {auto,fp8,fp8_e4m3,fp8_e5m2}" in text
    assert "fp8 halves the KV's bytes in VRAM, over PCIe and through attention" in text and "sm_89+ GPUs" in text


def test_a_profile_is_used_for_its_own_kv_dtype_only(config_file, tmp_path, capsys):
    tiny = model_config_from_hf(transformers.LlamaConfig(**TINY))
    bf16 = write_plan_profile(tmp_path / "bf16.json", tiny, dtype="bfloat16")
    fp8 = write_plan_profile(tmp_path / "fp8.json", tiny, dtype="bfloat16", kv_cache_dtype="fp8")
    # Each is the default for its own KV dtype...
    for profile, storage in ((bf16, "bfloat16"), (fp8, "fp8_e4m3")):
        assert main(["plan", "--profile", str(profile), "--model", str(config_file), "--num-prompts", "10"]) == 0
        assert f"hidden 256, bfloat16, {storage} KV" in capsys.readouterr().out
    assert main(["plan", "--profile", str(fp8), "--model", str(config_file), "--num-prompts", "10",
                 "--kv-cache-dtype", "fp8_e4m3"]) == 0
    capsys.readouterr()
    # ...and refused for the other, both ways: its costs read KV of its own dtype.
    for profile, flag, made, wanted in ((bf16, "fp8", "bfloat16", "fp8_e4m3"), (fp8, "auto", "fp8_e4m3", "bfloat16")):
        assert main(["plan", "--profile", str(profile), "--model", str(config_file), "--num-prompts", "10",
                     "--kv-cache-dtype", flag]) == 2
        err = capsys.readouterr().err
        assert f"bfloat16, {made} KV; this is 1 x cpu, LlamaForCausalLM (8 layers, hidden 256), bfloat16, {wanted} KV" \
            in err and err.count("\n") == 1

"""`pipemax autotune` end to end on the CPU (the NVML notice, every measurement, a profile the
engine accepts), then `pipemax serve-offline` running with it: the profile's settings, each
overridable by its flag, printed; a profile from another model refused in one line; and `pipemax
plan --profile` timing with the measured costs. With --kv-cache-dtype fp8 it measures fp8 chunks
and keys the profile by them, and refuses a GPU older than sm_89 before measuring."""

import json
import os

import pytest

from pipemax.cli import main
from pipemax.engine.config import EngineConfig
from pipemax.tuning.hardware import probe
from pipemax.tuning.microbench import NoiseCheck
from pipemax.tuning.server_profile import load_profile
from tests.batch.test_batch_job import completion, read_results, write_lines
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tuned(model_folder, tmp_path_factory):
    """One autotune run on the tiny model, into a profiles folder of the module's own. --force in
    these tests: a tiny model's steps on a busy CI machine may well be noisy (refusing then is
    tested with injected times below)."""
    folder = tmp_path_factory.mktemp("tuned-profiles")
    previous = os.environ.get("PIPEMAX_PROFILES")
    os.environ["PIPEMAX_PROFILES"] = str(folder)
    try:
        rc = main(["autotune", "--model", str(model_folder), "--quick", "--num-prompts", "40", "--no-progress",
                   "--force"])
    finally:
        if previous is None:
            del os.environ["PIPEMAX_PROFILES"]
        else:
            os.environ["PIPEMAX_PROFILES"] = previous
    profiles = list(folder.glob("server-*.json"))
    return rc, folder, profiles


def test_autotune_writes_a_profile_of_every_measurement(tuned, capsys):
    rc, folder, profiles = tuned
    assert rc == 0 and len(profiles) == 1
    profile = load_profile(profiles[0])
    assert profile.key["gpu"] == "cpu" and profile.key["gpus"] == 1 and profile.key["dtype"] == "float32"
    assert profile.key["model"]["num_layers"] == 3
    measured = profile.measurements
    kinds = {(r["chunk_tokens"], r["method"], r["direction"]) for r in measured["copy_rates"]}
    assert kinds == {(c, m, d) for c in (8, 16, 64) for m in ("memcpy", "kernel") for d in ("h2d", "d2h")}
    assert all(r["gbs"] > 0 for r in measured["copy_rates"])
    assert measured["chunk_tokens"] in (8, 16, 64) and measured["pcie_bytes_per_s"] > 0
    assert measured["both_directions"]["total_gbs"] > 0 and measured["copy_beside_matmul"]["copy_gbs"] > 0
    assert measured["link_bytes_per_s"] is None  # one device: no GPU-to-GPU link to measure
    fits = measured["step_fits"]
    assert set(fits) == {"1", "3"} and all(f["samples"] >= 8 for f in fits.values())
    layer = measured["costs"]["layer"]
    assert layer["delta"] + layer["alpha"] > 0  # a layer costs something
    plan = profile.plan
    assert plan["layout"] in ("pp", "pp_offload") and plan["pipeline_parallel"] == 1
    assert set(plan["predicted"]) == {"pp", "pp_offload"}
    fields = {k: v for k, v in plan.items() if k not in ("layout", "dtype", "predicted")}
    EngineConfig(model="m", **fields)  # the plan is a valid engine configuration


def test_autotune_says_when_nvml_is_unavailable(model_folder, tmp_path, capsys):
    assert main(["autotune", "--model", str(model_folder), "--quick", "--num-prompts", "20", "--no-progress", "--force",
                 "-o", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    if probe().nvml_error is not None:
        assert "NVML is unavailable" in out and "no CUDA GPU: measuring the CPU" in out
    assert "plan: 1 stage" in out and f"profile: {tmp_path / 'p.json'}" in out
    assert "copies: prefetch" in out and "step costs per layer" in out
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "pipemax server profile"


def serve(model_folder, tmp_path, *flags):
    requests = tmp_path / "requests.jsonl"
    write_lines(requests, [completion("a", "hi", max_tokens=3), completion("b", "hello there", max_tokens=2)])
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}.jsonl"
    rc = main(["serve-offline", "--model", str(model_folder), "-i", str(requests), "-o", str(out), "--no-progress",
               "--served-model-name", "tiny",
               *flags])
    return rc, out


def test_serve_offline_runs_with_the_profile_and_flags_override_it(tuned, model_folder, tmp_path, capsys,
                                                                   monkeypatch):
    rc, folder, profiles = tuned
    monkeypatch.setenv("PIPEMAX_PROFILES", str(folder))
    plan = load_profile(profiles[0]).plan
    rc, out = serve(model_folder, tmp_path)
    err = capsys.readouterr().err
    assert rc == 0 and len(read_results(out)) == 2
    assert f"server profile: {profiles[0]}" in err
    assert f"max_num_seqs={plan['max_num_seqs']} (profile)" in err
    assert f"chunk_tokens={plan['chunk_tokens']} (profile)" in err
    rc, out = serve(model_folder, tmp_path, "--max-batch", "3", "--chunk-tokens", "32")
    err = capsys.readouterr().err
    assert rc == 0 and "max_num_seqs=3 (flag)" in err and "chunk_tokens=32 (flag)" in err
    assert f"max_num_batched_tokens={plan['max_num_batched_tokens']} (profile)" in err
    rc, out = serve(model_folder, tmp_path, "--no-profile")
    err = capsys.readouterr().err
    assert rc == 0 and "not used (--no-profile)" in err and "max_num_seqs=256," in err


def test_without_a_profile_serve_offline_says_how_to_make_one(model_folder, tmp_path, capsys):
    rc, _ = serve(model_folder, tmp_path)
    err = capsys.readouterr().err
    assert rc == 0 and "server profile: none for 1 x cpu" in err and "`pipemax autotune --model" in err


def test_a_profile_for_another_model_is_refused_in_one_line(tuned, tmp_path, capsys):
    rc, folder, profiles = tuned
    other = tmp_path / "other"
    save_tiny_model("llama3", other, num_hidden_layers=2)
    capsys.readouterr()
    rc, out = serve(other, tmp_path, "--profile", str(profiles[0]))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pipemax: --profile: the profile") and err.count("\n") == 1
    assert "was made for 1 x cpu, LlamaForCausalLM (3 layers" in err and "this is 1 x cpu" in err
    assert "(2 layers" in err and "run `pipemax autotune`" in err
    assert not out.exists()


def test_a_damaged_profile_is_refused_plainly(model_folder, tmp_path, capsys):
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    rc, _ = serve(model_folder, tmp_path, "--profile", str(damaged))
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be read" in err and err.count("\n") == 1


def test_plan_with_the_profile_predicts_what_autotune_predicted(tuned, model_folder, capsys):
    rc, folder, profiles = tuned
    capsys.readouterr()
    assert main(["plan", "--profile", str(profiles[0]), "--model", str(model_folder), "--num-prompts", "40",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    predicted = load_profile(profiles[0]).plan["predicted"]
    for layout in ("pp", "pp_offload"):  # the same measured server, workload and scheduler: the same figures
        assert result[layout]["generated_tokens_per_s"] == pytest.approx(predicted[layout]["generated_tokens_per_s"])
    assert main(["plan", "--profile", str(profiles[0]), "--model", str(model_folder), "--gpus", "2",
                 "--num-prompts", "20", "--json"]) == 0  # a server not at hand, from this one's measurements
    assert len(json.loads(capsys.readouterr().out)["pp"]["stage_utilisation"]) == 2


def write_profile(model_folder, plan: dict, gpus: int = 1):
    """A profile for this CPU and the tiny model, at the path serve-offline looks in."""
    from pipemax.models import model_config_at
    from pipemax.tuning.server_profile import ServerProfile, profile_key, save_profile

    key = profile_key("cpu", gpus, model_config_at(model_folder), "float32")
    return save_profile(ServerProfile(key, {}, {}, plan))


def settings_for(model_folder, *flags):
    from pipemax.cli import build_parser
    from pipemax.tuning.profile_settings import apply_server_profile

    args = build_parser().parse_args(["serve-offline", "--model", str(model_folder), "-i", "in", "-o", "out", *flags])
    lines = apply_server_profile(args)
    return args, lines


def test_a_layout_typed_by_hand_takes_nothing_of_the_profiles_layout(model_folder):
    write_profile(model_folder, {"pipeline_parallel": 2, "data_parallel": 1, "stage_layers": [1, 2],
                                 "micro_batches": 3, "kv_cache_gib": 0.5, "max_num_seqs": 40}, gpus=2)
    args, lines = settings_for(model_folder, "--data-parallel", "2")  # the 2-GPU profile, another layout
    assert (args.pipeline_parallel, args.data_parallel) == (1, 2)
    assert args.stage_layers is None and args.micro_batches is None and args.kv_cache_gib is None
    assert args.max_batch == 40 and any("are not used" in line for line in lines)


def test_a_memory_typed_by_hand_takes_no_kv_budget_from_the_profile(model_folder):
    write_profile(model_folder, {"kv_cache_gib": 0.5, "max_num_seqs": 40, "offload": "auto",
                                 "host_memory_gib": 1.0, "prefetch_gbs": 20.0})
    args, lines = settings_for(model_folder, "--gpu-memory-gib", "0.25")
    assert args.kv_cache_gib is None and args.max_batch == 40 and args.prefetch_gbs == 20.0
    args, _ = settings_for(model_folder, "--offload", "force")  # the prefetch rate is auto's alone
    assert args.kv_cache_gib == 0.5 and args.prefetch_gbs is None and args.host_memory_gib == 1.0
    args, _ = settings_for(model_folder, "--offload", "off")
    assert args.prefetch_gbs is None and args.host_memory_gib is None


def test_an_invalid_value_in_the_profile_is_named_as_the_profiles(model_folder, tmp_path, capsys):
    write_profile(model_folder, {"chunk_tokens": 12})
    rc, _ = serve(model_folder, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pipemax: the server profile's chunk_tokens must be a power of two")
    assert "override it with --chunk-tokens" in err and err.count("\n") == 1


def test_a_profile_whose_parts_are_not_objects_is_refused_plainly(model_folder, tmp_path, capsys):
    path = write_profile(model_folder, {})
    record = json.loads(path.read_text())
    record["plan"] = []
    path.write_text(json.dumps(record))
    rc, _ = serve(model_folder, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "is damaged" in err and err.count("\n") == 1


def test_autotune_into_a_folder_is_one_line(model_folder, tmp_path, capsys):
    assert main(["autotune", "--model", str(model_folder), "--quick", "--num-prompts", "10", "--no-progress", "--force",
                 "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipemax: cannot write the profile to") and err.count("\n") == 1
    assert main(["autotune", "--model", str(model_folder), "--gpus", "0", "--no-progress"]) == 2
    assert "--gpus 0" in capsys.readouterr().err


def test_layer_costs_split_from_two_depths_and_never_vanish():
    from pipemax.tuning.microbench import split_layer_costs

    costs = split_layer_costs({1: (1.0, 0.1, 5.0), 3: (3.0, 0.3, 9.0)})
    assert (costs.layer.alpha, costs.layer.beta, costs.layer.delta) == (1.0, pytest.approx(0.1), 2.0)
    assert (costs.head.alpha, costs.head.delta) == (0.0, 3.0)
    noisy = split_layer_costs({1: (2.0, 0.2, 9.0), 3: (1.5, 0.1, 8.0)})  # deeper measured no slower
    assert noisy.layer.delta == pytest.approx(8.0 / 3) and noisy.head.delta == 0.0


def test_the_concurrent_prefetch_rate_is_the_slowest_device_copying_beside_the_others():
    import torch

    from pipemax.tuning import microbench
    from pipemax.worker.kv_pool import KVPoolSpec

    spec = KVPoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, chunk_tokens=8, dtype=torch.float32)
    rate = microbench.concurrent_prefetch_rate(spec, [torch.device("cpu")] * 2, total_bytes=2**20)
    assert 0 < rate < float("inf")


def test_a_measurement_whose_repeats_disagree_is_taken_again_a_bounded_number_of_times():
    """Injected repeat times, no clock: agreeing repeats are taken once; disagreeing ones again,
    at most twice more, keeping the attempt that agreed best and remembering it when none agreed."""
    from pipemax.tuning.microbench import decode_seconds, spread

    assert spread([1.0, 1.1, 1.9]) == pytest.approx(1.1) and spread([1.0, 2.5, 3.0]) == 2.5
    assert spread([1.0, 9.0, 1.2]) == pytest.approx(1.2)  # one slow repeat is a hiccup, not a busy machine
    assert spread([2.0]) == 1.0 and spread([]) == 1.0

    def attempts_of(*times):
        taken = []

        def attempt():
            taken.append(times[len(taken)])
            return taken[-1]
        return attempt, taken

    check = NoiseCheck()
    attempt, taken = attempts_of([1.0, 1.2, 1.1])
    assert check.measure("quiet", attempt) == [1.0, 1.2, 1.1] and len(taken) == 1
    attempt, taken = attempts_of([1.0, 5.0, 5.0], [1.0, 1.3, 1.1])
    assert check.measure("busy once", attempt) == [1.0, 1.3, 1.1] and len(taken) == 2
    assert check.worst() is None
    attempt, taken = attempts_of([1.0, 5.0, 5.0], [1.0, 3.0, 3.0], [1.0, 4.0, 9.0], [1.0, 1.0, 1.0])
    assert check.measure("step time", attempt) == [1.0, 3.0, 3.0] and len(taken) == 3  # bounded: never the 4th
    assert check.worst() == ("step time", 3.0)
    # A step-grid pair's repeats are its decode steps (one token a sequence), not its prefill.
    assert decode_seconds([(64, 64, 0.5), (4, 68, 0.1), (4, 72, 0.11)]) == [0.1, 0.11]


class BusyStepTimes(NoiseCheck):
    """Stands in for microbench.NoiseCheck: every other step of the step grid takes 5x as long, as
    if another job had the core (the copies agree)."""

    def measure(self, what, attempt, times_of=lambda result: result):
        if not what.startswith("step time"):
            return super().measure(what, attempt, lambda result: [1.0, 1.0, 1.0])

        def busy_attempt():
            return [(tokens, context, seconds * (5 if index % 2 else 1))
                    for index, (tokens, context, seconds) in enumerate(attempt())]
        return super().measure(what, busy_attempt, times_of)


def test_autotune_refuses_to_save_noisy_measurements_unless_forced(model_folder, tmp_path, monkeypatch, capsys):
    from pipemax.tuning import microbench

    monkeypatch.setattr(microbench, "NoiseCheck", BusyStepTimes)
    profile = tmp_path / "p.json"
    tune = ["autotune", "--model", str(model_folder), "--quick", "--num-prompts", "10", "--no-progress",
            "-o", str(profile)]
    assert main(tune) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pipemax: not saving the profile: the machine is busy: the repeats "
                                                   "of the step time at batch ")
    assert "--force" in err and not profile.exists()
    assert main([*tune, "--force"]) == 0
    out = capsys.readouterr().out
    assert "warning: saved with --force although the machine is busy" in out
    noisy = load_profile(profile).measurements["noisy"]
    assert noisy and all(what.startswith("step time") and spread > 2 for what, spread in noisy.items())


def test_autotune_never_saves_a_plan_of_no_throughput_silently(model_folder, tmp_path, monkeypatch, capsys):
    """The issue's busy machine measured a layer 50x too slow and saved "0 generated tokens/s"."""
    from pipemax.tuning import microbench, server_plan

    simulate = server_plan.simulate_plan

    def nothing_generated(plan, *args):
        simulate(plan, *args)
        plan.simulation["generated_tokens_per_s"] = 0.0

    monkeypatch.setattr(server_plan, "simulate_plan", nothing_generated)

    class NeverNoisy(microbench.NoiseCheck):  # (a busy CI machine must not refuse for noise first)
        def __init__(self):
            super().__init__(limit=float("inf"))

    monkeypatch.setattr(microbench, "NoiseCheck", NeverNoisy)
    profile = tmp_path / "p.json"
    tune = ["autotune", "--model", str(model_folder), "--quick", "--num-prompts", "10", "--no-progress",
            "-o", str(profile)]
    assert main(tune) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the plan predicts 0 generated tokens/s" in err and not profile.exists()
    assert main([*tune, "--force"]) == 0
    assert "warning: saved with --force although" in capsys.readouterr().out and profile.exists()


@pytest.mark.parametrize("memory", ["-1", "0"])
def test_a_gpu_memory_of_nothing_is_one_line_naming_the_flag(memory, capsys):
    assert main(["autotune", "--gpu-memory-gib", memory, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"pipemax: --gpu-memory-gib {memory}: give a size in GiB above 0\n"


def test_autotune_measures_an_fp8_kv_cache_and_keys_its_profile_by_it(model_folder, tmp_path, capsys):
    from pipemax.core.kv_dtype import kv_chunk_bytes
    from pipemax.models import model_config_at

    profile = tmp_path / "fp8.json"
    assert main(["autotune", "--model", str(model_folder), "--quick", "--num-prompts", "20", "--no-progress", "--force",
                 "--kv-cache-dtype", "fp8", "-o", str(profile)]) == 0
    out = capsys.readouterr().out
    assert "(fp8_e4m3 KV)" in out and "GiB of fp8_e4m3 KV per GPU" in out
    assert "--kv-cache-dtype fp8 -i requests.jsonl" in out  # serve-offline runs (and finds the profile) with it
    saved = load_profile(profile)
    assert saved.key["kv_cache_dtype"] == "fp8_e4m3" and saved.key["dtype"] == "float32"
    config = model_config_at(model_folder)
    # The copies moved fp8 chunks of a stage's layers, their scales included.
    assert {(r["chunk_tokens"], r["chunk_bytes"]) for r in saved.measurements["copy_rates"]} == {
        (tokens, kv_chunk_bytes(config.num_layers, config.num_kv_heads, config.head_dim, tokens, "fp8_e4m3"))
        for tokens in (8, 16, 64)}
    plan = saved.plan
    assert plan["kv_cache_dtype"] == "fp8_e4m3"
    EngineConfig(model="m", **{k: v for k, v in plan.items() if k not in ("layout", "dtype", "predicted")})
    # `pipemax plan` with it plans fp8 KV unless told otherwise, and refuses auto (its costs read fp8).
    assert main(["plan", "--profile", str(profile), "--model", str(model_folder), "--num-prompts", "20"]) == 0
    assert "float32, fp8_e4m3 KV" in capsys.readouterr().out
    assert main(["plan", "--profile", str(profile), "--model", str(model_folder), "--num-prompts", "20",
                 "--kv-cache-dtype", "auto"]) == 2
    assert "float32, fp8_e4m3 KV; this is 1 x cpu" in capsys.readouterr().err


def test_autotune_refuses_fp8_kv_on_a_gpu_older_than_sm_89_before_measuring(monkeypatch, capsys):
    import torch

    from pipemax.tuning import microbench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    monkeypatch.setattr(microbench, "copy_rates", lambda *args, **kwargs: pytest.fail("measured"))
    assert main(["autotune", "--kv-cache-dtype", "fp8", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("pipemax: --kv-cache-dtype fp8: an fp8 KV cache needs an sm_89+ GPU (Ada, "
                                       "Hopper, Blackwell); NVIDIA A10 is sm_86: use --kv-cache-dtype auto\n")

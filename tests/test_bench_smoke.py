"""The GPU benchmark script runs end to end (tiny shapes, CPU), so it does not rot between GPU sessions."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for kernel in ("decode_attention", "prefill_attention", "store_kv", "copy_chunks host->GPU", "copy_rows GPU->host"):
        assert kernel in result.stdout
    assert '"device": "CPU (smoke)"' in out.read_text()


def test_prefix_cache_benchmark_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_throughput.py"), "--smoke", "--workload", "fewshot",
                             "--prefix-caching", "on,off", "--skip-peer"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipemax (mixed, M=1, prefix cache)" in result.stdout and "pipemax (mixed, M=1) " in result.stdout
    assert "prefix cache 160 of 360 prompt tokens (44%)" in result.stdout  # 5 of 6 reuse 2 chunks of the 40 shared
    assert "prefix cache on / off, pipemax (mixed, M=1): " in result.stdout


def test_throughput_benchmark_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_throughput.py"), "--smoke", "--prefill-mode", "both",
                             "--pipeline-parallel", "1,2", "--offload", "off,force", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for system in ("pipemax (mixed, M=1)", "pipemax (separate, M=1)", "pipemax (mixed, P=2, M=2)",
                   "pipemax (mixed, P=2, M=2, offload force)", "transformers generate"):
        assert system in result.stdout
    import json

    report = json.loads(out.read_text())
    assert all(r["generated_tokens"] == 6 * 8 for r in report["results"])


def test_host_step_build_benchmark_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_host_step.py"), "--batch", "8", "--context",
                             "40", "--steps", "5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device tables (now)" in result.stdout and "ratio" in result.stdout


def test_calibration_benchmark_smoke(tmp_path):
    out = tmp_path / "calibrate.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_calibrate.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "P=1, M=1" in result.stdout and "P=2, M=2 (in process)" in result.stdout
    import json

    report = json.loads(out.read_text())
    assert report["device"] == "CPU (smoke)" and len(report["rows"]) == 2
    assert all(r["measured_tokens_per_s"] > 0 and r["predicted_tokens_per_s"] > 0 for r in report["rows"])


def test_peers_benchmark_smoke(tmp_path):
    out = tmp_path / "peers.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_peers.py"), "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["pipemax (mixed, M=1)"]["generated_tokens"] == 6 * 6
    assert rows["transformers generate"]["generated_tokens"] == 6 * 6
    assert "flexgen" in rows and "transformers generate, offloaded cache" in rows  # a row each, run or not

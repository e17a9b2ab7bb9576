"""Every kernel compiles for real GPUs (sm_90, sm_80, sm_86), on this machine, without one, within
the shared memory of each, without register spills (tiles are chosen per generation), and with the
attention and grouped-GEMM loops' tiles in flight. The fp8 KV kernels compile for the GPUs with fp8
conversion: sm_90, and sm_89 and sm_120 (fp8 kernels only there; the others take sm_86's tiles)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

SCRIPT = Path(__file__).with_name("aot_compile.py")
ROOT = SCRIPT.parents[2]
# One process per group of targets: they compile in parallel on the two CI cores.
TARGETS = (("90",), ("80",), ("86",), ("89", "120"))


def test_every_kernel_compiles_for_sm90_sm80_sm86_and_fp8_for_sm89_and_sm120():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *caps], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for caps in TARGETS]
    for caps, proc in zip(TARGETS, procs):
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{'/'.join(caps)} compile failed:\n{output[-4000:]}"
        match = re.search(rf"compiled (\d+) kernel variants for sm_{', sm_'.join(caps)}", output)
        assert match, output[-2000:]
        if caps == ("89", "120"):
            # fp8 attention (decode direct and split + merge, prefill), stores, RoPE and copies, for 3
            # (format, dtype) pairs x 3 head dims, on both targets
            assert int(match.group(1)) >= 2 * 3 * 3 * 4, output[-2000:]
        else:  # at least the two attention kernels for every dtype x head_dim
            assert int(match.group(1)) >= 2 * 3 * 4, output[-2000:]
        fp8_variants = int(re.search(r"(\d+) of them fp8", output).group(1))
        assert fp8_variants >= (3 * 3 * 4 if caps != ("80",) and caps != ("86",) else 0), output[-2000:]
        if caps in (("80",), ("86",)):
            assert fp8_variants == 0

import multiprocessing.process
import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, settings

import pipemax.kernels  # noqa: F401  (sets TRITON_INTERPRET on machines without CUDA)
from pipemax.kernels._common import interpreter_active
from tests.helpers import HYPOTHESIS_PROFILE

HAS_CUDA = torch.cuda.is_available()
FAST = os.environ.get("PIPEMAX_TEST_FAST") == "1"  # make test-fast

# Under pytest-xdist every worker shares the cores: one torch thread per core each, not one per
# core per worker (oversubscribed threads spin and every worker slows down).
# The processes tests start (jobs, stage processes, torchrun ranks) inherit the same share through
# OMP_NUM_THREADS: OpenMP threads that outnumber the cores spin-wait, burning the CPU other tests need.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    THREADS_PER_WORKER = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(THREADS_PER_WORKER)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS_PER_WORKER))

# Hypothesis profiles (HYPOTHESIS_PROFILE picks one):
#   ci        the default, and what CI runs: a fixed number of examples from a fixed seed, so a
#             failure reproduces and the suite's time does not drift
#   thorough  local runs and reviews: random seeds and five times the examples (tests that set
#             their own count scale it with tests.helpers.examples)
#   gpu       the lent GPU (bench/gpu_check.sh): kernels compiled for real, few examples each
settings.register_profile(
    "ci", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "gpu", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(HYPOTHESIS_PROFILE)

# Kernels run on CPU tensors through the interpreter, or on CUDA compiled for real; tests take a
# `device` parameter and run on whichever this machine has.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_active(), reason="Triton interpreter is off")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return torch.device(request.param)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template (API, batch job, CLI tests)."""
    from pipemax.models.default_model import default_model_path
    from tests.tiny_models import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-with-tokenizer")
    save_tiny_model("llama3", folder, vocab_size=49152, eos_token_id=2, bos_token_id=1)
    source = default_model_path()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(autouse=True)
def private_profiles(tmp_path_factory, monkeypatch):
    """Each test saves and reads step-cost profiles in a folder of its own: a fit one test learned
    never seeds another's engine (and nothing lands in the user's ~/.cache)."""
    monkeypatch.setenv("PIPEMAX_PROFILES", str(tmp_path_factory.mktemp("profiles")))


def pytest_collection_modifyitems(config, items):
    """A kernel test on the CPU device runs Triton's interpreter: mark it, so that make test-fast
    (-m "not interpreter") leaves it out without every test saying so."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cpu":
            item.add_marker(pytest.mark.interpreter)
    # The long tests (processes, the interpreter) first: pytest-xdist hands tests out in this
    # order, so the workers finish together on short tests instead of one waiting on a long one.
    items.sort(key=lambda item: not any(item.get_closest_marker(mark) for mark in ("subprocess", "interpreter")))


@pytest.fixture(autouse=True)
def fast_suite_guard(request, monkeypatch):
    """Under make test-fast, a test that starts a process or runs the Triton interpreter without
    its mark fails at once, naming the mark it needs: the fast suite stays fast and the marks stay
    true."""
    if not FAST:
        return
    marks = {mark.name for mark in request.node.iter_markers()}

    def refuse(mark):
        what = "starts a process" if mark == "subprocess" else "runs the Triton interpreter"

        def refused(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} {what}: mark it @pytest.mark.{mark}")
        return refused

    if "subprocess" not in marks:
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse("subprocess"))
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse("subprocess"))
    if "interpreter" not in marks:
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", refuse("interpreter"))

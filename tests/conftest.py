import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import pipemax.kernels  # noqa: F401  (sets TRITON_INTERPRET on machines without CUDA)
from pipemax.kernels._common import interpreter_active

HAS_CUDA = torch.cuda.is_available()

# Every kernel example runs the Triton interpreter on CPU: keep example counts modest and let
# slow examples through; CI runs a fixed seed so a failure reproduces.
settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "gpu", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Kernels run on CPU tensors through the interpreter, or on CUDA compiled for real; tests take a
# `device` parameter and run on whichever this machine has.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_active(), reason="Triton interpreter is off")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return torch.device(request.param)

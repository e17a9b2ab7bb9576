import os
import shutil

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

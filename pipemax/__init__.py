"""PipeMax: offline LLM inference with pipeline parallelism and KV-cache offloading.

    from pipemax import LLM, SamplingParams
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # Lazy, so that `pipemax --version` and the kernels package load without the whole engine.
    if name == "LLM":
        from pipemax.api import LLM

        return LLM
    if name == "SamplingParams":
        from pipemax.core.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pipemax' has no attribute {name!r}")

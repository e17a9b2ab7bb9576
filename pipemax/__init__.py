"""PipeMax: offline LLM inference with pipeline parallelism and KV-cache offloading."""

__version__ = "0.1.0"

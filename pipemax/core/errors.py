"""Errors for bad input that any level may raise and the CLI and the API report in one line.

`ConfigError` lives here, at the bottom, because options are checked where the knowledge is: the
engine checks its config, the torchrun cluster checks the world's shape against the same options.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An engine option with a value PipeMax cannot use; `option` is the EngineConfig field."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem

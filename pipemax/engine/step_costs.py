"""Step-cost profiles: the cost model's fit, saved after a run and seeding the next engine.

After a run the engine saves its fit (save_step_costs) under a key naming what the step time
depends on (the GPU, the model's shape, dtype, stage split, kernels); the next engine with the
same key starts from it (load_step_costs), so offload=auto has a budget from its first steps
instead of after the first few (a seed its first steps disagree with is dropped at once:
core/cost_model.py). The files live in $PIPEMAX_PROFILES, by default
~/.cache/pipemax/profiles (or $PIPEMAX_CACHE/profiles); `pipemax autotune`'s server profiles sit
beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from functools import cache
from pathlib import Path

from pipemax.core.cost_model import StepCostModel
from pipemax.models.default_model import cache_dir

log = logging.getLogger("pipemax")
PROFILE_KIND = "pipemax step costs"
# The code a step runs: a saved fit is reused only by the same kernels, models, stage and transport code.
STEP_CODE_PACKAGES = ("kernels", "models", "worker", "parallel")


@cache
def step_code_digest() -> str:
    """A digest of the sources of the packages a step runs (STEP_CODE_PACKAGES), for the key of a
    step-cost profile: any change to them, not only a new release, makes old fits stale."""
    return code_digest(Path(__file__).resolve().parent.parent)


def code_digest(package_root: Path) -> str:
    digest = hashlib.sha256()
    for package in STEP_CODE_PACKAGES:
        for source in sorted((package_root / package).glob("*.py")):
            digest.update(f"{package}/{source.name}\0".encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def profiles_dir() -> Path:
    return Path(os.environ.get("PIPEMAX_PROFILES", cache_dir() / "profiles"))


def step_costs_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return profiles_dir() / f"step-costs-{digest}.json"


def load_step_costs(key: dict) -> tuple[tuple[float, float, float] | None, Path]:
    """(alpha, beta, delta) saved for this key, or None (no file, another key, a damaged file:
    the engine then learns from its own steps); and the file's path."""
    path = step_costs_path(key)
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None, path
    except (OSError, ValueError) as error:
        log.warning("ignoring the step-cost profile %s: %s", path, error)
        return None, path
    if not isinstance(saved, dict) or saved.get("kind") != PROFILE_KIND or saved.get("key") != key:
        log.warning("ignoring the step-cost profile %s: it was saved for another setup", path)
        return None, path
    coefficients = saved.get("coefficients")
    if (not isinstance(coefficients, list) or len(coefficients) != 3
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                       for c in coefficients)):
        log.warning("ignoring the step-cost profile %s: its coefficients are not three costs >= 0", path)
        return None, path
    return tuple(float(c) for c in coefficients), path


def save_step_costs(model: StepCostModel, key: dict) -> Path | None:
    """Saves a fit learned from at least a few measured steps (atomically: a reader never sees
    half a file). A failure to write costs the next run only its head start: logged, not raised."""
    if model.coefficients is None or not model.fits:  # a seed alone has learned nothing here
        return None
    path = step_costs_path(key)
    record = {"kind": PROFILE_KIND, "key": key, "coefficients": list(model.coefficients),
              "samples": len(model.samples), "mean_relative_error": model.mean_error()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, path)
    except OSError as error:
        log.warning("could not save the step-cost profile %s: %s", path, error)
        return None
    return path

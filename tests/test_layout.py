"""The package layout's import rules (pipemax/*/__init__.py state them; DESIGN.md draws them).

    cli -> api, batch, tuning;  api, tuning -> engine -> parallel -> worker -> core, models -> kernels;
    batch -> core only

Imports point down only. core is plain Python (no torch): the host's decisions must be testable and
replayable without a device. kernels import nothing of pipemax. Checked on the source (every import
statement, function-local ones included) and, for core, by importing it in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipemax"
LOWER = {  # what each part may import of pipemax, besides itself
    "kernels": set(),
    "core": set(),
    "models": {"kernels"},
    "worker": {"core", "models", "kernels"},
    "parallel": {"worker", "core", "models", "kernels"},
    "engine": {"parallel", "worker", "core", "models", "kernels"},
    "tuning": {"engine", "parallel", "worker", "core", "models", "kernels"},
    "batch": {"core"},
    "api": {"engine", "parallel", "worker", "core", "models", "kernels"},
    "cli": {"top", "api", "batch", "tuning", "engine", "parallel", "worker", "core", "models", "kernels"},
}
TOP_MODULES = {"api.py": "api", "__init__.py": "api", "cli.py": "cli", "__main__.py": "cli"}
NO_TENSOR_LIBRARIES = {"torch", "triton", "numpy", "transformers", "safetensors", "pynvml"}
KERNEL_LIBRARIES = {"torch", "triton"}  # besides the standard library: kernels are the bottom


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) > 1:
        return relative.parts[0]
    if relative.name not in TOP_MODULES:
        raise AssertionError(f"pipemax/{relative.name}: a new top-level module; give it a place in LOWER and "
                             "TOP_MODULES (or put it in a package)")
    return TOP_MODULES[relative.name]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything a file imports; `from pipemax import kernels`
    gives pipemax.kernels, `from pipemax import __version__` gives pipemax. importlib.import_module
    and __import__ calls on a constant name count too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = list(path.relative_to(PACKAGE.parent).parts[:-1])  # the package a relative import starts from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and ast.unparse(node.func) in (
                    "importlib.import_module", "import_module", "__import__"):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            if base == "pipemax":
                found += [(node.lineno, f"pipemax.{alias.name}" if (PACKAGE / alias.name).is_dir()
                           or (PACKAGE / f"{alias.name}.py").exists() else "pipemax") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def target_part(dotted: str) -> str | None:
    """The part of pipemax a dotted name points into (None: not pipemax)."""
    parts = dotted.split(".")
    if parts[0] != "pipemax":
        return None
    if len(parts) == 1:
        return "top"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return TOP_MODULES.get(f"{parts[1]}.py", "top")


def layout_violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        for line, name in imported_modules(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            target = target_part(name)
            top = name.split(".")[0]
            if part == "core" and top in NO_TENSOR_LIBRARIES:
                problems.append(f"{where}: core is plain Python")
            if part == "kernels" and top != "pipemax" and top not in KERNEL_LIBRARIES \
                    and top not in sys.stdlib_module_names:
                problems.append(f"{where}: kernels may import torch and triton only")
            if target is None or target == part:
                continue
            if target not in LOWER[part]:
                problems.append(f"{where}: {part} may import only {sorted(LOWER[part]) or 'nothing of pipemax'}")
    return problems


def test_imports_point_down():
    assert layout_violations() == []


def test_the_rules_catch_what_they_guard_against(tmp_path, monkeypatch):
    """Plant each kind of upward import in a copy of a module and see it reported."""
    planted = {
        "core/sequence.py": "import torch\n",
        "kernels/norm.py": "from pipemax.models import ModelConfig\n",
        "engine/step_costs.py": "from pipemax import __version__\n",
        "worker/stage.py": "def later():\n    from ..parallel.pipeline import InProcessPipeline\n",
        "worker/__init__.py": "from ..engine import llm_engine\n",
        "core/__init__.py": "from .. import engine\n",
        "models/loader.py": "importlib.import_module('pipemax.worker.stage')\n",
        "kernels/rope.py": "import transformers\n",
    }
    copy = tmp_path / "pipemax"
    for source in PACKAGE.rglob("*.py"):
        target = copy / source.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    assert layout_violations() == []
    for relative, bad_line in planted.items():
        original = (copy / relative).read_text()
        (copy / relative).write_text(original + bad_line)
        problems = layout_violations()
        assert len(problems) == 1 and problems[0].startswith(f"pipemax/{relative}:"), problems
        (copy / relative).write_text(original)


@pytest.mark.subprocess
def test_core_loads_without_torch():
    modules = sorted(f"pipemax.core.{path.stem}" for path in (PACKAGE / "core").glob("*.py")
                     if path.name != "__init__.py")
    assert "pipemax.core.scheduler" in modules
    code = ("import sys\n" + "".join(f"import {name}\n" for name in modules)
            + f"print(sorted(m for m in {sorted(NO_TENSOR_LIBRARIES)!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("part", sorted({p for p in LOWER if (PACKAGE / p).is_dir()}))
def test_each_package_states_its_place(part):
    """A newcomer reads what a package owns and may import in its docstring."""
    doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"pipemax/{part}/__init__.py needs a docstring with its import rules"
    for module in (PACKAGE / part).glob("*.py"):
        if module.name != "__init__.py" and not module.name.startswith("_"):
            assert module.name in doc, f"pipemax/{part}/__init__.py does not say what {module.name} owns"


def test_bench_scripts_shadow_no_package():
    """Run as a script, a bench file's folder comes first on sys.path: bench/kernels.py once hid the
    `kernels` package that transformers imports. Every script is named bench_*.py."""
    bench = PACKAGE.parent / "bench"
    scripts = [path.name for path in bench.glob("*.py") if path.name != "__init__.py"]
    assert scripts and all(name.startswith("bench_") for name in scripts), scripts

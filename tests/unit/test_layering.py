"""Import direction (DESIGN.md): cli -> stages -> engine, tracking, weights -> models, data -> config.
Nothing imports upward; models/ and data/ stay pure (no accelerate, no mlflow)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pipeline"

# package (folder or module under pipeline/) -> what it must never import
FORBIDDEN = {
    "models": {"accelerate", "mlflow", "pipeline.engine", "pipeline.tracking", "pipeline.stages", "pipeline.weights",
               "pipeline.config", "pipeline.cli", "pipeline.sweep"},
    "data": {"accelerate", "mlflow", "pipeline.engine", "pipeline.tracking", "pipeline.stages", "pipeline.models",
             "pipeline.weights", "pipeline.cli", "pipeline.sweep"},
    "engine": {"pipeline.stages", "pipeline.cli", "mlflow"},
    "tracking": {"pipeline.stages", "pipeline.engine", "pipeline.cli"},
    "weights.py": {"pipeline.stages", "pipeline.engine", "pipeline.tracking", "pipeline.cli", "mlflow", "accelerate"},
    "configbase.py": {"pipeline"},
    "registry.py": {"pipeline"},
    "faults.py": {"pipeline"},
    "configdoc.py": {"pipeline", "mlflow", "accelerate"},
    "config.py": {"pipeline.stages", "pipeline.engine", "pipeline.tracking", "pipeline.weights", "pipeline.data",
                  "pipeline.cli", "mlflow", "accelerate"},
    "stages": {"pipeline.cli"},
    # the sweep's grid, statistics, report and executors: pure; the stage wires them to training
    "sweep": {"accelerate", "mlflow", "pipeline.engine", "pipeline.tracking", "pipeline.stages", "pipeline.weights",
              "pipeline.cli"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files():
    for part in FORBIDDEN:
        target = PKG / part
        for path in sorted(target.rglob("*.py") if target.is_dir() else [target]):
            yield pytest.param(part, path, id=str(path.relative_to(PKG)))


@pytest.mark.parametrize("part,path", _files())
def test_nothing_imports_upward(part, path):
    bad = {name for name in _imports(path)
           for rule in FORBIDDEN[part] if name == rule or name.startswith(rule + ".")}
    assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


def test_the_rules_cover_every_package():
    covered = set(FORBIDDEN) | {"cli.py", "__init__.py", "distributed.py", "fsutil.py", "metrics.py", "plots.py"}
    assert {p.name for p in PKG.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")} <= covered

"""models/ and data/ stay pure: they import neither accelerate nor mlflow (DESIGN.md)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pipeline"


@pytest.mark.parametrize("path", sorted((PKG / "models").rglob("*.py")) + sorted((PKG / "data").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PKG)))
def test_pure_layers_do_not_import_side_effect_libraries(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"accelerate", "mlflow"}, f"{path} imports {imported & {'accelerate', 'mlflow'}}"

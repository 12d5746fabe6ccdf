"""Load datasets/<name>/prepare.py in tests (datasets/ is deliberately not a package)."""
from pipeline.stages.prepare import REPO_ROOT
import importlib.util


def load_prepare_module(name: str):
    path = REPO_ROOT / "datasets" / name / "prepare.py"
    spec = importlib.util.spec_from_file_location(f"test_datasets_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def landsat_module():
    return load_prepare_module("landsat_landcover")

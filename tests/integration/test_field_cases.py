"""Issue 14 end to end: the real CLI on a real SQLite store.

Case 7: four `mimflow prepare` commands started at once on a fresh store (before: three of four
crashed in MLflow's schema migrations, e.g. `table _alembic_tmp_latest_metrics already exists`).
Cases 2 and 3: a whole run on class folders named as users name them, extracted from a macOS zip.
"""
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import REPO
from helpers import mimflow, runs_by_name

pytestmark = pytest.mark.slow
CLASSES = ("Cat (domestic)", "a,b+c", "dog")


def class_folders(root: Path, per_class: int = 10) -> Path:
    """32 px RGB PNGs in class folders with names MLflow refuses as keys, and a macOS zip's junk."""
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(100 * k + i)
            Image.fromarray(rng.integers(60 * k, 60 * k + 100, (32, 32, 3), dtype=np.uint8)).save(path)
            junk = root / "__MACOSX" / name / f"._{i}.png"
            junk.parent.mkdir(parents=True, exist_ok=True)
            junk.write_bytes(struct.pack(">II", 0x00051607, 0x00020000) + b"\0" * 74)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def prepare_args(tmp: Path, k: int, root: Path) -> list[str]:
    return ["prepare", "data.dataset=imagefolder", f"data.options={{root: {root}, split_fractions: [0.5, 0.25, 0.25]}}",
            f"data.root={tmp / f'data{k}'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.artifact_location={tmp / 'art'}", f"tracking.backlog_dir={tmp / 'backlog'}", "run.quiet=true",
            f"run.name=first{k}"]  # four runs on one store (one run has one writer at a time)


def test_four_prepares_at_once_on_a_fresh_sqlite_store(tmp_path):
    root = class_folders(tmp_path / "img", per_class=4)
    assert not (tmp_path / "mlflow.db").exists()  # truly fresh: no pre-migrated copy
    with ThreadPoolExecutor(4) as pool:  # four processes, started together
        procs = list(pool.map(lambda k: mimflow(*prepare_args(tmp_path, k, root), cwd=tmp_path, check=False,
                                                timeout=600), range(4)))
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
        assert "prepare: run" in p.stdout and "Traceback" not in p.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mimflow").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert (tmp_path / "mlflow.db.lock").exists()  # the lock lives beside the store


def test_awkward_class_names_keep_every_metric_and_their_names(tmp_path):
    root = class_folders(tmp_path / "img")
    from conftest import tiny_overrides

    proc = mimflow("run", str(REPO / "configs" / "debug" / "png_tiny.yaml"), *tiny_overrides(tmp_path),
                   f"data.options.root={root}", "register.model_name=awkward", cwd=tmp_path)
    assert "registered model: models:/awkward@candidate" in proc.stdout
    assert "skipped 2 path(s) that are no images" in proc.stdout  # __MACOSX and .DS_Store
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ev = runs_by_name(client)["evaluate"]
    metrics, tags = ev.data.metrics, ev.data.tags
    assert {"test/accuracy", "test/balanced_accuracy", "test/macro_f1", "test/macro_auroc"} <= set(metrics)
    assert json.loads(tags["classes"]) == list(CLASSES)
    renamed = json.loads(tags["mimflow.renamed_keys"])
    assert set(renamed.values()) == {"test/auroc_Cat (domestic)", "test/auroc_a,b+c"}
    assert set(renamed) <= set(metrics) and "test/auroc_dog" in metrics
    report = json.loads((tmp_path / "runs" / "png_tiny" / "evaluate" / "metrics.json").read_text())
    assert report["classes"] == list(CLASSES) and "test/auroc_Cat (domestic)" in report
    assert client.get_model_version_by_alias("awkward", "candidate").tags["classes"]

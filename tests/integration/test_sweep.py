"""`mimflow sweep` end to end on the real Landsat tiles at debug size: the report, a sweep killed
with SIGKILL and started again (no finished trial repeated), the Ray executor computing the same
table as the sequential one, and the refusals that come before anything runs."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from conftest import tiny_overrides
from helpers import REPO, mimflow

SWEEP_TINY = REPO / "configs" / "debug" / "sweep_tiny.yaml"
ARMS = {"scratch-vit": "ViT (vit_debug) from scratch", "mae-vit": "ViT (vit_debug) + MAE",
        "resnet_debug": "ResNet (resnet_debug) from scratch",
        "logistic_regression": "logistic regression (channel statistics)",
        "random_forest": "random forest (channel statistics)"}
TRIALS = len(ARMS) * 2 * 2 * 2  # arms x fractions x repetitions x seeds


def _args(tmp: Path, prepared: Path, *extra: str) -> list[str]:
    # the session's prepared Landsat tiles (the same data options as sweep_tiny) are reused
    return ["sweep", str(SWEEP_TINY), *tiny_overrides(tmp), f"data.root={prepared.parent}", *extra]


def _records(runs: Path) -> dict[str, dict]:
    out = {}
    for path in runs.glob("*/sweep/trials/*/*/record.json"):
        try:
            out[str(path.parent)] = json.loads(path.read_text())
        except ValueError:  # being replaced: atomic, but read between two writes of a poll
            pass
    return out


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, prepared_landsat):
    """sweep_tiny killed with SIGKILL once 10 trials finished, then the same command to the end."""
    tmp = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", *_args(tmp, prepared_landsat)]
    start = time.monotonic()
    with open(tmp / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while sum(r.get("status") == "finished" for r in _records(tmp / "runs").values()) < 10:
                assert proc.poll() is None, (tmp / "first.log").read_text()[-3000:]
                assert time.monotonic() - start < 600, "10 trials did not finish within 10 minutes"
                time.sleep(0.5)
            time.sleep(1.0)  # into the next trial: a checkpoint, a half-logged run
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = {k: r for k, r in _records(tmp / "runs").items() if r.get("status") == "finished"}
    second = mimflow(*_args(tmp, prepared_landsat), cwd=tmp, timeout=900)
    return {"tmp": tmp, "before": before, "after": _records(tmp / "runs"), "out": second.stdout,
            "report": Path(second.stdout.strip().splitlines()[-1].removeprefix("report: "))}


@pytest.mark.slow
def test_the_debug_sweep_reports_every_arm_at_every_fraction(killed_then_resumed):
    report = killed_then_resumed["report"]
    assert report.is_file() and report.name == "report.md"  # its path printed last
    text = report.read_text()
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([^|]+?)(?: \*\(baseline\)\*)? \| ([^|]+) \| ([^|]+) \|$", text, re.M)}
    for label in ARMS.values():
        for cell in rows[label]:
            mean, low, high, n = re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\] \(n=(\d+)\)", cell.strip()).groups()
            assert float(low) <= float(mean) <= float(high) <= 100 and n == "4"
    for fraction in ("0.25", "1"):
        section = text.split(f"### {fraction} of the labels")[1].split("###")[0]
        assert re.search(r"\d+ of \d+ comparisons show a difference; the minimum detectable effect ranges", section)
        assert "| ViT (vit_debug) + MAE vs ViT (vit_debug) from scratch |" in section  # pretraining alone
        assert "| ViT (vit_debug) + MAE vs ResNet (resnet_debug) from scratch |" in section
    assert "## Labels behind each fraction" in text
    with open(report.parent / "results.csv") as f:
        results = list(csv.DictReader(f))
    assert len(results) == TRIALS and {r["status"] for r in results} == {"finished"}
    assert {r["arm"] for r in results} == set(ARMS)
    steps = {r["steps"] for r in results if r["arm"] in ("scratch-vit", "mae-vit", "resnet_debug")}
    assert steps == {"6"}  # the same budget in optimizer steps for every network arm and fraction
    assert (report.parent / "label_efficiency.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_repeats_no_finished_trial(killed_then_resumed):
    before, after = killed_then_resumed["before"], killed_then_resumed["after"]
    assert len(before) >= 10
    for folder, record in before.items():
        assert after[folder] == record, f"{folder} was run again"
    done_before = int(re.search(r"(\d+) finished before", killed_then_resumed["out"]).group(1))
    assert done_before >= len(before)
    client = MlflowClient(f"sqlite:///{killed_then_resumed['tmp'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mimflow")
    trials = client.search_runs([exp.experiment_id], "tags.`mimflow.stage` = 'sweep_trial'", max_results=1000)
    names = [r.data.tags["mimflow.trial"] for r in trials]
    assert len(names) == len(set(names)) == TRIALS  # an interrupted trial continued in its own run
    parents = {r.data.tags["mlflow.parentRunId"] for r in trials}
    sweeps = client.search_runs([exp.experiment_id], "tags.`mimflow.stage` = 'sweep'")
    assert len(sweeps) == 1 and parents == {sweeps[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in trials)


@pytest.mark.slow
def test_pretrained_and_scratch_classifiers_have_the_same_architecture(killed_then_resumed):
    trials = killed_then_resumed["tmp"] / "runs" / "sweep_tiny" / "sweep" / "trials"

    def shapes(arm: str) -> dict:
        path = next((trials / arm).glob("rep0-frac1-seed0-*/classifier/model.safetensors"))
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    scratch = shapes("scratch-vit")
    assert "pos_embed" in scratch and shapes("mae-vit") == scratch


@pytest.mark.slow
def test_the_ray_executor_gives_the_sequential_table(killed_then_resumed, prepared_landsat):
    pytest.importorskip("ray", reason="the ray extra (pip install -e '.[ray]') runs trials as Ray tasks")
    tmp = killed_then_resumed["tmp"]
    out = mimflow(*_args(tmp, prepared_landsat, "run.name=sweep_tiny_ray", "sweep.executor=ray",
                         "sweep.fractions=[0.25]", "sweep.repetitions=1", "sweep.seeds=[1]"), cwd=tmp, timeout=900)
    assert "ray executor" in out.stdout
    report = Path(out.stdout.strip().splitlines()[-1].removeprefix("report: "))

    def table(path: Path) -> dict:
        with open(path) as f:
            return {r["trial"]: {k: r[k] for k in ("balanced_accuracy", "accuracy", "macro_f1", "macro_auroc",
                                                    "train_labels", "val_labels", "test_items", "steps")}
                    for r in csv.DictReader(f)}

    ray_rows = table(report.parent / "results.csv")
    sequential = table(killed_then_resumed["report"].parent / "results.csv")
    assert len(ray_rows) == len(ARMS)
    assert ray_rows == {k: sequential[k] for k in ray_rows}


def test_a_grid_over_max_trials_is_refused_before_anything_runs(tmp_path):
    proc = mimflow("sweep", str(SWEEP_TINY), *tiny_overrides(tmp_path), "sweep.max_trials=10", cwd=tmp_path,
                   check=False, timeout=120)
    assert proc.returncode == 2
    assert (f"mimflow: the grid has {TRIALS} trials, more than sweep.max_trials=10; pass --yes (or raise "
            "sweep.max_trials) to run it") in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_sweep_without_a_model_geometry_is_refused_naming_both_keys(tmp_path):
    proc = mimflow("sweep", str(SWEEP_TINY), *tiny_overrides(tmp_path), "model.img_size=null", cwd=tmp_path,
                   check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "mimflow sweep needs model.img_size and model.patch_size in the recipe (now None and 4)" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_beit_joins_the_sweep_with_one_tokenizer_for_both_encoders(tmp_path, prepared_landsat):
    """sweep.inits: pretrain:beit trains the tokenizer chain (MAE teacher -> VQ-KD) once as jobs of
    the sweep; BEiT on the ViT head and on the BEiT head both read it, and both arms are scored."""
    recipe = REPO / "configs" / "debug" / "sweep_beit_tiny.yaml"
    out = mimflow("sweep", str(recipe), *tiny_overrides(tmp_path), f"data.root={prepared_landsat.parent}",
                  cwd=tmp_path, timeout=900)
    report = Path(out.stdout.strip().splitlines()[-1].removeprefix("report: "))
    with open(report.parent / "results.csv") as f:
        results = {r["arm"]: r for r in csv.DictReader(f)}
    assert set(results) == {"scratch-vit", "beit-vit", "scratch-beit", "beit-beit", "resnet_debug",
                            "logistic_regression", "random_forest"}
    assert {r["status"] for r in results.values()} == {"finished"}
    assert 0 <= float(results["beit-beit"]["balanced_accuracy"]) <= 1
    pretrain = tmp_path / "runs" / "sweep_beit_tiny" / "sweep" / "pretrain"
    assert sorted(p.name for p in pretrain.iterdir() if p.is_dir()) == [
        "beit-beit_debug-" + next(pretrain.glob("beit-beit_debug-*")).name.split("-")[-1],
        "beit-vit_debug-" + next(pretrain.glob("beit-vit_debug-*")).name.split("-")[-1],
        "tokenizer-p4-teacher_pretrain", "tokenizer-p4-tokenizer"]
    assert out.stdout.count("sweep: tokenizer for BEiT's visual tokens") == 1
    assert out.stdout.count("sweep: teacher_pretrain for BEiT's visual tokens") == 1
    tokenizer = json.loads((pretrain / "tokenizer-p4-tokenizer" / "tokenizer" / "meta.json").read_text())
    for arm in ("beit-beit_debug-*", "beit-vit_debug-*"):
        meta = json.loads((next(pretrain.glob(arm)) / "encoder" / "meta.json").read_text())
        assert meta["objective"] == "beit" and tokenizer["weights_sha256"] in json.dumps(meta)
    text = report.read_text()
    assert "| BEiT (beit_debug) + BEiT vs BEiT (beit_debug) from scratch |" in text
    assert re.search(r"Visual tokens of `beit-vit`, `beit-beit`: tokenizer .*tokenizer-p4-tokenizer/tokenizer \(vqkd, \d+ of 16 codes used", text)

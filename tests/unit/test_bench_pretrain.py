"""scripts/bench_pretrain.py's input-pipeline line: the stage's dataset read by one worker, set
against mimflow's step (the peers need the `bench` extra, so only mimflow's arm runs here)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pipeline.data.manifest import load_manifest
from pipeline.data.readers import read_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pretrain", REPO / "scripts" / "bench_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEBUG = ["--encoder", "vit_debug", "--img", "16", "--patch", "4", "--batch", "8", "--decoder-dim", "16",
         "--decoder-depth", "1", "--decoder-heads", "2", "--rounds", "1", "--arms", "mimflow", "--no-memory"]


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_the_input_line_times_the_stages_dataset_on_real_tiles(bench, prepared_landsat, capsys, one_thread,
                                                               objective):
    assert bench.main([*DEBUG, "--objective", objective, "--loader", str(prepared_landsat)]) == 0
    out = capsys.readouterr().out
    step = float(re.search(r"^mimflow\s+([\d.]+)", out, re.M).group(1))
    head = re.search(r"^input: landsat_landcover, ([\d,]+) (\w+) tiles (\w+) \[(\d+), (\d+), (\d+)\] -> 16 px", out, re.M)
    assert head, out
    first = next(r for r in load_manifest(prepared_landsat / "manifest.csv") if r.split == head.group(2))
    tile = read_image(first.path)  # the stage's pool, as stored: the dtype and shape the line names
    assert head.group(3) == str(tile.dtype) and tuple(int(head.group(i)) for i in (4, 5, 6)) == tile.shape
    assert head.group(2) == "unlabelled" and int(head.group(1).replace(",", "")) == sum(
        r.split == "unlabelled" for r in load_manifest(prepared_landsat / "manifest.csv"))
    assert ("masks" in out.split("input:")[1].splitlines()[0]) == (objective == "simmim")
    rate = re.search(r"loader ([\d,.]+) img/s per worker vs mimflow's step ([\d.]+) img/s: ([\d,.]+)x; (\d+) "
                     r"worker\(s\) keep up", out)
    assert rate, out
    loader = float(rate.group(1).replace(",", ""))
    assert loader > 0 and float(rate.group(2)) == pytest.approx(step, abs=0.01)
    assert int(rate.group(4)) == max(1, -(-step // loader))
    assert re.search(r"run.num_workers=0 \(loading in the training process\) each step also waits", out)


def test_a_loader_folder_that_is_not_prepared_stops_before_any_timing(bench, tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"--loader {tmp_path}: not a prepared folder"):
        bench.main([*DEBUG, "--loader", str(tmp_path)])
    assert "round" not in capsys.readouterr().out


def test_workers_needed_and_the_verdict(bench):
    info = {"rate": 100.0, "build": 1000.0, "pool": 10, "split": "unlabelled", "shape": (3, 8, 8), "dtype": "uint8",
            "name": "x", "num_workers": 2, "masks": False}
    args = bench.parse_args(["--img", "8"])
    lines = bench.input_lines(info, 250.0, args)
    assert "loader 100.0 img/s per worker vs mimflow's step 250.00 img/s: 0.4x; 3 worker(s) keep up" in lines[1]
    assert "run.num_workers=2: 200 img/s of input, does NOT keep up: raise run.num_workers" in lines[2]
    lines = bench.input_lines(info, 40.0, args)
    assert "2.5x; 1 worker(s) keep up" in lines[1]
    assert "run.num_workers=2: 200 img/s of input, keeps up" in lines[2]
    lines = bench.input_lines({**info, "num_workers": 0}, 40.0, args)
    assert "each step also waits for its batch: +40.0% of the step's time" in lines[2]

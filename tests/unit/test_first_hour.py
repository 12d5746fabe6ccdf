"""A new user's first hour, the parts that need no training: names that follow the data, sizes from
the data, names checked at load, help that teaches, a ui command that works as typed, the
registry refusing a changed schema, and a reconstruction figure that says what it shows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main, ui_command
from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def image_folder(root: Path, size: int = 64, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_run_model_and_prepared_data_are_named_after_the_data(tmp_path):
    root = image_folder(tmp_path / "chest_xrays", size=16)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.options.root={root}"])
    assert (cfg.data.name, cfg.run.name, cfg.register.model_name) == ("chest_xrays", "chest_xrays_mae", "chest-xrays-vit")
    scratch = load_config(None, ["data.dataset=imagefolder", f"data.options.root={root}", "finetune.init=scratch",
                                 "model.backbone=swin_debug"])
    assert (scratch.run.name, scratch.register.model_name) == ("chest_xrays_scratch", "chest-xrays-swin")
    demo = load_config()
    assert (demo.run.name, demo.register.model_name) == ("landsat_landcover_mae", "landsat-landcover-vit")
    given = load_config(None, ["run.name=mine", "register.model_name=their-model"])
    assert (given.run.name, given.register.model_name) == ("mine", "their-model")


def test_names_config_can_check_fail_at_load(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"data.dataset: unknown data set 'landsat_lancover'; did you mean "
                                          r"'landsat_landcover'\?"):
        load_config(None, ["data.dataset=landsat_lancover"])
    with pytest.raises(ConfigError, match=r"data.options.root: .*/nowhere does not exist"):
        load_config(None, ["data.dataset=imagefolder", f"data.options.root={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"pretrain.epochz: unknown key; did you mean pretrain.epochs\?"):
        load_config(None, ["pretrain.epochz=3"])
    os.chdir(tmp_path)
    assert main(["run", "data.dataset=landsat_lancover"]) == 2  # before any work: no store, no run
    assert "did you mean 'landsat_landcover'" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mimflow_runs").exists()


def test_image_and_patch_size_come_from_the_data_and_any_resize_is_said(tmp_path, capsys):
    from pipeline.stages.common import resolve_geometry
    from pipeline.stages.prepare import _build

    root = image_folder(tmp_path / "pets", size=64)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.options.root={root}",
                             "data.options.split_fractions=[0.5, 0.25, 0.25]", "data.allow_missing_classes=true",
                             f"data.root={tmp_path / 'data'}", "run.quiet=true"])
    prepared = tmp_path / "data" / cfg.data.name
    _build(cfg, prepared)
    assert json.loads((prepared / "dataset.json").read_text())["image_size"]["median"] == [64, 64]
    capsys.readouterr()
    resolved = resolve_geometry(cfg, prepared)
    assert (resolved.model.img_size, resolved.model.patch_size) == (64, 4)  # 16 x 16 patches
    out = capsys.readouterr().out
    assert "model.img_size=64 (the median image is 64 x 64 px)" in out and "model.patch_size=4 (16 x 16 patches)" in out
    smaller = resolve_geometry(load_config(None, [*(f"{k}={v}" for k, v in (
        ("data.dataset", "imagefolder"), ("data.options.root", root), ("model.img_size", 32),
        ("model.patch_size", 4)))]), prepared)
    assert smaller.model.img_size == 32
    assert "images of 64 x 64 to 64 x 64 px are resized to 32 x 32 px for the model" in capsys.readouterr().out


def test_help_lists_commands_and_says_what_each_reads_and_writes():
    def help_of(*args):
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--help"], capture_output=True,
                             text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
        return out if not args else " ".join(out.split())  # argparse wraps descriptions

    top = help_of()
    for command in ("run", "prepare", "pretrain", "finetune", "evaluate", "register", "config"):
        assert f"    {command} " in top
    assert "mimflow config" in top and "examples:" in top
    assert "Reads the prepared data and the encoder named by --init; writes" in help_of("finetune")
    assert "models:/name@alias works" in help_of("evaluate")


def test_config_prints_every_key_with_its_meaning_and_changed_defaults(capsys):
    assert main(["config", "pretrain.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "  epochs: 3  # default 40; passes over the pool" in out
    assert "  mask_ratio: 0.75  # share of patches hidden from the encoder" in out
    keys = [line for line in out.splitlines() if ":" in line and not line.lstrip().startswith("#")]
    undocumented = [line for line in keys if "#" not in line and not line.rstrip().endswith(":")]
    assert not undocumented, undocumented[:5]


def test_the_printed_ui_command_works_as_typed(tmp_path):
    command = ui_command("sqlite:///mlflow.db").split()
    assert command[1:4] == ["ui", "--backend-store-uri", "sqlite:///mlflow.db"]
    exe = Path(command[0]) if Path(command[0]).is_absolute() else Path.cwd() / command[0]
    assert exe.is_file()  # this environment's mlflow, not whichever is on PATH
    proc = subprocess.run([str(exe), "ui", "--help"], capture_output=True, text=True, cwd=tmp_path, env={})
    assert proc.returncode == 0 and "--backend-store-uri" in proc.stdout


def test_a_version_with_other_classes_is_refused_unless_allowed(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.registry import SCHEMA_TAG, SchemaChangeError, check_schema

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("landsat-landcover-vit")
    old = {"classes": ["developed", "forest"], "channels": ["B1", "B2"], "img_size": 16}
    client.create_model_version("landsat-landcover-vit", source=str(tmp_path),
                                tags={SCHEMA_TAG: json.dumps(old, sort_keys=True)})
    new = {"classes": ["cats", "dogs", "fish"], "channels": ["R", "G", "B"], "img_size": 32}
    with pytest.raises(SchemaChangeError, match=r"version 1 takes or returns something else \(channels: \['B1', "
                                                 r"'B2'\] -> \['R', 'G', 'B'\]; classes: .*register.allow_schema_change"):
        check_schema(client, "landsat-landcover-vit", new, allowed=False)
    check_schema(client, "landsat-landcover-vit", new, allowed=True)
    check_schema(client, "landsat-landcover-vit", old, allowed=False)  # the same schema: fine
    check_schema(client, "another-model", new, allowed=False)  # a new model: fine
    mlflow.set_tracking_uri(None)


def test_the_reconstruction_figure_says_what_it_shows():
    from pipeline.plots import MASKED, reconstruction_figure

    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 5, 16, 16)).astype(np.float32)
    mask = np.zeros((4, 16))
    mask[:, ::2] = 1  # every other 4 px patch
    masked = images * np.repeat(np.repeat(1 - mask.reshape(4, 4, 4), 4, 1), 4, 2)[:, None]
    fig = reconstruction_figure(images, masked, images, title="mae, epoch 3 (loss of these 4 tiles: 0.5)", rgb=(2, 1, 0),
                                mask=mask, patch_size=4, channels=["B1", "B2", "B3", "B4", "B5"],
                                labels=["forest", "water", "forest", "urban"])
    texts = [t.get_text() for t in fig.texts] + [fig.get_suptitle()]
    assert "R, G, B = B3, B2, B1; masked patches in light grey" in texts
    assert "mae, epoch 3 (loss of these 4 tiles: 0.5)" in texts
    axes = np.array(fig.axes).reshape(3, 4)
    assert [a.get_title() for a in axes[0]] == ["forest", "water", "forest", "urban"]
    for col in range(4):
        shown = axes[1, col].get_images()[0].get_array()  # the masked row: [H, W, 3]
        hidden = np.repeat(np.repeat(mask[col].reshape(4, 4), 4, 0), 4, 1) > 0
        assert np.all(shown[hidden] == MASKED)  # one fixed colour, whatever the tile
        assert not np.all(shown[~hidden] == MASKED)


def test_data_progress_bars_leave_nothing_in_a_log_file(tmp_path, capsys):
    """Off a terminal (a log file, CI) prepare's own bars draw nothing, quiet or not: one summary
    line per stage is what a log keeps (issue 9, case 11). capsys is not a terminal."""
    import numpy as np

    from pipeline.data.manifest import Record
    from pipeline.data.stats import compute_channel_stats
    from pipeline.data.validate import validate_records

    paths = []
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.random.default_rng(i).random((2, 8, 8), dtype=np.float32))
        paths.append(tmp_path / f"{i}.npy")
    records = [Record(path=p, split="unlabelled", label=-1, group=str(i)) for i, p in enumerate(paths)]
    assert not validate_records(records, quiet=False).bad
    compute_channel_stats(paths)
    err = capsys.readouterr().err
    assert "%|" not in err and "it/s" not in err, err[:300]

"""Checkpoint folders: atomic commit through the index, pruning, fallbacks, and no pickle ever run."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine.checkpoint import CheckpointDir, CheckpointError, flatten_state, read_checkpoint, unflatten_state
from pipeline.engine.state import capture_rng, config_differences, restore_rng
from pipeline.weights import UnsafeCheckpointError, load_torch_file, load_weights, save_weights

REPO = Path(__file__).resolve().parents[3]


def _save(ck: CheckpointDir, step: int, value: float = 0.0) -> Path:
    return ck.save(step, {"w": torch.full((3,), value)}, {"loop": {"epoch": 1, "step": step}})


def test_state_round_trips_through_json_and_safetensors():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.95))
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    tree = {"optimizer": opt.state_dict(), "nested": {"t": (1, 2.5, None), "s": "x"}}
    tensors: dict = {}
    flat = flatten_state(tree, tensors, "s")
    back = unflatten_state(json.loads(json.dumps(flat)), tensors)
    assert back["nested"]["t"] == (1, 2.5, None)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # a tuple again
    assert set(back["optimizer"]["state"]) == {0}  # int keys survive
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"f": object()}, {}, "s")


def test_index_lists_complete_checkpoints_and_keeps_the_last_k(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=2)
    assert ck.latest() is None
    paths = [_save(ck, step, value=step) for step in (2, 4, 6)]
    assert [c["step"] for c in ck.index()["checkpoints"]] == [4, 6]
    assert not paths[0].exists() and ck.latest() == paths[2]
    tensors, state = read_checkpoint(ck.latest())
    assert tensors["w"].tolist() == [6.0] * 3 and state["loop"]["step"] == 6
    # no temporary files or folders are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["index.json", paths[1].name, paths[2].name])


def test_a_write_killed_before_its_commit_point_is_invisible(tmp_path, monkeypatch):
    ck = CheckpointDir(tmp_path, keep_last=3)
    good = _save(ck, 2)

    def crash(index):
        raise KeyboardInterrupt("killed between writing the folder and committing the index")

    monkeypatch.setattr(ck, "_write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(ck, 4)
    monkeypatch.undo()
    assert ck.latest() == good  # the complete-but-uncommitted step 4 is not "latest"
    _save(ck, 6)  # the next save sweeps the orphan folder away
    assert [c["step"] for c in ck.index()["checkpoints"]] == [2, 6]
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=2)
    older = _save(ck, 2)
    newer = _save(ck, 4)
    (newer / "tensors.safetensors").write_bytes(b"\x00" * 10)  # e.g. a disk error after the commit
    with pytest.warns(UserWarning, match="tensors.safetensors changed since it was written"):
        assert ck.latest() == older


def test_flipped_bytes_that_still_parse_are_caught_by_the_checksum(tmp_path):
    from safetensors.torch import load_file

    ck = CheckpointDir(tmp_path, keep_last=2)
    older = _save(ck, 2, value=2.0)
    newer = _save(ck, 4, value=4.0)
    data = bytearray((newer / "tensors.safetensors").read_bytes())
    data[-4:] = bytes(4)  # a float of the last tensor zeroed: the file still loads
    (newer / "tensors.safetensors").write_bytes(bytes(data))
    assert load_file(newer / "tensors.safetensors")["w"][-1] == 0  # safetensors alone cannot tell
    with pytest.warns(UserWarning, match="changed since it was written"):
        assert ck.latest() == older
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        read_checkpoint(newer)  # an explicitly named checkpoint is verified too


def test_a_lost_index_is_rebuilt_from_the_folders_and_nothing_listed_is_deleted(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=3)
    paths = [_save(ck, step) for step in (2, 4)]
    (tmp_path / "index.json").unlink()
    with pytest.warns(UserWarning, match="index.json is missing: rebuilt from the 2 checkpoint folder"):
        assert [c["step"] for c in ck.index()["checkpoints"]] == [2, 4]
    with pytest.warns(UserWarning):
        assert ck.latest() == paths[1]
    with pytest.warns(UserWarning):
        _save(ck, 6)
    assert [c["step"] for c in ck.index()["checkpoints"]] == [2, 4, 6] and all(p.is_dir() for p in paths)


KILLER = textwrap.dedent("""
    import sys, torch
    from pipeline.engine.checkpoint import CheckpointDir
    ck = CheckpointDir(sys.argv[1], keep_last=2)
    step = 0
    while True:
        step += 1
        ck.save(step, {"w": torch.full((2_000_000,), float(step))}, {"loop": {"step": step}})
        print(step, flush=True)
""")


def test_sigkill_at_random_moments_of_writing_never_breaks_latest(tmp_path):
    """A process saving 8 MB checkpoints in a loop is SIGKILLed at arbitrary points, repeatedly;
    after every kill the newest listed checkpoint reads back whole."""
    script = tmp_path / "writer.py"
    script.write_text(KILLER)
    root = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(0)
    last = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline()  # at least one save of this process is underway
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = CheckpointDir(root).latest()
        tensors, state = read_checkpoint(path)
        step = state["loop"]["step"]
        assert step >= 1 and tensors["w"].eq(float(step)).all()
        last = step
    assert last >= 1


MARKER_PAYLOAD = textwrap.dedent("""
    import os, pickle, sys
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sys.argv[2]}",))
    with open(sys.argv[1], "wb") as f:
        pickle.dump({"model": Exploit()}, f)
""")


@pytest.fixture
def malicious_pickle(tmp_path):
    """-> (file, marker): loading `file` with plain pickle would create `marker`."""
    path, marker = tmp_path / "evil.pkl", tmp_path / "PWNED"
    script = tmp_path / "make_evil.py"
    script.write_text(MARKER_PAYLOAD)
    subprocess.run([sys.executable, str(script), str(path), str(marker)], check=True)
    return path, marker


def test_the_payload_is_real(malicious_pickle, tmp_path):
    path, marker = malicious_pickle
    pickle.loads(path.read_bytes())  # what an unsafe loader would do
    assert marker.exists()


def test_a_pickle_posing_as_a_checkpoint_is_refused_and_never_run(malicious_pickle, tmp_path):
    path, marker = malicious_pickle
    ck = CheckpointDir(tmp_path / "ck")
    good = _save(ck, 2)
    (good / "tensors.safetensors").write_bytes(path.read_bytes())  # swapped in after the commit
    with pytest.raises(CheckpointError, match="changed since it was written"):  # never even parsed
        read_checkpoint(good)
    with pytest.warns(UserWarning):
        assert ck.latest() is None
    assert not marker.exists()


@pytest.mark.parametrize("name", ["weights.pth", "weights.pt", "pytorch_model.bin"])
def test_a_pickle_posing_as_torch_weights_is_refused_and_never_run(malicious_pickle, tmp_path, name):
    path, marker = malicious_pickle
    target = tmp_path / name
    target.write_bytes(path.read_bytes())
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_weights(target)  # finetune.init=<that file> goes through here
    with pytest.raises(UnsafeCheckpointError):
        load_torch_file(target)
    assert not marker.exists()


def test_a_pickle_posing_as_safetensors_weights_is_refused(malicious_pickle, tmp_path):
    path, marker = malicious_pickle
    folder = save_weights({"w": torch.zeros(2)}, tmp_path / "enc", {"img_size": 16})
    (folder / "model.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(Exception):
        load_weights(folder)
    assert not marker.exists()


def test_plain_torch_weights_load_with_weights_only(tmp_path):
    state = {"blocks.0.w": torch.arange(3.0)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "mae_release.pth")  # MAE's release layout
    loaded, meta = load_weights(tmp_path / "mae_release.pth")
    assert meta == {} and torch.equal(loaded["blocks.0.w"], state["blocks.0.w"])


def test_rng_states_round_trip_without_pickle():
    import random

    gen = torch.Generator().manual_seed(3)
    state = capture_rng(gen.get_state())
    tensors: dict = {}
    frozen = json.loads(json.dumps(flatten_state(state, tensors, "rng")))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    gen.manual_seed(99)
    gen.set_state(restore_rng(unflatten_state(frozen, tensors)))  # -> the loader's epoch-start state
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())


def test_config_differences_ignore_what_does_not_change_the_computation():
    from pipeline.config import load_config

    a = load_config(None).to_dict()
    b = load_config(None, ["run.quiet=true", "tracking.uri=http://x:1", "checkpoint.every_steps=7",
                           "pretrain.objective.mask_ratio=0.6", "run.seed=3", "data.root=/elsewhere",
                           "pretrain.log_every_steps=1"]).to_dict()
    assert config_differences(a, b) == ["pretrain.objective.mask_ratio", "run.seed"]

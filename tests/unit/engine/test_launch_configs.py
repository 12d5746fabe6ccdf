"""Launch configs: what accelerate makes of scripts/*.yaml, and the SLURM preemption signal."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from pipeline.distributed import fsdp_plugin

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "scripts"


@pytest.mark.parametrize("name, kind", [("accelerate_multi_gpu.yaml", "MULTI_GPU"), ("accelerate_fsdp.yaml", "FSDP")])
def test_accelerate_configs_parse(name, kind):
    cfg = load_config_from_file(str(SCRIPTS / name))
    assert cfg.distributed_type.value == kind and not cfg.use_cpu


def test_fsdp_yaml_gives_the_plugin_that_run_fsdp_builds(tmp_path):
    """`accelerate launch --config_file scripts/accelerate_fsdp.yaml` (one process: no GPU here) sets
    the environment Accelerator reads; the plugin built from it matches pipeline.distributed's."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import json, os
        from accelerate.utils import FullyShardedDataParallelPlugin
        p = FullyShardedDataParallelPlugin()
        print(json.dumps({"use_fsdp": os.environ["ACCELERATE_USE_FSDP"], "version": p.fsdp_version,
                          "wrap": p.transformer_cls_names_to_wrap, "reshard": p.reshard_after_forward,
                          "state_dict": str(p.state_dict_type)}))
    """))
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(SCRIPTS / "accelerate_fsdp.yaml"), "--num_processes", "1", str(probe)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ours = fsdp_plugin()
    assert got == {"use_fsdp": "true", "version": ours.fsdp_version, "wrap": ours.transformer_cls_names_to_wrap,
                   "reshard": ours.reshard_after_forward, "state_dict": str(ours.state_dict_type)}
    assert got["version"] == 2 and got["wrap"] == ["Block"]


def test_slurm_signals_the_training_processes_not_just_the_batch_shell():
    text = (SCRIPTS / "slurm_pretrain.sbatch").read_text()
    assert "#SBATCH --signal=TERM@" in text and "--signal=B:" not in text
    assert "#SBATCH --requeue" in text

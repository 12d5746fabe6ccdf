"""Launched by torchrun in tests: a real 2-process gloo run of the pretrain and finetune loops.

Writes (rank 0) a JSON report: world size, the largest weight difference between ranks after
training, whether weights moved, and whether the ranks saw different data.
"""
import json
import sys
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.data.dataset import ManifestDataset
from pipeline.data.manifest import load_manifest, select
from pipeline.data.stats import load_stats
from pipeline.distributed import make_accelerator
from pipeline.engine.loop import train_one_epoch
from pipeline.engine.optim import make_optimizer, warmup_cosine
from pipeline.engine.state import LoopState
from pipeline.models.backbones import create_backbone
from pipeline.stages.common import make_loader
from pipeline.stages.pretrain import build_mim_model
from pipeline.tracking.base import NullTracker


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run(acc, model, loader, loss_fn, cfg):
    optimizer = make_optimizer(model, 1e-3, 0.05)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    before = flat_params(acc.unwrap_model(model)).clone()
    first = next(iter(loader))[0].sum()[None]
    train_one_epoch(model, loader, optimizer, warmup_cosine(optimizer, 1, 10), acc, loss_fn,
                    NullTracker(), LoopState(), "ddp", 1, False)
    after = flat_params(acc.unwrap_model(model))
    per_rank = acc.gather(after[None])  # [world, P]
    firsts = acc.gather(first)  # [world]
    return {"max_rank_diff": (per_rank - per_rank[0]).abs().max().item(),
            "moved": (after - before).abs().max().item(),
            "distinct_batches": bool(firsts.unique().numel() == firsts.numel())}


def main(prepared: str, out: str, config: str) -> None:
    cfg = load_config(config, ["run.device=cpu"])
    acc = make_accelerator(cfg.run)
    prepared = Path(prepared)
    stats = load_stats(prepared / "stats.json")
    records = load_manifest(prepared / "manifest.csv")
    pool = ManifestDataset(select(records, "unlabelled"), stats)
    labelled = ManifestDataset(select(records, "train"), stats)
    report = {"world": acc.num_processes}
    report["pretrain"] = run(acc, build_mim_model(cfg, 5), make_loader(pool, 16, cfg, True, acc.num_processes),
                             lambda m, b: m(b[0])["loss"], cfg)
    clf = create_backbone(cfg.model.backbone, 16, cfg.model.patch_size, 5, num_classes=4)
    ce = torch.nn.CrossEntropyLoss()
    report["finetune"] = run(acc, clf, make_loader(labelled, 16, cfg, True, acc.num_processes),
                             lambda m, b: ce(m(b[0]), b[1]), cfg)
    if acc.is_main_process:
        Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])

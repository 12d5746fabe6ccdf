"""Launched by torchrun in tests: a real 2-process gloo run of training steps for each objective and head.

Writes (rank 0) a JSON report per case: world size, the largest weight difference between ranks after
training, whether weights moved, and whether the ranks saw different data. Cases: MAE on a ViT,
SimMIM on a Swin (data-pipeline masks), BEiT on a BEiT (block-wise masks, a frozen tokenizer), the
VQ-KD tokenizer (its codebook buffers compared too: the library all-reduces their EMA statistics),
and the ViT and Swin classifiers.
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
from pipeline.engine.loaders import make_loader
from pipeline.engine.loop import TrainStep, train_one_epoch
from pipeline.engine.optim import make_optimizer, warmup_cosine
from pipeline.engine.state import LoopState, SeededAugmentation
from pipeline.models.backbones import FAMILIES, create_backbone, create_encoder
from pipeline.models.tokenizer import TeacherFeatures, VisualTokenizer, debug_tokenizer
from pipeline.stages.pretrain import _objective_loss, build_mim_model, mask_fn
from pipeline.tracking.base import NullTracker


def flat_params(model) -> torch.Tensor:
    """Parameters and floating-point buffers (a codebook updated by moving averages is buffers)."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().flatten() for t in (*model.parameters(), *buffers)])


def run(acc, model, loader, loss_fn, cfg):
    optimizer = make_optimizer(model, 1e-3, cfg.pretrain.optimizer)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    before = flat_params(acc.unwrap_model(model)).clone()
    first = next(iter(loader))[0].sum()[None]
    step = TrainStep(model, optimizer, warmup_cosine(optimizer, 1, 10), acc, loss_fn, NullTracker(), "ddp", 1)
    train_one_epoch(step, loader, LoopState())
    after = flat_params(acc.unwrap_model(model))
    per_rank = acc.gather(after[None])  # [world, P]
    firsts = acc.gather(first)  # [world]
    return {"max_rank_diff": (per_rank - per_rank[0]).abs().max().item(),
            "moved": (after - before).abs().max().item(),
            "distinct_batches": bool(firsts.unique().numel() == firsts.numel())}


def main(prepared: str, out: str, config: str) -> None:
    cfg = load_config(config, ["run.device=cpu"])
    swin = load_config(config, ["run.device=cpu", "model.backbone=swin_debug", "model.patch_size=2",
                                "pretrain.objective=simmim"])
    acc = make_accelerator(cfg.run)
    prepared = Path(prepared)
    stats = load_stats(prepared / "stats.json")
    records = load_manifest(prepared / "manifest.csv")
    pool = ManifestDataset(select(records, "unlabelled"), stats)
    labelled = ManifestDataset(select(records, "train"), stats)
    report = {"world": acc.num_processes}
    beit = load_config(config, ["run.device=cpu", "model.backbone=beit_debug", "pretrain.objective=beit"])
    for name, c in (("pretrain", cfg), ("simmim_swin", swin), ("beit", beit)):
        torch.manual_seed(0)  # identical initial weights on both ranks
        grid_encoder = create_encoder("vit_debug", 16, c.model.patch_size, 5)
        model, objective = build_mim_model(c, 5, tokenizer=debug_tokenizer(grid_encoder))
        data = SeededAugmentation(pool, 0, mask_fn(c, model, objective))
        report[name] = run(acc, model, make_loader(data, 16, c, True, acc.num_processes), _objective_loss, c)
    torch.manual_seed(0)
    teacher = TeacherFeatures(create_encoder("vit_debug", 16, 4, 5), FAMILIES["vit"].masked_features, (4, 4))
    tokenizer = VisualTokenizer(create_encoder("vit_debug", 16, 4, 5), "vqkd", 16, 8, teacher.width, 16, 1, 2,
                                teacher=teacher)
    data = SeededAugmentation(pool, 0)
    report["tokenizer"] = run(acc, tokenizer, make_loader(data, 16, cfg, True, acc.num_processes),
                              lambda m, b: m(b[0])["loss"], cfg)
    ce = torch.nn.CrossEntropyLoss()
    for name, backbone, patch in (("finetune", cfg.model.backbone, cfg.model.patch_size), ("swin", "swin_debug", 2)):
        torch.manual_seed(0)
        clf = create_backbone(backbone, 16, patch, 5, num_classes=4)
        report[name] = run(acc, clf, make_loader(labelled, 16, cfg, True, acc.num_processes),
                           lambda m, b: ce(m(b[0]), b[1]), cfg)
    if acc.is_main_process:
        Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])

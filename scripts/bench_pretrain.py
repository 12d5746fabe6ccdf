"""One training step, side by side: mimflow vs its peers, on the same batch.

`--objective` picks the step (default mae). Each arm is a full training step (forward, loss,
backward, optimizer step) on the same random batch (and, for SimMIM and BEiT, the same mask):
  mae       mimflow's MAE step vs transformers' `ViTMAEForPreTraining` (hf, SDPA attention) vs
            lightly's masked ViT + decoder around a timm ViT (lightly, lightly's MAE example with
            the norm-pix target); mask ratio 0.75, per-patch normalised pixel loss
  simmim    mimflow's SimMIM step vs transformers' `ViTForMaskedImageModeling` (hf: SimMIM's
            1x1-convolution + pixel-shuffle head, L1 on the masked pixels); SimMIM's grouped mask
  beit      mimflow's BEiT step vs transformers' `BeitForMaskedImageModeling` (hf, configured as a
            plain ViT: absolute position embeddings, no relative position bias, no layer scale);
            both predict the tokens of the same frozen visual tokenizer (a random vqvae one of the
            `tokenizer:` section's size, built in-process), which each step runs, as BEiT's does
  finetune  mimflow's fine-tuning step (the classifier, optimizer with layer decay and
            label-smoothed cross-entropy of the finetune stage) vs timm's own training step
            (timm.create_model of the same ViT, timm.optim.create_optimizer_v2 with the same
            layer decay, timm.loss.LabelSmoothingCrossEntropy), the same hyperparameters
mimflow's arm is always the stage's step exactly as it runs: the model from `build_mim_model`
(finetune: `build_classifier`), the optimizer from `make_optimizer`, `accelerate` prepare,
`engine.loop.train_one_epoch` over one batch (its non-finite check and loss read-back included).
The pretraining peers use torch AdamW at its defaults (what their users write).
The encoder is the timm ViT `--encoder` (ViT-S: width 384, depth 12, 6 heads). Rounds are
interleaved (the arms' order rotates each round) so that load from other processes falls on all
arms alike; images/s is the median over rounds (spread: min..max). Training FLOPs per image are
counted by torch.utils.flop_counter on one eager forward + backward: matmuls, convolutions and
attention (with formulas for the CPU flash-attention kernel, which torch's counter lacks); the
optimizer's elementwise work is not counted; MFU = achieved FLOP/s over the best fp32 (or --dtype) GEMM throughput
measured in this same run (before and after the rounds). Memory: each arm's peak above its built
model, in a fresh process of its own (CPU: peak RSS over two steps, VmHWM reset once the arm is
built; CUDA: peak allocated), so the arms do not see each other's caches.
Input: whether the stage's input pipeline keeps up with mimflow's step. On a prepared folder
(--loader; default: the demo's, once `make demo` has prepared it) the stage's own training dataset
(decoded-tile cache, normalisation, augmentation to --img, SimMIM/BEiT masks) is read by one
data-loader worker; its images/s is set against the step's, with the workers that keep up.

Usage:
  python scripts/bench_pretrain.py                       # MAE, ViT-S/16, 224 px, batch 16, CPU fp32
  python scripts/bench_pretrain.py --batch 8 --img 112 --rounds 5
  python scripts/bench_pretrain.py --device cuda --dtype bf16 --batch 64
  python scripts/bench_pretrain.py --profile             # + torch.profiler table of mimflow's step
  python scripts/bench_pretrain.py --objective simmim    # or beit, finetune
  python scripts/bench_pretrain.py --loader .mimflow/data/eurosat   # input of another prepared folder
Peers are benchmark-only dependencies: pip install -e '.[bench]'.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pipeline, whichever one the venv was installed from
sys.path.insert(0, str(REPO / "scripts"))  # benchmark_input, when imported (not run) as a module

ARMS = {"mae": ("mimflow", "hf", "lightly"), "simmim": ("mimflow", "hf"), "beit": ("mimflow", "hf"),
        "finetune": ("mimflow", "timm")}  # objective -> its arms
MASK_RATIO = {"mae": 0.75, "simmim": 0.6, "beit": 0.4}  # each objective's own default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objective", default="mae", choices=tuple(ARMS), help="the step to time")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--encoder", default="vit_small", help="mimflow backbone name (timm ViT)")
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the objective's (MAE 0.75, SimMIM 0.6, "
                   "BEiT 0.4)")
    p.add_argument("--classes", type=int, default=10, help="finetune: classes of the head")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (one step per arm each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first (the first counts FLOPs)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--arms", default=None, help="comma-separated (default: all of the objective's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-arm memory processes")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one mimflow step")
    p.add_argument("--loader", default="auto", metavar="DIR",
                   help="a prepared folder (manifest.csv, stats.json) whose input pipeline to time against "
                        "the step; auto: the demo's (.mimflow/data/<name>) if it is there; none: skip")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further config overrides for the mimflow arm, e.g. run.compile=false")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: one arm's memory
    args = p.parse_args(argv)
    if args.mask_ratio is None:
        args.mask_ratio = MASK_RATIO.get(args.objective, 0.0)
    return args


# ---------------------------------------------------------------------------------------- arms
class Arm:
    """name; step(): one full training step; fwd_bwd(): one eager forward + backward (FLOPs)."""

    def __init__(self, name, step, fwd_bwd, detail: str):
        self.name, self.step, self.fwd_bwd, self.detail = name, step, fwd_bwd, detail


def _autocast(args):
    dev = args.device
    return (torch.autocast(dev, dtype=torch.bfloat16) if args.dtype == "bf16"
            else torch.autocast(dev, enabled=False))


class Batch:
    """The one batch every arm trains on: images [B, C, H, W], labels [B], masks [B, h, w] (True =
    masked; SimMIM and BEiT, drawn by mimflow's mask generator, as its data pipeline does) or None."""

    def __init__(self, images, labels, masks):
        self.images, self.labels, self.masks = images, labels, masks

    def as_tuple(self) -> tuple:  # what the data loader gives the stage's loss function
        return (self.images, self.labels) + ((self.masks,) if self.masks is not None else ())


def mimflow_config(args):
    """The config the stage would run with: this geometry and objective, then `--set`."""
    from pipeline.config import load_config

    geometry = [f"model.backbone={args.encoder}", f"model.img_size={args.img}", f"model.patch_size={args.patch}",
                f"run.device={args.device}", *(["run.mixed_precision=bf16"] if args.dtype == "bf16" else [])]
    objective = {
        "mae": ["pretrain.objective.name=mae", f"pretrain.objective.decoder_dim={args.decoder_dim}",
                f"pretrain.objective.decoder_depth={args.decoder_depth}",
                f"pretrain.objective.decoder_heads={args.decoder_heads}", "pretrain.objective.norm_pix_loss=true"],
        "simmim": ["pretrain.objective.name=simmim"],
        # a random vqvae tokenizer of the section's size (no teacher to load); a random codebook
        # (no k-means on a first batch) so that it gives many different tokens
        "beit": ["pretrain.objective.name=beit", "tokenizer.kind=vqvae", "tokenizer.kmeans_init=false"],
        "finetune": [f"finetune.batch_size_per_device={args.batch}"],
    }[args.objective]
    if args.objective != "finetune":
        objective += [f"pretrain.objective.mask_ratio={args.mask_ratio}", f"pretrain.batch_size_per_device={args.batch}"]
    return load_config(None, [*geometry, *objective, *args.set])


def make_batch(args) -> Batch:
    """Seeded: the same batch in the timing process and in each memory process."""
    import numpy as np

    torch.manual_seed(0)
    images = torch.randn(args.batch, args.channels, args.img, args.img, device=args.device)
    labels = torch.randint(0, args.classes, (args.batch,), device=args.device)
    masks, draw = None, mask_draw(args)
    if draw is not None:
        rng = np.random.default_rng(0)
        masks = torch.from_numpy(np.stack([draw(rng) for _ in range(args.batch)])).to(args.device)
    return Batch(images, labels, masks)


def mask_draw(args):
    """The data pipeline's mask generator, rng -> bool [h, w] (SimMIM, BEiT), else None (MAE masks
    inside the model; fine-tuning masks nothing)."""
    if args.objective not in ("simmim", "beit"):
        return None
    from pipeline.models.backbones import FAMILIES, backbone_spec, create_encoder
    from pipeline.models.objectives import OBJECTIVES

    encoder = create_encoder(args.encoder, args.img, args.patch, args.channels)
    return OBJECTIVES[args.objective].mask_generator(mimflow_config(args).pretrain.objective, encoder,
                                                     FAMILIES[backbone_spec(args.encoder).encoder_family], args.img)


def bench_tokenizer(cfg, args) -> torch.nn.Module:
    """BEiT's frozen visual tokenizer as the stage loads one (`build_tokenizer` of the section's
    `architecture`, eval mode, no gradients), randomly initialised: the same weights every call."""
    from pipeline.models.backbones import create_encoder
    from pipeline.models.tokenizer import build_tokenizer
    from pipeline.stages.tokenizer import architecture

    arch = architecture(cfg, args.channels, None)
    torch.manual_seed(1)
    encoder = create_encoder(arch["encoder_backbone"], args.img, args.patch, args.channels)
    return build_tokenizer(encoder, **arch).to(args.device).eval().requires_grad_(False)


def mimflow_model(cfg, args):
    """-> (model, loss_fn(model, batch), optimizer section), as the pretrain or finetune stage builds them."""
    if args.objective == "finetune":
        from pipeline.stages.common import geometry_meta
        from pipeline.stages.finetune import classification_loss
        from pipeline.weights import build_classifier

        meta = {**geometry_meta(cfg, {"channels": [f"band{i}" for i in range(args.channels)]}),
                "num_classes": args.classes, "head": "linear"}
        f = cfg.finetune
        return (build_classifier(meta, drop_path_rate=f.drop_path), classification_loss(f.label_smoothing, None),
                f.optimizer)
    from pipeline.stages.pretrain import _objective_loss, build_mim_model

    tokenizer = bench_tokenizer(cfg, args) if args.objective == "beit" else None
    model, _ = build_mim_model(cfg, args.channels, tokenizer=tokenizer)
    return model, _objective_loss, cfg.pretrain.optimizer


def mimflow_arm(args, batch: Batch) -> Arm:
    """The stage's step: its model, make_optimizer, accelerate prepare and train_one_epoch, as
    `pipeline.engine.fit.fit` wires them."""
    from pipeline.distributed import make_accelerator, set_activation_checkpointing
    from pipeline.engine.fit import compile_step
    from pipeline.engine.loop import TrainStep, train_one_epoch
    from pipeline.engine.optim import make_optimizer, scaled_lr, warmup_cosine
    from pipeline.engine.state import LoopState
    from pipeline.tracking.base import NullTracker

    cfg = mimflow_config(args)
    threads = torch.get_num_threads()
    acc = make_accelerator(cfg.run)  # sets run.cpu_threads for the process: restored for the peers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_fn, opt = mimflow_model(cfg, args)
    set_activation_checkpointing(model, cfg.run.activation_checkpointing)
    optimizer = make_optimizer(model, scaled_lr(opt.base_lr, args.batch), opt)
    model, optimizer = acc.prepare(model, optimizer)
    compiled = compile_step(model, cfg.run)
    scheduler = warmup_cosine(optimizer, 10, 1000)
    prefix = "finetune" if args.objective == "finetune" else "pretrain"
    step = TrainStep(model, optimizer, scheduler, acc, loss_fn, NullTracker(), prefix, log_every=10**9)
    data = batch.as_tuple()
    unwrapped = acc.unwrap_model(model)

    def fwd_bwd():  # the eager form of the same maths (FlopCounterMode counts eager ops)
        from pipeline.models.compiled import CompiledForward

        kept = getattr(unwrapped, "compiled_loss_at", None)  # MAE's compiled step
        forward = unwrapped.__dict__.get("forward")  # any other module's compiled forward
        compiled = forward.compiled if isinstance(forward, CompiledForward) else None
        if kept is not None:
            unwrapped.compiled_loss_at = None
        if compiled is not None:
            forward.compiled = None
        try:
            with _autocast(args):
                loss = loss_fn(unwrapped, data)["loss"]
            loss.backward()
        finally:
            if kept is not None:
                unwrapped.compiled_loss_at = kept
            if compiled is not None:
                forward.compiled = compiled
        unwrapped.zero_grad(set_to_none=True)

    def one_step():  # the stage sets run.cpu_threads once for the process; here for its own steps
        threads = torch.get_num_threads()
        if cfg.run.cpu_threads and args.device == "cpu":
            torch.set_num_threads(cfg.run.cpu_threads)
        try:
            train_one_epoch(step, [data], LoopState())
        finally:
            torch.set_num_threads(threads)

    fast = getattr(unwrapped, "fast", None)
    detail = (f"{type(unwrapped).__name__}, " + (f"fast form {'on' if fast else 'off'}, " if fast is not None else "")
              + f"torch.compile {'on' if compiled else 'off'}, run.cpu_threads={cfg.run.cpu_threads}, "
              f"{type(optimizer.optimizer if hasattr(optimizer, 'optimizer') else optimizer).__name__} "
              f"({_optimizer_impl(optimizer)}, {len(optimizer.param_groups)} groups)")
    return Arm("mimflow", one_step, fwd_bwd, detail)


def _optimizer_impl(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)
    d = inner.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


def _peer_step(model, loss_fn, args, optimizer=None):
    """A peer's plain step; optimizer None: torch AdamW at its defaults (what its users write)."""
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4,
                                      weight_decay=0.05)

    def step():
        with _autocast(args):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def fwd_bwd():
        with _autocast(args):
            loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step, fwd_bwd, f"torch AdamW ({_optimizer_impl(optimizer)})"


def _hf_geometry(args, vit) -> dict:
    """The timm ViT's geometry as a transformers config's keywords."""
    return dict(hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks),
                num_attention_heads=vit.blocks[0].attn.num_heads, intermediate_size=vit.blocks[0].mlp.fc1.out_features,
                image_size=args.img, patch_size=args.patch, num_channels=args.channels, layer_norm_eps=1e-6,
                attn_implementation="sdpa")


def hf_arm(args, batch: Batch, vit) -> Arm:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    images = batch.images
    cfg = ViTMAEConfig(**_hf_geometry(args, vit), decoder_hidden_size=args.decoder_dim,
                       decoder_num_hidden_layers=args.decoder_depth, decoder_num_attention_heads=args.decoder_heads,
                       decoder_intermediate_size=4 * args.decoder_dim, mask_ratio=args.mask_ratio,
                       norm_pix_loss=True)
    model = ViTMAEForPreTraining(cfg).to(args.device).train()
    step, fwd_bwd, opt = _peer_step(model, lambda: model(pixel_values=images).loss, args)
    return Arm("hf", step, fwd_bwd, f"ViTMAEForPreTraining, attention {model.config._attn_implementation}, {opt}")


def hf_simmim_arm(args, batch: Batch, vit) -> Arm:
    """transformers' SimMIM: ViT with a mask token, 1x1 conv + pixel shuffle, L1 on the masked pixels."""
    from transformers import ViTConfig, ViTForMaskedImageModeling

    cfg = ViTConfig(**_hf_geometry(args, vit), encoder_stride=args.patch, qkv_bias=True)
    model = ViTForMaskedImageModeling(cfg).to(args.device).train()
    masked = batch.masks.flatten(1)  # [B, L]
    step, fwd_bwd, opt = _peer_step(model, lambda: model(pixel_values=batch.images, bool_masked_pos=masked).loss, args)
    return Arm("hf", step, fwd_bwd, f"ViTForMaskedImageModeling, attention {model.config._attn_implementation}, {opt}")


def hf_beit_arm(args, batch: Batch, vit) -> Arm:
    """transformers' BEiT as a plain ViT (absolute position embeddings, no relative position bias,
    no layer scale: mimflow's BEiT on a timm ViT), predicting the same tokenizer's tokens."""
    from transformers import BeitConfig, BeitForMaskedImageModeling

    tokenizer = bench_tokenizer(mimflow_config(args), args)
    cfg = BeitConfig(**_hf_geometry(args, vit), vocab_size=tokenizer.codebook_size, use_mask_token=True,
                     use_absolute_position_embeddings=True, use_relative_position_bias=False,
                     use_shared_relative_position_bias=False, layer_scale_init_value=0.0, drop_path_rate=0.0)
    model = BeitForMaskedImageModeling(cfg).to(args.device).train()
    masked = batch.masks.flatten(1)  # [B, L]

    def loss():  # the tokens come from the frozen tokenizer every step, as in BEiT's own loop
        labels = tokenizer.tokenize(batch.images).flatten(1)[masked]  # [N_masked]
        return model(pixel_values=batch.images, bool_masked_pos=masked, labels=labels).loss

    step, fwd_bwd, opt = _peer_step(model, loss, args)
    return Arm("hf", step, fwd_bwd, f"BeitForMaskedImageModeling, attention {model.config._attn_implementation}, "
                                    f"{tokenizer.codebook_size} tokens, {opt}")


def timm_arm(args, batch: Batch) -> Arm:
    """timm's own fine-tuning step (its train.py without mixup): create_model, create_optimizer_v2
    with layer decay, LabelSmoothingCrossEntropy; the finetune stage's hyperparameters."""
    import timm
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2

    from pipeline.engine.optim import scaled_lr
    from pipeline.models.backbones import backbone_spec

    f = mimflow_config(args).finetune
    variant = backbone_spec(args.encoder).variants[args.encoder]
    torch.manual_seed(0)
    model = timm.create_model(variant.arch, pretrained=False, **variant.overrides, img_size=args.img,
                              patch_size=args.patch, in_chans=args.channels, num_classes=args.classes,
                              drop_path_rate=f.drop_path, global_pool="token").to(args.device).train()
    o = f.optimizer
    optimizer = create_optimizer_v2(model, opt=o.name, lr=scaled_lr(o.base_lr, args.batch),
                                    weight_decay=o.weight_decay, layer_decay=o.layer_decay, betas=tuple(o.betas))
    criterion = LabelSmoothingCrossEntropy(smoothing=f.label_smoothing)
    step, fwd_bwd, opt = _peer_step(model, lambda: criterion(model(batch.images), batch.labels), args, optimizer)
    return Arm("timm", step, fwd_bwd, f"{variant.arch} (timm.create_model), create_optimizer_v2 layer_decay "
                                      f"{o.layer_decay} ({len(optimizer.param_groups)} groups), "
                                      f"LabelSmoothingCrossEntropy({f.label_smoothing}), {opt}")


def lightly_arm(args, batch: Batch, vit) -> Arm:
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

    class LightlyMAE(torch.nn.Module):  # lightly's MAE example (examples/pytorch/mae.py), norm-pix target
        def __init__(self):
            super().__init__()
            self.patch_size = vit.patch_embed.patch_size[0]
            self.backbone = MaskedVisionTransformerTIMM(vit=vit)
            self.sequence_length = self.backbone.sequence_length
            self.decoder_embed = torch.nn.Linear(vit.embed_dim, args.decoder_dim)
            self.decoder = MaskedVisionTransformerDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, embed_dim=args.decoder_dim,
                depth=args.decoder_depth, num_heads=args.decoder_heads)
            self.decoder_pred = torch.nn.Linear(args.decoder_dim, self.patch_size**2 * args.channels)

        def forward(self, x):
            B = x.shape[0]
            idx_keep, idx_mask = utils.random_token_mask(size=(B, self.sequence_length),
                                                         mask_ratio=args.mask_ratio, device=x.device)
            enc = self.backbone.encode(images=x, idx_keep=idx_keep)
            dec = self.decoder_embed(enc)
            tokens = utils.repeat_token(self.decoder.mask_token, (B, self.sequence_length))
            tokens = utils.set_at_index(tokens, idx_keep, dec.type_as(tokens))
            tokens = self.decoder.decode(self.decoder.add_pos_embed(tokens))
            pred = self.decoder_pred(utils.get_at_index(tokens, idx_mask))
            target = utils.get_at_index(utils.patchify(x, self.patch_size), idx_mask - 1)
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
            return torch.nn.functional.mse_loss(pred, target)

    images = batch.images
    model = LightlyMAE().to(args.device).train()
    step, fwd_bwd, opt = _peer_step(model, lambda: model(images), args)
    return Arm("lightly", step, fwd_bwd, f"MaskedVisionTransformerTIMM + MaskedVisionTransformerDecoderTIMM, {opt}")


PEERS = {("mae", "hf"): hf_arm, ("mae", "lightly"): lightly_arm, ("simmim", "hf"): hf_simmim_arm,
         ("beit", "hf"): hf_beit_arm}  # (objective, arm) -> builder(args, batch, the timm ViT)


def build_arm(name: str, args, batch: Batch) -> Arm:
    if name == "mimflow":
        return mimflow_arm(args, batch)
    if args.objective == "finetune":
        return {"timm": timm_arm}[name](args, batch)
    from pipeline.models.backbones import create_encoder

    torch.manual_seed(0)
    vit = create_encoder(args.encoder, args.img, args.patch, args.channels).to(args.device)
    return PEERS[(args.objective, name)](args, batch, vit)


# ------------------------------------------------------------------------------------ measures
def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def gemm_flops(args, seconds: float = 1.0) -> tuple[float, int]:
    """Best square-GEMM throughput in FLOP/s over a few sizes -> (flop/s, size)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    best = (0.0, 0)
    for n in ((1024, 2048, 3072) if args.device == "cpu" else (4096, 8192)):
        a = torch.randn(n, n, device=args.device, dtype=dtype)
        b = torch.randn(n, n, device=args.device, dtype=dtype)
        a @ b
        sync(args)
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or k < 2:
            a @ b
            k += 1
        sync(args)
        best = max(best, (2 * n**3 * k / (time.perf_counter() - t0), n))
    return best


def _cpu_attention_flops() -> dict:
    """FLOP formulas for the CPU flash-attention kernel, forward and backward, which torch's counter
    (2.14) leaves out: without them every arm's attention (~6 % of MAE's training FLOPs at ViT-S/16)
    counted as free. The same counts torch uses for its CUDA kernels (sdpa_flop_count and
    sdpa_backward_flop_count: the two batched matmuls each way, 4 in the backward)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(arm: Arm) -> tuple[int, int]:
    """-> (training FLOPs of one forward + backward, of which attention's)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        arm.fwd_bwd()
    attention = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    return counter.get_total_flops(), attention


def timed(arm: Arm, args) -> float:
    sync(args)
    t0 = time.perf_counter()
    arm.step()
    sync(args)
    return time.perf_counter() - t0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM, since the last reset). Not getrusage's ru_maxrss: a
    process started by subprocess inherits its parent's peak there (the exec records the old
    address space's), so it read as the whole benchmark's memory, not the arm's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """VmHWM := the current RSS (Linux >= 4.0), so that building the arm does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_of(name: str, args) -> dict:
    """In this (fresh) process: one arm's peak memory above its built model, over two steps."""
    arm = build_arm(name, args, make_batch(args))
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        arm.step(), arm.step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "kind": "peak allocated above the weights"}
    base = rss_bytes()
    reset_peak_rss()
    arm.step(), arm.step()
    return {"peak_bytes": peak_rss_bytes() - base, "kind": "peak RSS above the built model"}


def memory_in_subprocess(name: str, argv: list[str]) -> dict | None:
    cmd = [sys.executable, __file__, *argv, "--memory-of", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    print(f"  memory of {name}: failed ({proc.stderr.strip().splitlines()[-1:] })")
    return None


def profile_table(arm: Arm, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        arm.step()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ------------------------------------------------------------------------------- input pipeline
def default_prepared() -> Path:
    """Where `make demo` (`mimflow run` at the defaults) prepares its data: <data.root>/<data.name>."""
    from pipeline.config import load_config

    data = load_config(None, []).data
    return REPO / data.root / data.name


def loader_rate(args, prepared: Path, seconds: float = 3.0, rounds: int = 2) -> dict:
    """The stage's input pipeline on a prepared folder, with the decoded-tile cache: images/s of
    ONE data-loader worker. The dataset is the stage's own (`make_dataset`: the cached reader,
    normalisation, the training augmentation resized to --img, and, for SimMIM/BEiT, the mask
    drawn per sample by `SeededAugmentation`), read by a num_workers=0 DataLoader, shuffled, at
    --batch, with torch on one thread as in a worker. The cache is built in a temporary folder
    first (timed: the first epoch's decode). Best of `rounds` time boxes of `seconds`."""
    import shutil
    import tempfile

    from benchmark_input import images_per_s  # scripts/: the same time-boxed loader loop

    from pipeline.data.cache import cached_reader
    from pipeline.data.manifest import load_manifest, select
    from pipeline.data.stats import load_stats
    from pipeline.engine.state import SeededAugmentation
    from pipeline.stages.common import make_dataset

    cfg = mimflow_config(args)
    records = load_manifest(prepared / "manifest.csv")
    split = "train" if args.objective == "finetune" else "unlabelled"
    pool = select(records, split) or select(records, "train")  # the pretrain stage's pool rule
    stats = load_stats(prepared / "stats.json")
    threads = torch.get_num_threads()
    root = Path(tempfile.mkdtemp(prefix="mimflow-bench-cache-"))
    try:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        read_fn = cached_reader(pool, root, reader_options=cfg.data.reader_options, quiet=True)
        build = len(pool) / (time.perf_counter() - t0)
        dataset = SeededAugmentation(make_dataset(cfg, pool, stats, train=True, img_size=args.img, read_fn=read_fn),
                                     cfg.run.seed, mask_draw(args))
        best = max(images_per_s(dataset, args.batch, seconds) for _ in range(rounds))
        first = read_fn(pool[0])  # the pool as stored: what the line names
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    return {"rate": best, "build": build, "pool": len(pool), "split": pool[0].split, "shape": tuple(first.shape),
            "dtype": str(first.dtype), "name": prepared.name, "num_workers": cfg.run.num_workers,
            "masks": args.objective in ("simmim", "beit")}


def input_lines(info: dict, step_rate: float, args) -> list[str]:
    """Whether the input keeps up with the step: workers needed, and what loading in the training
    process (run.num_workers=0) adds to each step."""
    r = info["rate"]
    need = max(1, -(-step_rate // r)) if r else float("inf")
    c, h, w = info["shape"]
    return [
        f"input: {info['name']}, {info['pool']:,} {info['split']} tiles {info['dtype']} [{c}, {h}, {w}] -> "
        f"{args.img} px, the stage's dataset (decoded-tile cache, normalise, augment"
        f"{', masks' if info['masks'] else ''}), one worker (1 thread):",
        f"  loader {r:,.1f} img/s per worker vs mimflow's step {step_rate:.2f} img/s: {r / step_rate:,.1f}x; "
        f"{int(need)} worker(s) keep up",
        f"  at run.num_workers={info['num_workers']}"
        + (f" (loading in the training process) each step also waits for its batch: +{100 * step_rate / r:.1f}% "
           f"of the step's time" if info["num_workers"] == 0 else
           f": {info['num_workers'] * r:,.0f} img/s of input, "
           + ("keeps up" if info["num_workers"] * r >= step_rate else "does NOT keep up: raise run.num_workers")),
        f"  cache build (first epoch: decode + write shards): {info['build']:,.0f} img/s",
    ]


# ---------------------------------------------------------------------------------------- main
def describe(args) -> str:
    if args.objective == "mae":
        return (f"decoder {args.decoder_dim} wide x {args.decoder_depth} deep x {args.decoder_heads} heads, "
                f"mask {args.mask_ratio}, norm-pix loss, AdamW")
    if args.objective == "simmim":
        return f"mask {args.mask_ratio} (SimMIM's grouped mask), L1 loss on the masked pixels, AdamW"
    if args.objective == "beit":
        t = mimflow_config(args).tokenizer
        return (f"mask {args.mask_ratio} (BEiT's block-wise mask), tokenizer {t.encoder} + {t.codebook_size} codes "
                f"(random, frozen), cross-entropy on the masked tokens, AdamW")
    f = mimflow_config(args).finetune
    return (f"{args.classes} classes, drop path {f.drop_path}, label smoothing {f.label_smoothing}, "
            f"{f.optimizer.name} with layer decay {f.optimizer.layer_decay}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args)))
        return 0
    prepared = prepared_folder(args)
    names = [a for a in (args.arms or ",".join(ARMS[args.objective])).split(",") if a]
    unknown = set(names) - set(ARMS[args.objective])
    if unknown:
        raise SystemExit(f"--arms {args.arms}: {args.objective} has the arms {', '.join(ARMS[args.objective])}")
    print(f"bench_pretrain {args.objective}: {args.encoder} (timm) {args.img} px, patch {args.patch}, "
          f"{args.channels} channels, {describe(args)}, {args.dtype}, batch {args.batch}, {args.device}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    gemm = [gemm_flops(args)]

    batch = make_batch(args)
    arms = {}
    for name in names:
        t0 = time.perf_counter()
        arms[name] = build_arm(name, args, batch)
        print(f"  {name:8s} built in {time.perf_counter() - t0:5.1f} s: {arms[name].detail}", flush=True)

    flops, attention, first = {}, {}, {}
    for name, arm in arms.items():
        flops[name], attention[name] = count_flops(arm)
        for i in range(args.warmup):
            t = timed(arm, args)
            first.setdefault(name, t)
        print(f"  {name:8s} warm: first step {first.get(name, float('nan')):6.2f} s "
              f"(compilation included where there is one)", flush=True)

    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(arms[name], args))
        print(f"  round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    gemm.append(gemm_flops(args))
    peak, peak_n = max(gemm)

    if args.profile and "mimflow" in arms:
        print("\nmimflow step, torch.profiler (one step):")
        print(profile_table(arms["mimflow"]))
    memory = {} if args.no_memory else {n: memory_in_subprocess(n, argv) for n in names}

    print(f"\nbest {args.dtype} GEMM: {peak / 1e9:.1f} GFLOP/s ({peak_n}^3; before rounds "
          f"{gemm[0][0] / 1e9:.1f}, after {gemm[1][0] / 1e9:.1f})")
    head = f"{'arm':8s} {'img/s':>7s} {'spread':>13s} {'step s':>7s} {'GFLOP/img':>10s} {'GFLOP/s':>8s} {'MFU':>5s} {'peak MB':>8s}"
    print(head)
    rate = {}
    for name in names:
        per = [args.batch / t for t in times[name]]
        rate[name] = statistics.median(per)
        f_img = flops[name] / args.batch
        achieved = f_img * rate[name]
        mem = memory.get(name)
        print(f"{name:8s} {rate[name]:7.2f} {min(per):6.2f}..{max(per):<6.2f} {statistics.median(times[name]):7.2f} "
              f"{f_img / 1e9:10.2f} {achieved / 1e9:8.1f} {achieved / peak:5.2f} "
              f"{(mem['peak_bytes'] / 2**20 if mem else float('nan')):8.0f}")
    if "mimflow" in rate:
        for peer in [n for n in names if n != "mimflow"]:
            print(f"mimflow / {peer}: {rate['mimflow'] / rate[peer]:.2f}x images/s")
        ref = max((n for n in names if n != "mimflow"), key=lambda n: flops[n], default=None)
        if ref:
            useful = flops[ref] / args.batch * rate["mimflow"]
            print(f"mimflow at the reference maths' FLOPs ({ref}: {flops[ref] / args.batch / 1e9:.2f} GFLOP/img): "
                  f"{useful / 1e9:.1f} GFLOP/s, MFU {useful / peak:.2f}")
    print("GFLOP/img: matmuls, convolutions and attention, forward + backward (torch.utils.flop_counter); attention "
          + ", ".join(f"{n} {attention[n] / args.batch / 1e9:.2f}" for n in names))
    if memory:
        kinds = {m["kind"] for m in memory.values() if m}
        print(f"peak MB: {', '.join(kinds)} (one fresh process per arm)")
    if "mimflow" in rate and prepared is not None:
        print("\n".join(input_lines(loader_rate(args, prepared), rate["mimflow"], args)))
    elif "mimflow" in rate and args.loader == "auto":
        print(f"input: not timed: no prepared data at {default_prepared()} (run `make demo`, or pass --loader DIR)")
    return 0


def prepared_folder(args) -> Path | None:
    """--loader -> the prepared folder to time, or None (none; auto without the demo's data).
    Raises SystemExit for a --loader DIR that is not a prepared folder (checked before any timing)."""
    if args.loader == "none":
        return None
    prepared = default_prepared() if args.loader == "auto" else Path(args.loader)
    if (prepared / "manifest.csv").is_file() and (prepared / "stats.json").is_file():
        return prepared
    if args.loader == "auto":
        return None
    raise SystemExit(f"--loader {args.loader}: not a prepared folder (needs manifest.csv and stats.json; "
                     f"`mimflow prepare` writes one)")


if __name__ == "__main__":
    sys.exit(main())

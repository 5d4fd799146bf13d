"""
Supervised training, MultiCrafter stages 1-2 (and the toy world's stage 0).

  stage base    toy only: train the whole toy DiT + byte text encoder on text -> image (stands in for FLUX
                pretraining; its output folder is a toy checkpoint that sample.py and the next stages load)
  stage single  frozen base + adapters, single-subject data, L = L_diff
  stage multi   frozen base + adapters (LoRA + MoE-LoRA), L = L_diff + lambda L_attn  (+ alpha SCAL + beta MDL,
                + balance), MultiCrafter Eq. 5-6 / MOSAIC

    python data.py toy --out data/toy --n 2000 && python data.py toy --out data/toy_val --n 200 --seed 1
    python train_sft.py --stage base --data data/toy/manifest.jsonl --out runs/base --steps 3000
    python train_sft.py --stage multi --init runs/base/latest --data data/toy/manifest.jsonl --out runs/multi
    torchrun --nproc_per_node=2 train_sft.py --stage multi ...               # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 train_sft.py --preset flux-dev --stage multi --data my/manifest.jsonl \\
        --size 512 --ref-size 320 --rank 512 --lr 3e-5 --lr-end 1e-5 --grad-checkpoint --zero
"""
import argparse
import datetime
import json
import os
import pickle
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import data as D
import losses as LS
import model as M
import moe_lora as ML

def add_model_args(p):
    # the base model and its adapters: shared with train_rl.py
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="toy", choices=sorted(M.CONFIGS))
    g.add_argument("--init", default=None, help="toy: a checkpoint folder (flux/text_encoder.safetensors); "
                   "flux: a DiT .safetensors or repo id (default: the preset's official repo)")
    g.add_argument("--adapter", default=None, help="start from this adapter (e.g. stage single's, for multi)")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward")
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (paper: 512)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank, i.e. scale 1)")
    g.add_argument("--experts", type=int, default=4, help="MoE-LoRA experts (0: plain LoRA on the FFNs too)")
    g.add_argument("--top-k", type=int, default=1)
    g.add_argument("--gate", default="st", choices=["st", "switch", "paper"])
    g.add_argument("--lora-targets", nargs="*", default=list(ML.DEFAULT_LORA))
    g.add_argument("--moe-targets", nargs="*", default=list(ML.DEFAULT_MOE))

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="manifest.jsonl (or UNO JSON list)")
    g.add_argument("--cache", default=None, help="instead of --data: a `data.py cache` folder (text embeddings and "
                   "latents precomputed: no text encoder or VAE in memory)")
    g.add_argument("--val-data", default=None, help="held-out manifest (a cache folder with --cache): Dice and "
                   "attention share at eval steps")
    g.add_argument("--size", type=int, default=None, help="target side in px (default: 32 toy, 512 flux)")
    g.add_argument("--ref-size", type=int, default=None, help="reference side in px (default: 16 toy, 320 flux)")
    g.add_argument("--aspect-buckets", action="store_true", help="UNO's 11 aspect buckets at --size instead of "
                   "square targets (each batch from one bucket)")
    add_model_args(p)
    g = p.add_argument_group("losses")
    g.add_argument("--stage", default="multi", choices=["base", "single", "multi"])
    g.add_argument("--lambda-attn", type=float, default=0.3, help="Dice attention loss weight (paper 0.3)")
    g.add_argument("--attn-blocks", type=int, nargs="*", default=None, help="double blocks probed (default all)")
    g.add_argument("--scal", type=float, default=0.0, help="MOSAIC SCAL weight (MOSAIC: 0.1)")
    g.add_argument("--mdl", type=float, default=0.0, help="MOSAIC MDL weight (MOSAIC: 1 after its warm-up)")
    g.add_argument("--mdl-kind", default="kl", choices=["kl", "js"])
    g.add_argument("--mdl-warmup", type=int, nargs=2, default=[0, 0], metavar=("START", "RAMP"),
                   help="MDL weight 0 until START, then linear to 1 over RAMP steps (MOSAIC: 10000 1000)")
    g.add_argument("--balance", type=float, default=0.0, help="MoE load-balance loss weight (e.g. 1e-3)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=16, help="per rank, per micro-step")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=None, help="default: 1e-3 base, 1e-4 adapters (paper 3e-5)")
    g.add_argument("--lr-end", type=float, default=None, help="linear decay to this (default lr/3, paper 1e-5)")
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--zero", action="store_true", help="shard optimizer states across ranks (ZeRO-1)")
    g.add_argument("--max-bad-steps", type=int, default=20, help="stop after this many non-finite steps in a row")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True)
    g.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ckpt-every", type=int, default=500)
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    g.add_argument("--eval-every", type=int, default=250)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--device", default=None)
    g.add_argument("--dist-timeout", type=float, default=600, help="seconds a rank waits for the others in a "
                   "collective before the job stops (a dead or hung rank; rank 0 also writes checkpoints meanwhile)")
    return p

# -----------------------------------------------------------------------------
# distributed setup: one code path for `python` and `torchrun`

def setup_dist(device_arg, timeout_s):
    """-> (ddp, rank, world size, device). A collective that waits longer than timeout_s (a rank died or hangs)
    raises on the ranks still waiting, so torchrun ends the job instead of it hanging forever."""
    ddp = "RANK" in os.environ
    if ddp:
        rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
    else:
        rank, world = 0, 1
        device = torch.device(device_arg) if device_arg else M.default_device()
    return ddp, rank, world, device

def print0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, file=sys.stderr)

class TrainingError(RuntimeError):
    """A run that cannot go on (it diverged): the message says why; the last checkpoint is intact."""

class BadSteps:
    """Skips an update whose gradient norm is NaN or inf (every rank sees the same, all-reduced norm) and counts
    it; `limit` of them in a row stop the run with a TrainingError, its last checkpoint untouched."""
    def __init__(self, limit):
        self.limit, self.total, self.in_row = limit, 0, 0

    def ok(self, grad_norm, where):
        if torch.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.total, self.in_row = self.total + 1, self.in_row + 1
        print0(f"{where}: non-finite gradient, update skipped ({self.total} so far, {self.in_row} in a row)")
        if self.in_row >= self.limit:
            raise TrainingError(f"{where}: {self.in_row} non-finite gradients in a row (--max-bad-steps): stopped; "
                                f"the last checkpoint is intact (try a lower --lr, or check the data, then --resume)")
        return False

# -----------------------------------------------------------------------------
# models

def build_models(args, device):
    """(flux, ae, text encoder, trainable params, adapter config or None); with --cache no ae or text encoder."""
    cfg = M.get_config(args.preset)
    if args.cache and args.stage == "base":
        raise D.InputError("--stage base trains the text encoder: it cannot read precomputed text embeddings")
    wdtype = torch.bfloat16 if device.type == "cuda" else torch.float32     # frozen weights
    if args.preset == "toy":
        torch.manual_seed(args.seed)                         # the base stage's random init, same on every rank
        flux, text = M.Flux(cfg), M.ByteTextEncoder(cfg)
        if args.init:
            M.load_state_dict_strict(flux, os.path.join(args.init, "flux.safetensors"))      # fp32 (assets/toy: fp16)
            M.load_state_dict_strict(text, os.path.join(args.init, "text_encoder.safetensors"))
        elif args.stage != "base":
            raise M.CheckpointError("--init: adapter stages need a trained toy base (a --stage base output folder)")
        ae = M.AutoEncoder(cfg.ae)
    else:
        if args.stage == "base":
            raise D.InputError("--stage base trains the toy preset only (FLUX is the base at full scale)")
        flux = M.load_flux(cfg, args.init, device, wdtype)
        # with a cache the 9 GB T5 and the VAE are never loaded
        ae = None if args.cache else M.load_ae(cfg, device=device, dtype=wdtype)
        text = None if args.cache else M.T5CLIPEncoder(cfg.max_txt_len, dtype=wdtype)
    if args.cache:                                            # the toy's encoders are unused too
        ae = text = None
    flux = flux.to(device)
    text = text and text.to(device)
    ae = ae and ae.to(device).requires_grad_(False)
    flux.grad_checkpoint = args.grad_checkpoint
    if args.stage == "base":
        return flux, ae, text, list(flux.parameters()) + list(text.parameters()), None
    if text is not None:
        text.requires_grad_(False)
    if args.adapter:
        acfg = ML.load_adapter(flux, args.adapter)
    else:
        moe = args.moe_targets if args.experts > 0 else []
        lora = args.lora_targets + ([] if args.experts > 0 else args.moe_targets)
        acfg = ML.inject(flux, lora, moe, args.rank, args.alpha, max(args.experts, 1), args.top_k, args.gate)
    flux.to(device)                                           # new adapter tensors onto the device, fp32
    return flux, ae, text, [p for p in flux.parameters() if p.requires_grad], acfg

def build_optimizer(params, lr, weight_decay, zero=False):
    # AdamW, no decay on biases and norms; zero: ZeRO-1, optimizer states sharded across ranks
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(groups, torch.optim.AdamW, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))

class Denoiser(torch.nn.Module):
    """What one training forward runs, and what DDP wraps: prompts through the text encoder (trained in the
    base stage, frozen after), then the DiT. Frozen parameters are never synchronized by DDP."""
    def __init__(self, flux, text):
        super().__init__()
        self.flux, self.text = flux, text

    def forward(self, cond, img, img_ids, t, guidance, ref_img, ref_img_ids, probe=None):
        # cond: the prompts, or (txt, y) precomputed by `data.py cache` (then there is no text encoder)
        txt, y = self.text(cond) if self.text is not None else cond               # (B, L_txt, C), (B, C_vec)
        txt_ids = torch.zeros(txt.shape[0], txt.shape[1], 3, device=img.device)
        return self.flux(img, img_ids, txt, txt_ids, t, y, guidance, ref_img, ref_img_ids, probe=probe)

def conditioning(batch, denoiser, device):
    # what Denoiser.forward takes as cond: prompts, or a cache's text embeddings
    if denoiser.text is not None:
        return batch["prompts"]
    return batch["txt"].to(device).float(), batch["y"].to(device).float()

@torch.no_grad()
def encode_images(batch, ae, device):
    """Target and references (or a cache's latents) -> packed latents (B, L, C), position ids, UNO ref ids."""
    if ae is None:
        x0, B, N = batch["latent"].to(device).float(), *batch["ref_latents"].shape[:2]
        refs = batch["ref_latents"].to(device).flatten(0, 1).float()
    else:
        with M.autocast(device):
            x0 = ae.encode(batch["target"].to(device)).float()                    # (B, z, h, w)
            B, N = batch["refs"].shape[:2]
            refs = ae.encode(batch["refs"].to(device).flatten(0, 1)).float()      # (B*N, z, r, r)
    h, w, r = x0.shape[2] // 2, x0.shape[3] // 2, refs.shape[2] // 2               # token grids
    refs = refs.unflatten(0, (B, N))
    return M.pack(x0), dict(img_ids=M.grid_ids(h, w, batch=B, device=device),
                            ref_img=[M.pack(refs[:, i]) for i in range(N)],
                            ref_img_ids=M.ref_ids((h, w), [(r, r)] * N, batch=B, device=device))

# -----------------------------------------------------------------------------
# one micro-step: every loss term

def step_losses(args, model, denoiser, ae, batch, step, gen, device, stage):
    flux = denoiser.flux
    x0, enc = encode_images(batch, ae, device)
    B, L = x0.shape[:2]
    t = LS.sample_timesteps(B, L, flux.cfg.shift_schedule, generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    if stage == "base":                                      # text -> image, no references
        enc.update(ref_img=None, ref_img_ids=None)
    use_probe = stage == "multi" and (args.lambda_attn > 0 or args.scal > 0 or args.mdl > 0)
    probe = M.AttentionProbe(args.attn_blocks, rows=[p[:, :2] for p in batch["points"]] if args.scal > 0 else None) \
        if use_probe else None
    g = torch.full((B,), 1.0, device=device) if flux.cfg.guidance_embed else None   # UNO trains with guidance 1
    with M.autocast(device):
        terms = {"diff": LS.flow_matching_loss(
            lambda x_t, tt: model(conditioning(batch, denoiser, device), x_t, enc["img_ids"], tt, g, enc["ref_img"],
                                  enc["ref_img_ids"], probe=probe), x0, t, noise)}
    loss = terms["diff"]
    if probe is not None:
        maps, masks = probe.mean_map(), batch["masks"].to(device)                  # (B, N, L_img) each
        terms["dice"] = LS.dice_loss(maps, masks, batch["mask_valid"].to(device))
        loss = loss + args.lambda_attn * terms["dice"]
        if args.scal > 0:
            terms["scal"] = LS.scal_loss(probe.mean_logp(), [p[:, 2].to(device) for p in batch["points"]])
            loss = loss + args.scal * terms["scal"]
        if args.mdl > 0:
            terms["mdl"] = LS.mdl_loss(maps, kind=args.mdl_kind)
            loss = loss + args.mdl * LS.mosaic_warmup(step, *args.mdl_warmup) * terms["mdl"]
    moes = [m for _, m in ML.adapters(flux) if isinstance(m, ML.MoELoRALinear)]
    if args.balance > 0 and moes:
        terms["balance"] = sum(LS.balance_loss(m.last_probs, m.last_idx, m.E) for m in moes) / len(moes)
        loss = loss + args.balance * terms["balance"]
    return loss, terms

@torch.no_grad()
def evaluate(args, denoiser, ae, dataset, device, t_eval=0.5, max_batches=8):
    """Held-out Dice and attention share (mass of each subject's map inside its own mask, and inside the
    other subjects' masks) at a fixed noise level: did L_attn localize attention where it should?"""
    denoiser.eval()
    sums, n = {"dice": 0.0, "share_own": 0.0, "share_other": 0.0, "diff": 0.0}, 0
    gen = torch.Generator().manual_seed(1234)
    for idx in D.batches(dataset, args.batch_size, seed=0, epoch=0, drop_last=False)[:max_batches]:
        batch = D.collate([dataset[i] for i in idx])
        x0, enc = encode_images(batch, ae, device)
        B, N = batch["masks"].shape[:2]
        t = torch.full((B,), t_eval, device=device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        probe = M.AttentionProbe(args.attn_blocks)
        g = torch.full((B,), 1.0, device=device) if denoiser.flux.cfg.guidance_embed else None
        with M.autocast(device):
            pred = denoiser(conditioning(batch, denoiser, device), (1 - t_eval) * x0 + t_eval * noise, enc["img_ids"],
                            t, g, enc["ref_img"], enc["ref_img_ids"], probe=probe)
        maps, masks = probe.mean_map().float(), batch["masks"].to(device)
        own = (maps * masks).sum(-1)                                                    # (B, N)
        other = (maps * (masks.sum(1, keepdim=True) - masks).clamp(0, 1)).sum(-1)
        sums["dice"] += LS.dice_loss(maps, masks, batch["mask_valid"].to(device)).item() * B
        sums["share_own"] += own.mean(1).sum().item()
        sums["share_other"] += other.mean(1).sum().item()
        sums["diff"] += (pred.float() - (noise - x0)).pow(2).mean().item() * B
        n += B
    denoiser.train()
    return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}

# -----------------------------------------------------------------------------
# checkpoints: a folder per checkpoint, written under a temporary name and renamed into place

def save_checkpoint(out, step, flux, text, acfg, opt, args, keep, consumed):
    """OUT/ckpt-STEP: the weights (whole toy model in the base stage, else the adapter), the optimizer state, the data
    position `consumed` (global micro-batches for train_sft, prompts for train_rl) and the number of ranks."""
    name, tmp = f"ckpt-{step:07d}", os.path.join(out, f".tmp-ckpt-{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from safetensors.torch import save_file
    if acfg is None:                      # base stage: the whole toy model, in sample.py's toy-folder format
        save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, os.path.join(tmp, "flux.safetensors"))
        save_file({k: v.contiguous() for k, v in text.state_dict().items()},
                  os.path.join(tmp, "text_encoder.safetensors"))
    else:
        ML.save_adapter(flux, os.path.join(tmp, "adapter.safetensors"), acfg, {"step": str(step)})
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.save({"step": step, "consumed": consumed, "world": world, "optimizer": opt.state_dict()},
               os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    os.replace(tmp, os.path.join(out, name))                 # the folder appears whole or not at all
    # OUT/latest: a symlink to the newest folder, swapped atomically ("runs/base/latest" in the commands above)
    link = os.path.join(out, ".latest.tmp")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(name, link)
    os.replace(link, os.path.join(out, "latest"))
    for d in sorted(d for d in os.listdir(out) if d.startswith("ckpt-"))[:-keep]:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)

def load_checkpoint(out, flux, text, acfg, opt):
    """OUT/latest into the models and the optimizer -> (step, consumed, ranks that saved it). A checkpoint that is
    unreadable or belongs to another run (other adapters, another optimizer) is one CheckpointError naming the file."""
    path = os.path.realpath(os.path.join(out, "latest"))
    if not os.path.isdir(path):
        raise M.CheckpointError(f"{os.path.join(out, 'latest')}: leads to {path}, which is not a checkpoint folder")
    if acfg is None:
        M.load_state_dict_strict(flux, os.path.join(path, "flux.safetensors"))
        M.load_state_dict_strict(text, os.path.join(path, "text_encoder.safetensors"))
    else:
        file = os.path.join(path, "adapter.safetensors")
        ML.load_strict(flux, ML.read_adapter(file)[1], file)
    file = os.path.join(path, "train_state.pt")
    if not os.path.isfile(file):
        raise M.CheckpointError(f"{file}: no such file")
    try:   # weights_only: tensors and plain containers only, no object in the pickle is ever constructed
        state = torch.load(file, map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        return state["step"], state["consumed"], state["world"]
    except pickle.UnpicklingError:
        raise M.CheckpointError(f"{file}: not a pickle of tensors only: refused (torch.load with weights_only=True "
                                f"runs none of a pickle's code)") from None
    except Exception as e:   # missing, torn, another run's optimizer: all the file's fault
        raise M.CheckpointError(f"{file}: not this run's training state ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

# -----------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    ddp, rank, world, device = setup_dist(args.device, args.dist_timeout)
    master = rank == 0
    toy = args.preset == "toy"
    args.size = args.size or (32 if toy else 512)
    args.ref_size = args.ref_size or (16 if toy else 320)
    args.lr = args.lr or (1e-3 if args.stage == "base" else 1e-4)
    args.lr_end = args.lr / 3 if args.lr_end is None else args.lr_end

    # data: every rank sees the same global order of batches; batch b goes to rank b % world
    if (args.data is None) == (args.cache is None):
        raise D.DataError("give one of --data (a manifest) or --cache (a `data.py cache` folder)")
    token_px = 2 * M.get_config(args.preset).ae.factor
    load = (lambda p: D.CachedDataset(p)) if args.cache else \
        (lambda p: D.ManifestDataset(p, size=args.size, ref_size=args.ref_size, token_px=token_px,
                                     buckets=D.uno_buckets(args.size, token_px) if args.aspect_buckets else None))
    dataset = load(args.cache or args.data)
    if getattr(dataset, "skipped", None):
        print0(f"warning: {len(dataset.skipped)} bad records skipped in {args.data} (first: {dataset.skipped[0]})")
    val = load(args.val_data) if args.val_data else None

    flux, ae, text, params, acfg = build_models(args, device)
    denoiser = Denoiser(flux, text).train()
    model = torch.nn.parallel.DistributedDataParallel(denoiser) if ddp else denoiser
    opt = build_optimizer(params, args.lr, args.weight_decay, args.zero and ddp)
    step, consumed = 0, 0                 # optimizer steps; global micro-batches used (the position in the data)
    if args.resume and os.path.lexists(os.path.join(args.out, "latest")):
        step, consumed, saved_world = load_checkpoint(args.out, flux, text, acfg, opt)
        print0(f"resumed from step {step} at global micro-batch {consumed} (saved by {saved_world} rank(s), "
               f"now {world})")
    if master:
        os.makedirs(args.out, exist_ok=True)
        n_train = sum(p.numel() for p in params)
        print0(f"{args.stage} stage, {args.preset}: {n_train / 1e6:.2f}M trainable params, {len(dataset)} records, "
               f"{world} rank(s) x batch {args.batch_size} x accum {args.grad_accum}, device {device}")
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None

    def lr_at(s):  # linear warm-up, then linear decay from lr to lr_end (paper: 3e-5 -> 1e-5)
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        return args.lr + (args.lr_end - args.lr) * min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup))

    micro_per_step = args.grad_accum * world                    # global micro-batches per optimizer step
    epochs = {}                                                  # epoch -> its batches (the current one only)
    per_epoch = len(D.batches(dataset, args.batch_size, args.seed, 0))
    if per_epoch == 0:
        raise D.DataError(f"{args.data or args.cache}: fewer usable records than one batch of {args.batch_size}")
    def global_batch(b):
        # the b-th micro-batch of the run in the global order (each epoch reshuffled by seed)
        e, i = divmod(b, per_epoch)
        if e not in epochs:
            epochs.clear()
            epochs[e] = D.batches(dataset, args.batch_size, args.seed, e)
        return epochs[e][i]

    t0, t0_step, bad = time.time(), step, BadSteps(args.max_bad_steps)
    bar = tqdm(total=args.steps, initial=step, disable=not master, desc=args.stage)
    while step < args.steps:
        # ---- forward / backward over grad_accum micro-batches (DDP syncs on the last) ----
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        sums = {}
        for a in range(args.grad_accum):
            b = consumed + a * world + rank
            batch = D.collate([dataset[i] for i in global_batch(b)])
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + b)   # noise and t: a function of b only
            sync = nullcontext() if (not ddp or a == args.grad_accum - 1) else model.no_sync()
            with sync:
                loss, terms = step_losses(args, model, denoiser, ae, batch, step, gen, device, args.stage)
                (loss / args.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() / args.grad_accum
        consumed += micro_per_step
        # ---- clip, skip non-finite steps, update ----
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        if bad.ok(gnorm, f"step {step + 1}"):
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # ---- log, eval, checkpoint ----
        if step % args.log_every == 0 or step == args.steps:
            vals = torch.tensor([sums[k] for k in sorted(sums)], device=device)
            if ddp:
                dist.all_reduce(vals)
                vals /= world
            rec = {"step": step, "lr": lr_at(step - 1), "grad_norm": gnorm.item(), "skipped": bad.total,
                   "samples_per_s": args.batch_size * micro_per_step * (step - t0_step) / (time.time() - t0),
                   **dict(zip(sorted(sums), vals.tolist()))}
            t0, t0_step = time.time(), step
            loads = [m.load for _, m in ML.adapters(flux) if isinstance(m, ML.MoELoRALinear)]
            if loads:
                total = torch.stack(loads).sum(0)
                rec["expert_load"] = (total / total.sum().clamp_min(1)).tolist()
                for l in loads:
                    l.zero_()
            if master:
                bar.set_postfix(loss=f"{rec['diff']:.4f}", **({"dice": f"{rec['dice']:.3f}"} if "dice" in rec else {}))
                log.write(json.dumps(rec) + "\n")
                log.flush()
        if val is not None and master and (step % args.eval_every == 0 or step == args.steps) and args.stage != "base":
            rec = {"step": step, **evaluate(args, denoiser, ae, val, device)}
            print0(json.dumps(rec))
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % args.ckpt_every == 0 or step == args.steps:
            if args.zero and ddp:
                opt.consolidate_state_dict(to=0)
            if master:
                save_checkpoint(args.out, step, flux, text, acfg, opt, args, args.keep, consumed)
            if ddp:
                dist.barrier()
    bar.close()
    if ddp:
        dist.destroy_process_group()

USER_ERRORS = (M.CheckpointError, D.DataError, D.InputError, TrainingError)

def cli(argv=None, main=main, errors=USER_ERRORS):
    """main() as the command line runs it: a user's mistake (bad data, bad weights, a diverged run) is one line on
    stderr and exit status 2, never a traceback. -> exit status. train_rl.py runs its main through it too."""
    try:
        main(argv)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(cli())

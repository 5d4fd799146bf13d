"""
What both trainers share (train_sft.py: stages base/single/multi; train_rl.py: IPPO), as nanochat's
common.py and checkpoint_manager.py hold theirs: the model and adapter flags, distributed set-up,
building the models, the optimizer, skipping non-finite steps, the training forward (Denoiser) and
the held-out attention metrics, checkpoint save / load (the run folder itself is runs.py), and the
command-line wrapper that turns a user's mistake into one line. Neither trainer imports the other;
both import this.
"""
import datetime
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

import cli as CL
import data as D
import dataset as DS
import encoders as EN
import flux2 as F2
import losses as LS
import model as M
import moe_lora as ML
import runs
import sampling as SM
import weights as WT
from runs import TrainingError, print0

# -----------------------------------------------------------------------------
# the base model and its adapters on the command line

def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="toy", choices=F2.presets())
    g.add_argument("--init", default=None, help="toy: a checkpoint folder "
                   "(flux/text_encoder.safetensors); flux: a DiT .safetensors or repo id (default: "
                   "the preset's official repo)")
    g.add_argument("--adapter", default=None,
                   help="start from this adapter (e.g. stage single's, for multi)")
    WT.add_weight_flags(g)
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block in backward")
    g.add_argument("--fsdp", action="store_true", help="torchrun: shard the base, the adapters, "
                   "their gradients and optimizer states across the ranks (FSDP2, one unit per DiT "
                   "block; checkpoints saved whole)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT's blocks (the first steps compile)")
    g.add_argument("--pe", default=None, choices=["t", "d", "h", "w", "o"],
                   help="reference positions: UNO's offsets d/h/w/o (FLUX.1's default d) or "
                   "FLUX.2's own t axis (its default); sample with the same")
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=CL.positive, default=16, help="LoRA rank (paper: 512)")
    g.add_argument("--alpha", type=CL.positive_float, default=None,
                   help="LoRA alpha (default: rank, i.e. scale 1)")
    g.add_argument("--experts", type=CL.count, default=4,
                   help="MoE-LoRA experts (0: plain LoRA on the FFNs too)")
    g.add_argument("--top-k", type=CL.positive, default=1,
                   help="experts per token (at most --experts)")
    g.add_argument("--gate", default="st", choices=["st", "switch", "paper"])
    g.add_argument("--lora-targets", nargs="*", default=list(ML.DEFAULT_LORA))
    g.add_argument("--moe-targets", nargs="*", default=list(ML.DEFAULT_MOE))

def check_model_args(pf, args, stage, cached=False):
    """The model flags' part of a trainer's pre-flight (data.Preflight): the base (--init) and the
    adapter to start from exist, and every FLUX weight the run will load is on this machine
    (T5, CLIP and the AE not with a cache)."""
    pf.file("--adapter", args.adapter, inside="adapter.safetensors")
    if args.preset == "toy":
        if args.init is None:
            pf.need(stage == "base", "--init: adapters train on a trained toy base: pass --init "
                    "assets/toy (the shipped one) or a --stage base run's "
                    "checkpoint folder (OUT/latest)")
        else:
            pf.folder("--init", args.init, [WT.TOY_DIT, WT.TOY_TEXT])
        pf.need(not (args.ae or args.t5 or args.clip_text or args.text_model),
                "--ae, --t5, --clip-text, --text-model: FLUX's weights (the toy's "
                "encoders are in its --init folder)")
        return
    pf.need(stage != "base",
            "--stage base trains the toy preset only (FLUX is the base at full scale)")
    cfg = F2.get_config(args.preset)
    if F2.is_flux2(cfg):
        pf.weights(F2.weights(cfg, ("dit",) if cached else ("dit", "ae", "text"), dit=args.init,
                              ae=args.ae, text=args.text_model, dit_flag="--init"))
        return
    parts = ("dit",) if cached else ("dit", "ae", "t5", "clip")
    pf.weights(WT.flux_weights(cfg, parts, dit=args.init, ae=args.ae, t5=args.t5,
                               clip=args.clip_text, dit_flag="--init"))

def adapter_spec(args):
    """The adapter flags -> moe_lora.inject's keyword arguments. --experts 0: plain LoRA on the FFN
    targets too."""
    moe = args.moe_targets if args.experts > 0 else []
    lora = args.lora_targets + ([] if args.experts > 0 else args.moe_targets)
    return dict(lora_targets=lora, moe_targets=moe, rank=args.rank, alpha=args.alpha,
                n_experts=max(args.experts, 1), top_k=args.top_k, gate=args.gate)

# -----------------------------------------------------------------------------
# distributed set-up: one code path for `python` and `torchrun`

def setup_dist(device_arg, timeout_s):
    """-> (ddp, rank, world size, device). A collective that waits longer than timeout_s
    (a rank died or hangs) raises on the ranks still waiting, so torchrun ends the job instead of it
    hanging forever."""
    ddp = "RANK" in os.environ
    if ddp:
        rank, local, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                              int(os.environ["WORLD_SIZE"]))
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
    else:
        rank, world = 0, 1
        device = torch.device(device_arg) if device_arg else M.default_device()
    return ddp, rank, world, device

def check_parallel_args(p, args):
    # --fsdp shards across the ranks torchrun starts
    if args.fsdp and "RANK" not in os.environ:
        p.error("--fsdp shards the model across ranks: launch with torchrun "
                "(--nproc_per_node=1 is fine)")

def shard(root, flux):
    """FSDP2 (--fsdp): every DiT block its own unit, then `root` for all else under it
    (the embedders, the final layer, a trained text encoder). Each unit's parameters, frozen base
    and adapters alike, are sharded across the ranks and gathered only while the unit computes; its
    gradients are reduce-scattered, so an optimizer built on the parameters afterwards
    (new ones: DTensors) holds its shard of the states. Every rank must run the same forwards: each
    one gathers with the others. -> root"""
    from torch.distributed.fsdp import fully_shard
    for block in (*flux.double_blocks, *flux.single_blocks):
        fully_shard(block)
    return fully_shard(root)

@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)

def no_sync(model, last):
    """Gradient accumulation: DDP and FSDP reduce the gradients across ranks in every backward, but
    only the last micro-batch's needs to; the others accumulate on their rank. -> a context for one
    micro-batch's backward."""
    from torch.distributed.fsdp import FSDPModule
    if last:
        return nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return _fsdp_no_sync(model) if isinstance(model, FSDPModule) else nullcontext()

class BadSteps:
    """Skips an update whose gradient norm is NaN or inf (every rank sees the same, all-reduced
    norm) and counts it; `limit` of them in a row stop the run with a TrainingError, its last
    checkpoint untouched; a run whose every update was skipped ends with one too (trained_any), not
    as a success."""
    def __init__(self, limit, run):
        self.limit, self.total, self.in_row, self.seen, self.run = limit, 0, 0, 0, run

    def ok(self, grad_norm, where):
        self.seen += 1
        if torch.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.total, self.in_row = self.total + 1, self.in_row + 1
        print0(f"{where}: non-finite gradient, update skipped ({self.total} so "
               f"far, {self.in_row} in a row)")
        if self.in_row >= self.limit:
            raise TrainingError(f"{where}: {self.in_row} non-finite gradients in a row "
                                f"(--max-bad-steps): stopped; {self.run.intact()} (try a lower "
                                "--lr, or check the data, then --resume)")
        return False

    def trained_any(self):
        # the end of a run: one whose every update was skipped changed nothing, whatever its
        # checkpoints say
        if self.seen and self.total == self.seen:
            raise TrainingError(f"all {self.seen} updates of this run were skipped (non-finite "
                                f"gradients): nothing was trained; {self.run.intact()} holds the "
                                f"weights it started from (check the data and the "
                                f"base, or try a lower --lr)")

# -----------------------------------------------------------------------------
# models and optimizer

def build_models(preset, stage, device, init=None, adapter=None, spec=None, cached=False,
                 grad_checkpoint=False, seed=0, ae=None, t5=None, clip=None, text_model=None):
    """-> (flux, ae, text encoder, trainable params, adapter config or None).
    stage "base" trains the whole toy DiT + text encoder from a random init (seeded: the same on
    every rank); any other stage freezes the base (a toy checkpoint folder, or FLUX from init / the
    preset's repo) and trains adapters: loaded from `adapter`, else injected as `spec`
    (adapter_spec) says. cached: the batches carry text embeddings and latents (cache.py), so no AE
    or text encoder is loaded. ae, t5, clip: where FLUX's are (weights.flux_weights); ae,
    text_model: FLUX.2's (flux2.weights)."""
    cfg = F2.get_config(preset)
    if cached and stage == "base":
        raise D.InputError(
            "--stage base trains the text encoder: it cannot read precomputed text embeddings")
    wdtype = M.weight_dtype(device)                          # frozen weights
    if preset == "toy":
        torch.manual_seed(seed)
        if init:
            flux, text, _ = WT.load_toy(init, cfg)
        elif stage != "base":
            raise WT.CheckpointError(
                "--init: adapter stages need a trained toy base (a --stage base output folder)")
        else:
            flux, text = M.Flux(cfg), EN.ByteTextEncoder(cfg)
        ae = EN.AutoEncoder(cfg.ae)
    elif F2.is_flux2(cfg):
        if stage == "base":
            raise D.InputError(
                "--stage base trains the toy preset only (FLUX.2 is the base at full scale)")
        # the weights are found or listed as missing at once (flux2.load_models); a cache needs no
        # AE or text model
        flux, ae, text = F2.load_models(cfg, init, ae, text_model, device=device, dtype=wdtype,
                                        dit_flag="--init",
                                        parts=("dit",) if cached else ("dit", "ae", "text"))
    else:
        if stage == "base":
            raise D.InputError(
                "--stage base trains the toy preset only (FLUX is the base at full scale)")
        # every FLUX weight this run needs, found or listed as missing at once, before the 24 GB of
        # the first loads; with a cache the 9 GB T5 and the VAE are never loaded
        flux, ae, text = WT.load_models(cfg, init, ae, t5, clip, device, wdtype, dit_flag="--init",
                                        parts=("dit",) if cached else ("dit", "ae", "t5", "clip"))
    if cached:                                           # the toy's encoders are unused too
        ae = text = None
    flux = flux.to(device)
    text = text and text.to(device)
    ae = ae and ae.to(device).requires_grad_(False)
    flux.grad_checkpoint = grad_checkpoint
    if stage == "base":
        return flux, ae, text, list(flux.parameters()) + list(text.parameters()), None
    # a frozen base holding a NaN or an inf makes every step NaN, skipped: refused before the first,
    # as sample.py does
    bad = runs.first_bad([*flux.named_parameters(), *(text.named_parameters() if text is not None
                                                      else ())])
    if bad:
        raise WT.CheckpointError(
            f"{init or cfg.repo_id}: weight {bad[0]} {bad[1]}: this base cannot be trained on")
    if text is not None:
        text.requires_grad_(False)
    acfg = ML.load_adapter(flux, adapter) if adapter else ML.inject(flux, **spec)
    bad = adapter and runs.first_bad(ML.adapter_state_dict(flux).items(), runs.MAX_WEIGHT)
    if bad:
        raise WT.CheckpointError(f"{adapter}: {bad[0]} {bad[1]}: this adapter cannot be trained on")
    flux.to(device)                                      # new adapter tensors onto the device, fp32
    return flux, ae, text, [p for p in flux.parameters() if p.requires_grad], acfg

def build_optimizer(params, lr, weight_decay, zero=False):
    # AdamW, no decay on biases and norms; zero: ZeRO-1, optimizer states sharded across ranks
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer      # imported only for --zero
        return ZeroRedundancyOptimizer(groups, torch.optim.AdamW, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))

# -----------------------------------------------------------------------------
# the training forward: a batch -> the joint sequence -> the DiT

class Denoiser(torch.nn.Module):
    """What one training forward runs, and what DDP wraps: prompts through the text encoder
    (trained in the base stage, frozen after), then the DiT. Frozen parameters are never
    synchronized by DDP."""
    def __init__(self, flux, text):
        super().__init__()
        self.flux, self.text = flux, text

    def forward(self, cond, inp, timesteps, guidance, probe=None):
        # cond: the prompts, or (txt, y) precomputed by `cache.py` (then there is no text encoder);
        # inp: model.prepare's image side of the sequence, its img the noisy target x_t
        txt, y = self.text(cond) if self.text is not None else cond      # (B, L_txt, C), (B, C_vec)
        return self.flux(**inp, txt=txt, txt_ids=F2.family(self.flux.cfg).text_ids(txt), y=y,
                         timesteps=timesteps, guidance=guidance, probe=probe)

def conditioning(batch, denoiser, device):
    # what Denoiser.forward takes as cond: prompts, or a cache's text embeddings cut to the batch's
    # longest prompt (cache.py stores each one whole), as the text encoder pads a batch
    if denoiser.text is not None:
        return batch["prompts"]
    txt = batch["txt"][:, :int(batch["txt_len"].max())]
    return txt.to(device).float(), batch["y"].to(device).float()

@torch.no_grad()
def encode_batch(batch, ae, device, pe="d", refs=True, cfg=None):
    """A batch's target and references (or a cache's latents) -> prepare's image side of the joint
    sequence (the family of cfg, the DiT's config: FLUX.1's by default): img (B, L, C) the packed
    clean target x0, its ids, the packed references and their ids (none: refs=False)."""
    if ae is None:
        x0, B, N = batch["latent"].to(device).float(), *batch["ref_latents"].shape[:2]
        ref_lat = batch["ref_latents"].to(device).flatten(0, 1).float()
    else:
        with M.autocast(device):
            x0 = ae.encode(batch["target"].to(device)).float()                    # (B, z, h, w)
            B, N = batch["refs"].shape[:2]
            ref_lat = ae.encode(batch["refs"].to(device).flatten(0, 1)).float()   # (B*N, z, r, r)
    ref_lat = ref_lat.unflatten(0, (B, N))
    return F2.family(cfg).prepare(x0, [ref_lat[:, i] for i in range(N)] if refs else [], pe)

def guidance_for(flux, B, device):
    # UNO trains with guidance 1; models without a guidance input (schnell) take none
    return torch.full((B,), 1.0, device=device) if flux.cfg.guidance_embed else None

def attention_stats(maps, masks, valid, direction):
    """Where a block's attention maps put each subject, against the subjects' masks on the token
    grid. maps, masks (B, N, M); valid (B, N) (padded subjects are False). Per valid subject i
    (own: of any record; the rest: of records with >= 2 subjects):
      own, other   map i's mass inside subject i's mask, and inside the union of the other subjects'
                   masks
      selectivity  (own / own area) / (other / other area): 1 when the map cannot tell its subject
                   from the others (uniform, or on every subject alike: foreground), > 1 separated,
                   < 1 swapped
    and for direction img2ref (maps[:, i, j]: target token j's attention mass on reference i), over
    the tokens inside subject i's mask:
      ref_mass     their attention mass on all references together
      wrong        the share of that mass on the other references (chance: (N - 1) / N): the path of
                   leakage
    -> {stat: (S,) tensor over those subjects}."""
    maps, masks, valid = maps.double(), masks.double(), valid.bool()
    N = masks.shape[1]
    other_mask = (masks * valid[:, :, None]).sum(1, keepdim=True) - masks                # (B, N, M)
    other_mask = other_mask.clamp(0, 1)
    own, other = (maps * masks).sum(-1), (maps * other_mask).sum(-1)                      # (B, N)
    area, other_area = masks.sum(-1), other_mask.sum(-1)
    keep = valid & (valid.sum(1, keepdim=True) >= 2) & (area > 0) & (other_area > 0)
    tiny = 1e-12                     # a map with no mass anywhere in the masks counts as 1, not 0/0
    out = dict(own=own[valid & (area > 0)], other=other[keep],
               selectivity=((own + tiny) / area / ((other + tiny) / other_area))[keep])
    if direction == "img2ref":
        refs = maps * valid[:, :, None]                                   # (B, N, M)
        total = torch.einsum("bim,bkm->bi", masks, refs)                  # (B, N): mass on all refs
        mine = torch.einsum("bim,bim->bi", masks, refs)                   # on its own reference
        out["ref_mass"] = (total / area.clamp_min(tiny))[keep]
        out["wrong"] = (1 - mine / total.clamp_min(tiny))[keep]
        n_valid = valid.sum(1, keepdim=True).double()
        out["chance"] = ((n_valid - 1) / n_valid).expand(-1, N)[keep]
    return out

def summarize_stats(per_subject):
    """{stat: [(S,) tensors]} pooled -> {stat: mean}, selectivity as a geometric mean
    (a ratio: 2 and 1/2 are equally far from 1)."""
    out = {}
    for k, parts in per_subject.items():
        v = torch.cat(parts)
        out[k] = float("nan") if not len(v) else \
            (v.log().mean().exp() if k.endswith("selectivity") else v.mean()).item()
    return out

@torch.no_grad()
def attention_metrics(denoiser, ae, dataset, device, batch_size, attn_blocks=None, pe="d",
                      t_eval=0.5, max_batches=8, per_block=False):
    """Held-out, teacher-forced (the dataset's targets noised to t_eval, no sampling) at a fixed
    noise level: val_dice, val_share_own / val_share_other / val_selectivity of the maps L_attn is
    trained on (the reference -> image maps averaged over attn_blocks, see attention_stats) and the
    flow-matching loss val_diff. Did L_attn separate the subjects' attention, or only move it onto
    the foreground (own and other shares up together, selectivity ~1)? per_block: also, for every
    block and both probe directions, val_{direction}_{block}_{stat} (own, other, selectivity;
    img2ref also ref_mass, wrong and its chance)."""
    was_training = denoiser.training
    denoiser.eval()
    blocks = M.block_names(denoiser.flux.cfg)
    # L_attn's blocks: the loss's own maps
    chosen = set(M.select_blocks(attn_blocks, denoiser.flux.cfg))
    sums, n, stats = {"dice": 0.0, "diff": 0.0}, 0, {}
    gen = torch.Generator().manual_seed(1234)
    for idx in DS.batches(dataset, batch_size, seed=0, epoch=0, drop_last=False)[:max_batches]:
        batch = DS.collate([dataset[i] for i in idx])
        inp = encode_batch(batch, ae, device, pe, cfg=denoiser.flux.cfg)
        x0 = inp["img"]
        B = x0.shape[0]
        # (B, N, M), (B, N)
        masks, valid = batch["masks"].to(device).float(), batch["mask_valid"].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t, tt = (1 - t_eval) * x0 + t_eval * noise, torch.full((B,), t_eval, device=device)
        for direction in ("ref2img", "img2ref") if per_block else ("ref2img",):
            probe = M.AttentionProbe(blocks if per_block else attn_blocks, direction=direction)
            with M.autocast(device):
                pred = denoiser(conditioning(batch, denoiser, device), dict(inp, img=x_t), tt,
                                guidance_for(denoiser.flux, B, device), probe)
            if direction == "ref2img":              # the loss's own maps: the mean over attn_blocks
                maps = torch.stack([m for m, b in zip(probe.maps,
                                                      probe.names) if b in chosen]).mean(0).float()
                sums["dice"] += LS.dice_loss(maps, masks, valid).item() * B
                sums["diff"] += (pred.float() - (noise - x0)).pow(2).mean().item() * B
                for k, v in attention_stats(maps, masks, valid, direction).items():
                    stats.setdefault(f"share_{k}" if k in ("own", "other") else k, []).append(v)
            if per_block:
                for m, b in zip(probe.maps, probe.names):
                    for k, v in attention_stats(m.float(), masks, valid, direction).items():
                        stats.setdefault(f"{direction}_{b}_{k}", []).append(v)
        n += B
    denoiser.train(was_training)
    return {**{f"val_{k}": v / max(n, 1) for k, v in sums.items()},
            **{f"val_{k}": v for k, v in summarize_stats(stats).items()}}

# -----------------------------------------------------------------------------
# IPPO's rollout and the policy's log-probabilities (train_rl.py's stage 3; bench.py measures them
# too)

def expand(z, B):
    return z.expand(B, *z.shape[1:])

def forwards_per_velocity(c):
    # DiT rows per sample one guided velocity costs: the conditional one, + one without references,
    # + one with "" (the last rides in the conditional forward's batch: sampling.guided_velocity)
    w_ref, w_text = c.get("scales", (1.0, 1.0))
    return 1 + (w_ref != 1 and bool(c["ref_img"])) + (w_text != 1)

def velocity(flux, x, c, t, guidance):
    """v_theta(x, t) for x (B, L, C) under one conditioning c (batch 1, shared by the group:
    expanded), guided as sample.py guides (sampling.guided_velocity) by c's "scales"
    (reference, text) when it has them: the policy IPPO samples and scores is then the sampler users
    run (the empty prompt comes from sampling_inputs(null_text=True))."""
    B, dev = x.shape[0], x.device
    w_ref, w_text = c.get("scales", (1.0, 1.0))
    e = lambda z: expand(z, B)
    null = (e(c["txt_null"]), e(c["y_null"])) if w_text != 1 else (None, None)
    with M.autocast(dev):
        return SM.guided_velocity(flux, x, e(c["img_ids"]), e(c["txt"]), e(c["txt_ids"]),
                                  torch.full((B,), t, device=dev), e(c["y"]),
                                  torch.full((B,), guidance, device=dev),
                                  [e(r) for r in c["ref_img"]], [e(r) for r in c["ref_img_ids"]],
                                  w_ref, w_text, *null)

@torch.no_grad()
def rollout(flux, c, G, timesteps, window, eta, guidance, gen):
    """One group (Algorithm 1, lines 6-15). c: sampling.sampling_inputs' output (its img is the
    group's one noise). -> final latents (G, L, C), window record dict(x, x_next (G, w, L, C),
    old_logp (G, w)), DiT rows used."""
    x, rows, xs, nxt, lps = c["img"].float(), 0, [], [], []
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        if i == window.start:
            x = x.repeat(G, 1, 1)                          # the group splits where the noise enters
        v = velocity(flux, x, c, t, guidance)
        rows += x.shape[0] * forwards_per_velocity(c)
        if i in window:                                    # SDE step: pi_old's sample and log-prob
            x_next, lp, _, _ = SM.sde_step(x, v, t, t_next, eta,
                                           noise=torch.randn(x.shape, generator=gen).to(x))
            xs.append(x)
            nxt.append(x_next)
            lps.append(lp)
        else:                                              # ODE step (Euler), deterministic
            x_next = SM.euler_step(x, v, t, t_next)
        x = x_next
    return x, dict(x=torch.stack(xs, 1), x_next=torch.stack(nxt, 1),
                   old_logp=torch.stack(lps, 1)), rows

class WindowPolicy(torch.nn.Module):
    """log pi_theta(x_t+1 | x_t) of recorded window steps: what DDP wraps. All w steps run inside
    one forward, so DDP sees one forward per backward; the w graphs are what the update holds in
    memory (not T)."""
    def __init__(self, flux):
        super().__init__()
        self.flux = flux

    def forward(self, c, x, x_next, steps, eta, guidance):
        # x, x_next (B, w, L, C); steps: the window's [(t, t_next)] -> logp (B, w), mean
        # (B, w, L, C), std [w]
        out = [SM.sde_step(x[:, j], velocity(self.flux, x[:, j], c, t, guidance), t, t_next, eta,
                           prev=x_next[:, j])
               for j, (t, t_next) in enumerate(steps)]
        return (torch.stack([o[1] for o in out], 1), torch.stack([o[2] for o in out], 1),
                [o[3] for o in out])

def kl_to_base(flux, c, x, x_next, mean, std, steps, eta, guidance):
    """KL(pi_theta || pi_base) per trajectory (B,), mean over window steps and elements. Both
    policies are Gaussians with the step's std, so per element KL = (mu_theta - mu_base)^2 /
    (2 std^2) exactly (Flow-GRPO uses the same form without the step's dt in std). pi_base: the same
    model with its adapters off."""
    with torch.no_grad(), ML.disabled(flux):
        base = torch.stack([SM.sde_step(x[:, j], velocity(flux, x[:, j], c, t, guidance), t, t_next,
                                        eta, prev=x_next[:, j])[2]
                            for j, (t, t_next) in enumerate(steps)], 1)
    kl = [((mean[:, j] - base[:, j]) ** 2 / (2 * std[j] ** 2)).flatten(1).mean(1)
          for j in range(len(steps))]
    return torch.stack(kl, 1).mean(1)

# -----------------------------------------------------------------------------
# the run's log: OUT/log.jsonl (rank 0), and wandb as well where --wandb PROJECT asks for it

def add_log_args(p):
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this wandb "
                   "project (pip install wandb; optional); `python plot_log.py OUT...` draws "
                   "log.jsonl curves without it")

def wandb_module(project):
    """The wandb module when --wandb is given (checked before any work), else None. Imported only
    then: an optional dependency, not a requirement."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        raise D.InputError("--wandb needs the wandb package: pip install wandb") from None
    return wandb

class Log:
    """One JSON record a line in OUT/log.jsonl, flushed at once (a killed run loses no line); on
    other ranks nothing. With wandb, every numeric field of each record too, at the record's step
    (or IPPO iteration)."""
    def __init__(self, out, master, wandb=None, config=None, project=None):
        self.path = os.path.join(out, "log.jsonl")
        with D.file_errors(self.path, "open the run's log", TrainingError):
            self.file = open(self.path, "a") if master else None
        self.wandb = (wandb.init(project=project, name=os.path.basename(os.path.abspath(out)),
                                 config=config, dir=out) if master and wandb else None)

    def write(self, rec):
        if self.file is None:
            return
        # a full disk: one line
        with D.file_errors(self.path, "write the run's log", TrainingError):
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.wandb is not None:
            at = rec.get("step", rec.get("iter"))
            self.wandb.log({k: v for k, v in rec.items()
                            if k not in ("step", "iter") and isinstance(v, (int, float))},
                           step=at)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()

# -----------------------------------------------------------------------------
# the command line

DEMO_REFS = ("assets/orange_circle.png", "assets/blue_square.png")   # the README's quick start pair

def summary(args, run, unit="step"):
    """A run's last line (rank 0): what it made and the command that samples it (the toy: with the
    demo references; FLUX: with placeholders for yours)."""
    if run.last is None:
        return
    step, ckpt = run.last
    if getattr(args, "stage", None) == "base":
        made, model = f"the toy base at {ckpt}", ["--model", ckpt]
    else:
        adapter, best = (os.path.join(ckpt, "adapter.safetensors"),
                         os.path.join(args.out, "best.safetensors"))
        lora = best if os.path.isfile(best) else adapter
        made = f"the adapter at {adapter}" + (f" (best held-out reward: {best})" if lora == best
                                              else "")
        model = ["--model", args.init or args.preset, "--lora", lora]
    model += ["--pe", args.pe] if args.pe != F2.default_pe(F2.get_config(args.preset)) else []
    model += [a for f in ("ae", "t5", "clip_text", "text_model") if getattr(args, f)
              for a in (runs.flag(f), getattr(args, f))]
    refs = (["--refs", *DEMO_REFS] if args.preset == "toy"
            else ["--refs", "REF1.png", "REF2.png", "--prompt", "PROMPT"])
    out = os.path.join("out", os.path.basename(os.path.normpath(args.out)) + ".png")
    print0(f"done, {unit} {step}: {made}; sample it with: "
           f"{shlex.join(['python', 'sample.py', *model, *refs, '--out', out])}")

USER_ERRORS = (WT.CheckpointError, D.DataError, D.InputError, TrainingError, runs.RunFolderError)

def cli(main, argv=None, errors=USER_ERRORS):
    """main(argv) as the command line runs it: a user's mistake (bad data, bad weights, a diverged
    run, a used run folder) is one line on stderr and exit status 2, never a traceback; a run
    stopped by a signal says how to resume and exits with 128 + the signal. -> exit status.
    Under torchrun every rank reaches the same verdict (the pre-flight sees the same files; later
    decisions are rank 0's, broadcast): rank 0 prints the line, and every rank leaves it in
    torchrun's error file, which the launcher's failure summary shows in place of "To enable
    traceback see: ...". """
    try:
        main(argv)
    except errors as e:
        say(f"error: {e}")
        return 2
    except D.FILE_ERRORS as e:
        # a file no check foresaw (the files we write and load say which: file_errors)
        print(f"error: {getattr(e, 'filename', None) or 'a file'}: {D.file_problem(e)}",
              file=sys.stderr)
        return 2
    except runs.Stopped as e:
        say(str(e))
        return e.status
    return 0

def say(line):
    # the one line a command ends with, once per job: on rank 0 (or without torchrun), and in
    # torchrun's error file
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": line, "extraInfo": {"py_callstack": line,
                                                 "timestamp": str(int(time.time()))}}
        with open(error_file, "w") as f:
            json.dump({"message": record}, f)

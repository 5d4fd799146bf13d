"""
What both trainers share (train_sft.py: stages base/single/multi; train_rl.py: IPPO), as nanochat's common.py and
checkpoint_manager.py hold theirs: the model and adapter flags, distributed set-up, building the models, the
optimizer, skipping non-finite steps, the training forward (Denoiser) and the held-out attention metrics, checkpoint
save / load, and the command-line wrapper that turns a user's mistake into one line. Neither trainer imports the
other; both import this.
"""
import argparse
import datetime
import errno
import fcntl
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import threading

import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors

import data as D
import losses as LS
import model as M
import moe_lora as ML

# -----------------------------------------------------------------------------
# the base model and its adapters on the command line

def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="toy", choices=sorted(M.CONFIGS))
    g.add_argument("--init", default=None, help="toy: a checkpoint folder (flux/text_encoder.safetensors); "
                   "flux: a DiT .safetensors or repo id (default: the preset's official repo)")
    g.add_argument("--adapter", default=None, help="start from this adapter (e.g. stage single's, for multi)")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward")
    g.add_argument("--pe", default="d", choices=["d", "h", "w", "o"], help="UNO reference position offsets (sample "
                   "with the same)")
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=positive, default=16, help="LoRA rank (paper: 512)")
    g.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default: rank, i.e. scale 1)")
    g.add_argument("--experts", type=count, default=4, help="MoE-LoRA experts (0: plain LoRA on the FFNs too)")
    g.add_argument("--top-k", type=positive, default=1, help="experts per token (at most --experts)")
    g.add_argument("--gate", default="st", choices=["st", "switch", "paper"])
    g.add_argument("--lora-targets", nargs="*", default=list(ML.DEFAULT_LORA))
    g.add_argument("--moe-targets", nargs="*", default=list(ML.DEFAULT_MOE))

def adapter_spec(args):
    """The adapter flags -> moe_lora.inject's keyword arguments. --experts 0: plain LoRA on the FFN targets too."""
    moe = args.moe_targets if args.experts > 0 else []
    lora = args.lora_targets + ([] if args.experts > 0 else args.moe_targets)
    return dict(lora_targets=lora, moe_targets=moe, rank=args.rank, alpha=args.alpha, n_experts=max(args.experts, 1),
                top_k=args.top_k, gate=args.gate)

# -----------------------------------------------------------------------------
# distributed set-up: one code path for `python` and `torchrun`

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
    """A run that cannot go on (it diverged, its checkpoint cannot be written): the message says why and names the
    last checkpoint, intact."""

class BadSteps:
    """Skips an update whose gradient norm is NaN or inf (every rank sees the same, all-reduced norm) and counts
    it; `limit` of them in a row stop the run with a TrainingError, its last checkpoint untouched."""
    def __init__(self, limit, run):
        self.limit, self.total, self.in_row, self.run = limit, 0, 0, run

    def ok(self, grad_norm, where):
        if torch.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.total, self.in_row = self.total + 1, self.in_row + 1
        print0(f"{where}: non-finite gradient, update skipped ({self.total} so far, {self.in_row} in a row)")
        if self.in_row >= self.limit:
            raise TrainingError(f"{where}: {self.in_row} non-finite gradients in a row (--max-bad-steps): stopped; "
                                f"{self.run.intact()} (try a lower --lr, or check the data, then --resume)")
        return False

# -----------------------------------------------------------------------------
# models and optimizer

def build_models(preset, stage, device, init=None, adapter=None, spec=None, cached=False, grad_checkpoint=False,
                 seed=0):
    """-> (flux, ae, text encoder, trainable params, adapter config or None).
    stage "base" trains the whole toy DiT + text encoder from a random init (seeded: the same on every rank); any
    other stage freezes the base (a toy checkpoint folder, or FLUX from init / the preset's repo) and trains
    adapters: loaded from `adapter`, else injected as `spec` (adapter_spec) says. cached: the batches carry text
    embeddings and latents (data.py cache), so no AE or text encoder is loaded."""
    cfg = M.get_config(preset)
    if cached and stage == "base":
        raise D.InputError("--stage base trains the text encoder: it cannot read precomputed text embeddings")
    wdtype = M.weight_dtype(device)                          # frozen weights
    if preset == "toy":
        torch.manual_seed(seed)
        flux, text = M.Flux(cfg), M.ByteTextEncoder(cfg)
        if init:
            M.load_state_dict_strict(flux, os.path.join(init, "flux.safetensors"))      # fp32 (assets/toy: fp16)
            M.load_state_dict_strict(text, os.path.join(init, "text_encoder.safetensors"))
        elif stage != "base":
            raise M.CheckpointError("--init: adapter stages need a trained toy base (a --stage base output folder)")
        ae = M.AutoEncoder(cfg.ae)
    else:
        if stage == "base":
            raise D.InputError("--stage base trains the toy preset only (FLUX is the base at full scale)")
        flux = M.load_flux(cfg, init, device, wdtype)
        # with a cache the 9 GB T5 and the VAE are never loaded
        ae = None if cached else M.load_ae(cfg, device=device, dtype=wdtype)
        text = None if cached else M.T5CLIPEncoder(cfg.max_txt_len, dtype=wdtype)
    if cached:                                                # the toy's encoders are unused too
        ae = text = None
    flux = flux.to(device)
    text = text and text.to(device)
    ae = ae and ae.to(device).requires_grad_(False)
    flux.grad_checkpoint = grad_checkpoint
    if stage == "base":
        return flux, ae, text, list(flux.parameters()) + list(text.parameters()), None
    if text is not None:
        text.requires_grad_(False)
    acfg = ML.load_adapter(flux, adapter) if adapter else ML.inject(flux, **spec)
    flux.to(device)                                           # new adapter tensors onto the device, fp32
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
    """What one training forward runs, and what DDP wraps: prompts through the text encoder (trained in the
    base stage, frozen after), then the DiT. Frozen parameters are never synchronized by DDP."""
    def __init__(self, flux, text):
        super().__init__()
        self.flux, self.text = flux, text

    def forward(self, cond, inp, timesteps, guidance, probe=None):
        # cond: the prompts, or (txt, y) precomputed by `data.py cache` (then there is no text encoder);
        # inp: model.prepare's image side of the sequence, its img the noisy target x_t
        txt, y = self.text(cond) if self.text is not None else cond               # (B, L_txt, C), (B, C_vec)
        return self.flux(**inp, txt=txt, txt_ids=M.text_ids(txt), y=y, timesteps=timesteps, guidance=guidance,
                         probe=probe)

def conditioning(batch, denoiser, device):
    # what Denoiser.forward takes as cond: prompts, or a cache's text embeddings
    if denoiser.text is not None:
        return batch["prompts"]
    return batch["txt"].to(device).float(), batch["y"].to(device).float()

@torch.no_grad()
def encode_batch(batch, ae, device, pe="d", refs=True):
    """A batch's target and references (or a cache's latents) -> model.prepare's image side of the joint sequence:
    img (B, L, C) the packed clean target x0, its ids, the packed references and their UNO ids (none: refs=False)."""
    if ae is None:
        x0, B, N = batch["latent"].to(device).float(), *batch["ref_latents"].shape[:2]
        ref_lat = batch["ref_latents"].to(device).flatten(0, 1).float()
    else:
        with M.autocast(device):
            x0 = ae.encode(batch["target"].to(device)).float()                    # (B, z, h, w)
            B, N = batch["refs"].shape[:2]
            ref_lat = ae.encode(batch["refs"].to(device).flatten(0, 1)).float()   # (B*N, z, r, r)
    ref_lat = ref_lat.unflatten(0, (B, N))
    return M.prepare(x0, [ref_lat[:, i] for i in range(N)] if refs else [], pe)

def guidance_for(flux, B, device):
    # UNO trains with guidance 1; models without a guidance input (schnell) take none
    return torch.full((B,), 1.0, device=device) if flux.cfg.guidance_embed else None

@torch.no_grad()
def attention_metrics(denoiser, ae, dataset, device, batch_size, attn_blocks=None, pe="d", t_eval=0.5, max_batches=8):
    """Held-out Dice and attention share (mass of each subject's map inside its own mask, and inside the other
    subjects' masks) at a fixed noise level, with the flow-matching loss: did L_attn localize attention where it
    should? Teacher-forced on the dataset's targets (no sampling)."""
    was_training = denoiser.training
    denoiser.eval()
    sums, n = {"dice": 0.0, "share_own": 0.0, "share_other": 0.0, "diff": 0.0}, 0
    gen = torch.Generator().manual_seed(1234)
    for idx in D.batches(dataset, batch_size, seed=0, epoch=0, drop_last=False)[:max_batches]:
        batch = D.collate([dataset[i] for i in idx])
        inp = encode_batch(batch, ae, device, pe)
        x0 = inp["img"]
        B, N = batch["masks"].shape[:2]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        probe = M.AttentionProbe(attn_blocks)
        with M.autocast(device):
            pred = denoiser(conditioning(batch, denoiser, device), dict(inp, img=(1 - t_eval) * x0 + t_eval * noise),
                            torch.full((B,), t_eval, device=device), guidance_for(denoiser.flux, B, device), probe)
        maps, masks = probe.mean_map().float(), batch["masks"].to(device)        # (B, N, L_img) each
        own = (maps * masks).sum(-1)                                                    # (B, N)
        other = (maps * (masks.sum(1, keepdim=True) - masks).clamp(0, 1)).sum(-1)
        sums["dice"] += LS.dice_loss(maps, masks, batch["mask_valid"].to(device)).item() * B
        sums["share_own"] += own.mean(1).sum().item()
        sums["share_other"] += other.mean(1).sum().item()
        sums["diff"] += (pred.float() - (noise - x0)).pow(2).mean().item() * B
        n += B
    denoiser.train(was_training)
    return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}

# -----------------------------------------------------------------------------
# IPPO's rollout and the policy's log-probabilities (train_rl.py's stage 3; bench.py measures them too)

def expand(z, B):
    return z.expand(B, *z.shape[1:])

def velocity(flux, x, c, t, guidance):
    """v_theta(x, t) for x (B, L, C) under one conditioning c (batch 1, shared by the group: expanded)."""
    B, dev = x.shape[0], x.device
    with M.autocast(dev):
        v = flux(x, expand(c["img_ids"], B), expand(c["txt"], B), expand(c["txt_ids"], B),
                 torch.full((B,), t, device=dev), expand(c["y"], B), torch.full((B,), guidance, device=dev),
                 [expand(r, B) for r in c["ref_img"]], [expand(r, B) for r in c["ref_img_ids"]])
    return v.float()

@torch.no_grad()
def rollout(flux, c, G, timesteps, window, eta, guidance, gen):
    """One group (Algorithm 1, lines 6-15). c: model.sampling_inputs' output (its img is the group's one noise).
    -> final latents (G, L, C), window record dict(x, x_next (G, w, L, C), old_logp (G, w)), DiT rows used."""
    x, rows, xs, nxt, lps = c["img"].float(), 0, [], [], []
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        if i == window.start:
            x = x.repeat(G, 1, 1)                                     # the group splits where the noise enters
        v = velocity(flux, x, c, t, guidance)
        rows += x.shape[0]
        if i in window:                                               # SDE step: pi_old's sample and log-prob
            x_next, lp, _, _ = M.sde_step(x, v, t, t_next, eta, noise=torch.randn(x.shape, generator=gen).to(x))
            xs.append(x)
            nxt.append(x_next)
            lps.append(lp)
        else:                                                         # ODE step (Euler), deterministic
            x_next = M.euler_step(x, v, t, t_next)
        x = x_next
    return x, dict(x=torch.stack(xs, 1), x_next=torch.stack(nxt, 1), old_logp=torch.stack(lps, 1)), rows

class WindowPolicy(torch.nn.Module):
    """log pi_theta(x_t+1 | x_t) of recorded window steps: what DDP wraps. All w steps run inside one forward,
    so DDP sees one forward per backward; the w graphs are what the update holds in memory (not T)."""
    def __init__(self, flux):
        super().__init__()
        self.flux = flux

    def forward(self, c, x, x_next, steps, eta, guidance):
        # x, x_next (B, w, L, C); steps: the window's [(t, t_next)] -> logp (B, w), mean (B, w, L, C), std [w]
        out = [M.sde_step(x[:, j], velocity(self.flux, x[:, j], c, t, guidance), t, t_next, eta, prev=x_next[:, j])
               for j, (t, t_next) in enumerate(steps)]
        return torch.stack([o[1] for o in out], 1), torch.stack([o[2] for o in out], 1), [o[3] for o in out]

def kl_to_base(flux, c, x, x_next, mean, std, steps, eta, guidance):
    """KL(pi_theta || pi_base) per trajectory (B,), mean over window steps and elements. Both policies are
    Gaussians with the step's std, so per element KL = (mu_theta - mu_base)^2 / (2 std^2) exactly (Flow-GRPO
    uses the same form without the step's dt in std). pi_base: the same model with its adapters off."""
    with torch.no_grad(), ML.disabled(flux):
        base = torch.stack([M.sde_step(x[:, j], velocity(flux, x[:, j], c, t, guidance), t, t_next, eta,
                                       prev=x_next[:, j])[2] for j, (t, t_next) in enumerate(steps)], 1)
    kl = [((mean[:, j] - base[:, j]) ** 2 / (2 * std[j] ** 2)).flatten(1).mean(1) for j in range(len(steps))]
    return torch.stack(kl, 1).mean(1)

# -----------------------------------------------------------------------------
# command-line types: every count, size and rate is checked by argparse before any work (one line, exit status 2)

class Parser(argparse.ArgumentParser):
    """argparse, its errors on one line (no usage block): `prog: error: argument --lr: ...`, exit status 2."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

def int_in(lo, hi=None):
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}" + (f" and at most {hi}" if hi else ""))
        return v
    return parse

def float_in(lo, hi=math.inf, above=False):
    """An argparse type: a finite number >= lo (> lo where above), <= hi. nan and inf are refused: one of them in a
    weight or a rate turns every parameter into NaN at the first step."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(v) or v < lo or (above and v == lo) or v > hi:
            raise argparse.ArgumentTypeError(f"{s} must be finite and {'>' if above else '>='} {lo:g}" +
                                             (f" and <= {hi:g}" if hi < math.inf else ""))
        return v
    return parse

positive, count = int_in(1), int_in(0)                    # counts where 0 means nothing / where 0 is meaningful
weight, positive_float = float_in(0.0), float_in(0.0, above=True)
# AdamW moves every weight by about lr per step whatever the gradient's scale, so an lr of 1 already changes each
# weight by its own magnitude each step: above that no run learns; the bound catches typos such as 1e3 for 1e-3
MAX_LR = 1.0
learning_rate = float_in(0.0, MAX_LR, above=True)

def check_adapter_args(p, args):
    # what argparse cannot check flag by flag
    if args.experts and args.top_k > args.experts:
        p.error(f"argument --top-k: {args.top_k} must be at most --experts {args.experts}")

def add_run_args(p, ckpt_every, eval_every):
    """The run folder's flags, shared by both trainers."""
    g = p.add_argument_group("run (the folder --out holds one run; see training.Run)")
    g.add_argument("--out", required=True)
    how = g.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue from OUT's newest complete checkpoint")
    how.add_argument("--fresh", action="store_true", help="start over in an OUT that holds a run: the old run is "
                     f"moved to OUT/{PREVIOUS}/ and removed when the new run's first checkpoint is written")
    # every noise is seeded by seed * 1_000_003 + its index: under 2^32 that stays inside a generator's 64 bits
    g.add_argument("--seed", type=int_in(0, 2 ** 32 - 1), default=0)
    g.add_argument("--ckpt-every", type=positive, default=ckpt_every)
    g.add_argument("--keep", type=positive, default=2, help="checkpoints kept")
    g.add_argument("--eval-every", type=positive, default=eval_every)
    g.add_argument("--device", default=None)
    g.add_argument("--dist-timeout", type=positive_float, default=600, help="seconds a rank waits for the others in "
                   "a collective before the job stops (a dead or hung rank; rank 0 also checkpoints meanwhile)")
    return g

def resolved(value, default):
    # a flag left unset takes its default; a value given (0 included) is kept
    return default if value is None else value

# -----------------------------------------------------------------------------
# checkpoints: OUT/ckpt-STEP folders written by a protocol that no kill can break (write_checkpoint), and read back
# by what the folder holds, not by what `latest` says (a copy can make it a real folder, a kill can leave it behind)

class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: in use, holds another run, no complete checkpoint to resume."""

class Stopped(Exception):
    """SIGTERM / SIGINT: the run saved a checkpoint at a step boundary and stops; exit status 128 + the signal."""
    def __init__(self, signum, message):
        super().__init__(message)
        self.status = 128 + signum

CKPT = re.compile(r"ckpt-(\d+)$")
MARKER = "checkpoint.json"          # written last into a checkpoint: its step, its ranks, each file's size
PREVIOUS = "previous"               # the run --fresh moved aside, until the new run's first checkpoint
MOVING = "previous.part"            # ... while it is being moved
RUN_ENTRIES = ("latest", "log.jsonl", "best.safetensors")    # with ckpt-*: what makes a folder hold a run
GARBAGE = (".tmp-ckpt-", ".old-", ".latest.tmp")           # a killed write's leftovers: removed on opening

def checkpoint_hook(stage, step):
    """Called after each stage of write_checkpoint (its names: "begin", each file's name, "marker", "aside",
    "renamed", "unlinked-latest", "latest", "rotated", "previous", "done"). The fault harness kills the process
    there with MULTICRAFTER_KILL_AT=STAGE@STEP; tests replace it."""
    if os.environ.get("MULTICRAFTER_KILL_AT") == f"{stage}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)

def write_bytes(f, data):
    """The one writer of checkpoint bytes (a test replaces it with one that fills the disk)."""
    f.write(data)

class _Sink:
    # the file torch.save writes to: it keeps the OSError a write raised (torch reports any as "unexpected pos")
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            write_bytes(self.f, b)
        except OSError as e:
            self.error = self.error or e
            raise
        return len(b)

    def flush(self):
        self.f.flush()

def write_file(path, produce):
    """produce(file) writes path's content, then it is flushed to the disk (fsync). -> its size in bytes. A failed
    write is its OSError (ENOSPC: the disk is full), whoever wrote."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            produce(sink)
        except Exception:
            if sink.error:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)

def fsync_dir(path):
    # a rename is on the disk once its folder is
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def incomplete(path):
    """Why the checkpoint folder `path` is not whole (no marker, a file missing or of another size than the marker
    recorded: an interrupted copy), or None."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{marker}: missing or unreadable (an interrupted write or copy)"
    for name, size in files.items():
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have != size:
            return f"{file}: " + ("missing" if have is None else f"{have} bytes where its checkpoint recorded "
                                                                f"{size} (an interrupted copy?)")
    return None

def checkpoints(out):
    """OUT's checkpoint folders, newest first -> [(step, path, why it is incomplete or None)]."""
    found = []
    for name in os.listdir(out):
        m, path = CKPT.match(name), os.path.join(out, name)
        if m and os.path.isdir(path) and not os.path.islink(path):
            found.append((int(m.group(1)), path, incomplete(path)))
    return sorted(found, reverse=True)

def newest(out):
    # -> (step, path) of the newest complete checkpoint, or (None, None)
    return next(((s, p) for s, p, why in checkpoints(out) if why is None), (None, None))

def discard(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)

def remove(path):
    # a folder goes in two steps: renamed out of the way (atomic), then deleted (a kill leaves only garbage)
    if os.path.lexists(path):
        aside = os.path.join(os.path.dirname(path), ".old-" + os.path.basename(path))
        discard(aside)
        os.replace(path, aside)
        discard(aside)

def point_latest(out, name, step):
    # OUT/latest -> name: a new symlink renamed over the old one (atomic). A real folder (a cp -rL or rsync copy
    # of the run) cannot be renamed over: it is moved aside first
    latest, link = os.path.join(out, "latest"), os.path.join(out, ".latest.tmp")
    if os.path.isdir(latest) and not os.path.islink(latest):
        remove(latest)
        checkpoint_hook("unlinked-latest", step)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(name, link)
    os.replace(link, latest)
    fsync_dir(out)

def write_checkpoint(out, step, files, world, keep):
    """The protocol: OUT/.tmp-ckpt-STEP gets every file ({name: produce(file)}, each fsynced) and last the marker,
    then is renamed to OUT/ckpt-STEP; then `latest` is swapped, this run's older checkpoints beyond `keep` go, and so
    does the run --fresh moved aside. A kill at any point leaves the last complete checkpoint and at worst garbage
    that the next opening removes; checkpoint_hook runs after each stage."""
    name = f"ckpt-{step:07d}"
    tmp, final = os.path.join(out, f".tmp-{name}"), os.path.join(out, name)
    checkpoint_hook("begin", step)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        sizes = {}
        for file, produce in files.items():
            sizes[file] = write_file(os.path.join(tmp, file), produce)
            checkpoint_hook(file, step)
        marker = json.dumps({"step": step, "world": world, "files": sizes}).encode()
        write_file(os.path.join(tmp, MARKER), lambda f: f.write(marker))
        fsync_dir(tmp)
        checkpoint_hook("marker", step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(final):       # a ckpt-STEP already there (an incomplete copy, or the same step of a run
        remove(final)                # resumed from before it): ours replaces it
        checkpoint_hook("aside", step)
    os.replace(tmp, final)
    fsync_dir(out)
    checkpoint_hook("renamed", step)
    point_latest(out, name, step)
    checkpoint_hook("latest", step)
    # rotation: only checkpoints older than this one (never a higher-numbered one, whoever wrote it)
    for _, path, _ in [c for c in checkpoints(out) if c[0] < step][keep - 1:]:
        remove(path)
    checkpoint_hook("rotated", step)
    remove(os.path.join(out, PREVIOUS))              # the new run has its first checkpoint: the old one may go
    checkpoint_hook("previous", step)
    checkpoint_hook("done", step)

def first_non_finite(named):
    # the name of the first floating tensor holding a NaN or an inf, or None
    return next((n for n, t in named if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()),
                None)

def checkpoint_files(step, flux, text, acfg, opt, args, consumed, world):
    """What ckpt-STEP holds -> ({file: produce(file)}, the name of a non-finite tensor or None): the weights (the
    whole toy model in the base stage, in sample.py's toy-folder format; else the adapter), the optimizer state with
    the data position `consumed` (global micro-batches for train_sft, prompts for train_rl) and the ranks, and the
    arguments."""
    if acfg is None:
        weights = {"flux.safetensors": ({k: v.contiguous() for k, v in flux.state_dict().items()}, None),
                   "text_encoder.safetensors": ({k: v.contiguous() for k, v in text.state_dict().items()}, None)}
    else:
        weights = {"adapter.safetensors": ML.adapter_file(flux, acfg, {"step": str(step)})}
    state = {"step": step, "consumed": consumed, "world": world, "optimizer": opt.state_dict()}
    named = [(k, v) for sd, _ in weights.values() for k, v in sd.items()] + \
        [(f"optimizer state {k} of parameter {i}", v) for i, s in state["optimizer"]["state"].items()
         for k, v in s.items()]
    files = {f: (lambda f, sd=sd, meta=meta: f.write(save_safetensors(sd, metadata=meta)))
             for f, (sd, meta) in weights.items()}
    files["train_state.pt"] = lambda f: torch.save(state, f)
    files["args.json"] = lambda f: f.write(json.dumps(vars(args), indent=2).encode())
    return files, first_non_finite(named)

def load_checkpoint(path, flux, text, acfg, opt):
    """A checkpoint folder into the models and the optimizer -> (step, consumed, ranks that saved it). A checkpoint
    that is unreadable or belongs to another run (other adapters, another optimizer) is one CheckpointError naming
    the file."""
    if not os.path.isdir(path):
        raise M.CheckpointError(f"{path}: not a checkpoint folder")
    if acfg is None:            # copied into the parameters the optimizer holds (assigning new ones would leave it
        M.load_state_dict_strict(flux, os.path.join(path, "flux.safetensors"), assign=False)     # updating the old)
        M.load_state_dict_strict(text, os.path.join(path, "text_encoder.safetensors"), assign=False)
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
# the run folder: one run, one writer, never lost

def lock(out):
    """OUT/.lock, held for the life of this process (flock: the kernel lets go when the process ends, however it
    ends), with our pid and host written in it -> its descriptor. Another holder: a RunFolderError naming it."""
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(f"{out} is in use by {holder}: one trainer writes a run folder at a time (wait for it "
                             f"to end, or give another --out)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd

def trim_log(path, step):
    """OUT/log.jsonl as of checkpoint `step`: a killed run logged steps after it (they run again) and may have torn
    its last line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("step", rec.get("iter", 0)) <= step:
                kept.append(line.rstrip(b"\n") + b"\n")
    D.write_atomic(path, lambda f: f.writelines(kept))

def flag(name):
    return "--" + name.replace("_", "-")

def compare_args(saved, now, may_change, per_step, saved_world, world, where):
    """The arguments a checkpoint was saved with against this run's -> a note naming the deliberate changes (the
    flags in may_change) or None. A change of any other flag would make the resumed run something other than the
    saved run's continuation (other data or data order, another model or adapter shape, another stage or
    procedure): a RunFolderError naming each. per_step: the flag that, times the ranks, is the global number of
    micro-batches (or prompts) per step; the ranks may change where that product does not."""
    now = json.loads(json.dumps(now))                        # as args.json holds it (tuples -> lists)
    changed = [k for k in now if k not in ("out", "resume", "fresh") and saved.get(k, "(unset)") != now[k]]
    say = lambda ks: ", ".join(f"{flag(k)} {saved.get(k, '(unset)')} -> {now[k]}" for k in ks)
    refused = [k for k in changed if k not in may_change]
    if saved.get(per_step, 0) * saved_world != now[per_step] * world:
        refused.append(f"the global batch ({saved_world} rank(s) x {flag(per_step)} {saved.get(per_step)} -> "
                       f"{world} x {now[per_step]})")
    if refused:
        raise RunFolderError(f"{where}: resuming needs the settings it was saved with: "
                             f"{say(k for k in refused if k in now)}" +
                             "".join(f", {k}" for k in refused if k not in now) +
                             " (change them back, or use another --out or --fresh)")
    noted = [k for k in changed if k in may_change]
    return f"note: resuming {where} with {say(noted)}" if noted else None

class Run:
    """The folder --out holds one run, for the life of a trainer (a context manager):
    - one writer: rank 0 holds OUT/.lock (lock); the other ranks never touch the folder but to read the checkpoint
      rank 0 chose (every decision is rank 0's, broadcast);
    - a folder holding a run (ckpt-*, latest, log.jsonl, best.safetensors) is refused without --resume or --fresh;
      --fresh moves that run to OUT/previous/ (write_checkpoint removes it once the new run has a checkpoint, so a
      kill in between loses nothing);
    - --resume takes the newest complete checkpoint (whatever `latest` says), after comparing its args.json;
    - save(): non-finite weights are never written, a failed write (a full disk) is one line and leaves the last
      checkpoint intact;
    - SIGTERM / SIGINT set a flag; at the next step boundary (step_done) the run saves and stops (Stopped)."""

    def __init__(self, args, argv, script, may_change, per_step, ddp, rank, world, device):
        self.out, self.args, self.argv, self.script = args.out, args, list(argv), script
        self.may_change, self.per_step = may_change, per_step
        self.ddp, self.master, self.world, self.device = ddp, rank == 0, world, device
        self.fd, self.signum, self.handlers = None, 0, {}
        self.last = None                    # (step, path) of this run's newest checkpoint, on every rank
        self.resume_from = None             # the checkpoint to resume (a path), or None: start at step 0

    def __enter__(self):
        try:
            verdict = self._open() if self.master else None
        except (OSError, RunFolderError) as e:
            verdict = ("error", str(e) if isinstance(e, RunFolderError) else
                       f"{self.out}: cannot use it as the run folder ({e.strerror or e})")
        except BaseException:
            self.__exit__()
            raise
        verdict = self._agree(verdict)
        if verdict[0] == "error":
            self.__exit__()
            raise RunFolderError(verdict[1])
        self.resume_from = verdict[1]
        self.last = newest_of(verdict[1])
        if threading.current_thread() is threading.main_thread():
            self.handlers = {s: signal.signal(s, self._signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.handlers.items():
            signal.signal(s, h)
        self.handlers = {}
        if self.fd is not None:
            os.close(self.fd)                      # the lock goes with it
            self.fd = None

    def _agree(self, value):
        # rank 0's value on every rank (a collective: the other ranks wait for rank 0 here)
        if self.ddp:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def _open(self):
        """Rank 0: lock the folder, tidy it, decide -> ("ok", the checkpoint to resume or None)."""
        out, args = self.out, self.args
        os.makedirs(out, exist_ok=True)
        self.fd = lock(out)
        for name in os.listdir(out):
            if name.startswith(GARBAGE):
                discard(os.path.join(out, name))
        if os.path.isdir(os.path.join(out, MOVING)):          # a --fresh that was killed while moving: finish it
            self._move_aside()
        found = checkpoints(out)
        done = [(s, p) for s, p, why in found if why is None]
        holds = found or any(os.path.lexists(os.path.join(out, n)) for n in RUN_ENTRIES)
        if args.resume:
            if not done:
                if found:
                    raise RunFolderError(f"{found[0][2]}; {out} holds no complete checkpoint to resume from")
                print0(f"note: {out} holds no checkpoint yet: starting at step 0")
                trim_log(os.path.join(out, "log.jsonl"), -1)
                return ("ok", None)
            step, path = done[0]
            for s, _, why in found:
                if why and s > step:
                    print0(f"note: skipping an incomplete checkpoint: {why}")
            with open(os.path.join(path, MARKER)) as f:
                saved_world = json.load(f).get("world", 1)
            try:
                with open(os.path.join(path, "args.json")) as f:
                    saved = json.load(f)
                assert isinstance(saved, dict)
            except (OSError, ValueError, AssertionError):
                raise RunFolderError(f"{os.path.join(path, 'args.json')}: not a JSON object of arguments") from None
            note = compare_args(saved, vars(args), self.may_change, self.per_step, saved_world, self.world, path)
            if note:
                print0(note)
            point_latest(out, os.path.basename(path), step)   # `latest` names what we resume, whatever it said
            trim_log(os.path.join(out, "log.jsonl"), step)
            if os.path.lexists(os.path.join(out, PREVIOUS)):  # its first checkpoint was written: the old run may go
                remove(os.path.join(out, PREVIOUS))
            return ("ok", path)
        if holds and not args.fresh:
            step = done[0][0] if done else 0
            raise RunFolderError(f"{out} holds a run at step {step}: pass --resume to continue, or another --out "
                                 f"(or --fresh to start over)")
        if holds:
            self._move_aside(bool(done))
        return ("ok", None)

    def _move_aside(self, newer=True):
        """--fresh: every run entry of OUT into OUT/previous.part, then that renamed to OUT/previous. A previous/
        already there is an earlier run that --fresh replaced: it goes if the run after it saved a checkpoint
        (newer), else it stays (it holds the newest checkpoints) and what the run after it left goes."""
        out = self.out
        prev, part = os.path.join(out, PREVIOUS), os.path.join(out, MOVING)
        entries = [n for n in os.listdir(out) if CKPT.match(n) or n in RUN_ENTRIES]
        if os.path.lexists(prev) and not os.path.isdir(part):
            if not newer:
                for n in entries:
                    remove(os.path.join(out, n))
                return
            remove(prev)
        os.makedirs(part, exist_ok=True)
        for n in entries:
            os.replace(os.path.join(out, n), os.path.join(part, n))
        os.replace(part, prev)
        fsync_dir(out)
        print0(f"note: --fresh: the run that was in {out} is now in {prev} (removed at this run's first checkpoint)")

    # ---- saving ----

    def save(self, step, flux, text, acfg, opt, consumed):
        """Every rank calls it; rank 0 writes OUT/ckpt-STEP (write_checkpoint). Non-finite weights or optimizer state
        are not written; a failed write leaves the last checkpoint: both a TrainingError on every rank."""
        if hasattr(opt, "consolidate_state_dict"):
            opt.consolidate_state_dict(to=0)                 # ZeRO: gather the sharded optimizer state first
        error = None
        if self.master:
            files, bad = checkpoint_files(step, flux, text, acfg, opt, self.args, consumed, self.world)
            if bad:
                error = (f"step {step}: {bad} is not finite (the run diverged: try a lower --lr): not saved; "
                         f"{self.intact()}")
            else:
                try:
                    write_checkpoint(self.out, step, files, self.world, self.args.keep)
                except OSError as e:
                    why = "disk full" if e.errno == errno.ENOSPC else f"{e.strerror or e} ({e.filename})"
                    error = f"{self.out}: {why} writing checkpoint {step}; {self.intact(newest(self.out))}"
        error = self._agree(error)
        if error:
            raise TrainingError(error)
        self.last = (step, os.path.join(self.out, f"ckpt-{step:07d}"))

    def intact(self, last=None):
        step, path = last or self.last or (None, None)
        return f"checkpoint {step} intact ({path})" if path else "no checkpoint saved yet"

    # ---- stopping on a signal ----

    def _signal(self, signum, frame):
        if self.signum:                      # a second one: stop now, as if no handler were there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        print0(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
               f"(again: stop now)")

    def step_done(self, step, due, flux, text, acfg, opt, consumed):
        """The end of a step: save if a checkpoint is due or a signal came (all ranks agree: the flag is
        all-reduced), and then stop with Stopped."""
        signum = self.signum
        if self.ddp:
            t = torch.tensor([signum], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        if due or (signum and not (self.last and self.last[0] == step)):
            self.save(step, flux, text, acfg, opt, consumed)
        if signum:
            raise Stopped(signum, f"stopped by {signal.Signals(signum).name} at step {step}: {self.intact()}; "
                                  f"continue with: {self.resume_command()}")

    def resume_command(self):
        launcher = ["python"] if not self.ddp else ["torchrun", f"--nproc_per_node={self.world}"]
        argv = [a for a in self.argv if a not in ("--fresh", "--resume")]
        return shlex.join(launcher + [self.script] + argv + ["--resume"])

def newest_of(path):
    # a checkpoint folder -> (its step, path), or None
    return (int(CKPT.match(os.path.basename(path)).group(1)), path) if path else None

# -----------------------------------------------------------------------------
# the command line

USER_ERRORS = (M.CheckpointError, D.DataError, D.InputError, TrainingError, RunFolderError)

def cli(main, argv=None, errors=USER_ERRORS):
    """main(argv) as the command line runs it: a user's mistake (bad data, bad weights, a diverged run, a used run
    folder) is one line on stderr and exit status 2, never a traceback; a run stopped by a signal says how to resume
    and exits with 128 + the signal. -> exit status."""
    try:
        main(argv)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print0(e)
        return e.status
    return 0

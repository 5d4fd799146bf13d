"""
Stage 3 of MultiCrafter: Identity-Preserving Preference Optimization (IPPO; section 4.4, Algorithm
1). GSPO over a MixGRPO sliding window of SDE steps inside an ODE trajectory, rewarded by Eq. 9.

One iteration m:
  1. rollout (training.rollout) with the current weights (pi_old), no grad. For each prompt +
     references, G samples from ONE initial noise: Euler ODE steps outside the window W(l) =
     [l, l + w), Flow-GRPO SDE steps inside (fp32). The group is identical until the window
     (same noise, deterministic steps), so that prefix runs once at batch 1 and the group splits
     where the noise enters: l + G (T - l) DiT evaluations, at most G T. Each window step keeps
     (x_t, x_t+1, log pi_old(x_t+1 | x_t)): old log-probs are recorded, never recomputed.
  2. reward (Eq. 9) of each decoded image; advantages normalized within the group (Eq. 3), clamped.
  3. update: each group's G trajectories are split into --minibatches, one optimizer step each; the
     window steps are scored under pi_theta (G w DiT evaluations with grad over the iteration:
     memory grows with w, not T), s_i = exp(mean_t log pi_theta - log pi_old) (Eq. 7) and GSPO's
     clipped loss (Eq. 8), + beta KL to the base model (adapters off). The first minibatch has s =
     1; later ones are off-policy and the clip can act.
  4. every tau iterations the window moves s steps on, never past the last step: l =
     min(l + s, T - w).

    python train_rl.py --init runs/base/latest --adapter runs/multi/latest/adapter.safetensors \\
        --data data/toy/manifest.jsonl --val-data data/toy_val/manifest.jsonl --out runs/rl --iters 200
    torchrun --nproc_per_node=2 train_rl.py ...                       # DDP: each rank rolls out its own prompts
    torchrun --nproc_per_node=16 train_rl.py --preset flux-dev --adapter multi/adapter.safetensors \\
        --data rl.jsonl --reward human --steps 16 --window 2 --tau 50 --stride 1 --group 12 --grad-checkpoint \\
        --out runs/flux_rl
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

import cli as CL
import flux2 as F2
import losses as LS
import model as M
import moe_lora as ML
import toy
import runs
import training as TR
import data as D
import dataset as DS
import sampling as SM
import weights as WT
from data import InputError, write_atomic
from sampling import decode_images
from weights import CheckpointError, read_header
from rewards import (RewardModelError, add_reward_args, build_reward, missing_reward_models,
                     reward_weights)

def build_parser():
    p = CL.Parser(description=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="manifest.jsonl of prompts + references (targets are ignored)")
    g.add_argument("--val-data", default=None, help="held-out manifest: mean reward of ODE samples "
                   "at eval steps; the best adapter is kept as OUT/best.safetensors")
    g.add_argument("--val-n", type=CL.positive, default=32,
                   help="held-out records evaluated (by rank 0, while the other "
                   "ranks wait at their next collective: keep it small under torchrun)")
    g.add_argument("--val-seeds", type=CL.positive, default=2, help="samples per held-out record")
    g.add_argument("--size", type=CL.positive, default=None,
                   help="image side in px (default: the preset's, 32 toy, 512 flux)")
    g.add_argument("--ref-size", type=CL.positive, default=None,
                   help="reference side in px (default: the preset's, 16 toy, "
                   "320 flux)")
    TR.add_model_args(p)
    g = p.add_argument_group("IPPO (paper: T 16, w 2, tau 50, s 1)")
    g.add_argument("--steps", type=CL.positive, default=16, help="sampling steps T")
    g.add_argument("--window", type=CL.positive, default=2, help="SDE window size w")
    g.add_argument("--tau", type=CL.positive, default=50, help="iterations between window moves")
    g.add_argument("--stride", type=CL.count, default=1,
                   help="steps the window moves each time (0: frozen)")
    g.add_argument("--group", type=CL.int_in(2), default=12,
                   help="samples per prompt G (one initial noise)")
    g.add_argument("--eta", type=CL.weight, default=0.7,
                   help="SDE noise level (Flow-GRPO / MixGRPO 0.7)")
    g.add_argument("--guidance", type=CL.weight, default=None,
                   help="distilled guidance (default: the preset's sampling "
                   "guidance, 3.5 flux, 1 toy)")
    g.add_argument("--ref-guidance", type=CL.weight, default=None, help="classifier-free guidance "
                   "on the references in rollouts, the policy's log-probs and validation, as "
                   "sample.py guides (default: the preset's, toy 4, flux 1): IPPO then optimizes "
                   "the sampler that is scored")
    g.add_argument("--text-guidance", type=CL.weight, default=None, help="guidance on the prompt, "
                   "likewise (default: the preset's, toy 2 for a base trained "
                   "on the empty prompt, else 1)")
    g.add_argument("--clip-low", type=CL.weight, default=3e-4,
                   help="GSPO clip: s >= 1 - clip_low (GSPO 3e-4)")
    g.add_argument("--clip-high", type=CL.weight, default=4e-4,
                   help="GSPO clip: s <= 1 + clip_high (GSPO 4e-4)")
    g.add_argument("--adv-clip", type=CL.positive_float, default=5.0,
                   help="advantages clamped to +-this (MixGRPO 5)")
    g.add_argument("--kl", type=CL.weight, default=0.0,
                   help="beta: KL to the base model with adapters off")
    add_reward_args(p)
    g = p.add_argument_group("optimization")
    g.add_argument("--iters", type=CL.count, default=300, help="training iterations M (paper 300)")
    g.add_argument("--prompts", type=CL.positive, default=1,
                   help="prompts per rank per iteration (paper: 1, 16 GPUs)")
    g.add_argument("--minibatches", type=CL.positive, default=2,
                   help="optimizer steps per rollout (split of each group)")
    g.add_argument("--micro-batch", type=CL.positive, default=None, help="trajectories per forward "
                   "(default: a whole minibatch share of a group); fewer saves memory")
    g.add_argument("--lr", type=CL.learning_rate, default=1e-4,
                   help=f"finite, > 0, <= {CL.MAX_LR:g}")
    g.add_argument("--weight-decay", type=CL.weight, default=1e-4)
    g.add_argument("--grad-clip", type=CL.positive_float, default=1.0, help="gradient norm clip")
    g.add_argument("--max-bad-steps", type=CL.positive, default=20, help="stop after this many "
                   "non-finite updates in a row")
    TR.add_log_args(runs.add_run_args(p, ckpt_every=50, eval_every=50))
    return p

# on --resume these may differ from the checkpoint's args.json (a note names them); any other change
# is refused. The optimizer's settings, the reward's weights and models, the length, cadence,
# evaluation and hardware are deliberate changes; the prompts and their order (seed, prompts per
# iteration), sizes, the model, the adapters' shape and the IPPO procedure (T, window, tau, stride,
# group, eta, guidance, the reward's kind) make another run
MAY_CHANGE = {"wandb", "lr", "weight_decay", "grad_clip", "max_bad_steps", "minibatches",
              "micro_batch", "clip_low", "clip_high", "adv_clip", "kl", "w_text", "w_aes", "w_id",
              "clip", "preference", "preference_kind", "preference_processor", "face_pack",
              "face_root", "detector", "detector_kind", "dinov2", "sam2", "iters", "ckpt_every",
              "keep", "eval_every", "val_data", "val_n", "val_seeds", "device", "dist_timeout",
              "grad_checkpoint", "prompts", "fsdp", "compile"}

# -----------------------------------------------------------------------------
# the window schedule (Algorithm 1, lines 1 and 21-22) and the data order: pure functions of the
# iteration, so a resumed run needs no state beyond the step count

def window_start(m, T, w, tau, s):
    """Left edge l of W(l) at iteration m = 1, 2, ...: it starts at 0 and after every tau-th
    iteration moves to min(l + s, T - w), so the window [l, l + w) never runs past the last step T -
    1."""
    if not 1 <= w <= T:
        raise InputError(f"--window {w} must be between 1 and --steps {T}")
    return min(s * ((m - 1) // tau), T - w)

def record_of(n, seed, k):
    # the k-th prompt of the run: epochs of n records, each reshuffled by (seed, epoch)
    epoch, i = divmod(k, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[i])

# -----------------------------------------------------------------------------
# held-out evaluation: deterministic ODE samples, the same reward

@torch.no_grad()
def evaluate(flux, ae, text, dataset, reward, args, device):
    """Mean of every reward term over the first val_n records x val_seeds fixed seeds
    (Euler, no SDE)."""
    flux.eval()
    sums, n, fam = {}, 0, F2.family(flux.cfg)  # fam: the model family's sequence layout and sampler
    for i in tqdm(range(min(args.val_n, len(dataset))), desc="validation", leave=False):
        rec, images = dataset[i], []
        for k in range(args.val_seeds):
            c = fam.sampling_inputs(flux.cfg, ae, text, rec["prompt"], rec["refs"], args.size,
                                    args.size, 10_000 * k + i, args.pe, device,
                                    null_text=args.text_guidance != 1)
            x = fam.denoise(flux, **c, timesteps=args.timesteps, guidance=args.guidance,
                            progress=False,
                            ref_guidance=args.ref_guidance, text_guidance=args.text_guidance)
            images += decode_images(ae, x, args.size, args.size)
        terms = reward(images, rec["prompt"], rec["refs"], rec["captions"])
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        n += len(images)
    flux.train()
    return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}

# -----------------------------------------------------------------------------

def best_reward(path):
    """The held-out reward of OUT/best.safetensors, from its header; -inf without one. Nothing
    depends on that file: an unreadable one (a copy cut short) is a note, and the next validation's
    adapter replaces it."""
    if not os.path.exists(path):
        return -math.inf
    try:
        return float(read_header(path, metadata=True)[1]["val_total"])
    except (CheckpointError, KeyError, ValueError) as e:
        TR.print0(f"note: {path} is not a best adapter we wrote ({str(e)[:200]}): the "
                  "next validation replaces it")
        return -math.inf

def gather(values, ddp):
    # every rank's list of numbers -> one list (the logs cover all ranks' groups)
    if not ddp:
        return list(values)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]

# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    runs.check_adapter_args(p, args)
    TR.wandb_module(args.wandb)             # a missing optional package stops here, before any work
    TR.check_parallel_args(p, args)
    cfg = F2.get_config(args.preset)
    args.pe = runs.resolved(args.pe, F2.default_pe(cfg))
    args.size, args.ref_size = (runs.resolved(args.size, cfg.image_size),
                                runs.resolved(args.ref_size, cfg.ref_size))
    args.guidance = runs.resolved(args.guidance, cfg.guidance)
    args.ref_guidance, args.text_guidance = SM.guidance_scales(
        cfg, WT.learned_empty_prompt(args.preset, args.init if args.preset == "toy" else None),
        args.ref_guidance, args.text_guidance)
    args.micro_batch = runs.resolved(args.micro_batch, args.group // args.minibatches)
    preflight(args, cfg)

    # -------------------------------------------------------------------------
    # set-up: ranks and device, then the run folder (locked, checked, the checkpoint to resume
    # chosen) before any work
    ddp, rank, world, device = TR.setup_dist(args.device, args.dist_timeout)
    with runs.Run(args, argv, "train_rl.py", MAY_CHANGE, "prompts", ddp, rank, world,
                  device) as run:
        train(args, run, cfg, ddp, rank, world, device)
        if rank == 0:
            TR.summary(args, run, unit="iteration")

def preflight(args, cfg):
    """Everything this run can check before reading its prompts, loading a model or making its run
    folder: the data, the base and adapter, every FLUX weight and reward model, and the flags
    against each other, all named at once (offline and instant: nothing is downloaded)."""
    pf = D.Preflight()
    pf.file("--data", args.data)
    pf.file("--val-data", args.val_data)
    mult, G, n_mini = cfg.token_px, args.group, args.minibatches
    pf.need(args.size % mult == 0 and args.ref_size % mult == 0,
            f"--size {args.size} and --ref-size {args.ref_size} must be multiples of {mult}")
    if pf.need(G % n_mini == 0, f"--group {G} must be divisible by --minibatches {n_mini}"):
        pf.need((G // n_mini) % args.micro_batch == 0,
                f"--micro-batch {args.micro_batch} must divide a group's "
                f"minibatch share {G // n_mini}")
    pf.need(args.window <= args.steps,
            f"--window {args.window} must be between 1 and --steps {args.steps}")
    pf.need(args.pe != "t" or F2.is_flux2(cfg), "--pe t: FLUX.2's reference positions; "
            f"{args.preset} takes UNO's d, h, w or o")
    TR.check_model_args(pf, args, "rl")
    pf.problems += missing_reward_models(args)
    pf.check()

def train(args, run, cfg, ddp, rank, world, device):
    master = rank == 0      # rank 0 alone writes logs, checkpoints and runs the held-out evaluation
    G, P, n_mini = args.group, args.prompts, args.minibatches
    # the T-step schedule every rollout follows; the window picks which of its steps are stochastic
    args.timesteps = F2.family(cfg).get_schedule(args.steps, (args.size // cfg.token_px) ** 2,
                                                 shift=cfg.shift_schedule)

    # -------------------------------------------------------------------------
    # prompts, the reward (Eq. 9) and the policy: the frozen base with the stage-2 adapter, which
    # IPPO fine-tunes
    dataset = DS.PromptDataset(args.data, args.ref_size)
    # the held-out evaluation runs on rank 0 (FSDP: on every rank, each gathering the shards with
    # the others)
    val = (DS.PromptDataset(args.val_data, args.ref_size) if args.val_data and (master or args.fsdp)
           else None)
    reward = toy.reward_for(dataset.records, args.data, reward_weights(args)) \
        if args.reward == "toy" else build_reward(args, device)
    flux, ae, text, params, acfg = TR.build_models(args.preset, "rl", device, args.init,
                                                   args.adapter, TR.adapter_spec(args),
                                                   grad_checkpoint=args.grad_checkpoint,
                                                   seed=args.seed, ae=args.ae, t5=args.t5,
                                                   clip=args.clip_text, text_model=args.text_model)
    if args.compile:
        M.compile_blocks(flux)
    if args.fsdp:      # sharded, rooted at the DiT itself: rollouts and validation call it directly
        TR.shard(flux, flux)
        params = [p for p in flux.parameters() if p.requires_grad]  # FSDP's new, sharded parameters
    # DDP wraps the window's log-prob computation: that is the forward whose gradients the ranks
    # share
    policy = TR.WindowPolicy(flux).train()
    model = torch.nn.parallel.DistributedDataParallel(policy) if ddp and not args.fsdp else policy
    opt = TR.build_optimizer(params, args.lr, args.weight_decay)
    # the run's position: iterations done and prompts consumed; the window, the prompt order and
    # every noise are pure functions of them, so a resumed run needs nothing else
    step, consumed = 0, 0
    if run.resume_from:
        step, consumed, saved_world = runs.load_checkpoint(run.resume_from, flux, text, acfg, opt)
        TR.print0(f"resumed from iteration {step} at prompt {consumed} (saved by "
                  f"{saved_world} rank(s), now {world})")
    if master:
        TR.print0(f"IPPO, {args.preset}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable "
                  f"params, {len(dataset)} prompts, {world} rank(s) x {P} prompt(s) x group {G}, T "
                  f"{args.steps}, window {args.window}")
    log = TR.Log(args.out, master, TR.wandb_module(args.wandb), vars(args), args.wandb)
    def write(rec):
        if "val_total" in rec:
            TR.print0(json.dumps(rec))
        log.write(rec)
    def validate(m):
        # the held-out reward; the adapter with the best so far is also kept as OUT/best.safetensors
        # (its header holds the iteration and the reward, so a resumed run compares against it),
        # written as a checkpoint's files
        rec = {"iter": m, **evaluate(flux, ae, text, val, reward, args, device)}
        write(rec)
        best = os.path.join(args.out, "best.safetensors")
        better = [master and best_reward(best) < rec["val_total"]]
        if args.fsdp:
            dist.broadcast_object_list(better, src=0)    # rank 0's file decides: every rank gathers
        if better[0]:
            sd, meta = ML.adapter_file(flux, acfg, {"iter": str(m),
                                                    "val_total": repr(rec["val_total"])})
            if master:
                write_atomic(best, lambda f: f.write(save_safetensors(sd, metadata=meta)))
    if val is not None and step == 0:
        validate(0)

    # -------------------------------------------------------------------------
    # the training loop: Algorithm 1
    bad = TR.BadSteps(args.max_bad_steps, run)
    with tqdm(total=args.iters, initial=step, disable=not master, desc="IPPO") as bar:
        for m in range(step + 1, args.iters + 1):      # Algorithm 1 counts iterations from 1
            # the window W(l) = [l, l + w) of SDE steps for this iteration (it slides every tau
            # iterations)
            t0, l = time.time(), window_start(m, args.steps, args.window, args.tau, args.stride)
            window = range(l, l + args.window)
            steps = [(args.timesteps[i], args.timesteps[i + 1]) for i in window]
            # ---- 1-2. rollouts with pi_old = the current weights, rewards, advantages ----
            # the group shares one prompt, one set of references and one initial noise: its samples
            # differ only by the SDE noise inside the window, so the reward differences within a
            # group are what the policy did there
            groups, terms, rows_rollout = [], [], 0
            for j in range(P):
                k = consumed + rank * P + j            # the run's k-th prompt: same on 1 or N ranks
                item = dataset[record_of(len(dataset), args.seed, k)]
                seed = args.seed * 1_000_003 + 2 * k   # the initial noise; seed + 1 the SDE noise
                c = F2.family(cfg).sampling_inputs(cfg, ae, text, item["prompt"], item["refs"],
                                                   args.size, args.size, seed, args.pe, device,
                                                   null_text=args.text_guidance != 1)
                # TR.velocity guides with these
                c["scales"] = (args.ref_guidance, args.text_guidance)
                x0, traj, rows = TR.rollout(flux, c, G, args.timesteps, window, args.eta,
                                            args.guidance, torch.Generator().manual_seed(seed + 1))
                rows_rollout += rows
                images = decode_images(ae, x0, args.size, args.size)
                terms.append(reward(images, item["prompt"], item["refs"], item["captions"]))
                groups.append(dict(c=c, **traj))
            consumed += world * P
            # advantages are normalized within each group (Eq. 3): no value network, the group is
            # the baseline
            total = torch.tensor(np.stack([t["total"] for t in terms]))                     # (P, G)
            adv = LS.group_advantages(total, clip=args.adv_clip).to(device)                 # (P, G)

            # ---- 3. GSPO updates: minibatch q takes the q-th share of every group ----
            # the recorded window steps are scored again under pi_theta (with grad): only w DiT
            # calls per trajectory, whatever T is. The first minibatch is on-policy (ratio 1); later
            # ones see weights the earlier ones moved, which is where GSPO's clip (Eq. 8) acts
            share, b = G // n_mini, args.micro_batch
            ratios, clipped, losses, kls, gnorms = [], [], [], [], []
            for q in range(n_mini):
                chunks = [(p, slice(a, a + b)) for p in range(P)
                          for a in range(q * share, (q + 1) * share, b)]
                for i, (p, sl) in enumerate(chunks):
                    gr = groups[p]
                    # (FSDP: the sharded root, flux, is what reduces)
                    with TR.no_sync(flux if args.fsdp else model, last=i == len(chunks) - 1):
                        logp, mean, std = model(gr["c"], gr["x"][sl], gr["x_next"][sl], steps,
                                                args.eta, args.guidance)
                        loss, s, cut = LS.gspo_loss(logp, gr["old_logp"][sl], adv[p, sl],
                                                    args.clip_low, args.clip_high)
                        if args.kl > 0:
                            kl = TR.kl_to_base(flux, gr["c"], gr["x"][sl], gr["x_next"][sl], mean,
                                               std, steps, args.eta, args.guidance).mean()
                            loss = loss + args.kl * kl
                            kls.append(kl.item())
                        # the minibatch's mean over its trajectories
                        (loss * b / (P * share)).backward()
                    ratios += s.tolist()
                    clipped += cut.tolist()
                    losses.append(loss.item())
                # FSDP: a DTensor
                gnorm = WT.whole(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
                if bad.ok(gnorm, f"iteration {m}, minibatch {q + 1}"):
                    opt.step()
                opt.zero_grad(set_to_none=True)
                gnorms.append(gnorm.item())
            bar.update(1)

            # ---- log: every reward term, ratio statistics, clip fraction, DiT evaluations
            # (all ranks' groups) ----
            per_term = {k: gather(np.concatenate([t[k] for t in terms]).tolist(), ddp)
                        for k in terms[0]}
            ratios, clipped = gather(ratios, ddp), gather(clipped, ddp)
            rec = {"iter": m, "window": l, **{f"r_{k}": float(np.mean(v))
                                              for k, v in per_term.items()},
                   "r_group_std": float(np.mean(gather(total.std(1, unbiased=False).tolist(),
                                                       ddp))),
                   "adv_abs": float(np.mean(gather(adv.abs().flatten().tolist(), ddp))),
                   "ratio_mean": float(np.mean(ratios)), "ratio_min": min(ratios),
                   "ratio_max": max(ratios), "clip_frac": float(np.mean(clipped)),
                   "loss": float(np.mean(gather(losses, ddp))),
                   **({"kl": float(np.mean(gather(kls, ddp)))} if kls else {}),
                   "grad_norm": float(np.mean(gnorms)), "skipped": bad.total,
                   "dit_rollout": sum(gather([rows_rollout], ddp)),
                   "dit_update": world * P * G * args.window
                   * TR.forwards_per_velocity(groups[0]["c"]), "sec": time.time() - t0}
            if master:
                bar.set_postfix(reward=f"{rec['r_total']:.3f}", clip=f"{rec['clip_frac']:.2f}")
                write(rec)
            if val is not None and (m % args.eval_every == 0 or m == args.iters):
                validate(m)
            # a checkpoint when due or when a signal asks to stop (all ranks: rank 0 writes, the
            # others wait)
            run.step_done(m, m % args.ckpt_every == 0 or m == args.iters, flux, text, acfg, opt,
                          consumed)
    log.close()
    bad.trained_any()
    if ddp:
        dist.destroy_process_group()

def cli(argv=None):
    return TR.cli(main, argv, TR.USER_ERRORS + (RewardModelError,))

if __name__ == "__main__":
    sys.exit(cli())

"""
Supervised training, MultiCrafter stages 1-2 (and the toy world's stage 0).

  stage base    toy only: train the whole toy DiT + byte text encoder on text -> image
                (stands in for FLUX pretraining; its output folder is a toy checkpoint that
                sample.py and the next stages load)
  stage single  frozen base + adapters, single-subject data, L = L_diff
  stage multi   frozen base + adapters (LoRA + MoE-LoRA), L = L_diff + lambda L_attn  (+ alpha SCAL + beta MDL,
                + balance), MultiCrafter Eq. 5-6 / MOSAIC

    python toy.py --out data/toy --n 2000 && python toy.py --out data/toy_val --n 200 --split val --seed 1
    python train_sft.py --stage base --data data/toy/manifest.jsonl --out runs/base --steps 3000
    python train_sft.py --stage multi --init runs/base/latest --data data/toy/manifest.jsonl --out runs/multi
    torchrun --nproc_per_node=2 train_sft.py --stage multi ...               # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 train_sft.py --preset flux-dev --stage multi --data my/manifest.jsonl \\
        --size 512 --ref-size 320 --rank 512 --lr 3e-5 --lr-end 1e-5 --grad-checkpoint --zero --out runs/flux
    torchrun --nproc_per_node=8 train_sft.py ... --grad-checkpoint --fsdp   # everything sharded: ~11 GiB a GPU
"""
import json
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import cache
import cli as CL
import data as D
import dataset as DS
import encoders as EN
import flux2 as F2
import losses as LS
import model as M
import moe_lora as ML
import runs
import training as TR
import weights as WT

def build_parser():
    p = CL.Parser(description=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="manifest.jsonl (or UNO JSON list)")
    g.add_argument("--cache", default=None, help="instead of --data: a `cache.py` folder (text "
                   "embeddings and latents precomputed: no text encoder or VAE in memory)")
    g.add_argument("--val-data", default=None, help="held-out manifest (a cache folder with "
                   "--cache): Dice and attention share at eval steps")
    g.add_argument("--size", type=CL.positive, default=None, help="target side in px (default: the "
                   "preset's, 32 toy, 512 flux)")
    g.add_argument("--ref-size", type=CL.positive, default=None,
                   help="reference side in px (default: the preset's, 16 toy, "
                   "320 flux)")
    g.add_argument("--aspect-buckets", action="store_true", help="UNO's 11 aspect buckets at "
                   "--size instead of square targets (each batch from one bucket)")
    TR.add_model_args(p)
    g = p.add_argument_group("losses")
    g.add_argument("--stage", default="multi", choices=["base", "single", "multi"])
    g.add_argument("--lambda-attn", type=CL.weight, default=0.3,
                   help="Dice attention loss weight (paper 0.3)")
    g.add_argument("--attn-blocks", nargs="*", default=None, metavar="BLOCK",
                   help="blocks L_attn (and the eval) probes: double (the paper's, default), "
                   "single, all, or names (d0 s3; an integer is a double block)")
    g.add_argument("--attn-direction", default="ref2img", choices=["ref2img", "img2ref"],
                   help="L_attn's maps: ref2img = each reference's queries over the target's keys "
                   "(the paper, Eq. 4); img2ref = each target token's attention mass on each "
                   "reference's keys (the path by which a target region reads a "
                   "reference; model.AttentionProbe)")
    g.add_argument("--base-refs", action="store_true", help="stage base: train with the records' "
                   "references in the joint sequence, so the base already learns to read them "
                   "(default: text -> image only)")
    g.add_argument("--txt-pad", default=None, choices=["max", "longest"],
                   help="toy byte encoder: pad prompts to 128 bytes or to the batch's longest "
                   "(faster); default: as the --init base was trained (its checkpoint says; the "
                   "shipped one: max), max for a new base. Recorded in the checkpoint")
    g.add_argument("--drop-prompt", type=CL.float_in(0.0, 1.0), default=0.0,
                   help="each sample's prompt replaced by \"\" with this probability (not with "
                   "--cache; for sample.py --text-guidance)")
    g.add_argument("--drop-refs", type=CL.float_in(0.0, 1.0), default=0.0,
                   help="each step trained without its references with this probability "
                   "(for sample.py --ref-guidance)")
    g.add_argument("--scal", type=CL.weight, default=0.0, help="MOSAIC SCAL weight (MOSAIC: 0.1)")
    g.add_argument("--mdl", type=CL.weight, default=0.0,
                   help="MOSAIC MDL weight (MOSAIC: 1 after its warm-up)")
    g.add_argument("--mdl-kind", default="kl", choices=["kl", "js"])
    g.add_argument("--mdl-warmup", type=CL.count, nargs=2, default=[0, 0],
                   metavar=("START", "RAMP"), help="MDL weight 0 until START, then linear to 1 "
                   "over RAMP steps (MOSAIC: 10000 1000)")
    g.add_argument("--balance", type=CL.weight, default=0.0,
                   help="MoE load-balance loss weight (e.g. 1e-3)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=CL.count, default=1000)
    g.add_argument("--batch-size", type=CL.positive, default=16, help="per rank, per micro-step")
    g.add_argument("--grad-accum", type=CL.positive, default=1)
    g.add_argument("--lr", type=CL.learning_rate, default=None, help=f"default: 1e-3 base, 1e-4 "
                   f"adapters (paper 3e-5); finite, > 0, <= {CL.MAX_LR:g}")
    g.add_argument("--lr-end", type=CL.float_in(0.0, CL.MAX_LR), default=None,
                   help="linear decay to this (default lr/3, paper 1e-5)")
    g.add_argument("--warmup", type=CL.count, default=50)
    g.add_argument("--weight-decay", type=CL.weight, default=1e-2)
    g.add_argument("--clip", type=CL.positive_float, default=1.0)
    g.add_argument("--zero", action="store_true",
                   help="shard optimizer states across ranks (ZeRO-1)")
    g.add_argument("--max-bad-steps", type=CL.positive, default=20, help="stop after this many "
                   "non-finite steps in a row")
    g = runs.add_run_args(p, ckpt_every=500, eval_every=250)
    g.add_argument("--log-every", type=CL.positive, default=10)
    TR.add_log_args(g)
    return p

# on --resume these may differ from the checkpoint's args.json (a note names them); any other change
# is refused. The optimizer's and the losses' settings, the length, cadence and hardware are
# deliberate changes; the data, its order (seed, batch, global batch), sizes, the model, the
# adapters' shape and the stage make another run
MAY_CHANGE = {"wandb", "lr", "lr_end", "warmup", "weight_decay", "clip", "max_bad_steps",
              "lambda_attn", "attn_blocks", "attn_direction", "scal", "mdl", "mdl_kind",
              "mdl_warmup", "balance", "steps", "ckpt_every", "keep", "eval_every", "log_every",
              "val_data", "device", "dist_timeout", "grad_checkpoint", "zero", "grad_accum", "fsdp",
              "compile"}

# -----------------------------------------------------------------------------
# one micro-step: every loss term

def step_losses(args, model, denoiser, ae, batch, step, gen, device):
    """One micro-batch -> (the weighted loss, {term: value}). L = L_diff + lambda L_attn
    (+ alpha SCAL + beta MDL
    + balance) in stage multi (MultiCrafter Eq. 6); L_diff alone in stages base and single."""
    flux = denoiser.flux
    # the joint sequence [txt | img | refs] (model.prepare); the base stage learns text -> image, so
    # no references unless --base-refs (a world whose prompts do not name the subjects needs a base
    # that reads references) condition dropout (--drop-prompt, --drop-refs) teaches the
    # unconditional velocities classifier-free guidance subtracts at sampling: a sample's prompt
    # becomes "", a step's references are left out (drawn before t and the noise, from the batch's
    # own generator, and only when asked: runs without it keep their streams)
    if args.drop_prompt > 0:
        drop = (torch.rand(len(batch["prompts"]), generator=gen) < args.drop_prompt).tolist()
        batch = dict(batch, prompts=["" if d else p for d, p in zip(drop, batch["prompts"])])
    refs = (args.stage != "base" or args.base_refs) and not (
        args.drop_refs > 0 and torch.rand((), generator=gen).item() < args.drop_refs)
    inp = TR.encode_batch(batch, ae, device, args.pe, refs=refs, cfg=flux.cfg)
    x0 = inp["img"]                                                  # (B, L, C) clean target tokens
    B, L = x0.shape[:2]
    # rectified flow: x_t = (1 - t) x0 + t eps at logit-normal t, shifted for the image size as
    # sampling is
    t = LS.sample_timesteps(B, L, flux.cfg.shift_schedule, generator=gen,
                            mu=F2.train_mu(flux.cfg, L)).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)          # (B, L, C)
    # the probe rides along the same forward (no second pass): it reads each chosen block's q, k and
    # keeps only the per-reference attention maps over the target tokens that L_attn, SCAL and MDL
    # need
    use_probe = args.stage == "multi" and (args.lambda_attn > 0 or args.scal > 0 or args.mdl > 0)
    probe = None
    if use_probe:
        rows = [p[:, :2] for p in batch["points"]] if args.scal > 0 else None
        probe = M.AttentionProbe(args.attn_blocks, rows=rows, direction=args.attn_direction)
    cond, g = TR.conditioning(batch, denoiser, device), TR.guidance_for(flux, B, device)
    predict = lambda x_t, tt: model(cond, dict(inp, img=x_t), tt, g, probe)
    with M.autocast(device):
        terms = {"diff": LS.flow_matching_loss(predict, x0, t, noise)}
    loss = terms["diff"]
    if probe is not None:
        # each subject's attention map, averaged over the probed blocks, against its mask on the
        # token grid
        maps, masks = probe.mean_map(), batch["masks"].to(device)               # (B, N, L_img) each
        terms["dice"] = LS.dice_loss(maps, masks, batch["mask_valid"].to(device))  # Eq. 5
        loss = loss + args.lambda_attn * terms["dice"]
        # MOSAIC: each reference point should attend to its corresponding target token
        if args.scal > 0:
            terms["scal"] = LS.scal_loss(probe.mean_logp(),
                                         [p[:, 2].to(device) for p in batch["points"]])
            loss = loss + args.scal * terms["scal"]
        if args.mdl > 0:   # MOSAIC: the references' maps pushed apart (ramped in after its warm-up)
            terms["mdl"] = LS.mdl_loss(maps, kind=args.mdl_kind)
            loss = loss + args.mdl * LS.mosaic_warmup(step, *args.mdl_warmup) * terms["mdl"]
    # a router that sends every token to one expert wastes the others: Switch's balance loss,
    # averaged over layers
    moes = [m for _, m in ML.adapters(flux) if isinstance(m, ML.MoELoRALinear)]
    if args.balance > 0 and moes:
        terms["balance"] = sum(LS.balance_loss(m.last_probs, m.last_idx, m.E)
                               for m in moes) / len(moes)
        loss = loss + args.balance * terms["balance"]
    return loss, terms

# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    runs.check_adapter_args(p, args)
    TR.wandb_module(args.wandb)             # a missing optional package stops here, before any work
    cfg = F2.get_config(args.preset)
    try:
        M.select_blocks(args.attn_blocks, cfg)                    # names, checked against the model
    except ValueError as e:
        p.error(f"argument --attn-blocks: {e}")
    if args.pe == "t" and not F2.is_flux2(cfg):
        p.error("argument --pe: t is FLUX.2's reference positions; "
                f"{args.preset} takes UNO's d, h, w or o")
    preflight(args, cfg)
    TR.check_parallel_args(p, args)
    if args.fsdp and args.zero:
        p.error("--zero: --fsdp already shards the optimizer states (give one of them)")

    # -------------------------------------------------------------------------
    # set-up: ranks and device first (every later choice may depend on them), then the preset's
    # defaults, then the run folder (locked, checked, the checkpoint to resume chosen) before any
    # work
    ddp, rank, world, device = TR.setup_dist(args.device, args.dist_timeout)
    args.pe = runs.resolved(args.pe, F2.default_pe(cfg))
    args.attn_blocks = M.select_blocks(args.attn_blocks, cfg)           # names (checked above)
    args.size = runs.resolved(args.size, cfg.image_size)
    args.ref_size = runs.resolved(args.ref_size, cfg.ref_size)
    # the toy base learns from scratch (a high lr); adapters on a frozen base take small steps
    # (paper: 3e-5)
    args.lr = runs.resolved(args.lr, 1e-3 if args.stage == "base" else 1e-4)
    args.lr_end = runs.resolved(args.lr_end, args.lr / 3)
    with runs.Run(args, argv, "train_sft.py", MAY_CHANGE, "grad_accum", ddp, rank, world,
                  device) as run:
        train(args, run, cfg, ddp, rank, world, device)
        if rank == 0:
            TR.summary(args, run)

def preflight(args, cfg):
    """Everything this run can check before reading its data, loading a model or making its run
    folder: the data, the base and adapter, every FLUX weight, and the flags against each other, all
    named at once."""
    pf = D.Preflight()
    if pf.need((args.data is None) != (args.cache is None), "give one of --data (a manifest) or "
               "--cache (a `cache.py` folder)"):
        pf.file("--data", args.data)
        pf.folder("--cache", args.cache, ["index.json"])
        (pf.folder if args.cache else pf.file)("--val-data", args.val_data)
    # stage multi's attention losses need the references in every step (and DDP ranks must log the
    # same terms)
    pf.need(not (args.stage == "multi" and args.drop_refs > 0), "--drop-refs: not with --stage "
            "multi (L_attn, SCAL and MDL read the references); use base or single")
    pf.need(not (args.cache and args.drop_prompt > 0), "--drop-prompt: a cache holds each prompt's "
            "embedding, with no text encoder for \"\" (use --data)")
    TR.check_model_args(pf, args, args.stage, cached=args.cache is not None)
    pf.check()

def train(args, run, cfg, ddp, rank, world, device):
    master = rank == 0                    # rank 0 alone writes logs and checkpoints

    # -------------------------------------------------------------------------
    # data: a manifest read from the image files, or a cache of latents and text embeddings
    # (no VAE / T5 needed) a cache's tensors are checked against this model's shapes now
    # (their headers), not in a collate hours in
    load = (lambda p: cache.CachedDataset(p, cfg=cfg)) if args.cache else \
        (lambda p: DS.ManifestDataset(
            p, size=args.size, ref_size=args.ref_size, token_px=cfg.token_px,
            buckets=DS.uno_buckets(args.size, cfg.token_px) if args.aspect_buckets else None))
    dataset = load(args.cache or args.data)
    if getattr(dataset, "skipped", None):
        TR.print0(f"warning: {len(dataset.skipped)} bad records skipped in {args.data} "
                  f"(first: {dataset.skipped[0]})")
    val = load(args.val_data) if args.val_data else None

    # -------------------------------------------------------------------------
    # models: the frozen base (or, in stage base, the whole toy model) with its trainable adapters;
    # DDP wraps the training forward (Denoiser) so only trainable parameters are synchronized
    flux, ae, text, params, acfg = TR.build_models(args.preset, args.stage, device, args.init,
                                                   args.adapter, TR.adapter_spec(args),
                                                   args.cache is not None, args.grad_checkpoint,
                                                   args.seed, args.ae, args.t5, args.clip_text,
                                                   args.text_model)
    if args.txt_pad is not None and isinstance(text, EN.ByteTextEncoder):
        # how this run's byte encoder pads (saved with a base checkpoint)
        text.txt_pad = args.txt_pad
    if args.drop_prompt > 0 and isinstance(text, EN.ByteTextEncoder):
        text.null_prompt = True     # it learns "" too (saved with a base checkpoint: text guidance)
    if args.compile:
        M.compile_blocks(flux)
    denoiser = TR.Denoiser(flux, text).train()
    if args.fsdp:          # sharded: the root holds the text encoder too (trained in stage base)
        model = TR.shard(denoiser, flux)
        # FSDP's new, sharded parameters
        params = [p for p in denoiser.parameters() if p.requires_grad]
    else:
        model = torch.nn.parallel.DistributedDataParallel(denoiser) if ddp else denoiser
    opt = TR.build_optimizer(params, args.lr, args.weight_decay, args.zero and ddp)
    # the run's whole position is two numbers: optimizer steps taken and global micro-batches
    # consumed. With the data order and the noise both functions of them (below), a resumed run
    # continues exactly where it stopped, on any number of ranks
    step, consumed = 0, 0
    if run.resume_from:
        step, consumed, saved_world = runs.load_checkpoint(run.resume_from, flux, text, acfg, opt)
        TR.print0(f"resumed from step {step} at global micro-batch {consumed} (saved by "
                  f"{saved_world} rank(s), now {world})")
    if master:
        n_train = sum(p.numel() for p in params)
        TR.print0(f"{args.stage} stage, {args.preset}: {n_train / 1e6:.2f}M trainable params, "
                  f"{len(dataset)} records, {world} rank(s) x batch {args.batch_size} x accum "
                  f"{args.grad_accum}, device {device}")
    log = TR.Log(args.out, master, TR.wandb_module(args.wandb), vars(args), args.wandb)

    def lr_at(s):  # linear warm-up, then linear decay from lr to lr_end (paper: 3e-5 -> 1e-5)
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        return args.lr + (args.lr_end - args.lr) * min(1.0, (s - args.warmup)
                                                       / max(1, args.steps - args.warmup))

    # one global order of micro-batches for the whole run: epochs of dataset.batches
    # (each reshuffled by its seed), micro-batch b dealt to rank b % world. So 1 rank x accum 8 and
    # 8 ranks x accum 1 see the same batches
    micro_per_step = args.grad_accum * world               # global micro-batches per optimizer step
    epochs = {}                                        # epoch -> its batches (the current one only)
    per_epoch = len(DS.batches(dataset, args.batch_size, args.seed, 0))
    if per_epoch == 0:
        raise D.DataError(
            f"{args.data or args.cache}: fewer usable records than one batch of {args.batch_size}")
    def global_batch(b):
        e, i = divmod(b, per_epoch)
        if e not in epochs:
            epochs.clear()
            epochs[e] = DS.batches(dataset, args.batch_size, args.seed, e)
        return epochs[e][i]

    # -------------------------------------------------------------------------
    # the training loop
    t0, t0_step, bad = time.time(), step, TR.BadSteps(args.max_bad_steps, run)
    with tqdm(total=args.steps, initial=step, disable=not master, desc=args.stage) as bar:
        while step < args.steps:
            # ---- forward / backward over grad_accum micro-batches ----
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            sums = {}                              # each loss term, averaged over the micro-batches
            for a in range(args.grad_accum):
                b = consumed + a * world + rank
                batch = DS.collate([dataset[i] for i in global_batch(b)])
                # t and the noise are drawn from a generator seeded by b alone: the same sample gets
                # the same noise whichever rank or resumed process draws it
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + b)
                with TR.no_sync(model, last=a == args.grad_accum - 1):
                    loss, terms = step_losses(args, model, denoiser, ae, batch, step, gen, device)
                    (loss / args.grad_accum).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / args.grad_accum
            consumed += micro_per_step

            # ---- clip, then update unless the gradient is NaN/inf (a skipped step is counted; many
            # in a row stop) ----
            # FSDP: a replicated DTensor
            gnorm = WT.whole(torch.nn.utils.clip_grad_norm_(params, args.clip))
            if bad.ok(gnorm, f"step {step + 1}"):
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            # ---- log: the loss terms averaged over ranks, throughput, MoE expert load since the
            # last log ----
            if step % args.log_every == 0 or step == args.steps:
                vals = torch.tensor([sums[k] for k in sorted(sums)], device=device)
                if ddp:
                    dist.all_reduce(vals)
                    vals /= world
                rec = {"step": step, "lr": lr_at(step - 1), "grad_norm": gnorm.item(),
                       "skipped": bad.total, "samples_per_s": args.batch_size * micro_per_step
                       * (step - t0_step) / (time.time() - t0),
                       **dict(zip(sorted(sums), vals.tolist()))}
                t0, t0_step = time.time(), step
                loads = [m.load for _, m in ML.adapters(flux) if isinstance(m, ML.MoELoRALinear)]
                if loads:                # a collapsed router shows as one expert taking every token
                    total = torch.stack(loads).sum(0)
                    rec["expert_load"] = (total / total.sum().clamp_min(1)).tolist()
                    for l in loads:
                        l.zero_()
                if master:
                    bar.set_postfix(loss=f"{rec['diff']:.4f}",
                                    **({"dice": f"{rec['dice']:.3f}"} if "dice" in rec else {}))
                    log.write(rec)

            # ---- held-out attention metrics: does L_attn put each subject's attention inside its
            # own mask? ----
            due = step % args.eval_every == 0 or step == args.steps
            # (FSDP: every rank runs the evaluation's forwards, each gathers the shards with the
            # others)
            if val is not None and (master or args.fsdp) and due and args.stage != "base":
                rec = {"step": step, **TR.attention_metrics(denoiser, ae, val, device,
                                                            args.batch_size,
                                                            args.attn_blocks, args.pe)}
                TR.print0(json.dumps(rec))
                log.write(rec)

            # ---- checkpoint when due or when a signal asks to stop (rank 0 writes; the others
            # wait, so no rank runs ahead of a checkpoint it may need) ----
            run.step_done(step, step % args.ckpt_every == 0 or step == args.steps, flux, text, acfg,
                          opt, consumed)
    log.close()
    bad.trained_any()
    if ddp:
        dist.destroy_process_group()

def cli(argv=None):
    return TR.cli(main, argv)

if __name__ == "__main__":
    sys.exit(cli())

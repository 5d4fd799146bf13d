"""
The toy world that tests customization, measured: does a trained toy model read its references? And
how fast does the toy train? Run from the repository root:

    python -m experiments.world eval --base runs/base/latest --manifest data/test1/manifest.jsonl \\
        [--adapter runs/single/latest/adapter.safetensors] [--ref-size 16] [--n 100] [--steps 20]
    python -m experiments.world sanity --manifest data/test2/manifest.jsonl     # the rows that prove the metrics
    python -m experiments.world speed --manifest data/train/manifest.jsonl --steps 20 [--compile]

eval samples each record once (seed = its index) with its references, and once more with reference 0
swapped for a view of another identity of the same shape (same prompt, same seed), then reports
toy.world_metrics on the first samples and toy.following on the second, beside the sanity rows of
the same records. speed times training steps of the base stage (forward, backward, AdamW) on one
batch size, side by side: the byte encoder padding every prompt to 128 bytes against padding to the
batch's longest, and optionally torch.compile; FLOP utilization is the FLOPs of one whole step
(forward and backward, counted by torch's FlopCounterMode) per second, over the CPU peak given by
--peak-gflops (a guess unless you know your CPU's: cores x GHz x fp32 FLOPs per cycle).
"""
import argparse
import json
import os
import sys
import time

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import cli as CL
import data as D
import dataset as DS
import encoders as EN
import losses as LS
import model as M
import moe_lora as ML
import sampling as SM
import toy
import training as TR
import weights as WT

def load_toy(base, adapter=None, ref_size=None):
    # a toy checkpoint folder (weights.load_toy) + an adapter; ref_size: the references' side the
    # model was trained with (default: the preset's)
    cfg = M.get_config("toy", **({"ref_size": ref_size} if ref_size else {}))
    flux, text, _ = WT.load_toy(base, cfg)
    if adapter:
        ML.load_adapter(flux, adapter)
    return cfg, flux.eval(), text.eval(), EN.AutoEncoder(cfg.ae)

@torch.no_grad()
def sample(cfg, flux, text, ae, prompt, refs, seed, steps, ref_guidance=None, text_guidance=None):
    # one sample as sample.py draws it; the guidance scales default to the preset's
    size = cfg.image_size
    w_ref, w_text = SM.guidance_scales(cfg, text.null_prompt, ref_guidance, text_guidance)
    timesteps = SM.get_schedule(steps, (size // cfg.token_px) ** 2, shift=cfg.shift_schedule)
    c = SM.sampling_inputs(cfg, ae, text, prompt, [D.preprocess_ref(r, cfg.ref_size) for r in refs],
                           size, size, seed=seed, null_text=w_text != 1)
    x = SM.denoise(flux, **c, timesteps=timesteps, guidance=cfg.guidance, progress=False,
                   ref_guidance=w_ref, text_guidance=w_text)
    return SM.decode_images(ae, x, size, size)[0]

def sanity_rows(records, where):
    """The three generators of toy.sanity_images scored by the same code, swaps included."""
    swapped = [toy.swap_record(r, where=where)[0] for r in records]
    rows = {}
    for kind in toy.SANITY:
        m = toy.world_metrics(toy.sanity_images(records, kind, where=where), records, where)
        # text-only reads no reference: after a swap it draws what it drew before
        after = toy.sanity_images(records if kind == "text-only" else swapped, kind, where=where)
        m["following"], m["n_swaps"] = toy.following(after, records, swapped, where=where)
        rows[kind] = m
    return rows

def evaluate(args):
    records, problems = D.read_manifest(args.manifest)
    if problems:
        raise D.DataError(f"{args.manifest}: line {problems[0][0]}: {problems[0][2]}")
    records = [r for _, r in records][:args.n]
    root = os.path.dirname(os.path.abspath(args.manifest))
    cfg, flux, text, ae = load_toy(args.base, args.adapter, args.ref_size)
    images, after, swapped = [], [], []
    guide = SM.guidance_scales(cfg, text.null_prompt, args.ref_guidance, args.text_guidance)
    t0 = time.time()
    for i, rec in enumerate(records):
        # the first world: refuse
        toy.identity_of(rec["attrs"][0], f"{args.manifest}: record {rec.get('id', i)}")
        refs = [D.load_image(os.path.join(root, p)) for p in rec["refs"]]
        images.append(sample(cfg, flux, text, ae, rec["prompt"], refs, i, args.steps, *guide))
        new, ref, _ = toy.swap_record(rec, where=args.manifest)
        swapped.append(new)
        after.append(sample(cfg, flux, text, ae, rec["prompt"], [Image.fromarray(ref)] + refs[1:],
                            i, args.steps, *guide))
    m = toy.world_metrics(images, records, args.manifest)
    m["following"], m["n_swaps"] = toy.following(after, records, swapped, where=args.manifest)
    rows = {"model": m, **sanity_rows(records, args.manifest)}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for i, (a, b) in enumerate(zip(images, after)):
            a.save(os.path.join(args.out, f"{i:06d}.png"))
            b.save(os.path.join(args.out, f"{i:06d}_swap.png"))
        D.write_atomic(os.path.join(args.out, "metrics.json"),
                       lambda f: f.write(json.dumps(rows, indent=1).encode()))
    print(toy.metrics_table(rows, toy.METRICS + ("following",)))
    print(f"{len(records)} records, {args.steps} sampling steps, guidance on the references "
          f"{guide[0]:g}, on the prompt {guide[1]:g}, {time.time() - t0:.0f} s", file=sys.stderr)

# -----------------------------------------------------------------------------
# throughput

def base_step(flux, text, ae, opt, batch, gen):
    # one base-stage step with the references in the sequence
    # (what `train_sft.py --stage base --base-refs` runs)
    inp = TR.encode_batch(batch, ae, "cpu")
    x0 = inp["img"]
    t = LS.sample_timesteps(x0.shape[0], x0.shape[1], flux.cfg.shift_schedule, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    txt, y = text(batch["prompts"])
    g = torch.ones(x0.shape[0])
    loss = LS.flow_matching_loss(lambda x_t, tt: flux(**dict(inp, img=x_t), txt=txt,
                                                      txt_ids=M.text_ids(txt), y=y,
                                                      timesteps=tt, guidance=g), x0, t, noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

def speed(args):
    ds = DS.ManifestDataset(args.manifest, size=32, ref_size=16, token_px=4)
    batch = DS.collate([ds[i] for i in DS.batches(ds, args.batch_size, seed=0, epoch=0)[0]])
    settings = [("max", False), ("longest", False)] + ([("longest", True)] if args.compile else [])
    print(f"batch {args.batch_size}, {batch['refs'].shape[1]} reference(s), prompt bytes "
          f"{max(len(p.encode()) for p in batch['prompts'])} at most, "
          f"{torch.get_num_threads()} thread(s)")
    print("| text padding | compiled | steps/s | GFLOP/step | GFLOP/s | "
          "utilization |\n|---|---|---|---|---|---|")
    for pad, compiled in settings:
        torch.manual_seed(0)
        cfg = M.get_config("toy", txt_pad=pad)
        flux, text, ae = M.Flux(cfg), EN.ByteTextEncoder(cfg), EN.AutoEncoder(cfg.ae)
        opt = torch.optim.AdamW(list(flux.parameters()) + list(text.parameters()), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        step = torch.compile(base_step) if compiled else base_step
        for _ in range(3):                                  # warm-up (and compilation)
            step(flux, text, ae, opt, batch, gen)
        with FlopCounterMode(display=False) as fc:
            base_step(flux, text, ae, opt, batch, gen)
        flops = fc.get_total_flops()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(flux, text, ae, opt, batch, gen)
        rate = args.steps / (time.perf_counter() - t0)
        print(f"| {pad} | {'yes' if compiled else 'no'} | {rate:.2f} | {flops / 1e9:.2f} | "
              f"{rate * flops / 1e9:.1f} | {rate * flops / 1e9 / args.peak_gflops:.1%} |")

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--base", required=True,
                   help="a toy checkpoint folder (train_sft.py --stage base output)")
    e.add_argument("--adapter", default=None,
                   help="an adapter.safetensors (stage single / multi output)")
    e.add_argument("--manifest", required=True,
                   help="a manifest of this world (python toy.py --split test ...)")
    e.add_argument("--ref-size", type=int, default=None,
                   help="references' side as the base was trained (default 16)")
    e.add_argument("--n", type=int, default=100, help="records scored (the first n)")
    e.add_argument("--steps", type=int, default=20, help="sampling steps")
    e.add_argument("--ref-guidance", type=CL.float_in(0), default=None, help="guidance on the "
                   "references (default: the preset's; sampling.denoise)")
    e.add_argument("--text-guidance", type=CL.float_in(0), default=None, help="guidance on the "
                   "prompt (default: the preset's)")
    e.add_argument("--out", default=None, help="write the samples and metrics.json here")
    s = sub.add_parser("sanity")
    s.add_argument("--manifest", required=True)
    v = sub.add_parser("speed")
    v.add_argument("--manifest", required=True,
                   help="a training manifest (its first batch is timed)")
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    v.add_argument("--compile", action="store_true", help="also time torch.compile of the step")
    v.add_argument("--peak-gflops", type=float, default=50.0,
                   help="the CPU's fp32 peak for the utilization column")
    args = p.parse_args(argv)
    try:
        if args.cmd == "eval":
            evaluate(args)
        elif args.cmd == "sanity":
            records = [r for _, r in D.read_manifest(args.manifest)[0]]
            print(toy.metrics_table(sanity_rows(records, args.manifest),
                                    toy.METRICS + ("following",)))
        else:
            speed(args)
    except (D.DataError, D.InputError, WT.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())

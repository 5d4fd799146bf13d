"""
Speed-ups measured against their baseline in one run, outputs compared: the prompt and the empty
prompt as one batched forward (`guidance`) and torch.compile of the blocks (`compile`) on the
shipped toy; a FLUX.2 model's references' K/V kept across sampling steps (`kv`).
"""
import copy
import os

import torch

import data as D
import encoders as EN
import flux2 as F2
import losses as LS
import model as M
import moe_lora as ML
import sampling as SM
import training as TR
import weights as WT
from benchmarks.measure import interleaved_times, median, timed
from benchmarks.shapes import dit_inputs

# -----------------------------------------------------------------------------
# guidance, compile: two speed-ups measured side by side on the shipped toy (CPU, fp32)

def shipped_toy():
    """The shipped toy as sample.py loads it (assets/toy: base, text encoder, adapter) and the
    demo's references."""
    cfg = M.get_config("toy")
    flux, text, adapter = WT.load_toy(WT.TOY_DIR, cfg)
    ML.load_adapter(flux, adapter)
    assets = os.path.dirname(WT.TOY_DIR)
    refs = [D.preprocess_ref(D.load_image(os.path.join(assets, f)), cfg.ref_size)
            for f in ("orange_circle.png", "blue_square.png")]
    return cfg, flux.eval(), EN.AutoEncoder(cfg.ae), text.eval(), refs

def guidance(args):
    """Sampling with the toy's guidance (4 on the references, 2 on the prompt: three DiT evaluations
    a step), the prompt and the empty prompt as one forward of 2B rows (model.BATCH_GUIDANCE)
    against two forwards; and IPPO's policy (training.velocity, forward + backward of a group),
    likewise. Timed interleaved; the outputs compared."""
    torch.manual_seed(args.seed)
    cfg, flux, ae, text, refs = shipped_toy()
    c = SM.sampling_inputs(cfg, ae, text, "a circle and a square", refs, cfg.image_size,
                           cfg.image_size, list(range(args.batch)), null_text=True)
    ts = SM.get_schedule(cfg.sample_steps, c["img"].shape[1])
    # IPPO's batch-1 condition
    c1 = {k: v[:1] if torch.is_tensor(v) else [r[:1] for r in v] for k, v in c.items()}
    c1["scales"] = (cfg.ref_guidance, cfg.text_guidance)
    x = torch.randn(args.group, *c["img"].shape[1:])
    def with_batching(on, fn):
        def run():
            SM.BATCH_GUIDANCE = on
            try:
                return fn()
            finally:
                SM.BATCH_GUIDANCE = True
        return run
    sample = lambda: SM.denoise(flux, **c, timesteps=ts, guidance=cfg.guidance, progress=False,
                               ref_guidance=cfg.ref_guidance, text_guidance=cfg.text_guidance)
    def policy():
        flux.zero_grad(set_to_none=True)
        v = TR.velocity(flux, x, c1, 0.6, cfg.guidance)
        v.square().mean().backward()
        return v.detach()
    res = {}
    for name, fn in (("sampling", sample), ("policy", policy)):
        fns = [with_batching(True, fn), with_batching(False, fn)]
        outs = [f() for f in fns]                                # warm-up, and the outputs compared
        times, _ = interleaved_times(fns, args.reps)
        res[name] = {"batched_s": median(times[0]), "two_forwards_s": median(times[1]),
                     "ratio": median(times[0]) / median(times[1]),
                     "max_abs_diff": (outs[0] - outs[1]).abs().max().item()}
    print(f"batched guidance on the shipped toy, fp32, {torch.get_num_threads()} "
          f"threads; {args.reps} interleaved runs")
    print(f"  sampling, batch {args.batch}, {cfg.sample_steps} steps: batched "
          f"{res['sampling']['batched_s']:.3f} s, two forwards "
          f"{res['sampling']['two_forwards_s']:.3f} s, ratio {res['sampling']['ratio']:.3f}; "
          f"latents max |diff| {res['sampling']['max_abs_diff']:.1e}")
    print(f"  IPPO policy forward+backward, group {args.group}: batched "
          f"{res['policy']['batched_s'] * 1e3:.1f} ms, two forwards "
          f"{res['policy']['two_forwards_s'] * 1e3:.1f} ms, ratio {res['policy']['ratio']:.3f}; "
          f"velocity max |diff| {res['policy']['max_abs_diff']:.1e}")
    return res

def compile_bench(args):
    """--compile (model.compile_blocks, inductor) against eager on the shipped toy: a training step
    (train_sft's stage multi shape: forward with the probe and Dice, backward into the adapters,
    batch args.batch) and one sample (the toy's guided 20 steps). The first compiled call, which
    compiles, is timed apart; then both are timed interleaved, and their losses and samples
    compared."""
    torch.manual_seed(args.seed)
    cfg, flux, ae, text, refs = shipped_toy()
    compiled = M.compile_blocks(copy.deepcopy(flux))
    B, G, R = args.batch, cfg.image_size // cfg.token_px, cfg.ref_size // cfg.token_px
    z = cfg.ae.z_channels
    with torch.no_grad():
        txt, y = text(["a circle and a square"] * B)
    inp = M.prepare(torch.randn(B, z, 2 * G, 2 * G),
                    [torch.randn(B, z, 2 * R, 2 * R) for _ in range(2)], "d", txt, y)
    t, noise, masks = (torch.rand(B), torch.randn_like(inp["img"]),
                       (torch.rand(B, 2, G * G) > 0.7).float())
    def train_step(f):
        def run():
            f.zero_grad(set_to_none=True)
            probe = M.AttentionProbe()
            loss = LS.flow_matching_loss(lambda x_t, tt: f(**dict(inp, img=x_t), timesteps=tt,
                                                           guidance=torch.ones(B),
                                                           probe=probe), inp["img"], t, noise)
            loss = loss + 0.3 * LS.dice_loss(probe.mean_map(), masks)
            loss.backward()
            return loss.detach()
        return run
    c = SM.sampling_inputs(cfg, ae, text, "a circle and a square", refs, cfg.image_size,
                           cfg.image_size, 0, null_text=True)
    ts = SM.get_schedule(cfg.sample_steps, c["img"].shape[1])
    sample = lambda f: lambda: SM.denoise(f, **c, timesteps=ts, guidance=cfg.guidance,
                                          progress=False, ref_guidance=cfg.ref_guidance,
                                          text_guidance=cfg.text_guidance)
    res = {"backend": M.COMPILE_BACKEND}
    for name, make in (("train_step", train_step), ("sampling", sample)):
        eager, comp = make(flux), make(compiled)
        first = timed(comp)                                # compiles (forward, and backward if any)
        outs = [eager(), comp()]
        times, _ = interleaved_times([eager, comp], args.reps)
        res[name] = {"compile_s": first, "eager_s": median(times[0]),
                     "compiled_s": median(times[1]), "ratio": median(times[1]) / median(times[0]),
                     "max_abs_diff": (outs[0] - outs[1]).abs().max().item()}
    print(f"--compile ({M.COMPILE_BACKEND}) against eager on the shipped toy, fp32, "
          f"{torch.get_num_threads()} threads, {args.reps} interleaved runs")
    for name, label in (("train_step", f"SFT step, batch {B}, probe + Dice"),
                        ("sampling", "one sample, 20 guided steps")):
        r = res[name]
        print(f"  {label}: eager {r['eager_s'] * 1e3:.0f} ms, compiled {r['compiled_s'] * 1e3:.0f} "
              f"ms, ratio {r['ratio']:.3f} (first call compiling: {r['compile_s']:.0f} s); max "
              f"|diff| {r['max_abs_diff']:.1e}")
    return res

# -----------------------------------------------------------------------------
# kv: FLUX.2 sampling with the references' K/V kept

def kv(args):
    """Sampling time of a klein-9B-KV-shaped model (references see only themselves at t = 0) at tiny
    scale: the references' K/V computed once (flux2.denoise) against every step (model.denoise on
    the same model: equal outputs), with 2 and 4 references, fp32 on this machine's CPU."""
    torch.manual_seed(args.seed)
    cfg = F2.Flux2Config(in_channels=64, context_in_dim=64, hidden_size=args.hidden,
                         num_heads=args.hidden // 64, depth=2, depth_single_blocks=8,
                         axes_dim=(16, 16, 16, 16), ref_kv=True, max_txt_len=32)
    flux = F2.Flux2(cfg).eval()
    G, R, res = args.grid, args.ref_grid, {}
    ts = F2.get_schedule(args.steps, G * G)
    print(f"klein-9B-KV-shaped DiT, hidden {args.hidden}, 2 + 8 blocks, {G * G} target tokens, "
          f"references of {R * R} tokens, {args.steps} steps, fp32 CPU, "
          f"{args.reps} interleaved repetitions")
    for n in (2, 4):
        inp = dit_inputs(cfg, G * cfg.token_px, R * cfg.token_px, n)
        inp.pop("guidance")
        c = dict(inp, timesteps=ts, guidance=1.0, progress=False)
        with torch.no_grad():
            gap = (F2.denoise(flux, **c) - SM.denoise(flux, **c)).abs().max().item()
            (t_cached, t_every), _ = interleaved_times([lambda: F2.denoise(flux, **c),
                                                        lambda: SM.denoise(flux, **c)],
                                                       args.reps)
        res[f"{n}_refs"] = dict(cached_s=median(t_cached), every_step_s=median(t_every),
                                ratio=median(t_every) / median(t_cached), max_abs_diff=gap)
        print(f"  {n} references: every step {median(t_every):.3f} s, kept {median(t_cached):.3f} "
              f"s: {res[f'{n}_refs']['ratio']:.2f}x faster (outputs differ by {gap:.1e})")
    return res

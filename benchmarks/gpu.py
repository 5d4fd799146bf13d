"""
`bench.py gpu`: the checks a GPU session runs in one call, at real shapes with random weights
(nothing downloaded); `--tiny` runs the same code on the CPU at tiny shapes, as the test suite does.
bench.py's docstring lists the rows.
"""
import gc
import json
import os
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

import encoders as EN
import flux2 as F2
import losses as LS
import model as M
import moe_lora as ML
import sampling as SM
import training as TR
import weights as WT
from benchmarks.measure import count_flops, median, nbytes, peak_memory
from benchmarks.memory import budget_columns, training_budget
from benchmarks.shapes import dit_inputs, random_dit
from benchmarks.versus_diffusers import bfl_to_diffusers_converter

# -----------------------------------------------------------------------------
# gpu: the checks a GPU session runs in one call (an estimated 4-6 minutes on one H100, most of it
# sampling): random weights at flux-dev's and klein Base 4B's shapes, nothing downloaded. --tiny
# runs the same code on the CPU at tiny shapes (as the suite does)

GPU_SHAPES = dict(small=512, large=1024, ref=320, refs=(1, 4), steps=28, rank=512, reps=5,
                  train_reps=3, matmul=8192)
TINY_SHAPES = dict(small=64, large=128, ref=32, refs=(1, 4), steps=2, rank=8, reps=1, train_reps=1,
                   matmul=256)

def tiny_config():
    # flux-dev's roles at a width a CPU runs in milliseconds (its text, pooled and latent widths
    # kept)
    return M.get_config("flux-dev", hidden_size=128, num_heads=2, axes_dim=(16, 24, 24), depth=1,
                        depth_single_blocks=2, max_txt_len=16, ae=M.AutoEncoderConfig(ch=32))

KLEIN = "klein-base-4b"         # FLUX.2's rows: the open base one GPU trains the method on

def tiny_klein():
    # klein Base 4B's roles at the same width (its text and latent widths and step counts kept)
    return F2.get_config(KLEIN, hidden_size=128, num_heads=2, axes_dim=(16, 16, 16, 16), depth=1,
                         depth_single_blocks=2, max_txt_len=16, ae=replace(F2.flux2_ae(), ch=32))

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def device_times(fn, reps, device, warmup=None):
    """Seconds of each of `reps` calls of fn after one warm-up call (warmup, or fn itself), the
    device synchronized around each (GPU kernels run asynchronously)."""
    (warmup or fn)()
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out

def allocated(device, *modules):
    # bytes alive now: the CUDA allocator's count; on the CPU torch keeps none, so the given
    # modules' tensors
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else sum(map(
        nbytes, modules))

def peak_above(fn, device):
    """Peak bytes one call of fn allocates above what was alive before it: the CUDA allocator's
    high-water mark, or on the CPU the profiler's count (peak_memory)."""
    if device.type != "cuda":
        return peak_memory(fn)["tensors"]
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    return torch.cuda.max_memory_allocated(device) - before

def release(device):
    # what the last row held, back to the device before the next row measures its peak
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

def matmul_peak(device, dtype, n, reps=10):
    """The device's measured matmul FLOP/s in dtype: the best of `reps` square n x n products
    (2 n^3 FLOPs each)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / min(device_times(lambda: a @ b, reps, device))

def diffusers_flux(cfg, state):
    """diffusers' FluxTransformer2DModel holding our state dict (diffusers' own converter), made on
    the meta device and given the converted tensors themselves (assign): no second copy of the
    weights."""
    from diffusers import FluxTransformer2DModel          # optional, as in `dit`
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=cfg.hidden_size // cfg.num_heads,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
            axes_dims_rope=cfg.axes_dim)
    theirs.load_state_dict(bfl_to_diffusers_converter()(state), strict=True, assign=True)
    assert not state, f"keys diffusers did not consume: {list(state)[:4]}"
    return theirs.eval().requires_grad_(False)

def diffusers_flux2(cfg, state):
    """diffusers' Flux2Transformer2DModel holding our FLUX.2 state dict, through diffusers' own
    converter (as the tests load it), made on the meta device and given the converted tensors
    (assign)."""
    from diffusers import Flux2Transformer2DModel          # optional, as in `dit`
    from diffusers.loaders import single_file_utils as sfu
    with torch.device("meta"):
        theirs = Flux2Transformer2DModel(
            in_channels=cfg.in_channels, num_layers=cfg.depth,
            num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.hidden_size
            // cfg.num_heads,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            axes_dims_rope=tuple(cfg.axes_dim), guidance_embeds=cfg.guidance_embed)
    converted = sfu.convert_flux2_transformer_checkpoint_to_diffusers(state)
    theirs.load_state_dict(converted, strict=True, assign=True)
    assert not state, f"keys diffusers did not consume: {list(state)[:4]}"
    return theirs.eval().requires_grad_(False)

def through_diffusers(theirs, cfg):
    # UNO's sequence through diffusers: the references appended to the image tokens, the output
    # sliced to the target
    def call(i):
        L = i["img"].shape[1]
        # FLUX.1 takes the pooled text vector; FLUX.2 has none, and klein no guidance input
        extra = {} if F2.is_flux2(cfg) else {"pooled_projections": i["y"]}
        guidance = i["guidance"] if cfg.guidance_embed else None
        return theirs(hidden_states=torch.cat([i["img"], *i["ref_img"]], 1),
                      encoder_hidden_states=i["txt"],
                      timestep=i["timesteps"], guidance=guidance, txt_ids=i["txt_ids"][0],
                      img_ids=torch.cat([i["img_ids"], *i["ref_img_ids"]], 1)[0],
                      return_dict=False, **extra)[0][:, :L]
    return call

def time_dit(call, inp, S, device):
    """Forward (no grad) and forward+backward of one model on one input: the backward reaches the
    inputs only (frozen weights: what adapter training's backward through the base costs). ->
    measurements, output and input gradients."""
    leaves = [inp["img"], *inp["ref_img"], inp["txt"]]
    for x in leaves:
        x.requires_grad_(True)
    def fwd():
        with torch.no_grad():
            return call(inp)
    def train():
        for x in leaves:
            x.grad = None
        call(inp).float().square().mean().backward()
    r = {"fwd_s": device_times(fwd, S["reps"], device),
         "train_s": device_times(train, S["train_reps"], device),
         "fwd_flops": count_flops(fwd), "train_flops": count_flops(train)}
    r["train_peak_bytes"] = peak_above(train, device)
    return r, fwd().float(), [x.grad.float() for x in leaves]

def dit_section(cfg, S, device, seed):
    """Ours against diffusers in bf16 on each case, the models one after the other (both at once
    would hold the weights twice: 48 GB for flux-dev): ours, then its state dict converted for
    diffusers, then diffusers. Either family: FLUX.2's against Flux2Transformer2DModel."""
    cases = [(f"{S['small']}px + {n} ref", S["small"], n) for n in S["refs"]] + \
        [(f"{S['large']}px + 1 ref", S["large"], 1)]
    inputs = {name: dit_inputs(cfg, size, S["ref"], n, 1, device, torch.bfloat16, seed)
              for name, size, n in cases}
    flux = random_dit(cfg, device, torch.bfloat16, seed).requires_grad_(False)
    ours = {name: time_dit(lambda i: flux(**i), inp, S, device) for name, inp in inputs.items()}
    try:
        build = diffusers_flux2 if F2.is_flux2(cfg) else diffusers_flux
        theirs_model = build(cfg, dict(flux.state_dict()))
    except ImportError as e:
        return {"cases": {name: {"ours": r} for name, (r, _, _) in ours.items()},
                "skipped": f"diffusers: not installed here ({e}); carry its wheel to compare"}
    del flux
    release(device)
    out = {}
    for name, inp in inputs.items():
        r, y, grads = time_dit(through_diffusers(theirs_model, cfg), inp, S, device)
        (mine, y0, grads0) = ours[name]
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
        out[name] = {"ours": mine, "diffusers": r, "rel_diff_out": rel(y0, y),
                     "rel_diff_grad": max(rel(a, b) for a, b in zip(grads0, grads))}
    return {"cases": out}

@contextmanager
def attention_kernel(name):
    """model.attention through one kernel: "flash-attn" (the package, which model.attention prefers
    where it is installed), or one of SDPA's backends with flash-attn set aside."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "flash-attn":
        yield
        return
    flash, M.flash_attn_func = M.flash_attn_func, None
    try:
        with sdpa_kernel(getattr(SDPBackend, name)):
            yield
    finally:
        M.flash_attn_func = flash

def attention_section(cfg, S, device, seed):
    """Every attention kernel through model.attention on the joint sequence of the large case: each
    output against SDPA's math kernel in fp32, the time of forward and of forward+backward. A kernel
    this device or build lacks says why."""
    tok = lambda px: (px // cfg.token_px) ** 2
    L, H = cfg.max_txt_len + tok(S["large"]) + tok(S["ref"]), cfg.num_heads
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, L, H, cfg.hidden_size // H,
                           generator=g).to(device, torch.bfloat16).requires_grad_()
               for _ in range(3))
    with torch.no_grad(), attention_kernel("MATH"):
        want = M.attention(q.float(), k.float(), v.float())
    names = (["flash-attn"] if M.flash_attn_func is not None else []) + \
        ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    out = {"shape": [1, L, H, cfg.hidden_size // H],
           "flash_attn_installed": M.flash_attn_func is not None}
    for name in names:
        def fwd():
            with torch.no_grad():
                return M.attention(q, k, v)
        def train():
            q.grad = k.grad = v.grad = None
            M.attention(q, k, v).float().square().mean().backward()
        try:
            with attention_kernel(name):
                err = ((fwd().float() - want).abs().max() / want.abs().max()).item()
                out[name] = {"rel_err": err, "fwd_s": device_times(fwd, S["reps"], device),
                             "train_s": device_times(train, S["train_reps"], device)}
        except RuntimeError as e:                 # no such kernel for this device, dtype or shape
            out[name] = {"unavailable": str(e).strip().split(". ")[0][:120]}
    return out

def sft_section(cfg, S, device, seed):
    """The real peak memory of paper-scale SFT steps (LoRA rank S["rank"], MoE-LoRA of 4 experts,
    gradient checkpointing, the attention probe with Dice, AdamW as the trainers build it) against
    training_budget's estimate at the same settings. Two steps: the second holds AdamW's states
    while its activations live."""
    size, ref, refs = S["small"], S["ref"], 2
    dtype = M.weight_dtype(device)
    flux = random_dit(cfg, device, dtype, seed)
    ML.inject(flux, rank=S["rank"], n_experts=4)
    flux.to(device).train()
    for _, m in ML.adapters(flux):           # a trained adapter's update, not a fresh one's zeros
        torch.nn.init.normal_(m.up.weight, std=1e-3)
    flux.grad_checkpoint = True
    params = [p for p in flux.parameters() if p.requires_grad]
    opt = TR.build_optimizer(params, 3e-5, 1e-2)
    inp = dit_inputs(cfg, size, ref, refs, 1, device, torch.float32, seed)
    x0, g = inp.pop("img"), torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(device)
    # (B, N, L_img)
    masks = (torch.rand(1, refs, x0.shape[1], generator=g) > 0.7).float().to(device)
    def step():
        probe = M.AttentionProbe()
        with M.autocast(device):
            loss = LS.flow_matching_loss(lambda x_t, t: flux(
                img=x_t, **dict(inp, timesteps=t), probe=probe), x0,
                inp["timesteps"], noise)
        (loss + 0.3 * LS.dice_loss(probe.mean_map(), masks)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    resident = allocated(device, flux)
    times = []
    peak = resident + peak_above(lambda: times.extend(device_times(step, 1, device)), device)
    b = training_budget(cfg, S["rank"], 4, size, ref, refs, 1, dtype, foreach=device.type == "cuda")
    est = budget_columns(b)["1 GPU"]["total, --grad-checkpoint"]
    return {"settings": dict(size=size, ref_size=ref, refs=refs, rank=S["rank"], experts=4,
                             grad_checkpoint=True, dtype=str(dtype)), "step_s": times[0],
            "peak_bytes": peak, "estimate_bytes": est, "budget": b}

def image_seconds(flux, ae, cfg, c, steps, size, device, **guidance):
    """Seconds of one size px image from c (dit_inputs' without t and guidance): `steps` Euler steps
    of cfg's family's schedule, then the AE's decoding; warmed up by a two-step image first."""
    fam = F2.family(cfg)
    ts = fam.get_schedule(steps, c["img"].shape[1])
    latents = lambda ts: fam.denoise(flux, **c, timesteps=ts, guidance=cfg.guidance, progress=False,
                                     **guidance)
    image = lambda ts: lambda: SM.decode_images(ae, latents(ts), size, size)
    return device_times(image(ts), 1, device, warmup=image(ts[:2]))[0]

def sampling_section(cfg, S, device, seed):
    """Seconds per image at the large size with one reference, S["steps"] Euler steps of distilled
    guidance (one DiT forward each) and the AE's decoding: every block resident, then streamed
    (--offload's stream_blocks), then stored in fp8 (--fp8's store_fp8). The prompt's embeddings are
    random (T5/CLIP are not run)."""
    dtype = M.weight_dtype(device)
    flux = random_dit(cfg, device, dtype, seed)
    torch.manual_seed(seed)
    ae = EN.AutoEncoder(cfg.ae).to(device, dtype).eval()
    c = dit_inputs(cfg, S["large"], S["ref"], 1, 1, device, torch.float32, seed)
    c.pop("timesteps"), c.pop("guidance")
    seconds = lambda: image_seconds(flux, ae, cfg, c, S["steps"], S["large"], device)
    out = {"steps": S["steps"], "resident_s": seconds()}
    handles = WT.stream_blocks(flux, device)
    out["offload_s"] = seconds()
    for h in handles:
        h.remove()
    WT.store_fp8(flux.to(device))
    out["fp8_s"] = seconds()
    return out

def klein_sampling_section(cfg, S, device, seed):
    """Seconds per image at the large size with one reference, resident, on one random DiT at klein
    4B's shapes with FLUX.2's AE decoding: klein Base's own steps with its text guidance (the prompt
    and the empty prompt as one forward of two rows a step), then the distilled klein's own steps
    without guidance. The prompts' embeddings are random (Qwen3 is not run)."""
    dtype = M.weight_dtype(device)
    flux = random_dit(cfg, device, dtype, seed)
    torch.manual_seed(seed)
    ae = F2.AutoEncoder(cfg.ae).to(device, dtype).eval()
    c = dit_inputs(cfg, S["large"], S["ref"], 1, 1, device, torch.float32, seed)
    c.pop("timesteps"), c.pop("guidance")
    c.update(txt_null=torch.randn_like(c["txt"]), y_null=c["y"])            # the empty prompt's
    out = {"size": S["large"]}
    for name in (KLEIN, "klein-4b"):
        steps, w = F2.CONFIGS[name].sample_steps, F2.CONFIGS[name].text_guidance
        s = image_seconds(flux, ae, cfg, c, steps, S["large"], device, text_guidance=w)
        out[name] = {"steps": steps, "text_guidance": w, "s": s}
    return out

def guarded(section, *args):
    # a section that runs out of device memory is a row that says so; the other sections still run
    try:
        return section(*args)
    except torch.OutOfMemoryError as e:
        return {"out_of_memory": str(e).splitlines()[0][:200]}
    finally:
        release(args[2])

def ms(ts):
    return f"{median(ts) * 1e3:.1f} ms"

def dit_rows(dit, peak, prefix=""):
    # one DiT against diffusers': forward and forward+backward per case, MFU against `peak`
    rows = []
    for case, r in dit.get("cases", {}).items():
        for mode, label in (("fwd", "forward"), ("train", "forward+backward")):
            mine, theirs, what = r["ours"], r.get("diffusers"), f"{prefix}DiT {label}, {case}"
            mfu = lambda m: f"{m[f'{mode}_flops'] / median(m[f'{mode}_s']) / peak:.0%}"
            if theirs is None:
                rows.append((what, ms(mine[f"{mode}_s"]), "", "",
                             f"MFU {mfu(mine)}; {dit['skipped']}"))
                continue
            GiB = lambda m: f"{m['train_peak_bytes'] / 2 ** 30:.2f}"
            note = f"MFU {mfu(mine)} / {mfu(theirs)}; " + (
                f"rel. diff out {r['rel_diff_out']:.1e}, input grads {r['rel_diff_grad']:.1e}"
                if mode == "fwd" else f"peak {GiB(mine)} / {GiB(theirs)} GiB")
            ratio = median(mine[f"{mode}_s"]) / median(theirs[f"{mode}_s"])
            rows.append((what, ms(mine[f"{mode}_s"]), f"diffusers {ms(theirs[f'{mode}_s'])}",
                         f"{ratio:.3f}", note))
    return rows

def attention_rows(att):
    rows, base = [], att.get("MATH", {}).get("train_s")
    if att.get("flash_attn_installed") is False:
        rows.append(("attention flash-attn", "not installed", "", "",
                     "SDPA's own kernels compared instead"))
    for name, r in att.items():
        if isinstance(r, dict) and "unavailable" in r:
            rows.append((f"attention {name}", "unavailable", "", "", r["unavailable"]))
        elif isinstance(r, dict):
            rows.append((f"attention {name}, fwd+bwd", ms(r["train_s"]), f"math {ms(base)}" if base
                         else "", f"{median(r['train_s']) / median(base):.3f}" if base else "",
                         f"fwd {ms(r['fwd_s'])}; rel. err {r['rel_err']:.1e} against fp32 math"))
    return rows

def sft_rows(sft, prefix=""):
    if "peak_bytes" not in sft:
        return []
    st, GiB = sft["settings"], 2 ** 30
    return [(f"{prefix}SFT step peak memory (GiB)", f"{sft['peak_bytes'] / GiB:.2f}",
             f"estimate {sft['estimate_bytes'] / GiB:.2f}",
             f"{sft['peak_bytes'] / sft['estimate_bytes']:.3f}",
             f"rank {st['rank']}, MoE-LoRA x{st['experts']}, ckpt, {st['size']}px + {st['refs']} "
             f"refs; "
             f"{sft['step_s']:.2f} s a step")]

def sampling_rows(smp, size):
    options = (("resident_s", "resident"), ("fp8_s", "--fp8"), ("offload_s", "--offload"))
    return [(f"s per {size}px image, {smp['steps']} steps, {label}", f"{smp[key]:.2f}",
             f"resident {smp['resident_s']:.2f}", f"{smp[key] / smp['resident_s']:.3f}",
             "DiT + AE decode; T5/CLIP not run") for key, label in options if key in smp]

def klein_sampling_rows(smp):
    rows = []
    for name in (KLEIN, "klein-4b"):
        if name in smp:
            r = smp[name]
            w = r["text_guidance"]
            batched = " (with the empty prompt's rows in one forward)" if w != 1 else ""
            rows.append((f"klein s per {smp['size']}px image, {name}", f"{r['s']:.2f}", "", "",
                         f"{r['steps']} steps, text guidance {w:g}{batched}; resident; DiT + AE "
                         "decode; Qwen3 not run"))
    return rows

def gpu_rows(res):
    """The table's rows (what, value, against, ratio, note) from gpu's results: flux-dev's, then
    klein's; a section that ran out of memory is one row saying so."""
    peak, klein = res["matmul_bf16_flops_per_s"], res["klein"]
    rows = dit_rows(res["dit"], peak) + attention_rows(res["attention"]) + sft_rows(res["sft"]) + \
        sampling_rows(res["sampling"], res["shapes"]["large"]) + \
        dit_rows(klein["dit"], peak, "klein ") + sft_rows(klein["sft"], "klein ") + \
        klein_sampling_rows(klein["sampling"])
    sections = [(name, res[name]) for name in ("dit", "attention", "sft", "sampling")] + \
        [(f"klein {name}", klein[name]) for name in ("dit", "sft", "sampling")]
    return rows + [(name, "out of memory", "", "", r["out_of_memory"])
                   for name, r in sections if "out_of_memory" in r]

def print_gpu_table(res):
    print(f"\nbench.py gpu: {res['device']}, torch {res['torch']}, bf16 matmul "
          f"{res['matmul_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s "
          f"({res['shapes']['matmul']}^3), {res['wall_s']:.0f} s")
    print(f"{'':48s}{'value':>14s}  {'against':>22s}{'ratio':>8s}  note")
    for what, value, against, ratio, note in gpu_rows(res):
        print(f"{what:48s}{value:>14s}  {against:>22s}{ratio:>8s}  {note}")

def gpu(args):
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench.py gpu needs a CUDA GPU (--tiny runs the same code on the CPU at tiny shapes)")
    cfg, S = (tiny_config(), TINY_SHAPES) if args.tiny else (M.get_config("flux-dev"), GPU_SHAPES)
    klein = tiny_klein() if args.tiny else F2.get_config(KLEIN)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--tiny)"
    t0 = time.perf_counter()
    res = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "shapes": S,
           "matmul_bf16_flops_per_s": matmul_peak(device, torch.bfloat16, S["matmul"])}
    for key, section in (("dit", dit_section), ("attention", attention_section),
                         ("sft", sft_section), ("sampling", sampling_section)):
        print(f"{key} ...", flush=True)
        res[key] = guarded(section, cfg, S, device, args.seed)
    res["klein"] = {"preset": KLEIN}
    for key, section in (("dit", dit_section), ("sft", sft_section),
                         ("sampling", klein_sampling_section)):
        print(f"klein {key} ...", flush=True)
        res["klein"][key] = guarded(section, klein, S, device, args.seed)
    res["wall_s"] = time.perf_counter() - t0
    print_gpu_table(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.json}")
    return res

"""
Performance measurements, each printed as a side-by-side ratio measured in one run.

    python bench.py dit                          # our DiT vs diffusers' FluxTransformer2DModel (~2 min, 2 cores)
    python bench.py dit --json dit.json          # ... and write the numbers as JSON
    python bench.py dit --reps 3 --train-reps 2  # fewer repetitions (noisier, faster)
    python bench.py dit --ours /tmp/x/model.py   # benchmark another copy of model.py against diffusers
    python bench.py sft                          # SFT step with probe + Dice on vs off; our probe vs MOSAIC's
    python bench.py moe                          # MoE-LoRA top-1 of 4 vs one LoRA of the same rank
    python bench.py memory                       # per-GPU memory budget for flux-dev at the paper's settings
    python bench.py rl                           # one IPPO iteration: DiT evaluations, peak memory T = 8 vs 16
    python bench.py faults                       # kill -9 toy training runs at random points, resume, compare
    python bench.py ablation --base runs/base/latest   # MultiCrafter's Table 2 in miniature, + 2-4 subjects
    python bench.py badinput --table t.md        # bad images, weights, manifests, ranks: what each entry point does

`dit`: a mid-sized FLUX (hidden 512, 8 heads of 64, 4 double + 8 single blocks) on 1024 image tokens (32x32),
two 16x16 references with UNO ids and 128 text tokens, batch 1, fp32, guidance-embedded. diffusers' model gets
the same weights through diffusers' own BFL->diffusers converter (patched for hidden sizes other than 3072)
and sees the references as part of one image sequence with concatenated ids, its output sliced to the target
tokens: exactly what our model computes. Measured for each: forward (no_grad) and forward+backward time
(backward w.r.t. all parameters of loss = mean(out^2)), model FLOPs (torch's FlopCounterMode), model FLOP
utilization against this machine's fp32 matmul speed measured in the same run, and peak memory.
"""
import argparse
import contextlib
import ctypes
import gc
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import statistics
import struct
import time
import zlib

import numpy as np
import torch
from PIL import Image

import data as D
import model as M
import sample as S

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
sub = parser.add_subparsers(dest="cmd", required=True)
p = sub.add_parser("dit", help="our Flux DiT vs diffusers' FluxTransformer2DModel (time, FLOP utilization, memory)")
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--axes", type=str, default="16,24,24", help="RoPE axes_dim, sums to hidden/heads")
p.add_argument("--depth", type=int, default=4, help="double stream blocks")
p.add_argument("--depth-single", type=int, default=8, help="single stream blocks")
p.add_argument("--grid", type=int, default=32, help="target image token grid side (tokens = grid^2)")
p.add_argument("--ref-grid", type=int, default=16, help="reference token grid side")
p.add_argument("--refs", type=int, default=2, help="number of reference images")
p.add_argument("--txt", type=int, default=128, help="text tokens")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--reps", type=int, default=6, help="timed forward repetitions per model (interleaved)")
p.add_argument("--train-reps", type=int, default=4, help="timed forward+backward repetitions per model")
p.add_argument("--ours", type=str, default=None, help="path of the model.py to benchmark (default: ./model.py)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
p = sub.add_parser("sft", help="adapter training step with the attention probe + Dice on vs off; vs a MOSAIC-style probe")
p.add_argument("--rank", type=int, default=16)
p.add_argument("--reps", type=int, default=6)
p.add_argument("--seed", type=int, default=0)
p = sub.add_parser("moe", help="MoE-LoRA top-1 of 4 vs one LoRA of the same rank (forward+backward time)")
p.add_argument("--scale", type=int, default=8, help="divide the paper's rank 512 on 3072 -> 12288 by this")
p.add_argument("--tokens", type=int, default=4096)
p.add_argument("--reps", type=int, default=10)
p.add_argument("--seed", type=int, default=0)
p = sub.add_parser("memory", help="per-GPU memory budget at paper scale, from module shapes on the meta device")
p.add_argument("--preset", default="flux-dev")
p.add_argument("--rank", type=int, default=512)
p.add_argument("--experts", type=int, default=4)
p.add_argument("--size", type=int, default=512)
p.add_argument("--ref-size", type=int, default=320)
p.add_argument("--refs", type=int, default=2)
p.add_argument("--batch", type=int, default=1)
p = sub.add_parser("rl", help="one IPPO iteration: DiT evaluations and peak memory at T = 8 vs T = 16")
p.add_argument("--group", type=int, default=4, help="samples per prompt G")
p.add_argument("--window", type=int, default=2, help="SDE window w")
p.add_argument("--hidden", type=int, default=256, help="DiT width (heads of 64)")
p.add_argument("--grid", type=int, default=16, help="target token grid side")
p.add_argument("--seed", type=int, default=0)
p = sub.add_parser("faults", help="kill -9 toy train_sft / train_rl runs (also mid-checkpoint), resume, compare")
p.add_argument("--kills", type=int, default=6, help="kill points per trainer (every other one during a checkpoint write)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
p.add_argument("--table", default=None, help="also write the markdown table to this file")
p = sub.add_parser("ablation", help="the paper's Table 2 in miniature on the toy world, and 2/3/4 subjects")
p.add_argument("--base", required=True, help="a toy base checkpoint folder (`train_sft.py --stage base` output)")
p.add_argument("--work", default="runs/ablation", help="data, runs and scores (a rerun reuses what is finished)")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--n", type=int, default=2000, help="training records, 2 to 4 subjects each")
p.add_argument("--steps", type=int, default=250, help="stage-multi steps of every row")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--ippo-iters", type=int, default=30, help="IPPO iterations of the last row")
p.add_argument("--test-n", type=int, default=48, help="test records per number of subjects (2, 3, 4)")
p.add_argument("--eval-steps", type=int, default=8, help="sampling steps of the test generations")
p.add_argument("--table", default=None, help="also write the markdown tables to this file")
p = sub.add_parser("badinput", help="bad images, weights, manifests and ranks through every entry point: what happens")
p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
p.add_argument("--table", default=None, help="also write the markdown tables to this file")
p.add_argument("--no-dist", action="store_true", help="leave out the torchrun rows (about a minute)")

# -----------------------------------------------------------------------------
# measuring tools shared by the subcommands

def median(xs):
    return statistics.median(xs)

def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

def cpu_stall_s():
    """Seconds (since boot) during which some runnable task waited for a CPU (Linux PSI); None if unavailable.
    Our own threads do not exceed the cores, so a rise while timing means other load took our CPUs."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None

def interleaved_times(fns, reps):
    """Time each of `fns` `reps` times, interleaved A B, B A, A B, ... so that slow drifts of the machine
    (thermal, other load) hit all of them alike and the order within a pair does not favour one.
    Returns the times and, per measurement, the fraction of it other load kept a runnable task off a CPU."""
    times, stalls = [[] for _ in fns], [[] for _ in fns]
    for r in range(reps):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            s0 = cpu_stall_s()
            dt = timed(fns[i])
            times[i].append(dt)
            stalls[i].append(None if s0 is None else (cpu_stall_s() - s0) / dt)
    return times, stalls

def matmul_flops_per_s(n=2048, reps=8):
    """This machine's fp32 matmul speed: median over `reps` square n x n matmuls (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    return 2 * n ** 3 / median([timed(lambda: a @ b) for _ in range(reps)])

def count_flops(fn):
    """FLOPs of one call of fn, by torch's FlopCounterMode (matmuls and attention). Its registry lacks the CPU
    flash-attention ops SDPA dispatches to on CPU, so they get torch's own SDPA formulas here."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad_out, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad_out, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()

try:
    _libc = ctypes.CDLL("libc.so.6") if os.path.exists("/proc/self/clear_refs") else None
except OSError:       # not glibc
    _libc = None

def _proc_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None

def peak_memory(fn):
    """Peak memory of one call of fn above what was alive before it, measured two ways, in bytes.

    tensors: the peak of live torch tensor bytes. torch's CPU allocator reports every allocation and free to
      the profiler when profile_memory=True; summing those events in time order gives the exact high-water mark
      of activations, autograd-saved tensors, temporaries and gradients created by fn (parameters and inputs
      allocated before are the baseline, not counted). tracemalloc would see none of this, and RSS mixes in
      malloc's caching; this is the number to compare. It misses buffers oneDNN/MKL allocate themselves.
    rss: the growth of the process's peak resident set (Linux VmHWM) over its resident size just before fn,
      after giving malloc's free memory back to the OS (malloc_trim) and resetting VmHWM (clear_refs 5). It adds
      library scratch buffers and whatever freed memory glibc keeps mapped during fn (its mmap threshold rises
      to the largest block freed so far, so one model's allocation sizes can make it retain tens of MiB more
      than another's): the process-level view, but allocator-dependent (None without /proc/self/clear_refs).
    The tensor peak reads torch's private profiler event tree (torch._C._profiler), as torch's own memory
    profiler does.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    rss0 = None
    if _libc is not None:
        _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = _proc_kib("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    rss = None if rss0 is None else (_proc_kib("VmHWM") - rss0) * 1024
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):     # frees of blocks allocated before the window report nothing useful
        live += size
        peak = max(peak, live)
    return {"tensors": peak, "rss": rss}

# -----------------------------------------------------------------------------
# dit: our Flux vs diffusers' FluxTransformer2DModel

def import_path(path, name="bench_model"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def bfl_to_diffusers_converter():
    """diffusers' own BFL->diffusers state-dict converter, with its hard-coded hidden size (3072) replaced by the
    one read from the checkpoint (reference/flux_reference.md 2.3). It pops what it converts from its input."""
    import diffusers.loaders.single_file_utils as sfu
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        raise RuntimeError("diffusers' Flux converter changed; bench.py's patch needs updating")
    src = src.replace("inner_dim = 3072", 'inner_dim = checkpoint["img_in.weight"].shape[0]')
    namespace = dict(vars(sfu))
    exec(src, namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]

def dit(args):
    M = import_path(args.ours or os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py"))
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(args.seed)
    axes = tuple(int(a) for a in args.axes.split(","))
    cfg = M.FluxConfig(hidden_size=args.hidden, num_heads=args.heads, depth=args.depth,
                       depth_single_blocks=args.depth_single, axes_dim=axes, guidance_embed=True)
    ours = M.Flux(cfg)
    with torch.no_grad():   # random weights, RMSNorm scales and biases away from their init values too
        for n, w in ours.named_parameters():
            w.copy_(torch.randn_like(w) * (0.02 if w.ndim > 1 else 0.1) + (1.0 if n.endswith(".scale") else 0.0))
    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=True, axes_dims_rope=axes)
    convert = bfl_to_diffusers_converter()
    left = dict(ours.state_dict())
    theirs.load_state_dict(convert(left), strict=True)
    assert not left, f"keys diffusers did not consume: {list(left)}"
    ours.train(), theirs.train()      # no dropout in either; train() only to be explicit

    # inputs: target latent 2G x 2G -> G x G tokens; references 2R x 2R -> R x R tokens with UNO ids
    B, G, R, n_refs, L_txt = args.batch, args.grid, args.ref_grid, args.refs, args.txt
    img = M.pack(torch.randn(B, cfg.in_channels // 4, 2 * G, 2 * G))
    img_ids = M.grid_ids(G, G, batch=B)
    refs = [M.pack(torch.randn(B, cfg.in_channels // 4, 2 * R, 2 * R)) for _ in range(n_refs)]
    refs_ids = M.ref_ids((G, G), [(R, R)] * n_refs, batch=B)
    txt, txt_ids = torch.randn(B, L_txt, cfg.context_in_dim), torch.zeros(B, L_txt, 3)
    y, t, g = torch.randn(B, cfg.vec_in_dim), torch.rand(B), torch.full((B,), 3.5)
    L_img = img.shape[1]
    all_img, all_ids = torch.cat([img] + refs, dim=1), torch.cat([img_ids] + refs_ids, dim=1)[0]

    def run_ours():
        return ours(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=g,
                    ref_img=refs, ref_img_ids=refs_ids)

    def run_theirs():    # references in the image sequence, output sliced to the target: what UNO computes
        return theirs(hidden_states=all_img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                      img_ids=all_ids, txt_ids=txt_ids[0], guidance=g, return_dict=False)[0][:, :L_img]

    def forward(run):
        def step():
            with torch.no_grad():
                run()
        return step

    def train(run, model):
        def step():
            model.zero_grad(set_to_none=True)   # each step builds fresh gradients, like an optimizer step would
            run().square().mean().backward()
        return step

    names = ("ours", "diffusers")
    models = (ours, theirs)
    fwd = [forward(run_ours), forward(run_theirs)]
    trn = [train(run_ours, ours), train(run_theirs, theirs)]
    res = {"config": {**{k: v for k, v in vars(args).items() if k not in ("cmd", "json")}, "axes": axes,
                      "tokens": {"img": L_img, "refs": n_refs * R * R, "txt": L_txt}},
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; hidden {args.hidden}, "
          f"{args.heads} heads, {args.depth}+{args.depth_single} blocks, tokens txt {L_txt} + img {L_img} + "
          f"refs {n_refs}x{R * R}, batch {B}", flush=True)

    # agreement: forward outputs, then every parameter gradient (ours mapped by the same converter)
    with torch.no_grad():
        a, b = run_ours(), run_theirs()
    res["max_abs_diff_out"] = (a - b).abs().max().item()
    res["max_abs_out"] = b.abs().max().item()
    for step in trn:
        step()
    grads = convert({n: w.grad for n, w in ours.named_parameters()})
    theirs_grads = dict(theirs.named_parameters())
    res["max_abs_diff_grad"] = max((grads[n] - w.grad).abs().max().item() for n, w in theirs_grads.items())
    res["max_abs_grad"] = max(w.grad.abs().max().item() for w in theirs_grads.values())
    print(f"agreement: output max|diff| {res['max_abs_diff_out']:.2e} (max|out| {res['max_abs_out']:.2f}), "
          f"gradients max|diff| {res['max_abs_diff_grad']:.2e} (max|grad| {res['max_abs_grad']:.2e})", flush=True)

    # FLOPs (these passes double as warm-up)
    flops = {n: {"fwd": count_flops(f), "train": count_flops(s)} for n, f, s in zip(names, fwd, trn)}
    mm0 = matmul_flops_per_s()
    for step in fwd + trn:                     # one more plain warm-up each
        step()
    print("timing ...", flush=True)
    t_fwd, s_fwd = interleaved_times(fwd, args.reps)
    t_trn, s_trn = interleaved_times(trn, args.train_reps)
    mm = (mm0 + matmul_flops_per_s()) / 2      # measured before and after the model timings
    print("memory ...", flush=True)
    mem = {}
    for n, model, f, s in zip(names, models, fwd, trn):
        model.zero_grad(set_to_none=True)     # no gradients alive before: they count in the step's peak
        mem[n] = {"fwd": peak_memory(f), "train": peak_memory(s)}
        model.zero_grad(set_to_none=True)

    res["matmul_flops_per_s"] = mm
    for i, n in enumerate(names):
        r = res[n] = {}
        for mode, ts, ss in (("fwd", t_fwd[i], s_fwd[i]), ("train", t_trn[i], s_trn[i])):
            m = median(ts)
            r[mode] = {"median_s": m, "times_s": ts, "spread": (max(ts) - min(ts)) / m, "flops": flops[n][mode],
                       "min_s": min(ts), "cpu_stall": None if None in ss else statistics.mean(ss),
                       "mfu": flops[n][mode] / m / mm, "peak_tensor_bytes": mem[n][mode]["tensors"],
                       "peak_rss_bytes": mem[n][mode]["rss"]}
    res["ratio"] = {mode: {"time": res["ours"][mode]["median_s"] / res["diffusers"][mode]["median_s"],
                           "time_pairwise": median([x / y for x, y in zip(*(t_fwd if mode == "fwd" else t_trn))]),
                           "peak_tensor_bytes": res["ours"][mode]["peak_tensor_bytes"]
                                                / res["diffusers"][mode]["peak_tensor_bytes"]}
                    for mode in ("fwd", "train")}

    # the table
    MiB = 2 ** 20
    rows = [  # label, value, format, print the ours/diffusers ratio
        ("time, median (s)", lambda r: r["median_s"], "{:.3f}", True),
        ("time, min (s)", lambda r: r["min_s"], "{:.3f}", True),
        ("  spread (max-min)/median", lambda r: r["spread"], "{:.1%}", False),
        ("  CPU taken by other load", lambda r: r["cpu_stall"] or 0.0, "{:.1%}", False),
        ("GFLOP executed", lambda r: r["flops"] / 1e9, "{:.1f}", True),
        ("GFLOP/s", lambda r: r["flops"] / r["median_s"] / 1e9, "{:.1f}", True),
        ("MFU (GFLOP/s / matmul's)", lambda r: r["mfu"], "{:.1%}", True),
        ("peak tensors (MiB)", lambda r: r["peak_tensor_bytes"] / MiB, "{:.0f}", True),
        ("peak RSS growth (MiB)", lambda r: (r["peak_rss_bytes"] or 0) / MiB, "{:.0f}", True)]
    print(f"\nfp32 matmul {2048}^2: {mm / 1e9:.1f} GFLOP/s; timings: {args.reps} forward, {args.train_reps} "
          f"forward+backward repetitions per model, interleaved")
    print(f"{'':34s}{'ours':>10s}{'diffusers':>11s}{'ours/diff':>11s}")
    for mode, title in (("fwd", "forward"), ("train", "forward+backward")):
        print(title)
        for label, get, fmt, show_ratio in rows:
            x, y = get(res["ours"][mode]), get(res["diffusers"][mode])
            ratio = f"{x / y:11.3f}" if show_ratio and y else ""
            print(f"  {label:32s}{fmt.format(x):>10s}{fmt.format(y):>11s}{ratio}")
        print(f"  {'time ratio, median of pairs':32s}{'':21s}{res['ratio'][mode]['time_pairwise']:11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return res

# -----------------------------------------------------------------------------
# sft: one adapter training step with the attention probe + Dice on vs off; our probe vs a MOSAIC-style one

class MosaicProbe:
    """MOSAIC's way (bytedance-fanqie-ai/MOSAIC src/flux_omini_mosaic.py): materialize each reference's
    [B, heads, N_ref, N_img] softmax in every double block and keep it for backward."""
    def __init__(self):
        self.maps = []

    def at(self, i):
        return self

    def __call__(self, q, k, spans):
        k_img = k[:, :, spans.img[0]:spans.img[1]]
        self.maps.append(torch.stack([
            torch.einsum("bhnd,bhmd->bhnm", q[:, :, s:e], k_img).mul(q.shape[-1] ** -0.5).softmax(-1).mean((1, 2))
            for s, e in spans.refs], dim=1))

    def mean_map(self):
        return torch.stack(self.maps).mean(0)

def sft(args):
    import losses as LS
    import moe_lora as ML
    torch.manual_seed(args.seed)
    cfg = M.FluxConfig(hidden_size=512, num_heads=8, depth=4, depth_single_blocks=8, axes_dim=(16, 24, 24))
    flux = M.Flux(cfg)
    ML.inject(flux, rank=args.rank, n_experts=4)
    for _, m in ML.adapters(flux):
        torch.nn.init.normal_(m.up.weight, std=0.01)
    B, G, R = 1, 32, 16
    img, img_ids = M.pack(torch.randn(B, 16, 2 * G, 2 * G)), M.grid_ids(G, G, batch=B)
    refs = [M.pack(torch.randn(B, 16, 2 * R, 2 * R)) for _ in range(2)]
    rids = M.ref_ids((G, G), [(R, R)] * 2, batch=B)
    txt, txt_ids, y = torch.randn(B, 128, cfg.context_in_dim), torch.zeros(B, 128, 3), torch.randn(B, cfg.vec_in_dim)
    t, g, target = torch.rand(B), torch.full((B,), 1.0), torch.randn_like(img)
    masks = (torch.rand(B, 2, G * G) > 0.7).float()

    def step(probe_cls):
        def run():
            flux.zero_grad(set_to_none=True)
            probe = probe_cls() if probe_cls else None
            out = flux(img, img_ids, txt, txt_ids, t, y, g, refs, rids, probe=probe)
            loss = (out - target).square().mean()
            if probe is not None:
                loss = loss + 0.3 * LS.dice_loss(probe.mean_map(), masks)
            loss.backward()
        return run

    variants = {"off": step(None), "ours": step(M.AttentionProbe), "mosaic": step(MosaicProbe)}
    for f in variants.values():
        f()
    print(f"SFT step: hidden 512, 4+8 blocks, 1024 image + 2x256 reference + 128 text tokens, LoRA/MoE-LoRA rank "
          f"{args.rank}, fp32, {torch.get_num_threads()} threads", flush=True)
    times, _ = interleaved_times([variants["off"], variants["ours"]], args.reps)
    mem = {k: peak_memory(f)["tensors"] for k, f in variants.items()}
    MiB = 2 ** 20
    res = {"time_off_s": median(times[0]), "time_probe_s": median(times[1]),
           "time_ratio": median(times[1]) / median(times[0]),
           "peak_off_MiB": mem["off"] / MiB, "peak_probe_MiB": mem["ours"] / MiB, "peak_mosaic_MiB": mem["mosaic"] / MiB,
           "peak_ratio": mem["ours"] / mem["off"],
           "extra_ours_over_mosaic": (mem["ours"] - mem["off"]) / (mem["mosaic"] - mem["off"])}
    print(f"  time     probe+Dice off {res['time_off_s']:.3f} s, on {res['time_probe_s']:.3f} s: ratio "
          f"{res['time_ratio']:.3f} (target <= 1.15)")
    print(f"  peak     off {res['peak_off_MiB']:.0f} MiB, our probe {res['peak_probe_MiB']:.0f} MiB: ratio "
          f"{res['peak_ratio']:.3f} (target <= 1.15)")
    print(f"  extra    ours {res['peak_probe_MiB'] - res['peak_off_MiB']:.1f} MiB vs MOSAIC-style "
          f"{res['peak_mosaic_MiB'] - res['peak_off_MiB']:.1f} MiB: ratio {res['extra_ours_over_mosaic']:.3f} "
          f"(target <= 0.25)")
    return res

# -----------------------------------------------------------------------------
# moe: MoE-LoRA top-1 of 4 vs one LoRA of the same rank, at the paper's shape ratio scaled down

def moe(args):
    import moe_lora as ML
    torch.manual_seed(args.seed)
    s = args.scale          # the paper: rank 512 on 3072 -> 12288 (FLUX's FFN); divided by `scale` together
    D, H, r = 3072 // s, 12288 // s, 512 // s
    base = torch.nn.Linear(D, H).requires_grad_(False)
    lora, moe_ = ML.LoRALinear(base, r), ML.MoELoRALinear(base, 4, r, top_k=1)
    for m in (lora, moe_):
        torch.nn.init.normal_(m.up.weight, std=0.01)
    x = torch.randn(1, args.tokens, D, requires_grad=True)
    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            x.grad = None
            m(x).square().mean().backward()
        return run
    fns = [step(lora), step(moe_)]
    for f in fns:
        f()
    times, _ = interleaved_times(fns, args.reps)
    ratio = median(times[1]) / median(times[0])
    print(f"MoE-LoRA top-1 of 4 vs LoRA, rank {r} on {D} -> {H}, {args.tokens} tokens, forward+backward: "
          f"{median(times[1]) * 1e3:.1f} ms vs {median(times[0]) * 1e3:.1f} ms, ratio {ratio:.3f} (target <= 1.3)")
    return {"lora_s": median(times[0]), "moe_s": median(times[1]), "ratio": ratio}

# -----------------------------------------------------------------------------
# memory: a per-GPU budget for paper-scale training, from the real module shapes on the meta device

class FlashLike(torch.autograd.Function):
    """Stands in for SDPA on the meta device with what flash attention keeps for backward: q, k, v, the output
    and an fp32 log-sum-exp per query (B, H, L). (Meta SDPA would take the math path and keep L x L scores.)"""
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

def saved_bytes(model, fn):
    """Bytes autograd keeps for backward while fn runs (parameters excluded, each storage counted once)."""
    params = {id(p) for p in model.parameters()}
    seen, total = set(), [0]
    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in seen and id(base) not in params:
            seen.add(id(base))
            total[0] += base.numel() * base.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]

def memory(args):
    import moe_lora as ML
    cfg = M.get_config(args.preset)
    with torch.device("meta"):
        flux = M.Flux(cfg)
        ML.inject(flux, rank=args.rank, n_experts=args.experts)
    frozen = sum(p.numel() for p in flux.parameters() if not p.requires_grad)
    adapter = sum(p.numel() for p in flux.parameters() if p.requires_grad)
    # activations: under bf16 autocast every matmul output is bf16, so run the meta model in bf16
    flux.to(torch.bfloat16)
    G, R, Lt, B = args.size // 16, args.ref_size // 16, cfg.max_txt_len, args.batch
    bf = dict(device="meta", dtype=torch.bfloat16)
    def forward():
        flux(torch.randn(B, G * G, cfg.in_channels, **bf), M.grid_ids(G, G, batch=B, device="meta"),
             torch.randn(B, Lt, cfg.context_in_dim, **bf), torch.zeros(B, Lt, 3, device="meta"), torch.rand(B, **bf),
             torch.randn(B, cfg.vec_in_dim, **bf), torch.ones(B, **bf),
             [torch.randn(B, R * R, cfg.in_channels, **bf) for _ in range(args.refs)],
             M.ref_ids((G, G), [(R, R)] * args.refs, batch=B, device="meta"), probe=M.AttentionProbe())
    sdpa = M.F.scaled_dot_product_attention
    M.F.scaled_dot_product_attention = lambda q, k, v: FlashLike.apply(q, k, v)
    try:
        act = saved_bytes(flux, forward)
        flux.grad_checkpoint = True
        act_ckpt = saved_bytes(flux, forward)
        # backward then recomputes one block at a time: add the largest block's own activations
        L = G * G + args.refs * R * R + Lt
        x = torch.randn(B, L, cfg.hidden_size, **bf, requires_grad=True)
        pe = M.rope(torch.zeros(B, L, 3, device="meta"), cfg.axes_dim, cfg.theta)
        act_ckpt += saved_bytes(flux, lambda: flux.single_blocks[0](x, torch.randn(B, cfg.hidden_size, **bf), pe))
    finally:
        M.F.scaled_dot_product_attention = sdpa
    GiB = 2 ** 30
    fixed = {"frozen DiT (bf16)": frozen * 2, "adapters (fp32)": adapter * 4, "adapter gradients (fp32)": adapter * 4}
    print(f"{args.preset}: {frozen / 1e9:.2f}B frozen + {adapter / 1e9:.3f}B adapter parameters (LoRA rank {args.rank}, "
          f"MoE-LoRA {args.experts} experts); batch {B} per GPU: {args.size}px target ({G * G} tokens), {args.refs} "
          f"refs of {args.ref_size}px ({R * R} tokens each), {Lt} text tokens; activations as bf16 autocast with "
          f"flash attention keeps them; T5/CLIP/VAE not resident (python data.py cache)")
    print(f"{'GiB per GPU':42s}{'1 GPU':>9s}{'8 GPUs':>9s}{'8 + ZeRO':>10s}")
    for k, v in fixed.items():
        print(f"  {k:40s}{v / GiB:9.1f}{v / GiB:9.1f}{v / GiB:10.1f}")
    adam = adapter * 8                                          # AdamW: two fp32 moments per parameter
    print(f"  {'AdamW states (fp32 x 2)':40s}{adam / GiB:9.1f}{adam / GiB:9.1f}{adam / 8 / GiB:10.1f}")
    for label, a in (("activations", act), ("activations, --grad-checkpoint", act_ckpt)):
        print(f"  {label:40s}{a / GiB:9.1f}{a / GiB:9.1f}{a / GiB:10.1f}")
    base = sum(fixed.values())
    for label, a in (("total", act), ("total, --grad-checkpoint", act_ckpt)):
        print(f"  {label:40s}{(base + adam + a) / GiB:9.1f}{(base + adam + a) / GiB:9.1f}"
              f"{(base + adam / 8 + a) / GiB:10.1f}")
    return {"frozen_params": frozen, "adapter_params": adapter, "activation_bytes": act, "activation_bytes_ckpt": act_ckpt}

# -----------------------------------------------------------------------------
# rl: one IPPO iteration (train_rl.py's rollout and GSPO update) at two trajectory lengths

def rl(args):
    """DiT rows (samples through the DiT) counted by a forward hook, split into rollout and update, and the peak
    tensor memory of a whole iteration (rollout + reward-free GSPO update + backward) at T = 8 and T = 16. The
    update holds the graphs of the w window steps only, so the peak should not grow with T."""
    import losses as LS
    import moe_lora as ML
    import train_rl as TR
    torch.manual_seed(args.seed)
    cfg = M.get_config("toy", hidden_size=args.hidden, num_heads=args.hidden // 64, axes_dim=(16, 24, 24))
    flux = M.Flux(cfg)
    ML.inject(flux, rank=16)
    for _, m in ML.adapters(flux):
        torch.nn.init.normal_(m.up.weight, std=0.01)
    ae, text, px = M.AutoEncoder(cfg.ae), M.ByteTextEncoder(cfg), 2 * cfg.ae.factor
    refs = [D.render_reference(D.SPRITES[i], args.grid * px // 2) for i in (5, 100)]
    c = S.prepare(cfg, ae, text, "two sprites", refs, args.grid * px, args.grid * px, seed=args.seed)
    G, w, rows = args.group, args.window, []
    flux.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    adv = torch.linspace(-1, 1, G)

    def iteration(T, l):
        ts, window = S.get_schedule(T, args.grid ** 2), range(l, l + w)
        _, tr, _ = TR.rollout(flux, c, G, ts, window, 0.7, 3.5, torch.Generator().manual_seed(0))
        n_rollout = len(rows)
        logp, _, _ = TR.WindowPolicy(flux)(c, tr["x"], tr["x_next"], [(ts[i], ts[i + 1]) for i in window], 0.7, 3.5)
        LS.gspo_loss(logp, tr["old_logp"], adv)[0].backward()
        flux.zero_grad(set_to_none=True)
        return sum(rows[:n_rollout]), sum(rows[n_rollout:])

    res = {}
    print(f"one IPPO iteration, hidden {args.hidden}, {args.grid ** 2} image tokens + 2 refs, G {G}, w {w}, fp32 CPU")
    for T in (8, 16):
        for l in (0, T // 2):
            rows.clear()
            out = {}
            mem = peak_memory(lambda: out.update(zip(("rollout", "update"), iteration(T, l))))
            res[f"T{T}_l{l}"] = dict(out, peak_MiB=mem["tensors"] / 2 ** 20)
            print(f"  T {T:2d}, window at {l:2d}: rollout {out['rollout']:3d} DiT rows (G T = {G * T}; the group shares "
                  f"the {l} steps before the window: l + G (T - l) = {l + G * (T - l)}), update {out['update']} "
                  f"(G w = {G * w}), peak {mem['tensors'] / 2 ** 20:.1f} MiB")
    res["peak_ratio_T16_over_T8"] = res["T16_l0"]["peak_MiB"] / res["T8_l0"]["peak_MiB"]
    print(f"  peak memory T = 16 / T = 8 (window at 0): {res['peak_ratio_T16_over_T8']:.3f} (target <= 1.1)")
    return res

# -----------------------------------------------------------------------------
# faults: SIGKILL a toy training run at random points and while it writes a checkpoint, then resume

def checkpoints_intact(out):
    """Every ckpt-* folder loads whole (adapter, optimizer state with weights_only, args) and OUT/latest names
    one. -> (ok, steps of the checkpoints, step of latest or 0)."""
    from safetensors.torch import load_file
    steps = []
    for d in sorted(x for x in os.listdir(out) if x.startswith("ckpt-")):
        load_file(os.path.join(out, d, "adapter.safetensors"))
        state = torch.load(os.path.join(out, d, "train_state.pt"), map_location="cpu", weights_only=True)
        json.load(open(os.path.join(out, d, "args.json")))
        steps.append(state["step"])
    latest = os.path.join(out, "latest")
    if not os.path.lexists(latest):
        return not steps, steps, 0
    return os.path.isdir(latest), steps, int(os.path.basename(os.path.realpath(latest))[5:])

def faults(args):
    """For train_sft.py (stage multi) and train_rl.py on a random toy base: one uninterrupted run, then
    `--kills` runs killed with SIGKILL (a random moment after a random checkpoint, or while one is being
    written: the moment its temporary folder appears), each checked for intact checkpoints and resumed with
    --resume to the end. The final adapter must equal the uninterrupted run's bit for bit (CPU)."""
    import random, subprocess, sys, tempfile
    from safetensors.torch import load_file
    work, rng = args.work or tempfile.mkdtemp(prefix="faults-"), random.Random(args.seed)
    manifest = D.write_toy(os.path.join(work, "data"), 16, seed=0)
    base = toy_base(os.path.join(work, "base"))[0]
    here, env = os.path.dirname(os.path.abspath(__file__)), dict(os.environ, OMP_NUM_THREADS="1")
    # (script, checkpoints it writes: one per step, arguments)
    runs = [("train_sft.py", 8, ["--stage", "multi", "--steps", "8", "--batch-size", "2", "--lambda-attn", "0.3"]),
            ("train_rl.py", 6, ["--iters", "6", "--steps", "4", "--group", "4"])]
    rows = []
    for script, n, extra in runs:
        cmd = lambda out, *more: [sys.executable, os.path.join(here, script), "--data", manifest, "--init", base,
                                  "--rank", "4", "--lr", "1e-2", "--ckpt-every", "1", "--out", out, *extra, *more]
        ref = os.path.join(work, script[:-3], "uninterrupted")
        subprocess.run(cmd(ref), env=env, check=True, capture_output=True)
        want = load_file(os.path.join(ref, "latest", "adapter.safetensors"))
        for k in range(args.kills):
            out = os.path.join(work, script[:-3], f"kill{k}")
            proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            j, point = rng.randint(1, n - 1), None                 # a checkpoint of the run, not the last
            while proc.poll() is None and point is None:
                if k % 2 and os.path.isdir(f"{out}/.tmp-ckpt-{j:07d}"):   # while checkpoint j is being written
                    point = f"writing checkpoint {j}"
                elif not k % 2 and os.path.isdir(f"{out}/ckpt-{j:07d}"):  # a random moment after checkpoint j
                    wait = rng.uniform(0.0, 0.5)
                    time.sleep(wait)
                    point = f"{wait:.2f} s after checkpoint {j}"
            if proc.poll() is not None:
                rows.append((script, "(finished before the kill)", "-", "-", "-"))
                continue
            proc.kill()
            proc.wait()
            try:
                ok, steps, latest = checkpoints_intact(out)
                state = f"{'intact' if ok else 'BROKEN'}: {steps}"
            except Exception as e:                     # a checkpoint that does not load: the failure to report
                latest, state = 0, f"BROKEN ({type(e).__name__}: {str(e)[:60]})"
            r = subprocess.run(cmd(out, "--resume"), env=env, capture_output=True, text=True)
            got = load_file(os.path.join(out, "latest", "adapter.safetensors")) if r.returncode == 0 else {}
            same = got.keys() == want.keys() and all(torch.equal(want[n], got[n]) for n in want)
            rows.append((script, point, state, str(latest), "yes" if same else f"NO (exit {r.returncode})"))
    lines = ["| trainer | killed (SIGKILL) | checkpoints after the kill | resumed from | final adapter = uninterrupted |",
             "|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows

# -----------------------------------------------------------------------------
# the ablation: every row trained by the project's own scripts on the same data, steps and seeds

ROWS = [  # (row, how it is trained): stage multi from the base, then IPPO from the third row's adapter
    ("L_diff (LoRA)", ["--experts", "0", "--lambda-attn", "0"]),
    ("+ L_attn", ["--experts", "0", "--lambda-attn", "0.3"]),
    ("+ MoE-LoRA", ["--experts", "4", "--lambda-attn", "0.3"]),
    ("+ IPPO", None),
]
ATTRS = ("shape", "colour", "pattern")

def leaked(want, got, pairs):
    """want: the references' sprites, got: the generated subjects' (toy classifier), pairs: Hungarian matches
    (ref i, subject j). A matched subject leaks if one of its attributes is not its own reference's but another
    reference's (a red disc drawn blue when the other reference is blue). -> number of leaking subjects."""
    other = lambda i, a: {getattr(w, a) for k, w in enumerate(want) if k != i}
    return sum(any(getattr(got[j], a) != getattr(want[i], a) and getattr(got[j], a) in other(i, a) for a in ATTRS)
               for i, j in pairs)

def reward_and_leakage(reward, images, prompts):
    """images[i] drawn for record i of a PromptDataset -> the mean of every reward term, and the leakage rate
    (leaking subjects / subjects matched to a reference)."""
    toy, sums, leaks, wrong, matched = reward.multi_id.embedder, {}, 0, 0, 0
    for i, image in enumerate(images):
        rec = prompts[i]
        for name, v in reward([image], rec["prompt"], rec["refs"]).items():
            sums[name] = sums.get(name, 0.0) + float(v[0])
        pairs = reward.multi_id([image], rec["refs"])["matches"][0]
        want, got = toy.classify(toy.references(rec["refs"])), toy.classify(toy.subjects(image))
        leaks += leaked(want, got, pairs)
        wrong += sum(got[j] != want[i] for i, j in pairs)
        matched += len(pairs)
    return dict(leak=leaks / max(matched, 1), wrong=wrong / max(matched, 1), matched=matched,
                **{n: v / len(images) for n, v in sums.items()})

def score_targets(tests):
    """The same metrics on the test targets themselves: what a perfect generator would score."""
    import data as D
    import rewards as R
    from sample import load_image
    out = {}
    for k, manifest in tests.items():
        prompts = D.PromptDataset(manifest)
        targets = [load_image(os.path.join(os.path.dirname(manifest), r["target"])) for r in prompts.records]
        out[k] = reward_and_leakage(R.toy_reward(), targets, prompts)
    return out

@torch.no_grad()
def score_adapter(base, adapter, tests, eval_steps, batch_size):
    """-> {k: metrics} per number of subjects k: attention share inside the own mask (teacher-forced on the test
    targets at t = 0.5, train_sft's held-out eval), and over one deterministic sample per test prompt: the toy
    Multi-ID (rewards.py's Hungarian path), the composite reward (Eq. 9) and attribute leakage."""
    from argparse import Namespace
    import data as D
    import model as M
    import moe_lora as ML
    import rewards as R
    import sample as S
    import train_sft as T
    cfg = M.get_config("toy")
    flux, text, ae = M.Flux(cfg), M.ByteTextEncoder(cfg), M.AutoEncoder(cfg.ae)
    M.load_state_dict_strict(flux, os.path.join(base, "flux.safetensors"))
    M.load_state_dict_strict(text, os.path.join(base, "text_encoder.safetensors"))
    ML.load_adapter(flux, adapter)
    reward, size = R.toy_reward(), S.DEFAULTS["toy"]["size"]
    timesteps = S.get_schedule(eval_steps, (size // (2 * cfg.ae.factor)) ** 2, shift=cfg.shift_schedule)
    out = {}
    for k, manifest in tests.items():
        ds = D.ManifestDataset(manifest)
        share = T.evaluate(Namespace(batch_size=batch_size, attn_blocks=None), T.Denoiser(flux.eval(), text), ae,
                           ds, "cpu", max_batches=len(ds))["val_share_own"]
        prompts, images = D.PromptDataset(manifest), []
        for i in range(len(prompts)):
            rec = prompts[i]
            c = S.prepare(cfg, ae, text, rec["prompt"], rec["refs"], size, size, seed=i)
            images += S.decode_images(ae, S.denoise(flux.eval(), **c, timesteps=timesteps, guidance=1.0,
                                                    progress=False), size, size)
        out[k] = dict(share=share, **reward_and_leakage(reward, images, prompts))
    return out

def ablation(args):
    import statistics as st, subprocess, sys
    import data as D
    here, t_start = os.path.dirname(os.path.abspath(__file__)), time.time()
    work = os.path.abspath(args.work)
    path = lambda *a: os.path.join(work, *a)
    # a work folder holds one experiment: its runs and scores are reused only under the settings that made them
    settings = dict(base=os.path.abspath(args.base), n=args.n, steps=args.steps, batch_size=args.batch_size,
                    ippo_iters=args.ippo_iters, test_n=args.test_n, eval_steps=args.eval_steps)
    if os.path.exists(path("settings.json")):
        made = json.load(open(path("settings.json")))
        if made != settings:
            raise SystemExit(f"error: {work} holds runs made with {made}, not {settings}: pass another --work")
    os.makedirs(work, exist_ok=True)
    with open(path("settings.json"), "w") as f:
        json.dump(settings, f)
    train = path("data", "train", "manifest.jsonl")
    if not os.path.exists(train):
        D.write_toy(path("data", "train"), args.n, seed=0, subjects=(2, 3, 4))
    tests = {}
    for k in (2, 3, 4):
        tests[k] = path("data", f"test{k}", "manifest.jsonl")
        if not os.path.exists(tests[k]):
            D.write_toy(path("data", f"test{k}"), args.test_n, seed=100 + k, subjects=(k,))

    spent = json.load(open(path("seconds.json"))) if os.path.exists(path("seconds.json")) else {}

    def timed_once(key, fn):
        # fn() once per key, its wall time added to seconds.json (also an interrupted attempt's): a rerun reuses
        # the result and the time
        t0 = time.time()
        try:
            fn()
        finally:
            spent[key] = spent.get(key, 0.0) + time.time() - t0
            with open(path("seconds.json.tmp"), "w") as f:
                json.dump(spent, f)
            os.replace(path("seconds.json.tmp"), path("seconds.json"))

    def run(script, out, final, seed, extra):
        # one training run of the project's own scripts, skipped when its final checkpoint exists
        if not os.path.isdir(os.path.join(out, f"ckpt-{final:07d}")):
            cmd = [sys.executable, os.path.join(here, script), "--init", args.base, "--data", train, "--out", out,
                   "--seed", str(seed), *extra, *(["--resume"] if os.path.isdir(os.path.join(out, "latest")) else [])]
            print("  " + " ".join(cmd[1:]), flush=True)
            timed_once(out, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
        return os.path.join(out, f"ckpt-{final:07d}", "adapter.safetensors")

    scores, used = {}, []                                 # (row, seed) -> {k: metrics}; the seconds.json keys
    for seed in args.seeds:
        for r, (row, how) in enumerate(ROWS):
            out, result = path("runs", f"seed{seed}", f"row{r}"), path("scores", f"seed{seed}_row{r}.json")
            used += [out, result]
            if how is not None:
                adapter = run("train_sft.py", out, args.steps, seed, ["--stage", "multi", *how, "--steps",
                              str(args.steps), "--batch-size", str(args.batch_size), "--ckpt-every", str(args.steps)])
            else:
                adapter = run("train_rl.py", out, args.ippo_iters, seed, [
                    "--adapter", path("runs", f"seed{seed}", "row2", f"ckpt-{args.steps:07d}", "adapter.safetensors"),
                    "--iters", str(args.ippo_iters), "--group", "16", "--prompts", "4", "--steps", "8",
                    "--tau", "1000", "--lr", "3e-4", "--ckpt-every", str(args.ippo_iters)])
            if not os.path.exists(result):
                def score():
                    got = score_adapter(args.base, adapter, tests, args.eval_steps, args.batch_size)
                    os.makedirs(path("scores"), exist_ok=True)
                    with open(result + ".tmp", "w") as f:
                        json.dump({str(k): v for k, v in got.items()}, f)
                    os.replace(result + ".tmp", result)
                timed_once(result, score)
                print(f"  seed {seed} {row}: trained and scored", flush=True)
            scores[row, seed] = {int(k): v for k, v in json.load(open(result)).items()}

    cell = lambda xs: f"{st.mean(xs):.3f} ± {st.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    def pool(per_k, m):
        # over the three test sets: rates per matched subject pool their counts (a 4-subject record has about twice
        # the subjects of a 2-subject one), the other metrics are means over records (the same number for each k)
        if m in ("leak", "wrong"):
            return sum(x[m] * x["matched"] for x in per_k) / max(sum(x["matched"] for x in per_k), 1)
        return st.mean(x[m] for x in per_k)
    pooled = lambda row, m: [pool([scores[row, s][k] for k in tests], m) for s in args.seeds]
    lines = [f"Toy world, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± std over seeds; "
             f"{args.n} training records (2-4 subjects), {args.steps} stage-multi steps at batch {args.batch_size}, "
             f"IPPO {args.ippo_iters} iterations; test: {args.test_n} records each of 2, 3 and 4 subjects (pooled), "
             f"one {args.eval_steps}-step sample per record.", "",
             "| row | attention share in own mask ↑ | Multi-ID (Hungarian) ↑ | attribute leakage ↓ | "
             "any attribute wrong | composite reward ↑ |", "|---|---|---|---|---|---|"]
    metrics = ("share", "id", "leak", "wrong", "total")
    lines += [f"| {row} | " + " | ".join(cell(pooled(row, m)) for m in metrics) + " |" for row, _ in ROWS]
    truth = score_targets(tests)
    lines += ["| *test targets (ground truth)* | - | " + " | ".join(f"{pool(list(truth.values()), m):.3f}"
                                                              for m in metrics[1:]) + " |"]
    lines += ["", "Per number of subjects (Multi-ID ↑ / leakage ↓, mean over seeds):", "",
              "| row | 2 subjects | 3 subjects | 4 subjects |", "|---|---|---|---|"]
    lines += [f"| {row} | " + " | ".join(f"{st.mean(scores[row, s][k]['id'] for s in args.seeds):.3f} / "
                                         f"{st.mean(scores[row, s][k]['leak'] for s in args.seeds):.3f}" for k in tests)
              + " |" for row, _ in ROWS]
    lines += ["| *test targets (ground truth)* | " + " | ".join(f"{truth[k]['id']:.3f} / {truth[k]['leak']:.3f}"
                                                           for k in tests) + " |"]
    lines += ["", f"CPU wall time of the runs and scores above: {sum(spent.get(k, 0.0) for k in used) / 60:.0f} min, as measured when "
              f"each ran (`seconds.json` in {work}); this invocation: {(time.time() - t_start) / 60:.1f} min."]
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(lines) + "\n")
    return scores

# -----------------------------------------------------------------------------
# badinput: bad images, weights, manifests and ranks through every entry point, and what each one does

def png_claiming(path, w, h):
    """An 8x8 PNG whose header claims w x h pixels: a few bytes that would decode to gigapixels (a decompression
    bomb). The header's checksum is fixed up, so only the size is a lie."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)                                   # IHDR: length, "IHDR", width, height ...
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))             # ... and the chunk's CRC
    open(path, "wb").write(bytes(b))

def cut_in_half(write):
    # a writer of the first half of what `write` writes
    def half(path, *a):
        write(path, *a)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    return half

def noise(path, fmt):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, fmt)

def animated(path, fmt):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(path, format=fmt, save_all=True, append_images=[blue], duration=100)

def exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6                                           # "rotate 90 degrees clockwise to view"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path, format="JPEG", exif=exif.tobytes())

def palette_with_transparency(path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)             # index 0 black (transparent), 1 green
    p.putpixel((0, 0), 0)
    p.save(path, transparency=0)

# fault -> (file name, writer(path)); no writer: the file does not exist
BAD_IMAGES = {
    "missing file": ("missing.png", None),
    "zero bytes": ("zero.png", lambda p: open(p, "wb").close()),
    "a folder": ("folder.png", os.mkdir),
    "not an image (text)": ("text.png", lambda p: open(p, "w").write("hello")),
    "truncated PNG": ("cut.png", cut_in_half(lambda p: noise(p, "PNG"))),
    "truncated JPEG": ("cut.jpg", cut_in_half(lambda p: noise(p, "JPEG"))),
    "JPEG named .png": ("jpeg.png", lambda p: Image.new("RGB", (8, 8), (255, 0, 0)).save(p, "JPEG")),
    "decompression bomb (30000x30000 header)": ("bomb.png", lambda p: png_claiming(p, 30000, 30000)),
    "10000x10000 (over MAX_PIXELS)": ("huge.png", lambda p: png_claiming(p, 10000, 10000)),
    "1x1": ("one.png", lambda p: Image.new("RGB", (1, 1), (255, 0, 0)).save(p)),
    "1x4000 strip": ("strip.png", lambda p: Image.new("RGB", (1, 4000), (255, 0, 0)).save(p)),
    "CMYK JPEG": ("cmyk.jpg", lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=100)),
    "16-bit grayscale": ("g16.png", lambda p: Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(p)),
    "palette + transparent index": ("pal.png", palette_with_transparency),
    "RGBA, fully transparent red": ("rgba.png", lambda p: Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(p)),
    "animated GIF (red, blue)": ("anim.gif", lambda p: animated(p, "GIF")),
    "animated WebP (red, blue)": ("anim.webp", lambda p: animated(p, "WEBP")),
    "EXIF-rotated JPEG (40x20, rotate 90)": ("rot.jpg", exif_rotated),
}

def write_bad_images(folder):
    """Every BAD_IMAGES file in folder (a good 32x32 target t.png too) -> {fault: file name}."""
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (32, 32), (0, 128, 255)).save(os.path.join(folder, "t.png"))
    for name, write in BAD_IMAGES.values():
        if write:
            write(os.path.join(folder, name))
    return {fault: name for fault, (name, _) in BAD_IMAGES.items()}

class Opens:
    """Pickled, this object's recipe is `open(path, "w")`: unpickling it would create the file. A stand-in for a
    pickle that runs code: the file's absence proves no loader unpickled it."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")

def save_st(sd, path, meta=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)

def first_float(sd):
    return next(k for k in sorted(sd) if sd[k].is_floating_point())

# fault -> writer(path, state dict, header metadata, another architecture's state dict); no writer: no file
BAD_WEIGHTS = {
    "missing file": None,
    "empty file": lambda p, sd, meta, other: open(p, "wb").close(),
    "text file": lambda p, sd, meta, other: open(p, "w").write("not weights"),
    "pickle (torch.save) instead": lambda p, sd, meta, other: torch.save(sd, p),
    "pickle that runs code": lambda p, sd, meta, other: torch.save({"x": Opens(p + ".ran")}, p),
    "malformed header": lambda p, sd, meta, other: open(p, "wb").write(struct.pack("<Q", 10 ** 9) + b"{"),
    "truncated": cut_in_half(lambda p, sd, meta, other: save_st(sd, p, meta)),
    "missing key": lambda p, sd, meta, other: save_st({k: v for k, v in sd.items() if k != min(sd)}, p, meta),
    "extra key": lambda p, sd, meta, other: save_st({**sd, "extra.weight": torch.zeros(2)}, p, meta),
    "wrong shape": lambda p, sd, meta, other: save_st(
        {**sd, first_float(sd): torch.zeros(sd[first_float(sd)].shape[0] + 1)}, p, meta),
    "another architecture": lambda p, sd, meta, other: save_st(other, p, meta),
    "float16 tensors": lambda p, sd, meta, other: save_st(
        {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, p, meta),
    "int64 where a float belongs": lambda p, sd, meta, other: save_st(
        {**sd, first_float(sd): sd[first_float(sd)].long()}, p, meta),
}

def attempt(fn, errors=()):
    """fn() as a user meets it -> (value or None, what it printed, status). status: 0, the SystemExit status,
    2 for an exception of `errors` (what the command lines print as one `error:` line), or "traceback" for any
    other exception: that would be a bug, and the table says so."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return fn(), out.getvalue(), 0
        except SystemExit as e:
            return None, out.getvalue(), e.code
        except errors as e:
            return None, out.getvalue() + f"error: {e}\n", 2
        except Exception as e:
            return None, out.getvalue() + f"TRACEBACK {type(e).__name__}: {e}\n", "traceback"

def said(text, *starts):
    # the first printed line that starts with one of `starts`
    return next((line for line in text.splitlines() if line.startswith(starts)), "")

def cell(text, strip, width=120):
    # one table cell: no work folder names, no pipes, not too long
    text = re.sub(r"w/\d+-\d+/", "", text.replace(strip, "")).replace("error: ", "").replace("|", "/")
    return text if len(text) <= width else text[:width - 3] + "..."

def sample_cell(argv, out):
    """sample.py with argv -> its exit status, the first error or note it printed, and any file it left behind."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    _, text, status = attempt(lambda: S.main(argv + ["--prompt", "x", "--steps", "1", "--seed", "0", "--out",
                                                     os.path.join(out, "x.png")]))
    line = said(text, "error:", "TRACEBACK", "note:")
    left = sorted(os.listdir(out))
    if status == 0:
        return f"sampled{'; ' + line if line else ''}"
    return f"exit {status}: {line}; " + (f"LEFT {left}" if left else "nothing written")

def check_cell(manifest, line):
    _, text, status = attempt(lambda: D.main(["check", manifest]))
    return said(text, f"{manifest}:{line}: ", "TRACEBACK").replace(f"{manifest}:{line}: ", "") or \
        f"good (exit {status})"

def dataset_cell(manifest, line):
    """ManifestDataset on a manifest whose other records are good -> what happens to record `line`."""
    ds, text, status = attempt(lambda: D.ManifestDataset(manifest, size=32, ref_size=16, token_px=4), D.DataError)
    if ds is None:
        return f"exit {status}: {said(text, 'error:', 'TRACEBACK')}"
    skipped = [f"{field}: {why}" for l, field, why in ds.skipped if l == line]
    if skipped:
        return "skipped at start (warning): " + skipped[0]
    i = next(i for i, r in enumerate(ds.records) if r["line"] == line)
    item, text, status = attempt(lambda: ds[i])
    if status:
        return said(text, "TRACEBACK")
    if ds.n_failed:
        return "replaced at load by another record (warning): " + said(text, "warning").split(": ", 2)[-1]
    _, text, _ = attempt(lambda: M.ByteTextEncoder(M.get_config("toy"))([item["prompt"]]))   # what training encodes
    return "used" + (f"; {said(text, 'warning')}" if text else "")

def image_rows(work):
    """One row per BAD_IMAGES fault: load_image, sample.py --refs, data.py check, training."""
    folder = os.path.join(work, "images")
    names = write_bad_images(folder)
    rows = []
    for k, (fault, name) in enumerate(names.items()):
        path, manifest = os.path.join(folder, name), os.path.join(folder, f"m{k}.jsonl")
        with open(manifest, "w") as f:          # the bad reference, then a good record
            for ref in (name, "t.png"):
                f.write(json.dumps(dict(target="t.png", prompt="a thing", refs=[ref])) + "\n")
        img, text, _ = attempt(lambda: S.load_image(path), S.InputError)
        loaded = f"{img.mode} {img.width}x{img.height}, pixel (0, 0) = {img.getpixel((0, 0))}" if img else \
            said(text, "error:", "TRACEBACK")
        rows.append([fault, loaded, sample_cell(["--refs", path], os.path.join(work, "out")),
                     check_cell(manifest, 1), dataset_cell(manifest, 1)])
    return [[cell(c, folder + os.sep) for c in r] for r in rows]

def another_optimizer_state(path):
    # a train_state.pt of a run with other trainable parameters (other adapters)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    opt.step()
    torch.save({"step": 1, "consumed": 2, "world": 1, "optimizer": opt.state_dict()}, path)

STATE_FAULTS = {   # what a train_state.pt (a weights_only pickle, not safetensors) can suffer of BAD_WEIGHTS's faults
    "missing file": None, "empty file": BAD_WEIGHTS["empty file"], "text file": BAD_WEIGHTS["text file"],
    "pickle that runs code": BAD_WEIGHTS["pickle that runs code"],
    "truncated": cut_in_half(lambda *_: None),                                   # the file as saved, cut
    "another architecture": lambda p, *_: another_optimizer_state(p)}

def toy_base(folder):
    """A random toy base (seed 0) in the folder format stage base writes -> (folder, Flux, ByteTextEncoder)."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    flux, text = M.Flux(M.get_config("toy")), M.ByteTextEncoder(M.get_config("toy"))
    save_st(flux.state_dict(), os.path.join(folder, "flux.safetensors"))
    save_st(text.state_dict(), os.path.join(folder, "text_encoder.safetensors"))
    return folder, flux, text

def broken_copy(folder, src, name, write, *tensors):
    """A copy of folder src (or an empty folder) whose file `name` is (over)written by write(path, *tensors) (None:
    removed) -> (folder, the file's path)."""
    if src:
        shutil.copytree(src, folder, symlinks=True)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    if write:
        write(path, *tensors)
    elif os.path.exists(path):
        os.remove(path)
    return folder, path

def weight_rows(work):
    """One row per BAD_WEIGHTS fault in each kind of weights file a user hands over -> (header, rows)."""
    from dataclasses import replace
    import moe_lora as ML
    import train_sft as TS
    cfg = M.get_config("toy")
    base, flux, text = toy_base(os.path.join(work, "base"))
    small = replace(cfg, hidden_size=64, axes_dim=(4, 6, 6))                     # another architecture
    ae_cfg = replace(cfg, ae=M.AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, factor=2))
    ae_other = replace(ae_cfg.ae, z_channels=8)
    adapted, other = M.Flux(cfg), M.Flux(small)
    acfg, _ = ML.inject(adapted, rank=4), ML.inject(other, rank=4)
    ML.save_adapter(adapted, os.path.join(work, "adapter.safetensors"), acfg)
    meta, adapter = ML.read_adapter(os.path.join(work, "adapter.safetensors"))
    # a run to resume: one step of stage multi on four toy records
    manifest = D.write_toy(os.path.join(work, "data"), 4, seed=0)
    train = lambda out, *more: attempt(lambda: TS.cli(["--data", manifest, "--init", base, "--stage", "multi",
                                                       "--rank", "4", "--batch-size", "2", "--out", out, *more]))
    run_dir = os.path.join(work, "run")
    train(run_dir, "--steps", "1")

    def sample(folder, *argv):
        return sample_cell(["--refs", "assets/red_solid_circle.png", *argv], folder + "-out")

    def resume(folder):
        code, text, status = train(folder, "--steps", "2", "--resume")     # code: what train_sft.cli returned
        line = said(text, "error:", "TRACEBACK", "note:")
        return ("resumed" if code == 0 else f"exit {code if status == 0 else status}") + (f"; {line}" if line else "")

    def load_ae(folder):
        ae, text, status = attempt(lambda: M.load_ae(ae_cfg, os.path.join(folder, "ae.safetensors")),
                                   M.CheckpointError)
        line = said(text, "error:", "TRACEBACK", "note:")
        return f"loaded{'; ' + line if line else ''}" if status == 0 else line

    # kind -> (file, where a good copy lives, how a user hands it over, its tensors, header, another architecture's)
    kinds = {
        "DiT (sample.py --model)": ("flux.safetensors", base, lambda d: sample(d, "--model", d, "--arch", "toy"),
                                    flux.state_dict(), None, M.Flux(small).state_dict()),
        "text encoder (sample.py --model)": ("text_encoder.safetensors", base,
                                             lambda d: sample(d, "--model", d, "--arch", "toy"), text.state_dict(),
                                             None, M.ByteTextEncoder(cfg, dim=32).state_dict()),
        "AE (model.load_ae)": ("ae.safetensors", None, load_ae, M.AutoEncoder(ae_cfg.ae).state_dict(), None,
                               M.AutoEncoder(ae_other).state_dict()),
        "adapter (sample.py --lora, train --adapter)": (
            "adapter.safetensors", None,
            lambda d: sample(d, "--model", base, "--arch", "toy", "--lora", os.path.join(d, "adapter.safetensors")),
            adapter, meta, ML.adapter_state_dict(other)),
        "resume: adapter.safetensors": ("ckpt-0000001/adapter.safetensors", run_dir, resume, adapter, meta,
                                        ML.adapter_state_dict(other)),
        "resume: train_state.pt": ("ckpt-0000001/train_state.pt", run_dir, resume, None, None, None),
    }
    rows = []
    for fault, write in BAD_WEIGHTS.items():
        row = [fault]
        for k, (name, src, use, *tensors) in enumerate(kinds.values()):
            how = STATE_FAULTS.get(fault, "-") if name.endswith(".pt") else write   # a weights_only pickle
            if how == "-":
                row.append(how)
                continue
            folder, path = broken_copy(os.path.join(work, "w", f"{len(rows)}-{k}"), src, name, how, *tensors)
            row.append(use(folder) + ("; RAN CODE FROM THE PICKLE" if os.path.exists(path + ".ran") else ""))
        rows.append([cell(c, work + os.sep) for c in row])
    return ["fault", *kinds], rows

def manifest_faults(root):
    """fault -> the manifest line (bytes) of a record with it, to follow a good record whose id is "a"."""
    good = dict(id="b", target="t.png", prompt="a thing", refs=["r.png"])
    line = lambda **kw: json.dumps(dict(good, **kw)).encode()
    return {
        "path with ..": line(refs=["../outside.png"]),
        "absolute path": line(refs=[os.path.join(root, "r.png")]),
        "symlink out of the root": line(refs=["link.png"]),
        "id given twice": line(id="a"),
        "id that is a path (../x)": line(id="../x"),
        "0 references": line(refs=[]),
        f"100 references (MAX_REFS = {S.MAX_REFS})": line(refs=["r.png"] * 100),
        "empty prompt": line(prompt=" "),
        "10,000-character prompt": line(prompt="a" * 10_000),
        "lone surrogate in the prompt": line(prompt="a \ud800 b"),
        "non-UTF-8 byte in the prompt": line(prompt="caf\xe9").replace(b"\\u00e9", b"\xe9"),
        "invalid JSON": line()[:-1],
    }

def write_bad_manifests(work):
    """work/manifests/m{k}.jsonl: a good record with id "a" (line 1), then one with a fault (line 2); the images
    they name, and work/outside.png linked from inside -> {fault: manifest path}."""
    root = os.path.join(work, "manifests")
    os.makedirs(root, exist_ok=True)
    Image.new("RGB", (32, 32), (0, 128, 255)).save(os.path.join(root, "t.png"))
    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(root, "r.png"))
    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(work, "outside.png"))
    os.symlink(os.path.join(work, "outside.png"), os.path.join(root, "link.png"))
    good = json.dumps(dict(id="a", target="t.png", prompt="a thing", refs=["r.png"])).encode()
    out = {}
    for k, (fault, bad) in enumerate(manifest_faults(root).items()):
        out[fault] = os.path.join(root, f"m{k}.jsonl")
        open(out[fault], "wb").write(good + b"\n" + bad + b"\n")
    return out

def manifest_rows(work):
    """One row per manifest fault: data.py check and training, on [a good record, the bad one]."""
    return [[cell(c, work + os.sep) for c in (fault, check_cell(m, 2), dataset_cell(m, 2))]
            for fault, m in write_bad_manifests(work).items()]

def worker_pids(proc):
    """{rank: pid} of the workers a torchrun process started (its children, RANK from their environment)."""
    env = lambda pid: dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
    kids = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    return {int(env(pid)["RANK"]): int(pid) for pid in kids}

def alive(pid):
    # running or stopped, not a zombie waiting for its parent
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

def wait_for(cond, timeout=300):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("waited too long")
        time.sleep(0.05)
    return time.time() - t0

def adapter_gap(a, b):
    # largest difference between two runs' final adapters
    from safetensors.torch import load_file
    x, y = (load_file(os.path.join(d, "latest", "adapter.safetensors")) for d in (a, b))
    return max((x[k] - y[k]).abs().max().item() for k in x)

def dist_rows(work):
    """Ranks that die or hang under torchrun (2 CPU ranks, gloo), and resuming with another number of ranks."""
    import signal
    import subprocess
    import sys
    base = toy_base(os.path.join(work, "base"))[0]
    manifest = D.write_toy(os.path.join(work, "dist-data"), 8, seed=0)
    here, env = os.path.dirname(os.path.abspath(__file__)), dict(os.environ, OMP_NUM_THREADS="1")
    common = [os.path.join(here, "train_sft.py"), "--data", manifest, "--init", base, "--stage", "multi", "--rank",
              "4", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--ckpt-every", "1", "--keep", "10"]
    torchrun = lambda out, *more: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common, "--out", out,
         *more], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    one = lambda out, *more: subprocess.run([sys.executable, *common, "--grad-accum", "2", "--out", out, *more],
                                            env=env, capture_output=True, text=True)
    ckpt = lambda out, k: lambda: os.path.isdir(os.path.join(out, f"ckpt-{k:07d}"))
    rows, ref = [], os.path.join(work, "one")
    one(ref, "--steps", "6")                            # the uninterrupted run: 1 rank, the same global batch

    # a rank killed: torchrun stops the others; the checkpoints left resume on 1 rank
    out = os.path.join(work, "killed")
    p = torchrun(out, "--steps", "6")
    wait_for(ckpt(out, 2))
    pids = worker_pids(p)
    os.kill(pids[1], signal.SIGKILL)
    took = wait_for(lambda: p.poll() is not None)
    left = [pid for pid in pids.values() if alive(pid)]
    rows.append(["rank 1 of 2 killed (SIGKILL) after checkpoint 2",
                 f"torchrun ended the job {took:.1f} s later (exit {p.returncode}); workers left: {len(left)}"])
    r = one(out, "--steps", "6", "--resume")
    rows.append(["... resumed on 1 rank (--grad-accum 2: the same global batch)",
                 f"exit {r.returncode}: {said(r.stderr, 'resumed')}; final adapter vs uninterrupted 1-rank run: "
                 f"max abs diff {adapter_gap(out, ref):.1e}"])

    # a 1-rank checkpoint resumed on 2 ranks
    out = os.path.join(work, "grown")
    shutil.copytree(ref, out, symlinks=True)
    for k in range(3, 7):
        shutil.rmtree(os.path.join(out, f"ckpt-{k:07d}"))
    os.remove(os.path.join(out, "latest"))
    os.symlink("ckpt-0000002", os.path.join(out, "latest"))
    p = torchrun(out, "--steps", "6", "--resume")
    _, err = p.communicate()
    rows.append(["1-rank checkpoint 2 resumed on 2 ranks",
                 f"exit {p.returncode}: {said(err, '[rank0]: resumed', 'resumed')}; final adapter vs uninterrupted "
                 f"1-rank run: max abs diff {adapter_gap(out, ref):.1e}"])

    # a rank hung (SIGSTOP): the others wait in a collective until --dist-timeout, then the job ends
    out = os.path.join(work, "hung")
    p = torchrun(out, "--steps", "100", "--dist-timeout", "5")
    wait_for(ckpt(out, 1))
    pids = worker_pids(p)
    os.kill(pids[1], signal.SIGSTOP)
    took = wait_for(lambda: not alive(pids[0]))
    _, err = p.communicate()
    rows.append(["rank 1 of 2 hung (SIGSTOP), --dist-timeout 5",
                 f"rank 0 stopped {took:.1f} s later ({said(err, '[rank0]: RuntimeError').split('] ', 2)[-1]}); "
                 f"torchrun then ended the job (exit {p.returncode}); workers left: "
                 f"{len([pid for pid in pids.values() if alive(pid)])}"])
    return [[cell(c, work + os.sep, 240) for c in r] for r in rows]

def markdown(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(r) + " |" for r in rows])

def badinput(args):
    """Every fault above through every entry point: one markdown table per family (printed; --table writes it)."""
    import tempfile
    work = args.work or tempfile.mkdtemp(prefix="badinput-")
    tables = [("Images", ["fault", "load_image", "sample.py --refs", "data.py check", "training (ManifestDataset)"],
               image_rows(work)),
              ("Weights", *weight_rows(work)),
              ("Manifests", ["fault", "data.py check", "training (ManifestDataset)"], manifest_rows(work))]
    if not args.no_dist:
        tables.append(("Ranks (torchrun, 2 CPU ranks)", ["fault", "observed"], dist_rows(work)))
    text = "\n\n".join(f"{title}:\n\n{markdown(header, rows)}" for title, header, rows in tables)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    return tables

if __name__ == "__main__":
    args = parser.parse_args()
    {"dit": dit, "sft": sft, "moe": moe, "memory": memory, "rl": rl, "faults": faults,
     "ablation": ablation, "badinput": badinput}[args.cmd](args)

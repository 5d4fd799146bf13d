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
    python bench.py guidance                     # prompt + empty prompt as one batched forward vs two (toy)
    python bench.py compile                      # --compile (torch.compile of the blocks) vs eager (toy)
    python bench.py gpu --json $OUT/gpu.json     # a GPU session's one call, est. 3-5 min on an H100
    python bench.py gpu --tiny                   # the same code on the CPU at tiny shapes (the suite runs it)

`gpu`: random weights at flux-dev's shapes in bf16, nothing downloaded: our DiT against diffusers' (forward and
forward+backward into the inputs, 512px with 1 and 4 references of 320px and 1024px with one; MFU against the bf16
matmul speed measured in the run), every attention kernel through model.attention (flash-attn where installed, else
SDPA's own: flash, memory-efficient, cuDNN, math; each against fp32 math), the peak memory of two paper-scale SFT
steps (rank 512, MoE-LoRA, gradient checkpointing) against `memory`'s estimate, and seconds per 1024px image at 28
steps resident, --offload and --fp8. One table, and the JSON. It needs torch, transformers, safetensors; diffusers
only for its rows (without it they say so). A GPU machine without diffusers takes its wheel carried along:
    python -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1     # here, once
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site \
        python3 bench.py gpu --json $OUT/gpu.json                                       # there
    python bench.py memory --preset klein-base-4b --size 1024     # FLUX.2: which options fit 24 / 48 / 80 GB
    python bench.py kv                           # FLUX.2 references' K/V kept (klein-9B-KV) vs recomputed: time

Performance only: the toy ablation is experiments/ablation.py, the fault and bad-input harnesses are in
reliability/ (each folder's README says how to run them).

`dit`: a mid-sized FLUX (hidden 512, 8 heads of 64, 4 double + 8 single blocks) on 1024 image tokens (32x32),
two 16x16 references with UNO ids and 128 text tokens, batch 1, fp32, guidance-embedded. diffusers' model gets
the same weights through diffusers' own BFL->diffusers converter (patched for hidden sizes other than 3072)
and sees the references as part of one image sequence with concatenated ids, its output sliced to the target
tokens: exactly what our model computes. Measured for each: forward (no_grad) and forward+backward time
(backward w.r.t. all parameters of loss = mean(out^2)), model FLOPs (torch's FlopCounterMode), model FLOP
utilization against this machine's fp32 matmul speed measured in the same run, and peak memory.
"""
import ctypes
import gc
import importlib.util
import inspect
import json
import os
import statistics
import time
import weakref
from contextlib import contextmanager

# the profiler peak_memory runs prints its stages ("STAGE: ... Completed Stage", "USDT: profiler_start") to stderr
# for every measurement; level 6 is above them all. Set before torch loads its profiler; KINETO_LOG_LEVEL overrides
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode   # torch internals, as in count_flops
from tqdm import tqdm

import data as D
import flux2 as F2
import losses as LS
import model as M
import moe_lora as ML
import toy
import training as TR

parser = D.Parser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__)
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
p = sub.add_parser("guidance", help="the prompt and the empty prompt as one batched forward vs two (shipped toy)")
p.add_argument("--batch", type=int, default=1, help="samples denoised together")
p.add_argument("--group", type=int, default=4, help="IPPO group size of the policy's forward+backward")
p.add_argument("--reps", type=int, default=6)
p.add_argument("--seed", type=int, default=0)
p = sub.add_parser("compile", help="--compile (torch.compile of the DiT blocks) vs eager (shipped toy)")
p.add_argument("--batch", type=int, default=16, help="training batch")
p.add_argument("--reps", type=int, default=6)
p.add_argument("--seed", type=int, default=0)
p = sub.add_parser("gpu", help="the GPU checks in one run: DiT vs diffusers in bf16, attention kernels, paper-scale "
                   "SFT memory against its estimate, seconds per image resident / --fp8 / --offload")
p.add_argument("--tiny", action="store_true", help="the same code on the CPU at tiny shapes (the test suite runs it)")
p.add_argument("--json", default=os.path.join("out", "bench_gpu.json"), help="where the results go")
p.add_argument("--seed", type=int, default=0)
p = sub.add_parser("kv", help="FLUX.2 sampling with the references' K/V kept (klein-9B-KV) vs recomputed each step")
p.add_argument("--hidden", type=int, default=256, help="DiT width (heads of 64)")
p.add_argument("--grid", type=int, default=16, help="target token grid side")
p.add_argument("--ref-grid", type=int, default=16, help="reference token grid side")
p.add_argument("--steps", type=int, default=4, help="sampling steps (klein's distilled models: 4)")
p.add_argument("--reps", type=int, default=5)
p.add_argument("--seed", type=int, default=0)
p = sub.add_parser("rl", help="one IPPO iteration: DiT evaluations and peak memory at T = 8 vs T = 16")
p.add_argument("--group", type=int, default=4, help="samples per prompt G")
p.add_argument("--window", type=int, default=2, help="SDE window w")
p.add_argument("--hidden", type=int, default=256, help="DiT width (heads of 64)")
p.add_argument("--grid", type=int, default=16, help="target token grid side")
p.add_argument("--seed", type=int, default=0)

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
    for r in tqdm(range(reps), desc="timing", leave=False):       # a progress bar on stderr, gone when done
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
    # torch internals, which move between releases: imported where used, so a rename breaks one measurement only
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
    from torch._C._profiler import _EventType          # torch internals, as in count_flops
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
    one read from the checkpoint (img_in.weight's rows). It pops what it converts from its input."""
    import diffusers.loaders.single_file_utils as sfu     # diffusers: an optional dependency, only `dit` needs it
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        raise RuntimeError("diffusers' Flux converter changed; bench.py's patch needs updating")
    src = src.replace("inner_dim = 3072", 'inner_dim = checkpoint["img_in.weight"].shape[0]')
    namespace = dict(vars(sfu))
    exec(src, namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]

def dit(args):
    M = import_path(args.ours or os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py"))
    from diffusers import FluxTransformer2DModel          # optional, as above
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
    print(f"SFT step: hidden 512, 4+8 blocks, 1024 image + 2x256 reference + 128 text tokens, LoRA/MoE-LoRA rank "
          f"{args.rank}, fp32, {torch.get_num_threads()} threads", flush=True)
    for f in tqdm(variants.values(), desc="warm-up", leave=False):
        f()
    times, _ = interleaved_times([variants["off"], variants["ours"]], args.reps)
    mem = {k: peak_memory(f)["tensors"] for k, f in tqdm(variants.items(), desc="peak memory", leave=False)}
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
    """Stands in for attention on the meta device with what flash attention keeps for backward: q, k, v (B, H, L, D),
    the output and an fp32 log-sum-exp per query (B, H, L). (Meta SDPA would take the math path and keep L x L
    scores.)"""
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

def flash_like_attention(q, k, v, mask=None):
    # model.attention's contract, (B, L, H, D) -> (B, L, H*D), through FlashLike on (B, H, L, D) views as SDPA gets
    # (no mask: only the oracle of experiments/ sets one)
    assert mask is None, "flash_like_attention takes no mask"
    return FlashLike.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).flatten(2)

def saved_bytes(model, fn):
    """Bytes autograd keeps for backward while fn runs (parameters excluded, each storage counted once)."""
    params = {id(p) for p in model.parameters()}
    # the counted tensors are held until the end: a tensor freed during fn (a few are) would hand its id() to a
    # new one, which would then go uncounted, and the total would change from run to run
    seen, total = {}, [0]
    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in seen and id(base) not in params:
            seen[id(base)] = base
            total[0] += base.numel() * base.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]

class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors alive at once while it is active, counting every tensor an op creates (each storage
    once) until the last tensor on it is freed; what existed before (the weights) is not counted. Works on the meta
    device, where tensors have shapes and no data: inference peaks of flux-dev on a CPU machine. (On CPU it equals
    peak_memory's profiler count.)"""
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}                                  # storage -> tensors alive on it

    def _drop(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        ids, storages = {id(t) for t in given}, {t.untyped_storage()._cdata for t in given}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in ids:          # an in-place op returns its input
                continue
            s = t.untyped_storage()
            key, nbytes = s._cdata, s.nbytes()
            if key not in self.refs:
                if key in storages:              # a view of a tensor from before (a weight's transpose): not new
                    continue
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._drop, key, nbytes)
        return out

def live_peak(fn):
    with torch.no_grad(), LiveBytes() as m:
        fn()
    return m.peak

def meta_sdpa(q, k, v, *args, **kwargs):
    # the AE's attention as a fused kernel computes it: the output, no (L, L) scores (meta SDPA would keep them)
    return torch.empty_like(q)

def training_budget(cfg, rank, experts, size, ref_size, refs, batch, dtype=torch.bfloat16, foreach=True):
    """What one GPU holds to train adapters on a frozen DiT (batch per GPU, size px targets, refs of ref_size px,
    cfg.max_txt_len text tokens), in bytes, counted from the real module shapes on the meta device: every piece alone
    (budget_columns sums them per parallel layout). dtype: the frozen weights' and activations' (bf16 autocast on
    GPU); adapters, their gradients and AdamW's states are fp32. foreach: AdamW's multi-tensor step (torch's default on
    CUDA) computes sqrt of all second moments into one temporary; the CPU's per-parameter loop only of the largest."""
    with torch.device("meta"):
        flux = M.Flux(cfg)
        ML.inject(flux, rank=rank, n_experts=experts)
    trainable = [p for p in flux.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in flux.parameters() if not p.requires_grad)
    adapter = sum(p.numel() for p in trainable)
    def unit(m):        # (frozen, adapter) bytes of one FSDP unit as it trains
        return sum(p.numel() * (4 if p.requires_grad else dtype.itemsize) for p in m.parameters())
    blocks = (*flux.double_blocks, *flux.single_blocks)
    largest = max(blocks, key=unit)
    # activations: under autocast every matmul output is in dtype, so run the meta model in dtype
    flux.to(dtype)
    G, R, Lt, B = size // cfg.token_px, ref_size // cfg.token_px, cfg.max_txt_len, batch
    meta = dict(device="meta", dtype=dtype)
    def forward():
        flux(torch.randn(B, G * G, cfg.in_channels, **meta), M.grid_ids(G, G, batch=B, device="meta"),
             torch.randn(B, Lt, cfg.context_in_dim, **meta), torch.zeros(B, Lt, 3, device="meta"),
             torch.rand(B, **meta), torch.randn(B, cfg.vec_in_dim, **meta), torch.ones(B, **meta),
             [torch.randn(B, R * R, cfg.in_channels, **meta) for _ in range(refs)],
             M.ref_ids((G, G), [(R, R)] * refs, batch=B, device="meta"), probe=M.AttentionProbe())
    attention = M.attention           # the blocks look the hook up at call time: swapping it reaches all of them
    M.attention = flash_like_attention
    try:
        act = saved_bytes(flux, forward)
        flux.grad_checkpoint = True
        act_ckpt = saved_bytes(flux, forward)
        # backward then recomputes one block at a time: add the largest block's own activations
        L = G * G + refs * R * R + Lt
        x = torch.randn(B, L, cfg.hidden_size, **meta, requires_grad=True)
        pe = M.rope(torch.zeros(B, L, 3, device="meta"), cfg.axes_dim, cfg.theta)
        act_ckpt += saved_bytes(flux, lambda: flux.single_blocks[0](x, torch.randn(B, cfg.hidden_size, **meta), pe))
    finally:
        M.attention = attention
    return dict(frozen=frozen * dtype.itemsize, adapters=adapter * 4, grads=adapter * 4, adam=adapter * 8,
                adam_temp=(adapter if foreach else max(p.numel() for p in trainable)) * 4, act=act, act_ckpt=act_ckpt,
                block=unit(largest), block_grads=sum(p.numel() for p in largest.parameters() if p.requires_grad) * 4,
                root=unit(flux) - sum(map(unit, blocks)), frozen_params=frozen, adapter_params=adapter)

def budget_columns(b, gpus=8):
    """training_budget's pieces -> {layout: {row: bytes per GPU}} for one GPU and `gpus` of them: DDP (replicated),
    + ZeRO-1 (--zero: AdamW states sharded), FSDP (--fsdp: weights, gradients and states sharded; each rank gathers
    the unit that computes: the root's, and two blocks at once, the next one prefetched, with one block's gradients
    before they are reduce-scattered). The activations and the optimizer's temporary are never alive together."""
    out = {}
    for name, shard, states in (("1 GPU", 1, 1), (f"{gpus} GPUs", 1, 1), (f"{gpus} + ZeRO", 1, gpus),
                                (f"{gpus} + FSDP", gpus, gpus)):
        gathered = b["root"] + 2 * b["block"] + b["block_grads"] if shard > 1 else 0
        rows = {"frozen DiT": b["frozen"] / shard, "adapters (fp32)": b["adapters"] / shard,
                "adapter gradients (fp32)": b["grads"] / shard, "AdamW states (fp32 x 2)": b["adam"] / states,
                "AdamW step temporary (fp32)": b["adam_temp"] / states, "FSDP units gathered": gathered,
                "activations": b["act"], "activations, --grad-checkpoint": b["act_ckpt"]}
        base = sum(rows[k] for k in list(rows)[:4])
        rows["total"] = base + max(b["act"] + gathered, rows["AdamW step temporary (fp32)"])
        rows["total, --grad-checkpoint"] = base + max(b["act_ckpt"] + gathered, rows["AdamW step temporary (fp32)"])
        out[name] = rows
    return out

def memory(args):
    if args.preset in F2.CONFIGS:
        return flux2_memory(args)
    cfg = M.get_config(args.preset)
    b = training_budget(cfg, args.rank, args.experts, args.size, args.ref_size, args.refs, args.batch)
    cols = budget_columns(b)
    GiB = 2 ** 30
    print(f"{args.preset}: {b['frozen_params'] / 1e9:.2f}B frozen + {b['adapter_params'] / 1e9:.3f}B adapter "
          f"parameters (LoRA rank {args.rank}, MoE-LoRA {args.experts} experts); batch {args.batch} per GPU: "
          f"{args.size}px target, {args.refs} refs of {args.ref_size}px, {cfg.max_txt_len} text tokens; activations "
          f"as bf16 autocast with flash attention keeps them; T5/CLIP/VAE not resident (python cache.py)")
    print(f"{'GiB per GPU':42s}" + "".join(f"{c:>10s}" for c in cols))
    for row in next(iter(cols.values())):
        print(f"  {row:40s}" + "".join(f"{cols[c][row] / GiB:10.1f}" for c in cols))
    return {"budget": b, "columns_GiB": {c: {k: v / GiB for k, v in r.items()} for c, r in cols.items()},
            "inference_GiB": inference_memory(args)}

# inference: peak GPU memory when sampling, for each of model.py's low-VRAM options, from shapes on the meta device

# google/t5-v1_1-xxl's encoder and openai/clip-vit-large-patch14's text model, from their config.json files
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)

def nbytes(module):
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

def inference_memory(args):
    """Peak GPU memory of one sample (batch 1): the weights on the GPU in each phase (text encoding, reference encoding,
    the denoising loop, decoding) plus that phase's peak of live tensors (LiveBytes, attention as fused kernels keep
    it), the largest phase being the peak. Options: everything resident; the text encoders and the AE on the GPU only
    while they run, the DiT too (M.resident: text encoding, references, denoising, decoding in turn); the DiT in fp8 (M.store_fp8); its blocks streamed one at a time (M.stream_blocks);
    both; both with T5/CLIP run on the CPU."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    cfg, bf, GiB = M.get_config(args.preset), torch.bfloat16, 2 ** 30
    with torch.device("meta"):
        flux = M.Flux(cfg).to(bf).eval()
        flux8 = M.store_fp8(M.Flux(cfg).to(bf).eval())
        ae = M.AutoEncoder(cfg.ae).to(bf).eval()
        t5 = T5EncoderModel(T5Config(**T5_XXL)).to(bf).eval()
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(bf).eval()
    def streamed(f):      # what stays on the GPU when the blocks stream: everything but the blocks, plus the largest
        blocks = [nbytes(b) for b in (*f.double_blocks, *f.single_blocks)]
        return nbytes(f) - sum(blocks) + max(blocks)
    meta = dict(device="meta", dtype=bf)
    ids = lambda n: torch.zeros(1, n, dtype=torch.long, device="meta")
    text_act = live_peak(lambda: (t5(input_ids=ids(cfg.max_txt_len)), clip(input_ids=ids(77))))
    sdpa, attention = torch.nn.functional.scaled_dot_product_attention, M.attention
    torch.nn.functional.scaled_dot_product_attention, M.attention = meta_sdpa, flash_like_attention
    try:
        ae_act = {s: live_peak(lambda: ae.decode(torch.randn(1, cfg.ae.z_channels, s // 8, s // 8, **meta)))
                  for s in (512, 1024)}
        ae_act["ref"] = live_peak(lambda: ae.encode(torch.randn(1, 3, args.ref_size, args.ref_size, **meta)))
        Lt, R = cfg.max_txt_len, args.ref_size // 16
        def dit_act(f, size, n):
            G = size // 16
            return live_peak(lambda: f(torch.randn(1, G * G, cfg.in_channels, **meta), M.grid_ids(G, G, device="meta"),
                                       torch.randn(1, Lt, cfg.context_in_dim, **meta), torch.zeros(1, Lt, 3, device="meta"),
                                       torch.rand(1, **meta), torch.randn(1, cfg.vec_in_dim, **meta), torch.ones(1, **meta),
                                       [torch.randn(1, R * R, cfg.in_channels, **meta) for _ in range(n)],
                                       M.ref_ids((G, G), [(R, R)] * n, device="meta")))
        cols = [(s, n) for s in (512, 1024) for n in (1, 2, 3, 4)]
        act = {(k, c): dit_act(f, *c) for k, f in (("bf16", flux), ("fp8", flux8)) for c in cols}
    finally:
        torch.nn.functional.scaled_dot_product_attention, M.attention = sdpa, attention
    text, aeb = nbytes(t5) + nbytes(clip), nbytes(ae)
    def phases(dit, kind, c, text_on_gpu=True):
        # each model on the GPU only while it runs (M.resident): text encoding, then the references through the AE, then
        # the denoising loop, then decoding; the peak is the largest phase's weights + live tensors
        return max(text + text_act if text_on_gpu else 0, aeb + max(ae_act["ref"], ae_act[c[0]]), dit + act[(kind, c)])
    options = {
        "everything resident (bf16)": lambda c: nbytes(flux) + text + aeb + max(text_act, ae_act["ref"], ae_act[c[0]],
                                                                                 act[("bf16", c)]),
        "each model on the GPU only while used": lambda c: phases(nbytes(flux), "bf16", c),
        "  + DiT in fp8": lambda c: phases(nbytes(flux8), "fp8", c),
        "  + DiT blocks streamed": lambda c: phases(streamed(flux), "bf16", c),
        "  + blocks streamed, fp8": lambda c: phases(streamed(flux8), "fp8", c),
        "  + streamed, fp8, T5/CLIP on CPU": lambda c: phases(streamed(flux8), "fp8", c, text_on_gpu=False),
    }
    print(f"\ninference, {args.preset}, batch 1, {args.ref_size}px references, {cfg.max_txt_len} text tokens: peak GPU "
          f"memory (GiB) = the largest phase's weights + live tensors (meta device; attention as fused kernels)")
    print(f"  weights: DiT {nbytes(flux) / GiB:.1f} bf16 / {nbytes(flux8) / GiB:.1f} fp8 (streamed: "
          f"{streamed(flux) / GiB:.2f} / {streamed(flux8) / GiB:.2f} resident), T5-XXL + CLIP-L {text / GiB:.1f}, "
          f"AE {aeb / GiB:.2f}")
    print(f"  {'option':38s}" + "".join(f"{f'{s}px {n} ref':>13s}" for s, n in cols))
    table = {}
    for name, peak in options.items():
        table[name.strip(" +")] = {f"{s}px_{n}ref": peak((s, n)) / GiB for s, n in cols}
        print(f"  {name:38s}" + "".join(f"{peak(c) / GiB:13.2f}" for c in cols))
    return table

# -----------------------------------------------------------------------------
# rl: one IPPO iteration (train_rl.py's rollout and GSPO update) at two trajectory lengths

def rl(args):
    """DiT rows (samples through the DiT) counted by a forward hook, split into rollout and update, and the peak
    tensor memory of a whole iteration (rollout + reward-free GSPO update + backward) at T = 8 and T = 16. The
    update holds the graphs of the w window steps only, so the peak should not grow with T."""
    torch.manual_seed(args.seed)
    cfg = M.get_config("toy", hidden_size=args.hidden, num_heads=args.hidden // 64, axes_dim=(16, 24, 24))
    flux = M.Flux(cfg)
    ML.inject(flux, rank=16)
    for _, m in ML.adapters(flux):
        torch.nn.init.normal_(m.up.weight, std=0.01)
    ae, text, px = M.AutoEncoder(cfg.ae), M.ByteTextEncoder(cfg), cfg.token_px
    views = [toy.view(toy.draw_identity("train", i), np.random.default_rng(i), args.grid * px // 2)
             for i in (5, 100)]
    refs = [Image.fromarray(v[0]) for v in views]                  # two references of the toy world
    c = M.sampling_inputs(cfg, ae, text, "two sprites", refs, args.grid * px, args.grid * px, seed=args.seed)
    G, w, rows = args.group, args.window, []
    flux.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    adv = torch.linspace(-1, 1, G)

    def iteration(T, l):
        ts, window = M.get_schedule(T, args.grid ** 2), range(l, l + w)
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
# guidance, compile: two speed-ups measured side by side on the shipped toy (CPU, fp32)

def shipped_toy():
    """The shipped toy as sample.py loads it (assets/toy: base, text encoder, adapter) and the demo's references."""
    cfg = M.get_config("toy")
    flux, text = M.Flux(cfg), M.ByteTextEncoder(cfg)
    M.load_state_dict_strict(flux, os.path.join(M.TOY_DIR, "flux.safetensors"))
    M.load_byte_encoder(text, os.path.join(M.TOY_DIR, "text_encoder.safetensors"))
    ML.load_adapter(flux, os.path.join(M.TOY_DIR, "adapter.safetensors"))
    assets = os.path.dirname(M.TOY_DIR)
    refs = [D.preprocess_ref(D.load_image(os.path.join(assets, f)), cfg.ref_size)
            for f in ("orange_circle.png", "blue_square.png")]
    return cfg, flux.eval(), M.AutoEncoder(cfg.ae), text.eval(), refs

def guidance(args):
    """Sampling with the toy's guidance (4 on the references, 2 on the prompt: three DiT evaluations a step), the
    prompt and the empty prompt as one forward of 2B rows (model.BATCH_GUIDANCE) against two forwards; and IPPO's
    policy (training.velocity, forward + backward of a group), likewise. Timed interleaved; the outputs compared."""
    torch.manual_seed(args.seed)
    cfg, flux, ae, text, refs = shipped_toy()
    c = M.sampling_inputs(cfg, ae, text, "a circle and a square", refs, cfg.image_size, cfg.image_size,
                          list(range(args.batch)), null_text=True)
    ts = M.get_schedule(cfg.sample_steps, c["img"].shape[1])
    c1 = {k: v[:1] if torch.is_tensor(v) else [r[:1] for r in v] for k, v in c.items()}      # IPPO's batch-1 condition
    c1["scales"] = (cfg.ref_guidance, cfg.text_guidance)
    x = torch.randn(args.group, *c["img"].shape[1:])
    def with_batching(on, fn):
        def run():
            M.BATCH_GUIDANCE = on
            try:
                return fn()
            finally:
                M.BATCH_GUIDANCE = True
        return run
    sample = lambda: M.denoise(flux, **c, timesteps=ts, guidance=cfg.guidance, progress=False,
                               ref_guidance=cfg.ref_guidance, text_guidance=cfg.text_guidance)
    def policy():
        flux.zero_grad(set_to_none=True)
        v = TR.velocity(flux, x, c1, 0.6, cfg.guidance)
        v.square().mean().backward()
        return v.detach()
    res = {}
    for name, fn in (("sampling", sample), ("policy", policy)):
        fns = [with_batching(True, fn), with_batching(False, fn)]
        outs = [f() for f in fns]                                    # warm-up, and the outputs compared
        times, _ = interleaved_times(fns, args.reps)
        res[name] = {"batched_s": median(times[0]), "two_forwards_s": median(times[1]),
                     "ratio": median(times[0]) / median(times[1]),
                     "max_abs_diff": (outs[0] - outs[1]).abs().max().item()}
    print(f"batched guidance on the shipped toy, fp32, {torch.get_num_threads()} threads; {args.reps} interleaved runs")
    print(f"  sampling, batch {args.batch}, {cfg.sample_steps} steps: batched {res['sampling']['batched_s']:.3f} s, "
          f"two forwards {res['sampling']['two_forwards_s']:.3f} s, ratio {res['sampling']['ratio']:.3f}; latents "
          f"max |diff| {res['sampling']['max_abs_diff']:.1e}")
    print(f"  IPPO policy forward+backward, group {args.group}: batched {res['policy']['batched_s'] * 1e3:.1f} ms, "
          f"two forwards {res['policy']['two_forwards_s'] * 1e3:.1f} ms, ratio {res['policy']['ratio']:.3f}; "
          f"velocity max |diff| {res['policy']['max_abs_diff']:.1e}")
    return res

def compile_bench(args):
    """--compile (model.compile_blocks, inductor) against eager on the shipped toy: a training step (train_sft's
    stage multi shape: forward with the probe and Dice, backward into the adapters, batch args.batch) and one
    sample (the toy's guided 20 steps). The first compiled call, which compiles, is timed apart; then both are timed
    interleaved, and their losses and samples compared."""
    import copy
    torch.manual_seed(args.seed)
    cfg, flux, ae, text, refs = shipped_toy()
    compiled = M.compile_blocks(copy.deepcopy(flux))
    B, G, R = args.batch, cfg.image_size // cfg.token_px, cfg.ref_size // cfg.token_px
    z = cfg.ae.z_channels
    with torch.no_grad():
        txt, y = text(["a circle and a square"] * B)
    inp = M.prepare(torch.randn(B, z, 2 * G, 2 * G), [torch.randn(B, z, 2 * R, 2 * R) for _ in range(2)], "d", txt, y)
    t, noise, masks = torch.rand(B), torch.randn_like(inp["img"]), (torch.rand(B, 2, G * G) > 0.7).float()
    def train_step(f):
        def run():
            f.zero_grad(set_to_none=True)
            probe = M.AttentionProbe()
            loss = LS.flow_matching_loss(lambda x_t, tt: f(**dict(inp, img=x_t), timesteps=tt, guidance=torch.ones(B),
                                                           probe=probe), inp["img"], t, noise)
            loss = loss + 0.3 * LS.dice_loss(probe.mean_map(), masks)
            loss.backward()
            return loss.detach()
        return run
    c = M.sampling_inputs(cfg, ae, text, "a circle and a square", refs, cfg.image_size, cfg.image_size, 0,
                          null_text=True)
    ts = M.get_schedule(cfg.sample_steps, c["img"].shape[1])
    sample = lambda f: lambda: M.denoise(f, **c, timesteps=ts, guidance=cfg.guidance, progress=False,
                                         ref_guidance=cfg.ref_guidance, text_guidance=cfg.text_guidance)
    res = {"backend": M.COMPILE_BACKEND}
    for name, make in (("train_step", train_step), ("sampling", sample)):
        eager, comp = make(flux), make(compiled)
        first = timed(comp)                                            # compiles (forward, and backward if any)
        outs = [eager(), comp()]
        times, _ = interleaved_times([eager, comp], args.reps)
        res[name] = {"compile_s": first, "eager_s": median(times[0]), "compiled_s": median(times[1]),
                     "ratio": median(times[1]) / median(times[0]),
                     "max_abs_diff": (outs[0] - outs[1]).abs().max().item()}
    print(f"--compile ({M.COMPILE_BACKEND}) against eager on the shipped toy, fp32, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved runs")
    for name, label in (("train_step", f"SFT step, batch {B}, probe + Dice"),
                        ("sampling", "one sample, 20 guided steps")):
        r = res[name]
        print(f"  {label}: eager {r['eager_s'] * 1e3:.0f} ms, compiled {r['compiled_s'] * 1e3:.0f} ms, ratio "
              f"{r['ratio']:.3f} (first call compiling: {r['compile_s']:.0f} s); max |diff| {r['max_abs_diff']:.1e}")
    return res

# -----------------------------------------------------------------------------
# gpu: the checks a GPU session runs in one call (an estimated 3-5 minutes on one H100, most of it sampling): random
# weights at flux-dev's shapes, nothing downloaded. --tiny runs the same code on the CPU at tiny shapes (as the suite
# does)

GPU_SHAPES = dict(small=512, large=1024, ref=320, refs=(1, 4), steps=28, rank=512, reps=5, train_reps=3,
                  matmul=8192)
TINY_SHAPES = dict(small=64, large=128, ref=32, refs=(1, 4), steps=2, rank=8, reps=1, train_reps=1, matmul=256)

def tiny_config():
    # flux-dev's roles at a width a CPU runs in milliseconds (its text, pooled and latent widths kept)
    return M.get_config("flux-dev", hidden_size=128, num_heads=2, axes_dim=(16, 24, 24), depth=1,
                        depth_single_blocks=2, max_txt_len=16, ae=M.AutoEncoderConfig(ch=32))

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def device_times(fn, reps, device, warmup=None):
    """Seconds of each of `reps` calls of fn after one warm-up call (warmup, or fn itself), the device synchronized
    around each (GPU kernels run asynchronously)."""
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
    # bytes alive now: the CUDA allocator's count; on the CPU torch keeps none, so the given modules' tensors
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else sum(map(nbytes, modules))

def peak_above(fn, device):
    """Peak bytes one call of fn allocates above what was alive before it: the CUDA allocator's high-water mark, or
    on the CPU the profiler's count (peak_memory)."""
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
    """The device's measured matmul FLOP/s in dtype: the best of `reps` square n x n products (2 n^3 FLOPs each)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / min(device_times(lambda: a @ b, reps, device))

def random_flux(cfg, device, dtype, seed):
    """Our DiT at cfg's shapes with random weights, made in place on device in dtype (flux-dev: 24 GB of bf16, never an
    fp32 copy): weights N(0, 0.02), biases N(0, 0.1), RMSNorm scales around 1."""
    with torch.device("meta"):
        flux = M.Flux(cfg).to(dtype)
    flux = flux.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in flux.named_parameters():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.1, generator=g)
            if name.endswith(".scale"):
                p.add_(1)
    return flux.eval()

def joint_inputs(cfg, size, ref_size, n_refs, device, dtype, seed):
    """One sample's joint sequence (model.prepare), random: a size px target, n_refs references of ref_size px,
    cfg.max_txt_len text tokens; t and distilled guidance. Values in dtype, position ids in fp32."""
    g = torch.Generator().manual_seed(seed)
    z, f = cfg.ae.z_channels, cfg.ae.factor
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    inp = M.prepare(rnd(1, z, size // f, size // f), [rnd(1, z, ref_size // f, ref_size // f) for _ in range(n_refs)],
                    "d", rnd(1, cfg.max_txt_len, cfg.context_in_dim), rnd(1, cfg.vec_in_dim))
    inp.update(timesteps=torch.rand(1, generator=g), guidance=torch.full((1,), cfg.guidance))
    cast = lambda k, v: v.to(device, torch.float32 if k.endswith("ids") else dtype)
    return {k: [cast(k, r) for r in v] if isinstance(v, list) else cast(k, v) for k, v in inp.items()}

def diffusers_flux(cfg, state):
    """diffusers' FluxTransformer2DModel holding our state dict (diffusers' own converter), made on the meta device
    and given the converted tensors themselves (assign): no second copy of the weights."""
    from diffusers import FluxTransformer2DModel          # optional, as in `dit`
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
            num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.hidden_size // cfg.num_heads,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim)
    theirs.load_state_dict(bfl_to_diffusers_converter()(state), strict=True, assign=True)
    assert not state, f"keys diffusers did not consume: {list(state)[:4]}"
    return theirs.eval().requires_grad_(False)

def through_diffusers(theirs):
    # UNO's sequence through diffusers: the references appended to the image tokens, the output sliced to the target
    def call(i):
        L = i["img"].shape[1]
        return theirs(hidden_states=torch.cat([i["img"], *i["ref_img"]], 1), encoder_hidden_states=i["txt"],
                      pooled_projections=i["y"], timestep=i["timesteps"], guidance=i["guidance"],
                      img_ids=torch.cat([i["img_ids"], *i["ref_img_ids"]], 1)[0], txt_ids=i["txt_ids"][0],
                      return_dict=False)[0][:, :L]
    return call

def time_dit(call, inp, S, device):
    """Forward (no grad) and forward+backward of one model on one input: the backward reaches the inputs only (frozen
    weights: what adapter training's backward through the base costs). -> measurements, output and input gradients."""
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
    r = {"fwd_s": device_times(fwd, S["reps"], device), "train_s": device_times(train, S["train_reps"], device),
         "fwd_flops": count_flops(fwd), "train_flops": count_flops(train)}
    r["train_peak_bytes"] = peak_above(train, device)
    return r, fwd().float(), [x.grad.float() for x in leaves]

def dit_section(cfg, S, device, seed):
    """Ours against diffusers in bf16 on each case, the models one after the other (both at once would hold the
    weights twice: 48 GB for flux-dev): ours, then its state dict converted for diffusers, then diffusers."""
    cases = [(f"{S['small']}px + {n} ref", S["small"], n) for n in S["refs"]] + \
        [(f"{S['large']}px + 1 ref", S["large"], 1)]
    inputs = {name: joint_inputs(cfg, size, S["ref"], n, device, torch.bfloat16, seed) for name, size, n in cases}
    flux = random_flux(cfg, device, torch.bfloat16, seed).requires_grad_(False)
    ours = {name: time_dit(lambda i: flux(**i), inp, S, device) for name, inp in inputs.items()}
    try:
        theirs_model = diffusers_flux(cfg, dict(flux.state_dict()))
    except ImportError as e:
        return {"cases": {name: {"ours": r} for name, (r, _, _) in ours.items()},
                "skipped": f"diffusers: not installed here ({e}); carry its wheel to compare"}
    del flux
    release(device)
    out = {}
    for name, inp in inputs.items():
        r, y, grads = time_dit(through_diffusers(theirs_model), inp, S, device)
        (mine, y0, grads0) = ours[name]
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
        out[name] = {"ours": mine, "diffusers": r, "rel_diff_out": rel(y0, y),
                     "rel_diff_grad": max(rel(a, b) for a, b in zip(grads0, grads))}
    return {"cases": out}

@contextmanager
def attention_kernel(name):
    """model.attention through one kernel: "flash-attn" (the package, which model.attention prefers where it is
    installed), or one of SDPA's backends with flash-attn set aside."""
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
    """Every attention kernel through model.attention on the joint sequence of the large case: each output against
    SDPA's math kernel in fp32, the time of forward and of forward+backward. A kernel this device or build lacks
    says why."""
    tok = lambda px: (px // cfg.token_px) ** 2
    L, H = cfg.max_txt_len + tok(S["large"]) + tok(S["ref"]), cfg.num_heads
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, L, H, cfg.hidden_size // H, generator=g).to(device, torch.bfloat16).requires_grad_()
               for _ in range(3))
    with torch.no_grad(), attention_kernel("MATH"):
        want = M.attention(q.float(), k.float(), v.float())
    names = (["flash-attn"] if M.flash_attn_func is not None else []) + \
        ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    out = {"shape": [1, L, H, cfg.hidden_size // H], "flash_attn_installed": M.flash_attn_func is not None}
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
    """The real peak memory of paper-scale SFT steps (LoRA rank S["rank"], MoE-LoRA of 4 experts, gradient
    checkpointing, the attention probe with Dice, AdamW as the trainers build it) against training_budget's estimate
    at the same settings. Two steps: the second holds AdamW's states while its activations live."""
    size, ref, refs = S["small"], S["ref"], 2
    dtype = M.weight_dtype(device)
    flux = random_flux(cfg, device, dtype, seed)
    ML.inject(flux, rank=S["rank"], n_experts=4)
    flux.to(device).train()
    for _, m in ML.adapters(flux):           # a trained adapter's update, not a fresh one's zeros
        torch.nn.init.normal_(m.up.weight, std=1e-3)
    flux.grad_checkpoint = True
    params = [p for p in flux.parameters() if p.requires_grad]
    opt = TR.build_optimizer(params, 3e-5, 1e-2)
    inp = joint_inputs(cfg, size, ref, refs, device, torch.float32, seed)
    x0, g = inp.pop("img"), torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(device)
    masks = (torch.rand(1, refs, x0.shape[1], generator=g) > 0.7).float().to(device)        # (B, N, L_img)
    def step():
        probe = M.AttentionProbe()
        with M.autocast(device):
            loss = LS.flow_matching_loss(lambda x_t, t: flux(img=x_t, **dict(inp, timesteps=t), probe=probe), x0,
                                         inp["timesteps"], noise)
        (loss + 0.3 * LS.dice_loss(probe.mean_map(), masks)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    resident = allocated(device, flux)
    times = []
    peak = resident + peak_above(lambda: times.extend(device_times(step, 1, device)), device)
    b = training_budget(cfg, S["rank"], 4, size, ref, refs, 1, dtype, foreach=device.type == "cuda")
    est = budget_columns(b)["1 GPU"]["total, --grad-checkpoint"]
    return {"settings": dict(size=size, ref_size=ref, refs=refs, rank=S["rank"], experts=4, grad_checkpoint=True,
                             dtype=str(dtype)), "step_s": times[0], "peak_bytes": peak, "estimate_bytes": est,
            "budget": b}

def sampling_section(cfg, S, device, seed):
    """Seconds per image at the large size with one reference, S["steps"] Euler steps of distilled guidance (one DiT
    forward each) and the AE's decoding: every block resident, then streamed (--offload's stream_blocks), then
    stored in fp8 (--fp8's store_fp8). The prompt's embeddings are random (T5/CLIP are not run)."""
    dtype = M.weight_dtype(device)
    flux = random_flux(cfg, device, dtype, seed)
    torch.manual_seed(seed)
    ae = M.AutoEncoder(cfg.ae).to(device, dtype).eval()
    c = joint_inputs(cfg, S["large"], S["ref"], 1, device, torch.float32, seed)
    c.pop("timesteps"), c.pop("guidance")
    ts = M.get_schedule(S["steps"], c["img"].shape[1])
    image = lambda steps: lambda: M.decode_images(ae, M.denoise(flux, **c, timesteps=steps, guidance=cfg.guidance,
                                                                progress=False), S["large"], S["large"])
    out = {"steps": S["steps"], "resident_s": device_times(image(ts), 1, device, warmup=image(ts[:2]))[0]}
    handles = M.stream_blocks(flux, device)
    out["offload_s"] = device_times(image(ts), 1, device, warmup=image(ts[:2]))[0]
    for h in handles:
        h.remove()
    M.store_fp8(flux.to(device))
    out["fp8_s"] = device_times(image(ts), 1, device, warmup=image(ts[:2]))[0]
    return out

def guarded(section, *args):
    # a section that runs out of device memory is a row that says so; the other sections still run
    try:
        return section(*args)
    except torch.OutOfMemoryError as e:
        return {"out_of_memory": str(e).splitlines()[0][:200]}
    finally:
        release(args[2])

def gpu(args):
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py gpu needs a CUDA GPU (--tiny runs the same code on the CPU at tiny shapes)")
    cfg, S = (tiny_config(), TINY_SHAPES) if args.tiny else (M.get_config("flux-dev"), GPU_SHAPES)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--tiny)"
    t0 = time.perf_counter()
    res = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "shapes": S,
           "matmul_bf16_flops_per_s": matmul_peak(device, torch.bfloat16, S["matmul"])}
    for key, section in (("dit", dit_section), ("attention", attention_section), ("sft", sft_section),
                         ("sampling", sampling_section)):
        print(f"{key} ...", flush=True)
        res[key] = guarded(section, cfg, S, device, args.seed)
    res["wall_s"] = time.perf_counter() - t0
    print_gpu_table(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.json}")
    return res

def gpu_rows(res):
    """The table's rows (what, value, against, ratio, note) from gpu's results; a section that ran out of memory is
    one row saying so."""
    peak, rows, ms = res["matmul_bf16_flops_per_s"], [], lambda ts: f"{median(ts) * 1e3:.1f} ms"
    for case, r in res["dit"].get("cases", {}).items():
        for mode, label in (("fwd", "forward"), ("train", "forward+backward")):
            mine, theirs = r["ours"], r.get("diffusers")
            mfu = lambda m: f"{m[f'{mode}_flops'] / median(m[f'{mode}_s']) / peak:.0%}"
            if theirs is None:
                rows.append((f"DiT {label}, {case}", ms(mine[f"{mode}_s"]), "", "",
                             f"MFU {mfu(mine)}; {res['dit']['skipped']}"))
                continue
            note = f"MFU {mfu(mine)} / {mfu(theirs)}; " + (
                f"rel. diff out {r['rel_diff_out']:.1e}, input grads {r['rel_diff_grad']:.1e}" if mode == "fwd" else
                f"peak {mine['train_peak_bytes'] / 2 ** 30:.2f} / {theirs['train_peak_bytes'] / 2 ** 30:.2f} GiB")
            rows.append((f"DiT {label}, {case}", ms(mine[f"{mode}_s"]), f"diffusers {ms(theirs[f'{mode}_s'])}",
                         f"{median(mine[f'{mode}_s']) / median(theirs[f'{mode}_s']):.3f}", note))
    att = res["attention"]
    base = att.get("MATH", {}).get("train_s")
    if att.get("flash_attn_installed") is False:
        rows.append(("attention flash-attn", "not installed", "", "", "SDPA's own kernels compared instead"))
    for name, r in att.items():
        if isinstance(r, dict) and "unavailable" in r:
            rows.append((f"attention {name}", "unavailable", "", "", r["unavailable"]))
        elif isinstance(r, dict):
            rows.append((f"attention {name}, fwd+bwd", ms(r["train_s"]), f"math {ms(base)}" if base else "",
                         f"{median(r['train_s']) / median(base):.3f}" if base else "",
                         f"fwd {ms(r['fwd_s'])}; rel. err {r['rel_err']:.1e} against fp32 math"))
    sft = res["sft"]
    if "peak_bytes" in sft:
        st = sft["settings"]
        rows.append(("SFT step peak memory (GiB)", f"{sft['peak_bytes'] / 2 ** 30:.2f}",
                     f"estimate {sft['estimate_bytes'] / 2 ** 30:.2f}",
                     f"{sft['peak_bytes'] / sft['estimate_bytes']:.3f}",
                     f"rank {st['rank']}, MoE-LoRA x{st['experts']}, ckpt, {st['size']}px + {st['refs']} refs; "
                     f"{sft['step_s']:.2f} s a step"))
    smp = res["sampling"]
    for key, label in (("resident_s", "resident"), ("fp8_s", "--fp8"), ("offload_s", "--offload")):
        if key in smp:
            rows.append((f"s per {res['shapes']['large']}px image, {smp['steps']} steps, {label}", f"{smp[key]:.2f}",
                         f"resident {smp['resident_s']:.2f}", f"{smp[key] / smp['resident_s']:.3f}",
                         "DiT + AE decode; T5/CLIP not run"))
    return rows + [(section, "out of memory", "", "", res[section]["out_of_memory"])
                   for section in ("dit", "attention", "sft", "sampling") if "out_of_memory" in res[section]]

def print_gpu_table(res):
    print(f"\nbench.py gpu: {res['device']}, torch {res['torch']}, bf16 matmul "
          f"{res['matmul_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s ({res['shapes']['matmul']}^3), {res['wall_s']:.0f} s")
    print(f"{'':48s}{'value':>14s}  {'against':>22s}{'ratio':>8s}  note")
    for what, value, against, ratio, note in gpu_rows(res):
        print(f"{what:48s}{value:>14s}  {against:>22s}{ratio:>8s}  {note}")


# -----------------------------------------------------------------------------
# FLUX.2: the training memory budget on one GPU; sampling with the references' K/V kept

def flux2_call(cfg, B, G, R, n_refs, **bf):
    # the DiT's inputs for a G x G token target, n_refs R x R references and max_txt_len text tokens
    txt = torch.randn(B, cfg.max_txt_len, cfg.context_in_dim, **bf)
    return dict(img=torch.randn(B, G * G, cfg.in_channels, **bf),
                img_ids=F2.grid_ids(G, G, batch=B, device=bf["device"]),
                txt=txt, txt_ids=F2.text_ids(txt), timesteps=torch.rand(B, **bf), y=None,
                guidance=torch.ones(B, **bf) if cfg.guidance_embed else None,
                ref_img=[torch.randn(B, R * R, cfg.in_channels, **bf) for _ in range(n_refs)],
                ref_img_ids=F2.ref_ids((G, G), [(R, R)] * n_refs, batch=B, device=bf["device"]))

# the text models' parameter counts (their model cards)
TEXT_PARAMS = {"Qwen/Qwen3-4B": 4.02e9, "Qwen/Qwen3-8B": 8.19e9,
               "mistralai/Mistral-Small-3.2-24B-Instruct-2506": 24.0e9}

def flux2_memory(args):
    """One GPU training FLUX.2 adapters (stages 1-2, L_attn's probe on): the frozen DiT in bf16, the adapters, their
    gradients and AdamW states in fp32, and the activations autograd keeps (bf16 autocast, attention as flash keeps
    it), with and without --grad-checkpoint, at 512 and 1024 px; the text model and the AE either not resident
    (train_sft.py --cache: cache.py computed their outputs) or resident in bf16."""
    cfg, bf, GiB = F2.get_config(args.preset), dict(device="meta", dtype=torch.bfloat16), 2 ** 30
    with torch.device("meta"):
        flux = F2.Flux2(cfg)
        ML.inject(flux, rank=args.rank, n_experts=args.experts)
        encoders = 2 * (TEXT_PARAMS[cfg.text_repo] + sum(p.numel() for p in F2.AutoEncoder(cfg.ae).parameters()))
    frozen = sum(p.numel() for p in flux.parameters() if not p.requires_grad)
    adapter = sum(p.numel() for p in flux.parameters() if p.requires_grad)
    flux.to(torch.bfloat16)
    R, B = args.ref_size // cfg.token_px, args.batch
    attention = M.attention
    M.attention = flash_like_attention
    act = {}
    try:
        for size in (512, 1024):
            G = size // cfg.token_px
            call = lambda: flux(**flux2_call(cfg, B, G, R, args.refs, **bf), probe=M.AttentionProbe())
            flux.grad_checkpoint = False
            act[size, False] = saved_bytes(flux, call)
            flux.grad_checkpoint = True
            L = G * G + args.refs * R * R + cfg.max_txt_len        # backward recomputes one block at a time
            x = torch.randn(B, L, cfg.hidden_size, **bf, requires_grad=True)
            pe = M.rope(torch.zeros(B, L, 4, device="meta"), cfg.axes_dim, cfg.theta)
            mod = torch.randn(B, 1, 3 * cfg.hidden_size, **bf)
            act[size, True] = saved_bytes(flux, call) + saved_bytes(flux, lambda: flux.single_blocks[0](x, mod, pe))
    finally:
        M.attention = attention
    fixed = frozen * 2 + adapter * 4 * 4                    # bf16 DiT; fp32 adapters, gradients, AdamW's 2 moments
    print(f"{args.preset}: {frozen / 1e9:.2f}B frozen + {adapter / 1e9:.3f}B adapter parameters (LoRA rank "
          f"{args.rank}, MoE-LoRA {args.experts} experts), batch {B}, {args.refs} references of {args.ref_size} px "
          f"({R * R} tokens each), {cfg.max_txt_len} text tokens. GiB on one GPU (a GPU fits at most 92% of its size):")
    print(f"  {'':48s}{'512 px':>8s}{'1024 px':>9s}   fits 24/48/80 GB at 512 | 1024")
    rows = {}
    for resident, ckpt in ((False, False), (False, True), (True, True)):
        name = ("text model + AE resident" if resident else "--cache (no text model, no AE)") + \
            (", --grad-checkpoint" if ckpt else "")
        tot = {s: (fixed + act[s, ckpt] + resident * encoders) / GiB for s in (512, 1024)}
        fits = " | ".join("/".join("y" if tot[s] <= 0.92 * gb * 1e9 / GiB else "-" for gb in (24, 48, 80))
                          for s in (512, 1024))
        rows[name] = tot
        print(f"  {name:48s}{tot[512]:8.1f}{tot[1024]:9.1f}   {fits}")
    return {"frozen_params": frozen, "adapter_params": adapter, "encoders_GiB": encoders / GiB,
            "activation_GiB": {f"{s}px{'_ckpt' if c else ''}": a / GiB for (s, c), a in act.items()}, "totals": rows}

def kv(args):
    """Sampling time of a klein-9B-KV-shaped model (references see only themselves at t = 0) at tiny scale: the
    references' K/V computed once (flux2.denoise) against every step (model.denoise on the same model: equal
    outputs), with 2 and 4 references, fp32 on this machine's CPU."""
    torch.manual_seed(args.seed)
    cfg = F2.Flux2Config(in_channels=64, context_in_dim=64, hidden_size=args.hidden, num_heads=args.hidden // 64,
                         depth=2, depth_single_blocks=8, axes_dim=(16, 16, 16, 16), ref_kv=True, max_txt_len=32)
    flux = F2.Flux2(cfg).eval()
    G, R, res = args.grid, args.ref_grid, {}
    ts = F2.get_schedule(args.steps, G * G)
    print(f"klein-9B-KV-shaped DiT, hidden {args.hidden}, 2 + 8 blocks, {G * G} target tokens, references of "
          f"{R * R} tokens, {args.steps} steps, fp32 CPU, {args.reps} interleaved repetitions")
    for n in (2, 4):
        inp = flux2_call(cfg, 1, G, R, n, device="cpu", dtype=torch.float32)
        inp.pop("guidance")
        c = dict(inp, timesteps=ts, guidance=1.0, progress=False)
        with torch.no_grad():
            gap = (F2.denoise(flux, **c) - M.denoise(flux, **c)).abs().max().item()
            (t_cached, t_every), _ = interleaved_times([lambda: F2.denoise(flux, **c), lambda: M.denoise(flux, **c)],
                                                       args.reps)
        res[f"{n}_refs"] = dict(cached_s=median(t_cached), every_step_s=median(t_every),
                                ratio=median(t_every) / median(t_cached), max_abs_diff=gap)
        print(f"  {n} references: every step {median(t_every):.3f} s, kept {median(t_cached):.3f} s: "
              f"{res[f'{n}_refs']['ratio']:.2f}x faster (outputs differ by {gap:.1e})")
    return res


if __name__ == "__main__":
    args = parser.parse_args()
    {"dit": dit, "sft": sft, "moe": moe, "memory": memory, "rl": rl, "gpu": gpu, "guidance": guidance,
     "compile": compile_bench, "kv": kv}[args.cmd](args)

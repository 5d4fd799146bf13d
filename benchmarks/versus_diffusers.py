"""
`bench.py dit`: our FLUX.1 DiT against diffusers' FluxTransformer2DModel holding the same weights,
on this CPU in fp32 (forward and forward+backward time, FLOPs and their utilization, peak memory).
bench.py's docstring says what is compared; `gpu` makes the same comparison in bf16 at flux-dev's
shapes.
"""
import importlib.util
import inspect
import json
import os
import statistics

import torch

from benchmarks.measure import (count_flops, interleaved_times, matmul_flops_per_s, median,
                                peak_memory)

def import_path(path, name="bench_model"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def bfl_to_diffusers_converter():
    """diffusers' own BFL->diffusers state-dict converter, with its hard-coded hidden size (3072)
    replaced by the one read from the checkpoint (img_in.weight's rows). It pops what it converts
    from its input."""
    import diffusers.loaders.single_file_utils as sfu     # optional: only the comparisons need it
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        raise RuntimeError("diffusers' Flux converter changed; bench.py's patch needs updating")
    src = src.replace("inner_dim = 3072", 'inner_dim = checkpoint["img_in.weight"].shape[0]')
    namespace = dict(vars(sfu))
    exec(src, namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]

def dit(args):
    # the repository's model.py unless --ours names another copy
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    M = import_path(args.ours or os.path.join(root, "model.py"))
    from diffusers import FluxTransformer2DModel          # optional, as above
    torch.manual_seed(args.seed)
    axes = tuple(int(a) for a in args.axes.split(","))
    cfg = M.FluxConfig(hidden_size=args.hidden, num_heads=args.heads, depth=args.depth,
                       depth_single_blocks=args.depth_single, axes_dim=axes, guidance_embed=True)
    ours = M.Flux(cfg)
    # random weights, RMSNorm scales and biases away from their init values too
    with torch.no_grad():
        for n, w in ours.named_parameters():
            w.copy_(torch.randn_like(w) * (0.02 if w.ndim > 1 else 0.1)
                    + (1.0 if n.endswith(".scale") else 0.0))
    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
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
        return ours(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y,
                    guidance=g, ref_img=refs, ref_img_ids=refs_ids)

    # references in the image sequence, output sliced to the target: what UNO computes
    def run_theirs():
        return theirs(hidden_states=all_img, encoder_hidden_states=txt, pooled_projections=y,
                      timestep=t, img_ids=all_ids, txt_ids=txt_ids[0],
                      guidance=g, return_dict=False)[0][:, :L_img]

    def forward(run):
        def step():
            with torch.no_grad():
                run()
        return step

    def train(run, model):
        def step():
            # each step builds fresh gradients, like an optimizer step would
            model.zero_grad(set_to_none=True)
            run().square().mean().backward()
        return step

    names = ("ours", "diffusers")
    models = (ours, theirs)
    fwd = [forward(run_ours), forward(run_theirs)]
    trn = [train(run_ours, ours), train(run_theirs, theirs)]
    res = {"config": {**{k: v for k, v in vars(args).items() if k not in ("cmd", "json")},
                      "axes": axes, "tokens": {"img": L_img, "refs": n_refs * R * R, "txt": L_txt}},
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; hidden "
          f"{args.hidden}, {args.heads} heads, {args.depth}+{args.depth_single} blocks, tokens txt "
          f"{L_txt} + img {L_img} + refs {n_refs}x{R * R}, batch {B}", flush=True)

    # agreement: forward outputs, then every parameter gradient (ours mapped by the same converter)
    with torch.no_grad():
        a, b = run_ours(), run_theirs()
    res["max_abs_diff_out"] = (a - b).abs().max().item()
    res["max_abs_out"] = b.abs().max().item()
    for step in trn:
        step()
    grads = convert({n: w.grad for n, w in ours.named_parameters()})
    theirs_grads = dict(theirs.named_parameters())
    res["max_abs_diff_grad"] = max((grads[n] - w.grad).abs().max().item()
                                   for n, w in theirs_grads.items())
    res["max_abs_grad"] = max(w.grad.abs().max().item() for w in theirs_grads.values())
    print(f"agreement: output max|diff| {res['max_abs_diff_out']:.2e} (max|out| "
          f"{res['max_abs_out']:.2f}), gradients max|diff| {res['max_abs_diff_grad']:.2e} "
          f"(max|grad| {res['max_abs_grad']:.2e})", flush=True)

    # FLOPs (these passes double as warm-up)
    flops = {n: {"fwd": count_flops(f), "train": count_flops(s)}
             for n, f, s in zip(names, fwd, trn)}
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
        # no gradients alive before: they count in the step's peak
        model.zero_grad(set_to_none=True)
        mem[n] = {"fwd": peak_memory(f), "train": peak_memory(s)}
        model.zero_grad(set_to_none=True)

    res["matmul_flops_per_s"] = mm
    for i, n in enumerate(names):
        r = res[n] = {}
        for mode, ts, ss in (("fwd", t_fwd[i], s_fwd[i]), ("train", t_trn[i], s_trn[i])):
            m = median(ts)
            r[mode] = {"median_s": m, "times_s": ts, "spread": (max(ts) - min(ts)) / m,
                       "flops": flops[n][mode],
                       "min_s": min(ts), "cpu_stall": None if None in ss else statistics.mean(ss),
                       "mfu": flops[n][mode] / m / mm, "peak_tensor_bytes": mem[n][mode]["tensors"],
                       "peak_rss_bytes": mem[n][mode]["rss"]}
    res["ratio"] = {mode: {
        "time": res["ours"][mode]["median_s"] / res["diffusers"][mode]["median_s"],
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
    print(f"\nfp32 matmul {2048}^2: {mm / 1e9:.1f} GFLOP/s; timings: {args.reps} forward, "
          f"{args.train_reps} forward+backward repetitions per model, interleaved")
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

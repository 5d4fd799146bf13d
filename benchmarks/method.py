"""
What the method costs, measured side by side on this CPU: the attention probe with Dice in an SFT
step (`sft`; and a MOSAIC-style probe's memory), MoE-LoRA against one LoRA (`moe`), one IPPO
iteration at two trajectory lengths (`rl`).
"""
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import encoders as EN
import losses as LS
import model as M
import moe_lora as ML
import sampling as SM
import toy
import training as TR
from benchmarks.measure import interleaved_times, median, peak_memory

# -----------------------------------------------------------------------------
# sft: one adapter training step with the attention probe + Dice on vs off; our probe vs a
# MOSAIC-style one

class MosaicProbe:
    """MOSAIC's way (bytedance-fanqie-ai/MOSAIC src/flux_omini_mosaic.py): materialize each
    reference's [B, heads, N_ref, N_img] softmax in every double block and keep it for backward."""
    def __init__(self):
        self.maps = []

    def at(self, i):
        return self

    def __call__(self, q, k, spans):
        k_img = k[:, :, spans.img[0]:spans.img[1]]
        self.maps.append(torch.stack([
            torch.einsum("bhnd,bhmd->bhnm", q[:, :, s:e],
                         k_img).mul(q.shape[-1] ** -0.5).softmax(-1).mean((1, 2))
            for s, e in spans.refs], dim=1))

    def mean_map(self):
        return torch.stack(self.maps).mean(0)

def sft(args):
    torch.manual_seed(args.seed)
    cfg = M.FluxConfig(hidden_size=512, num_heads=8, depth=4, depth_single_blocks=8,
                       axes_dim=(16, 24, 24))
    flux = M.Flux(cfg)
    ML.inject(flux, rank=args.rank, n_experts=4)
    for _, m in ML.adapters(flux):
        torch.nn.init.normal_(m.up.weight, std=0.01)
    B, G, R = 1, 32, 16
    img, img_ids = M.pack(torch.randn(B, 16, 2 * G, 2 * G)), M.grid_ids(G, G, batch=B)
    refs = [M.pack(torch.randn(B, 16, 2 * R, 2 * R)) for _ in range(2)]
    rids = M.ref_ids((G, G), [(R, R)] * 2, batch=B)
    txt, txt_ids, y = (torch.randn(B, 128, cfg.context_in_dim), torch.zeros(B, 128, 3),
                       torch.randn(B, cfg.vec_in_dim))
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
    print(f"SFT step: hidden 512, 4+8 blocks, 1024 image + 2x256 reference + 128 text tokens, "
          f"LoRA/MoE-LoRA rank {args.rank}, fp32, {torch.get_num_threads()} threads", flush=True)
    for f in tqdm(variants.values(), desc="warm-up", leave=False):
        f()
    times, _ = interleaved_times([variants["off"], variants["ours"]], args.reps)
    mem = {k: peak_memory(f)["tensors"] for k, f in tqdm(variants.items(), desc="peak memory",
                                                         leave=False)}
    MiB = 2 ** 20
    res = {"time_off_s": median(times[0]), "time_probe_s": median(times[1]),
           "time_ratio": median(times[1]) / median(times[0]),
           "peak_off_MiB": mem["off"] / MiB, "peak_probe_MiB": mem["ours"] / MiB,
           "peak_mosaic_MiB": mem["mosaic"] / MiB, "peak_ratio": mem["ours"] / mem["off"],
           "extra_ours_over_mosaic": (mem["ours"] - mem["off"]) / (mem["mosaic"] - mem["off"])}
    print(f"  time     probe+Dice off {res['time_off_s']:.3f} s, on {res['time_probe_s']:.3f} s: "
          f"ratio {res['time_ratio']:.3f} (target <= 1.15)")
    print(f"  peak     off {res['peak_off_MiB']:.0f} MiB, our probe {res['peak_probe_MiB']:.0f} "
          f"MiB: ratio {res['peak_ratio']:.3f} (target <= 1.15)")
    print(f"  extra    ours {res['peak_probe_MiB'] - res['peak_off_MiB']:.1f} MiB vs MOSAIC-style "
          f"{res['peak_mosaic_MiB'] - res['peak_off_MiB']:.1f} MiB: ratio "
          f"{res['extra_ours_over_mosaic']:.3f} (target <= 0.25)")
    return res

# -----------------------------------------------------------------------------
# moe: MoE-LoRA top-1 of 4 vs one LoRA of the same rank, at the paper's shape ratio scaled down

def moe(args):
    torch.manual_seed(args.seed)
    s = args.scale  # the paper: rank 512 on 3072 -> 12288 (FLUX's FFN); divided by `scale` together
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
    print(f"MoE-LoRA top-1 of 4 vs LoRA, rank {r} on {D} -> {H}, {args.tokens} tokens, "
          f"forward+backward: {median(times[1]) * 1e3:.1f} ms vs {median(times[0]) * 1e3:.1f} ms, "
          f"ratio {ratio:.3f} (target <= 1.3)")
    return {"lora_s": median(times[0]), "moe_s": median(times[1]), "ratio": ratio}

# -----------------------------------------------------------------------------
# rl: one IPPO iteration (train_rl.py's rollout and GSPO update) at two trajectory lengths

def rl(args):
    """DiT rows (samples through the DiT) counted by a forward hook, split into rollout and update,
    and the peak tensor memory of a whole iteration (rollout + reward-free GSPO update + backward)
    at T = 8 and T = 16. The update holds the graphs of the w window steps only, so the peak should
    not grow with T."""
    torch.manual_seed(args.seed)
    cfg = M.get_config("toy", hidden_size=args.hidden, num_heads=args.hidden // 64,
                       axes_dim=(16, 24, 24))
    flux = M.Flux(cfg)
    ML.inject(flux, rank=16)
    for _, m in ML.adapters(flux):
        torch.nn.init.normal_(m.up.weight, std=0.01)
    ae, text, px = EN.AutoEncoder(cfg.ae), EN.ByteTextEncoder(cfg), cfg.token_px
    views = [toy.view(toy.draw_identity("train", i), np.random.default_rng(i), args.grid * px // 2)
             for i in (5, 100)]
    refs = [Image.fromarray(v[0]) for v in views]                  # two references of the toy world
    c = SM.sampling_inputs(cfg, ae, text, "two sprites", refs, args.grid * px, args.grid * px,
                           seed=args.seed)
    G, w, rows = args.group, args.window, []
    flux.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    adv = torch.linspace(-1, 1, G)

    def iteration(T, l):
        ts, window = SM.get_schedule(T, args.grid ** 2), range(l, l + w)
        _, tr, _ = TR.rollout(flux, c, G, ts, window, 0.7, 3.5, torch.Generator().manual_seed(0))
        n_rollout = len(rows)
        logp, _, _ = TR.WindowPolicy(flux)(c, tr["x"], tr["x_next"],
                                           [(ts[i], ts[i + 1]) for i in window], 0.7, 3.5)
        LS.gspo_loss(logp, tr["old_logp"], adv)[0].backward()
        flux.zero_grad(set_to_none=True)
        return sum(rows[:n_rollout]), sum(rows[n_rollout:])

    res = {}
    print(f"one IPPO iteration, hidden {args.hidden}, {args.grid ** 2} image tokens + "
          f"2 refs, G {G}, w {w}, fp32 CPU")
    for T in (8, 16):
        for l in (0, T // 2):
            rows.clear()
            out = {}
            mem = peak_memory(lambda: out.update(zip(("rollout", "update"), iteration(T, l))))
            res[f"T{T}_l{l}"] = dict(out, peak_MiB=mem["tensors"] / 2 ** 20)
            print(f"  T {T:2d}, window at {l:2d}: rollout {out['rollout']:3d} DiT rows (G T = "
                  f"{G * T}; the group shares the {l} steps before the window: l + G (T - l) = "
                  f"{l + G * (T - l)}), update {out['update']} (G w = {G * w}), peak "
                  f"{mem['tensors'] / 2 ** 20:.1f} MiB")
    res["peak_ratio_T16_over_T8"] = res["T16_l0"]["peak_MiB"] / res["T8_l0"]["peak_MiB"]
    print("  peak memory T = 16 / T = 8 (window at 0): "
          f"{res['peak_ratio_T16_over_T8']:.3f} (target <= 1.1)")
    return res

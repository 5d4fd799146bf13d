"""
`bench.py memory`: what one GPU holds to train adapters at paper scale (FLUX.1, every parallel
layout) or on FLUX.2 (one GPU), and FLUX.1's peak when sampling with each low-VRAM option; all from
the real module shapes on the meta device, nothing allocated.
"""
import torch

import encoders as EN
import flux2 as F2
import model as M
import moe_lora as ML
import weights as WT
from benchmarks.measure import live_peak, nbytes, saved_bytes
from benchmarks.shapes import dit_inputs

# -----------------------------------------------------------------------------
# attention as fused kernels keep it, on the meta device

class FlashLike(torch.autograd.Function):
    """Stands in for attention on the meta device with what flash attention keeps for backward: q,
    k, v (B, H, L, D), the output and an fp32 log-sum-exp per query (B, H, L). (Meta SDPA would take
    the math path and keep L x L scores.)"""
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32,
                                                        device=q.device))
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

def flash_like_attention(q, k, v, mask=None):
    # model.attention's contract, (B, L, H, D) -> (B, L, H*D), through FlashLike on (B, H, L, D)
    # views as SDPA gets (no mask: only the oracle of experiments/ sets one)
    assert mask is None, "flash_like_attention takes no mask"
    return FlashLike.apply(q.transpose(1, 2), k.transpose(1, 2),
                           v.transpose(1, 2)).transpose(1, 2).flatten(2)

# -----------------------------------------------------------------------------
# training: a per-GPU budget for paper-scale training, from the real module shapes on the meta
# device

def training_budget(cfg, rank, experts, size, ref_size, refs, batch, dtype=torch.bfloat16,
                    foreach=True):
    """What one GPU holds to train adapters on a frozen DiT of either family (batch per GPU, size px
    targets, refs of ref_size px, cfg.max_txt_len text tokens), in bytes, counted from the real
    module shapes on the meta device: every piece alone (budget_columns sums them per parallel
    layout). dtype: the frozen weights' and activations' (bf16 autocast on GPU); adapters, their
    gradients and AdamW's states are fp32. foreach: AdamW's multi-tensor step (torch's default on
    CUDA) computes sqrt of all second moments into one temporary; the CPU's per-parameter loop only
    of the largest."""
    with torch.device("meta"):
        flux = F2.dit(cfg)
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
    inp = dit_inputs(cfg, size, ref_size, refs, batch, "meta", dtype)
    forward = lambda: flux(**inp, probe=M.AttentionProbe())
    # the blocks look the hook up at call time: swapping it reaches all of them
    attention = M.attention
    M.attention = flash_like_attention
    try:
        act = saved_bytes(flux, forward)
        flux.grad_checkpoint = True
        act_ckpt = saved_bytes(flux, forward)
        # backward then recomputes one block at a time: add the largest block's own activations
        B, L = batch, sum(t.shape[1] for t in (inp["txt"], inp["img"], *inp["ref_img"]))
        x = torch.randn(B, L, cfg.hidden_size, device="meta", dtype=dtype, requires_grad=True)
        pe = M.rope(torch.zeros(B, L, len(cfg.axes_dim), device="meta"), cfg.axes_dim, cfg.theta)
        # a FLUX.1 block modulates itself from the time vector; a FLUX.2 block takes the shared
        # modulation
        mod = (B, 1, 3 * cfg.hidden_size) if F2.is_flux2(cfg) else (B, cfg.hidden_size)
        mod = torch.randn(*mod, device="meta", dtype=dtype)
        act_ckpt += saved_bytes(flux, lambda: flux.single_blocks[0](x, mod, pe))
    finally:
        M.attention = attention
    return dict(frozen=frozen * dtype.itemsize, adapters=adapter * 4, grads=adapter * 4,
                adam=adapter * 8,
                adam_temp=(adapter if foreach else max(p.numel() for p in trainable)) * 4, act=act,
                act_ckpt=act_ckpt, block=unit(largest),
                block_grads=sum(p.numel() for p in largest.parameters() if p.requires_grad) * 4,
                root=unit(flux) - sum(map(unit, blocks)), frozen_params=frozen,
                adapter_params=adapter)

def budget_columns(b, gpus=8):
    """training_budget's pieces -> {layout: {row: bytes per GPU}} for one GPU and `gpus` of them:
    DDP (replicated),
    + ZeRO-1 (--zero: AdamW states sharded), FSDP (--fsdp: weights, gradients and states sharded;
      each rank gathers
    the unit that computes: the root's, and two blocks at once, the next one prefetched, with one
    block's gradients before they are reduce-scattered). The activations and the optimizer's
    temporary are never alive together."""
    out = {}
    for name, shard, states in (("1 GPU", 1, 1), (f"{gpus} GPUs", 1, 1),
                                (f"{gpus} + ZeRO", 1, gpus), (f"{gpus} + FSDP", gpus, gpus)):
        gathered = b["root"] + 2 * b["block"] + b["block_grads"] if shard > 1 else 0
        rows = {"frozen DiT": b["frozen"] / shard, "adapters (fp32)": b["adapters"] / shard,
                "adapter gradients (fp32)": b["grads"] / shard, "AdamW states (fp32 x 2)": b["adam"]
                / states, "AdamW step temporary (fp32)": b["adam_temp"] / states,
                "FSDP units gathered": gathered,
                "activations": b["act"], "activations, --grad-checkpoint": b["act_ckpt"]}
        base = sum(rows[k] for k in list(rows)[:4])
        rows["total"] = base + max(b["act"] + gathered, rows["AdamW step temporary (fp32)"])
        rows["total, --grad-checkpoint"] = base + max(b["act_ckpt"] + gathered,
                                                      rows["AdamW step temporary (fp32)"])
        out[name] = rows
    return out

# -----------------------------------------------------------------------------
# inference: peak GPU memory when sampling, for each of weights.py's low-VRAM options, from shapes
# on the meta device

# google/t5-v1_1-xxl's encoder and openai/clip-vit-large-patch14's text model, from their
# config.json files
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768)

def inference_memory(args):
    """Peak GPU memory of one sample (batch 1): the weights on the GPU in each phase (text encoding,
    reference encoding, the denoising loop, decoding) plus that phase's peak of live tensors
    (LiveBytes, attention as fused kernels keep it), the largest phase being the peak. Options:
    everything resident; the text encoders and the AE on the GPU only while they run, the DiT too
    (WT.resident: text encoding, references, denoising, decoding in turn); the DiT in fp8
    (WT.store_fp8); its blocks streamed one at a time (WT.stream_blocks); both; both with T5/CLIP
    run on the CPU."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    cfg, bf, GiB = M.get_config(args.preset), torch.bfloat16, 2 ** 30
    with torch.device("meta"):
        flux = M.Flux(cfg).to(bf).eval()
        flux8 = WT.store_fp8(M.Flux(cfg).to(bf).eval())
        ae = EN.AutoEncoder(cfg.ae).to(bf).eval()
        t5 = T5EncoderModel(T5Config(**T5_XXL)).to(bf).eval()
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(bf).eval()
    # what stays on the GPU when the blocks stream: everything but the blocks, plus the largest
    def streamed(f):
        blocks = [nbytes(b) for b in (*f.double_blocks, *f.single_blocks)]
        return nbytes(f) - sum(blocks) + max(blocks)
    meta = dict(device="meta", dtype=bf)
    ids = lambda n: torch.zeros(1, n, dtype=torch.long, device="meta")
    text_act = live_peak(lambda: (t5(input_ids=ids(cfg.max_txt_len)), clip(input_ids=ids(77))))
    attention = M.attention           # the DiT's and the AE's attention, as fused kernels keep it
    M.attention = flash_like_attention
    try:
        ae_act = {s: live_peak(lambda: ae.decode(torch.randn(
            1, cfg.ae.z_channels, s // 8, s // 8, **meta)))
            for s in (512, 1024)}
        ae_act["ref"] = live_peak(lambda: ae.encode(torch.randn(
            1, 3, args.ref_size, args.ref_size, **meta)))
        Lt, R = cfg.max_txt_len, args.ref_size // 16
        def dit_act(f, size, n):
            G = size // 16
            return (live_peak(lambda: f(
                torch.randn(1, G * G, cfg.in_channels, **meta), M.grid_ids(G, G, device="meta"),
                torch.randn(1, Lt, cfg.context_in_dim, **meta),
                torch.zeros(1, Lt, 3, device="meta"), torch.rand(1, **meta),
                torch.randn(1, cfg.vec_in_dim, **meta), torch.ones(1, **meta),
                [torch.randn(1, R * R, cfg.in_channels, **meta) for _ in range(n)],
                M.ref_ids((G, G), [(R, R)] * n, device="meta"))))
        cols = [(s, n) for s in (512, 1024) for n in (1, 2, 3, 4)]
        act = {(k, c): dit_act(f, *c) for k, f in (("bf16", flux), ("fp8", flux8)) for c in cols}
    finally:
        M.attention = attention
    text, aeb = nbytes(t5) + nbytes(clip), nbytes(ae)
    def phases(dit, kind, c, text_on_gpu=True):
        # each model on the GPU only while it runs (WT.resident): text encoding, then the references
        # through the AE, then the denoising loop, then decoding; the peak is the largest phase's
        # weights + live tensors
        return max(text + text_act if text_on_gpu else 0, aeb + max(ae_act["ref"], ae_act[c[0]]),
                   dit + act[(kind, c)])
    options = {
        "everything resident (bf16)": lambda c: nbytes(flux) + text + aeb + max(
            text_act, ae_act["ref"], ae_act[c[0]], act[("bf16", c)]),
        "each model on the GPU only while used": lambda c: phases(nbytes(flux), "bf16", c),
        "  + DiT in fp8": lambda c: phases(nbytes(flux8), "fp8", c),
        "  + DiT blocks streamed": lambda c: phases(streamed(flux), "bf16", c),
        "  + blocks streamed, fp8": lambda c: phases(streamed(flux8), "fp8", c),
        "  + streamed, fp8, T5/CLIP on CPU": lambda c: phases(
            streamed(flux8), "fp8", c, text_on_gpu=False),
    }
    print(f"\ninference, {args.preset}, batch 1, {args.ref_size}px references, {cfg.max_txt_len} "
          f"text tokens: peak GPU memory (GiB) = the largest phase's weights + live tensors (meta "
          f"device; attention as fused kernels)")
    print(f"  weights: DiT {nbytes(flux) / GiB:.1f} bf16 / {nbytes(flux8) / GiB:.1f} fp8 "
          f"(streamed: {streamed(flux) / GiB:.2f} / {streamed(flux8) / GiB:.2f} resident), T5-XXL "
          f"+ CLIP-L {text / GiB:.1f}, AE {aeb / GiB:.2f}")
    print(f"  {'option':38s}" + "".join(f"{f'{s}px {n} ref':>13s}" for s, n in cols))
    table = {}
    for name, peak in options.items():
        table[name.strip(" +")] = {f"{s}px_{n}ref": peak((s, n)) / GiB for s, n in cols}
        print(f"  {name:38s}" + "".join(f"{peak(c) / GiB:13.2f}" for c in cols))
    return table

# -----------------------------------------------------------------------------
# FLUX.2: the training memory budget on one GPU and on 8 with --fsdp

# the text models' parameter counts (their model cards)
TEXT_PARAMS = {"Qwen/Qwen3-4B": 4.02e9, "Qwen/Qwen3-8B": 8.19e9,
               "mistralai/Mistral-Small-3.2-24B-Instruct-2506": 24.0e9}

def flux2_memory(args, gpus=8):
    """Training FLUX.2 adapters (stages 1-2, L_attn's probe on) at 512 and 1024 px, per GPU on one
    GPU and on `gpus` with --fsdp: training_budget's pieces summed by budget_columns, as FLUX.1's
    table sums them (the frozen DiT in bf16; adapters, gradients and AdamW states in fp32; AdamW's
    step temporary; the activations, with and without --grad-checkpoint; with --fsdp all but the
    activations sharded, plus the units each GPU gathers to compute). The text model and the AE are
    either not resident (train_sft.py --cache: cache.py computed their outputs) or resident in bf16:
    with --fsdp the text model sits in the root unit, which stays gathered for the whole step, so
    each GPU holds it whole beside its shard; the AE is not sharded."""
    cfg, GiB, sizes = F2.get_config(args.preset), 2 ** 30, (512, 1024)
    with torch.device("meta"):
        ae = 2 * sum(p.numel() for p in F2.AutoEncoder(cfg.ae).parameters())
    text = 2 * TEXT_PARAMS[cfg.text_repo]
    b = {s: training_budget(cfg, args.rank, args.experts, s, args.ref_size, args.refs, args.batch)
         for s in sizes}
    cols = {s: budget_columns(b[s], gpus) for s in sizes}
    resident = {"1 GPU": text + ae, f"{gpus} + FSDP": text * (1 + 1 / gpus) + ae}    # bytes per GPU
    R, first = args.ref_size // cfg.token_px, b[sizes[0]]
    print(f"{args.preset}: {first['frozen_params'] / 1e9:.2f}B frozen + "
          f"{first['adapter_params'] / 1e9:.3f}B adapter parameters (LoRA rank {args.rank}, "
          f"MoE-LoRA {args.experts} experts), batch {args.batch} per GPU, {args.refs} references "
          f"of {args.ref_size} px ({R * R} tokens each), {cfg.max_txt_len} text tokens. GiB per "
          f"GPU, on one GPU and on {gpus} with --fsdp (a GPU fits at most 92% of its size):")
    print(f"  {'':50s}{'1 GPU':>17s}{f'{gpus} GPUs, --fsdp':>19s}   fits 24/48/80 GB at 512 | 1024")
    print(f"  {'':50s}" + f"{'512 px':>8s}{'1024 px':>9s}" * 2 + f"   1 GPU; {gpus} GPUs, --fsdp")
    fit = lambda gib: "/".join("y" if gib <= 0.92 * gb * 1e9 / GiB else "-" for gb in (24, 48, 80))
    totals = {}
    for on_gpu, ckpt in ((False, False), (False, True), (True, True)):
        name = ("text model + AE resident" if on_gpu else "--cache (no text model, no AE)") + \
            (", --grad-checkpoint" if ckpt else "")
        key = "total, --grad-checkpoint" if ckpt else "total"
        tot = totals[name] = {layout: {s: (cols[s][layout][key] + on_gpu * extra) / GiB
                                       for s in sizes} for layout, extra in resident.items()}
        fits = "; ".join(" | ".join(fit(t[s]) for s in sizes) for t in tot.values())
        print(f"  {name:50s}" + "".join(f"{t[512]:8.1f}{t[1024]:9.1f}" for t in tot.values()) +
              f"   {fits}")
    return {"budget": b, "text_GiB": text / GiB, "ae_GiB": ae / GiB, "totals_GiB": totals}

# -----------------------------------------------------------------------------
# the command: FLUX.1's budget in every layout and its inference peaks, or FLUX.2's budget

def memory(args):
    if args.preset in F2.CONFIGS:
        return flux2_memory(args)
    cfg = M.get_config(args.preset)
    b = training_budget(cfg, args.rank, args.experts, args.size, args.ref_size, args.refs,
                        args.batch)
    cols = budget_columns(b)
    GiB = 2 ** 30
    print(f"{args.preset}: {b['frozen_params'] / 1e9:.2f}B frozen + "
          f"{b['adapter_params'] / 1e9:.3f}B adapter parameters (LoRA rank {args.rank}, MoE-LoRA "
          f"{args.experts} experts); batch {args.batch} per GPU: {args.size}px target, {args.refs} "
          f"refs of {args.ref_size}px, {cfg.max_txt_len} text tokens; activations as bf16 autocast "
          "with flash attention keeps them; T5/CLIP/VAE not resident (python cache.py)")
    print(f"{'GiB per GPU':42s}" + "".join(f"{c:>10s}" for c in cols))
    for row in next(iter(cols.values())):
        print(f"  {row:40s}" + "".join(f"{cols[c][row] / GiB:10.1f}" for c in cols))
    return {"budget": b, "columns_GiB": {c: {k: v / GiB for k, v in r.items()}
                                         for c, r in cols.items()},
            "inference_GiB": inference_memory(args)}

"""
The networks: FLUX.1 written from scratch in plain PyTorch, with UNO-style references and a probe.

  - FluxConfig + presets ("flux-dev", "flux-schnell", "toy"), and the one place for device and dtype
  - the DiT (Flux): RoPE over 3 axes, QK-RMSNorm, adaLN modulation, double/single stream blocks, all
    attending through one hook (`attention`), and the attention probe the blocks hand their q, k
  - latent packing (2x2 patches), position ids with UNO's diagonal offsets for references, and
    `prepare`: the one place the joint sequence [txt | img | ref_1 ... ref_N] is built
  (the AutoEncoder and the text encoders are in encoders.py)

State-dict keys and shapes equal the official flux1-dev/flux1-schnell/ae safetensors files, so the
checkpoints load unchanged: weights.py finds and loads them (a network never sees a path), and
sampling.py steps from noise to an image (BFL's util.py and sampling.py). The model knows nothing
about losses: the attention probe is a callback that double blocks hand their post-norm, post-RoPE
q/k (losses.py decides what to do with them).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# flash-attention 2, when installed (pip install flash-attn): the attention hook uses it on CUDA in
# bf16/fp16
try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# -----------------------------------------------------------------------------
# config

@dataclass
class AutoEncoderConfig:
    # official AutoEncoderParams (black-forest-labs/flux src/flux/util.py); ch_mult=() selects the
    # parameter-free pixel-unshuffle stand-in of the toy preset (downsampling by `factor`)
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    factor: int = 8              # pixels per latent cell along each side

@dataclass
class FluxConfig:
    # the DiT, with the official FluxParams names
    in_channels: int = 64        # 2x2 packed latent channels = 4 * z_channels
    out_channels: int = 64
    vec_in_dim: int = 768        # CLIP-L pooled output
    context_in_dim: int = 4096   # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19              # double stream blocks
    depth_single_blocks: int = 38
    # RoPE dims per position axis (index, row, col); sums to head_dim
    axes_dim: tuple = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled; schnell is not
    # what surrounds the DiT
    text_encoder: str = "t5+clip"   # or "bytes" (tiny tokenizer-free encoder, toy preset)
    max_txt_len: int = 512          # T5 tokens: 512 for dev, 256 for schnell
    # the byte encoder's padding: "max" pads every prompt to max_txt_len (what a checkpoint whose
    # header does not say was trained with: the DiT attends to the pad tokens, so it must keep
    # them); "longest" pads to the batch's longest prompt (toy prompts are 8-60 bytes: about half
    # the joint sequence saved; assets/toy is trained so)
    txt_pad: str = "max"
    shift_schedule: bool = True     # resolution-dependent timestep shift (off for schnell)
    ae: AutoEncoderConfig = field(default_factory=AutoEncoderConfig)
    repo_id: str = ""               # Hugging Face repo holding flow_file and ae_file
    flow_file: str = ""
    ae_file: str = "ae.safetensors"
    # the preset's defaults, read by sample.py, train_sft.py and train_rl.py alike
    image_size: int = 512           # target side (px)
    ref_size: int = 320             # reference side (px; MultiCrafter Appendix B)
    sample_steps: int = 50          # Euler steps when sampling
    guidance: float = 3.5         # distilled guidance when sampling (schnell has no guidance input)
    # classifier-free guidance on the references when sampling (1: none; denoise)
    ref_guidance: float = 1.0
    # classifier-free guidance on the prompt (needs a model trained with dropout)
    text_guidance: float = 1.0

    @property
    def token_px(self):
        # pixels per packed token along each side: the AE's downsampling times the 2x2 patch
        # (16 FLUX, 4 toy)
        return 2 * self.ae.factor

CONFIGS = {
    "flux-dev": FluxConfig(repo_id="black-forest-labs/FLUX.1-dev",
                           flow_file="flux1-dev.safetensors"),
    "flux-schnell": FluxConfig(guidance_embed=False, max_txt_len=256, shift_schedule=False,
                               sample_steps=4, repo_id="black-forest-labs/FLUX.1-schnell",
                               flow_file="flux1-schnell.safetensors"),
    # trains on 2 CPU cores: 32x32 images -> 16x16x12 pixel-unshuffled "latents" -> 8x8 = 64 tokens;
    # distilled guidance 1 when sampling, which is what it trains with (as UNO does);
    # classifier-free guidance 4 on the references and 2 on the prompt (chosen on validation
    # singles: README, the toy world)
    "toy": FluxConfig(in_channels=48, out_channels=48, vec_in_dim=64, context_in_dim=64,
                      hidden_size=128, num_heads=4, depth=2, depth_single_blocks=4,
                      axes_dim=(8, 12, 12), text_encoder="bytes",
                      max_txt_len=128, ae=AutoEncoderConfig(ch_mult=(), z_channels=12, factor=2,
                                                            scale_factor=1.0, shift_factor=0.0),
                      image_size=32, ref_size=16, sample_steps=20, guidance=1.0, ref_guidance=4.0,
                      text_guidance=2.0),
}

def get_config(name, **overrides):
    if name not in CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)

# -----------------------------------------------------------------------------
# device and dtype: the one place that decides

def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

def autocast(device):
    """bf16 autocast on GPU; plain fp32 on CPU (bf16 matmul on CPU is ~100x slower)."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

def weight_dtype(device):
    """The dtype frozen weights (DiT, AE, T5/CLIP) are stored in: bf16 on GPU, fp32 on CPU
    (same reason)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

def param_dtype(m):
    return next(m.parameters(), torch.empty(0)).dtype      # the toy AE has no parameters: fp32

def fp32(x):
    # at least fp32 (keeps fp64 in tests): softmaxes, norms and log-probs never run in bf16
    return x.to(torch.promote_types(x.dtype, torch.float32))

# -----------------------------------------------------------------------------
# small pieces

def timestep_embedding(t, dim, max_period=10_000, time_factor=1000.0):
    # sinusoidal embedding of t in [0, 1] (scaled to [0, 1000]); cos half first, as in FLUX
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                             # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))

class RMSNormFn(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + 1e-6) * scale, the statistics in (at least) fp32 whatever the input
    dtype, cast back before the scale as in the official code. Autograd through those ops would keep
    the normalized x alive until backward (the scale's gradient needs it); this recomputes it from x
    and rrms: one (B, L, H, Dh) tensor less per q/k norm, about 8% of the peak training memory."""
    @staticmethod
    def forward(ctx, x, scale):
        xf = fp32(x)
        rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)                 # (..., 1)
        ctx.save_for_backward(x, scale, rrms)
        return (xf * rrms).to(x.dtype) * scale

    @staticmethod
    def backward(ctx, g):
        # y = s * n, n = x r, r = (mean(x^2) + eps)^-1/2:  dx = r g s - x r^2 mean(r g s x),  ds =
        # sum(g n)
        x, scale, rrms = ctx.saved_tensors
        xf, gr = fp32(x), fp32(g) * rrms
        d_scale = ((gr * xf).sum(tuple(range(x.dim() - 1))).to(scale.dtype)
                   if ctx.needs_input_grad[1] else None)
        gsr = gr * scale
        c = (gsr * xf).mean(-1, keepdim=True) * rrms.square()
        return torch.addcmul(gsr, xf, c, value=-1).to(x.dtype), d_scale

class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))   # "scale", not "weight": official key name

    def forward(self, x):
        return RMSNormFn.apply(x, self.scale)

class QKNorm(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

class Modulation(nn.Module):
    """adaLN: vec -> (shift, scale, gate) per sub-layer; two triples in double blocks
    (attention, MLP)."""
    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)   # each (B, 1, D)

def modulate(x, shift, scale):
    # (1 + scale) * LayerNorm(x) + shift, LayerNorm without affine parameters
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), 1 + scale)

# -----------------------------------------------------------------------------
# rotary position embedding over 3 axes (index, row, col)

def rope(ids, axes_dim, theta):
    """ids (B, L, 3) -> the rotations cos + i sin, complex64 (B, L, 1, head_dim/2) (broadcast over
    heads). Pair p of head dims (2p, 2p+1) rotates by ids[axis] * theta^(-2i/axis_dim)
    (i = p within its axis)."""
    angles = []
    for i, d in enumerate(axes_dim):
        # (d/2,)
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[..., i].double()[..., None] * omega)                         # (B, L, d/2)
    angles = torch.cat(angles, dim=-1)[:, :, None]                                  # (B, L, 1, D/2)
    return torch.complex(angles.cos().float(), angles.sin().float())

def apply_rope(x, pe):
    # x (B, L, H, D) with interleaved pairs: out[2p] = cos x[2p] - sin x[2p+1], out[2p+1] = sin
    # x[2p] + cos x[2p+1], i.e. (x[2p] + i x[2p+1]) * (cos + i sin): one complex multiply
    # (one pass, nothing saved for backward but pe)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))       # (B, L, H, D/2) complex
    return torch.view_as_real(xc * pe).flatten(-2).type_as(x)

# -----------------------------------------------------------------------------
# the attention hook: the one attention of every block (and of the AE)

def use_flash(q):
    # flash-attention 2 runs on CUDA in half precision with head dims up to 256; everything else
    # takes SDPA
    return (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256)

def attention(q, k, v, mask=None):
    """The one attention of every DiT block and of the AE (swap it here): q, k, v (B, L, H, D) ->
    (B, L, H*D). flash-attention when installed and the inputs suit it (it takes this layout as is),
    else SDPA with its own flash / memory-efficient kernels. SDPA gets (B, H, L, D) views: its
    output comes back laid out as (B, L, H, D) and the flatten needs no copy. The probe never goes
    through here: it gets q and k from the blocks directly.
    mask: None, or (B, 1, L_q, L_k) bool, True where a query may attend (only the Separation oracle
    sets one)."""
    if mask is None and use_flash(q):
        return flash_attn_func(q, k, v).flatten(2)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask)
    return x.transpose(1, 2).flatten(2)

def heads(x, num_heads):
    # (B, L, H*D) -> (B, L, H, D), a view
    return x.unflatten(-1, (num_heads, -1))

# -----------------------------------------------------------------------------
# the attention probe interface (what double blocks hand a probe)

@dataclass
class Spans:
    """Where each stream sits in the joint sequence [txt | img | ref_1 ... ref_N] of a forward
    pass."""
    txt: int                 # text tokens occupy [0, txt)
    img: tuple               # (start, end) of the generated image's tokens
    refs: list               # [(start, end)] per reference image

def block_names(cfg):
    """The DiT's blocks by name, in the order they run: d0 .. (double-stream), s0 ..
    (single-stream)."""
    return [f"d{i}" for i in range(cfg.depth)] + [f"s{i}" for i in range(cfg.depth_single_blocks)]

def select_blocks(words, cfg):
    """Block words (--attn-blocks, --oracle-blocks) -> block names, checked against the model. None:
    every double block (the paper's choice); a word is 'double', 'single', 'all', a name
    ('d0', 's3') or a bare integer (a double block's index)."""
    names = block_names(cfg)
    if words is None:
        return [n for n in names if n[0] == "d"]
    out = []
    for w in map(str, words):
        got = {"double": [n for n in names if n[0] == "d"],
               "single": [n for n in names if n[0] == "s"],
               "all": names}.get(w, [f"d{w}" if w.isdigit() else w])
        if not got or got[0] not in names:
            raise ValueError(
                f"block {w!r}: this model's blocks are {', '.join(names)} (or double, single, all)")
        out += [n for n in got if n not in out]
    return out

class AttentionProbe:
    """Per reference, where its tokens look in the generated image (MultiCrafter Eq. 4, MOSAIC's
    A_ref->tgt).

    blocks: the block names it reads (block_names; a bare integer is a double block), None: every
    double block (the paper supervises those). In a single-stream block the joint sequence is the
    same [txt | img | refs], so both directions read it there too. In each selected block, for
    reference i with queries q_i (N_i tokens) and the target image's
    keys k_img (M tokens):   m_i = mean over heads and over the N_i queries of softmax(q_i k_img^T /
                             sqrt(d))
    a distribution over the M target tokens (the softmax runs over target keys only, not the whole
    sequence). The (B, heads, N_i, M) scores exist one head chunk at a time and are recomputed in
    backward (activation checkpointing), so the probe stores only its (B, M) outputs; the real
    attention output is computed by model.attention as if no probe were attached.
    rows: optional, per reference a LongTensor (P_i, 2) of (batch index, reference token) pairs
    whose head-averaged log-probabilities over the target tokens are kept too (for per-point losses
    like SCAL).

    direction "img2ref" (not in the paper, which supervises reference queries only): the path by
    which a target region *reads* a reference. For target token j and reference i,
        m_i[j] = mean over heads of  sum over k in ref_i of softmax_k(q_j k^T / sqrt(d))
    with the softmax over the whole joint key sequence [txt | img | refs] (the attention the block
    really computes), so m_i[j] in [0, 1] is the share of token j's attention spent on reference i
    (not a distribution over j: L_attn's Dice divides by the map's maximum either way). Same
    discipline: (B, heads, M, L) scores one head chunk at a time, recomputed in backward; stored:
    (B, N_refs, M).
    """
    def __init__(self, blocks=None, rows=None, head_chunk=8, direction="ref2img"):
        if direction not in ("ref2img", "img2ref"):
            raise ValueError(f"probe direction must be 'ref2img' or 'img2ref', not {direction!r}")
        if rows is not None and direction != "ref2img":
            raise ValueError("probe rows (SCAL's correspondences) are reference queries: "
                             "direction 'ref2img' only")
        self.blocks = (None if blocks is None else {f"d{b}" if isinstance(b, int) else b
                                                    for b in blocks})
        self.rows, self.head_chunk, self.direction = rows, head_chunk, direction
        self.clear()

    def clear(self):
        self.maps = []      # per probed block: (B, N_refs, M)
        self.names = []     # the block each map came from
        self.logps = []     # per probed block: [ (P_i, M) per reference ]

    def at(self, name):
        return self if (name[0] == "d" if self.blocks is None else name in self.blocks) else None

    def __call__(self, q, k, spans, name=""):
        # q, k: (B, H, L, Dh) post-QK-norm, post-RoPE, the joint sequence [txt | img | refs]; name:
        # the block
        self.names.append(name)
        k_img = k[:, :, spans.img[0]:spans.img[1]]                                  # (B, H, M, Dh)
        run = ((lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False))
               if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
               else (lambda f, *a: f(*a)))
        if self.direction == "img2ref":
            self.maps.append(run(lambda q_img, k_all: self._img_map(q_img, k_all, spans.refs),
                                 q[:, :, spans.img[0]:spans.img[1]], k))
        else:
            self.maps.append(torch.stack([run(self._ref_map, q[:, :, s:e],
                                              k_img) for s, e in spans.refs], dim=1))
        if self.rows is not None:
            self.logps.append([run(self._row_logp, q[:, :, s:e], k_img, r.to(q.device))
                               for (s, e), r in zip(spans.refs, self.rows)])

    def _ref_map(self, q_ref, k_img):
        B, H, N, _ = q_ref.shape
        total = 0
        # (B, h, N, M) at a time, summed over heads and queries
        for h in range(0, H, self.head_chunk):
            s = q_ref[:, h:h + self.head_chunk] @ k_img[:, h:h + self.head_chunk].transpose(-1, -2)
            total = total + (fp32(s) * q_ref.shape[-1] ** -0.5).softmax(-1).sum(dim=(1, 2))
        return total / (H * N)                                                       # (B, M)

    def _img_map(self, q_img, k, refs):
        H, total = q_img.shape[1], 0
        for h in range(0, H, self.head_chunk):      # (B, h, M, L) at a time, summed over heads
            s = q_img[:, h:h + self.head_chunk] @ k[:, h:h + self.head_chunk].transpose(-1, -2)
            p = (fp32(s) * q_img.shape[-1] ** -0.5).softmax(-1)                    # over all L keys
            # (B, N_refs, M)
            total = total + torch.stack([p[..., a:b].sum(-1) for a, b in refs], 1).sum(2)
        return total / H                                                           # (B, N_refs, M)

    @staticmethod
    def _row_logp(q_ref, k_img, rows):
        # log of the head-averaged softmax, in log space: logsumexp_h log_softmax_h - log H  ->
        # (P, M)
        H, out = q_ref.shape[1], []
        for b in range(q_ref.shape[0]):
            sel = rows[rows[:, 0] == b, 1]                            # reference tokens of sample b
            # (H, P_b, M)
            s = q_ref[b][:, sel] @ k_img[b].transpose(-1, -2) * q_ref.shape[-1] ** -0.5
            out.append(torch.logsumexp(fp32(s).log_softmax(-1), dim=0) - math.log(H))
        order = torch.argsort(torch.cat([torch.nonzero(rows[:, 0] == b)[:, 0]
                                         for b in range(q_ref.shape[0])]))
        return torch.cat(out)[order]              # back in the order the rows were given

    def mean_map(self):
        """(B, N_refs, M): the maps averaged over the probed blocks (ref2img: each row sums to
        1)."""
        return torch.stack(self.maps).mean(0)

    def mean_logp(self):
        """Per reference (P_i, M): log of the block-averaged probabilities of the selected rows."""
        n = len(self.logps)
        return [torch.logsumexp(torch.stack(per_block), 0) - math.log(n)
                for per_block in zip(*self.logps)]

def owners(masks, valid=None):
    """Subject masks on the token grid (B, N, M), shares in [0, 1] -> (B, M) long: each target
    token's dominant subject, -1 where no (valid) subject covers it."""
    if valid is not None:
        masks = masks * valid[:, :, None]
    share, who = masks.max(1)
    return torch.where(share > 0, who, torch.full_like(who, -1))

class Separation:
    """Oracle separation: an experiment tool that gives the model perfectly separated attention in
    chosen blocks, the upper bound of what separating attention can buy (never a training default).
    owner (B, M): each target token's subject (owners(masks), from the ground-truth masks), -1 for
    none. In the selected blocks:
      img2ref  target tokens of subject i see no key of another reference (the path that carries
               leakage)
      ref2img  reference i's queries see no target token of another subject (the map L_attn asks
               for)
    Text and unowned tokens are never hidden, so no row is empty; with one reference nothing is
    hidden and the forward is the plain one, bit for bit. The (B, 1, L, L) mask is built once per
    forward."""
    def __init__(self, owner, blocks=None, directions=("img2ref",)):
        if not set(directions) <= {"img2ref", "ref2img"} or not directions:
            raise ValueError(f"oracle directions are img2ref and/or ref2img, not {directions!r}")
        self.owner, self.directions = owner, tuple(directions)
        self.blocks = None if blocks is None else set(blocks)
        self._spans, self._mask = None, None

    def at(self, name, spans):
        # the attention mask of block `name` in the forward whose sequence `spans` describes, or
        # None
        if self.blocks is not None and name not in self.blocks or not spans.refs:
            return None
        if spans is not self._spans:
            self._spans, self._mask = spans, self.mask(spans)
        return self._mask

    def mask(self, spans):
        B, L, dev = self.owner.shape[0], spans.refs[-1][1], self.owner.device
        # whose token it is (-1: text, unowned)
        subject = torch.full((B, L), -1, dtype=torch.long, device=dev)
        kind = torch.zeros(L, dtype=torch.long, device=dev)          # 0 text, 1 target, 2 reference
        subject[:, spans.img[0]:spans.img[1]], kind[spans.img[0]:spans.img[1]] = self.owner, 1
        for i, (s, e) in enumerate(spans.refs):
            subject[:, s:e], kind[s:e] = i, 2
        sq, sk = subject[:, :, None], subject[:, None, :]        # (B, L, 1) queries, (B, 1, L) keys
        other = (sq >= 0) & (sk >= 0) & (sq != sk)
        hide = torch.zeros(B, L, L, dtype=torch.bool, device=dev)
        if "img2ref" in self.directions:
            hide |= other & (kind[:, None] == 1) & (kind[None, :] == 2)
        if "ref2img" in self.directions:
            hide |= other & (kind[:, None] == 2) & (kind[None, :] == 1)
        return ~hide[:, None] if hide.any() else None            # (B, 1, L, L), True: may attend

# -----------------------------------------------------------------------------
# transformer blocks

class SelfAttention(nn.Module):
    # a container for the official key names; the blocks use its parts directly
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        # the official layout is [q heads | k heads | v heads]; each (B, L, H, Dh)
        q, k, v = (heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype), v

def mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, dim))

class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, mixed by one joint attention."""
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(dim, double=True), Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.img_mlp, self.txt_mlp = mlp(dim, hidden), mlp(dim, hidden)

    def forward(self, img, txt, vec, pe, name="", probe=None, spans=None, mask=None):
        # img (B, L_img + L_refs, D): target tokens then reference tokens; txt (B, L_txt, D); name:
        # the block's (the probe records it); mask: the oracle's attention mask, or None
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        txt_attn, img_attn = self.attend(modulate(img, i_shift1, i_scale1),
                                         modulate(txt, t_shift1, t_scale1),
                                         pe, name, probe, spans, mask)
        # x + gate * f(x) as one addcmul: one pass over the stream instead of two
        img = torch.addcmul(img, i_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, i_gate2, self.img_mlp(modulate(img, i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(modulate(txt, t_shift2, t_scale2)))
        return img, txt

    def attend(self, img, txt, pe, name, probe, spans, mask):
        # joint attention over [txt | img] -> the (txt, img) parts of its output. A method of its
        # own so that q, k, v are freed when it returns, before the MLPs run (lower peak memory
        # without autograd)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt)
        q = apply_rope(torch.cat([txt_q, img_q], dim=1), pe)           # (B, L, H, Dh), text first
        k = apply_rope(torch.cat([txt_k, img_k], dim=1), pe)
        v = torch.cat([txt_v, img_v], dim=1)
        if probe is not None:                 # a side computation; the attention below is unchanged
            # the probe takes (B, H, L, Dh)
            probe(q.transpose(1, 2), k.transpose(1, 2), spans, name)
        # split: backward is one cat
        return attention(q, k, v, mask).split([txt.shape[1], img.shape[1]], dim=1)

class SingleStreamBlock(nn.Module):
    """One stream over [txt | img | refs]: attention and MLP in parallel, from one fused input
    projection."""
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads, self.mlp_hidden = num_heads, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)    # q | k | v | mlp_in
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)        # attn_out | gelu(mlp_in) -> out
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec, pe, keep=slice(None), name="", probe=None, spans=None, mask=None):
        # keep: the tokens whose output is needed (the last block only needs the target's: queries,
        # MLP and linear2 run for those alone, keys and values for all); a probe or an oracle mask
        # needs every query
        shift, scale, gate = self.modulation(vec)
        attn, act = self.attn_and_mlp(self.linear1(modulate(x, shift, scale)), pe, keep, name,
                                      probe, spans, mask)
        return torch.addcmul(x[:, keep], gate, self.linear2(torch.cat([attn, act], dim=-1)))

    def attn_and_mlp(self, y, pe, keep, name, probe, spans, mask):
        # linear1's output y -> (attention output, GELU(mlp_in)); a method so that y is freed before
        # linear2's cat
        D = (y.shape[-1] - self.mlp_hidden) // 3
        q, k, v, h = y.split([D, D, D, self.mlp_hidden], dim=-1)    # one split: backward is one cat
        return self.attend(q[:, keep], k, v, pe, keep, name, probe, spans, mask), \
            F.gelu(h[:, keep], approximate="tanh")

    def attend(self, q, k, v, pe, keep, name, probe, spans, mask):
        q, k, v = (heads(t, self.num_heads) for t in (q, k, v))        # (B, L, H, Dh)
        q = apply_rope(self.norm.query_norm(q).to(v.dtype), pe[:, keep])
        k = apply_rope(self.norm.key_norm(k).to(v.dtype), pe)
        if probe is not None:                       # as in the double blocks: a side computation
            probe(q.transpose(1, 2), k.transpose(1, 2), spans, name)
        return attention(q, k, v, mask)

class LastLayer(nn.Module):
    def __init__(self, dim, out_channels):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)   # shift first
        return self.linear(modulate(x, shift, scale))

# -----------------------------------------------------------------------------
# the DiT

class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        if D % H or sum(cfg.axes_dim) != D // H or any(d % 2 for d in cfg.axes_dim):
            raise ValueError(f"hidden_size {D} / num_heads {H} must equal sum(axes_dim) "
                             f"{cfg.axes_dim} (each even)")
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, D)
        self.time_in = MLPEmbedder(256, D)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, D)
        self.guidance_in = MLPEmbedder(256, D) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.context_in_dim, D)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(D, H, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(D, H, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(D, cfg.out_channels)
        # recompute each block in backward: activation memory ~ one block
        self.grad_checkpoint = False

    def _run(self, block, *args):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None,
                ref_img=None, ref_img_ids=None, probe=None, oracle=None):
        """
        img (B, L_img, C) packed noisy latent, img_ids (B, L_img, 3); txt (B, L_txt, C_txt), txt_ids
        (B, L_txt, 3); timesteps (B,) in [0, 1]; y (B, vec_in_dim) pooled text; guidance (B,) for
        guidance-distilled models; ref_img: list of packed reference latents (B, L_ref_i, C) with
        ref_img_ids [(B, L_ref_i, 3)] (UNO); probe: an AttentionProbe; the blocks it selects hand it
        their q, k. oracle: a Separation (experiments only): the attention mask it gives each
        selected block. Returns (B, L_img, out_channels).
        """
        if (ref_img is None) != (ref_img_ids is None):
            raise ValueError("ref_img and ref_img_ids go together")
        if torch.is_tensor(ref_img):
            ref_img, ref_img_ids = [ref_img], [ref_img_ids]
        ref_img, ref_img_ids = list(ref_img or []), list(ref_img_ids or [])
        L_txt, L_img = txt.shape[1], img.shape[1]

        vec = self.time_in(timestep_embedding(timesteps, 256))                 # (B, D)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError(
                    "this model is guidance-distilled (flux-dev): pass guidance, e.g. 3.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        # references share img_in and the image stream's weights; they follow the target tokens
        img = self.img_in(torch.cat([img] + ref_img, dim=1))                # (B, L_img + L_refs, D)
        txt = self.txt_in(txt)                                              # (B, L_txt, D)
        pe = rope(torch.cat([txt_ids, img_ids] + ref_img_ids, dim=1), self.cfg.axes_dim,
                  self.cfg.theta)

        spans = None
        if probe is not None or oracle is not None:
            start, refs = L_txt + L_img, []
            for r in ref_img:
                refs.append((start, start + r.shape[1]))
                start += r.shape[1]
            spans = Spans(txt=L_txt, img=(L_txt, L_txt + L_img), refs=refs)
        hooks = lambda name: (name, probe and probe.at(name), spans,
                              oracle and oracle.at(name, spans))
        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(block, img, txt, vec, pe, *hooks(f"d{i}"))
        x = torch.cat([txt, img], dim=1)                                         # (B, L, D)
        del txt, img                             # freed now: lower peak memory in the single blocks
        # the returned tokens: the last single block computes only those
        keep = slice(L_txt, L_txt + L_img)
        for i, block in enumerate(self.single_blocks):
            name, p, _, m = hooks(f"s{i}")
            trim = i == len(self.single_blocks) - 1 and p is None and m is None
            x = self._run(block, x, vec, pe, keep if trim else slice(None), name, p, spans, m)
        return self.final_layer(x if x.shape[1] == L_img else x[:, keep], vec)

# torch.compile's backend for compile_blocks (the suite uses aot_eager: seconds)
COMPILE_BACKEND = "inductor"

def compile_blocks(flux):
    """torch.compile the forward of every double and single block (--compile). The modules stay as
    they are (state dict keys, adapters) and their hooks run outside the compiled code
    (FSDP's gathering, stream_blocks' copies, gradient checkpointing around the call); blocks of one
    kind share their compiled code, made by the first forward (and backward). -> flux."""
    for block in (*flux.double_blocks, *flux.single_blocks):
        block.forward = torch.compile(block.forward, backend=COMPILE_BACKEND)
    return flux

# -----------------------------------------------------------------------------
# latent packing and position ids

def pack(z):
    # (B, C, h, w) latent -> (B, h/2 * w/2, C*4) tokens of 2x2 patches; feature index c*4 + ph*2 +
    # pw
    B, C, h, w = z.shape
    return z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(
        B, (h // 2) * (w // 2), C * 4)

def unpack(x, h, w):
    # inverse of pack for a latent of h x w cells
    B, _, C4 = x.shape
    return x.reshape(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        B, C4 // 4, h, w)

def grid_ids(h, w, row_offset=0, col_offset=0, batch=1, device=None):
    # position ids (batch, h*w, 3) of an h x w token grid: (0, row, col)
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None] + row_offset
    ids[..., 2] = torch.arange(w, device=device)[None, :] + col_offset
    return ids.reshape(1, h * w, 3).repeat(batch, 1, 1)

def ref_ids(target_hw, ref_hws, pe="d", batch=1, device=None):
    """UNO's position ids for references (token grids). pe='d': each reference sits diagonally
    below-right of the target and of the previous reference; 'h': shifted along rows only; 'w':
    along columns only; 'o': no shift (references overlap the target's positions)."""
    if pe not in ("d", "h", "w", "o"):
        raise ValueError(f"pe must be one of d/h/w/o, got {pe!r}")
    row, col = target_hw
    out = []
    for h, w in ref_hws:
        out.append(grid_ids(h, w, row if pe in "dh" else 0, col if pe in "dw" else 0, batch,
                            device))
        row, col = row + h, col + w
    return out

def text_ids(txt):
    # text tokens all sit at position (0, 0, 0): RoPE leaves them unrotated, as in FLUX
    return torch.zeros(txt.shape[0], txt.shape[1], 3, device=txt.device)

def prepare(img, refs=(), pe="d", txt=None, y=None):
    """The joint sequence [txt | img | ref_1 ... ref_N] as Flux.forward takes it, for every caller
    (sampling, both trainers, bench): BFL's prepare and prepare_kontext in one.
    img (B, z, h, w): the target's latent (noise when sampling, the clean image when training);
    refs: reference latents [(B, z, h_i, w_i)]; pe: UNO's reference offsets (ref_ids); txt
    (B, L_txt, C_txt), y (B, C_vec): the text encoder's outputs, or None when the caller encodes
    text later (the toy base trains its encoder inside the forward). -> dict(img (B, hw/4, 4z),
    img_ids, ref_img [(B, L_i, 4z)], ref_img_ids [(B, L_i, 3)], + txt, txt_ids, y)."""
    B, _, h, w = img.shape
    grids = [(r.shape[2] // 2, r.shape[3] // 2) for r in refs]               # reference token grids
    out = dict(img=pack(img), img_ids=grid_ids(h // 2, w // 2, batch=B, device=img.device),
               ref_img=[pack(r) for r in refs],
               ref_img_ids=ref_ids((h // 2, w // 2), grids, pe, B, img.device))
    if txt is not None:
        out.update(txt=txt, txt_ids=text_ids(txt), y=y)
    return out

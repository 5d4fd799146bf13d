"""
FLUX.2 ([klein] 4B / 9B, their undistilled Base, [dev]) written from scratch in plain PyTorch: the
second model family beside model.py's FLUX.1, built from the same parts (RoPE, QK-RMSNorm, the
attention hook, the probe, the AE's layers, the strict loader) so that the method (probe, L_attn,
adapters, IPPO) carries over unchanged.

What differs from FLUX.1 (black-forest-labs/flux2 src/flux2/model.py; diffusers'
transformer_flux2.py is the oracle):
  - no biases anywhere; no per-block modulation: one for all double blocks (img and txt), one for
    all single blocks
  - SwiGLU MLPs at ratio 3 (the input projection is twice as wide); the single block's fused linear1
    gives q | k | v | SwiGLU's two halves
  - RoPE over 4 axes (t, h, w, l) with theta 2000: text on l, references at t = 10 (i + 1)
  - no pooled text vector: the text is a causal LM's hidden states after three layers, stacked per
    token
  - 128-channel tokens from a 32-channel AE (2x2 patches), normalized by the AE's latent batch-norm
    statistics
  - its own schedule: an empirical mu from the image's token count and the number of steps
  - klein-9B-KV: references attend only to themselves at a fixed t = 0, so their K/V are computed
    once per sample

Forward and prepare keep model.py's signatures, get_schedule, sampling_inputs and denoise
sampling.py's (a pooled `y` is accepted and unused), so the trainers and the sampler call either
family the same way, through `family(cfg)`.
State-dict keys are BFL's (flux-2-klein-base-4b.safetensors, ae.safetensors), loaded strictly.
"""
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import encoders as EN
import model as M
import sampling as SM
import weights as WT

# -----------------------------------------------------------------------------
# config

def flux2_ae():
    # BFL's AutoEncoderParams for FLUX.2: FLUX.1's layout with 32 latent channels; no scale/shift
    # factors (the latent batch-norm statistics normalize instead)
    return M.AutoEncoderConfig(z_channels=32, scale_factor=1.0, shift_factor=0.0)

@dataclass
class Flux2Config:
    # the DiT, with BFL's Flux2Params names
    in_channels: int = 128              # 2x2 patches of the 32-channel latent
    context_in_dim: int = 7680      # 3 stacked hidden states of the text model (Qwen3-4B: 3 x 2560)
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5                      # double stream blocks
    depth_single_blocks: int = 20
    axes_dim: tuple = (32, 32, 32, 32)  # RoPE dims per position axis (t, h, w, l); sums to head_dim
    theta: int = 2000
    mlp_ratio: float = 3.0
    # dev is guidance-distilled (an embedded guidance input); klein is not
    guidance_embed: bool = False
    ref_kv: bool = False     # klein-9B-KV: references attend only to themselves, modulated at t = 0
    # the text model: a causal LM through transformers, its hidden states after these layers stacked
    # per token
    text_encoder: str = "qwen3"   # or "mistral3" (dev: Mistral-Small-3.2 with BFL's system message)
    text_repo: str = "Qwen/Qwen3-4B"
    text_layers: tuple = (9, 18, 27)
    max_txt_len: int = 512
    vec_in_dim: int = 0                 # no pooled text vector: the text encoder's y is (B, 0)
    ae: M.AutoEncoderConfig = field(default_factory=flux2_ae)
    repo_id: str = ""                   # Hugging Face repo holding flow_file
    flow_file: str = ""
    # BFL's ae.safetensors (Apache-2.0) lives in the dev repo
    ae_repo: str = "black-forest-labs/FLUX.2-dev"
    ae_file: str = "ae.safetensors"
    # the preset's defaults, read by sample.py, train_sft.py and train_rl.py alike
    pe: str = "t"             # reference positions: FLUX.2's own (t axis), or UNO's offsets d/h/w/o
    image_size: int = 512
    ref_size: int = 320
    sample_steps: int = 50
    shift_schedule: bool = True         # the empirical-mu shift toward noise (get_schedule)
    guidance: float = 1.0               # embedded guidance (dev: 4; klein has no guidance input)
    ref_guidance: float = 1.0
    # classifier-free guidance on the prompt (Base: 4; distilled models: 1)
    text_guidance: float = 4.0

    @property
    def out_channels(self):
        return self.in_channels

    @property
    def token_px(self):
        return 2 * self.ae.factor

def klein(size, base=False, kv=False):
    # the klein checkpoints: 4B (Apache-2.0) on Qwen3-4B, 9B (FLUX non-commercial) on Qwen3-8B. The
    # distilled ones sample in 4 steps without guidance, Base in 50 with classifier-free guidance 4
    # (BFL's defaults)
    arch = (dict(context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5,
                 depth_single_blocks=20, text_repo="Qwen/Qwen3-4B") if size == "4b" else
            dict(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8,
                 depth_single_blocks=24, text_repo="Qwen/Qwen3-8B"))
    steps = (dict(sample_steps=50, text_guidance=4.0) if base
             else dict(sample_steps=4, text_guidance=1.0))
    base, kv_tag = "base-" if base else "", "-kv" if kv else ""
    return Flux2Config(**arch, **steps, ref_kv=kv,
                       repo_id=f"black-forest-labs/FLUX.2-klein-{base}{size.upper()}{kv_tag}",
                       flow_file=f"flux-2-klein-{base}{size}{kv_tag}.safetensors")

CONFIGS = {
    "klein-4b": klein("4b"),
    "klein-base-4b": klein("4b", base=True),
    "klein-9b": klein("9b"),
    "klein-base-9b": klein("9b", base=True),
    "klein-9b-kv": klein("9b", kv=True),
    "flux2-dev": Flux2Config(context_in_dim=15360, hidden_size=6144, num_heads=48, depth=8,
                             depth_single_blocks=48, guidance_embed=True, text_encoder="mistral3",
                             text_repo="mistralai/Mistral-Small-3.2-24B-Instruct-2506",
                             text_layers=(10, 20, 30), repo_id="black-forest-labs/FLUX.2-dev",
                             flow_file="flux2-dev.safetensors", guidance=4.0, text_guidance=1.0),
}
def presets():
    # every preset the scripts take, both families
    return sorted(M.CONFIGS) + sorted(CONFIGS)

def get_config(name, **overrides):
    """A preset of either family: FLUX.2's here, FLUX.1's and the toy's from model.py."""
    if name in CONFIGS:
        return replace(CONFIGS[name], **overrides)
    if name in M.CONFIGS:
        return M.get_config(name, **overrides)
    raise ValueError(f"unknown model preset {name!r}; choose one of {presets()}")

def is_flux2(cfg):
    return isinstance(cfg, Flux2Config)

def dit(cfg):
    """An untrained DiT of cfg's family (on the current default device: meta for shapes only)."""
    return Flux2(cfg) if is_flux2(cfg) else M.Flux(cfg)

def default_pe(cfg):
    # where references sit when no --pe is given: FLUX.2's own t axis, UNO's diagonal offsets for
    # FLUX.1
    return cfg.pe if is_flux2(cfg) else "d"

# -----------------------------------------------------------------------------
# small pieces (no biases)

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))

class Modulation(nn.Module):
    """vec (B, D) -> (B, 1, n*3*D): n (shift, scale, gate) triples, computed once per forward and
    shared by every block of a kind (double: n = 2, attention and MLP; single: n = 1)."""
    def __init__(self, dim, double):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim, bias=False)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :]

class SwiGLU(nn.Module):
    # silu(first half) * second half: the MLP's input projection is twice its hidden width
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b

def mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(),
                         nn.Linear(hidden, dim, bias=False))

class SelfAttention(nn.Module):
    # a container for BFL's key names (qkv, norm, proj); the double block uses its parts
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = M.QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x):
        # [q heads | k heads | v heads] -> each (B, L, H, Dh), q and k RMS-normalized
        q, k, v = (M.heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.norm.query_norm(q).to(v.dtype), self.norm.key_norm(k).to(v.dtype), v

# -----------------------------------------------------------------------------
# attention, with the references' K/V kept once computed (klein-9B-KV)

class RefKV:
    """The references' keys and values in every block (post-norm, post-RoPE), for a model with
    ref_kv: they attend only to themselves at a fixed t = 0, so nothing a denoising step changes
    reaches them. The first forward given references fills it (and runs them); later forwards given
    it instead of references read it."""
    def __init__(self):
        self.k, self.v = {}, {}    # block name -> (B, L_refs, H, Dh)
        self.n_ref = 0             # reference tokens in the running forward's sequence (0: reading)

    def filled(self):
        return bool(self.k)

def attend(q, k, v, mask=None, kv=None, name=""):
    """Every block's attention, through model.attention. q (B, Lq, H, D), k, v (B, L, H, D) ->
    (B, Lq, H*D). kv filling (n_ref > 0): the sequence's last n_ref tokens are the references; they
    see only each other, the rest sees everything, and the references' k, v are kept under `name`.
    kv filled: the kept k, v are appended."""
    if kv is None:
        return M.attention(q, k, v, mask)
    if kv.n_ref:
        n = k.shape[1] - kv.n_ref
        kv.k[name], kv.v[name] = k[:, n:], v[:, n:]
        return torch.cat([M.attention(q[:, :n], k, v), M.attention(q[:, n:], k[:, n:], v[:, n:])],
                         dim=1)
    return M.attention(q, torch.cat([k, kv.k[name]], dim=1), torch.cat([v, kv.v[name]], dim=1))

# -----------------------------------------------------------------------------
# transformer blocks

class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, mixed by one joint attention; modulated from
    outside."""
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_attn, self.txt_attn = SelfAttention(dim, num_heads), SelfAttention(dim, num_heads)
        self.img_mlp, self.txt_mlp = mlp(dim, hidden), mlp(dim, hidden)

    def forward(self, img, txt, mod_img, mod_txt, pe, name="", probe=None, spans=None, mask=None,
                kv=None):
        # img (B, L_img + L_refs, D): target then reference tokens; txt (B, L_txt, D); mod_*:
        # (B, 1 or L, 6 D)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mod_img.chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod_txt.chunk(6, dim=-1)
        txt_attn, img_attn = self.attend(M.modulate(img, i_shift1, i_scale1),
                                         M.modulate(txt, t_shift1, t_scale1),
                                         pe, name, probe, spans, mask, kv)
        img = torch.addcmul(img, i_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, i_gate2, self.img_mlp(M.modulate(img, i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(M.modulate(txt, t_shift2, t_scale2)))
        return img, txt

    def attend(self, img, txt, pe, name, probe, spans, mask, kv):
        # joint attention over [txt | img | refs] -> its (txt, img) parts; q, k, v freed on return
        img_q, img_k, img_v = self.img_attn.qkv_heads(img)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt)
        q = M.apply_rope(torch.cat([txt_q, img_q], dim=1), pe)          # (B, L, H, Dh), text first
        k = M.apply_rope(torch.cat([txt_k, img_k], dim=1), pe)
        v = torch.cat([txt_v, img_v], dim=1)
        if probe is not None:                 # a side computation; the attention below is unchanged
            probe(q.transpose(1, 2), k.transpose(1, 2), spans, name)
        return attend(q, k, v, mask, kv, name).split([txt.shape[1], img.shape[1]], dim=1)

class SingleStreamBlock(nn.Module):
    """One stream over [txt | img | refs]: attention and SwiGLU MLP in parallel from one fused input
    projection."""
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads, self.mlp_hidden = num_heads, int(dim * mlp_ratio)
        # q | k | v | gate | value
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim, bias=False)  # attn_out | swiglu -> out
        self.norm = M.QKNorm(dim // num_heads)

    def forward(self, x, mod, pe, keep=slice(None), name="", probe=None, spans=None, mask=None,
                kv=None):
        # keep: the tokens whose output is needed (the last block: the target's; modulation then is
        # per-forward)
        shift, scale, gate = mod.chunk(3, dim=-1)
        attn, act = self.attn_and_mlp(self.linear1(M.modulate(x, shift, scale)), pe, keep, name,
                                      probe, spans, mask, kv)
        return torch.addcmul(x[:, keep], gate, self.linear2(torch.cat([attn, act], dim=-1)))

    def attn_and_mlp(self, y, pe, keep, name, probe, spans, mask, kv):
        D = (y.shape[-1] - 2 * self.mlp_hidden) // 3
        q, k, v, h = y.split([D, D, D, 2 * self.mlp_hidden], dim=-1)
        q, k, v = (M.heads(t, self.num_heads) for t in (q[:, keep], k, v))          # (B, L, H, Dh)
        q = M.apply_rope(self.norm.query_norm(q).to(v.dtype), pe[:, keep])
        k = M.apply_rope(self.norm.key_norm(k).to(v.dtype), pe)
        if probe is not None:
            probe(q.transpose(1, 2), k.transpose(1, 2), spans, name)
        return attend(q, k, v, mask, kv, name), SwiGLU()(h[:, keep])

class LastLayer(nn.Module):
    def __init__(self, dim, out_channels):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)   # shift first
        return self.linear(M.modulate(x, shift, scale))

# -----------------------------------------------------------------------------
# the DiT

def per_token(mod, ref_mod, n_img, n_ref):
    # (B, 1, C) modulations -> (B, n_img + n_ref, C): the target's for its tokens, ref_mod for the
    # references'
    B = mod.shape[0]
    return torch.cat([mod.expand(B, n_img, -1), ref_mod.expand(B, n_ref, -1)], dim=1)

class Flux2(nn.Module):
    def __init__(self, cfg: Flux2Config):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        if (D % H or sum(cfg.axes_dim) != D // H or any(d % 2 for d in cfg.axes_dim)
            or len(cfg.axes_dim) != 4):
            raise ValueError(f"hidden_size {D} / num_heads {H} must equal sum(axes_dim) "
                             f"{cfg.axes_dim} (4 even axes)")
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, D, bias=False)
        self.txt_in = nn.Linear(cfg.context_in_dim, D, bias=False)
        self.time_in = MLPEmbedder(256, D)
        self.guidance_in = MLPEmbedder(256, D) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(D, H, cfg.mlp_ratio)
                                           for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(D, H, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks))
        self.double_stream_modulation_img = Modulation(D, double=True)
        self.double_stream_modulation_txt = Modulation(D, double=True)
        self.single_stream_modulation = Modulation(D, double=False)
        self.final_layer = LastLayer(D, cfg.out_channels)
        # recompute each block in backward: activation memory ~ one block
        self.grad_checkpoint = False

    def _run(self, block, *args):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed_time(self, timesteps, guidance):
        vec = self.time_in(M.timestep_embedding(timesteps, 256))                # (B, D)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError(
                    "this model is guidance-distilled (flux2-dev): pass guidance, e.g. 4")
            vec = vec + self.guidance_in(M.timestep_embedding(guidance, 256))
        return vec

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None,
                ref_img=None, ref_img_ids=None, probe=None, oracle=None, kv=None):
        """
        img (B, L_img, 128) packed noisy latent, img_ids (B, L_img, 4); txt (B, L_txt,
        context_in_dim), txt_ids (B, L_txt, 4); timesteps (B,) in [0, 1]; y: unused (FLUX.2 has no
        pooled text vector; model.Flux's signature); guidance (B,) for flux2-dev; ref_img /
        ref_img_ids: lists of packed references (B, L_i, 128) and their ids (B, L_i, 4); probe,
        oracle: as model.Flux's. kv: a RefKV, for a model with ref_kv only: given with references it
        is filled, given without them it stands in for them. Returns (B, L_img, 128).
        """
        if (ref_img is None) != (ref_img_ids is None):
            raise ValueError("ref_img and ref_img_ids go together")
        ref_img, ref_img_ids = list(ref_img or []), list(ref_img_ids or [])
        if kv is not None and not self.cfg.ref_kv:
            raise ValueError(
                "reference K/V caching needs a model trained for it (a ref_kv preset: klein-9b-kv)")
        if self.cfg.ref_kv and ref_img and kv is None:
            kv = RefKV()       # uncached: references still see only each other; this K/V is dropped
        if kv is not None and (probe is not None or oracle is not None):
            raise ValueError("the probe and the oracle assume joint attention: not on a "
                             "ref_kv model's references")
        if kv is not None:
            if kv.filled() == bool(ref_img):
                raise ValueError(
                    "a filled RefKV stands in for the references: pass one or the other")
            kv.n_ref = sum(r.shape[1] for r in ref_img)
        L_txt, L_img, L_ref = txt.shape[1], img.shape[1], sum(r.shape[1] for r in ref_img)

        vec = self.embed_time(timesteps, guidance)                              # (B, D)
        mod_img, mod_txt = (self.double_stream_modulation_img(vec),
                            self.double_stream_modulation_txt(vec))
        mod_single = self.single_stream_modulation(vec)                         # (B, 1, 3 D)
        if self.cfg.ref_kv and L_ref:
            # the references are modulated at t = 0 whatever the step (klein-9B-KV): nothing
            # step-dependent in them
            ref_vec = self.embed_time(torch.zeros_like(timesteps), guidance)
            mod_img = per_token(mod_img, self.double_stream_modulation_img(ref_vec), L_img, L_ref)
            mod_single = per_token(mod_single, self.single_stream_modulation(ref_vec),
                                   L_txt + L_img, L_ref)
        # references share img_in and the image stream's weights; they follow the target tokens
        img = self.img_in(torch.cat([img] + ref_img, dim=1))                 # (B, L_img + L_ref, D)
        txt = self.txt_in(txt)                                               # (B, L_txt, D)
        pe = M.rope(torch.cat([txt_ids, img_ids] + ref_img_ids, dim=1), self.cfg.axes_dim,
                    self.cfg.theta)

        spans = None
        if probe is not None or oracle is not None:
            start, refs = L_txt + L_img, []
            for r in ref_img:
                refs.append((start, start + r.shape[1]))
                start += r.shape[1]
            spans = M.Spans(txt=L_txt, img=(L_txt, L_txt + L_img), refs=refs)
        hooks = lambda name: (name, probe and probe.at(name), spans,
                              oracle and oracle.at(name, spans), kv)
        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(block, img, txt, mod_img, mod_txt, pe, *hooks(f"d{i}"))
        x = torch.cat([txt, img], dim=1)                                         # (B, L, D)
        del txt, img
        keep = slice(L_txt, L_txt + L_img)
        for i, block in enumerate(self.single_blocks):
            name, p, _, m, _ = hooks(f"s{i}")
            trim = (i == len(self.single_blocks) - 1 and p is None and m is None
                    and mod_single.shape[1] == 1 and not (kv is not None and kv.n_ref))
            x = self._run(block, x, mod_single, pe, keep if trim else slice(None), name, p, spans,
                          m, kv)
        if kv is not None:
            kv.n_ref = 0
        return self.final_layer(x if x.shape[1] == L_img else x[:, keep], vec)

class CachedRefs:
    """A ref_kv model for sampling (what sampling.denoise calls): the first call given references
    fills a RefKV, every later call given references reads it instead (their K/V do not depend on
    the step, the noisy image or the prompt); calls without references run as they are."""
    def __init__(self, flux):
        self.flux, self.kv = flux, RefKV()

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None, ref_img=None,
                 ref_img_ids=None, **kw):
        if not ref_img:
            return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance, **kw)
        if self.kv.filled():
            return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance, kv=self.kv, **kw)
        return self.flux(img, img_ids, txt, txt_ids, timesteps, y, guidance, ref_img, ref_img_ids,
                         kv=self.kv, **kw)

# -----------------------------------------------------------------------------
# position ids (t, h, w, l) and the joint sequence

def grid_ids(h, w, t=0, batch=1, device=None):
    # position ids (batch, h*w, 4) of an h x w token grid: (t, row, col, 0)
    ids = torch.zeros(h, w, 4, device=device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 4).repeat(batch, 1, 1)

def ref_ids(target_hw, ref_hws, pe="t", batch=1, device=None):
    """Position ids of reference token grids. pe='t': FLUX.2's own, reference i a grid of its own at
    t = 10 (i + 1) (BFL's scale 10); d/h/w/o: UNO's offsets on the h, w axes at t = 0
    (model.ref_ids)."""
    if pe == "t":
        return [grid_ids(h, w, 10 * (i + 1), batch, device) for i, (h, w) in enumerate(ref_hws)]
    # l = 0 appended
    return [F.pad(r, (0, 1)) for r in M.ref_ids(target_hw, ref_hws, pe, batch, device)]

def text_ids(txt):
    # text tokens at (0, 0, 0, l): their order is the l axis
    B, L = txt.shape[:2]
    ids = torch.zeros(B, L, 4, device=txt.device)
    ids[..., 3] = torch.arange(L, device=txt.device)
    return ids

def prepare(img, refs=(), pe="t", txt=None, y=None):
    """model.prepare for FLUX.2: the joint sequence [txt | img | ref_1 ... ref_N] with 4-axis ids.
    img (B, 32, h, w) the target's normalized latent; refs [(B, 32, h_i, w_i)]; txt
    (B, L_txt, C_txt) or None; y the encoder's empty pooled vector, passed through. ->
    dict(img (B, hw/4, 128), img_ids, ref_img, ref_img_ids, ...)."""
    B, _, h, w = img.shape
    grids = [(r.shape[2] // 2, r.shape[3] // 2) for r in refs]
    out = dict(img=M.pack(img), img_ids=grid_ids(h // 2, w // 2, batch=B, device=img.device),
               ref_img=[M.pack(r) for r in refs],
               ref_img_ids=ref_ids((h // 2, w // 2), grids, pe, B, img.device))
    if txt is not None:
        out.update(txt=txt, txt_ids=text_ids(txt), y=y)
    return out

# -----------------------------------------------------------------------------
# the FLUX.2 autoencoder: FLUX.1's encoder and decoder with 1x1 (post-)quant convolutions, and
# latent statistics

class Encoder(EN.Encoder):
    def __init__(self, p):
        super().__init__(p)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1)

    def forward(self, x):
        return self.quant_conv(super().forward(x))

class Decoder(EN.Decoder):
    def __init__(self, p):
        super().__init__(p)
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, 1)

    def forward(self, z):
        return super().forward(self.post_quant_conv(z))

class LatentNorm(nn.Module):
    """The running statistics of BFL's affine-free BatchNorm2d over 2x2-patched latents
    (4 z channels), always in eval mode: z -> (z - mean) / sqrt(var + 1e-4) per patched channel."""
    eps = 1e-4

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def stats(self, z):
        shape = (1, -1, 1, 1)
        return (self.running_mean.float().view(shape),
                (self.running_var.float().view(shape) + self.eps).sqrt())

def patchify(z):
    # (B, C, h, w) -> (B, 4C, h/2, w/2), channel c*4 + ph*2 + pw (the feature order of model.pack)
    B, C, h, w = z.shape
    return z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(
        B, 4 * C, h // 2, w // 2)

def unpatchify(z):
    B, C4, h, w = z.shape
    return z.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(
        B, C4 // 4, 2 * h, 2 * w)

class AutoEncoder(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> normalized latents (B, 32, H/8, W/8). The normalization
    acts on 2x2 patches (BFL normalizes the 128-channel patched latent); the latent keeps
    encoders.AutoEncoder's layout, so model.pack turns it into exactly BFL's tokens."""
    def __init__(self, p: M.AutoEncoderConfig):
        super().__init__()
        self.p = p
        self.encoder, self.decoder = Encoder(p), Decoder(p)
        self.bn = LatentNorm(4 * p.z_channels)
        if p.factor != 2 ** (len(p.ch_mult) - 1):
            raise ValueError(f"AE factor {p.factor} does not match ch_mult {p.ch_mult}")

    def encode(self, x):
        mean = self.encoder(x).chunk(2, dim=1)[0]                 # the posterior's mean
        m, s = self.bn.stats(mean)
        return unpatchify((M.fp32(patchify(mean)) - m) / s).to(mean.dtype)

    def decode(self, z):
        m, s = self.bn.stats(z)
        return self.decoder(unpatchify(M.fp32(patchify(z)) * s + m).to(z.dtype))

# -----------------------------------------------------------------------------
# text conditioning: a causal LM's hidden states after three layers, stacked per token (the klein
# pipeline's)

# BFL's system message for FLUX.2 [dev]'s Mistral encoder (black-forest-labs/flux2
# src/flux2/system_messages.py)
MISTRAL_SYSTEM = ("You are an AI that reasons about image descriptions. You give structured "
                  "responses focusing on object relationships, object\nattribution and "
                  "actions without speculation.")

class TextEncoder(nn.Module):
    """Prompts -> (txt (B, max_txt_len, 3 * hidden), y (B, 0)): each prompt in the model's chat
    format, padded to max_txt_len, through the LM; the hidden states after cfg.text_layers
    concatenated per token, layer by layer. y is empty (FLUX.2 has no pooled vector): callers keep
    one code path for both families."""
    def __init__(self, cfg: Flux2Config, path=None, dtype=torch.bfloat16):
        super().__init__()
        from transformers import (AutoModelForCausalLM, AutoProcessor, AutoTokenizer,
                                  Mistral3ForConditionalGeneration)
        self.cfg, self.max_len, self.truncated = cfg, cfg.max_txt_len, 0
        folder = WT.check_weights(weights(cfg, ("text",), text=path))[0]
        try:
            if cfg.text_encoder == "mistral3":
                self.tok = AutoProcessor.from_pretrained(folder)
                self.lm = Mistral3ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
            else:
                self.tok = AutoTokenizer.from_pretrained(folder)
                self.lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except OSError as e:
            raise WT.CheckpointError("could not load the text model: "
                                     f"{str(e).splitlines()[0]}") from None
        self.lm.eval().requires_grad_(False)

    def chat(self, prompt):
        # klein: the user turn alone, a generation prompt, thinking off; dev: BFL's system message
        # first
        if self.cfg.text_encoder == "mistral3":
            return self.tok.apply_chat_template(
                [{"role": "system", "content": [{"type": "text", "text": MISTRAL_SYSTEM}]},
                 {"role": "user", "content": [{"type": "text",
                                               "text": prompt.replace("[IMG]", "")}]}],
                tokenize=False, add_generation_prompt=False)
        return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=False)

    @torch.no_grad()
    def forward(self, prompts):
        texts = [self.chat(p) for p in prompts]
        tok = getattr(self.tok, "tokenizer", self.tok)             # a processor holds its tokenizer
        EN.note_truncation(self, [len(tok(t).input_ids) for t in texts], prompts)
        t = tok(texts, padding="max_length", truncation=True, max_length=self.max_len,
                return_tensors="pt")
        dev = self.lm.device
        out = self.lm(input_ids=t.input_ids.to(dev), attention_mask=t.attention_mask.to(dev),
                      output_hidden_states=True, use_cache=False)
        # (B, L, 3 hidden)
        txt = torch.cat([out.hidden_states[k] for k in self.cfg.text_layers], dim=-1)
        return txt, txt.new_zeros(txt.shape[0], 0)

# -----------------------------------------------------------------------------
# the schedule: BFL's empirical mu, then FLUX.1's time shift

def empirical_mu(image_seq_len, num_steps):
    """BFL's compute_empirical_mu: mu linear in the image's token count, interpolated in the number
    of steps between fits at 10 and 200 steps (above 4300 tokens, the 200-step fit alone)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)

def get_schedule(num_steps, image_seq_len, shift=True):
    """num_steps + 1 timesteps from 1 to 0 (python floats, computed in fp32 like BFL)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        timesteps = SM.time_shift(empirical_mu(image_seq_len, num_steps), 1.0, timesteps)
    return timesteps.tolist()

def train_mu(cfg, image_seq_len):
    """The shift of training's timesteps (losses.sample_timesteps): the one sampling uses at the
    preset's step count, so training sees the noise levels sampling visits; None: FLUX.1's own."""
    return empirical_mu(image_seq_len, cfg.sample_steps) if is_flux2(cfg) else None

# -----------------------------------------------------------------------------
# sampling: sampling.py's, with this family's joint sequence and, where the model allows, the
# references' K/V kept

def sampling_inputs(cfg, ae, text_encoder, prompt, refs, width, height, seed, pe="t", device="cpu",
                    null_text=False):
    """sampling.sampling_inputs, the sequence laid out by this module's prepare."""
    return SM.sampling_inputs(cfg, ae, text_encoder, prompt, refs, width, height, seed, pe, device,
                              null_text, layout=prepare)

def denoise(model, *args, **kw):
    """sampling.denoise; a ref_kv model computes its references' K/V once (CachedRefs), not at
    every step."""
    return SM.denoise(CachedRefs(model) if model.cfg.ref_kv else model, *args, **kw)

# -----------------------------------------------------------------------------
# the family: what differs between FLUX.1 and FLUX.2 for the trainers and the sampler

@dataclass(frozen=True)
class Family:
    # each with the signature of model.py's (prepare, the position ids) or sampling.py's (the rest)
    prepare: object
    text_ids: object
    grid_ids: object
    ref_ids: object
    get_schedule: object
    sampling_inputs: object
    denoise: object

def family(cfg):
    """cfg's family: this module's functions for FLUX.2; model.py's joint sequence and sampling.py's
    sampler for FLUX.1 and the toy (looked up at each call, as a module's attributes are)."""
    if is_flux2(cfg):
        return Family(prepare, text_ids, grid_ids, ref_ids, get_schedule, sampling_inputs, denoise)
    return Family(M.prepare, M.text_ids, M.grid_ids, M.ref_ids, SM.get_schedule, SM.sampling_inputs,
                  SM.denoise)

# -----------------------------------------------------------------------------
# weights: where each comes from, on weights.py's machinery (Weight, check_weights, strict loading)

WEIGHT_ENV = {"dit": "MULTICRAFTER_DIT", "ae": "MULTICRAFTER_AE", "text": "MULTICRAFTER_TEXT"}
WEIGHT_FLAGS = {"ae": "--ae", "text": "--text-model"}

def weights(cfg, parts=("dit", "ae", "text"), dit=None, ae=None, text=None, dit_flag="--model"):
    """The weights a FLUX.2 command needs, each from its flag's value (the keyword), else its
    environment variable, else the preset's repo. -> [weights.Weight] in the order of parts."""
    given = dict(dit=dit, ae=ae, text=text)
    default = dict(dit=(cfg.repo_id, cfg.flow_file, "the DiT"),
                   ae=(cfg.ae_repo, cfg.ae_file, "the AutoEncoder"),
                   text=(cfg.text_repo, None, f"the text model {cfg.text_repo.split('/')[-1]}"))
    out = []
    for part in parts:
        repo, file, what = default[part]
        source = given[part] or os.environ.get(WEIGHT_ENV[part]) or repo
        out.append(WT.Weight(what, source, file, WEIGHT_FLAGS.get(part, dit_flag),
                             WEIGHT_ENV[part]))
    return out

def load_flux(cfg, path=None, device="cpu", dtype=torch.bfloat16):
    """The DiT from `path` (file, folder or repo id; default: $MULTICRAFTER_DIT, else the preset's
    repo)."""
    path = WT.check_weights(weights(cfg, ("dit",), dit=path))[0]
    with torch.device("meta"):
        model = Flux2(cfg)
    return WT.load_state_dict_strict(model, path, device, dtype).eval()

def load_ae(cfg, path=None, device="cpu", dtype=torch.float32):
    """The AutoEncoder from `path` (default: $MULTICRAFTER_AE, else BFL's ae.safetensors)."""
    path = WT.check_weights(weights(cfg, ("ae",), ae=path))[0]
    with torch.device("meta"):
        ae = AutoEncoder(cfg.ae)
    # BatchNorm2d's step counter: kept by some copies, unused
    if "bn.num_batches_tracked" in WT.read_header(path):
        ae.bn.register_buffer("num_batches_tracked",
                              torch.zeros((), dtype=torch.long, device="meta"))
    return WT.load_state_dict_strict(ae, path, device, dtype).eval()

def load_models(cfg, dit=None, ae=None, text=None, device="cpu", dtype=torch.bfloat16,
                parts=("dit", "ae", "text"), dit_flag="--model"):
    """The DiT, AE and text encoder a command needs (parts), every missing weight listed at once
    before the first loads. -> (flux, ae, text encoder), None for a part not asked for."""
    WT.check_weights(weights(cfg, parts, dit, ae, text, dit_flag))
    return (load_flux(cfg, dit, device, dtype) if "dit" in parts else None,
            load_ae(cfg, ae, device, dtype) if "ae" in parts else None,
            TextEncoder(cfg, text, dtype).to(device) if "text" in parts else None)

# -----------------------------------------------------------------------------
# diffusers' FLUX.2 LoRA layout (Flux2Transformer2DModel.load_lora_adapter), for
# moe_lora.export_diffusers

# our Linear (inside block i) -> diffusers' Linears it becomes, each with the rows of ours it takes
# (in units of the hidden size D; None: all). diffusers keeps the single block's linear1 fused
# (to_qkv_mlp_proj): a LoRA on its q|k|v rows only exports with zero rows for the MLP part
DIFFUSERS_DOUBLE = {"img_attn.qkv": [("attn.to_q", 0), ("attn.to_k", 1), ("attn.to_v", 2)],
                    "txt_attn.qkv": [("attn.add_q_proj", 0), ("attn.add_k_proj", 1),
                                     ("attn.add_v_proj", 2)],
                    "img_attn.proj": [("attn.to_out.0", None)],
                    "txt_attn.proj": [("attn.to_add_out", None)],
                    "img_mlp.0": [("ff.linear_in", None)], "img_mlp.2": [("ff.linear_out", None)],
                    "txt_mlp.0": [("ff_context.linear_in", None)],
                    "txt_mlp.2": [("ff_context.linear_out", None)]}
DIFFUSERS_SINGLE = {"linear1": [("attn.to_qkv_mlp_proj", None)], "linear2": [("attn.to_out", None)]}

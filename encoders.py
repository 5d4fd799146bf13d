"""
The encoders around the DiT: the FLUX AutoEncoder (BFL's, with the toy preset's parameter-free
pixel-unshuffle stand-in) and text conditioning (T5-XXL + CLIP-L through transformers, or the toy's
tiny byte-level encoder). Their state-dict keys equal the official ae.safetensors and the
transformers checkpoints; weights.py finds and loads them. As BFL splits them out of the DiT
(modules/autoencoder.py, modules/conditioner.py); FLUX.2's AE builds on these blocks (flux2.py).
"""
import sys
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M

# -----------------------------------------------------------------------------
# the FLUX autoencoder (official AutoEncoder, deterministic encode = latent mean)

def norm32(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)

class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm32(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm32(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h

class AttnBlock(nn.Module):
    # single-head self-attention over the h*w positions, 1x1 convolutions as projections
    def __init__(self, c):
        super().__init__()
        self.norm = norm32(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, h, w = x.shape
        n = self.norm(x)
        # (B, hw, 1, C) each: one head of width C
        q, k, v = (m(n).flatten(2).transpose(1, 2)[:, :, None] for m in (self.q, self.k, self.v))
        # through the one attention hook, so that swapping it (bench.py memory) reaches the AE's too
        a = M.attention(q, k, v).transpose(1, 2).reshape(B, C, h, w)
        return x + self.proj_out(a)

class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))          # asymmetric pad: right and bottom

class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

class MidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))

class Encoder(nn.Module):
    def __init__(self, p: M.AutoEncoderConfig):
        super().__init__()
        chans = [p.ch * m for m in (1,) + tuple(p.ch_mult)]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(p.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(chans[i] if j == 0 else chans[i + 1],
                                                    chans[i + 1])
                                        for j in range(p.num_res_blocks))
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(chans[i + 1])
            self.down.append(level)
        self.mid = MidBlock(chans[-1])
        self.norm_out = norm32(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * p.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

class Decoder(nn.Module):
    def __init__(self, p: M.AutoEncoderConfig):
        super().__init__()
        chans = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1])
        # up[i] works at the resolution of encoder level i: up[-1] runs first (official key layout)
        self.up = nn.ModuleList()
        cin = chans[-1]
        levels = []
        for i in reversed(range(len(p.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else chans[i], chans[i])
                                        for j in range(p.num_res_blocks + 1))
            cin = chans[i]
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up.extend(levels)
        self.norm_out = norm32(chans[0])
        self.conv_out = nn.Conv2d(chans[0], p.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

class AutoEncoder(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> latents (B, z_channels, H/factor, W/factor).
    ch_mult=() is the toy stand-in: pixel-unshuffle, no parameters, exact inverse."""
    def __init__(self, p: M.AutoEncoderConfig):
        super().__init__()
        self.p = p
        if p.ch_mult:
            self.encoder, self.decoder = Encoder(p), Decoder(p)
            if p.factor != 2 ** (len(p.ch_mult) - 1):
                raise ValueError(f"AE factor {p.factor} does not match ch_mult {p.ch_mult}")
        elif p.z_channels != p.in_channels * p.factor ** 2:
            raise ValueError("pixel-unshuffle AE needs z_channels = in_channels * factor**2")

    def encode(self, x):
        if not self.p.ch_mult:
            return F.pixel_unshuffle(x, self.p.factor)
        # the posterior's mean; its log-variance is unused
        mean = self.encoder(x).chunk(2, dim=1)[0]
        return self.p.scale_factor * (mean - self.p.shift_factor)

    def decode(self, z):
        if not self.p.ch_mult:
            return F.pixel_shuffle(z, self.p.factor)
        return self.decoder(z / self.p.scale_factor + self.p.shift_factor)

# -----------------------------------------------------------------------------
# text conditioning

def note_truncation(encoder, lengths, prompts):
    """Prompts longer than the encoder's max_len are cut there: warn the first time, count every one
    (truncated)."""
    long = [(n, p) for n, p in zip(lengths, prompts) if n > encoder.max_len]
    if long and not encoder.truncated:
        n, p = long[0]
        print(f"warning: a prompt of {n} tokens is cut to the text encoder's {encoder.max_len} "
              f"({p[:40]!r}...); later ones are only counted", file=sys.stderr)
    encoder.truncated += len(long)

@contextmanager
def mha_fastpath(enabled):
    # torch.backends.mha's global switch, set for a block and restored
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)

class ByteTextEncoder(nn.Module):
    """Tokenizer-free text encoder for the toy preset: UTF-8 bytes -> a small transformer.
    Returns the sequence (B, max_len, context_in_dim) and a pooled vector (B, vec_in_dim), like T5 +
    CLIP."""
    def __init__(self, cfg: M.FluxConfig, dim=64, layers=2, heads=4):
        super().__init__()
        self.max_len, self.truncated = cfg.max_txt_len, 0
        if cfg.txt_pad not in ("max", "longest"):
            raise ValueError(f"txt_pad must be 'max' or 'longest', not {cfg.txt_pad!r}")
        self.txt_pad = cfg.txt_pad
        self.null_prompt = False           # trained on "" (--drop-prompt): text guidance's baseline
        self.embed = nn.Embedding(257, dim)                   # 256 byte values + padding (256)
        self.pos = nn.Parameter(torch.randn(cfg.max_txt_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.to_txt = nn.Linear(dim, cfg.context_in_dim)
        self.to_vec = nn.Linear(dim, cfg.vec_in_dim)

    def tokenize(self, prompts):
        data = [p.encode("utf-8") for p in prompts]
        note_truncation(self, [len(b) for b in data], prompts)
        width = self.max_len if self.txt_pad == "max" else max(1, min(
            self.max_len, max(map(len, data))))
        ids = torch.full((len(prompts), width), 256, dtype=torch.long)
        for i, b in enumerate(data):
            b = list(b[: self.max_len])
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        return ids

    def forward(self, prompts):
        ids = self.tokenize(prompts).to(self.pos.device)                  # (B, L)
        pad = ids == 256
        # torch's fused inference path (eval, no grad) returns NaN for a row that is all padding
        # (the empty prompt, text guidance's); the path training runs gives it zero attention: that
        # one, always, so both agree
        with mha_fastpath(False):
            # (B, L, dim)
            h = self.encoder(self.embed(ids) + self.pos[:ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).float()[..., None]
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)             # mean over real bytes
        return self.to_txt(h), self.to_vec(pooled)

class T5CLIPEncoder(nn.Module):
    """The official conditioning: T5-XXL last hidden state (padded to max_len) and CLIP-L pooled
    output."""
    def __init__(self, max_len, t5, clip, dtype=torch.bfloat16):
        # t5, clip: local model folders (weights.load_t5_clip finds them)
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
        self.max_len, self.truncated = max_len, 0
        self.t5_tok = AutoTokenizer.from_pretrained(t5)
        self.t5 = T5EncoderModel.from_pretrained(t5, dtype=dtype).eval().requires_grad_(False)
        self.clip_tok = AutoTokenizer.from_pretrained(clip)
        self.clip = CLIPTextModel.from_pretrained(clip, dtype=dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, prompts):
        dev = self.t5.device
        # CLIP: 77, as BFL
        note_truncation(self, [len(ids) for ids in self.t5_tok(prompts).input_ids], prompts)
        t = self.t5_tok(prompts, max_length=self.max_len, padding="max_length", truncation=True,
                        return_tensors="pt")
        c = self.clip_tok(prompts, max_length=77, padding="max_length", truncation=True,
                          return_tensors="pt")
        txt = self.t5(input_ids=t.input_ids.to(dev)).last_hidden_state          # (B, max_len, 4096)
        y = self.clip(input_ids=c.input_ids.to(dev)).pooler_output              # (B, 768)
        return txt, y

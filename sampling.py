"""
Sampling: the flow from noise to an image, for both model families (BFL's src/flux/sampling.py).

  - the timestep schedule (t = 1 is pure noise, t = 0 the data) with FLUX.1's resolution-dependent
    shift, and the seeded noise
  - one step: the Euler ODE step, and Flow-GRPO's SDE step with its log-probability (IPPO's policy)
  - classifier-free guidance on the references and on the prompt, and the denoising loop
  - pictures <-> latents, and one sample's inputs laid out by a family's `prepare`

A file of its own beside the networks, as BFL's: the DiT knows nothing of schedules; the sampler,
the trainers and FLUX.2 (flux2.py: its own schedule and joint sequence over this loop) step through
here.
"""
import math

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import model as M

# -----------------------------------------------------------------------------
# the schedule (t = 1 is pure noise, t = 0 the data) and the noise

def time_shift(mu, sigma, t):
    # maps t in [0, 1] to itself; mu > 0 spends more steps at high noise (t=0 -> 0 since 1/0 - 1 =
    # inf)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

def get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15):
    # mu grows linearly with the number of image tokens: large images need more denoising at high
    # noise
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + y1 - m * x1

def get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True):
    """num_steps + 1 timesteps from 1 to 0 (python floats), computed in fp32 like BFL. image_seq_len
    is the number of packed target tokens (BFL's choice; UNO passes a 64x smaller number). schnell:
    shift=False."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        timesteps = time_shift(get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len), 1.0,
                               timesteps)
    return timesteps.tolist()

def get_noise(num_samples, height, width, z_channels, factor, seed):
    # BFL get_noise: a seeded CPU generator, so one seed gives one image on every device
    # (fp32 here, not bf16)
    h, w = 2 * (height // (2 * factor)), 2 * (width // (2 * factor))                  # latent cells
    return torch.randn(num_samples, z_channels, h, w,
                       generator=torch.Generator("cpu").manual_seed(seed))

# -----------------------------------------------------------------------------
# one step: the Euler ODE step, Flow-GRPO's SDE step

def _col(s, x):
    # a float or a (B,) tensor of times -> a tensor that broadcasts against x (B, ...)
    return torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))

def euler_step(x, v, t, t_next):
    # rectified flow x_t = (1 - t) x0 + t eps has velocity v = eps - x0; t decreases, so dt < 0
    return x + _col(t_next - t, x) * v

def sde_step(x, v, t, t_next, eta, noise=None, prev=None, generator=None):
    """Flow-GRPO's SDE step x_t -> x_t_next with the same marginals as the ODE, in (at least) fp32.
    x, v (B, ...); t > t_next floats or (B,) tensors; eta the noise level (0 gives exactly
    euler_step). noise: optional eps (x's shape); prev: the x_next to score instead of sampling one
    (the trainer's replay). Returns x_next, log_prob (B,) (mean over elements of log N(x_next; mean,
    std^2), NaN where std = 0: a deterministic step has no density), mean (x's shape) and std
    (broadcastable, (B or 1, 1, ...))."""
    x, v = M.fp32(x), M.fp32(v).to(x.dtype)
    dt, t, t_next = _col(t_next - t, x), _col(t, x), _col(t_next, x)
    # sigma_t = eta sqrt(t / (1 - t)) is infinite at t = 1; Flow-GRPO then divides by 1 - sigmas[1].
    # t = 1 only at the first step of a schedule, whose t_next *is* sigmas[1], so t_next gives
    # exactly their std there
    sigma_t = eta * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t)))             # (B|1, 1, ...)
    # drift = Euler velocity + the score term that puts the injected noise back: score =
    # -(x + (1 - t) v) / t
    mean = x + dt * (v + sigma_t ** 2 / (2 * t) * (x + (1 - t) * v))
    std = sigma_t * torch.sqrt(-dt)
    # the noise is drawn even when std = 0, so every eta consumes the generator alike
    if prev is None:
        eps = (noise if noise is not None else torch.randn(x.shape, generator=generator,
                                                           device=x.device, dtype=x.dtype))
        prev = mean + std * eps.to(x.dtype)
    prev = prev.to(x.dtype)
    # the sample is a constant for the log-prob: gradients reach it through mean (i.e. v) only
    logp = (-(prev.detach() - mean) ** 2 / (2 * std ** 2) - torch.log(std)
            - 0.5 * math.log(2 * math.pi))
    logp = logp.mean(dim=tuple(range(1, x.ndim)))                                            # (B,)
    return prev, torch.where(std.flatten() > 0, logp, torch.nan), mean, std

# -----------------------------------------------------------------------------
# guidance and the sampling loop

def guidance_scales(cfg, null_prompt, ref=None, text=None):
    """The (reference, text) classifier-free guidance a sample uses: the given ones, else the
    preset's, its text guidance only for a text encoder trained on the empty prompt: against a
    prompt it never saw, guidance pushes anywhere (the toy base trained without --drop-prompt drew
    nothing right at 2)."""
    return (cfg.ref_guidance if ref is None else ref,
            (cfg.text_guidance if null_prompt else 1.0) if text is None else text)

def guide(v, ref_guidance=1.0, v_no_refs=None, text_guidance=1.0, v_null=None):
    """Classifier-free guidance, each condition against the full velocity v (compositional):
    v + (w_ref - 1) (v - v_without_refs) + (w_text - 1) (v - v_with_the_empty_prompt); a velocity
    left None (its scale 1, or no references) adds nothing. Sampling (denoise) and IPPO's policy
    (training.velocity) both guide through here."""
    out = v
    if v_no_refs is not None:
        out = out + (ref_guidance - 1) * (v - v_no_refs)
    if v_null is not None:
        out = out + (text_guidance - 1) * (v - v_null)
    return out

# the conditional and the empty-prompt forwards as one batch of 2B rows (False: two forwards;
# bench.py guidance)
BATCH_GUIDANCE = True

def guided_velocity(model, img, img_ids, txt, txt_ids, t, y, g, ref_img=None, ref_img_ids=None,
                    ref_guidance=1.0,
                    text_guidance=1.0, txt_null=None, y_null=None, probe=None, oracle=None):
    """The guided velocity (guide) at img (B, L, C) -> fp32 (B, L, C), for denoise and IPPO's policy
    alike: the conditional forward (the probe reads it, the oracle masks it), one without references
    if w_ref != 1, one with the empty prompt if w_text != 1. The empty prompt is encoded with the
    prompt (one length), so its forward has the conditional one's shapes: both run as one batch of
    2B rows (the same rows, half the calls), unless a probe or an oracle must see the conditional
    rows alone."""
    refs = dict(ref_img=ref_img, ref_img_ids=ref_img_ids)
    v_null = None
    if text_guidance != 1 and BATCH_GUIDANCE and probe is None and oracle is None:
        two = lambda a, b: torch.cat([a, b])
        refs2 = {k: [two(r, r) for r in v] if v else v for k, v in refs.items()}
        v, v_null = model(two(img, img), two(img_ids, img_ids), two(txt, txt_null),
                          two(txt_ids, txt_ids), two(t, t),
                          two(y, y_null), two(g, g), **refs2).float().chunk(2)
    else:
        v = model(img, img_ids, txt, txt_ids, t, y, g, **refs, probe=probe, oracle=oracle).float()
        if text_guidance != 1:
            v_null = (
                model(img, img_ids, txt_null, txt_ids, t, y_null, g, **refs, oracle=oracle).float())
    v_no_refs = (model(img, img_ids, txt, txt_ids, t, y, g).float() if ref_guidance != 1 and ref_img
                 else None)
    return guide(v, ref_guidance, v_no_refs, text_guidance, v_null)

@torch.no_grad()
def denoise(model, img, img_ids, txt, txt_ids, y, timesteps, guidance, ref_img=None,
            ref_img_ids=None, probe=None, progress=True, ref_guidance=1.0, text_guidance=1.0,
            txt_null=None, y_null=None, oracle=None):
    """Euler from noise img (B, L, C) at timesteps[0] = 1 to a clean latent at 0; latents stay fp32.
    A probe rides along at every step, so probe.mean_map() averages over all steps and double
    blocks: early steps show where a subject is placed, late ones its details; the mean is steadier
    than either. Classifier-free guidance on the references and on the prompt (guided_velocity; w =
    1 leaves a condition alone). txt_null, y_null: the empty prompt encoded
    (sampling_inputs(null_text=True)); the probe reads only v. oracle: a Separation in every forward
    that has references (experiments only)."""
    B, dev = img.shape[0], img.device
    img, g = img.float(), torch.full((B,), guidance, device=dev)
    if text_guidance != 1 and txt_null is None:
        raise ValueError("text_guidance needs txt_null and y_null (the empty prompt encoded)")
    for t, t_next in tqdm(list(zip(timesteps[:-1], timesteps[1:])), disable=not progress,
                          desc="sampling"):
        with M.autocast(dev):
            v = guided_velocity(model, img, img_ids, txt, txt_ids, torch.full((B,), t, device=dev),
                                y, g, ref_img, ref_img_ids, ref_guidance, text_guidance, txt_null,
                                y_null, probe, oracle)
        img = euler_step(img, v, t, t_next)
    return img

# -----------------------------------------------------------------------------
# pictures <-> latents, and one sample's inputs

@torch.no_grad()
def encode_image(ae, img, device):
    # PIL (W, H) -> latent (1, z, H/f, W/f)
    # [-1, 1]
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with M.autocast(device):
        return ae.encode(x.to(device, M.param_dtype(ae))).float()

@torch.no_grad()
def decode_images(ae, x, height, width):
    # packed latents (B, L, C) -> B PIL images (W, H)
    f = ae.p.factor
    with M.autocast(x.device):
        z = M.unpack(x, height // f, width // f).to(M.param_dtype(ae))
        x = ae.decode(z).float().clamp(-1, 1)                                   # (B, 3, H, W)
    x = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return [Image.fromarray(a) for a in x]

@torch.no_grad()
def sampling_inputs(cfg, ae, text_encoder, prompt, refs, width, height, seed, pe="d", device="cpu",
                    null_text=False, layout=None):
    """Everything Flux.forward needs for one prompt and its references: seeded noise, the prompt
    encoded, each reference (a preprocessed PIL image, data.preprocess_ref) encoded, all laid out by
    prepare. seed: an int (batch
    1) or a list of B seeds, each sample's noise drawn as that seed alone draws it (the prompt and
       references are
    encoded once and shared). null_text: also the empty prompt (txt_null, y_null, for denoise's text
    guidance), encoded with the prompt so both have one length. layout: the family's prepare
    (default: model.prepare)."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]              # an int: batch 1
    B = len(seeds)
    noise = torch.cat([get_noise(1, height, width, cfg.ae.z_channels, cfg.ae.factor, s)
                       for s in seeds])
    # [(B, z, h_i, w_i)]
    ref_lat = [encode_image(ae, r, device).expand(B, -1, -1, -1) for r in refs]
    txt, y = text_encoder([prompt, ""] if null_text else [prompt])   # (1|2, L_txt, C), (1|2, C_vec)
    # text stays fp32 like the latents: autocast casts it for bf16 weights
    batch = lambda a: a.float().expand(B, *a.shape[1:])
    # the noise (B, z, h, w) and the references laid out by the family's prepare
    out = (layout or M.prepare)(noise.to(device), ref_lat, pe, batch(txt[:1]), batch(y[:1]))
    return dict(out, txt_null=batch(txt[1:]), y_null=batch(y[1:])) if null_text else out

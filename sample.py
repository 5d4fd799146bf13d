"""
Sample one image from FLUX + reference images (UNO-style sequence conditioning), as MultiCrafter does.

    python sample.py --model toy --refs cat.png dog.png --prompt "a cat and a dog" --out out.png
    python sample.py --model flux-dev --refs a.png b.png --prompt "two friends at the beach" --seed 0 --save-attn
    python sample.py --model flux-schnell --refs a.png --prompt "a photo of the cat" --steps 4
    python sample.py --model ckpt/dit.safetensors --arch flux-dev --refs a.png --prompt "..."

Writes out.png, out.json (every argument plus the resolved seed/steps/size) and, with --save-attn,
out_attn{i}.png: where reference i's tokens look in the generated image (MultiCrafter Fig. 2).
The schedule, noise and Euler loop follow black-forest-labs/flux src/flux/sampling.py; sde_step is
Flow-GRPO's stochastic step with its log-probability, for the RL trainer.
"""
import argparse, json, math, os, secrets, sys, tempfile, warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import model as M
import moe_lora as ML

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--refs", nargs="+", required=True, help="reference images, one per subject")
    g.add_argument("--prompt", default=None, help="required for FLUX; the toy names its references when omitted "
                   "('a red solid circle and a blue striped square')")
    g.add_argument("--ref-size", type=int, default=None, help="long side of each reference (px); 320 flux, 16 toy")
    g.add_argument("--pe", default="d", choices=["d", "h", "w", "o"], help="UNO reference position offsets")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="toy", help="toy | flux-dev | flux-schnell | PATH (a DiT .safetensors; "
                   "a folder for --arch toy)")
    g.add_argument("--arch", default="flux-dev", choices=sorted(M.CONFIGS), help="architecture of a --model PATH")
    g.add_argument("--lora", default=None, help="adapter .safetensors: train_sft.py's, or UNO's dit_lora.safetensors "
                   "(replaces a toy folder's own adapter.safetensors)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="default: 50 dev, 4 schnell, 20 toy")
    g.add_argument("--guidance", type=float, default=None, help="distilled guidance (default: 3.5 flux, 1 toy, "
                   "which trains with 1 as UNO does; ignored by schnell)")
    g.add_argument("--seed", type=int, default=None, help="default: a random seed (saved in the JSON)")
    g.add_argument("--width", type=int, default=None, help="default: 512 flux, 32 toy")
    g.add_argument("--height", type=int, default=None)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out.png")
    g.add_argument("--save-attn", action="store_true", help="also write one attention overlay per reference")
    return p

DEFAULTS = {"flux-dev": dict(steps=50, size=512, ref_size=320, guidance=3.5),
            "flux-schnell": dict(steps=4, size=512, ref_size=320, guidance=3.5),
            "toy": dict(steps=20, size=32, ref_size=16, guidance=1.0)}
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")

# -----------------------------------------------------------------------------
# the timestep schedule (t = 1 is pure noise, t = 0 the data)

def time_shift(mu, sigma, t):
    # maps t in [0, 1] to itself; mu > 0 spends more steps at high noise (t=0 -> 0 since 1/0 - 1 = inf)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

def get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15):
    # mu grows linearly with the number of image tokens: large images need more denoising at high noise
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + y1 - m * x1

def get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True):
    """num_steps + 1 timesteps from 1 to 0 (python floats), computed in fp32 like BFL. image_seq_len is the
    number of packed target tokens (BFL's choice; UNO passes a 64x smaller number). schnell: shift=False."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        timesteps = time_shift(get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len), 1.0, timesteps)
    return timesteps.tolist()

# -----------------------------------------------------------------------------
# one step of the probability-flow ODE (Euler) and of Flow-GRPO's SDE

def _col(s, x):
    # a float or a (B,) tensor of times -> a tensor that broadcasts against x (B, ...)
    return torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))

def euler_step(x, v, t, t_next):
    # rectified flow x_t = (1 - t) x0 + t eps has velocity v = eps - x0; t decreases, so dt < 0
    return x + _col(t_next - t, x) * v

def sde_step(x, v, t, t_next, eta, noise=None, prev=None, generator=None):
    """Flow-GRPO's SDE step x_t -> x_t_next with the same marginals as the ODE, in (at least) fp32.
    x, v (B, ...); t > t_next floats or (B,) tensors; eta the noise level (0 gives exactly euler_step).
    noise: optional eps (x's shape); prev: the x_next to score instead of sampling one (the trainer's replay).
    Returns x_next, log_prob (B,) (mean over elements of log N(x_next; mean, std^2), NaN where std = 0:
    a deterministic step has no density), mean (x's shape) and std (broadcastable, (B or 1, 1, ...))."""
    x, v = M.fp32(x), M.fp32(v).to(x.dtype)
    dt, t, t_next = _col(t_next - t, x), _col(t, x), _col(t_next, x)
    # sigma_t = eta sqrt(t / (1 - t)) is infinite at t = 1; Flow-GRPO then divides by 1 - sigmas[1]. t = 1 only
    # at the first step of a schedule, whose t_next *is* sigmas[1], so t_next gives exactly their std there
    sigma_t = eta * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t)))                   # (B|1, 1, ...)
    # drift = Euler velocity + the score term that puts the injected noise back: score = -(x + (1 - t) v) / t
    mean = x + dt * (v + sigma_t ** 2 / (2 * t) * (x + (1 - t) * v))
    std = sigma_t * torch.sqrt(-dt)
    if prev is None:   # the noise is drawn even when std = 0, so every eta consumes the generator alike
        eps = noise if noise is not None else torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev = mean + std * eps.to(x.dtype)
    prev = prev.to(x.dtype)
    # the sample is a constant for the log-prob: gradients reach it through mean (i.e. v) only
    logp = -(prev.detach() - mean) ** 2 / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    logp = logp.mean(dim=tuple(range(1, x.ndim)))                                            # (B,)
    return prev, torch.where(std.flatten() > 0, logp, torch.nan), mean, std

# -----------------------------------------------------------------------------
# inputs: reference images, noise, text

class InputError(ValueError):
    """A bad user input (a reference image, a size, a device): the message says which and why."""

MAX_REFS = 8     # references per sample (MultiCrafter and UNO show up to 4); each adds (ref_size / 16)^2 tokens
MAX_PIXELS = 8192 * 8192   # larger images are refused: a tiny file can declare gigapixels (a decompression bomb)

def utf8(text):
    # a str that has no UTF-8 bytes: lone surrogates, from a JSON "\ud800" or from argv bytes that are not UTF-8
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False

def check_file(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")

def read_image(path, decode):
    """The one way a user's image file is opened (sample.py --refs, data.py check, training): decode(im) -> result.
    Every failure is one InputError naming the file; the format comes from the bytes, never the extension."""
    check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # Pillow's notes on odd files; its bomb warning is checked below
            with Image.open(path) as im:                     # reads the header only
                if im.width * im.height > MAX_PIXELS:
                    raise InputError(f"{path}: {im.width}x{im.height} is more than {MAX_PIXELS} pixels "
                                     f"(a decompression bomb?)")
                return decode(im)
    except InputError:
        raise
    except Image.DecompressionBombError:                     # so many pixels that Pillow refuses to open it
        raise InputError(f"{path}: more than {MAX_PIXELS} pixels (a decompression bomb?)") from None
    except Exception as e:   # not an image, truncated, corrupt, a gigapixel bomb: Pillow raises many types
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:200]})") from None

def _upright_rgb(im):
    im.seek(0)                                               # first frame of an animated GIF/WebP/APNG
    im.load()
    img = ImageOps.exif_transpose(im)                        # a copy, rotated as the camera meant it
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grayscale (Pillow gives 'I;16' or 32-bit 'I' holding 0..65535): scale, don't clip
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")                                # also L, 1, P, CMYK, YCbCr, F

def load_image(path):
    """Any image file -> RGB PIL image, upright (EXIF), first frame, transparency composited on white."""
    return read_image(path, _upright_rgb)

def fit_box(w, h, side):
    # (w, h) scaled so its longer side is `side` -> (rw, rh) and its (left, top) centered in a side x side square
    s = max(w, h)
    rw, rh = max(1, round(w * side / s)), max(1, round(h * side / s))
    return rw, rh, (side - rw) // 2, (side - rh) // 2

def preprocess_ref(img, ref_size):
    """A reference as training sees it (data.py): resized to ref_size on its longer side (aspect kept) and centered
    on a white ref_size x ref_size square. Resized before padding: a 1 x 60000 strip padded first is 3.6 gigapixels."""
    rw, rh, left, top = fit_box(*img.size, ref_size)
    out = Image.new("RGB", (ref_size, ref_size), (255, 255, 255))
    out.paste(img if img.size == (rw, rh) else img.resize((rw, rh), Image.LANCZOS), (left, top))
    return out

def get_noise(num_samples, height, width, z_channels, factor, seed):
    # BFL get_noise: a seeded CPU generator, so one seed gives one image on every device (fp32 here, not bf16)
    h, w = 2 * (height // (2 * factor)), 2 * (width // (2 * factor))                      # latent cells
    return torch.randn(num_samples, z_channels, h, w, generator=torch.Generator("cpu").manual_seed(seed))

def param_dtype(m):
    return next(m.parameters(), torch.empty(0)).dtype      # the toy AE has no parameters: fp32

@torch.no_grad()
def encode_image(ae, img, device):
    # PIL (W, H) -> latent (1, z, H/f, W/f)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1   # [-1, 1]
    with M.autocast(device):
        return ae.encode(x.to(device, param_dtype(ae))).float()

@torch.no_grad()
def decode_images(ae, x, height, width):
    # packed latents (B, L, C) -> B PIL images (W, H)
    f = ae.p.factor
    with M.autocast(x.device):
        x = ae.decode(M.unpack(x, height // f, width // f).to(param_dtype(ae))).float().clamp(-1, 1)  # (B, 3, H, W)
    x = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().cpu().numpy()
    return [Image.fromarray(a) for a in x]

@torch.no_grad()
def prepare(cfg, ae, text_encoder, prompt, refs, width, height, seed, pe="d", device="cpu"):
    """Everything Flux.forward needs for one sample. refs: preprocessed PIL images."""
    noise = get_noise(1, height, width, cfg.ae.z_channels, cfg.ae.factor, seed)           # (1, z, h, w)
    h, w = noise.shape[-2:]
    ref_lat = [encode_image(ae, r, device) for r in refs]                                 # [(1, z, h_i, w_i)]
    txt, y = text_encoder([prompt])                                                        # (1, L_txt, C), (1, C_vec)
    # text stays fp32 like the latents: autocast casts it for bf16 weights
    return dict(img=M.pack(noise).to(device), img_ids=M.grid_ids(h // 2, w // 2, device=device),  # (1, hw/4, 4z)
                txt=txt.float(), txt_ids=torch.zeros(1, txt.shape[1], 3, device=device), y=y.float(),
                ref_img=[M.pack(z) for z in ref_lat],
                ref_img_ids=M.ref_ids((h // 2, w // 2), [(z.shape[2] // 2, z.shape[3] // 2) for z in ref_lat], pe,
                                      device=device))

# -----------------------------------------------------------------------------
# the sampling loop

@torch.no_grad()
def denoise(model, img, img_ids, txt, txt_ids, y, timesteps, guidance, ref_img=None, ref_img_ids=None,
            probe=None, progress=True):
    """Euler from noise img (B, L, C) at timesteps[0] = 1 to a clean latent at 0; latents stay fp32.
    A probe rides along at every step, so probe.mean_map() averages over all steps and double blocks:
    early steps show where a subject is placed, late ones its details; the mean is steadier than either."""
    B, dev = img.shape[0], img.device
    img, g = img.float(), torch.full((B,), guidance, device=dev)
    for t, t_next in tqdm(list(zip(timesteps[:-1], timesteps[1:])), disable=not progress, desc="sampling"):
        with M.autocast(dev):
            v = model(img, img_ids, txt, txt_ids, torch.full((B,), t, device=dev), y, g, ref_img, ref_img_ids,
                      probe=probe)                                                       # (B, L, C)
        img = euler_step(img, v.float(), t, t_next)
    return img

# -----------------------------------------------------------------------------
# models and outputs

def load_models(name, arch, device, lora=None):
    """--model, --arch, --lora -> (Flux, AutoEncoder, text encoder, where the weights came from). A toy
    checkpoint is a folder (assets/toy for --model toy) holding flux.safetensors and text_encoder.safetensors,
    and the adapter it samples with, adapter.safetensors, if it has one (`lora` replaces it)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32   # fp32 on CPU: bf16 matmuls crawl there
    preset = name if name in M.CONFIGS else arch
    cfg = M.get_config(preset)
    if preset != "toy":
        flux = M.load_flux(cfg, None if name in M.CONFIGS else name, device, dtype)
        ae = M.load_ae(cfg, device=device, dtype=dtype)
        text = M.T5CLIPEncoder(cfg.max_txt_len, dtype=dtype).to(device)
        weights = name
    else:
        torch.manual_seed(0)                                 # the random-weight fallback is reproducible
        flux, text, weights = M.Flux(cfg), M.ByteTextEncoder(cfg), "random"
        folder = TOY_DIR if name == "toy" else name
        if not os.path.isdir(folder) and name != "toy":
            raise M.CheckpointError(f"{folder}: not a folder (a toy checkpoint is a folder with flux.safetensors)")
        for m, f in ((flux, "flux.safetensors"), (text, "text_encoder.safetensors")):
            if os.path.isfile(os.path.join(folder, f)) or name != "toy":     # a folder given by the user must be whole
                M.load_state_dict_strict(m, os.path.join(folder, f))      # fp32 (assets/toy stores fp16)
                weights = folder
            else:
                print(f"warning: no {f} in {folder}: random weights for it (expect noise)", file=sys.stderr)
        own = os.path.join(folder, "adapter.safetensors")
        lora = lora or (own if weights != "random" and os.path.isfile(own) else None)
        flux, ae, text = flux.to(device, dtype), M.AutoEncoder(cfg.ae).to(device), text.to(device).eval()
    if lora:
        ML.load_adapter(flux, lora)
        flux.to(device)                                      # the adapter tensors (fp32; autocast on GPU)
        weights += f" + {lora}"
    return flux.eval(), ae, text, weights

def toy_prompt(images, paths, min_cos=0.8):
    """The toy's default prompt: each reference image (from paths, for errors) seen at the toy's 16 px and named by
    the toy world's classifier (a clean sprite matches its template with cosine 1, one drawn at 64 px 0.92, noise
    or a photo < 0.5)."""
    import data as D
    import rewards as R
    size = DEFAULTS["toy"]["ref_size"]
    toy, names = R.ToySubjects(size), []
    for im, p in zip(images, paths):
        e = toy.references([preprocess_ref(im, size)])                                     # (1, D)
        if float((e @ toy.templates.T).max()) < min_cos:
            raise InputError(f"{p}: no toy sprite recognised in it, so the toy cannot name it: pass --prompt")
        names.append(toy.classify(e)[0].caption)
    return D.describe(names)

JET = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]]) * 255

def attention_overlays(image, maps, h_tok, w_tok):
    """image: PIL (W, H); maps (N_refs, h_tok * w_tok) -> per reference, a jet heat map over the image."""
    a = F.interpolate(maps.float().reshape(-1, 1, h_tok, w_tok), size=(image.height, image.width),
                      mode="bilinear", align_corners=False)[:, 0]                          # (N, H, W)
    lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    a = ((a - lo) / (hi - lo).clamp_min(1e-12)).numpy()     # min-max: near-uniform softmaxes still show contrast
    base, stops = np.asarray(image, dtype=np.float64), np.linspace(0, 1, len(JET))
    heat = [np.stack([np.interp(m, stops, JET[:, c]) for c in range(3)], -1) for m in a]   # (H, W, 3) each
    return [Image.fromarray((0.5 * base + 0.5 * h).round().astype(np.uint8)) for h in heat]

def write_atomic(path, write):
    # write a temp file in the same folder, then rename: readers never see half a file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

# -----------------------------------------------------------------------------

def generate(args):
    # 1. validate everything cheap before loading any weights; nothing is written if an input is bad
    preset = args.model if args.model in M.CONFIGS else args.arch
    d, mult = DEFAULTS[preset], 2 * M.get_config(preset).ae.factor
    pick = lambda value, default: default if value is None else value      # 0 is a value, not "unset"
    steps, ref_size, seed = pick(args.steps, d["steps"]), pick(args.ref_size, d["ref_size"]), pick(args.seed, None)
    guidance = pick(args.guidance, d["guidance"])
    seed = secrets.randbelow(2 ** 31) if seed is None else seed
    W, H = (pick(args.width, d["size"]) // mult * mult, pick(args.height, d["size"]) // mult * mult)  # BFL rounds down
    if steps < 1 or W < mult or H < mult or ref_size < mult:
        raise InputError(f"need --steps >= 1 and --width, --height, --ref-size >= {mult} px for {preset}")
    if args.prompt is None and preset != "toy":
        raise InputError(f"--prompt is required for {preset}")
    if args.prompt is not None and not utf8(args.prompt):
        raise InputError("--prompt: not valid UTF-8 text (the shell passed bytes in another encoding)")
    if not args.out.lower().endswith(".png"):
        raise InputError(f"{args.out}: the output must be a .png file")
    try:
        device = torch.device(args.device) if args.device else M.default_device()
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    if len(args.refs) > MAX_REFS:
        raise InputError(f"--refs: {len(args.refs)} references, more than {MAX_REFS}")
    ref_size = ref_size // mult * mult                                     # whole tokens
    images = [load_image(p) for p in args.refs]
    refs = [preprocess_ref(im, ref_size) for im in images]
    prompt = args.prompt if args.prompt is not None else toy_prompt(images, args.refs)
    if args.lora:
        check_file(args.lora)

    # 2. models, inputs, sampling
    flux, ae, text, weights = load_models(args.model, args.arch, device, args.lora)
    cfg = flux.cfg
    inp = prepare(cfg, ae, text, prompt, refs, W, H, seed, args.pe, device)
    timesteps = get_schedule(steps, inp["img"].shape[1], shift=cfg.shift_schedule)
    probe = M.AttentionProbe() if args.save_attn else None
    x = denoise(flux, **inp, timesteps=timesteps, guidance=guidance, probe=probe)
    image = decode_images(ae, x, H, W)[0]

    # 3. outputs: the image, its settings, the attention overlays
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem, files = os.path.splitext(args.out)[0], [args.out]
    if probe is not None:
        maps = probe.mean_map()[0].cpu()                                                   # (N_refs, H/2f * W/2f)
        tok = 2 * cfg.ae.factor                                                            # px per token
        for i, over in enumerate(attention_overlays(image, maps, H // tok, W // tok)):
            files.append(f"{stem}_attn{i}.png")
            write_atomic(files[-1], lambda fh, im=over: im.save(fh, format="PNG"))
    meta = dict(vars(args), prompt=prompt, seed=seed, steps=steps, guidance=guidance, width=W, height=H,
                ref_size=ref_size, arch=preset, weights=weights, device=str(device), ref_sizes=[r.size for r in refs],
                files=files)
    write_atomic(stem + ".json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    write_atomic(args.out, lambda fh: image.save(fh, format="PNG"))
    print(f"wrote {', '.join(files)} and {stem}.json (seed {seed})", file=sys.stderr)

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        generate(args)
    except (InputError, M.CheckpointError) as e:   # user mistakes: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return 0

if __name__ == "__main__":
    sys.exit(main())

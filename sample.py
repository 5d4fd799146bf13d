"""
Sample one image from FLUX + reference images (UNO-style sequence conditioning), as MultiCrafter does.

    python sample.py --model toy --refs cat.png dog.png --prompt "a cat and a dog" --out out.png
    python sample.py --model flux-dev --refs a.png b.png --prompt "two friends at the beach" --seed 0 --save-attn
    python sample.py --model flux-schnell --refs a.png --prompt "a photo of the cat" --steps 4
    python sample.py --model ckpt/dit.safetensors --arch flux-dev --refs a.png --prompt "..."

Writes out.png, out.json (every argument plus the resolved seed/steps/size) and, with --save-attn,
out_attn{i}.png: where reference i's tokens look in the generated image (MultiCrafter Fig. 2).
The schedule, noise, joint sequence and Euler loop live in model.py (as black-forest-labs/flux keeps them in
src/flux/sampling.py); reading and preprocessing the reference images in data.py.
"""
import argparse, json, os, secrets, sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data as D
import model as M
import moe_lora as ML
import toy

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--refs", nargs="+", required=True, help="reference images, one per subject")
    g.add_argument("--prompt", default=None, help="required for FLUX; the toy names its references when omitted "
                   "('a red solid circle and a blue striped square')")
    g.add_argument("--ref-size", type=int, default=None, help="long side of each reference (px); default: the "
                   "preset's, 320 flux, 16 toy")
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

# -----------------------------------------------------------------------------
# models and outputs

def load_models(name, arch, device, lora=None):
    """--model, --arch, --lora -> (Flux, AutoEncoder, text encoder, where the weights came from). A toy
    checkpoint is a folder (assets/toy for --model toy) holding flux.safetensors and text_encoder.safetensors,
    and the adapter it samples with, adapter.safetensors, if it has one (`lora` replaces it)."""
    dtype = M.weight_dtype(device)
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
        folder = M.TOY_DIR if name == "toy" else name
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

# -----------------------------------------------------------------------------

def generate(args):
    # 1. validate everything cheap before loading any weights; nothing is written if an input is bad
    preset = args.model if args.model in M.CONFIGS else args.arch
    cfg = M.get_config(preset)
    mult = cfg.token_px
    pick = lambda value, default: default if value is None else value      # 0 is a value, not "unset"
    steps, ref_size, seed = pick(args.steps, cfg.sample_steps), pick(args.ref_size, cfg.ref_size), args.seed
    guidance = pick(args.guidance, cfg.guidance)
    seed = secrets.randbelow(2 ** 31) if seed is None else seed
    W, H = (pick(args.width, cfg.image_size) // mult * mult, pick(args.height, cfg.image_size) // mult * mult)  # BFL rounds down
    if steps < 1 or W < mult or H < mult or ref_size < mult:
        raise D.InputError(f"need --steps >= 1 and --width, --height, --ref-size >= {mult} px for {preset}")
    if args.prompt is None and preset != "toy":
        raise D.InputError(f"--prompt is required for {preset}")
    if args.prompt is not None and not D.utf8(args.prompt):
        raise D.InputError("--prompt: not valid UTF-8 text (the shell passed bytes in another encoding)")
    if not args.out.lower().endswith(".png"):
        raise D.InputError(f"{args.out}: the output must be a .png file")
    try:
        device = torch.device(args.device) if args.device else M.default_device()
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise D.InputError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    if len(args.refs) > D.MAX_REFS:
        raise D.InputError(f"--refs: {len(args.refs)} references, more than {D.MAX_REFS}")
    ref_size = ref_size // mult * mult                                     # whole tokens
    images = [D.load_image(p) for p in args.refs]
    refs = [D.preprocess_ref(im, ref_size) for im in images]
    prompt = args.prompt if args.prompt is not None else toy.default_prompt(images, args.refs)
    if args.lora:
        D.check_file(args.lora)

    # 2. models, inputs, sampling
    flux, ae, text, weights = load_models(args.model, args.arch, device, args.lora)
    cfg = flux.cfg
    inp = M.sampling_inputs(cfg, ae, text, prompt, refs, W, H, seed, args.pe, device)
    timesteps = M.get_schedule(steps, inp["img"].shape[1], shift=cfg.shift_schedule)
    probe = M.AttentionProbe() if args.save_attn else None
    x = M.denoise(flux, **inp, timesteps=timesteps, guidance=guidance, probe=probe)
    image = M.decode_images(ae, x, H, W)[0]

    # 3. outputs: the image, its settings, the attention overlays
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem, files = os.path.splitext(args.out)[0], [args.out]
    if probe is not None:
        maps = probe.mean_map()[0].cpu()                                                   # (N_refs, H/2f * W/2f)
        tok = cfg.token_px
        for i, over in enumerate(attention_overlays(image, maps, H // tok, W // tok)):
            files.append(f"{stem}_attn{i}.png")
            D.write_atomic(files[-1], lambda fh, im=over: im.save(fh, format="PNG"))
    meta = dict(vars(args), prompt=prompt, seed=seed, steps=steps, guidance=guidance, width=W, height=H,
                ref_size=ref_size, arch=preset, weights=weights, device=str(device), ref_sizes=[r.size for r in refs],
                files=files)
    D.write_atomic(stem + ".json", lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    D.write_atomic(args.out, lambda fh: image.save(fh, format="PNG"))
    print(f"wrote {', '.join(files)} and {stem}.json (seed {seed})", file=sys.stderr)

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        generate(args)
    except (D.InputError, M.CheckpointError) as e:   # user mistakes: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return 0

if __name__ == "__main__":
    sys.exit(main())

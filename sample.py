"""
Sample images from FLUX + reference images (UNO-style sequence conditioning), as MultiCrafter does.

    python sample.py --refs assets/orange_circle.png assets/blue_square.png --out out.png   # the shipped toy
    python sample.py --model flux-dev --refs a.png b.png --prompt "two friends at the beach" --seed 0 --save-attn
    python sample.py --model flux-schnell --refs a.png --prompt "a photo of the cat" --steps 4
    python sample.py --model ckpt/dit.safetensors --refs a.png --prompt "..."   # its preset read from its tensors
    python sample.py --model runs/base/latest --lora runs/multi/latest/adapter.safetensors --lora-scale 0.7 ...

One image: OUT.png, OUT.json (every argument plus the resolved seed/steps/size) and, with
--save-attn, OUT_attn{i}.png: where reference i's tokens look in the generated image
(MultiCrafter Fig. 2).

A test set, the models loaded once:

    python sample.py --manifest test.jsonl --out-dir samples --seeds 0 1 2
    python sample.py --prompts prompts.txt --refs a.png b.png --out-dir samples --seeds 0

writes samples/SEED/ID.png (+ ID.json, ID_attn{i}.png). ID is the record's "id", else its 0-based
position among the manifest's records as 000000 (a prompts file: among its non-empty lines): the
layout `rewards.py eval` and `toy.py eval` read, so scoring is one command per seed,
`toy.py eval --manifest test.jsonl --images samples/0`. A sample already there is skipped
(an interrupted run continues; one made with other settings is refused); a bad record is reported as
manifest:line: field: why and skipped (exit status 1 at the end).

A sample's files are written as one set: all under temporary names, then renamed, its PNG last
(a PNG is only ever beside its own JSON and attention maps). A sample that is not finite
(NaN or inf) is refused, naming why. The schedule, noise and Euler loop live in sampling.py (as
black-forest-labs/flux keeps them in src/flux/sampling.py), the joint sequence in model.py, where
the weights come from in weights.py; reading and preprocessing the reference images in data.py.
"""
import json, math, os, re, secrets, sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import cli as CL
import data as D
import encoders as EN
import flux2 as F2
import model as M
import moe_lora as ML
import sampling as SM
import toy
import weights as WT

MAX_STEPS = 1000          # the discretization diffusion models train with; FLUX samples with 4-50
MAX_SEED = 2 ** 64 - 1    # torch.Generator's range
# image + reference tokens of one sample (2048x2048 px for FLUX, trained up to ~2 MP)
MAX_TOKENS = 16384
MAX_PROMPTS_BYTES = 16 << 20

def build_parser():
    p = CL.Parser(description=__doc__)
    g = p.add_argument_group(
        "inputs (one sample: --refs [--prompt]; a test set: --manifest, or --prompts with --refs)")
    g.add_argument("--refs", nargs="+", default=None, help="reference images, one per subject")
    g.add_argument("--prompt", default=None, help="required for FLUX; the toy names its "
                   "references' shapes when omitted, as its prompts do "
                   "('two circles and a square')")
    g.add_argument("--manifest", default=None,
                   help="a manifest (data.py): one sample per record and seed")
    g.add_argument("--prompts", default=None,
                   help="a text file, one prompt a line, all with --refs")
    g.add_argument("--ref-size", type=CL.int_in(1), default=None, help="long side of each "
                   "reference (px); default: the preset's, 320 flux, 16 toy")
    g.add_argument("--pe", default=None, choices=["t", "d", "h", "w", "o"],
                   help="reference positions: UNO's offsets d/h/w/o (FLUX.1's default d) or "
                   "FLUX.2's own t axis (its default)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="toy", help="toy | flux-dev | flux-schnell | klein-base-4b "
                   "(FLUX.2, and its other presets) | PATH: a DiT .safetensors or a toy checkpoint "
                   "folder (flux.safetensors + text_encoder.safetensors)")
    g.add_argument("--arch", default=None, choices=F2.presets(), help="architecture of a --model "
                   "PATH (default: the preset its tensors fit)")
    g.add_argument("--lora", default=None, help="adapter .safetensors: train_sft.py's, or UNO's "
                   "dit_lora.safetensors (replaces a toy folder's own adapter.safetensors)")
    g.add_argument("--lora-scale", type=CL.float_in(), default=1.0, help="the adapter's strength: "
                   "0 the base model exactly, 1 as trained (default)")
    WT.add_weight_flags(g)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (the "
                   "first step compiles; pays off over many steps and samples)")
    g = p.add_argument_group(
        "low VRAM (same samples: --offload bit for bit, --fp8 within its rounding)")
    g.add_argument("--offload", action="store_true", help="text encoders and AE on the GPU only "
                   "while they run, the DiT's blocks streamed to it one at a time")
    g.add_argument("--fp8", action="store_true", help="the DiT's block weights stored in fp8 "
                   "(e4m3, per-row scales), computed in bf16 on GPU")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=CL.int_in(1, MAX_STEPS), default=None,
                   help="default: 50 dev, 4 schnell, 20 toy")
    g.add_argument("--guidance", type=CL.float_in(0), default=None, help="distilled guidance "
                   "(default: 3.5 flux, 1 toy, which trains with 1 as "
                   "UNO does; ignored by schnell)")
    g.add_argument("--ref-guidance", type=CL.float_in(0), default=None, help="classifier-free "
                   "guidance on the references: v_none + w (v_refs - v_none), one more forward per "
                   "step (default: the preset's, 1 = none)")
    g.add_argument("--text-guidance", type=CL.float_in(0), default=None, help="classifier-free "
                   "guidance on the prompt against the empty one, for a model trained with prompt "
                   "dropout (train_sft.py --drop-prompt; default: the preset's, 1 = none)")
    g.add_argument("--seed", type=CL.int_in(0, MAX_SEED), default=None, help="default: a random "
                   "seed (saved in the JSON)")
    g.add_argument("--seeds", type=CL.int_in(0, MAX_SEED), nargs="+", default=None,
                   help="a test set's seeds (default 0): one folder each")
    g.add_argument("--batch-size", type=CL.int_in(1, 256), default=None, help="a test set: up to N "
                   "seeds of a record denoised as one batch (default 1; throughput; equal to one "
                   "at a time up to float rounding)")
    g.add_argument("--width", type=CL.int_in(1), default=None, help="default: 512 flux, 32 toy")
    g.add_argument("--height", type=CL.int_in(1), default=None)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="one sample's PNG (default out.png)")
    g.add_argument("--out-dir", default=None, help="a test set's folder: OUT_DIR/SEED/ID.png")
    g.add_argument("--save-attn", action="store_true",
                   help="also write one attention overlay per reference")
    g.add_argument("--attn-blocks", nargs="+", default=None, help="with --save-attn: the blocks "
                   "whose reference -> image maps are averaged: double (default, the paper's Eq. "
                   "4), single, all, or names such as d0 s3")
    D.add_force(g)
    return p

# -----------------------------------------------------------------------------
# models

def toy_folder(name):
    return WT.TOY_DIR if name == "toy" else name

def detect_arch(path):
    """A --model PATH given without --arch -> the preset whose DiT its tensors fit, read from the
    header alone. A folder is a toy checkpoint (its flux.safetensors), a file a DiT. None where
    nothing local is there to read."""
    folder = os.path.isdir(path)
    file = os.path.join(path, WT.TOY_DIT) if folder else path
    if folder and not os.path.isfile(file):
        adapter = os.path.join(path, WT.TOY_ADAPTER)
        if os.path.isfile(adapter):                          # a stage single/multi/RL checkpoint
            raise WT.CheckpointError(f"{path}: holds an adapter, not a model: pass --lora "
                                     f"{adapter} and --model <the base it trained on>")
        raise WT.CheckpointError(f"{path}: no {WT.TOY_DIT} (a toy checkpoint folder holds "
                                 f"{WT.TOY_DIT} and {WT.TOY_TEXT})")
    if not os.path.isfile(file):
        return None
    have = {k.removeprefix("model.diffusion_model."): shape
            for k, (shape, _) in WT.read_header(file).items()}
    for name in F2.presets():
        with torch.device("meta"):                 # shapes only: a flux-dev DiT costs nothing here
            want = {k: tuple(v.shape) for k, v in F2.dit(F2.get_config(name)).state_dict().items()}
        if want == have:
            return name
    return "toy" if folder else "flux-dev"         # fits none: the strict loader names what differs

def load_models(name, arch, device, lora=None, ae=None, t5=None, clip=None, offload=False,
                fp8=False, text_model=None):
    """--model, --arch, --lora -> (Flux, AutoEncoder, text encoder, where the weights came from). A
    toy checkpoint is a folder (assets/toy for --model toy) holding flux.safetensors and
    text_encoder.safetensors, and the adapter it samples with, adapter.safetensors, if it has one
    (`lora` replaces it). FLUX: ae, t5, clip name where those weights are (weights.load_models),
    every missing one listed at once before anything loads;
    FLUX.2: ae, text_model (flux2.load_models).
    offload: everything but the DiT's small parts stays in CPU memory (sample_batch moves the
    encoders and the AE in while they run; the DiT's blocks are streamed); fp8: the DiT's block
    weights stored in fp8."""
    dtype = M.weight_dtype(device)
    preset = name if name in F2.presets() else arch
    cfg = F2.get_config(preset)
    # fp8 is converted in CPU memory: bf16 never has to fit the GPU
    home = "cpu" if offload or fp8 else device
    if F2.is_flux2(cfg):
        flux, ae, text = F2.load_models(cfg, None if name in F2.presets() else name, ae, text_model,
                                        home, dtype)
        weights = name
    elif preset != "toy":
        dit = None if name in M.CONFIGS else name
        flux, ae, text = WT.load_models(cfg, dit, ae, t5, clip, home, dtype)
        weights = name
    else:
        weights = toy_folder(name)
        flux, text, own = WT.load_toy(weights, cfg)
        lora = lora or own                        # the folder's own adapter unless --lora is given
        flux, ae, text = flux.to(home, dtype), EN.AutoEncoder(cfg.ae).to(home), text.to(home).eval()
    if lora:
        ML.load_adapter(flux, lora)     # before fp8 and streaming: its tensors go with their blocks
        weights += f" + {lora}"
    if fp8:
        WT.store_fp8(flux)
    if offload:
        WT.stream_blocks(flux, device)
    else:
        flux.to(device)                               # (the adapter tensors: fp32; autocast on GPU)
        ae, text = ae.to(device), text.to(device)
    return flux.eval(), ae, text, weights

def not_finite(flux):
    """Why this model cannot give a finite sample, or None: a weight that holds NaN/inf, or an
    adapter whose scale (alpha / rank from its header, times --lora-scale) is not finite. Checked
    before sampling; cheap beside it."""
    for name, m in ML.adapters(flux):
        if not math.isfinite(m.scale * m.strength):
            return (f"the adapter at {name} has scale {m.scale * m.strength} (alpha {m.alpha} in "
                    f"its header, rank {m.rank}, --lora-scale {m.strength})")
    for name, p in flux.named_parameters():
        # fp8 storage has no isfinite
        if not torch.isfinite(p.float() if p.element_size() == 1 else p).all():
            return (f"weight {name} holds NaN or "
                    f"inf{' (a diverged adapter)' if '.base.' not in name else ''}")
    return None

def overflow_cause(flux):
    """Finite weights, a sample that is not: the activations overflowed. Names the adapter with the
    largest update bound |strength * alpha/r| * |B| * |A| (Frobenius norms, in fp64), the usual
    culprit."""
    bounds = [(abs(m.strength * m.scale) * m.up.weight.double().norm().item()
               * m.down.weight.double().norm().item(), n)
              for n, m in ML.adapters(flux)]
    if not bounds:
        return "the model's activations overflowed"
    b, name = max(bounds)
    return (f"the activations overflowed; the largest adapter update (|scale| |B| |A|) is {b:.3g}, "
            f"at {name}: an adapter trained to divergence, or too large an alpha or --lora-scale")

def ready_models(args, preset, run):
    """The models, the adapter at --lora-scale -> ((flux, ae, text), where the weights came from);
    refused when they cannot give a finite sample."""
    flux, ae, text, weights = load_models(args.model, preset, run["device"], args.lora, args.ae,
                                          args.t5,
                                          args.clip_text, args.offload, args.fp8, args.text_model)
    ML.set_strength(flux, args.lora_scale)
    if args.compile:
        M.compile_blocks(flux)
    why = not_finite(flux)
    if why:
        raise D.InputError(f"nothing sampled: {why}")
    return (flux, ae, text), weights

# -----------------------------------------------------------------------------
# outputs

JET = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]]) * 255

def attention_overlays(image, maps, h_tok, w_tok):
    """image: PIL (W, H); maps (N_refs, h_tok * w_tok) -> per reference, a jet heat map over the
    image."""
    a = F.interpolate(maps.float().reshape(-1, 1, h_tok, w_tok), size=(image.height, image.width),
                      mode="bilinear", align_corners=False)[:, 0]                        # (N, H, W)
    lo, hi = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
    # min-max: near-uniform softmaxes still show contrast
    a = ((a - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    base, stops = np.asarray(image, dtype=np.float64), np.linspace(0, 1, len(JET))
    # (H, W, 3) each
    heat = [np.stack([np.interp(m, stops, JET[:, c]) for c in range(3)], -1) for m in a]
    return [Image.fromarray((0.5 * base + 0.5 * h).round().astype(np.uint8)) for h in heat]

def write_set(files):
    """files {path: write(fh)}, the PNG first: every file written under a temporary name, then
    renamed, the PNG last and an earlier one removed first, so a PNG stands only beside its own JSON
    and attention maps (a kill half-way leaves no PNG: a batch run redoes that sample). Attention
    maps an earlier sample of the same name left (it had more references, or --save-attn) are
    removed. A full disk: one InputError, no temporary left."""
    png = next(iter(files))
    folder, stem = os.path.split(os.path.abspath(os.path.splitext(png)[0]))
    os.makedirs(folder, exist_ok=True)
    tmps = {}
    try:
        for path, write in files.items():
            tmps[path] = D.write_temporary(folder, write)               # each fsynced
    except BaseException as e:                  # a full disk, Ctrl-C: no temporary stays behind
        for t in tmps.values():
            os.unlink(t)
        if isinstance(e, D.FILE_ERRORS):
            raise D.InputError(f"{path}: cannot write ({D.file_problem(e)}); nothing "
                               "of this sample written") from None
        raise
    new = set(map(os.path.abspath, files))
    stale = [os.path.join(folder, f) for f in os.listdir(folder)
             if re.fullmatch(re.escape(stem) + r"_attn\d+\.png", f)
             and os.path.join(folder, f) not in new]
    for f in [png, *stale]:                     # the PNG first: no PNG until the set is whole again
        if os.path.lexists(f):
            os.unlink(f)
    for path in [*list(files)[1:], png]:
        os.replace(tmps[path], path)
    D.fsync_dir(folder)

def sample_batch(models, run, prompt, refs, seeds, pngs, metas, progress=True):
    """One prompt and its references (preprocessed PIL images), one sample per seed, denoised as one
    batch -> per seed its png, its JSON (meta + what was resolved) and, with --save-attn, one
    overlay per reference, each written as one set. A sample that is not finite is refused after the
    others of its batch are written."""
    flux, ae, text = models
    cfg, W, H = flux.cfg, run["width"], run["height"]
    fam = F2.family(cfg)                  # the model family's sequence layout, schedule and sampler
    # --offload: the encoders and the AE visit the GPU only while they run (T5-XXL alone is 9.5 GB
    # in bf16)
    on = (lambda m: WT.resident(m, run["device"])) if run["offload"] else (lambda m: nullcontext())
    with on(text), on(ae):
        inp = fam.sampling_inputs(cfg, ae, text, prompt, refs, W, H, list(seeds), run["pe"],
                                  run["device"], null_text=run["text_guidance"] != 1)
    timesteps = fam.get_schedule(run["steps"], inp["img"].shape[1], shift=cfg.shift_schedule)
    probe = M.AttentionProbe(run["attn_blocks"]) if run["save_attn"] else None
    x = fam.denoise(flux, **inp, timesteps=timesteps, guidance=run["guidance"], probe=probe,
                    progress=progress,
                  ref_guidance=run["ref_guidance"], text_guidance=run["text_guidance"])  # (B, L, C)
    finite = torch.isfinite(x).flatten(1).all(1)                  # decoded, NaN becomes a black PNG
    maps = probe.mean_map().cpu() if probe is not None else None          # (B, N_refs, H/2f * W/2f)
    written = []
    for b, (seed, png, meta) in enumerate(zip(seeds, pngs, metas)):
        if not finite[b]:
            continue
        with on(ae):                   # one at a time: the AE's peak memory stays that of one image
            image, stem = SM.decode_images(ae, x[b:b + 1], H, W)[0], os.path.splitext(png)[0]
        files = {png: lambda fh, im=image: im.save(fh, format="PNG")}
        if maps is not None:
            for i, over in enumerate(attention_overlays(image, maps[b], H // cfg.token_px,
                                                        W // cfg.token_px)):
                files[f"{stem}_attn{i}.png"] = lambda fh, im=over: im.save(fh, format="PNG")
        meta = dict(meta, prompt=prompt, seed=seed, ref_sizes=[r.size for r in refs],
                    files=list(files))
        files[stem + ".json"] = lambda fh, m=meta: fh.write(json.dumps(m, indent=2).encode())
        write_set(files)
        written += list(files)
    if not finite.all():
        png = pngs[int((~finite).nonzero()[0])]
        raise D.InputError(
            f"{png}: not written: the sample is not finite (NaN/inf): {overflow_cause(flux)}")
    return written

# -----------------------------------------------------------------------------
# settings and inputs, all checked before any weights load

def resolve_run(args):
    """The flags -> (preset, the resolved settings every sample shares). Nothing is loaded or
    written."""
    if args.model not in F2.presets() and args.arch is None:    # the JSON records what was detected
        args.arch = detect_arch(args.model) or "flux-dev"
    preset = args.model if args.model in F2.presets() else args.arch
    cfg = F2.get_config(preset)
    if args.pe == "t" and not F2.is_flux2(cfg):
        raise D.InputError(
            f"--pe t: FLUX.2's reference positions; {preset} takes UNO's d, h, w or o")
    mult = cfg.token_px
    pick = lambda value, default: default if value is None else value    # 0 is a value, not "unset"
    W, H = (pick(args.width, cfg.image_size) // mult * mult,
            pick(args.height, cfg.image_size) // mult * mult)  # BFL rounds down
    ref_size = pick(args.ref_size, cfg.ref_size)
    if W < mult or H < mult or ref_size < mult:
        raise D.InputError(f"need --width, --height, --ref-size >= {mult} px for {preset}")
    try:
        device = torch.device(args.device) if args.device else M.default_device()
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise D.InputError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    if args.lora:
        D.check_file(args.lora)
    own = preset == "toy" and os.path.isfile(os.path.join(toy_folder(args.model), WT.TOY_ADAPTER))
    null_prompt = WT.learned_empty_prompt(preset, toy_folder(args.model))
    if pick(args.text_guidance, 1) != 1 and not null_prompt:
        encoder = os.path.join(toy_folder(args.model), WT.TOY_TEXT)
        print(f"note: --text-guidance {args.text_guidance:g}: {encoder} was not trained on the "
              f"empty prompt (train_sft.py --drop-prompt), the baseline guidance subtracts",
              file=sys.stderr)
    if args.lora_scale != 1 and not (args.lora or own):
        raise D.InputError("--lora-scale: there is no adapter to scale (pass --lora)")
    ref_guidance, text_guidance = SM.guidance_scales(cfg, null_prompt, args.ref_guidance,
                                                     args.text_guidance)
    if args.attn_blocks is not None and not args.save_attn:
        raise D.InputError(
            "--attn-blocks: it picks the blocks of --save-attn's maps (pass --save-attn)")
    try:
        attn_blocks = None if args.attn_blocks is None else M.select_blocks(args.attn_blocks, cfg)
    except ValueError as e:
        raise D.InputError(f"--attn-blocks: {e}") from None
    return preset, dict(width=W, height=H, ref_size=ref_size // mult * mult,
                        steps=pick(args.steps, cfg.sample_steps),
                        guidance=pick(args.guidance, cfg.guidance),
                        pe=pick(args.pe, F2.default_pe(cfg)), device=device,
                        ref_guidance=ref_guidance, text_guidance=text_guidance,
                        save_attn=args.save_attn, attn_blocks=attn_blocks,
                        lora_scale=args.lora_scale, arch=preset, offload=args.offload)

def preflight(args, single):
    """Everything checked before any image is read or any weight loaded, all named at once
    (data.Preflight): the user's own paths first (--model, --refs, --lora, the test set's file), so
    a typo in --model is named as a typo, not taken for a FLUX model without a prompt; then the
    sizes the flags make and, for FLUX, the prompt and every weight. -> resolve_run's (preset,
    settings)."""
    pf = D.Preflight()
    model_ok = (args.model in F2.presets() or not WT.looks_local(args.model) or
                pf.need(os.path.exists(os.path.expanduser(args.model)), f"--model {args.model}: no "
                        f"such file or folder (a preset: {', '.join(F2.presets())}; or a DiT "
                        ".safetensors, or a toy checkpoint folder)"))
    for r in args.refs or []:
        pf.file("--refs", r)
    pf.file("--lora", args.lora, inside="adapter.safetensors")
    pf.file("--manifest", args.manifest)
    pf.file("--prompts", args.prompts)
    if not model_ok:
        pf.check()
    preset, run = resolve_run(args)                # a --model file's preset is read from its header
    if args.refs:
        try:
            check_tokens(run, len(args.refs), F2.get_config(preset).token_px)
        except D.InputError as e:
            pf.need(False, str(e))
    if preset != "toy":
        pf.need(not single or args.prompt is not None, f"--prompt is required for {preset}")
        dit = None if args.model in F2.presets() else args.model
        cfg = F2.get_config(preset)
        pf.weights(F2.weights(cfg, dit=dit, ae=args.ae, text=args.text_model) if F2.is_flux2(cfg)
                   else WT.flux_weights(cfg, dit=dit, ae=args.ae, t5=args.t5, clip=args.clip_text))
    pf.check()
    return preset, run

def check_tokens(run, n_refs, mult):
    # the sequence's length decides memory: refused before a reference is resized or a latent
    # allocated
    W, H, r = run["width"], run["height"], run["ref_size"]
    n = (W // mult) * (H // mult) + n_refs * (r // mult) ** 2
    if n > MAX_TOKENS:
        raise D.InputError(f"{W}x{H} px and {n_refs} reference(s) of {r} px make {n} image and "
                           f"reference tokens, more than {MAX_TOKENS} (at {mult} px per token; "
                           "lower --width/--height/--ref-size)")

def not_sprites(paths_images):
    # the references the toy's classifier does not recognise as one of its sprites
    # (photos, drawings, noise)
    out = []
    for p, im in paths_images:
        try:
            toy.default_prompt([im], [p])
        except D.InputError:
            out.append(p)
    return out

def toy_note(run, photos):
    """The one line the toy says when it is asked for what it never saw: other sizes than it trained
    on, or references that are not its sprites; None when it was not."""
    cfg, outside = M.get_config("toy"), []
    if (run["width"], run["height"]) != (cfg.image_size, cfg.image_size):
        outside.append(f"{run['width']}x{run['height']} images")
    if run["ref_size"] != cfg.ref_size:
        outside.append(f"{run['ref_size']} px references")
    if photos:
        outside.append(
            f"{', '.join(photos[:3])}{' and more' if len(photos) > 3 else ''} (not a sprite)")
    if not outside:
        return None
    return (f"note: the toy was trained on {cfg.image_size}x{cfg.image_size} images with "
            f"{cfg.ref_size} px sprite references, not {' or '.join(outside)}: expect noise")

def load_refs(paths, run, mult):
    if len(paths) > D.MAX_REFS:
        raise D.InputError(f"--refs: {len(paths)} references, more than {D.MAX_REFS}")
    check_tokens(run, len(paths), mult)
    images = [D.load_image(p) for p in paths]
    return images, [D.preprocess_ref(im, run["ref_size"]) for im in images]

def prompts_file(path):
    """A prompts file -> ([(line, index among the non-empty lines, prompt)], [(line, why)] of the
    bad lines): a bad line keeps its index, so fixing it later renames no other sample."""
    D.check_file(path)
    with open(path, "rb") as f:
        data = f.read(MAX_PROMPTS_BYTES + 1)
    if len(data) > MAX_PROMPTS_BYTES:
        raise D.InputError(f"{path}: more than {MAX_PROMPTS_BYTES >> 20} MB: not a prompts file")
    good, bad = [], []
    lines = [(line, raw)
             for line, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1)
             if raw.strip()]
    for i, (line, raw) in enumerate(lines):
        try:
            good.append((line, i, raw.decode("utf-8").strip()))
        except UnicodeDecodeError as e:
            bad.append((line, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
    return good, bad

def read_paths(args, refs):
    # every file or folder sampling reads (data.check_output keeps the outputs off them)
    return [args.manifest, args.prompts, *refs, toy_folder(args.model), args.lora, args.ae, args.t5,
            args.clip_text]

def settings(args, run):
    # what a sample's JSON records: every argument, with what was resolved in place of the defaults
    return {**vars(args), **run, "device": str(run["device"])}

# what makes two samples of one name the same sample
SAME = ("model", "arch", "lora", "lora_scale", "steps", "guidance", "ref_guidance", "text_guidance",
        "width", "height", "ref_size", "pe", "prompt", "refs", "save_attn", "attn_blocks", "seed")
# what a sample's JSON written before a setting existed used
UNSAID = {"ref_guidance": 1.0, "text_guidance": 1.0}

def file_name(key):
    # a record's id -> its sample's file name, None when it cannot be one (an integer of thousands
    # of digits)
    try:
        name = str(key)
    except ValueError:                                       # past Python's int -> str digit limit
        return None
    return name if len(name) <= 200 else None

def earlier(png):
    # the settings an existing sample was made with, from its JSON (no JSON: not ours, or torn:
    # refuse)
    try:
        with open(os.path.splitext(png)[0] + ".json", "rb") as f:
            have = json.loads(f.read())
    except (OSError, ValueError):
        have = None
    if not isinstance(have, dict):
        raise D.InputError(f"{png}: exists without a readable JSON beside it (not written by "
                           f"sample.py?): pass another --out-dir, or remove it")
    return have

# -----------------------------------------------------------------------------
# a test set: --manifest, or --prompts with --refs

def set_jobs(args, run, mult):
    """A test set's records, every one checked before anything is sampled -> (jobs, bad): a job per
    good record (line, id: its samples' file name, prompt, refs) and (line, why) per bad one, a
    finding rather than the end of the run: unreadable or invalid, an id that cannot name a file or
    names another record's samples, more tokens than a sample takes."""
    jobs, bad = [], []
    if args.manifest:
        records, problems = D.read_manifest(args.manifest)
        bad += [(line, f"{field}: {why}") for line, field, why in problems]
        root = os.path.dirname(os.path.abspath(args.manifest))
        for i, (line, rec, why) in enumerate(D.validate_all(records, root, deep=False)):
            if rec is None:
                bad.append((line, "; ".join(f"{f}: {w}" for f, w in why)))
                continue
            # as rewards.py eval reads them
            name = file_name(rec["id"]) if rec["id"] is not None else f"{i:06d}"
            if name is None:
                bad.append((line, "id: too long to name a file"))
                continue
            jobs.append(dict(line=line, id=name, prompt=rec["prompt"], refs=rec["refs"]))
    else:
        lines, bad = prompts_file(args.prompts)
        jobs = [dict(line=line, id=f"{i:06d}", prompt=text, refs=args.refs)
                for line, i, text in lines]
    kept, names = [], {}                                      # file name -> the line that has it
    for job in jobs:
        try:
            if job["id"] in names:           # "3" and 3, or an id that is another record's position
                raise D.InputError(
                    f"id: its output {job['id']}.png is also line {names[job['id']]}'s")
            check_tokens(run, len(job["refs"]), mult)
        except D.InputError as e:
            bad.append((job["line"], str(e)))
            continue
        names[job["id"]] = job["line"]
        kept.append(job)
    return kept, bad

def pending(jobs, seeds, out_dir, meta):
    """What is left of a set -> [(job, [(seed, png, its JSON's settings)])], a job's samples not
    there yet. A sample already there is skipped when it is the same sample, and refused when it was
    made with other settings: a set is never overwritten or mixed."""
    todo = []
    for job in jobs:
        samples = []
        for seed in seeds:
            png = os.path.join(out_dir, str(seed), f"{job['id']}.png")
            want = dict(meta, prompt=job["prompt"], refs=job["refs"], seed=seed, id=job["id"],
                        line=job["line"])
            if not os.path.exists(png):
                samples.append((seed, png, want))
                continue
            have = earlier(png)
            diff = [k for k in SAME if have.get(k, UNSAID.get(k)) != want.get(k)]
            if diff:
                raise D.InputError(f"{png}: made with other settings ({', '.join(diff[:4])} "
                                   f"differ): pass another --out-dir, or remove it")
        if samples:
            todo.append((job, samples))
    return todo

def generate_set(args):
    """--manifest / --prompts: one sample per record and seed into OUT_DIR/SEED/ID.png, the models
    loaded once."""
    # the flags: a test set takes its prompts from its file, --seeds and one --out-dir
    for flag in ("seed", "out", "prompt"):
        if getattr(args, flag) is not None:
            raise D.InputError(f"--{flag}: not with --manifest/--prompts (a test set takes "
                               f"--seeds, --out-dir, and prompts from its file)")
    if bool(args.manifest) == bool(args.prompts) or bool(args.prompts) != bool(args.refs):
        raise D.InputError("a test set is --manifest M.jsonl, or --prompts P.txt with --refs")
    if not args.out_dir:
        raise D.InputError("--out-dir is required with --manifest/--prompts")
    preset, run = preflight(args, single=False)
    # each seed once
    mult, seeds = F2.get_config(preset).token_px, list(dict.fromkeys(args.seeds or [0]))
    source = args.manifest or args.prompts

    # the plan: every record checked, the bad ones named (source:line: why). A --prompts set's
    # references are every record's: read once, here, and a bad one ends the run
    jobs, bad = set_jobs(args, run, mult)
    shared = load_refs(args.refs, run, mult) if args.prompts else None
    for line, why in sorted(bad):
        print(f"{source}:{line}: {why}", file=sys.stderr)
    refs_read = [r for job in jobs for r in job["refs"]]
    D.check_output([args.out_dir], read_paths(args, refs_read), args.force)

    # one sample.py at a time writes the set, from its check of what is there to its last sample:
    # two runs with other settings are refused, never mixed
    D.check_writable(args.out_dir)
    with D.only_writer(args.out_dir):
        todo = pending(jobs, seeds, args.out_dir, settings(args, run))
        total = sum(len(samples) for _, samples in todo)
        skipped = len(jobs) * len(seeds) - total

        # the models once (if anything is left to do), then each record's samples, its seeds in
        # batches of up to --batch-size; a manifest record's references are read for its seeds, once
        (flux, ae, text), weights = ready_models(args, preset, run) if todo else ((None,) * 3, None)
        photos = not_sprites(zip(args.refs, shared[0])) if shared and preset == "toy" else []
        written, failed, n = 0, set(), args.batch_size or 1
        # the bar is closed (a newline) before an error
        with tqdm(total=total, desc="samples", disable=not todo) as bar:
            for k, (job, samples) in enumerate(todo):
                try:
                    images, refs = shared or load_refs(job["refs"], run, mult)
                except D.InputError as e:                         # checking read only their headers
                    failed.add(job["line"])
                    tqdm.write(f"{source}:{job['line']}: {e}", file=sys.stderr)
                    bar.update(len(samples))
                    continue
                # the toy's note reads the first record's references (0.1 s a check; all alike)
                if preset == "toy" and not shared and k == 0:
                    photos = not_sprites(zip(job["refs"], images))
                for b in range(0, len(samples), n):
                    seeds_b, pngs, wants = zip(*samples[b:b + n])
                    sample_batch((flux, ae, text), run, job["prompt"], refs, seeds_b, pngs,
                                 [dict(w, weights=weights) for w in wants], progress=False)
                    written += len(seeds_b)
                    bar.update(len(seeds_b))

    # what was done, and how to score it
    note = toy_note(run, photos) if preset == "toy" else None
    if note:
        print(note, file=sys.stderr)
    n_bad = len({line for line, _ in bad} | failed)
    score = (f"; score a seed with: python {'toy.py' if preset == 'toy' else 'rewards.py'} eval "
             f"--manifest {args.manifest} --images {os.path.join(args.out_dir, str(seeds[0]))}"
             if args.manifest else "")
    print(f"wrote {written} samples to {os.path.join(args.out_dir, '<seed>')}, skipped {skipped} "
          f"already there, {n_bad} bad records{score}", file=sys.stderr)
    return 1 if n_bad else 0

# -----------------------------------------------------------------------------
# one sample, or a set

def generate(args):
    # 1. validate everything cheap before loading any weights; nothing is written if an input is bad
    if args.manifest or args.prompts:
        return generate_set(args)
    for flag, what in (("seeds",
                        "--seeds: one sample takes --seed (--seeds is for --manifest/--prompts)"),
                       ("batch_size",
                        "--batch-size: batches a test set's seeds (--manifest/--prompts)"),
                       ("out_dir", "--out-dir: for --manifest/--prompts (one sample takes --out)")):
        if getattr(args, flag) is not None:
            raise D.InputError(what)
    if not args.refs:
        raise D.InputError("--refs (or --manifest, or --prompts with --refs) is required")
    preset, run = preflight(args, single=True)
    seed = secrets.randbelow(2 ** 31) if args.seed is None else args.seed
    out = args.out or "out.png"
    if args.prompt is not None and not D.utf8(args.prompt):
        raise D.InputError(
            "--prompt: not valid UTF-8 text (the shell passed bytes in another encoding)")
    if not out.lower().endswith(".png") or os.path.isdir(out):
        raise D.InputError(f"{out}: the output must be a .png file")
    mult = F2.get_config(preset).token_px
    images, refs = load_refs(args.refs, run, mult)
    prompt = args.prompt if args.prompt is not None else toy.default_prompt(images, args.refs)
    note = toy_note(run, not_sprites(zip(args.refs, images))) if preset == "toy" else None
    stem = os.path.splitext(out)[0]
    D.check_output([out, stem + ".json", *(f"{stem}_attn{i}.png"
                                           for i in range(len(refs) * args.save_attn))],
                   read_paths(args, args.refs), args.force)
    D.check_writable(os.path.dirname(os.path.abspath(out)))

    # 2. the models, the sample, its files
    (flux, ae, text), weights = ready_models(args, preset, run)
    if note:
        print(note, file=sys.stderr)
    meta = dict(settings(args, run), out=out, weights=weights, refs=args.refs)
    files = sample_batch((flux, ae, text), run, prompt, refs, [seed], [out], [meta])
    print(f"wrote {', '.join(files)} (seed {seed})", file=sys.stderr)
    return 0

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = generate(args)
    except (D.InputError, D.DataError, WT.CheckpointError, *D.FILE_ERRORS) as e:
        # user mistakes: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (torch.OutOfMemoryError, MemoryError):
        print(f"error: out of {'GPU ' if torch.cuda.is_available() else ''}memory: lower "
              f"--width/--height/--ref-size or --batch-size, or pass fewer references",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # every sample on disk is whole (write_set): the same command continues a set
        print("interrupted: the samples written so far are whole; the same "
              "command continues a test set", file=sys.stderr)
        sys.exit(130)
    if status:
        sys.exit(status)
    return 0

if __name__ == "__main__":
    sys.exit(main())

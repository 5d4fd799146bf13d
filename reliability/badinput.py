"""
Bad images, weights, manifests and ranks through every entry point, and what each one does. Run from
the repository root:

    python -m reliability.badinput --table t.md            # every family (about a minute on 2 CPU cores)
    python -m reliability.badinput --no-dist --table t.md  # without the torchrun rows (seconds)

One markdown table per family, printed (--table also writes them):
  Images     each BAD_IMAGES file through data.load_image, `sample.py --refs`, `data.py check` and
             training's ManifestDataset
  Weights    each BAD_WEIGHTS fault in each kind of weights file a user hands over: the DiT and text
             encoder (`sample.py --model`), the AE (weights.load_ae), an adapter
             (`sample.py --lora`), and a checkpoint to resume (`train_sft.py --resume`: its
             adapter.safetensors, its train_state.pt); and each ADAPTER_FAULTS adapter whose header
             (or tensors' shapes) claims what it does not hold
  Manifests  each manifest fault, in a record after a good one, through `data.py check` and
             ManifestDataset
  Masks      each kind of mask file (gray, cut-outs whose alpha is the subject) through
             `data.py check` and training
  Eval       records and generated images that `rewards.py eval` must not score silently
             (ids naming one image, an image of another size)
  Outputs    commands whose output is one of their inputs or a run's checkpoint (data.check_output),
             two samplers on one set, caches and bases checked before training's first step, a run
             that trained nothing, a full disk, a reward model whose weights are a pickle that runs
             code
  Ranks      torchrun with 2 CPU ranks: a rank killed, a rank hung, a checkpoint resumed on another
             number of ranks
The command lines (sample.py, train_sft.py, data.py) run in this process, each with its arguments as
a user passes them (a traceback in a cell would be a bug); torchrun runs as a subprocess.
test_all.py reuses the fault tables and writers here.
"""
import argparse
import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

import data as D
import dataset as DS
import encoders as EN
import model as M
import moe_lora as ML
import toy
import weights as WT
from reliability.common import Opens, attempt, cell, run_script, said
from reliability.faults import ROOT, save_st, toy_base
from reliability.outputs import dist_rows, output_rows

# -----------------------------------------------------------------------------
# images

def png_claiming(path, w, h):
    """An 8x8 PNG whose header claims w x h pixels: a few bytes that would decode to gigapixels
    (a decompression bomb). The header's checksum is fixed up, so only the size is a lie."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)                    # IHDR: length, "IHDR", width, height ...
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))             # ... and the chunk's CRC
    open(path, "wb").write(bytes(b))

def cut_in_half(write):
    # a writer of the first half of what `write` writes
    def half(path, *a):
        write(path, *a)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    return half

def noise(path, fmt):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3),
                                                      dtype=np.uint8)).save(path, fmt)

def animated(path, fmt):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(path, format=fmt, save_all=True, append_images=[blue], duration=100)

def exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6                                         # "rotate 90 degrees clockwise to view"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path, format="JPEG", exif=exif.tobytes())

def palette_with_transparency(path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)            # index 0 black (transparent), 1 green
    p.putpixel((0, 0), 0)
    p.save(path, transparency=0)

# fault -> (file name, writer(path)); no writer: the file does not exist
BAD_IMAGES = {
    "missing file": ("missing.png", None),
    "zero bytes": ("zero.png", lambda p: open(p, "wb").close()),
    "a folder": ("folder.png", os.mkdir),
    "not an image (text)": ("text.png", lambda p: open(p, "w").write("hello")),
    "truncated PNG": ("cut.png", cut_in_half(lambda p: noise(p, "PNG"))),
    "truncated JPEG": ("cut.jpg", cut_in_half(lambda p: noise(p, "JPEG"))),
    "JPEG named .png": ("jpeg.png",
                        lambda p: Image.new("RGB", (8, 8), (255, 0, 0)).save(p, "JPEG")),
    "decompression bomb (30000x30000 header)": ("bomb.png",
                                                lambda p: png_claiming(p, 30000, 30000)),
    "10000x10000 (over MAX_PIXELS)": ("huge.png", lambda p: png_claiming(p, 10000, 10000)),
    "1x1": ("one.png", lambda p: Image.new("RGB", (1, 1), (255, 0, 0)).save(p)),
    "1x4000 strip": ("strip.png", lambda p: Image.new("RGB", (1, 4000), (255, 0, 0)).save(p)),
    "CMYK JPEG": ("cmyk.jpg",
                  lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=100)),
    "16-bit grayscale": ("g16.png",
                         lambda p: Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(p)),
    "palette + transparent index": ("pal.png", palette_with_transparency),
    "RGBA, fully transparent red": ("rgba.png",
                                    lambda p: Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(p)),
    "animated GIF (red, blue)": ("anim.gif", lambda p: animated(p, "GIF")),
    "animated WebP (red, blue)": ("anim.webp", lambda p: animated(p, "WEBP")),
    "EXIF-rotated JPEG (40x20, rotate 90)": ("rot.jpg", exif_rotated),
}

def write_bad_images(folder):
    """Every BAD_IMAGES file in folder (a good 32x32 target t.png too) -> {fault: file name}."""
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (32, 32), (0, 128, 255)).save(os.path.join(folder, "t.png"))
    for name, write in BAD_IMAGES.values():
        if write:
            write(os.path.join(folder, name))
    return {fault: name for fault, (name, _) in BAD_IMAGES.items()}

# -----------------------------------------------------------------------------
# weights: the faults (their writers take the tensors a good file would hold)

def first_float(sd):
    return next(k for k in sorted(sd) if sd[k].is_floating_point())

# fault -> writer(path, state dict, header metadata, another architecture's state dict); no writer:
# no file
BAD_WEIGHTS = {
    "missing file": None,
    "empty file": lambda p, sd, meta, other: open(p, "wb").close(),
    "text file": lambda p, sd, meta, other: open(p, "w").write("not weights"),
    "pickle (torch.save) instead": lambda p, sd, meta, other: torch.save(sd, p),
    "pickle that runs code": lambda p, sd, meta, other: torch.save({"x": Opens(p + ".ran")}, p),
    "malformed header": lambda p, sd, meta, other: open(p, "wb").write(
        struct.pack("<Q", 10 ** 9) + b"{"),
    "truncated": cut_in_half(lambda p, sd, meta, other: save_st(sd, p, meta)),
    "missing key": lambda p, sd, meta, other: save_st({k: v for k, v in sd.items() if k != min(sd)},
                                                      p, meta),
    "extra key": lambda p, sd, meta, other: save_st({**sd, "extra.weight": torch.zeros(2)}, p,
                                                    meta),
    "wrong shape": lambda p, sd, meta, other: save_st(
        {**sd, first_float(sd): torch.zeros(sd[first_float(sd)].shape[0] + 1)}, p, meta),
    "another architecture": lambda p, sd, meta, other: save_st(other, p, meta),
    "float16 tensors": lambda p, sd, meta, other: save_st(
        {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, p, meta),
    "int64 where a float belongs": lambda p, sd, meta, other: save_st(
        {**sd, first_float(sd): sd[first_float(sd)].long()}, p, meta),
}

def with_header(**fields):
    # a writer of the good adapter tensors under a header whose adapter config has `fields` changed
    return lambda p, sd, meta, other: save_st(sd, p, dict(meta, multicrafter_adapter=json.dumps(
        dict(json.loads(meta["multicrafter_adapter"]), **fields))))

def claims_rank(rank):
    # a tiny file whose header and (zero-size) tensors claim one LoRA of rank `rank`: 2^24 would be
    # 8 GB at FLUX
    return lambda p, sd, meta, other: save_st(
        {"double_blocks.0.img_attn.qkv.down.weight": torch.zeros(rank, 0),
         "double_blocks.0.img_attn.qkv.up.weight": torch.zeros(0, rank)}, p,
        {"multicrafter_adapter": json.dumps(dict(lora_targets=["double_blocks.0.img_attn.qkv"],
                                                 moe_targets=[], rank=rank))})

def uno_claiming(rank):
    # UNO's layout (no header), one LoRA whose zero-size down.weight claims rank `rank`
    return lambda p, sd, meta, other: save_st(
        {"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(rank, 0),
         "double_blocks.0.processor.qkv_lora1.up.weight": torch.zeros(0, rank)}, p)

# adapter fault -> writer(path, state dict, header metadata, another architecture's state dict): a
# header that lies
ADAPTER_FAULTS = {
    "header: rank 2^24": with_header(rank=2 ** 24),
    "header: n_experts 2^20": with_header(n_experts=2 ** 20),
    "header: rank -1": with_header(rank=-1),
    "header: rank 0": with_header(rank=0),
    "header: top_k 5 of 4 experts": with_header(top_k=5),
    "header: alpha NaN": with_header(alpha=float("nan")),
    "header: an unknown field": with_header(width=3),
    "1 KB file claiming rank 2^24": claims_rank(2 ** 24),
    "UNO LoRA claiming rank 2^24": uno_claiming(2 ** 24),
}

def sample_cell(argv, out):
    """sample.py with argv -> its exit status, the first error or note it printed, and any file it
    left behind."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    _, text, status = attempt(lambda: run_script("sample.py", argv + [
        "--prompt", "x", "--steps", "1", "--seed", "0", "--out", os.path.join(out, "x.png")]))
    line = said(text, "error:", "TRACEBACK", "note:")
    left = sorted(os.listdir(out))
    if status == 0:
        return f"sampled{'; ' + line if line else ''}"
    return f"exit {status}: {line}; " + (f"LEFT {left}" if left else "nothing written")

def check_cell(manifest, line):
    _, text, status = attempt(lambda: D.main(["check", manifest]))
    return said(text, f"{manifest}:{line}: ", "TRACEBACK").replace(f"{manifest}:{line}: ", "") or \
        f"good (exit {status})"

def dataset_cell(manifest, line):
    """ManifestDataset on a manifest whose other records are good -> what happens to record
    `line`."""
    ds, text, status = attempt(lambda: DS.ManifestDataset(manifest, size=32,
                                                          ref_size=16, token_px=4), D.DataError)
    if ds is None:
        return f"exit {status}: {said(text, 'error:', 'TRACEBACK')}"
    skipped = [f"{field}: {why}" for l, field, why in ds.skipped if l == line]
    if skipped:
        return "skipped at start (warning): " + skipped[0]
    i = next(i for i, r in enumerate(ds.records) if r["line"] == line)
    item, text, status = attempt(lambda: ds[i])
    if status:
        return said(text, "TRACEBACK")
    if ds.n_failed:
        return ("replaced at load by another record (warning): "
                + said(text, "warning").split(": ", 2)[-1])
    # what training encodes
    _, text, _ = attempt(lambda: EN.ByteTextEncoder(M.get_config("toy"))([item["prompt"]]))
    return "used" + (f"; {said(text, 'warning')}" if text else "")

# -----------------------------------------------------------------------------
# the Images table

def image_rows(work):
    """One row per BAD_IMAGES fault: load_image, sample.py --refs, data.py check, training."""
    folder = os.path.join(work, "images")
    names = write_bad_images(folder)
    rows = []
    for k, (fault, name) in enumerate(names.items()):
        path, manifest = os.path.join(folder, name), os.path.join(folder, f"m{k}.jsonl")
        with open(manifest, "w") as f:          # the bad reference, then a good record
            for ref in (name, "t.png"):
                f.write(json.dumps(dict(target="t.png", prompt="a thing", refs=[ref])) + "\n")
        img, text, _ = attempt(lambda: D.load_image(path), D.InputError)
        loaded = (f"{img.mode} {img.width}x{img.height}, pixel (0, 0) = {img.getpixel((0, 0))}"
                  if img else said(text, "error:", "TRACEBACK"))
        rows.append([fault, loaded, sample_cell(["--refs", path], os.path.join(work, "out")),
                     check_cell(manifest, 1), dataset_cell(manifest, 1)])
    return [[cell(c, folder + os.sep) for c in r] for r in rows]

# -----------------------------------------------------------------------------
# the Weights table (a checkpoint's train_state.pt is a pickle: faults of its own)

def another_optimizer_state(path):
    # a train_state.pt of a run with other trainable parameters (other adapters)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    opt.step()
    torch.save({"step": 1, "consumed": 2, "world": 1, "optimizer": opt.state_dict()}, path)

# what a train_state.pt (a weights_only pickle, not safetensors) can suffer of BAD_WEIGHTS's faults
STATE_FAULTS = {
    "missing file": None, "empty file": BAD_WEIGHTS["empty file"],
    "text file": BAD_WEIGHTS["text file"],
    "pickle that runs code": BAD_WEIGHTS["pickle that runs code"],
    "truncated": cut_in_half(lambda *_: None),                              # the file as saved, cut
    "another architecture": lambda p, *_: another_optimizer_state(p)}

def broken_copy(folder, src, name, write, *tensors):
    """A copy of folder src (or an empty folder) whose file `name` is (over)written by write(path,
    *tensors) (None: removed) -> (folder, the file's path)."""
    if src:
        shutil.copytree(src, folder, symlinks=True)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    if write:
        write(path, *tensors)
    elif os.path.exists(path):
        os.remove(path)
    return folder, path

def weight_rows(work):
    """One row per BAD_WEIGHTS fault in each kind of weights file a user hands over ->
    (header, rows)."""
    cfg = M.get_config("toy")
    base, flux, text = toy_base(os.path.join(work, "base"))
    small = replace(cfg, hidden_size=64, axes_dim=(4, 6, 6))                  # another architecture
    ae_cfg = replace(cfg, ae=M.AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                 z_channels=4, factor=2))
    ae_other = replace(ae_cfg.ae, z_channels=8)
    adapted, other = M.Flux(cfg), M.Flux(small)
    acfg, _ = ML.inject(adapted, rank=4), ML.inject(other, rank=4)
    ML.save_adapter(adapted, os.path.join(work, "adapter.safetensors"), acfg)
    meta, adapter = ML.read_adapter(os.path.join(work, "adapter.safetensors"))
    # a run to resume: one step of stage multi on four toy records
    manifest = toy.write_world(os.path.join(work, "data"), 4, seed=0)
    train = lambda out, *more: attempt(lambda: run_script("train_sft.py", [
        "--data", manifest, "--init", base, "--stage", "multi", "--rank", "4", "--batch-size", "2",
        "--out", out, *more]))
    run_dir = os.path.join(work, "run")
    train(run_dir, "--steps", "1")

    def sample(folder, *argv):
        return sample_cell(["--refs", os.path.join(ROOT, "assets", "orange_circle.png"), *argv],
                           folder + "-out")

    def resume(folder):
        _, text, status = train(folder, "--steps", "2", "--resume")
        line = said(text, "error:", "TRACEBACK", "note:")
        return ("resumed" if status == 0 else f"exit {status}") + (f"; {line}" if line else "")

    def load_ae(folder):
        ae, text, status = attempt(lambda: WT.load_ae(ae_cfg,
                                                      os.path.join(folder, "ae.safetensors")),
                                   WT.CheckpointError)
        line = said(text, "error:", "TRACEBACK", "note:")
        return f"loaded{'; ' + line if line else ''}" if status == 0 else line

    # kind -> (file, where a good copy lives, how a user hands it over, its tensors, header, another
    # architecture's)
    kinds = {
        "DiT (sample.py --model)": ("flux.safetensors", base,
                                    lambda d: sample(d, "--model", d, "--arch", "toy"),
                                    flux.state_dict(), None, M.Flux(small).state_dict()),
        "text encoder (sample.py --model)": ("text_encoder.safetensors", base,
                                             lambda d: sample(d, "--model", d, "--arch", "toy"),
                                             text.state_dict(),
                                             None, EN.ByteTextEncoder(cfg, dim=32).state_dict()),
        "AE (weights.load_ae)": ("ae.safetensors", None, load_ae,
                                 EN.AutoEncoder(ae_cfg.ae).state_dict(), None,
                               EN.AutoEncoder(ae_other).state_dict()),
        "adapter (sample.py --lora, train --adapter)": (
            "adapter.safetensors", None,
            lambda d: sample(d, "--model", base, "--arch", "toy", "--lora",
                             os.path.join(d, "adapter.safetensors")),
            adapter, meta, ML.adapter_state_dict(other)),
        "resume: adapter.safetensors": ("ckpt-0000001/adapter.safetensors", run_dir, resume,
                                        adapter, meta, ML.adapter_state_dict(other)),
        "resume: train_state.pt": ("ckpt-0000001/train_state.pt", run_dir, resume, None, None,
                                   None),
    }
    rows = []
    for fault, write in {**BAD_WEIGHTS, **ADAPTER_FAULTS}.items():
        row = [fault]
        for k, (kind, (name, src, use, *tensors)) in enumerate(kinds.items()):
            # a weights_only pickle
            how = STATE_FAULTS.get(fault, "-") if name.endswith(".pt") else write
            # a header only an adapter has
            if fault in ADAPTER_FAULTS and not kind.startswith("adapter"):
                how = "-"                                                 # (resume reads no header)
            if how == "-":
                row.append(how)
                continue
            folder, path = broken_copy(os.path.join(work, "w", f"{len(rows)}-{k}"), src, name, how,
                                       *tensors)
            row.append(use(folder) + ("; RAN CODE FROM THE PICKLE" if os.path.exists(path + ".ran")
                                      else ""))
        rows.append([cell(c, work + os.sep) for c in row])
    return ["fault", *kinds], rows

# -----------------------------------------------------------------------------
# manifests: the faults and the Manifests table

def manifest_faults(root):
    """fault -> the manifest line (bytes) of a record with it, to follow a good record whose id is
    "a"."""
    good = dict(id="b", target="t.png", prompt="a thing", refs=["r.png"])
    line = lambda **kw: json.dumps(dict(good, **kw)).encode()
    return {
        "path with ..": line(refs=["../outside.png"]),
        "absolute path": line(refs=[os.path.join(root, "r.png")]),
        "symlink out of the root": line(refs=["link.png"]),
        "id given twice": line(id="a"),
        "id that is a path (../x)": line(id="../x"),
        "0 references": line(refs=[]),
        f"100 references (MAX_REFS = {D.MAX_REFS})": line(refs=["r.png"] * 100),
        "empty prompt": line(prompt=" "),
        "10,000-character prompt": line(prompt="a" * 10_000),
        "lone surrogate in the prompt": line(prompt="a \ud800 b"),
        "non-UTF-8 byte in the prompt": line(prompt="caf\xe9").replace(b"\\u00e9", b"\xe9"),
        "invalid JSON": line()[:-1],
        "100,000-deep nested array": b"[" * 100_000 + b"]" * 100_000,
        "a field nested 20 deep": line(attrs=json.loads("[" * 20 + "]" * 20)),
        "5,000-digit id": line()[:-1] + b', "id": ' + b"9" * 5000 + b"}",
        "300-digit id": line()[:-1] + b', "id": ' + b"9" * 300 + b"}",
        "lone surrogate in a caption": line(captions=["a \ud800"]),
        "a 17 MiB line": b'{"prompt": "' + b"a" * (17 << 20) + b'"}',
    }

def write_bad_manifests(work):
    """work/manifests/m{k}.jsonl: a good record with id "a" (line 1), then one with a fault
    (line 2); the images they name, and work/outside.png linked from inside -> {fault: manifest
    path}."""
    root = os.path.join(work, "manifests")
    os.makedirs(root, exist_ok=True)
    Image.new("RGB", (32, 32), (0, 128, 255)).save(os.path.join(root, "t.png"))
    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(root, "r.png"))
    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(work, "outside.png"))
    os.symlink(os.path.join(work, "outside.png"), os.path.join(root, "link.png"))
    good = json.dumps(dict(id="a", target="t.png", prompt="a thing", refs=["r.png"])).encode()
    out = {}
    for k, (fault, bad) in enumerate(manifest_faults(root).items()):
        out[fault] = os.path.join(root, f"m{k}.jsonl")
        open(out[fault], "wb").write(good + b"\n" + bad + b"\n")
    return out

def manifest_rows(work):
    """One row per manifest fault: data.py check and training, on [a good record, the bad one]; and
    a manifest that is an endless stream (/dev/zero: the read must be bounded)."""
    rows = [[fault, check_cell(m, 2), dataset_cell(m, 2)]
            for fault, m in write_bad_manifests(work).items()]
    rows.append(["the manifest is /dev/zero", check_cell("/dev/zero", 1),
                 dataset_cell("/dev/zero", 1)])
    return [[cell(c, work + os.sep) for c in r] for r in rows]

# -----------------------------------------------------------------------------
# masks: the Masks table (a cut-out's alpha channel is its mask)

# rows, columns of the subject in a 32 x 32 mask: 4 of 64 toy tokens
SUBJECT = (slice(8, 16), slice(4, 12))

def mask_array(inside, outside, channels):
    a = np.empty((32, 32, len(inside)) if channels else (32, 32), np.uint8)
    a[...] = outside
    a[SUBJECT] = inside
    return a

def palette_mask(path, rgba_palette):
    # index 1 (the subject) opaque, index 0 transparent: by a tRNS index, or by an RGBA palette
    p = Image.fromarray(mask_array(1, 0, False), "P")
    if rgba_palette:
        p.putpalette([255, 255, 255, 0, 30, 200, 30, 255] + [0] * 1016, "RGBA")
        p.save(path)
    else:
        p.putpalette([255, 255, 255, 30, 200, 30] + [0] * 762)
        p.save(path, transparency=0)

# fault -> writer(path) of a 32 x 32 mask whose subject is SUBJECT
MASK_FAULTS = {
    "gray (white = subject)": lambda p: Image.fromarray(mask_array(255, 0, False), "L").save(p),
    "RGBA cut-out, transparent white": lambda p: Image.fromarray(
        mask_array((200, 30, 30, 255), (255, 255, 255, 0), True), "RGBA").save(p),
    "RGBA cut-out, transparent black": lambda p: Image.fromarray(
        mask_array((200, 30, 30, 255), (0, 0, 0, 0), True), "RGBA").save(p),
    "LA cut-out": lambda p: Image.fromarray(mask_array((40, 255), (255, 0), True), "LA").save(p),
    "palette, transparent index": lambda p: palette_mask(p, False),
    "palette with alpha (RGBA palette)": lambda p: palette_mask(p, True),
    "RGB, a transparent colour (tRNS)": lambda p: Image.fromarray(
        mask_array((9, 9, 9), (255, 255, 255), True)).save(p, transparency=(255, 255, 255)),
    "RGBA, opaque (white = subject)": lambda p: Image.fromarray(
        mask_array((255, 255, 255, 255), (0, 0, 0, 255), True), "RGBA").save(p),
}

def write_mask_manifests(work):
    """work/masks/m{k}.jsonl: one record (a 32 x 32 target, one reference) with each MASK_FAULTS
    mask -> {fault: manifest path}."""
    root = os.path.join(work, "masks")
    os.makedirs(root, exist_ok=True)
    Image.new("RGB", (32, 32), (0, 128, 255)).save(os.path.join(root, "t.png"))
    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(root, "r.png"))
    out = {}
    for k, (fault, write) in enumerate(MASK_FAULTS.items()):
        write(os.path.join(root, f"mask{k}.png"))
        out[fault] = os.path.join(root, f"m{k}.jsonl")
        with open(out[fault], "w") as f:
            f.write(json.dumps(dict(target="t.png", prompt="a thing", refs=["r.png"], masks=[
                f"mask{k}.png"])) + "\n")
    return out

def mask_rows(work):
    """One row per MASK_FAULTS mask: data.py check, and the tokens training counts inside
    (of 64; the subject is 4)."""
    rows = []
    for fault, m in write_mask_manifests(work).items():
        ds, text, status = attempt(lambda: DS.ManifestDataset(m, size=32, ref_size=16, token_px=4),
                                   D.DataError)
        item, text, status = attempt(lambda: ds[0]) if ds else (None, text, status)
        tokens = (f"{int((item['masks'][0] > 0.5).sum())} of {item['masks'].shape[1]} tokens inside"
                  if item else said(text, "error:", "TRACEBACK"))
        rows.append([fault, check_cell(m, 1), tokens])
    return [[cell(c, work + os.sep) for c in r] for r in rows]

# -----------------------------------------------------------------------------
# evaluation: the Eval table (toy.py eval reads what rewards.py eval reads)

def eval_faults():
    """fault -> (records, {image name: size}) of a manifest for `toy.py eval` and the generated
    images."""
    rec = lambda **kw: dict(dict(target="t.png", prompt="a red circle", refs=["r.png"],
                                 captions=["red circle"]), **kw)
    return {
        "id given twice": ([rec(id="a"), rec(id="a")], {"a.png": 32}),
        'ids 1 and "1" (one file)': ([rec(id=1), rec(id="1")], {"1.png": 32}),
        "id 000001 beside the record at position 1 without an id": (
            [rec(id="000001"), rec()], {"000001.png": 32}),
        "an image of another size": ([rec(id="a"), rec(id="b"), rec(id="c")],
                                     {"a.png": 32, "b.png": 32, "c.png": 16}),
    }

def write_eval_case(root, records, images):
    """root/m.jsonl of `records` (with the t.png and r.png they name) and root/gen/ holding `images`
    ({name: side}, white squares) -> the eval arguments --manifest M --images DIR."""
    os.makedirs(os.path.join(root, "gen"))
    Image.new("RGB", (32, 32), (0, 128, 255)).save(os.path.join(root, "t.png"))
    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(root, "r.png"))
    with open(os.path.join(root, "m.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for name, side in images.items():
        Image.new("RGB", (side, side), (255, 255, 255)).save(os.path.join(root, "gen", name))
    return ["--manifest", os.path.join(root, "m.jsonl"), "--images", os.path.join(root, "gen")]

def eval_rows(work):
    """One row per eval fault: what `toy.py eval` scores, counts and notes."""
    rows = []
    for k, (fault, case) in enumerate(eval_faults().items()):
        root = os.path.join(work, "eval", str(k))
        _, text, status = attempt(lambda: toy.main(["eval", *write_eval_case(root, *case)]))
        report = (json.load(open(os.path.join(root, "gen", "metrics.json"))) if status in (0, 1)
                  else None)
        got = f"exit {status}: {said(text, 'scored', 'error:', 'TRACEBACK')}"
        if report and report["bad"]:
            got += f"; bad: line {report['bad'][0]['line']}: {report['bad'][0]['why']}"
        if said(text, "note:"):
            got += f"; {said(text, 'note:')}"
        rows.append([fault, cell(got, root + os.sep, 300)])
    return rows

# -----------------------------------------------------------------------------
# all of it

def markdown(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(r) + " |" for r in rows])

def build_parser():
    parser = argparse.ArgumentParser(prog="python -m reliability.badinput", epilog=__doc__,
                                     description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--table", default=None, help="also write the markdown tables to this file")
    parser.add_argument("--no-dist", action="store_true",
                        help="leave out the torchrun rows (about a minute)")
    return parser

def badinput(args):
    """Every fault above through every entry point: one markdown table per family (printed; --table
    writes it)."""
    work = args.work or tempfile.mkdtemp(prefix="badinput-")
    tables = [("Images", ["fault", "load_image", "sample.py --refs", "data.py check",
                          "training (ManifestDataset)"],
               image_rows(work)),
              ("Weights", *weight_rows(work)),
              ("Manifests", ["fault", "data.py check", "training (ManifestDataset)"],
               manifest_rows(work)),
              ("Masks (the subject: 4 of 64 toy tokens)",
               ["mask", "data.py check", "training (ManifestDataset)"], mask_rows(work)),
              ("Eval (toy.py eval = rewards.py eval with the toy's scorers)", ["fault", "observed"],
               eval_rows(work)),
              ("Outputs, concurrent writers, pre-flight, one error path", ["fault", "observed"],
               output_rows(work))]
    if not args.no_dist:
        tables.append(("Ranks (torchrun, 2 CPU ranks)", ["fault", "observed"], dist_rows(work)))
    text = "\n\n".join(f"{title}:\n\n{markdown(header, rows)}" for title, header, rows in tables)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    return tables


if __name__ == "__main__":
    badinput(build_parser().parse_args())

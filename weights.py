"""
Where the weights come from and how they load (BFL's util.py seam): model.py's networks never see a
path.

  - each weight's source: a flag's value, else an environment variable, else the preset's Hugging
    Face repo; found on this machine (a file, a folder, the local Hugging Face cache) or listed as
    missing, every missing one of a command in one message with its download line
  - safetensors files: atomic writes, headers read without the tensors, pickles refused unread
  - strict loading: every key, shape and kind checked against the module (meta is fine), then the
    tensors go straight to their device; an FSDP-sharded module gets its piece
  - the FLUX.1 models (DiT, AE, T5 + CLIP) and the toy checkpoint folder, each loaded in one place
  - low-VRAM inference: a model on the GPU only while it runs, the DiT's blocks streamed, fp8
    weights
"""
import glob
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import encoders as EN
import model as M

class CheckpointError(ValueError):
    """Weights that cannot be loaded (absent, corrupt, another architecture): the message names the
    file and what is wrong, and says how to get the right one."""

# -----------------------------------------------------------------------------
# where every weight comes from: a flag's value, else an environment variable, else the preset's
# Hugging Face repo. Nothing here touches the network: a repo id is looked up in the local Hugging
# Face cache only, so an offline machine fails at once (no retries), and every missing weight of a
# command is listed in one message.

WEIGHT_ENV = {"dit": "MULTICRAFTER_DIT", "ae": "MULTICRAFTER_AE", "t5": "MULTICRAFTER_T5",
              "clip": "MULTICRAFTER_CLIP"}
T5_REPO, CLIP_TEXT_REPO = "google/t5-v1_1-xxl", "openai/clip-vit-large-patch14"
# licence to accept first; FLUX.1-schnell and FLUX.2 [klein] 4B (Apache-2.0) are not gated
GATED = {"black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-dev",
         "black-forest-labs/FLUX.2-klein-9B",
         "black-forest-labs/FLUX.2-klein-base-9B", "black-forest-labs/FLUX.2-klein-9B-kv"}

@dataclass(frozen=True)
class Weight:
    """One weight a command needs. source: a local file or folder, or a Hugging Face repo id; file:
    the file inside the folder/repo (None for a transformers model folder: config.json plus its
    weights); flag/env: what sets it."""
    what: str
    source: str
    file: str = None
    flag: str = ""
    env: str = ""

# --clip is the reward's CLIP
WEIGHT_FLAGS = {"dit": "--model", "ae": "--ae", "t5": "--t5", "clip": "--clip-text"}

def add_weight_flags(g):
    """The flags naming where the encoders' weights are, as sample.py, cache.py and the trainers
    take them (each also read from its environment variable; flux2.py's text model likewise)."""
    g.add_argument("--ae", default=None, help="FLUX: ae.safetensors, a file, folder or repo id "
                   "(env MULTICRAFTER_AE)")
    g.add_argument("--t5", default=None, help="FLUX: the T5-XXL folder or repo id (env "
                   "MULTICRAFTER_T5)")
    g.add_argument("--clip-text", default=None, help="FLUX: the CLIP-L text encoder folder or repo "
                   "id (env MULTICRAFTER_CLIP)")
    g.add_argument("--text-model", default=None, help="FLUX.2: the text model's folder or repo id "
                   "(Qwen3 for klein; env MULTICRAFTER_TEXT)")

def flux_weights(cfg, parts=("dit", "ae", "t5", "clip"), dit=None, ae=None, t5=None, clip=None,
                 dit_flag="--model"):
    """The weights a FLUX command needs, each from its flag's value (the keyword), else its
    environment variable, else the preset's default. dit_flag: the command's DiT flag, for the
    message (the trainers' is --init). -> [Weight] in the order of parts."""
    cfg = M.get_config(cfg) if isinstance(cfg, str) else cfg
    given = dict(dit=dit, ae=ae, t5=t5, clip=clip)
    default = dict(dit=(cfg.repo_id, cfg.flow_file, "the DiT"),
                   ae=(cfg.repo_id, cfg.ae_file, "the AutoEncoder"),
                   t5=(T5_REPO, None, "T5-XXL"), clip=(CLIP_TEXT_REPO, None, "CLIP-L"))
    out = []
    for part in parts:
        repo, file, what = default[part]
        source = given[part] or os.environ.get(WEIGHT_ENV[part]) or repo
        out.append(Weight(what, source, file, dit_flag if part == "dit" else WEIGHT_FLAGS[part],
                          WEIGHT_ENV[part]))
    return out

def looks_local(source):
    # a repo id is exactly "owner/name"; anything else (or a path whose first part exists here) is a
    # local path
    return (source.startswith((".", "/", "~")) or source.endswith(".safetensors")
            or source.count("/") != 1 or os.path.isdir(source.split("/")[0]))

def _model_folder(folder):
    # a transformers model folder: its config plus weights in any of the layouts from_pretrained
    # reads
    return os.path.isfile(os.path.join(folder, "config.json")) and \
        any(glob.glob(os.path.join(folder, p)) for p in ("*.safetensors", "*.bin",
                                                         "*.safetensors.index.json"))

def locate(w):
    """-> (local path, None) or (None, why not): a file, a folder, or a repo id found in the local
    Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache
    src = os.path.expanduser(w.source)
    if os.path.isfile(src):
        return (src, None) if w.file is not None else (None, f"{src}: a file, not a model folder")
    if os.path.isdir(src):
        if w.file is None:
            return ((src, None) if _model_folder(src)
                    else (None, f"{src}: no config.json and weights in the folder"))
        p = os.path.join(src, w.file)
        return (p, None) if os.path.isfile(p) else (None, f"{src}: folder has no {w.file}")
    if looks_local(src):
        return None, f"{src}: no such file or folder"
    hit = try_to_load_from_cache(src, "config.json" if w.file is None else w.file)
    if not isinstance(hit, str):
        return None, f"{src}: not in the Hugging Face cache"
    if w.file is not None:
        return hit, None
    folder = os.path.dirname(hit)                                  # the cached snapshot of the repo
    return (folder, None) if _model_folder(folder) else (None, f"{src}: cached without its weights")

def how_to_get(w):
    """The download command for a weight (and the licence step for a gated repo)."""
    repo = w.source if not looks_local(w.source) else None
    set_it = f"or set {w.flag} / {w.env} to a local copy" if w.env else f"or pass {w.flag} DIR"
    if repo is None:
        return set_it
    gated = (f"gated: accept the licence on https://huggingface.co/{repo}, `hf auth login`, then "
             if repo in GATED else ("not gated: " if repo.startswith("black-forest-labs/") else ""))
    return f"{gated}`hf download {repo}{' ' + w.file if w.file else ''}`, {set_it}"

def check_weights(weights):
    """Every weight on this machine -> their local paths (in order); else one CheckpointError
    listing every missing one with how to get it. Instant and offline: nothing is downloaded here or
    later."""
    found, missing = [], []
    for w in weights:
        path, why = locate(w)
        found.append(path)
        if path is None:
            missing.append(f"{w.what}{' ' + w.file if w.file else ''} ({why}; {how_to_get(w)})")
    if missing:
        raise CheckpointError(f"{len(missing)} of {len(weights)} weights missing: "
                              + " | ".join(missing))
    return found

def resolve_file(path_or_repo, filename):
    """A local .safetensors file, a folder holding `filename`, or a Hugging Face repo id from the
    local cache -> its local path."""
    return check_weights([Weight(filename, path_or_repo, filename, "--model")])[0]

# -----------------------------------------------------------------------------
# safetensors files

def save_safetensors(tensors, path, metadata=None):
    """tensors -> path as safetensors, atomically (a temporary name, then rename), readable like any
    file the user creates: safetensors >= 0.7 writes mode 0600, which hides checkpoints from the
    user's group."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)                   # reading the umask means setting it: put it straight back
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

def unreadable(path, e):
    """The CheckpointError for a file safetensors cannot read: what it is instead, when that is
    plain."""
    if not os.path.isfile(path):
        return CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":     # a zip (torch.save) or a raw pickle
        return CheckpointError(f"{path}: a pickle (torch.save) file, not safetensors: refused "
                               f"unread, as pickles can run code (convert it once with "
                               f"safetensors.torch.save_file where you trust it)")
    return CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})")

def read_header(path, metadata=False):
    """{key: (shape, dtype)} from a safetensors header, without reading the tensors
    (and its metadata dict when asked). Only safetensors: a pickle (.pt/.bin/.ckpt) given instead is
    refused here, never unpickled."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), DTYPES.get(s.get_dtype(), s.get_dtype()))
            return (out, f.metadata() or {}) if metadata else out
    except Exception as e:
        raise unreadable(path, e) from None

# -----------------------------------------------------------------------------
# tensors FSDP shards (training.shard): each rank holds one piece of a DTensor; files hold whole
# tensors

def sharded(module):
    # whether FSDP shards this module's parameters (its weights are then DTensors)
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())

def whole(t):
    """A tensor in one piece: an FSDP-sharded DTensor gathered from every rank (a collective: every
    rank calls it for the same tensors in the same order), any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t

def placed_like(param, value):
    """A whole tensor (a file's) laid out as `param` is: this rank's piece where FSDP shards param
    and value has its shape (every rank holds the whole value, so no communication), else value
    itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor) or not torch.is_tensor(value) or value.shape != param.shape:
        return value
    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh,
                             param.placements, src_data_rank=None)

# -----------------------------------------------------------------------------
# strict loading

def _some(items, n=4, sep=", "):
    # a few of many names, so a file of another architecture still gives one readable line
    items = sorted(items)
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

def _is_float(dtype):
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point

def match_state(path, have, want, what="the model"):
    """A file's tensors have {key: (shape, dtype)} against a module's want {key: tensor}
    (meta is fine): every key, shape and kind (floating or not) must match, or one CheckpointError
    lists what differs. A floating dtype that differs is not an error (the loader casts it): -> the
    stored dtypes whose cast loses precision, for a note (fp16/bf16 -> fp32 is exact and silent: the
    shipped toy checkpoint is fp16, run in fp32)."""
    common = set(want) & set(have)
    missing, unexpected = set(want) - set(have), set(have) - set(want)
    shapes = [f"{k} {have[k][0]} != expected {tuple(want[k].shape)}" for k in common
              if tuple(have[k][0]) != tuple(want[k].shape)]
    name = lambda dtype: str(dtype).removeprefix("torch.")
    kinds = [f"{k} {name(have[k][1])} != expected {name(want[k].dtype)}" for k in common
             if _is_float(have[k][1]) != want[k].dtype.is_floating_point]
    problems = ([f"missing keys: {_some(missing)}"] if missing else []) + \
               ([f"unexpected keys: {_some(unexpected)}"] if unexpected else []) + \
               ([f"wrong shapes: {_some(shapes, 2, '; ')}"] if shapes else []) + \
               ([f"wrong dtypes: {_some(kinds, 2, '; ')}"] if kinds else [])
    if problems:
        raise CheckpointError(f"{path}: does not match {what} ({' | '.join(problems)})")
    # bf16 <-> fp16 is lossy too
    lossy = lambda a, b: a != b and torch.finfo(b).bits <= torch.finfo(a).bits
    return sorted({name(have[k][1]) for k in common if _is_float(have[k][1])
                   and lossy(have[k][1], want[k].dtype)})

def note_cast(path, stored, dtype):
    if stored:
        print(f"note: {path} stores {', '.join(stored)} tensors: cast to "
              f"{str(dtype).removeprefix('torch.')}", file=sys.stderr)

def load_state_dict_strict(model, path, device="cpu", dtype=None,
                           prefix_strip=("model.diffusion_model.",), assign=True):
    """Check `path`'s keys, shapes and dtypes against `model` (which may live on the meta device),
    then load it with assign=True: tensors go straight from the file to `device`, never a second
    copy of the model. Floating tensors become `dtype` (default: the model's own), with a note when
    that loses precision. assign=False copies into the model's own parameters instead, which an
    optimizer built on them must keep seeing (resume)."""
    from safetensors.torch import load_file
    strip = lambda k: next((k[len(p):] for p in prefix_strip if k.startswith(p)), k)
    have = {strip(k): v for k, v in read_header(path).items()}
    want = model.state_dict()
    if dtype is not None:
        want = {k: v.to("meta", dtype) if v.is_floating_point() else v for k, v in want.items()}
    note_cast(path, match_state(path, have, want), dtype or next(iter(want.values())).dtype)
    try:
        sd = load_file(path, device=str(device))
    except Exception as e:
        raise CheckpointError(f"{path}: could not read tensors "
                              f"({str(e).splitlines()[0]})") from None
    sd = {strip(k): v.to(want[strip(k)].dtype) if v.is_floating_point() else v
          for k, v in sd.items()}
    model.load_state_dict({k: placed_like(want[k], v) for k, v in sd.items()}, strict=True,
                          assign=assign)
    return model

# -----------------------------------------------------------------------------
# the FLUX.1 models (FLUX.2's: flux2.load_models, on the same machinery)

def load_flux(cfg, path=None, device="cpu", dtype=torch.bfloat16):
    """The DiT from `path` (file, folder or repo id; default: $MULTICRAFTER_DIT, else the preset's
    official repo), made on the meta device and filled from the file: never a second copy of 24
    GB."""
    cfg = M.get_config(cfg) if isinstance(cfg, str) else cfg
    path = check_weights(flux_weights(cfg, ("dit",), dit=path))[0]
    with torch.device("meta"):
        model = M.Flux(cfg)
    return load_state_dict_strict(model, path, device, dtype).eval()

def load_ae(cfg, path=None, device="cpu", dtype=torch.float32):
    """The AutoEncoder from `path` (default: $MULTICRAFTER_AE, else the preset's repo; the toy's
    pixel-unshuffle AE has no weights and needs no file)."""
    cfg = M.get_config(cfg) if isinstance(cfg, str) else cfg
    if not cfg.ae.ch_mult:
        return EN.AutoEncoder(cfg.ae).to(device)
    path = check_weights(flux_weights(cfg, ("ae",), ae=path))[0]
    with torch.device("meta"):
        ae = EN.AutoEncoder(cfg.ae)
    return load_state_dict_strict(ae, path, device, dtype).eval()

def load_t5_clip(cfg, t5=None, clip=None, device="cpu", dtype=torch.bfloat16):
    """T5-XXL + CLIP-L (encoders.T5CLIPEncoder) from t5, clip: local folders or repo ids (default:
    $MULTICRAFTER_T5 / $MULTICRAFTER_CLIP, else the official repos). A folder transformers cannot
    read is a CheckpointError too."""
    try:
        t5, clip = check_weights(flux_weights(cfg, ("t5", "clip"), t5=t5, clip=clip))
        return EN.T5CLIPEncoder(cfg.max_txt_len, t5, clip, dtype).to(device)
    except (OSError, CheckpointError) as e:
        raise CheckpointError("could not load the text encoders: "
                              f"{str(e).splitlines()[0]}") from None

def load_models(cfg, dit=None, ae=None, t5=None, clip=None, device="cpu", dtype=torch.bfloat16,
                parts=("dit", "ae", "t5", "clip"), dit_flag="--model"):
    """The DiT, AE and text encoders a FLUX.1 command needs (parts; "t5" brings CLIP too), every
    missing weight listed at once before the first loads. -> (flux, ae, text encoder), None for a
    part not asked for."""
    check_weights(flux_weights(cfg, parts, dit, ae, t5, clip, dit_flag))
    return (load_flux(cfg, dit, device, dtype) if "dit" in parts else None,
            load_ae(cfg, ae, device, dtype) if "ae" in parts else None,
            load_t5_clip(cfg, t5, clip, device, dtype) if "t5" in parts else None)

# -----------------------------------------------------------------------------
# the toy checkpoint: a folder holding the DiT and the byte encoder (and the adapter a demo samples
# with), as the toy's stage base writes it (runs.checkpoint_files) and every toy command reads it

TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")     # shipped
TOY_DIT, TOY_TEXT = "flux.safetensors", "text_encoder.safetensors"
TOY_ADAPTER = "adapter.safetensors"

def byte_encoder_header(path):
    """A toy text encoder file's header -> (txt_pad, null_prompt): the padding it was trained with
    (a file without one was trained padded to max_len, the first toy world's) and whether it was
    trained on the empty prompt (train_sft.py --drop-prompt), the baseline text guidance
    subtracts."""
    meta = read_header(path, metadata=True)[1]
    pad = meta.get("txt_pad", "max")
    if pad not in ("max", "longest"):
        raise CheckpointError(
            f"{path}: its header's txt_pad {pad[:40]!r} is neither 'max' nor 'longest'")
    return pad, meta.get("null_prompt") == "trained"

def load_byte_encoder(text, path, **kw):
    """The toy's text encoder from `path` (load_state_dict_strict's keywords), with what its header
    says."""
    load_state_dict_strict(text, path, **kw)
    text.txt_pad, text.null_prompt = byte_encoder_header(path)
    return text

def learned_empty_prompt(preset, toy_folder):
    # text guidance needs a text encoder that learned "": T5 + CLIP did; a toy one says so in its
    # file's header
    encoder = os.path.join(toy_folder or "", TOY_TEXT)
    return preset != "toy" or (toy_folder is not None and os.path.isfile(encoder) and
                               byte_encoder_header(encoder)[1])

def toy_files(flux, text):
    """A toy checkpoint's files -> {file: (state dict, header metadata)}: the byte encoder's header
    says how it was trained (byte_encoder_header reads it back)."""
    meta = {"txt_pad": text.txt_pad, **({"null_prompt": "trained"} if text.null_prompt else {})}
    return {TOY_DIT: (flux.state_dict(), None), TOY_TEXT: (text.state_dict(), meta)}

def load_toy(folder, cfg=None, into=None):
    """A toy checkpoint folder -> (flux, text encoder, its adapter's path or None), in fp32
    (assets/toy stores fp16), the byte encoder padding as it was trained. cfg: the toy preset (or
    one with overrides). into: the (flux, text) to copy the weights into instead of new modules: a
    resume, whose optimizer holds their parameters."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder (a toy checkpoint holds {TOY_DIT} and "
                              f"{TOY_TEXT})")
    cfg = cfg or M.get_config("toy")
    flux, text = into or (M.Flux(cfg), EN.ByteTextEncoder(cfg))
    load_state_dict_strict(flux, os.path.join(folder, TOY_DIT), assign=into is None)
    load_byte_encoder(text, os.path.join(folder, TOY_TEXT), assign=into is None)
    adapter = os.path.join(folder, TOY_ADAPTER)
    return flux, text, adapter if os.path.isfile(adapter) else None

# -----------------------------------------------------------------------------
# low-VRAM inference: a model on the GPU only while it runs, the DiT's blocks streamed one at a
# time, fp8 weights

@contextmanager
def resident(module, device, home="cpu"):
    """`module` on `device` inside the block, back on `home` after: the text encoders and the AE
    each occupy the GPU only while they run (T5-XXL alone is 9.5 GB in bf16), not during the
    denoising loop."""
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)

def stream_blocks(flux, device):
    """Keep the DiT's double and single blocks in CPU memory (pinned when CUDA is there) and give
    each block its weights on `device` only while it runs: the GPU holds one block's weights
    (flux-dev: 0.36 GB of bf16 for a double block) instead of all 57 (23 GB). Everything else
    (embedders, final layer, buffers) moves to `device` for good. Outputs are bit-identical: the
    same weights, copied. For sampling; an optimizer would see the CPU tensors. -> the hook handles
    (remove() them, and the blocks keep their CPU weights)."""
    blocks = list(flux.double_blocks) + list(flux.single_blocks)
    for name, child in flux.named_children():
        if name not in ("double_blocks", "single_blocks"):
            child.to(device)
    pin = torch.cuda.is_available() and torch.device(device).type == "cuda"
    handles = []
    for block in blocks:
        block.to("cpu")
        for m in block.modules():        # buffers (a MoE-LoRA's routing counts) are small: resident
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = b.to(device)
        params = list(block.parameters())
        stored = [p.data.pin_memory() if pin else p.data for p in params]
        def load(mod, args, params=params, stored=stored):
            # copy=True: a fresh tensor even when device is the CPU
            for p, s in zip(params, stored):
                p.data = s.to(device, non_blocking=True, copy=True)
        def unload(mod, args, out, params=params, stored=stored):
            for p, s in zip(params, stored):          # the device copy is freed here
                p.data = s
        handles += [block.register_forward_pre_hook(load), block.register_forward_hook(unload)]
        for p, s in zip(params, stored):
            p.data = s
    return handles

FP8_MAX = 448.0        # the largest float8_e4m3fn value

class Fp8Linear(nn.Linear):
    """An nn.Linear whose weight is stored in float8_e4m3fn (1 byte a weight, half of bf16) with one
    fp32 scale per output row, so each row's largest |w| maps to FP8_MAX and small rows keep their 3
    mantissa bits. Computed in the input's dtype, or autocast's (bf16 on GPU): y = (x W8^T) * s + b,
    the scale applied to the output, so no dequantized copy of W exists beyond one cast of W8."""
    @classmethod
    def from_linear(cls, lin):
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        w = lin.weight.detach().float()                                              # (out, in)
        scale = w.abs().amax(1).clamp_min(1e-12) / FP8_MAX                          # (out,)
        new.weight = nn.Parameter((w / scale[:, None]).to(torch.float8_e4m3fn), requires_grad=False)
        new.register_buffer("weight_scale", scale)
        new.bias = lin.bias
        return new

    def forward(self, x):
        # meta has no autocast
        on = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        dt = torch.get_autocast_dtype(x.device.type) if on else x.dtype
        y = F.linear(x.to(dt), self.weight.to(dt)) * self.weight_scale.to(dt)
        return y if self.bias is None else y + self.bias.to(dt)

def store_fp8(flux):
    """Every nn.Linear of the DiT's blocks (98% of its weights) -> Fp8Linear, in place; an adapter's
    own small layers (LoRA down/up, router) stay as they are, the frozen layer it wraps is
    converted. Convert where the weights are (load on the CPU, convert, then move: the bf16 model
    never has to fit the GPU). -> flux."""
    for blocks in (flux.double_blocks, flux.single_blocks):
        for name, mod in list(blocks.named_modules()):
            parent_name, _, child = name.rpartition(".")
            parent = blocks.get_submodule(parent_name) if parent_name else blocks
            if (type(mod) is nn.Linear
                and (child == "base" or not isinstance(getattr(parent, "base", None), nn.Linear))):
                setattr(parent, child, Fp8Linear.from_linear(mod))
    return flux


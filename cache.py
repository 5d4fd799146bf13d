"""
The cache: text embeddings and VAE latents of a manifest computed once, so that training never holds
T5-XXL (9 GB) or the VAE in GPU memory (`train_sft.py --cache DIR` instead of --data).

    python cache.py --manifest data/toy/manifest.jsonl --out data/toy_cache --model toy --checkpoint assets/toy
    python cache.py --manifest my/manifest.jsonl --out my/cache --model flux-dev --size 512 --ref-size 320
    python cache.py --manifest my/manifest.jsonl --out my/cache --model flux-dev \\
        --ae weights/ae.safetensors --t5 weights/t5 --clip-text weights/clip    # local copies of FLUX's encoders

DIR holds safetensors shards of --shard-size records and index.json (the settings, and per record
its shard, prompt, bucket); every file is written under a temporary name and renamed. CachedDataset
reads it back with the keys of a ManifestDataset item (the pixels replaced by latents), every
shard's header checked before the first step: each record's tensors there, their shapes and dtypes,
against what the model takes (CachedDataset.check).
"""
import json, os, re, sys

import torch
from tqdm import tqdm

import cli as CL
import data as D
import dataset as DS
import encoders as EN
import flux2 as F2
import model as M
import weights as WT

def load_encoders(model, checkpoint=None, device="cpu", t5=None, clip=None, text_model=None):
    """(text encoder, autoencoder, config) of a preset. The toy's text encoder comes from a
    checkpoint folder (default assets/toy) holding text_encoder.safetensors; for FLUX, checkpoint is
    the AE (file, folder or repo id) and t5, clip the text encoders (weights.flux_weights: else the
    environment, else the official repos); FLUX.2's text model is text_model (flux2.weights)."""
    cfg, device = F2.get_config(model), torch.device(device)
    dtype = M.weight_dtype(device)
    if F2.is_flux2(cfg):
        _, ae, text = F2.load_models(cfg, ae=checkpoint, text=text_model, device=device,
                                     dtype=dtype, parts=("ae", "text"))
        return text, ae, cfg
    if model == "toy":
        text = EN.ByteTextEncoder(cfg)
        WT.load_byte_encoder(text, WT.resolve_file(checkpoint or WT.TOY_DIR, WT.TOY_TEXT))
        return text.to(device).eval(), WT.load_ae(cfg, device=device), cfg
    _, ae, text = WT.load_models(cfg, ae=checkpoint, t5=t5, clip=clip, device=device, dtype=dtype,
                                 parts=("ae", "t5", "clip"))
    return text, ae, cfg

@torch.no_grad()
def write_cache(manifest, out, model="toy", checkpoint=None, size=None, ref_size=None, buckets=None,
                shard_size=256, device=None, t5=None, clip=None, force=False, text_model=None):
    """`python cache.py`: per record txt (L, C), y (C_vec,), latent (z, h, w), ref_latents
    (N, z, r, r), masks, mask_valid and points, in safetensors shards of shard_size records, then
    index.json (settings, and per record its shard, prompt, bucket). Every file is written to a
    temporary name and renamed. out must not hold what it reads (data.check_output; force:
    --force)."""
    device = torch.device(device) if device else M.default_device()
    # bad weights fail before any work
    text, ae, cfg = load_encoders(model, checkpoint, device, t5, clip, text_model)
    size, ref_size = size or cfg.image_size, ref_size or cfg.ref_size
    ds = DS.ManifestDataset(manifest, size, ref_size, cfg.token_px, buckets)
    reads = [p for r in ds.records for p in [r["target"], *r["refs"], *(r["masks"] or [])]]
    D.check_output([out], [manifest, checkpoint, *reads], force)
    os.makedirs(out, exist_ok=True)
    # every prompt's embedding at the encoder's full length, padding positions included
    # (they attend to their own prompt only): a batch then takes the first txt_len of its longest
    # prompt, as a toy encoder padding to the batch's longest does with --data
    # (training.conditioning); T5 always pads to max_len
    longest = getattr(text, "txt_pad", "max") == "longest"
    if longest:
        text.txt_pad = "max"
    from safetensors.torch import save
    records, tensors = [], {}
    for i in tqdm(range(len(ds)), desc="cache", disable=len(ds) < 2):
        item, key = ds[i], str(i % shard_size)
        with M.autocast(device):
            txt, y = text([item["prompt"]])                            # (1, max_len, C), (1, C_vec)
            latent = ae.encode(item["target"][None].to(device, M.param_dtype(ae)))[0]    # (z, h, w)
            ref_latents = ae.encode(item["refs"].to(device, M.param_dtype(ae)))       # (N, z, r, r)
        tensors.update({f"{key}/txt": txt[0], f"{key}/y": y[0], f"{key}/latent": latent.float(),
                        f"{key}/ref_latents": ref_latents.float(), f"{key}/masks": item["masks"],
                        f"{key}/mask_valid": item["mask_valid"]})
        tensors.update({f"{key}/points{j}": p for j, p in enumerate(item["points"])})
        shard = f"shard_{i // shard_size:05d}.safetensors"
        # its length alone (encoders.ByteTextEncoder.tokenize), or all
        n = len(item["prompt"].encode("utf-8"))
        records.append(dict(shard=shard, key=key, source=item["index"], prompt=item["prompt"],
                            bucket=list(item["bucket"]), n_refs=len(item["refs"]),
                            txt_len=max(1, min(n, txt.shape[1])) if longest else txt.shape[1]))
        if (i + 1) % shard_size == 0 or i + 1 == len(ds):
            blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            D.write_atomic(os.path.join(out, shard), lambda f: f.write(blob))
            tensors = {}
    index = dict(manifest=os.path.abspath(manifest), model=model, size=size, ref_size=ref_size,
                 token_px=ds.token_px, buckets=ds.buckets, skipped=ds.skipped, records=records)
    D.write_atomic(os.path.join(out, "index.json"), lambda f: f.write(json.dumps(index).encode()))
    print(f"cached {len(records)} records in {-(-len(records) // shard_size)} shards: {out}",
          file=sys.stderr)
    return out

class CachedDataset(torch.utils.data.Dataset):
    """A cache folder as a dataset: the keys of DS.ManifestDataset's items (but the pixels) plus txt
    (max_len, C), txt_len (the positions a batch keeps at least), y (C_vec,), latent (z, h, w) and
    ref_latents (N, z, r, r). pixels=True also reads target and refs from the original manifest
    (for rewards or pictures; the latents replace them for training). cfg: every record's tensors
    are checked against that model's (check), from the headers."""
    def __init__(self, folder, pixels=False, cfg=None):
        self.folder = folder
        try:
            with open(os.path.join(folder, "index.json"), "rb") as f:
                # what manifests get: nothing raises
                self.index = D.parse_json(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise D.DataError(f"{folder}: not a cache folder ({e})") from None
        ints = lambda *v: all(type(x) is int for x in v)
        record = (lambda r: isinstance(r, dict) and isinstance(r.get("key"), str)
                  and isinstance(r.get("prompt"), str)
                  and ints(r.get("n_refs"), r.get("txt_len", 1))
                  and isinstance(r.get("bucket"), list)
                  and len(r["bucket"]) == 2 and ints(*r["bucket"])
                  and re.fullmatch(r"shard_\d{5,}\.safetensors", str(r.get("shard"))))
        needs = ("records", "ref_size") + (("manifest", "size", "token_px", "buckets") if pixels
                                           else ())
        if not (isinstance(self.index, dict) and all(k in self.index for k in needs)
                and ints(self.index["ref_size"]) and isinstance(self.index["records"], list)
                and all(map(record, self.index["records"]))):
            raise D.DataError(
                f"{folder}: index.json is not a cache index (written by `cache.py`): rebuild it")
        self.records = self.index["records"]
        # every shard's header read now (no tensors): a missing, truncated or foreign shard stops
        # the run before its first step with one line, not hours in with a traceback
        self.have = {}                                      # (shard, tensor name) -> (shape, dtype)
        for shard in sorted({r["shard"] for r in self.records}):
            try:
                self.have.update(((shard, k), v)
                                 for k, v in WT.read_header(os.path.join(folder, shard)).items())
            except WT.CheckpointError as e:
                raise D.DataError(f"cache shard {e}") from None
        lost = [(r, n) for r in self.records for n in self.names(r)
                if (r["shard"], n) not in self.have]
        if lost:
            (r, n), more = lost[0], len(lost) - 1
            raise D.DataError(f"{os.path.join(folder, r['shard'])}: cache shard without {n!r}"
                            f"{f' (and {more} more)' if more else ''}: rebuild the "
                            "cache with `python cache.py`")
        if cfg is not None:
            self.check(cfg)
        self.source = (None if not pixels else DS.ManifestDataset(
            self.index["manifest"], self.index["size"], self.index["ref_size"],
            self.index["token_px"], self.index["buckets"]))

    FIELDS = ("txt", "y", "latent", "ref_latents", "masks", "mask_valid")

    def expected(self, r, cfg):
        """{tensor name: (shape, what dtype)} that the model `cfg` takes for record r
        (None: any size there): a packed token is token_px pixels, 2 x 2 latent pixels of
        in_channels / 4 channels."""
        (H, W), N, tp, z = r["bucket"], r["n_refs"], cfg.token_px, cfg.in_channels // 4
        side = 2 * self.index["ref_size"] // tp
        want = dict(txt=((cfg.max_txt_len, cfg.context_in_dim), "float"),
                    y=((cfg.vec_in_dim,), "float"), latent=((z, 2 * H // tp, 2 * W // tp), "float"),
                    ref_latents=((N, z, side, side), "float"),
                    masks=((N, (H // tp) * (W // tp)), "float"), mask_valid=((N,), torch.bool))
        return {**{f"{r['key']}/{k}": v for k, v in want.items()},
                **{f"{r['key']}/points{j}": ((None, 2), torch.int64) for j in range(N)}}

    def check(self, cfg):
        """Every record's tensors (shapes and dtypes, from the shard headers) against what the model
        `cfg` takes, and its txt_len: one DataError naming the first that differs
        (a cache of another model or size, a foreign or older shard), before the first step rather
        than in a collate hours in."""
        for r in self.records:
            shard = os.path.join(self.folder, r["shard"])
            for name, (shape, dtype) in self.expected(r, cfg).items():
                have, kind = self.have[(r["shard"], name)]
                fits = (len(have) == len(shape) and all(w is None or w == h
                                                        for w, h in zip(shape, have)))
                if not fits or not (kind.is_floating_point if dtype == "float" else kind == dtype):
                    raise D.DataError(f"{shard}: {name} is {tuple(have)} {kind} where the model "
                                      f"takes {tuple(shape)} {dtype} (a cache of another model, "
                                      f"size or version): rebuild it with `python cache.py`")
            if not 1 <= r.get("txt_len", cfg.max_txt_len) <= cfg.max_txt_len:
                raise D.DataError(f"{os.path.join(self.folder, 'index.json')}: record {r['key']} "
                                  f"of {r['shard']} has txt_len {r['txt_len']}, outside "
                                  f"1..{cfg.max_txt_len}: rebuild the cache")

    @classmethod
    def names(cls, r):
        # the tensors __getitem__ reads for record r, by their names in its shard
        return [f"{r['key']}/{k}"
                for k in cls.FIELDS + tuple(f"points{j}" for j in range(r["n_refs"]))]

    def __len__(self):
        return len(self.records)

    def bucket_of(self, i):
        return tuple(self.records[i]["bucket"]), self.records[i]["n_refs"]

    def __getitem__(self, i):
        from safetensors import safe_open
        r = self.records[i]
        shard = os.path.join(self.folder, r["shard"])
        with D.file_errors(shard, "read the cache shard", D.DataError), safe_open(
                shard, framework="pt") as f:
            get = lambda name: f.get_tensor(f"{r['key']}/{name}")   # (changed since it was checked)
            item = {k: get(k) for k in self.FIELDS}
            item["points"] = [get(f"points{j}") for j in range(r["n_refs"])]
        item.update(prompt=r["prompt"], index=i, bucket=tuple(r["bucket"]),
                    txt_len=r.get("txt_len", len(item["txt"])))
        if self.source is not None:
            src = self.source[r["source"]]
            item.update(target=src["target"], refs=src["refs"])
        return item

# -----------------------------------------------------------------------------

def main(argv=None):
    p = CL.Parser(description=__doc__)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="toy", choices=F2.presets())
    p.add_argument("--checkpoint", default=None, help="toy: the folder with "
                   "text_encoder.safetensors (default assets/toy)")
    WT.add_weight_flags(p)
    p.add_argument("--size", type=int, default=None,
                   help="square target side (default: the preset's, 32 toy, 512 flux)")
    p.add_argument("--buckets", nargs="+", default=None,
                   help="aspect buckets HxW instead of --size, e.g. 512x512")
    p.add_argument("--ref-size", type=int, default=None,
                   help="default: the preset's, 16 toy, 320 flux")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--device", default=None)
    D.add_force(p)
    args = p.parse_args(argv)
    try:
        # the pre-flight: the manifest, the flags and every weight, all named at once before any
        # work
        pf = D.Preflight()
        pf.file("--manifest", args.manifest)
        pf.need(not args.buckets or all(re.fullmatch(r"\d+x\d+", b) for b in args.buckets),
                f"--buckets {' '.join(args.buckets or [])}: write each as HxW, e.g. 384x640")
        cfg = F2.get_config(args.model)
        if args.model == "toy":
            pf.need(not (args.ae or args.t5 or args.clip_text or args.text_model), "--ae, --t5, "
                    "--clip-text, --text-model: FLUX's weights; the toy's "
                    "text encoder is --checkpoint")
            pf.folder("--checkpoint", args.checkpoint, [WT.TOY_TEXT])
        else:
            pf.need(not args.checkpoint, "--checkpoint: the toy's; FLUX's AE is --ae")
            pf.weights(F2.weights(cfg, ("ae", "text"), ae=args.ae, text=args.text_model)
                       if F2.is_flux2(cfg) else
                       WT.flux_weights(cfg, ("ae", "t5", "clip"), ae=args.ae, t5=args.t5,
                                       clip=args.clip_text))
        pf.check()
        buckets = [tuple(map(int, b.split("x"))) for b in args.buckets] if args.buckets else None
        write_cache(args.manifest, args.out, args.model, args.checkpoint if args.model == "toy"
                    else args.ae, args.size, args.ref_size, buckets, max(1, args.shard_size),
                    args.device, args.t5, args.clip_text, args.force, args.text_model)
    except (D.DataError, D.InputError, WT.CheckpointError, *D.FILE_ERRORS) as e:
        # user mistakes: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())

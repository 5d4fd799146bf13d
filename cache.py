"""
The cache: text embeddings and VAE latents of a manifest computed once, so that training never holds T5-XXL (9 GB) or
the VAE in GPU memory (`train_sft.py --cache DIR` instead of --data).

    python cache.py --manifest data/toy/manifest.jsonl --out data/toy_cache --model toy --checkpoint assets/toy
    python cache.py --manifest my/manifest.jsonl --out my/cache --model flux-dev --size 512 --ref-size 320

DIR holds safetensors shards of --shard-size records and index.json (the settings, and per record its shard, prompt,
bucket); every file is written under a temporary name and renamed. CachedDataset reads it back with the keys of a
ManifestDataset item (the pixels replaced by latents), every shard's header checked before the first step.
"""
import argparse, json, os, re, sys

import torch
from tqdm import tqdm

import data as D
import flux2 as F2
import model as M

def load_encoders(model, checkpoint=None, device="cpu"):
    """(text encoder, autoencoder, config) of a preset. The toy's text encoder comes from a checkpoint folder
    (default assets/toy) holding text_encoder.safetensors; --checkpoint for FLUX is the AE file/folder/repo (FLUX.2's
    text model: $MULTICRAFTER_TEXT or the preset's)."""
    cfg, device = F2.get_config(model), torch.device(device)
    dtype = M.weight_dtype(device)
    if F2.is_flux2(cfg):
        _, ae, text = F2.load_models(cfg, ae=checkpoint, device=device, dtype=dtype, parts=("ae", "text"))
        return text, ae, cfg
    if model == "toy":
        text = M.ByteTextEncoder(cfg)
        M.load_byte_encoder(text, M.resolve_file(checkpoint or M.TOY_DIR, "text_encoder.safetensors"))
        return text.to(device).eval(), M.load_ae(cfg, device=device), cfg
    ae = M.load_ae(cfg, checkpoint, device, dtype)
    return M.T5CLIPEncoder(cfg.max_txt_len, dtype=dtype).to(device), ae, cfg

@torch.no_grad()
def write_cache(manifest, out, model="toy", checkpoint=None, size=None, ref_size=None, buckets=None,
                shard_size=256, device=None):
    """`python cache.py`: per record txt (L, C), y (C_vec,), latent (z, h, w), ref_latents (N, z, r, r),
    masks, mask_valid and points, in safetensors shards of shard_size records, then index.json (settings, and
    per record its shard, prompt, bucket). Every file is written to a temporary name and renamed."""
    device = torch.device(device) if device else M.default_device()
    text, ae, cfg = load_encoders(model, checkpoint, device)          # bad weights fail before any work
    size, ref_size = size or cfg.image_size, ref_size or cfg.ref_size
    ds = D.ManifestDataset(manifest, size, ref_size, cfg.token_px, buckets)
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save
    records, tensors = [], {}
    for i in tqdm(range(len(ds)), desc="cache", disable=len(ds) < 2):
        item, key = ds[i], str(i % shard_size)
        with M.autocast(device):
            txt, y = text([item["prompt"]])                                                # (1, L, C), (1, C_vec)
            latent = ae.encode(item["target"][None].to(device, M.param_dtype(ae)))[0]       # (z, h, w)
            ref_latents = ae.encode(item["refs"].to(device, M.param_dtype(ae)))             # (N, z, r, r)
        tensors.update({f"{key}/txt": txt[0], f"{key}/y": y[0], f"{key}/latent": latent.float(),
                        f"{key}/ref_latents": ref_latents.float(), f"{key}/masks": item["masks"],
                        f"{key}/mask_valid": item["mask_valid"]})
        tensors.update({f"{key}/points{j}": p for j, p in enumerate(item["points"])})
        shard = f"shard_{i // shard_size:05d}.safetensors"
        records.append(dict(shard=shard, key=key, source=item["index"], prompt=item["prompt"],
                            bucket=list(item["bucket"]), n_refs=len(item["refs"])))
        if (i + 1) % shard_size == 0 or i + 1 == len(ds):
            blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            D.write_atomic(os.path.join(out, shard), lambda f: f.write(blob))
            tensors = {}
    index = dict(manifest=os.path.abspath(manifest), model=model, size=size, ref_size=ref_size,
                 token_px=ds.token_px, buckets=ds.buckets, skipped=ds.skipped, records=records)
    D.write_atomic(os.path.join(out, "index.json"), lambda f: f.write(json.dumps(index).encode()))
    print(f"cached {len(records)} records in {-(-len(records) // shard_size)} shards: {out}", file=sys.stderr)
    return out

class CachedDataset(torch.utils.data.Dataset):
    """A cache folder as a dataset: the keys of D.ManifestDataset's items (but the pixels) plus txt (L, C),
    y (C_vec,), latent (z, h, w) and ref_latents (N, z, r, r). pixels=True also reads target and refs from the
    original manifest (for rewards or pictures; the latents replace them for training)."""
    def __init__(self, folder, pixels=False):
        self.folder = folder
        try:
            with open(os.path.join(folder, "index.json"), "rb") as f:
                self.index = D.parse_json(f.read().decode("utf-8"))         # what manifests get: nothing raises
        except (OSError, ValueError) as e:
            raise D.DataError(f"{folder}: not a cache folder ({e})") from None
        record = lambda r: isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("prompt"), str) \
            and isinstance(r.get("n_refs"), int) and re.fullmatch(r"shard_\d{5,}\.safetensors", str(r.get("shard"))) \
            and isinstance(r.get("bucket"), list)
        needs = ("records",) + (("manifest", "size", "ref_size", "token_px", "buckets") if pixels else ())
        if not (isinstance(self.index, dict) and all(k in self.index for k in needs) and
                isinstance(self.index["records"], list) and all(map(record, self.index["records"]))):
            raise D.DataError(f"{folder}: index.json is not a cache index (written by `cache.py`): rebuild it")
        self.records = self.index["records"]
        # every shard's header read now (no tensors): a missing, truncated or foreign shard stops the run before
        # its first step with one line, not hours in with a traceback
        have = set()                                                      # (shard, tensor name)
        for shard in sorted({r["shard"] for r in self.records}):
            try:
                have.update((shard, k) for k in M.read_header(os.path.join(folder, shard)))
            except M.CheckpointError as e:
                raise D.DataError(f"cache shard {e}") from None
        lost = [(r, n) for r in self.records for n in self.names(r) if (r["shard"], n) not in have]
        if lost:
            (r, n), more = lost[0], len(lost) - 1
            raise D.DataError(f"{os.path.join(folder, r['shard'])}: cache shard without {n!r}"
                            f"{f' (and {more} more)' if more else ''}: rebuild the cache with `python cache.py`")
        self.source = None if not pixels else D.ManifestDataset(
            self.index["manifest"], self.index["size"], self.index["ref_size"], self.index["token_px"],
            self.index["buckets"])

    FIELDS = ("txt", "y", "latent", "ref_latents", "masks", "mask_valid")

    @classmethod
    def names(cls, r):
        # the tensors __getitem__ reads for record r, by their names in its shard
        return [f"{r['key']}/{k}" for k in cls.FIELDS + tuple(f"points{j}" for j in range(r["n_refs"]))]

    def __len__(self):
        return len(self.records)

    def bucket_of(self, i):
        return tuple(self.records[i]["bucket"]), self.records[i]["n_refs"]

    def __getitem__(self, i):
        from safetensors import safe_open
        r = self.records[i]
        with safe_open(os.path.join(self.folder, r["shard"]), framework="pt") as f:
            get = lambda name: f.get_tensor(f"{r['key']}/{name}")
            item = {k: get(k) for k in self.FIELDS}
            item["points"] = [get(f"points{j}") for j in range(r["n_refs"])]
        item.update(prompt=r["prompt"], index=i, bucket=tuple(r["bucket"]))
        if self.source is not None:
            src = self.source[r["source"]]
            item.update(target=src["target"], refs=src["refs"])
        return item

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="toy", choices=F2.presets())
    p.add_argument("--checkpoint", default=None, help="toy: folder with text_encoder.safetensors; flux: the AE")
    p.add_argument("--size", type=int, default=None, help="square target side (default: the preset's, 32 toy, 512 flux)")
    p.add_argument("--buckets", nargs="+", default=None, help="aspect buckets HxW instead of --size, e.g. 512x512")
    p.add_argument("--ref-size", type=int, default=None, help="default: the preset's, 16 toy, 320 flux")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    try:
        buckets = None
        if args.buckets:
            if not all(re.fullmatch(r"\d+x\d+", b) for b in args.buckets):
                raise D.InputError(f"--buckets {' '.join(args.buckets)}: write each as HxW, e.g. 384x640")
            buckets = [tuple(map(int, b.split("x"))) for b in args.buckets]
        write_cache(args.manifest, args.out, args.model, args.checkpoint, args.size, args.ref_size, buckets,
                    max(1, args.shard_size), args.device)
    except (D.DataError, D.InputError, M.CheckpointError, OSError) as e:   # user mistakes: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())

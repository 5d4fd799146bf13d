"""
The training datasets: a manifest's records as the model trains on them. The target resized to cover
its aspect bucket and center-cropped, references resized to ref_size on their longer side and
centered on white (data.preprocess_ref), each mask as the share of every packed token inside the
subject (token order of model.pack), correspondences as (reference token, target token) pairs;
batches dealt to ranks, and collate. data.py reads and checks the manifests these build on.
"""
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

import data as D

# -----------------------------------------------------------------------------
# geometry: buckets, resizing, masks and points on the token grid

def uno_buckets(resolution=512, multiple=16):
    """UNO's 11 (H, W) aspect buckets (defined at 512 px), rescaled to `resolution` and floored to
    `multiple`."""
    base = [(256, 768), (320, 768), (320, 704), (384, 640), (448, 576), (512, 512)]
    return [(h * resolution // 512 // multiple * multiple,
             w * resolution // 512 // multiple * multiple)
            for h, w in base + [(w, h) for h, w in base[:-1]]]

def nearest_bucket(w, h, buckets):
    # the (H, W) bucket closest in log aspect ratio, so 2:1 and 1:2 are equally far from 1:1; ties:
    # the first
    return min(buckets, key=lambda b: abs(math.log(w / h) - math.log(b[1] / b[0])))

def cover_box(w, h, W, H):
    """Resize (w, h), keeping its aspect, to cover (W, H); -> resized (rw, rh) and the center crop's
    (left, top)."""
    s = max(W / w, H / h)
    rw, rh = max(W, round(w * s)), max(H, round(h * s))
    return rw, rh, (rw - W) // 2, (rh - H) // 2

def cover(img, W, H, resample):
    rw, rh, left, top = cover_box(*img.size, W, H)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), resample)
    return img.crop((left, top, left + W, top + H))

def to_tensor(img):
    # PIL RGB (W, H) -> (3, H, W) float in [-1, 1]
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1

def points_to_tokens(points, ref_grid, target_grid):
    """Correspondences -> token pairs for SCAL.
    points: per reference a (P_i, 4) tensor of (ry, rx, ty, tx) in [0, 1] coordinates of the
    *processed* reference and target; ref_grid, target_grid: (rows, cols) in tokens. Returns per
    reference a LongTensor (P_i', 2) of (reference token, target token), row-major like model.pack,
    each pair once (sorted). A target token claimed by two references is dropped from both: MOSAIC
    keeps the references' correspondences disjoint, and a token that is partly one subject and
    partly another is a clean target for neither. One reference token may keep several target tokens
    (SCAL then averages over them)."""
    def token(y, x, grid):
        h, w = grid
        return (y * h).floor().long().clamp(0, h - 1) * w + (x * w).floor().long().clamp(0, w - 1)
    pairs = [torch.unique(torch.stack([token(p[:, 0], p[:, 1], ref_grid),
                                       token(p[:, 2], p[:, 3], target_grid)], 1),
                          dim=0) for p in points]                      # [(P_i, 2)]
    claims = torch.zeros(target_grid[0] * target_grid[1], dtype=torch.long)
    for p in pairs:
        claims[p[:, 1].unique()] += 1                                  # references per target token
    return [p[claims[p[:, 1]] == 1] for p in pairs]

# -----------------------------------------------------------------------------
# the training dataset

class ManifestDataset(torch.utils.data.Dataset):
    """Training records of a manifest (or UNO JSON list), validated when constructed.

    size: the target side (square); or buckets [(H, W), ...] (multiples of token_px): each record
    goes to the bucket closest to its aspect, resized to cover it and center-cropped. ref_size:
    references are resized to ref_size on their longer side and centered on a white ref_size x
    ref_size square (the paper: 320; toy: 16). token_px: pixels per packed token.
    Records with more than MAX_REFS references, and later records repeating an "id", are skipped.
    verify=True decodes every image now (as `check` does); by default only headers are read, and an
    image that then fails to decode in __getitem__ (truncated, or an empty mask) is replaced by the
    next good record of the same bucket key, with a warning, counted in n_failed: an epoch never
    stops half-way, and nothing is dropped silently (DataLoader workers each count and warn for
    themselves). self.skipped: [(line, field, why)] for records dropped here (n_skipped of them)."""
    needs_target = True
    def __init__(self, manifest, size=32, ref_size=16, token_px=4, buckets=None, verify=False):
        self.manifest, self.ref_size, self.token_px = manifest, ref_size, token_px
        self.buckets = [tuple(b) for b in buckets] if buckets else [(size, size)]
        if any(d % token_px for b in self.buckets for d in b) or ref_size % token_px:
            raise D.InputError(f"sizes {self.buckets} and ref_size {ref_size} must be multiples "
                               f"of token_px {token_px}")
        parsed, self.skipped = D.read_manifest(manifest)
        root = os.path.dirname(os.path.abspath(manifest))
        self.records, self.keys = [], []
        for line, r, bad in D.validate_all(parsed, root, deep=verify):
            if r is not None and r["target"] is None and self.needs_target:
                bad = [("target", "missing: training needs a target (RL records have none)")]
            if bad:
                self.skipped += [(line, field, why) for field, why in bad]
                continue
            self.records.append(dict(r, line=line))
            # RL: no target
            bucket = nearest_bucket(*r["size"], self.buckets) if r["size"] else self.buckets[0]
            self.keys.append((bucket, len(r["refs"])))
        self.n_skipped = len({line for line, _, _ in self.skipped})
        self.n_failed, self.failed = 0, set()
        if self.skipped:
            line, field, why = self.skipped[0]
            print(f"warning: {manifest}: skipped {self.n_skipped} of "
                  f"{self.n_skipped + len(self.records)} records (first: line {line}: {field}: "
                  f"{why}); `python data.py check {manifest}` lists all", file=sys.stderr)
        if not self.records:
            raise D.DataError(f"{manifest}: no usable records")

    def __len__(self):
        return len(self.records)

    def bucket_of(self, i):
        """((H, W), number of references): records with equal keys stack into one batch."""
        return self.keys[i]

    def __getitem__(self, i):
        # a record that fails to load is replaced by the next good one of its bucket key
        # (see the class docstring)
        for j in ((i + d) % len(self) for d in range(len(self))):
            if self.keys[j] != self.keys[i] or j in self.failed:
                continue
            try:
                return self.load(j)
            except (D.InputError, D.DataError) as e:
                self.failed.add(j)
                self.n_failed += 1
                print(f"warning: {self.manifest}:{self.records[j]['line']}: {e}; using another "
                      f"record ({self.n_failed} failed so far)", file=sys.stderr)
        raise D.DataError(f"{self.manifest}: no record of bucket {self.keys[i]} loads")

    def load(self, i):
        r, tp, R = self.records[i], self.token_px, self.ref_size
        (H, W), N = self.keys[i]
        img = D.load_image(r["target"])
        rw, rh, left, top = cover_box(*img.size, W, H)
        target = to_tensor(cover(img, W, H, Image.LANCZOS))                              # (3, H, W)

        # masks: the same resize and crop (BOX filter = exact area shares), then the share of each
        # token
        masks, valid = torch.zeros(N, (H // tp) * (W // tp)), torch.zeros(N, dtype=torch.bool)
        for k, path in enumerate(r["masks"] or []):
            m = D.load_mask(path)
            if m.shape[::-1] != img.size:
                raise D.DataError(
                    f"{path}: mask size {m.shape[1]}x{m.shape[0]} differs from the target's")
            m = np.asarray(cover(Image.fromarray(m, "F"), W, H, Image.BOX))                 # (H, W)
            # mean over each tp x tp block (numpy: a tiny torch op in a loader costs a thread-pool
            # wake-up)
            masks[k], valid[k] = torch.from_numpy(m.reshape(H // tp, tp, W // tp,
                                                            tp).mean((1, 3)).ravel()), True

        # references, and each correspondence moved along with the pixels it names: in the reference
        # square y' = (y * fh + ftop) / R, in the cropped target y' = (y * rh - top) / H
        # (same for x)
        refs, pts = [], []
        given = r["points"] or [None] * N                 # no points, or null for a reference: none
        for k, path in enumerate(r["refs"]):
            ref = D.load_image(path)
            fw, fh, fleft, ftop = D.fit_box(*ref.size, R)             # where preprocess_ref puts it
            refs.append(to_tensor(D.preprocess_ref(ref, R)))                             # (3, R, R)
            # (P, 4): ry rx ty tx
            p = torch.tensor(given[k] or [], dtype=torch.float64).reshape(-1, 4)
            scale = torch.tensor([fh / R, fw / R, rh / H, rw / W], dtype=torch.float64)
            shift = torch.tensor([ftop / R, fleft / R, -top / H, -left / W], dtype=torch.float64)
            p = p * scale + shift
            pts.append(p[((p[:, 2:] >= 0) & (p[:, 2:] <= 1)).all(1)])        # cropped away: dropped
        points = points_to_tokens(pts, (R // tp, R // tp), (H // tp, W // tp))          # [(P_k, 2)]
        return dict(target=target, refs=torch.stack(refs), masks=masks, mask_valid=valid,
                    points=points, prompt=r["prompt"], index=i, bucket=(H, W))

class PromptDataset(ManifestDataset):
    """RL records (stage 3): a prompt and references (+ optional captions and kinds); a target is
    not needed (ignored if there). Validation, skipping and replacing as ManifestDataset. Item:
    dict(prompt, refs [PIL, ref_size x ref_size on white, as training and sampling see them],
    captions, kinds, index)."""
    needs_target = False

    def __init__(self, manifest, ref_size=16):
        super().__init__(manifest, size=ref_size, ref_size=ref_size, token_px=1)

    def load(self, i):
        r = self.records[i]
        return dict(prompt=r["prompt"], refs=[D.preprocess_ref(D.load_image(p), self.ref_size)
                                              for p in r["refs"]],
                    captions=r.get("captions"), kinds=r.get("kinds"), index=i)

def collate(items):
    """Items of one bucket key -> a batch: tensors stacked (target (B, 3, H, W), refs
    (B, N, 3, R, R), masks (B, N, T), mask_valid (B, N), and txt/y/latent/ref_latents from a
    CachedDataset), prompts [str], index and a cache's txt_len (B,),
    points per reference a LongTensor (P, 3) of (batch index, reference token, target token):
    [:, :2] are AttentionProbe's rows, [:, 2] scal_loss's targets."""
    keys = {(tuple(it["bucket"]), it["masks"].shape[0]) for it in items}
    if len(keys) != 1:
        raise ValueError(
            f"collate needs items of one bucket key, got {sorted(keys)} (batches() groups them)")
    out = {}
    for k, v in items[0].items():
        if k == "points":
            out[k] = [torch.cat([torch.cat([torch.full((len(p), 1), b), p], 1)
                                 for b, p in enumerate(per_ref)])
                      for per_ref in zip(*(it["points"] for it in items))]
        elif k == "prompt":
            out["prompts"] = [it[k] for it in items]
        elif k in ("index", "txt_len"):
            out[k] = torch.tensor([it[k] for it in items])
        elif k == "bucket":
            out[k] = tuple(v)
        else:
            out[k] = torch.stack([it[k] for it in items])
    return out

def batches(dataset, batch_size, seed, epoch, rank=0, world_size=1, drop_last=True):
    """This rank's batches (lists of dataset indices) for one epoch.
    Deterministic in (seed, epoch): each bucket key's indices are shuffled and cut into batches
    (a batch never mixes keys, so its items stack), then all batches are shuffled together. That one
    global list is dealt round-robin, batch b to rank b % world_size, so a run sees the same batches
    in the same order on 1 or 8 ranks (step s of an 8-rank run holds global batches 8s .. 8s+7).
    Every rank gets the same number of batches, as DDP steps in lock-step: drop_last=True drops
    partial batches and the last (< world_size) batches; drop_last=False keeps partial batches and
    repeats the first ones to fill the last round."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    rng = np.random.default_rng([seed, epoch])
    groups = {}
    for i in range(len(dataset)):
        groups.setdefault(dataset.bucket_of(i), []).append(i)
    out = []
    for key in sorted(groups):
        idx = rng.permutation(groups[key]).tolist()
        out += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)
                if not drop_last or s + batch_size <= len(idx)]
    out = [out[j] for j in rng.permutation(len(out))]
    if drop_last:
        out = out[:len(out) - len(out) % world_size]
    elif out:
        out += [out[j % len(out)] for j in range(-len(out) % world_size)]
    return out[rank::world_size]

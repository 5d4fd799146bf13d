"""
Data: manifests of (target, prompt, references, masks, correspondences), their checker and cache, the
procedural toy world, and curation of your own videos and photos into manifests.

    python data.py check data/manifest.jsonl        # every bad record as file:line: field: why; exit 1 if any
    python data.py toy --out data/toy --n 10000 --seed 0 --subjects 2 3
    python data.py cache --manifest data/toy/manifest.jsonl --out data/toy_cache --model toy --checkpoint assets/toy
    python data.py curate --videos my/clips --out data/mine       # or --pairs my/pairs; faces need insightface
    python data.py curate-objects --manifest musar/manifest.jsonl --out data/musar   # masks from captions
    python data.py correspond --manifest data/mine/manifest.jsonl --out data/mine_pts   # SCAL points (DINOv2)

A manifest is JSONL, one record a line, paths relative to the manifest's folder (and confined to it):
  {"target": "t.jpg", "prompt": "a cat and a dog", "refs": ["cat.png", "dog.png"], "masks": ["m0.png", "m1.png"],
   "points": [[[ry, rx, ty, tx], ...], ...]}
masks[i] is subject i's region in the target (grayscale, the target's size; pixel / 255 is the share inside).
points[i] are optional correspondences in [0, 1] coordinates (ry, rx in reference i; ty, tx in the target) for
MOSAIC's SCAL. RL records have no target and may give "kinds" ("face"/"object") and "captions"; the toy
world adds "attrs" (each subject's shape/colour/pattern) and "boxes". Optional "id". UNO's JSON list of
{"prompt", "image_paths", "image_tgt_path"} is read too.

What training gets (ManifestDataset -> batches -> collate): the target resized to cover its aspect bucket and
center-cropped, references resized to ref_size on their longer side and centered on white, each mask as the
share of every packed token inside the subject (token order of model.pack), correspondences as (reference
token, target token) pairs. One packed token is token_px = 2 * ae.factor pixels on a side: 16 for FLUX, 4 for the toy.
"""
import argparse, json, math, os, re, shutil, sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import model as M
from sample import (DEFAULTS, MAX_REFS, TOY_DIR, InputError, check_file, fit_box, load_image, param_dtype,
                    preprocess_ref, read_image, utf8, write_atomic)

class DataError(ValueError):
    """A bad manifest or record: the message says which and why."""

# -----------------------------------------------------------------------------
# reading manifests and validating records

def resolve(root, rel):
    """A manifest path -> a path inside root. Absolute paths, '..' and symlinks that lead out of the root are
    refused: a manifest from elsewhere must not make us read (or cache, or train on) files outside its folder."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise DataError(f"not a path: {rel!r}")
    if os.path.isabs(rel):
        raise DataError(f"{rel}: absolute paths are not allowed (paths are relative to the manifest)")
    if ".." in re.split(r"[/\\]", rel):
        raise DataError(f"{rel}: '..' is not allowed (paths must stay inside the manifest's folder)")
    path = os.path.join(root, rel)
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise DataError(f"{rel}: resolves outside the manifest's folder (a link to {real})")
    return path

def _json_list(text):
    # (line, item) for each item of a JSON list; json.loads would lose where each item starts
    dec, ws = json.JSONDecoder(), re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, seen = 1, 0                                         # newlines counted up to `seen` so far
    while text[pos:pos + 1] != "]":
        item, end = dec.raw_decode(text, pos)
        line, seen = line + text.count("\n", seen, pos), pos
        yield line, item
        pos = ws.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = ws.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise json.JSONDecodeError("expected ',' or ']'", text, pos)

def read_manifest(path):
    """-> records [(line, parsed JSON)], problems [(line, "record", why)] for lines that do not parse.
    JSONL; a file that starts with '[' (and is not .jsonl) is UNO's JSON list, each item at the line it starts."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest ({e.strerror})") from None
    data = data.removeprefix(b"\xef\xbb\xbf")                                    # a UTF-8 byte-order mark
    records, problems = [], []
    if data.lstrip()[:1] == b"[" and not path.endswith(".jsonl"):
        try:
            records.extend(_json_list(data.decode("utf-8")))
        except UnicodeDecodeError as e:
            problems.append((data.count(b"\n", 0, e.start) + 1, "record", f"not UTF-8 (byte 0x{data[e.start]:02x})"))
        except json.JSONDecodeError as e:
            problems.append((e.lineno, "record", f"invalid JSON ({e.msg} at column {e.colno})"))
        return records, problems
    for line, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            records.append((line, json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError as e:
            problems.append((line, "record", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
        except json.JSONDecodeError as e:
            problems.append((line, "record", f"invalid JSON ({e.msg} at column {e.colno})"))
    return records, problems

def image_size(path):
    """Upright (W, H) from the header alone: EXIF orientations 5-8 swap the sides, as load_image's transpose does
    (read from what Image.open parsed; im.getexif() would decode a whole PNG)."""
    def upright(im):
        exif = Image.Exif()
        if "exif" in im.info:
            exif.load(im.info["exif"])
        return im.size[::-1] if exif.get(0x0112, 1) in (5, 6, 7, 8) else im.size
    return read_image(path, upright)

def load_mask(path):
    # -> float32 (H, W) in [0, 1]; binary masks give exact areas, soft (fractional) masks are kept as shares.
    # load_image reads 16-bit, palette and EXIF-rotated files exactly as it reads the target they belong to
    m = np.asarray(load_image(path).convert("L"), dtype=np.float32) / 255
    if m.max() < 0.5:
        raise DataError(f"{path}: empty mask (no pixel above 127)")
    return m

def _file(root, rel, field, deep, bad, mask=False):
    # one image of a record -> (path, (W, H)); a problem goes to `bad` and gives (None, None)
    try:
        path = resolve(root, rel)
        if not deep:
            return path, image_size(path)
        if mask:
            return path, load_mask(path).shape[::-1]
        return path, load_image(path).size
    except DataError as e:
        bad.append((field, str(e)))
    except InputError as e:                                     # names the joined path: show the manifest's
        bad.append((field, str(e).replace(os.path.join(root, ""), "", 1)))
    return None, None

UNO_KEYS = ("image_paths", "image_path", "image_tgt_path")
ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")     # a record id names files (rewards.py eval): no paths

PER_REF = {"kinds": ('one of "face"/"object"', lambda v: v in ("face", "object")),
           "captions": ("a string", lambda v: isinstance(v, str)),
           "attrs": ("an object", lambda v: isinstance(v, dict))}

def _bad_point(p):
    return not (isinstance(p, list) and len(p) == 4 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in p))

def validate(rec, root, deep=True):
    """One parsed record -> (normalized dict, or None if bad; [(field, why)] listing every problem).
    deep=True decodes every image (finds truncated files and empty masks); deep=False reads only headers, cheap
    enough to run over a million-record manifest when a trainer starts."""
    if not isinstance(rec, dict):
        return None, [("record", f"not a JSON object (a {type(rec).__name__})")]
    if "refs" not in rec and any(k in rec for k in UNO_KEYS):          # UNO's names for the same fields
        refs = rec.get("image_paths", [rec["image_path"]] if "image_path" in rec else None)
        rec = dict(rec, refs=refs, target=rec.get("image_tgt_path"))
    bad = []
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        bad.append(("prompt", "missing or empty (need a string)"))
    elif not utf8(prompt):
        bad.append(("prompt", "not valid Unicode (a lone surrogate escape such as \\ud800)"))
    key = rec.get("id")
    if key is not None and not (isinstance(key, int) and not isinstance(key, bool) or
                                isinstance(key, str) and ID.fullmatch(key)):
        bad.append(("id", f"{str(key)[:60]!r} is not an integer or a name of letters, digits, '.', '_', '-'"))
    refs = rec.get("refs")
    if not isinstance(refs, list) or not refs:
        bad.append(("refs", "missing or not a non-empty list of paths"))
        refs = []
    elif len(refs) > MAX_REFS:
        bad.append(("refs", f"{len(refs)} references, more than {MAX_REFS}"))
        refs = []
    n = len(refs)
    ref_paths = [_file(root, p, f"refs[{i}]", deep, bad)[0] for i, p in enumerate(refs)]
    target, size = (None, None) if rec.get("target") is None else _file(root, rec["target"], "target", deep, bad)

    masks = rec.get("masks")
    if masks is not None:
        if not isinstance(masks, list):
            bad.append(("masks", "not a list of paths"))
        elif len(masks) != n:
            bad.append(("masks", f"{len(masks)} masks for {n} references"))
        elif rec.get("target") is None:
            bad.append(("masks", "masks need a target image"))
        else:
            mask_paths = []
            for i, p in enumerate(masks):
                path, msize = _file(root, p, f"masks[{i}]", deep, bad, mask=True)
                mask_paths.append(path)
                if msize and size and tuple(msize) != tuple(size):
                    bad.append((f"masks[{i}]", f"{msize[0]}x{msize[1]} mask for a {size[0]}x{size[1]} target"))
            masks = mask_paths

    points = rec.get("points")
    if points is not None:
        if not isinstance(points, list) or len(points) != n:
            bad.append(("points", f"need one list (or null) per reference ({n})"))
        elif rec.get("target") is None:
            bad.append(("points", "correspondences need a target image"))
        else:
            for i, pts in enumerate(points):
                if pts is not None and not isinstance(pts, list):
                    bad.append((f"points[{i}]", "not a list of [ry, rx, ty, tx]"))
                elif pts:
                    j = next((j for j, p in enumerate(pts) if _bad_point(p)), None)
                    if j is not None:
                        bad.append((f"points[{i}][{j}]", f"{str(pts[j])[:60]} is not [ry, rx, ty, tx] in [0, 1]"))

    for key, (what, ok) in PER_REF.items():
        v = rec.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == n and all(map(ok, v))):
            bad.append((key, f"need {what} per reference ({n})"))
    if bad:
        return None, bad
    return dict(prompt=prompt, target=target, size=size, refs=ref_paths, masks=masks, points=points,
                id=rec.get("id"), **{k: rec[k] for k in ("kinds", "captions", "attrs", "boxes") if k in rec}), []

def validate_all(records, root, deep=True):
    """validate() over read_manifest's records, plus what no single record shows: an "id" given twice (the first
    record keeps it). -> [(line, normalized dict or None, [(field, why)])]"""
    out, seen = [], {}
    for line, rec in records:
        r, bad = validate(rec, root, deep)
        key = json.dumps(rec.get("id")) if isinstance(rec, dict) and rec.get("id") is not None else None
        if key in seen:
            r, bad = None, bad + [("id", f"{rec['id']!r} is already the id of line {seen[key]}")]
        elif key is not None:
            seen[key] = line
        out.append((line, r, bad))
    return out

def check(manifest, deep=True):
    """`python data.py check`: print every problem as manifest:line: field: why, then a summary.
    -> exit status: 0 all good, 1 any problem."""
    records, problems = read_manifest(manifest)
    total = len(records) + len(problems)                                       # parsed or not
    root = os.path.dirname(os.path.abspath(manifest))
    for line, _, bad in validate_all(records, root, deep):
        problems += [(line, field, why) for field, why in bad]
    problems.sort(key=lambda p: p[0])                                          # stable: fields stay in order
    for line, field, why in problems:
        print(f"{manifest}:{line}: {field}: {why}")
    n_bad = len({line for line, _, _ in problems})
    if total == 0:
        print(f"{manifest}: no records")
        return 1
    print(f"{manifest}: {total} records, {n_bad} bad" + (f" ({len(problems)} problems)" if problems else ", all good"))
    return 1 if problems else 0

# -----------------------------------------------------------------------------
# geometry: buckets, resizing, masks and points on the token grid

def uno_buckets(resolution=512, multiple=16):
    """UNO's 11 (H, W) aspect buckets (defined at 512 px), rescaled to `resolution` and floored to `multiple`."""
    base = [(256, 768), (320, 768), (320, 704), (384, 640), (448, 576), (512, 512)]
    return [(h * resolution // 512 // multiple * multiple, w * resolution // 512 // multiple * multiple)
            for h, w in base + [(w, h) for h, w in base[:-1]]]

def nearest_bucket(w, h, buckets):
    # the (H, W) bucket closest in log aspect ratio, so 2:1 and 1:2 are equally far from 1:1; ties: the first
    return min(buckets, key=lambda b: abs(math.log(w / h) - math.log(b[1] / b[0])))

def cover_box(w, h, W, H):
    """Resize (w, h), keeping its aspect, to cover (W, H); -> resized (rw, rh) and the center crop's (left, top)."""
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
    points: per reference a (P_i, 4) tensor of (ry, rx, ty, tx) in [0, 1] coordinates of the *processed*
    reference and target; ref_grid, target_grid: (rows, cols) in tokens. Returns per reference a LongTensor
    (P_i', 2) of (reference token, target token), row-major like model.pack, each pair once (sorted).
    A target token claimed by two references is dropped from both: MOSAIC keeps the references'
    correspondences disjoint, and a token that is partly one subject and partly another is a clean target for
    neither. One reference token may keep several target tokens (SCAL then averages over them)."""
    def token(y, x, grid):
        h, w = grid
        return (y * h).floor().long().clamp(0, h - 1) * w + (x * w).floor().long().clamp(0, w - 1)
    pairs = [torch.unique(torch.stack([token(p[:, 0], p[:, 1], ref_grid), token(p[:, 2], p[:, 3], target_grid)], 1),
                          dim=0) for p in points]                                       # [(P_i, 2)]
    claims = torch.zeros(target_grid[0] * target_grid[1], dtype=torch.long)
    for p in pairs:
        claims[p[:, 1].unique()] += 1                                                   # references per target token
    return [p[claims[p[:, 1]] == 1] for p in pairs]

# -----------------------------------------------------------------------------
# the training dataset

class ManifestDataset(torch.utils.data.Dataset):
    """Training records of a manifest (or UNO JSON list), validated when constructed.

    size: the target side (square); or buckets [(H, W), ...] (multiples of token_px): each record goes to the
    bucket closest to its aspect, resized to cover it and center-cropped. ref_size: references are resized to
    ref_size on their longer side and centered on a white ref_size x ref_size square (the paper: 320; toy: 16).
    token_px: pixels per packed token.
    Records with more than MAX_REFS references, and later records repeating an "id", are skipped. verify=True decodes every image now (as `check` does);
    by default only headers are read, and an image that then fails to decode in __getitem__ (truncated, or an
    empty mask) is replaced by the next good record of the same bucket key, with a warning, counted in
    n_failed: an epoch never stops half-way, and nothing is dropped silently (DataLoader workers each count
    and warn for themselves).
    self.skipped: [(line, field, why)] for records dropped here (n_skipped of them)."""
    needs_target = True
    def __init__(self, manifest, size=32, ref_size=16, token_px=4, buckets=None, verify=False):
        self.manifest, self.ref_size, self.token_px = manifest, ref_size, token_px
        self.buckets = [tuple(b) for b in buckets] if buckets else [(size, size)]
        if any(d % token_px for b in self.buckets for d in b) or ref_size % token_px:
            raise InputError(f"sizes {self.buckets} and ref_size {ref_size} must be multiples of token_px {token_px}")
        parsed, self.skipped = read_manifest(manifest)
        root = os.path.dirname(os.path.abspath(manifest))
        self.records, self.keys = [], []
        for line, r, bad in validate_all(parsed, root, deep=verify):
            if r is not None and r["target"] is None and self.needs_target:
                bad = [("target", "missing: training needs a target (RL records have none)")]
            if bad:
                self.skipped += [(line, field, why) for field, why in bad]
                continue
            self.records.append(dict(r, line=line))
            bucket = nearest_bucket(*r["size"], self.buckets) if r["size"] else self.buckets[0]   # RL: no target
            self.keys.append((bucket, len(r["refs"])))
        self.n_skipped = len({line for line, _, _ in self.skipped})
        self.n_failed, self.failed = 0, set()
        if self.skipped:
            line, field, why = self.skipped[0]
            print(f"warning: {manifest}: skipped {self.n_skipped} of {self.n_skipped + len(self.records)} records "
                  f"(first: line {line}: {field}: {why}); `python data.py check {manifest}` lists all",
                  file=sys.stderr)
        if not self.records:
            raise DataError(f"{manifest}: no usable records")

    def __len__(self):
        return len(self.records)

    def bucket_of(self, i):
        """((H, W), number of references): records with equal keys stack into one batch."""
        return self.keys[i]

    def __getitem__(self, i):
        # a record that fails to load is replaced by the next good one of its bucket key (see the class docstring)
        for j in ((i + d) % len(self) for d in range(len(self))):
            if self.keys[j] != self.keys[i] or j in self.failed:
                continue
            try:
                return self.load(j)
            except (InputError, DataError) as e:
                self.failed.add(j)
                self.n_failed += 1
                print(f"warning: {self.manifest}:{self.records[j]['line']}: {e}; using another record "
                      f"({self.n_failed} failed so far)", file=sys.stderr)
        raise DataError(f"{self.manifest}: no record of bucket {self.keys[i]} loads")

    def load(self, i):
        r, tp, R = self.records[i], self.token_px, self.ref_size
        (H, W), N = self.keys[i]
        img = load_image(r["target"])
        rw, rh, left, top = cover_box(*img.size, W, H)
        target = to_tensor(cover(img, W, H, Image.LANCZOS))                              # (3, H, W)

        # masks: the same resize and crop (BOX filter = exact area shares), then the share of each token
        masks, valid = torch.zeros(N, (H // tp) * (W // tp)), torch.zeros(N, dtype=torch.bool)
        for k, path in enumerate(r["masks"] or []):
            m = load_mask(path)
            if m.shape[::-1] != img.size:
                raise DataError(f"{path}: mask size {m.shape[1]}x{m.shape[0]} differs from the target's")
            m = np.asarray(cover(Image.fromarray(m, "F"), W, H, Image.BOX))                  # (H, W)
            # mean over each tp x tp block (numpy: a tiny torch op in a loader costs a thread-pool wake-up)
            masks[k], valid[k] = torch.from_numpy(m.reshape(H // tp, tp, W // tp, tp).mean((1, 3)).ravel()), True

        # references, and each correspondence moved along with the pixels it names: in the reference square
        # y' = (y * fh + ftop) / R, in the cropped target y' = (y * rh - top) / H (same for x)
        refs, pts = [], []
        given = r["points"] or [None] * N                     # no points, or null for a reference: none
        for k, path in enumerate(r["refs"]):
            ref = load_image(path)
            fw, fh, fleft, ftop = fit_box(*ref.size, R)                                    # where preprocess_ref puts it
            refs.append(to_tensor(preprocess_ref(ref, R)))                                # (3, R, R)
            p = torch.tensor(given[k] or [], dtype=torch.float64).reshape(-1, 4)          # (P, 4): ry rx ty tx
            scale = torch.tensor([fh / R, fw / R, rh / H, rw / W], dtype=torch.float64)
            shift = torch.tensor([ftop / R, fleft / R, -top / H, -left / W], dtype=torch.float64)
            p = p * scale + shift
            pts.append(p[((p[:, 2:] >= 0) & (p[:, 2:] <= 1)).all(1)])                    # cropped away: dropped
        points = points_to_tokens(pts, (R // tp, R // tp), (H // tp, W // tp))           # [(P_k, 2)]
        return dict(target=target, refs=torch.stack(refs), masks=masks, mask_valid=valid, points=points,
                    prompt=r["prompt"], index=i, bucket=(H, W))

class PromptDataset(ManifestDataset):
    """RL records (stage 3): a prompt and references (+ optional captions and kinds); a target is not needed
    (ignored if there). Validation, skipping and replacing as ManifestDataset. Item: dict(prompt, refs [PIL,
    ref_size x ref_size on white, as training and sampling see them], captions, kinds, index)."""
    needs_target = False

    def __init__(self, manifest, ref_size=16):
        super().__init__(manifest, size=ref_size, ref_size=ref_size, token_px=1)

    def load(self, i):
        r = self.records[i]
        return dict(prompt=r["prompt"], refs=[preprocess_ref(load_image(p), self.ref_size) for p in r["refs"]],
                    captions=r.get("captions"), kinds=r.get("kinds"), index=i)

def collate(items):
    """Items of one bucket key -> a batch: tensors stacked (target (B, 3, H, W), refs (B, N, 3, R, R), masks
    (B, N, T), mask_valid (B, N), and txt/y/latent/ref_latents from a CachedDataset), prompts [str], index (B,),
    points per reference a LongTensor (P, 3) of (batch index, reference token, target token): [:, :2] are
    AttentionProbe's rows, [:, 2] scal_loss's targets."""
    keys = {(tuple(it["bucket"]), it["masks"].shape[0]) for it in items}
    if len(keys) != 1:
        raise ValueError(f"collate needs items of one bucket key, got {sorted(keys)} (batches() groups them)")
    out = {}
    for k, v in items[0].items():
        if k == "points":
            out[k] = [torch.cat([torch.cat([torch.full((len(p), 1), b), p], 1) for b, p in enumerate(per_ref)])
                      for per_ref in zip(*(it["points"] for it in items))]
        elif k == "prompt":
            out["prompts"] = [it[k] for it in items]
        elif k == "index":
            out[k] = torch.tensor([it[k] for it in items])
        elif k == "bucket":
            out[k] = tuple(v)
        else:
            out[k] = torch.stack([it[k] for it in items])
    return out

def batches(dataset, batch_size, seed, epoch, rank=0, world_size=1, drop_last=True):
    """This rank's batches (lists of dataset indices) for one epoch.
    Deterministic in (seed, epoch): each bucket key's indices are shuffled and cut into batches (a batch never
    mixes keys, so its items stack), then all batches are shuffled together. That one global list is dealt
    round-robin, batch b to rank b % world_size, so a run sees the same batches in the same order on 1 or 8
    ranks (step s of an 8-rank run holds global batches 8s .. 8s+7). Every rank gets the same number of batches,
    as DDP steps in lock-step: drop_last=True drops partial batches and the last (< world_size) batches;
    drop_last=False keeps partial batches and repeats the first ones to fill the last round."""
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

# -----------------------------------------------------------------------------
# the toy world: sprite identities (shape x colour x pattern) composed into multi-subject targets

# similar pairs on purpose (circle/hexagon, square/diamond; red/orange/pink, green/teal, blue/purple), so
# attribute leakage between subjects is measurable and not only gross
SHAPES = ("circle", "hexagon", "square", "diamond", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "orange": (240, 130, 30), "pink": (240, 110, 180), "yellow": (230, 210, 40),
           "green": (40, 170, 60), "teal": (30, 160, 160), "blue": (40, 80, 220), "purple": (140, 60, 200)}
PATTERNS = ("solid", "striped", "dotted", "checked")
BACKGROUND = (255, 255, 255)

# u (right) and v (down) are pixel centres in [-1, 1] across the sprite's box
SHAPE_TESTS = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "hexagon": lambda u, v: (abs(v) <= 0.87) & (0.87 * abs(u) + 0.5 * abs(v) <= 0.87),
    "square": lambda u, v: (abs(u) <= 0.8) & (abs(v) <= 0.8),
    "diamond": lambda u, v: abs(u) + abs(v) <= 1,
    "triangle": lambda u, v: (v <= 0.85) & (abs(u) <= (v + 1) / 1.85),
    "cross": lambda u, v: (abs(u) <= 0.34) | (abs(v) <= 0.34),
}
# i (row) and j (column) are integer pixels of the sprite's own grid; True = the darker shade
PATTERN_TESTS = {
    "solid": lambda i, j: np.zeros(i.shape, bool),
    "striped": lambda i, j: (i // 2) % 2 == 1,
    "dotted": lambda i, j: (i % 3 == 1) & (j % 3 == 1),
    "checked": lambda i, j: (i // 3 + j // 3) % 2 == 1,
}

@dataclass(frozen=True)
class Sprite:
    """One toy identity: the 'subject' a reference shows and a target must reproduce."""
    shape: str
    colour: str
    pattern: str

    @property
    def caption(self):
        return f"{self.colour} {self.pattern} {self.shape}"

SPRITES = [Sprite(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]        # 192 identities

def sprite_px(ref_size):
    # a sprite's side in pixels, in references and targets alike: 12 for the toy's 16 px references
    return max(4, ref_size * 3 // 4)

def render_sprite(sprite, px):
    """A sprite at px x px -> (rgb uint8 (px, px, 3) on the white background, mask bool (px, px)). Shape and
    pattern are per pixel of the sprite's own grid, so every rendering at one px gives the same pixels wherever
    it is placed: a target's sprite and its reference correspond pixel for pixel."""
    i, j = np.mgrid[0:px, 0:px]
    mask = SHAPE_TESTS[sprite.shape]((j + 0.5) / px * 2 - 1, (i + 0.5) / px * 2 - 1)
    colour = np.array(COLOURS[sprite.colour])
    rgb = np.where(PATTERN_TESTS[sprite.pattern](i, j)[..., None], colour // 2, colour)
    return np.where(mask[..., None], rgb, BACKGROUND).astype(np.uint8), mask

def render_reference(sprite, ref_size=16):
    """The reference image of an identity: the sprite centered on white, ref_size x ref_size (PIL RGB)."""
    px = sprite_px(ref_size)
    out = np.full((ref_size, ref_size, 3), BACKGROUND, np.uint8)
    o = (ref_size - px) // 2
    out[o:o + px, o:o + px] = render_sprite(sprite, px)[0]
    return Image.fromarray(out)

def describe(captions):
    # ["red striped circle", "blue dotted square"] -> "a red striped circle and a blue dotted square"
    words = [("an " if c[0] in "aeiou" else "a ") + c for c in captions]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]

def _layout(rng, n, px, size, tries=100):
    """Top-left corners (n, 2) of n px-sized boxes at least 1 px apart (a leakage metric must not merge
    neighbours): each box uniform among the places still free; restart on a dead end; the four corners last."""
    grid = np.stack(np.mgrid[0:size - px + 1, 0:size - px + 1], -1).reshape(-1, 2)    # every top-left corner
    for _ in range(tries):
        free, boxes = grid, []
        for _ in range(n):
            if len(free) == 0:
                break
            boxes.append(free[rng.integers(len(free))])
            free = free[np.abs(free - boxes[-1]).max(1) > px]
        if len(boxes) == n:
            return np.stack(boxes)
    return np.array([(0, 0), (0, size - px), (size - px, 0), (size - px, size - px)])[rng.permutation(4)[:n]]

def toy_example(seed, index, size=32, ref_size=16, subjects=(2, 3)):
    """Record `index` of the toy world of `seed` (its own generator, so the first n records do not depend on n).
    -> (target uint8 (size, size, 3), masks [bool (size, size)], sprites, record without file paths)."""
    rng = np.random.default_rng([seed, index])
    n, px = int(rng.choice(subjects)), sprite_px(ref_size)
    if px > size or (n > 1 and 2 * px + 1 > size):             # the corner fallback of _layout must fit
        raise InputError(f"--size {size} cannot hold {n} sprites of {px} px (--ref-size {ref_size})")
    sprites = [SPRITES[k] for k in rng.choice(len(SPRITES), n, replace=False)]
    target, masks, points, boxes = np.full((size, size, 3), BACKGROUND, np.uint8), [], [], []
    o = (ref_size - px) // 2                                   # the sprite's offset inside its reference
    for s, (y, x) in zip(sprites, _layout(rng, n, px, size)):
        rgb, m = render_sprite(s, px)
        target[y:y + px, x:x + px][m] = rgb[m]
        masks.append(np.zeros((size, size), bool))
        masks[-1][y:y + px, x:x + px] = m
        # correspondences: every other pixel of the sprite (centres), reference -> target, in [0, 1]
        a, b = (2 * np.stack(np.nonzero(m[::2, ::2]))).tolist()
        points.append([[round((o + i + .5) / ref_size, 6), round((o + j + .5) / ref_size, 6),
                        round((y + i + .5) / size, 6), round((x + j + .5) / size, 6)] for i, j in zip(a, b)])
        boxes.append([round(v / size, 6) for v in (y, x, y + px, x + px)])
    record = dict(prompt=describe([s.caption for s in sprites]), points=points, attrs=[asdict(s) for s in sprites],
                  captions=[s.caption for s in sprites], kinds=["object"] * n, boxes=boxes)
    return target, masks, sprites, record

def write_toy(out, n, seed=0, subjects=(2, 3), size=32, ref_size=16):
    """`python data.py toy`: n records as PNGs under out/ (images/, masks/, refs/: one reference per identity)
    and out/manifest.jsonl in the manifest format, so every tool runs on it unchanged. Same seed, same bytes."""
    if not subjects or not all(1 <= k <= 4 for k in subjects) or n < 1:
        raise InputError("need --n >= 1 and --subjects between 1 and 4")
    for d in ("images", "masks", "refs"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    lines, written = [], set()
    for i in range(n):
        target, masks, sprites, rec = toy_example(seed, i, size, ref_size, subjects)
        rec = dict(id=f"toy{i:06d}", target=f"images/{i:06d}.png", refs=[], masks=[], **rec)
        Image.fromarray(target).save(os.path.join(out, rec["target"]))
        for k, (s, m) in enumerate(zip(sprites, masks)):
            rec["refs"].append(f"refs/{s.colour}_{s.pattern}_{s.shape}.png")
            rec["masks"].append(f"masks/{i:06d}_{k}.png")
            Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(out, rec["masks"][-1]))
            if s not in written:
                render_reference(s, ref_size).save(os.path.join(out, rec["refs"][-1]))
                written.add(s)
        lines.append(json.dumps(rec) + "\n")
    path = os.path.join(out, "manifest.jsonl")
    write_atomic(path, lambda f: f.write("".join(lines).encode()))
    print(f"wrote {n} records, {len(written)} references: {path}", file=sys.stderr)
    return path

# -----------------------------------------------------------------------------
# caches: text embeddings and VAE latents, so T5-XXL need not sit in GPU memory while training

def load_encoders(model, checkpoint=None, device="cpu"):
    """(text encoder, autoencoder, config) of a preset. The toy's text encoder comes from a checkpoint folder
    (default assets/toy) holding text_encoder.safetensors; --checkpoint for FLUX is the AE file/folder/repo."""
    cfg, device = M.get_config(model), torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model == "toy":
        text = M.ByteTextEncoder(cfg)
        M.load_state_dict_strict(text, M.resolve_file(checkpoint or TOY_DIR, "text_encoder.safetensors"))
        return text.to(device).eval(), M.load_ae(cfg, device=device), cfg
    ae = M.load_ae(cfg, checkpoint, device, dtype)
    return M.T5CLIPEncoder(cfg.max_txt_len, dtype=dtype).to(device), ae, cfg

@torch.no_grad()
def write_cache(manifest, out, model="toy", checkpoint=None, size=None, ref_size=None, buckets=None,
                shard_size=256, device=None):
    """`python data.py cache`: per record txt (L, C), y (C_vec,), latent (z, h, w), ref_latents (N, z, r, r),
    masks, mask_valid and points, in safetensors shards of shard_size records, then index.json (settings, and
    per record its shard, prompt, bucket). Every file is written to a temporary name and renamed."""
    device = torch.device(device) if device else M.default_device()
    text, ae, cfg = load_encoders(model, checkpoint, device)          # bad weights fail before any work
    size, ref_size = size or DEFAULTS[model]["size"], ref_size or DEFAULTS[model]["ref_size"]
    ds = ManifestDataset(manifest, size, ref_size, 2 * cfg.ae.factor, buckets)
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save
    records, tensors = [], {}
    for i in range(len(ds)):
        item, key = ds[i], str(i % shard_size)
        with M.autocast(device):
            txt, y = text([item["prompt"]])                                                # (1, L, C), (1, C_vec)
            latent = ae.encode(item["target"][None].to(device, param_dtype(ae)))[0]       # (z, h, w)
            ref_latents = ae.encode(item["refs"].to(device, param_dtype(ae)))             # (N, z, r, r)
        tensors.update({f"{key}/txt": txt[0], f"{key}/y": y[0], f"{key}/latent": latent.float(),
                        f"{key}/ref_latents": ref_latents.float(), f"{key}/masks": item["masks"],
                        f"{key}/mask_valid": item["mask_valid"]})
        tensors.update({f"{key}/points{j}": p for j, p in enumerate(item["points"])})
        shard = f"shard_{i // shard_size:05d}.safetensors"
        records.append(dict(shard=shard, key=key, source=item["index"], prompt=item["prompt"],
                            bucket=list(item["bucket"]), n_refs=len(item["refs"])))
        if (i + 1) % shard_size == 0 or i + 1 == len(ds):
            blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            write_atomic(os.path.join(out, shard), lambda f: f.write(blob))
            tensors = {}
    index = dict(manifest=os.path.abspath(manifest), model=model, size=size, ref_size=ref_size,
                 token_px=ds.token_px, buckets=ds.buckets, skipped=ds.skipped, records=records)
    write_atomic(os.path.join(out, "index.json"), lambda f: f.write(json.dumps(index).encode()))
    print(f"cached {len(records)} records in {-(-len(records) // shard_size)} shards: {out}", file=sys.stderr)
    return out

class CachedDataset(torch.utils.data.Dataset):
    """A cache folder as a dataset: the keys of ManifestDataset's items (but the pixels) plus txt (L, C),
    y (C_vec,), latent (z, h, w) and ref_latents (N, z, r, r). pixels=True also reads target and refs from the
    original manifest (for rewards or pictures; the latents replace them for training)."""
    def __init__(self, folder, pixels=False):
        self.folder = folder
        try:
            with open(os.path.join(folder, "index.json")) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{folder}: not a cache folder ({e})") from None
        self.records = self.index["records"]
        # every shard's header read now (no tensors): a missing, truncated or foreign shard stops the run before
        # its first step with one line, not hours in with a traceback
        have = set()                                                      # (shard, tensor name)
        for shard in sorted({r["shard"] for r in self.records}):
            try:
                have.update((shard, k) for k in M.read_header(os.path.join(folder, shard)))
            except M.CheckpointError as e:
                raise DataError(f"cache shard {e}") from None
        lost = [(r, n) for r in self.records for n in self.names(r) if (r["shard"], n) not in have]
        if lost:
            (r, n), more = lost[0], len(lost) - 1
            raise DataError(f"{os.path.join(folder, r['shard'])}: cache shard without {n!r}"
                            f"{f' (and {more} more)' if more else ''}: rebuild the cache with `data.py cache`")
        self.source = None if not pixels else ManifestDataset(
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
# curation: your own videos and photos -> manifests (MultiCrafter Appendix C), object masks, correspondences
#
#   curate          a clip's early frame gives the references, its middle frame the target (or a still pair:
#                   ref + target photo). Faces found and embedded in both (insightface through rewards.py),
#                   identities matched across the frames (Hungarian over cosines, kept above a threshold), a
#                   face crop per verified identity saved as its reference, the target cropped square around
#                   the subjects, each subject's mask: its face box (or, given SAM2, its person mask).
#   curate-objects  masks for the captioned subjects of a manifest (MUSAR-Gen-like: no masks) by phrase grounding
#   correspond      SCAL's points: mutual nearest neighbours of DINOv2 patch features, reference <-> its mask
#
# Every model is a callable the caller may replace (the tests and the toy world do); the CLI builds the real ones
# through rewards.py, so missing weights stop the run at once with rewards.RewardModelError, one line. A record
# that cannot be made is dropped for a named reason, counted, and listed in OUT/summary.json; nothing crashes.

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_PROMPT = "a photo of {n} people"

class Drop(Exception):
    """An input that gives no record: reason (a summary key) and why (one line naming the problem)."""
    def __init__(self, reason, why):
        super().__init__(why)
        self.reason = reason

class Tally:
    """What a curation run kept and why it dropped the rest: counts per reason, and every input's outcome."""
    def __init__(self, what):
        self.what, self.kept, self.dropped, self.items = what, 0, {}, []

    def keep(self, source, **info):
        self.kept += 1
        self.items.append(dict(source=source, kept=True, **info))

    def drop(self, source, d):
        self.dropped[d.reason] = self.dropped.get(d.reason, 0) + 1
        self.items.append(dict(source=source, kept=False, reason=d.reason, why=str(d)))

    def write(self, out, **extra):
        """-> the summary, also written to out/summary.json and told in one line on stderr."""
        summary = dict(kept=self.kept, dropped=dict(sorted(self.dropped.items())), **extra, items=self.items)
        path = os.path.join(out, "summary.json")
        write_atomic(path, lambda f: f.write(json.dumps(summary, indent=1).encode()))
        reasons = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "nothing"
        print(f"kept {self.kept} of {len(self.items)} {self.what}; dropped: {reasons}; details in {path}",
              file=sys.stderr)
        return summary

def save_image(img, path):
    # PIL -> .jpg (quality 95) or .png, written to a temporary name and renamed, as every output here
    os.makedirs(os.path.dirname(path), exist_ok=True)
    jpeg = path.endswith(".jpg")
    write_atomic(path, lambda f: img.save(f, "JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {})))

def write_manifest(out, records):
    path = os.path.join(out, "manifest.jsonl")
    write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
    return path

def clean_id(name):
    # a file or folder name -> an id safe as a file name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "item"

# --- inputs: clips and still pairs, each -> (id, source, read() -> (reference PIL, target PIL), prompt or None)

def read_text(path):
    # a caption sidecar -> its text, or None when there is none (or it is empty)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return " ".join(f.read().split()) or None

def read_frames(path, ref_at, target_at):
    """A video -> (reference frame, target frame) as RGB PIL: the frames at ref_at and target_at of its length
    (0 = first, 1 = last). OpenCV decodes (insightface brings it); a file it cannot read raises Drop."""
    import cv2
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise Drop("unreadable", f"{path}: not a readable video")
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n <= 0:                                      # some containers do not say: count by skipping through
            while cap.grab():
                n += 1
        if n < 2:
            raise Drop("too_short", f"{path}: {n} frame(s), need two (a reference and a target frame)")
        frames = []
        for at in (ref_at, target_at):
            cap.set(cv2.CAP_PROP_POS_FRAMES, round(at * (n - 1)))
            ok, bgr = cap.read()
            if not ok:
                raise Drop("unreadable", f"{path}: frame {round(at * (n - 1))} of {n} does not decode")
            frames.append(Image.fromarray(np.ascontiguousarray(bgr[..., ::-1])))          # BGR -> RGB
        return tuple(frames)
    finally:
        cap.release()

def video_items(folder, ref_at=0.1, target_at=0.5):
    """--videos DIR: every video file directly in DIR (sorted); its caption, if any, in DIR/<stem>.txt."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTS))
    return [(os.path.splitext(f)[0], os.path.join(folder, f),
             lambda p=os.path.join(folder, f): read_frames(p, ref_at, target_at),
             read_text(os.path.join(folder, os.path.splitext(f)[0] + ".txt"))) for f in names]

def read_pair(folder):
    def one(stem):
        found = sorted(f for f in os.listdir(folder)
                       if os.path.splitext(f)[0] == stem and f.lower().endswith(IMAGE_EXTS))
        if not found:
            raise Drop("unreadable", f"{folder}: no {stem}.jpg/.png (a pair folder holds ref.* and target.*)")
        try:
            return load_image(os.path.join(folder, found[0]))
        except InputError as e:
            raise Drop("unreadable", str(e)) from None
    return one("ref"), one("target")

def pair_items(folder):
    """--pairs DIR: every sub-folder DIR/<pair>/ holding ref.<ext> (the references' photo) and target.<ext> (the
    same people in another photo); its caption, if any, in DIR/<pair>/prompt.txt."""
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    return [(d, os.path.join(folder, d), lambda p=os.path.join(folder, d): read_pair(p),
             read_text(os.path.join(folder, d, "prompt.txt"))) for d in names]

# --- faces: detection, identity verification, crops and masks

def face_detector(embedder):
    """rewards.FaceEmbedder (insightface, or any app it wraps) -> image -> [(box (x0, y0, x1, y1), unit embedding)]."""
    return lambda image: [(tuple(float(v) for v in f.bbox), np.asarray(f.normed_embedding, np.float64))
                          for f in embedder.faces(image)]

def find_faces(faces, image, name, min_subjects):
    # -> [(box clipped to the image, embedding)]; fewer than min_subjects faces: Drop
    from rewards import clip_box
    found = [(b, e) for box, e in faces(image) if (b := clip_box(box, image.size))]
    if len(found) < min_subjects:
        raise Drop("too_few_faces", f"{len(found)} face(s) in the {name} frame, need {min_subjects}")
    return found

def match_identities(ref_faces, tgt_faces, threshold):
    """Faces of the two frames -> [(i, j, cosine)]: the Hungarian assignment of cosines (rewards.hungarian), each
    face used at most once, pairs below threshold dropped (not verified). Two faces of one frame above the
    threshold are one identity twice (a mirror, a poster, twins): no telling which is which, Drop."""
    from rewards import hungarian
    emb = lambda found: np.stack([e for _, e in found])                                          # (n, D)
    for name, found in (("reference", ref_faces), ("target", tgt_faces)):
        sim = emb(found) @ emb(found).T
        np.fill_diagonal(sim, -np.inf)
        i, j = np.unravel_index(sim.argmax(), sim.shape)
        if sim[i, j] >= threshold:
            raise Drop("duplicate_identity", f"faces {i} and {j} of the {name} frame look like one person "
                                             f"(cosine {sim[i, j]:.2f} >= {threshold})")
    sim = emb(ref_faces) @ emb(tgt_faces).T                                                      # (n_ref, n_tgt)
    return [(i, j, float(sim[i, j])) for i, j in hungarian(sim)[1] if sim[i, j] >= threshold]

def square_around(boxes, W, H):
    """The largest square of a (W, H) frame, centered on the boxes' union and shifted to stay inside -> (left, top,
    side), integer pixels holding every box whole; Drop when the subjects are too far apart for it."""
    s = min(W, H)
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    corner = []
    for lo, hi, size in ((x0, x1, W), (y0, y1, H)):
        first, last = max(0, math.ceil(hi) - s), min(size - s, math.floor(lo))     # the corners that hold them
        if first > last:
            raise Drop("no_square_fit", f"the subjects span {x1 - x0:.0f}x{y1 - y0:.0f} px, more than a {s} px square")
        corner.append(min(max(round((lo + hi - s) / 2), first), last))
    return corner[0], corner[1], s

def face_crop(image, box, margin):
    # the face box grown by margin x its longer side on every side, square, clipped to the image
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * (0.5 + margin)
    W, H = image.size
    return image.crop((max(0, round(cx - half)), max(0, round(cy - half)), min(W, round(cx + half)),
                       min(H, round(cy + half))))

def person_box(face, W, H):
    # a face box -> a box for the whole person below it (shoulders-wide, down to the bottom), SAM2's prompt
    x0, y0, x1, y1 = face
    w, h = x1 - x0, y1 - y0
    return max(0.0, x0 - w), max(0.0, y0 - h / 2), min(float(W), x1 + w), float(H)

def region_masks(image, boxes, masker=None):
    """Each subject's mask in image -> [uint8 (H, W), 255 inside]: every pixel its box touches; with a masker
    (rewards.Sam2Masker.masks: image, boxes -> (K, H, W) bool), its mask's largest connected component (the paper's
    clean-up: stray blobs of a box prompt are other things)."""
    from scipy import ndimage
    W, H = image.size
    if masker is None:
        out = []
        for x0, y0, x1, y1 in boxes:
            m = np.zeros((H, W), np.uint8)
            m[int(y0):math.ceil(y1), int(x0):math.ceil(x1)] = 255
            out.append(m)
        return out
    out = []
    for k, m in enumerate(np.asarray(masker(image, boxes), bool)):
        labels, n = ndimage.label(m)
        if n == 0:
            raise Drop("empty_mask", f"the mask of subject {k} is empty")
        out.append((labels == 1 + np.bincount(labels.ravel())[1:].argmax()).astype(np.uint8) * 255)
    return out

def curate_pair(ref_frame, tgt_frame, faces, threshold=0.5, min_size=256, min_subjects=2, margin=0.4, masker=None):
    """One reference frame and one target frame -> (reference crops [PIL], square target PIL, masks [uint8], info:
    the verified pairs' cosines and how many reference-frame faces found no partner), subjects left to right in the
    target; or Drop with the reason."""
    for name, im in (("reference", ref_frame), ("target", tgt_frame)):
        if min(im.size) < min_size:
            raise Drop("too_small", f"the {name} frame is {im.size[0]}x{im.size[1]}, under --min-size {min_size}")
    ref_faces = find_faces(faces, ref_frame, "reference", min_subjects)
    tgt_faces = find_faces(faces, tgt_frame, "target", min_subjects)
    pairs = match_identities(ref_faces, tgt_faces, threshold)
    if len(pairs) < min_subjects:
        raise Drop("unverified", f"{len(pairs)} of {min(len(ref_faces), len(tgt_faces))} identities verified "
                                 f"across the frames (cosine >= {threshold}), need {min_subjects}")
    pairs.sort(key=lambda p: tgt_faces[p[1]][0][0])                               # left to right in the target
    left, top, s = square_around([tgt_faces[j][0] for _, j, _ in pairs], *tgt_frame.size)
    target = tgt_frame.crop((left, top, left + s, top + s))
    boxes = [(x0 - left, y0 - top, x1 - left, y1 - top) for x0, y0, x1, y1 in (tgt_faces[j][0] for _, j, _ in pairs)]
    masks = region_masks(target, [person_box(b, s, s) for b in boxes] if masker else boxes, masker)
    refs = [face_crop(ref_frame, ref_faces[i][0], margin) for i, _, _ in pairs]
    return refs, target, masks, dict(cosines=[round(c, 4) for _, _, c in pairs], unverified=len(ref_faces) - len(pairs))

def curate(items, out, faces, prompt=DEFAULT_PROMPT, caption=None, **opts):
    """`python data.py curate`: items (video_items / pair_items) -> out/manifest.jsonl, out/images/<id>.jpg (the
    square target), out/refs/<id>_<k>.jpg (face crops), out/masks/<id>_<k>.png, out/summary.json. faces: image ->
    [(box, unit embedding)] (face_detector); opts: curate_pair's. A record's prompt: the item's own caption, else
    caption(target, refs) when given (a captioning model), else prompt.format(n=subjects), with a warning.
    -> the summary."""
    tally, records, generic, used = Tally("inputs"), [], 0, set()
    for name, source, read, text in tqdm(items, desc="curate", disable=len(items) < 2):
        try:
            refs, target, masks, info = curate_pair(*read(), faces, **opts)
        except Drop as d:
            tally.drop(source, d)
            continue
        key = clean_id(name)
        while key in used:                                    # clip.mp4 and clip.mov: both kept, apart
            key += "_"
        used.add(key)
        if text is None and caption is not None:
            text = caption(target, refs)
        if text is None:
            text, generic = prompt.format(n=len(refs)), generic + 1
        rec = dict(id=key, target=f"images/{key}.jpg", refs=[f"refs/{key}_{k}.jpg" for k in range(len(refs))],
                   masks=[f"masks/{key}_{k}.png" for k in range(len(refs))], prompt=text, kinds=["face"] * len(refs))
        save_image(target, os.path.join(out, rec["target"]))
        for ref, m, r, mp in zip(refs, masks, rec["refs"], rec["masks"]):
            save_image(ref, os.path.join(out, r))
            save_image(Image.fromarray(m), os.path.join(out, mp))
        records.append(rec)
        tally.keep(source, id=key, subjects=len(refs), **info)
    os.makedirs(out, exist_ok=True)
    path = write_manifest(out, records)
    if generic:
        print(f"warning: {generic} of {len(records)} records have the generic prompt {prompt!r}: give each clip a "
              f"caption (<clip>.txt beside a video, <pair>/prompt.txt)", file=sys.stderr)
    return tally.write(out, manifest=path, generic_prompts=generic,
                       unverified_faces=sum(i.get("unverified", 0) for i in tally.items))

# --- existing manifests: object masks, correspondences

def place(path, root, out):
    """A file of a manifest in root -> its path relative to out, where it is hard-linked (or copied) unless out is
    root: the new manifest's paths stay inside its own folder, as resolve() requires."""
    rel = os.path.relpath(path, root)
    dst = os.path.join(out, rel)
    if not (os.path.exists(dst) and os.path.samefile(path, dst)):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = os.path.join(os.path.dirname(dst), f".tmp-{os.getpid()}-{os.path.basename(dst)}")
        try:
            os.link(path, tmp)
        except OSError:                                       # another file system, or no links there
            shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
    return rel

def manifest_records(manifest, out, tally):
    """-> (root, [(source "manifest:line", validated record)]); records that do not parse or validate go to the
    tally as bad_record. The input manifest is never the output."""
    if os.path.realpath(os.path.join(out, "manifest.jsonl")) == os.path.realpath(manifest):
        raise InputError(f"{manifest}: --out {out} would overwrite it; choose another folder")
    records, problems = read_manifest(manifest)
    root = os.path.dirname(os.path.abspath(manifest))
    os.makedirs(out, exist_ok=True)
    for line, _, why in problems:
        tally.drop(f"{manifest}:{line}", Drop("bad_record", why))
    good = []
    for line, raw in records:
        r, bad = validate(raw, root, deep=False)
        if r is None:
            tally.drop(f"{manifest}:{line}", Drop("bad_record", "; ".join(f"{f}: {w}" for f, w in bad)))
        else:
            good.append((f"{manifest}:{line}", r))
    return root, good

def record_out(r, root, out, **new):
    """A validated record -> its JSON for a manifest in out (files placed there), with the fields in new replaced."""
    rec = dict(id=r.get("id"), target=r["target"] and place(r["target"], root, out), prompt=r["prompt"],
               refs=[place(p, root, out) for p in r["refs"]],
               masks=r["masks"] and [place(p, root, out) for p in r["masks"]], points=r["points"],
               **{k: r[k] for k in ("kinds", "captions", "attrs", "boxes") if k in r})
    rec.update(new)
    return {k: v for k, v in rec.items() if v is not None}

def object_boxes(image, captions, detect, iou_max=0.7):
    """Each caption's best box in image (detect: image, phrases -> per phrase [(box, score)], e.g.
    rewards.Florence2Detector.detect); Drop when a caption is not found, or two ground one object (IoU > iou_max)."""
    from rewards import iou
    boxes = []
    for c, found in zip(captions, detect(image, captions)):
        if not found:
            raise Drop("not_found", f"{c!r} not found in the target")
        boxes.append(max(found, key=lambda f: f[1])[0])                  # ties: the detector's first
    for a in range(len(boxes)):
        for b in range(a):
            if iou(boxes[a], boxes[b]) > iou_max:
                raise Drop("same_object", f"{captions[b]!r} and {captions[a]!r} ground one object "
                                          f"(IoU {iou(boxes[a], boxes[b]):.2f})")
    return boxes

def curate_objects(manifest, out, detect, masker=None, iou_max=0.7):
    """`python data.py curate-objects`: each record with a target, a caption per reference and no masks gets a mask
    per subject (its caption's box, or SAM2's mask in it) in out/object_masks/; records with masks pass unchanged.
    -> the summary (out/manifest.jsonl, out/summary.json)."""
    tally = Tally("records")
    root, todo = manifest_records(manifest, out, tally)
    records, given, used = [], 0, set()
    for n, (source, r) in enumerate(tqdm(todo, desc="curate-objects", disable=len(todo) < 2)):
        try:
            if r["masks"] is not None:
                records.append(record_out(r, root, out))
                given += 1
                tally.keep(source, masks="given")
                continue
            if r["target"] is None:
                raise Drop("no_target", "no target image to find the subjects in")
            if not r.get("captions"):
                raise Drop("no_captions", "no captions: the detector finds each subject by its caption")
            target = load_image(r["target"])
            masks = region_masks(target, object_boxes(target, r["captions"], detect, iou_max), masker)
        except Drop as d:
            tally.drop(source, d)
            continue
        except InputError as e:                                           # a truncated target: only headers were read
            tally.drop(source, Drop("unreadable", str(e)))
            continue
        key = clean_id(str(r["id"])) if r.get("id") is not None else f"{n:06d}"
        while key in used:                                    # ids "x" and "x." clean alike: each keeps its masks
            key += "_"
        used.add(key)
        paths = [f"object_masks/{key}_{k}.png" for k in range(len(masks))]
        for m, p in zip(masks, paths):
            save_image(Image.fromarray(m), os.path.join(out, p))
        records.append(record_out(r, root, out, masks=paths))
        tally.keep(source, masks="detected")
    return tally.write(out, manifest=write_manifest(out, records), masks_given=given)

def mutual_neighbours(a, b):
    """a (P, D), b (Q, D) unit rows -> [(i, j)] where b[j] is a[i]'s nearest and a[i] is b[j]'s: one-to-one."""
    sim = a @ b.T                                                                         # (P, Q) cosines
    ab, ba = sim.argmax(1), sim.argmax(0)
    return [(i, int(j)) for i, j in enumerate(ab) if ba[j] == i]

def reference_points(ref, target, region, features):
    """Correspondences of one reference inside its region of the target -> [[ry, rx, ty, tx]] in [0, 1].
    The target is cropped to the square around the region (so the subject fills it about as it fills its reference),
    both images go through features (images -> per image (g, g, D), the patch grid over the whole image), and
    mutual nearest patches are kept when the target patch's centre lies in the region."""
    H, W = region.shape
    ys, xs = np.nonzero(region)
    side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min())
    top = min(max((ys.min() + ys.max() + 1 - side) // 2, 0), max(H - side, 0))
    left = min(max((xs.min() + xs.max() + 1 - side) // 2, 0), max(W - side, 0))
    bottom, right = min(top + side, H), min(left + side, W)
    fr, ft = (np.asarray(f, np.float64) for f in features([ref, target.crop((left, top, right, bottom))]))
    norm = lambda f: (f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)).reshape(-1, f.shape[-1])
    # patch centres: in the reference as shares of its sides; in the target as pixels of the full image
    (gh, gw), (th, tw) = fr.shape[:2], ft.shape[:2]
    rc = [((i + .5) / gh, (j + .5) / gw) for i in range(gh) for j in range(gw)]
    tc = [(top + (i + .5) * (bottom - top) / th, left + (j + .5) * (right - left) / tw)
          for i in range(th) for j in range(tw)]
    inside = [k for k, (y, x) in enumerate(tc) if region[int(y), int(x)]]
    if not inside:
        return []
    pairs = mutual_neighbours(norm(fr), norm(ft)[inside])
    return [[round(rc[i][0], 6), round(rc[i][1], 6), round(tc[inside[j]][0] / H, 6), round(tc[inside[j]][1] / W, 6)]
            for i, j in pairs]

def record_correspondences(target, refs, masks, features):
    """A record's points, per reference. MOSAIC's disjointness: a target pixel in two masks belongs to neither, so
    no target token is claimed by two references."""
    m = np.stack(masks) >= 0.5                                                           # (N, H, W)
    own = m & (m.sum(0) == 1)
    return [reference_points(ref, target, region, features) if region.any() else [] for ref, region in zip(refs, own)]

def correspond(manifest, out, features):
    """`python data.py correspond`: points for every record with masks (replacing any it had), written with the
    record to out/manifest.jsonl; records without masks pass unchanged (counted). -> the summary."""
    tally = Tally("records")
    root, todo = manifest_records(manifest, out, tally)
    records, no_masks, counts = [], 0, []
    for source, r in tqdm(todo, desc="correspond", disable=len(todo) < 2):
        if r["masks"] is None:
            records.append(record_out(r, root, out))
            no_masks += 1
            tally.keep(source, points=None)
            continue
        try:
            points = record_correspondences(load_image(r["target"]), [load_image(p) for p in r["refs"]],
                                            [load_mask(p) for p in r["masks"]], features)
        except (InputError, DataError) as e:                      # a truncated image, an empty mask
            tally.drop(source, Drop("unreadable", str(e)))
            continue
        records.append(record_out(r, root, out, points=points))
        counts += [len(p) for p in points]
        tally.keep(source, points=[len(p) for p in points])
    return tally.write(out, manifest=write_manifest(out, records), without_masks=no_masks,
                       points_per_reference=round(float(np.mean(counts)), 2) if counts else 0)

def run_curation(args):
    """The curation commands with the real models, loaded through rewards.py (missing weights: RewardModelError).
    -> exit status: 0 when anything was kept."""
    import rewards as R
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cmd != "curate":
        check_file(args.manifest)                            # before any model loads
    elif not (0 <= args.ref_at <= 1 and 0 <= args.target_at <= 1 and args.min_subjects >= 1):
        raise InputError("--ref-at and --target-at are shares of a clip, in [0, 1]; --min-subjects is at least 1")
    masker = R.Sam2Masker(args.sam2, device).masks if getattr(args, "sam2", None) else None
    if args.cmd == "curate":
        folder = args.videos or args.pairs
        if not os.path.isdir(folder):
            raise InputError(f"{folder}: no such folder")
        faces = face_detector(R.FaceEmbedder(args.face_pack, args.face_root, device))
        items = video_items(folder, args.ref_at, args.target_at) if args.videos else pair_items(folder)
        summary = curate(items, args.out, faces, args.prompt, threshold=args.threshold, min_size=args.min_size,
                         min_subjects=args.min_subjects, margin=args.margin, masker=masker)
    elif args.cmd == "curate-objects":
        cls = R.Florence2Detector if args.detector_kind == "florence2" else R.Owlv2Detector
        detect = cls(args.detector or R.DETECTORS[args.detector_kind], device).detect
        summary = curate_objects(args.manifest, args.out, detect, masker)
    else:
        dino = R.DinoEmbedder(args.dinov2, device)
        summary = correspond(args.manifest, args.out, lambda images: dino.patches(images, args.patch_side))
    return 0 if summary["kept"] else 1

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="report every bad record; exit 1 if any")
    c.add_argument("manifest")
    c.add_argument("--quick", action="store_true", help="read image headers only (no truncation/empty-mask check)")
    t = sub.add_parser("toy", help="write the procedural toy world")
    t.add_argument("--out", required=True)
    t.add_argument("--n", type=int, required=True, help="number of records")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--subjects", type=int, nargs="+", default=[2, 3], help="subjects per target (1-4), uniform")
    t.add_argument("--size", type=int, default=32, help="target side (px)")
    t.add_argument("--ref-size", type=int, default=16, help="reference side (px)")
    k = sub.add_parser("cache", help="precompute text embeddings and latents")
    k.add_argument("--manifest", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--model", default="toy", choices=sorted(M.CONFIGS))
    k.add_argument("--checkpoint", default=None, help="toy: folder with text_encoder.safetensors; flux: the AE")
    k.add_argument("--size", type=int, default=None, help="square target side (default: 32 toy, 512 flux)")
    k.add_argument("--buckets", nargs="+", default=None, help="aspect buckets HxW instead of --size, e.g. 512x512")
    k.add_argument("--ref-size", type=int, default=None, help="default: 16 toy, 320 flux")
    k.add_argument("--shard-size", type=int, default=256)
    k.add_argument("--device", default=None)
    v = sub.add_parser("curate", help="your videos or photo pairs -> a manifest (faces, identities, masks)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder of clips (<clip>.txt beside one: its caption)")
    src.add_argument("--pairs", help="folder of pair folders <pair>/ref.jpg + target.jpg (+ prompt.txt)")
    v.add_argument("--out", required=True)
    v.add_argument("--threshold", type=float, default=0.5, help="face cosine that verifies one identity")
    v.add_argument("--min-size", type=int, default=256, help="smallest frame side (px) kept")
    v.add_argument("--min-subjects", type=int, default=2, help="verified identities a record needs")
    v.add_argument("--ref-at", type=float, default=0.1, help="reference frame, as a share of the clip")
    v.add_argument("--target-at", type=float, default=0.5, help="target frame, as a share of the clip")
    v.add_argument("--margin", type=float, default=0.4, help="face crop: box grown by this x its side, each way")
    v.add_argument("--prompt", default=DEFAULT_PROMPT, help="for inputs without a caption ({n}: subjects)")
    v.add_argument("--face-pack", default="antelopev2", help="insightface pack name (or its folder)")
    v.add_argument("--face-root", default=None, help="insightface root holding models/<pack>/ (default ~/.insightface)")
    o = sub.add_parser("curate-objects", help="masks for captioned subjects of a manifest (phrase grounding)")
    o.add_argument("--manifest", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--detector", default=None, help="detector folder or repo id (default: the kind's repo)")
    o.add_argument("--detector-kind", default="florence2", choices=["florence2", "owlv2"])
    cr = sub.add_parser("correspond", help="SCAL points: mutual nearest DINOv2 patches, reference <-> its mask")
    cr.add_argument("--manifest", required=True)
    cr.add_argument("--out", required=True)
    cr.add_argument("--dinov2", default="facebook/dinov2-base", help="DINOv2 folder or repo id")
    cr.add_argument("--patch-side", type=int, default=224, help="images go to DINOv2 at this side (14 px patches)")
    for q in (v, o, cr):
        q.add_argument("--device", default=None, help="default: cuda if available")
    for q in (v, o):
        q.add_argument("--sam2", default=None, help="SAM2 folder or repo id: masks from it (default: boxes)")
    args = p.parse_args(argv)
    from rewards import RewardModelError               # rewards.py imports this module: so here, not at the top
    try:
        if args.cmd == "check":
            return check(args.manifest, deep=not args.quick)
        if args.cmd == "toy":
            write_toy(args.out, args.n, args.seed, args.subjects, args.size, args.ref_size)
        elif args.cmd in ("curate", "curate-objects", "correspond"):
            return run_curation(args)
        else:
            buckets = None
            if args.buckets:
                if not all(re.fullmatch(r"\d+x\d+", b) for b in args.buckets):
                    raise InputError(f"--buckets {' '.join(args.buckets)}: write each as HxW, e.g. 384x640")
                buckets = [tuple(map(int, b.split("x"))) for b in args.buckets]
            write_cache(args.manifest, args.out, args.model, args.checkpoint, args.size, args.ref_size, buckets,
                        max(1, args.shard_size), args.device)
    except (DataError, InputError, M.CheckpointError, OSError, RewardModelError) as e:   # user mistakes: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())

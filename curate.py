"""
Curation: your own videos and photos -> training manifests (MultiCrafter Appendix C), object masks
for a manifest without them, and MOSAIC's correspondence points.

    python curate.py faces --videos my/clips --out data/mine        # or --pairs my/pairs; faces need insightface
    python curate.py objects --manifest musar/manifest.jsonl --out data/musar    # masks from captions
    python curate.py correspond --manifest data/mine/manifest.jsonl --out data/mine_pts   # SCAL points (DINOv2)

  faces       a clip's early frame gives the references, its middle frame the target
              (or a still pair: ref + target photo). Faces found and embedded in both
              (insightface through rewards.py), identities matched across the frames (Hungarian over
              cosines, kept above a threshold), a face crop per verified identity saved as its
              reference, the target cropped square around the subjects, each subject's mask: its
              face box (or, given SAM2, its person mask).
  objects     masks for the captioned subjects of a manifest (MUSAR-Gen-like: no masks) by phrase
              grounding
  correspond  SCAL's points: mutual nearest neighbours of DINOv2 patch features, reference <-> its
              mask

Every model is a callable the caller may replace (the tests do); the CLI builds the real ones
through rewards.py, so missing weights stop the run at once with rewards.RewardModelError, one line.
A record that cannot be made is dropped for a named reason, counted, and listed in OUT/summary.json;
nothing crashes. Each writes OUT/manifest.jsonl in data.py's format
(`python data.py check OUT/manifest.jsonl` reads it).
"""
import json, math, os, re, shutil, sys

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

import cli as CL
import data as D
import rewards as R

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_PROMPT = "a photo of {n} people"

class Drop(Exception):
    """An input that gives no record: reason (a summary key) and why (one line naming the
    problem)."""
    def __init__(self, reason, why):
        super().__init__(why)
        self.reason = reason

class Tally:
    """What a curation run kept and why it dropped the rest: counts per reason, and every input's
    outcome."""
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
        summary = dict(kept=self.kept, dropped=dict(sorted(self.dropped.items())), **extra,
                       items=self.items)
        path = os.path.join(out, "summary.json")
        D.write_atomic(path, lambda f: f.write(json.dumps(summary, indent=1).encode()))
        reasons = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "nothing"
        print(f"kept {self.kept} of {len(self.items)} {self.what}; dropped: "
              f"{reasons}; details in {path}", file=sys.stderr)
        return summary

def save_image(img, path):
    # PIL -> .jpg (quality 95) or .png, written to a temporary name and renamed, as every output
    # here
    os.makedirs(os.path.dirname(path), exist_ok=True)
    jpeg = path.endswith(".jpg")
    D.write_atomic(path, lambda f: img.save(f, "JPEG" if jpeg else "PNG",
                                            **({"quality": 95} if jpeg else {})))

def write_manifest(out, records):
    path = os.path.join(out, "manifest.jsonl")
    D.write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
    return path

def clean_id(name):
    # a file or folder name -> an id safe as a file name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "item"

# --- inputs: clips and still pairs, each -> (id, source, read() -> (reference PIL, target PIL),
# prompt or None)

def read_text(path):
    # a caption sidecar -> its text, or None when there is none (or it is empty)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return " ".join(f.read().split()) or None

def read_frames(path, ref_at, target_at):
    """A video -> (reference frame, target frame) as RGB PIL: the frames at ref_at and target_at of
    its length (0 = first, 1 = last). OpenCV decodes (insightface brings it); a file it cannot read
    raises Drop."""
    import cv2            # OpenCV: heavy, and needed for videos only (insightface installs it)
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise Drop("unreadable", f"{path}: not a readable video")
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n <= 0:                           # some containers do not say: count by skipping through
            while cap.grab():
                n += 1
        if n < 2:
            raise Drop("too_short",
                       f"{path}: {n} frame(s), need two (a reference and a target frame)")
        frames = []
        for at in (ref_at, target_at):
            cap.set(cv2.CAP_PROP_POS_FRAMES, round(at * (n - 1)))
            ok, bgr = cap.read()
            if not ok:
                raise Drop("unreadable",
                           f"{path}: frame {round(at * (n - 1))} of {n} does not decode")
            frames.append(Image.fromarray(np.ascontiguousarray(bgr[..., ::-1])))        # BGR -> RGB
        return tuple(frames)
    finally:
        cap.release()

def video_items(folder, ref_at=0.1, target_at=0.5):
    """--videos DIR: every video file directly in DIR (sorted); its caption, if any, in
    DIR/<stem>.txt."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTS))
    return [(os.path.splitext(f)[0], os.path.join(folder, f),
             lambda p=os.path.join(folder, f): read_frames(p, ref_at, target_at),
             read_text(os.path.join(folder, os.path.splitext(f)[0] + ".txt"))) for f in names]

def read_pair(folder):
    def one(stem):
        found = sorted(f for f in os.listdir(folder)
                       if os.path.splitext(f)[0] == stem and f.lower().endswith(IMAGE_EXTS))
        if not found:
            raise Drop("unreadable",
                       f"{folder}: no {stem}.jpg/.png (a pair folder holds ref.* and target.*)")
        try:
            return D.load_image(os.path.join(folder, found[0]))
        except D.InputError as e:
            raise Drop("unreadable", str(e)) from None
    return one("ref"), one("target")

def pair_items(folder):
    """--pairs DIR: every sub-folder DIR/<pair>/ holding ref.<ext> (the references' photo) and
    target.<ext> (the same people in another photo); its caption, if any, in
    DIR/<pair>/prompt.txt."""
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    return [(d, os.path.join(folder, d), lambda p=os.path.join(folder, d): read_pair(p),
             read_text(os.path.join(folder, d, "prompt.txt"))) for d in names]

# --- faces: detection, identity verification, crops and masks

def face_detector(embedder):
    """rewards.FaceEmbedder (insightface, or any app it wraps) -> image -> [(box (x0, y0, x1, y1),
    unit embedding)]."""
    return lambda image: [(tuple(float(v) for v in f.bbox),
                           np.asarray(f.normed_embedding, np.float64))
                          for f in embedder.faces(image)]

def find_faces(faces, image, name, min_subjects):
    # -> [(box clipped to the image, embedding)]; fewer than min_subjects faces: Drop
    found = [(b, e) for box, e in faces(image) if (b := R.clip_box(box, image.size))]
    if len(found) < min_subjects:
        raise Drop("too_few_faces",
                   f"{len(found)} face(s) in the {name} frame, need {min_subjects}")
    return found

def match_identities(ref_faces, tgt_faces, threshold):
    """Faces of the two frames -> [(i, j, cosine)]: the Hungarian assignment of cosines
    (rewards.hungarian), each face used at most once, pairs below threshold dropped (not verified).
    Two faces of one frame above the threshold are one identity twice (a mirror, a poster, twins):
    no telling which is which, Drop."""
    emb = lambda found: np.stack([e for _, e in found])                             # (n, D)
    for name, found in (("reference", ref_faces), ("target", tgt_faces)):
        sim = emb(found) @ emb(found).T
        np.fill_diagonal(sim, -np.inf)
        i, j = np.unravel_index(sim.argmax(), sim.shape)
        if sim[i, j] >= threshold:
            raise Drop("duplicate_identity", f"faces {i} and {j} of the {name} frame look like one "
                       f"person (cosine {sim[i, j]:.2f} >= {threshold})")
    sim = emb(ref_faces) @ emb(tgt_faces).T                                         # (n_ref, n_tgt)
    return [(i, j, float(sim[i, j])) for i, j in R.hungarian(sim)[1] if sim[i, j] >= threshold]

def square_around(boxes, W, H):
    """The largest square of a (W, H) frame, centered on the boxes' union and shifted to stay inside
    -> (left, top, side), integer pixels holding every box whole; Drop when the subjects are too far
    apart for it."""
    s = min(W, H)
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    corner = []
    for lo, hi, size in ((x0, x1, W), (y0, y1, H)):
        # the corners that hold them
        first, last = max(0, math.ceil(hi) - s), min(size - s, math.floor(lo))
        if first > last:
            raise Drop("no_square_fit", f"the subjects span {x1 - x0:.0f}x{y1 - y0:.0f} px, "
                       f"more than a {s} px square")
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
    # a face box -> a box for the whole person below it (shoulders-wide, down to the bottom), SAM2's
    # prompt
    x0, y0, x1, y1 = face
    w, h = x1 - x0, y1 - y0
    return max(0.0, x0 - w), max(0.0, y0 - h / 2), min(float(W), x1 + w), float(H)

def region_masks(image, boxes, masker=None):
    """Each subject's mask in image -> [uint8 (H, W), 255 inside]: every pixel its box touches; with
    a masker (rewards.Sam2Masker.masks: image, boxes -> (K, H, W) bool), its mask's largest
    connected component (the paper's clean-up: stray blobs of a box prompt are other things)."""
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

def curate_pair(ref_frame, tgt_frame, faces, threshold=0.5, min_size=256, min_subjects=2,
                margin=0.4, masker=None):
    """One reference frame and one target frame -> (reference crops [PIL], square target PIL, masks
    [uint8], info: the verified pairs' cosines and how many reference-frame faces found no partner),
    subjects left to right in the target; or Drop with the reason."""
    for name, im in (("reference", ref_frame), ("target", tgt_frame)):
        if min(im.size) < min_size:
            raise Drop("too_small", f"the {name} frame is {im.size[0]}x{im.size[1]}, "
                       f"under --min-size {min_size}")
    ref_faces = find_faces(faces, ref_frame, "reference", min_subjects)
    tgt_faces = find_faces(faces, tgt_frame, "target", min_subjects)
    pairs = match_identities(ref_faces, tgt_faces, threshold)
    if len(pairs) < min_subjects:
        raise Drop("unverified", f"{len(pairs)} of {min(len(ref_faces), len(tgt_faces))} "
                   "identities verified across the frames (cosine >= "
                   f"{threshold}), need {min_subjects}")
    pairs.sort(key=lambda p: tgt_faces[p[1]][0][0])                    # left to right in the target
    left, top, s = square_around([tgt_faces[j][0] for _, j, _ in pairs], *tgt_frame.size)
    target = tgt_frame.crop((left, top, left + s, top + s))
    boxes = [(x0 - left, y0 - top, x1 - left, y1 - top)
             for x0, y0, x1, y1 in (tgt_faces[j][0] for _, j, _ in pairs)]
    masks = region_masks(target, [person_box(b, s, s) for b in boxes] if masker else boxes, masker)
    refs = [face_crop(ref_frame, ref_faces[i][0], margin) for i, _, _ in pairs]
    return refs, target, masks, dict(cosines=[round(c, 4) for _, _, c in pairs],
                                     unverified=len(ref_faces) - len(pairs))

def curate(items, out, faces, prompt=DEFAULT_PROMPT, caption=None, **opts):
    """`python data.py curate`: items (video_items / pair_items) -> out/manifest.jsonl,
    out/images/<id>.jpg (the square target), out/refs/<id>_<k>.jpg (face crops),
    out/masks/<id>_<k>.png, out/summary.json. faces: image -> [(box, unit embedding)]
    (face_detector); opts: curate_pair's. A record's prompt: the item's own caption, else
    caption(target, refs) when given (a captioning model), else prompt.format(n=subjects), with a
    warning. -> the summary."""
    tally, records, generic, used = Tally("inputs"), [], 0, set()
    for name, source, read, text in tqdm(items, desc="curate", disable=len(items) < 2):
        try:
            refs, target, masks, info = curate_pair(*read(), faces, **opts)
        except Drop as d:
            tally.drop(source, d)
            continue
        key = clean_id(name)
        while key in used:                                 # clip.mp4 and clip.mov: both kept, apart
            key += "_"
        used.add(key)
        if text is None and caption is not None:
            text = caption(target, refs)
        if text is None:
            text, generic = prompt.format(n=len(refs)), generic + 1
        rec = dict(id=key, target=f"images/{key}.jpg",
                   refs=[f"refs/{key}_{k}.jpg" for k in range(len(refs))],
                   masks=[f"masks/{key}_{k}.png" for k in range(len(refs))], prompt=text,
                   kinds=["face"] * len(refs))
        save_image(target, os.path.join(out, rec["target"]))
        for ref, m, r, mp in zip(refs, masks, rec["refs"], rec["masks"]):
            save_image(ref, os.path.join(out, r))
            save_image(Image.fromarray(m), os.path.join(out, mp))
        records.append(rec)
        tally.keep(source, id=key, subjects=len(refs), **info)
    os.makedirs(out, exist_ok=True)
    path = write_manifest(out, records)
    if generic:
        print(f"warning: {generic} of {len(records)} records have the generic prompt {prompt!r}: "
              f"give each clip a caption (<clip>.txt beside a video, <pair>/prompt.txt)",
              file=sys.stderr)
    return tally.write(out, manifest=path, generic_prompts=generic,
                       unverified_faces=sum(i.get("unverified", 0) for i in tally.items))

# --- existing manifests: object masks, correspondences

def place(path, root, out):
    """A file of a manifest in root -> its path relative to out, where it is hard-linked (or copied)
    unless out is root: the new manifest's paths stay inside its own folder, as D.resolve()
    requires."""
    rel = os.path.relpath(path, root)
    dst = os.path.join(out, rel)
    if not (os.path.exists(dst) and os.path.samefile(path, dst)):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = os.path.join(os.path.dirname(dst), f".tmp-{os.getpid()}-{os.path.basename(dst)}")
        try:
            os.link(path, tmp)
        except OSError:                                     # another file system, or no links there
            shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
    return rel

def manifest_records(manifest, out, tally):
    """-> (root, [(source "manifest:line", validated record)]); records that do not parse or
    validate go to the tally as bad_record. The input manifest is never the output."""
    if os.path.realpath(os.path.join(out, "manifest.jsonl")) == os.path.realpath(manifest):
        raise D.InputError(f"{manifest}: --out {out} would overwrite it; choose another folder")
    records, problems = D.read_manifest(manifest)
    root = os.path.dirname(os.path.abspath(manifest))
    os.makedirs(out, exist_ok=True)
    for line, _, why in problems:
        tally.drop(f"{manifest}:{line}", Drop("bad_record", why))
    good = []
    for line, raw in records:
        r, bad = D.validate(raw, root, deep=False)
        if r is None:
            tally.drop(f"{manifest}:{line}", Drop("bad_record",
                                                  "; ".join(f"{f}: {w}" for f, w in bad)))
        else:
            good.append((f"{manifest}:{line}", r))
    return root, good

def record_out(r, root, out, **new):
    """A validated record -> its JSON for a manifest in out (files placed there), with the fields in
    new replaced."""
    rec = dict(id=r.get("id"), target=r["target"] and place(r["target"], root, out),
               prompt=r["prompt"], refs=[place(p, root, out) for p in r["refs"]],
               masks=r["masks"] and [place(p, root, out) for p in r["masks"]], points=r["points"],
               **{k: r[k] for k in ("kinds", "captions", "attrs", "boxes") if k in r})
    rec.update(new)
    return {k: v for k, v in rec.items() if v is not None}

def object_boxes(image, captions, detect, iou_max=0.7):
    """Each caption's best box in image (detect: image, phrases -> per phrase [(box, score)], e.g.
    rewards.Florence2Detector.detect); Drop when a caption is not found, or two ground one object
    (IoU > iou_max)."""
    boxes = []
    for c, found in zip(captions, detect(image, captions)):
        if not found:
            raise Drop("not_found", f"{c!r} not found in the target")
        boxes.append(max(found, key=lambda f: f[1])[0])                 # ties: the detector's first
    for a in range(len(boxes)):
        for b in range(a):
            if R.iou(boxes[a], boxes[b]) > iou_max:
                raise Drop("same_object", f"{captions[b]!r} and {captions[a]!r} ground one object "
                                          f"(IoU {R.iou(boxes[a], boxes[b]):.2f})")
    return boxes

def curate_objects(manifest, out, detect, masker=None, iou_max=0.7):
    """`python data.py curate-objects`: each record with a target, a caption per reference and no
    masks gets a mask per subject (its caption's box, or SAM2's mask in it) in out/object_masks/;
    records with masks pass unchanged. -> the summary (out/manifest.jsonl, out/summary.json)."""
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
                raise Drop("no_captions",
                           "no captions: the detector finds each subject by its caption")
            target = D.load_image(r["target"])
            masks = region_masks(target, object_boxes(target, r["captions"], detect, iou_max),
                                 masker)
        except Drop as d:
            tally.drop(source, d)
            continue
        except D.InputError as e:                       # a truncated target: only headers were read
            tally.drop(source, Drop("unreadable", str(e)))
            continue
        key = clean_id(str(r["id"])) if r.get("id") is not None else f"{n:06d}"
        while key in used:                      # ids "x" and "x." clean alike: each keeps its masks
            key += "_"
        used.add(key)
        paths = [f"object_masks/{key}_{k}.png" for k in range(len(masks))]
        for m, p in zip(masks, paths):
            save_image(Image.fromarray(m), os.path.join(out, p))
        records.append(record_out(r, root, out, masks=paths))
        tally.keep(source, masks="detected")
    return tally.write(out, manifest=write_manifest(out, records), masks_given=given)

def mutual_neighbours(a, b):
    """a (P, D), b (Q, D) unit rows -> [(i, j)] where b[j] is a[i]'s nearest and a[i] is b[j]'s:
    one-to-one."""
    sim = a @ b.T                                                                   # (P, Q) cosines
    ab, ba = sim.argmax(1), sim.argmax(0)
    return [(i, int(j)) for i, j in enumerate(ab) if ba[j] == i]

def reference_points(ref, target, region, features):
    """Correspondences of one reference inside its region of the target -> [[ry, rx, ty, tx]] in
    [0, 1]. The target is cropped to the square around the region (so the subject fills it about as
    it fills its reference), both images go through features (images -> per image (g, g, D), the
    patch grid over the whole image), and mutual nearest patches are kept when the target patch's
    centre lies in the region."""
    H, W = region.shape
    ys, xs = np.nonzero(region)
    side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min())
    top = min(max((ys.min() + ys.max() + 1 - side) // 2, 0), max(H - side, 0))
    left = min(max((xs.min() + xs.max() + 1 - side) // 2, 0), max(W - side, 0))
    bottom, right = min(top + side, H), min(left + side, W)
    fr, ft = (np.asarray(f, np.float64)
              for f in features([ref, target.crop((left, top, right, bottom))]))
    norm = lambda f: (f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)).reshape(
        -1, f.shape[-1])
    # patch centres: in the reference as shares of its sides; in the target as pixels of the full
    # image
    (gh, gw), (th, tw) = fr.shape[:2], ft.shape[:2]
    rc = [((i + .5) / gh, (j + .5) / gw) for i in range(gh) for j in range(gw)]
    tc = [(top + (i + .5) * (bottom - top) / th, left + (j + .5) * (right - left) / tw)
          for i in range(th) for j in range(tw)]
    inside = [k for k, (y, x) in enumerate(tc) if region[int(y), int(x)]]
    if not inside:
        return []
    pairs = mutual_neighbours(norm(fr), norm(ft)[inside])
    return [[round(rc[i][0], 6), round(rc[i][1], 6), round(tc[inside[j]][0] / H, 6),
             round(tc[inside[j]][1] / W, 6)]
            for i, j in pairs]

def record_correspondences(target, refs, masks, features):
    """A record's points, per reference. MOSAIC's disjointness: a target pixel in two masks belongs
    to neither, so no target token is claimed by two references."""
    m = np.stack(masks) >= 0.5                                                           # (N, H, W)
    own = m & (m.sum(0) == 1)
    return [reference_points(ref, target, region, features) if region.any() else []
            for ref, region in zip(refs, own)]

def correspond(manifest, out, features):
    """`python data.py correspond`: points for every record with masks (replacing any it had),
    written with the record to out/manifest.jsonl; records without masks pass unchanged (counted).
    -> the summary."""
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
            points = record_correspondences(D.load_image(r["target"]),
                                            [D.load_image(p) for p in r["refs"]],
                                            [D.load_mask(p) for p in r["masks"]], features)
        except (D.InputError, D.DataError) as e:                  # a truncated image, an empty mask
            tally.drop(source, Drop("unreadable", str(e)))
            continue
        records.append(record_out(r, root, out, points=points))
        counts += [len(p) for p in points]
        tally.keep(source, points=[len(p) for p in points])
    return tally.write(out, manifest=write_manifest(out, records), without_masks=no_masks,
                       points_per_reference=round(float(np.mean(counts)), 2) if counts else 0)

def run(args):
    """The curation commands with the real models, loaded through rewards.py (missing weights:
    RewardModelError). -> exit status: 0 when anything was kept."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cmd != "faces":
        D.check_file(args.manifest)                            # before any model loads
    elif not (0 <= args.ref_at <= 1 and 0 <= args.target_at <= 1 and args.min_subjects >= 1):
        raise D.InputError("--ref-at and --target-at are shares of a clip, in [0, 1]; "
                           "--min-subjects is at least 1")
    # OUT never holds what it reads: a manifest's folder as OUT would lose the manifest to the new
    # one
    reads = [getattr(args, k, None) for k in ("manifest", "videos", "pairs")]
    D.check_output([args.out], reads, args.force)
    masker = R.Sam2Masker(args.sam2, device).masks if getattr(args, "sam2", None) else None
    if args.cmd == "faces":
        folder = args.videos or args.pairs
        if not os.path.isdir(folder):
            raise D.InputError(f"{folder}: no such folder")
        faces = face_detector(R.FaceEmbedder(args.face_pack, args.face_root, device))
        items = (video_items(folder, args.ref_at, args.target_at) if args.videos
                 else pair_items(folder))
        summary = curate(items, args.out, faces, args.prompt, threshold=args.threshold,
                         min_size=args.min_size,
                         min_subjects=args.min_subjects, margin=args.margin, masker=masker)
    elif args.cmd == "objects":
        cls = R.Florence2Detector if args.detector_kind == "florence2" else R.Owlv2Detector
        detect = cls(args.detector or R.DETECTORS[args.detector_kind], device).detect
        summary = curate_objects(args.manifest, args.out, detect, masker)
    else:
        dino = R.DinoEmbedder(args.dinov2, device)
        summary = correspond(args.manifest, args.out,
                             lambda images: dino.patches(images, args.patch_side))
    return 0 if summary["kept"] else 1

# -----------------------------------------------------------------------------

def main(argv=None):
    p = CL.Parser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("faces",
                       help="your videos or photo pairs -> a manifest (faces, identities, masks)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder of clips (<clip>.txt beside one: its caption)")
    src.add_argument("--pairs",
                     help="folder of pair folders <pair>/ref.jpg + target.jpg (+ prompt.txt)")
    v.add_argument("--out", required=True)
    v.add_argument("--threshold", type=float, default=0.5,
                   help="face cosine that verifies one identity")
    v.add_argument("--min-size", type=int, default=256, help="smallest frame side (px) kept")
    v.add_argument("--min-subjects", type=int, default=2, help="verified identities a record needs")
    v.add_argument("--ref-at", type=float, default=0.1,
                   help="reference frame, as a share of the clip")
    v.add_argument("--target-at", type=float, default=0.5,
                   help="target frame, as a share of the clip")
    v.add_argument("--margin", type=float, default=0.4,
                   help="face crop: box grown by this x its side, each way")
    v.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="for inputs without a caption ({n}: subjects)")
    v.add_argument("--face-pack", default="antelopev2",
                   help="insightface pack name (or its folder)")
    v.add_argument("--face-root", default=None,
                   help="insightface root holding models/<pack>/ (default ~/.insightface)")
    o = sub.add_parser("objects",
                       help="masks for captioned subjects of a manifest (phrase grounding)")
    o.add_argument("--manifest", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--detector", default=None,
                   help="detector folder or repo id (default: the kind's repo)")
    o.add_argument("--detector-kind", default="florence2", choices=["florence2", "owlv2"])
    cr = sub.add_parser("correspond",
                        help="SCAL points: mutual nearest DINOv2 patches, reference <-> its mask")
    cr.add_argument("--manifest", required=True)
    cr.add_argument("--out", required=True)
    cr.add_argument("--dinov2", default="facebook/dinov2-base", help="DINOv2 folder or repo id")
    cr.add_argument("--patch-side", type=int, default=224,
                    help="images go to DINOv2 at this side (14 px patches)")
    for q in (v, o, cr):
        q.add_argument("--device", default=None, help="default: cuda if available")
        D.add_force(q)
    for q in (v, o):
        q.add_argument("--sam2", default=None,
                       help="SAM2 folder or repo id: masks from it (default: boxes)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except (D.DataError, D.InputError, *D.FILE_ERRORS, R.RewardModelError) as e:
        # user mistakes: one line
        print(f"error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())

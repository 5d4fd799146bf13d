"""
The toy world: subject identities composed into multi-subject targets, written as a manifest every
tool reads, with the toy's own subject reader, embedder and scorers (the stand-ins for faces,
DINOv2, CLIP and HPS) -- the nanoGPT shakespeare_char of subject-driven generation, trainable on 2
CPU cores.

    python toy.py --out data/train --n 6000 --subjects 1 2 3             # targets, masks, references, manifest
    python toy.py --out data/test --n 200 --split test --seed 3         # held-out identities
    python toy.py --out data/near --n 100 --split test --hard near      # hard pairs: one shape, close colours
    python toy.py eval --manifest data/test/manifest.jsonl --images samples/0    # the world's metrics

The world that tests customization (write_world, what assets/toy is trained on): an identity is a
continuous colour, a two-tone cell code and a shape; prompts name only the shapes and their count; a
reference is another view. Folders of the first toy world (named sprites, prompts naming each in
full; its code is in git history) are refused with a line saying what changed. eval scores this
world's manifests by its metrics, and a manifest without identities (prompts and references only) by
its reward; it reads the layout rewards.py eval reads (DIR/<id>.png per record).
"""
import argparse, json, os, re, sys
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

import cli as CL
import data as D
import model as M
import rewards as R

# -----------------------------------------------------------------------------
# the world that tests customization: the references carry what the prompt cannot name
#
# The first world (its code is in git history) named every identity in full in its prompt and gave
# each one reference identical to its rendering: text alone was enough, so a model learned to ignore
# its references. Here an identity is a continuous colour, a two-tone cell code and a shape; the
# prompt names only the shapes and their count; a reference is another view (another scale, position
# and background tint); validation and test identities come from seed streams training never draws
# from.

WORLD_SHAPES = ("circle", "square", "triangle", "diamond")
# u (right) and v (down) in [-1, 1] across the sprite's box; each shape is symmetric about the box's
# centre lines or touches all four sides, so the detected bounding box is the drawn box and the
# code's cells line up
WORLD_SHAPE_TESTS = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: (abs(u) <= 1) & (abs(v) <= 1),
    "triangle": lambda u, v: abs(u) <= (v + 1) / 2,
    "diamond": lambda u, v: abs(u) + abs(v) <= 1,
}
CODE_CELLS = 2   # a CODE_CELLS x CODE_CELLS code over the sprite's box: 2^4 - 2 = 14 two-tone codes
DARK = 0.55                     # the second tone: the colour darkened by this factor
# each RGB channel uniform in this range (below any reference tint: see view_px)
CHANNEL = (0.15, 0.85)
# identity k of a split is the draw of seed stream (split, k)
SPLITS = {"train": 0, "val": 1, "test": 2}
# hard pairs' colour distance (mean abs RGB in [0, 1])
HARD = {"near": 0.06, "medium": 0.15, "far": 0.30}
TARGET_PX = (7, 11)             # sprite side in targets (px, default; --sprite)
# sprite side in a 16 px reference, scaled with --ref-size: never a target's side
VIEW_PX = (12, 15)
COUNTS = ("a", "two", "three", "four")
BACKGROUND = (255, 255, 255)    # targets are drawn on white

@dataclass(frozen=True)
class Identity:
    """A subject of the world: its colour (RGB in [0, 1]), its two-tone code (CODE_CELLS^2 bits,
    row-major; 1 = the darker tone) and its shape. Only the shape is ever named in a prompt."""
    shape: str
    rgb: tuple
    code: tuple

    def attrs(self):
        return dict(shape=self.shape, rgb=list(self.rgb), code=list(self.code))

def _colour(rng):
    while True:         # at least one channel well below white: the detector must see every subject
        c = rng.uniform(*CHANNEL, 3)
        if c.min() <= 0.7:
            return c

def _code(rng):
    while True:                 # both tones present: the lighter one is the colour, wherever it is
        c = rng.integers(0, 2, CODE_CELLS ** 2)
        if 0 < c.sum() < len(c):
            return tuple(int(b) for b in c)

def draw_identity(split, k, shape=None, rgb=None):
    """Identity k of split (train / val / test): a seeded draw, so splits never share an
    identity."""
    rng = np.random.default_rng([7919, SPLITS[split], k])
    s = WORLD_SHAPES[rng.integers(len(WORLD_SHAPES))] if shape is None else shape
    c = _colour(rng) if rgb is None else np.asarray(rgb)
    return Identity(s, tuple(round(float(v), 4) for v in c), _code(rng))

# what a folder of the first world is told (its attrs name a colour and a pattern, not rgb and code)
FIRST_WORLD = ("a folder of the first toy world; the toy world now draws continuous colours and "
               "two-tone codes (attrs shape, rgb, code): regenerate it with "
               "python toy.py --out DIR --n N")

def identity_of(attrs, where):
    """A manifest record's attrs entry -> Identity, or a one-line InputError saying what changed
    (the first world's attrs) or what an identity is (anything else)."""
    # the first world's subject: a colour name and a pattern
    if isinstance(attrs, dict) and ("colour" in attrs or "pattern" in attrs):
        raise D.InputError(f"{where}: attrs name a colour and a pattern ({attrs.get('colour')}, "
                           f"{attrs.get('pattern')}): {FIRST_WORLD}")
    # this world's, whole: one of its shapes, 3 numbers of colour, CODE_CELLS^2 bits of code
    try:
        rgb, code = tuple(float(v) for v in attrs["rgb"]), tuple(int(b) for b in attrs["code"])
        ok = attrs["shape"] in WORLD_SHAPES and len(rgb) == 3 and len(code) == CODE_CELLS ** 2
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise D.InputError(f"{where}: attrs {str(attrs)[:80]} are not a toy identity (shape in "
                           f"{WORLD_SHAPES}, rgb: 3 numbers, code: {CODE_CELLS ** 2} bits)")
    return Identity(attrs["shape"], rgb, code)

def _cells(i, j, h, w):
    # the code cell of pixel (i, j) in an h x w box: split where the pixel centres cross the box's
    # centre lines
    return (((i + .5) * CODE_CELLS // h).astype(int) * CODE_CELLS
            + ((j + .5) * CODE_CELLS // w).astype(int))

def render_identity(ident, px):
    """An identity at px x px -> (rgb float (px, px, 3) in [0, 1], mask bool (px, px)): the code's
    cells split the box at its centre lines, so every view shows the same code at its own scale."""
    i, j = np.mgrid[0:px, 0:px]
    mask = WORLD_SHAPE_TESTS[ident.shape]((j + 0.5) / px * 2 - 1, (i + 0.5) / px * 2 - 1)
    cell = _cells(i, j, px, px)
    dark = np.asarray(ident.code)[cell].astype(bool)
    rgb = np.where(dark[..., None], DARK, 1.0) * np.asarray(ident.rgb)
    return rgb, mask

def paint(canvas, ident, y, x, px):
    # identity drawn into canvas (H, W, 3) uint8 at top-left (y, x) -> its mask on the canvas
    rgb, m = render_identity(ident, px)
    canvas[y:y + px, x:x + px][m] = np.round(rgb[m] * 255).astype(np.uint8)
    full = np.zeros(canvas.shape[:2], bool)
    full[y:y + px, x:x + px] = m
    return full

def view_px(ref_size):
    # the range of a view's sprite side in a ref_size reference: VIEW_PX at 16 px, in proportion
    # elsewhere
    return round(VIEW_PX[0] * ref_size / 16), min(round(VIEW_PX[1] * ref_size / 16), ref_size)

def view(ident, rng, ref_size=16):
    """A reference: another view of the identity (another scale than any target's, a random place, a
    light background tint above every channel's range, so the subject stands out) ->
    (uint8 image, its mask, px, (y, x))."""
    px = int(rng.integers(view_px(ref_size)[0], view_px(ref_size)[1] + 1))
    tint = rng.integers(228, 256, 3)
    out = np.broadcast_to(tint.astype(np.uint8), (ref_size, ref_size, 3)).copy()
    y, x = (int(v) for v in rng.integers(0, ref_size - px + 1, 2))
    return out, paint(out, ident, y, x, px), px, (y, x)

def name_shapes(shapes):
    # ["circle", "square", "circle"] -> "two circles and a square" (first-named first, counts as
    # words)
    order = list(dict.fromkeys(shapes))
    words = [f"{COUNTS[shapes.count(s) - 1]} {s}{'s' if shapes.count(s) > 1 else ''}"
             for s in order]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]

def layout(rng, n, px, size, tries=100):
    """Top-left corners (n, 2) of n px-sized boxes at least 1 px apart (a leakage metric must not
    merge neighbours): each box uniform among the places still free; restart on a dead end; the four
    corners last."""
    grid = np.stack(np.mgrid[0:size - px + 1, 0:size - px + 1], -1).reshape(-1, 2)   # every corner
    for _ in range(tries):
        free, boxes = grid, []
        for _ in range(n):
            if len(free) == 0:
                break
            boxes.append(free[rng.integers(len(free))])
            free = free[np.abs(free - boxes[-1]).max(1) > px]
        if len(boxes) == n:
            return np.stack(boxes)
    corners = np.array([(0, 0), (0, size - px), (size - px, 0), (size - px, size - px)])
    return corners[rng.permutation(4)[:n]]

def hard_pair(rng, split, k, distance):
    """Two identities of one shape whose colours differ by `distance` (mean abs RGB): colour +
    distance x signs."""
    while True:
        a = draw_identity(split, k)
        b_rgb = np.asarray(a.rgb) + distance * rng.choice([-1.0, 1.0], 3)
        if b_rgb.min() >= CHANNEL[0] and b_rgb.max() <= CHANNEL[1] and b_rgb.min() <= 0.7:
            return [a, draw_identity(split, k + 1_000_000, shape=a.shape, rgb=b_rgb)]
        k += 2_000_000                          # another seeded draw of the same split

def world_example(seed, index, split="train", size=32, ref_size=16, subjects=(2, 3), pool=1000,
                  hard=None, sprite=TARGET_PX):
    """Record `index` of the world of (seed, split) -> (target uint8 (size, size, 3), masks,
    identities, reference images, record without file paths). Training identities come from a pool
    of `pool` per split, each seen in many records and views; a hard record has two identities of
    one shape at HARD[hard] colour distance."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    if hard is not None:
        idents = hard_pair(rng, split, int(rng.integers(1 << 30)), HARD[hard])
    else:
        n = int(rng.choice(subjects))
        idents = [draw_identity(split, int(k)) for k in rng.choice(pool, n, replace=pool < n)]
    n, box = len(idents), sprite[1]
    if box > size or (n > 1 and 2 * box + 1 > size):        # the corner fallback of layout must fit
        raise D.InputError(f"--size {size} cannot hold {n} sprites of up to {box} px")
    target = np.full((size, size, 3), BACKGROUND, np.uint8)
    masks, points, boxes, refs = [], [], [], []
    for ident, (by, bx) in zip(idents, layout(rng, n, box, size)):
        px = int(rng.integers(sprite[0], sprite[1] + 1))
        y, x = (int(v) for v in (by, bx) + rng.integers(0, box - px + 1, 2))
        masks.append(paint(target, ident, y, x, px))
        ref, ref_mask, rpx, (ry, rx) = view(ident, rng, ref_size)
        refs.append(ref)
        # correspondences: each target pixel of the subject (centre) and the same point of the view,
        # in [0, 1], where that point falls on a pixel of the view's subject (not always so on an
        # edge, at another scale)
        a, b = np.nonzero(masks[-1][y:y + px, x:x + px])
        u, v = ry + (a + .5) * rpx / px, rx + (b + .5) * rpx / px
        on = ref_mask[u.astype(int), v.astype(int)]
        points.append([[round(p / ref_size, 6), round(q / ref_size, 6),
                        round((y + i + .5) / size, 6), round((x + j + .5) / size, 6)]
                       for p, q, i, j in zip(u[on], v[on], a[on], b[on])])
        boxes.append([round(v / size, 6) for v in (y, x, y + px, x + px)])
    shapes = [s.shape for s in idents]
    record = dict(prompt=name_shapes(shapes), points=points, attrs=[s.attrs() for s in idents],
                  captions=shapes, kinds=["object"] * n, boxes=boxes, split=split,
                  ref_size=ref_size, **({"hard": hard} if hard else {}))
    return target, masks, idents, refs, record

def write_world(out, n, seed=0, split="train", subjects=(2, 3), size=32, ref_size=16, pool=1000,
                hard=None, sprite=TARGET_PX):
    """`python toy.py`: n records under out/ (images/, masks/, refs/: each record its own views) and
    out/manifest.jsonl in the manifest format. Same arguments, same bytes; records do not depend on
    n."""
    if not subjects or not all(1 <= k <= 4 for k in subjects) or n < 1 or pool < 1:
        raise D.InputError("need --n >= 1, --identities >= 1 and --subjects between 1 and 4")
    lo, hi = view_px(ref_size)
    if not 1 <= sprite[0] <= sprite[1]:
        raise D.InputError(f"--sprite {sprite[0]} {sprite[1]}: need 1 <= LO <= HI")
    if lo < 4 or sprite[1] >= lo and sprite[0] <= hi:
        raise D.InputError(f"--sprite {sprite[0]} {sprite[1]} and --ref-size {ref_size} (views of "
                           f"{lo}-{hi} px): a reference must show its subject at another scale "
                           "than any target's, of at least 4 px")
    for d in ("images", "masks", "refs"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    lines = []
    for i in tqdm(range(n), desc="toy world", disable=n < 100):
        target, masks, _, refs, rec = world_example(seed, i, split, size, ref_size, subjects, pool,
                                                    hard, sprite)
        rec = dict(id=f"{split}{i:06d}", target=f"images/{i:06d}.png",
                   refs=[f"refs/{i:06d}_{k}.png" for k in range(len(refs))],
                   masks=[f"masks/{i:06d}_{k}.png" for k in range(len(masks))], **rec)
        Image.fromarray(target).save(os.path.join(out, rec["target"]))
        for r, m, pr, pm in zip(refs, masks, rec["refs"], rec["masks"]):
            Image.fromarray(r).save(os.path.join(out, pr))
            Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(out, pm))
        lines.append(json.dumps(rec) + "\n")
    path = os.path.join(out, "manifest.jsonl")
    D.write_atomic(path, lambda f: f.write("".join(lines).encode()))
    print(f"wrote {n} records ({split}{', hard ' + hard if hard else ''}): {path}", file=sys.stderr)
    return path

# -----------------------------------------------------------------------------
# the world's metrics, on Hungarian-matched subjects (MultiCrafter Eq. 10 as the matching)
#   read_subjects  each connected component of non-white pixels: its shape (nearest mask), colour
#                  (the world's two-tone model fitted to its pixels, the fringe left out) and code
#                  (each cell's majority tone)
#   match          references (the record's identities) to drawn subjects, by shape agreement and
#                  colour
#   blend alpha    where a matched subject's colour lies on the segment from its own reference's
#                  colour (0) to the nearest other reference's (1): an "average subject" scores 0.5;
#                  leakage = share with alpha >= 0.25
#   following      with prompt and seed fixed, a reference swapped for another of the same shape:
#                  does the drawn subject change to the new one (closer to its colour than to the
#                  old one's)?

LEAK_ALPHA = 0.25

def _square_mask(m):
    # a component's mask (its bounding box) on a 16 x 16 grid, so shapes of any scale compare
    return (np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((16, 16), Image.BILINEAR))
            > 127)

SHAPE_MASKS = {s: _square_mask(render_identity(Identity(s, (0.5,) * 3, (0, 1, 1, 0)), 32)[1])
               for s in WORLD_SHAPES}

def _shape_of(m):
    sq = _square_mask(m)
    iou = {s: (sq & t).sum() / max((sq | t).sum(), 1) for s, t in SHAPE_MASKS.items()}
    return max(iou, key=iou.get)

FIT_TOL = 0.1         # a pixel farther than this (mean abs RGB) from both tones is not the sprite's

def _tone_dist(px, c):
    # (P, 3) pixels, (K, 3) candidate colours -> (K, P, 2) mean abs distance to each candidate's
    # light and dark tone
    return np.stack([np.abs(px[None] - c[:, None]).mean(-1),
                     np.abs(px[None] - DARK * c[:, None]).mean(-1)], -1)

def fit_tones(px, tol=FIT_TOL, rounds=3):
    """A component's pixels (P, 3) in [0, 1] -> (colour (3,), tone (P,): 0 light, 1 dark, -1
    neither): the world's two-tone model (a colour c and DARK * c) fitted by consensus, so that what
    is not the sprite (a blurry edge fading into the background, stray noise) is left out rather
    than averaged in. Candidates: each pixel read as the light tone and as the dark one
    (divided by DARK; at most 256 pixels, evenly spaced); the one whose tones explain the pixels
    best (a truncated L1 cost over at most 2,048) wins, then c is refined as the median of its
    inliers read back as the light tone."""
    # evenly spaced pixels
    few = lambda n: px[np.linspace(0, len(px) - 1, min(n, len(px))).astype(int)]
    cand = np.clip(np.concatenate([few(256), few(256) / DARK]), 0, 1)         # (K, 3), K <= 512
    cost = np.minimum(_tone_dist(few(2048), cand).min(-1), tol).sum(-1)       # (K,): memory bounded
    c = cand[np.argmin(cost)]
    for _ in range(rounds):
        d = _tone_dist(px, c[None])[0]                                        # (P, 2)
        tone = np.where(d.min(-1) <= tol, d.argmin(-1), -1)
        if not (tone >= 0).any():
            break
        c = np.median(np.where((tone == 1)[:, None], px / DARK, px)[tone >= 0], 0)
    d = _tone_dist(px, c[None])[0]
    return c, np.where(d.min(-1) <= tol, d.argmin(-1), -1)

CLEAN_TOL = 40 / 255  # a pixel within this of a tone (every channel) is clean (world_aesthetic too)

def read_subjects(image, threshold=40, min_area=12, clean_tol=CLEAN_TOL):
    """PIL or (H, W, 3) uint8 -> [dict(shape, rgb (3,) in [0, 1], code (bits), area, clean, box)]
    for each component of pixels whose ink (255 - value) exceeds threshold in some channel, largest
    first. The colour and the tone of each pixel come from fit_tones; the shape is the nearest mask
    of the component's box, the code each cell's majority tone among its pixels of a tone
    (the fringe left out). clean: the share of the component's pixels within clean_tol of a tone in
    every channel."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.uint8)
    fg = (255 - a.astype(np.int16)).max(-1) > threshold
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3)))
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), 1):
        m = labels[sl] == k
        if m.sum() < min_area:
            continue
        px = a[sl][m].astype(np.float64) / 255                                      # (P, 3)
        rgb, tone = fit_tones(px)
        # the code: per cell of the box (split at its centre lines), are most of its pixels of a
        # tone dark?
        cell = np.where(tone >= 0, _cells(*np.nonzero(m), *m.shape), -1)            # -1: the fringe
        code = tuple(int((tone[cell == c] == 1).mean() > 0.5) if (cell == c).any() else 0
                     for c in range(CODE_CELLS ** 2))
        clean = np.minimum(np.abs(px - rgb).max(1), np.abs(px - rgb * DARK).max(1)) <= clean_tol
        out.append(dict(shape=_shape_of(m), rgb=rgb, code=code, area=int(m.sum()),
                        clean=float(clean.mean()),
                        box=(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)))
    out.sort(key=lambda o: -o["area"])
    return out

def colour_distance(a, b):
    # mean abs RGB
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())

def match(idents, drawn):
    """Hungarian pairs (reference i, subject j) maximizing every attribute's agreement: shape
    (0 or 1), the share of code cells that agree and 1 - colour distance (all in [0, 1])."""
    sim = [[(d["shape"] == r.shape) + np.mean(np.equal(d["code"], r.code)) + 1
            - colour_distance(d["rgb"], r.rgb) for d in drawn] for r in idents]
    return R.hungarian(np.array(sim).reshape(len(idents), len(drawn)))[1]

def blend_alpha(c, own, others):
    """Where colour c lies on the segment own (0) -> the nearest of others (1), clipped to [0, 1];
    None alone."""
    if not others:
        return None
    own = np.asarray(own)
    b = np.asarray(min(others, key=lambda o: colour_distance(o, own)))
    d = b - own
    return float(np.clip((np.asarray(c) - own) @ d / max(d @ d, 1e-12), 0, 1))

# the mean identity colour (each channel uniform in CHANNEL): where shrinkage goes
GREY = (0.5, 0.5, 0.5)

def split_error(err, toward_other, toward_mean):
    """The colour error split into its two directions, least squares pooled over rows (n, 3) each:
        err ~ pull * (other - own) + shrink * (mean - own)
    pull is leakage proper (0.5: the average of the two subjects), shrink the fidelity loss toward
    the mean colour (1: grey) that blend alpha also counts as blending; error in any other direction
    adds to neither on average. -> (pull, shrink); nan when the two directions do not determine them
    (fewer than 2 rows, or collinear)."""
    e, u, w = (np.asarray(a, np.float64).reshape(-1, 3) for a in (err, toward_other, toward_mean))
    A = np.array([[(u * u).sum(), (u * w).sum()], [(u * w).sum(), (w * w).sum()]])
    if len(e) < 2 or np.linalg.det(A) <= 1e-9 * max(np.trace(A) ** 2, 1e-30):
        return float("nan"), float("nan")
    pull, shrink = np.linalg.solve(A, [(u * e).sum(), (w * e).sum()])
    return float(pull), float(shrink)

def nearest_other(idents, i):
    # the other reference whose colour is nearest subject i's (what blend alpha and the split
    # measure compare with)
    return min((o for k, o in enumerate(idents) if k != i),
               key=lambda o: colour_distance(o.rgb, idents[i].rgb), default=None)

def score_image(image, idents):
    """One image against its record's identities -> dict(count_ok, subjects: per reference, None
    where no drawn subject was matched to it, else its matched subject's colour_err, code_ok,
    shape_ok, alpha and (multi-subject) split: its colour error and the two directions split_error
    takes)."""
    drawn = read_subjects(image)
    pairs = dict(match(idents, drawn)) if drawn else {}
    rows = []
    for i, r in enumerate(idents):
        d = drawn[pairs[i]] if i in pairs else None
        rows.append(d and dict(
            colour_err=colour_distance(d["rgb"], r.rgb), code_ok=float(d["code"] == tuple(r.code)),
            shape_ok=float(d["shape"] == r.shape),
            alpha=blend_alpha(d["rgb"], r.rgb, [o.rgb for k, o in enumerate(idents) if k != i]),
            split=len(idents) > 1 and [np.subtract(d["rgb"], r.rgb).tolist(),
                                       np.subtract(nearest_other(idents, i).rgb, r.rgb).tolist(),
                                       np.subtract(GREY, r.rgb).tolist()]))
    return dict(count_ok=float(len(drawn) == len(idents)), subjects=rows)

def world_metrics(images, records, where="manifest"):
    """Images (one per record) -> the world's metrics (MultiCrafter Eq. 10's matching, then): drawn,
    the share of references matched to a drawn subject; on the matched subjects, colour error
    (mean abs RGB in [0, 1]), texture (code exactly right; chance 1/14) and shape accuracy
    (chance 1/4), blend alpha (multi-subject records) and leakage (the share of those with alpha >=
    LEAK_ALPHA); subject count accuracy per image; all_drawn, the share of images where every
    reference was matched (on a hard pair: both subjects drawn, not one omitted); pull and shrink,
    the colour error split (split_error) into the pull toward the nearest other reference and the
    shrinkage toward the mean colour (multi-subject records), which blend alpha mixes."""
    refs, counts, complete = [], [], []
    for k, (im, rec) in enumerate(zip(images, records)):
        idents = [identity_of(a, f"{where}: record {rec.get('id', k)}") for a in rec["attrs"]]
        s = score_image(im, idents)
        refs += s["subjects"]
        counts.append(s["count_ok"])
        complete.append(float(all(r is not None for r in s["subjects"])))
    subs = [r for r in refs if r is not None]
    alphas = [r["alpha"] for r in subs if r["alpha"] is not None]
    pull, shrink = split_error(*(
        np.array([r["split"][j] for r in subs if r["split"]]).reshape(-1, 3) for j in range(3)))
    mean = lambda key: float(np.mean([r[key] for r in subs])) if subs else float("nan")
    return dict(drawn=len(subs) / len(refs) if refs else float("nan"),
                colour_err=mean("colour_err"),
                texture_acc=mean("code_ok"), shape_acc=mean("shape_ok"),
                count_acc=float(np.mean(counts)) if counts else float("nan"),
                alpha=float(np.mean(alphas)) if alphas else float("nan"),
                leakage=float(np.mean([a >= LEAK_ALPHA for a in alphas])) if alphas
                else float("nan"), all_drawn=float(np.mean(complete)) if complete else float("nan"),
                pull=pull, shrink=shrink, n_refs=len(refs), n_subjects=len(subs),
                n_alpha=len(alphas), n_records=len(complete))

METRICS = ("drawn", "colour_err", "texture_acc", "shape_acc", "count_acc", "alpha", "leakage",
           "pull", "shrink")

def metrics_table(rows, keys=METRICS):
    """{row name: world_metrics} -> a markdown table of `keys`."""
    lines = ["| row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    return "\n".join(lines + [f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |"
                               for name, m in rows.items()])

def swap_record(rec, seed=0, slot=0, where="manifest"):
    """The record with reference `slot` swapped for a view of another identity of the same shape
    (from the same split's seed stream, drawn by (seed, record id)), its target re-rendered with the
    new one in the old one's place: the swap a reference-following model should follow. ->
    (record, new reference uint8, new target)."""
    rng = np.random.default_rng([seed, sum(map(ord, str(rec.get("id", ""))))])
    old = identity_of(rec["attrs"][slot], f"{where}: record {rec.get('id')}")
    split = rec.get("split", "test")
    new = draw_identity(split, int(rng.integers(1 << 40)) + 10 ** 12, shape=old.shape)
    ref = view(new, rng, int(rec.get("ref_size", 16)))[0]
    out = dict(rec, attrs=[new.attrs() if k == slot else a for k, a in enumerate(rec["attrs"])])
    return out, ref, render_boxes(out, where)

def render_boxes(rec, where="manifest", size=32, recolour=None):
    """A record's target re-drawn from its attrs and boxes (uint8 (size, size, 3)); recolour: per
    subject an RGB to draw instead (the averaging generator's)."""
    out = np.full((size, size, 3), BACKGROUND, np.uint8)
    for k, (a, b) in enumerate(zip(rec["attrs"], rec["boxes"])):
        ident = identity_of(a, f"{where}: record {rec.get('id')}")
        if recolour is not None:
            ident = Identity(ident.shape, tuple(recolour[k]), ident.code)
        y0, x0, y1, _ = (int(round(v * size)) for v in b)
        paint(out, ident, y0, x0, y1 - y0)
    return out

SANITY = ("targets", "averaging", "shrinking", "text-only")         # sanity_images' generators
SHRINK = 0.5                   # the shrinking generator's step toward the mean colour

def sanity_images(records, kind, seed=0, where="manifest"):
    """The rows that prove the metrics discriminate, drawn in the records' layouts:
    targets    the records' own subjects (alpha ~ 0, following 1)
    averaging  each subject recoloured to the mean of its colour and its nearest other reference's
               (alpha ~ 0.5, pull 0.5, shrink 0)
    shrinking  each subject's colour moved SHRINK of the way toward the mean colour GREY
               (pull 0, shrink SHRINK): a fidelity loss, no leakage
    text-only  what a generator that reads only the prompt draws: each subject the named shape with
               a colour and code drawn from (seed, record, subject) alone, whatever the references
               (following ~ chance)"""
    out = []
    for n, rec in enumerate(records):
        idents = [identity_of(a, f"{where}: record {rec.get('id', n)}") for a in rec["attrs"]]
        if kind == "targets":
            out.append(render_boxes(rec, where))
        elif kind == "averaging":
            near = lambda i: nearest_other(idents, i) or idents[i]
            out.append(render_boxes(rec, where, recolour=[(np.asarray(r.rgb) + near(i).rgb) / 2
                                                          for i, r in enumerate(idents)]))
        elif kind == "shrinking":
            out.append(render_boxes(rec, where, recolour=[np.asarray(r.rgb)
                                                          + SHRINK * np.subtract(GREY, r.rgb)
                                                          for r in idents]))
        elif kind == "text-only":
            rng = np.random.default_rng([seed, n])
            blind = dict(rec, attrs=[Identity(r.shape, tuple(_colour(rng)), _code(rng)).attrs()
                                     for r in idents])
            out.append(render_boxes(blind, where))
        else:
            raise ValueError(f"unknown sanity row {kind!r}")
    return out

def following(after, records, swapped, slot=0, where="manifest"):
    """Images generated with reference `slot` of each record swapped (swapped: swap_record's
    records), prompt and seed as for the records' own images -> (share of swaps where the drawn
    subject is closer in colour to the new reference than to the old one, swaps counted). The
    subject is found by its shape, then its size (the largest of the slot's shape, else the largest
    drawn: a blurry model's shapes are often misread), never by colour, which would favour the new
    reference; so only records where the slot's shape is unique count (all single-subject ones; no
    hard pair)."""
    hits = []
    for im, rec, new in zip(after, records, swapped):
        idents = [identity_of(a, f"{where}: record {new.get('id')}") for a in new["attrs"]]
        if [r.shape for r in idents].count(idents[slot].shape) > 1:
            continue
        old = identity_of(rec["attrs"][slot], f"{where}: record {rec.get('id')}")
        drawn = sorted(read_subjects(im), key=lambda d: (d["shape"] != old.shape, -d["area"]))
        hits.append(bool(drawn) and colour_distance(drawn[0]["rgb"], idents[slot].rgb) <
                    colour_distance(drawn[0]["rgb"], old.rgb))
    return (float(np.mean(hits)) if hits else float("nan")), len(hits)

# -----------------------------------------------------------------------------
# the world's reward (Eq. 9 for IPPO), read by this world's detector
#   text  the named shapes against the drawn ones (Hungarian on shape, over max(named, drawn): a
#         missing or an extra subject costs alike)
#   aes   the share of clean pixels: white background, or within tol of the light or dark tone of
#         the subject read
#   id    Eq. 10 over references and drawn subjects, embedded so that cosine ~ agreement in shape,
#         code and colour

RBF_CENTRES = np.linspace(0, 1, 11)

def _rbf(v, centres=RBF_CENTRES, width=0.08):
    # a channel value in [0, 1] -> Gaussian bumps: the cosine of two encodings falls with their
    # distance (~0.1)
    return np.exp(-((np.asarray(v)[..., None] - centres) ** 2) / (2 * width ** 2))

def embed_subject(d):
    """A read subject (read_subjects' dict) -> unit vector: shape one-hot, code (+-1 per cell) and
    per-channel RBF colour, each part of unit norm, so a cosine is the mean of shape equality, code
    agreement and colour kernel."""
    code = (2 * np.asarray(d["code"], np.float64) - 1) / np.sqrt(CODE_CELLS ** 2)
    col = _rbf(d["rgb"])
    col = (col / np.linalg.norm(col, axis=1, keepdims=True)).ravel() / np.sqrt(3)
    v = np.concatenate([np.eye(len(WORLD_SHAPES))[WORLD_SHAPES.index(d["shape"])], code, col])
    return v / np.linalg.norm(v)

class WorldSubjects:
    """MultiIDReward's embedder for this world: subjects are read_subjects' components; a reference
    is its largest."""
    dim = len(WORLD_SHAPES) + CODE_CELLS ** 2 + 3 * len(RBF_CENTRES)        # embed_subject's length

    def subjects(self, image, captions=None):
        found = read_subjects(image)
        return np.stack([embed_subject(d) for d in found]) if found else np.zeros((0, self.dim))

    def references(self, images, captions=None):
        rows = [self.subjects(im)[:1] for im in images]
        return np.stack([r[0] if len(r) else np.zeros(self.dim) for r in rows])

def prompt_shapes(prompt):
    """'two circles and a square' -> ['circle', 'circle', 'square'] (name_shapes' inverse; unknown
    words ignored)."""
    out = []
    for phrase in re.split(r",\s*|\s+and\s+", prompt.lower()):
        words = re.findall(r"[a-z]+", phrase)
        shape = next((s for s in WORLD_SHAPES if s in words or s + "s" in words), None)
        if shape is not None:
            count = next((COUNTS.index(w) + 1 for w in words if w in COUNTS), 1)
            out += [shape] * count
    return out

def world_text_score(images, prompts):
    out = []
    for im, prompt in zip(images, prompts):
        named, drawn = prompt_shapes(prompt), [d["shape"] for d in read_subjects(im)]
        # the Hungarian optimum on shape
        hit = sum(min(named.count(s), drawn.count(s)) for s in set(named))
        out.append(hit / max(len(named), len(drawn), 1))
    return np.array(out)

def world_aesthetic(images, prompts=None, tol=CLEAN_TOL):
    out = []
    for im in images:
        a = np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, np.float64) / 255
        tones = [np.ones(3)] + [t for d in read_subjects(im) for t in (d["rgb"], d["rgb"] * DARK)]
        dist = np.min([np.abs(a - t).max(-1) for t in tones], 0)                     # (H, W)
        out.append(float((dist <= tol).mean()))
    return np.array(out)

def world_reward(weights=R.WEIGHTS["object"]):
    """The composite reward (Eq. 9, object weights) of this world."""
    return R.CompositeReward(world_text_score, world_aesthetic, R.MultiIDReward(WorldSubjects()),
                             weights)

def identified(records, where):
    """Whether a manifest's subjects have identities (attrs: this world's metrics apply) or not
    (prompts and references only: its reward alone applies). A first-world folder is refused in one
    line."""
    # one world writes a whole manifest: its first record tells which
    first = records[0] if records and isinstance(records[0], dict) else {}
    attrs = first.get("attrs")
    # no attrs: prompts and references only
    if not isinstance(attrs, list) or not attrs:
        return False
    # attrs: this world's identity, or the first world's, refused by identity_of
    identity_of(attrs[0], f"{where}: first record")
    return True

def reward_for(records, where, weights=R.WEIGHTS["object"]):
    """The toy reward for a manifest's records: world_reward, which reads prompts, references and
    images, so records without identities are scored too; a first-world folder is refused in one
    line."""
    identified(records, where)
    return world_reward(weights)

def default_prompt(images, paths, min_clean=0.8, tol=16 / 255):
    """The toy's default prompt, worded as this world's prompts are: the references' shapes and
    their count ("two circles and a square"), each reference seen at the toy's size and read by
    read_subjects. A reference whose subject is not a clean two-tone sprite (a photo, noise, a blank
    page) cannot be named: pass --prompt."""
    size, shapes = M.get_config("toy").ref_size, []
    for im, p in zip(images, paths):
        # a smoothed photo is not two-toned
        found = read_subjects(D.preprocess_ref(im, size), clean_tol=tol)
        if not found or found[0]["clean"] < min_clean:
            raise D.InputError(
                f"{p}: no toy subject recognised in it, so the toy cannot name it: pass --prompt")
        shapes.append(found[0]["shape"])
    return name_shapes(shapes)

def world_eval(args, records):
    """`toy.py eval` on this world's manifest: DIR/<id>.png per record scored by world_metrics,
    beside the sanity rows drawn for the same records; the table on stdout, the numbers in --out
    (default IMAGES/metrics.json)."""
    images, missing = [], []
    out = args.out or os.path.join(args.images, "metrics.json")
    paths = [os.path.join(args.images, R.image_name(rec, i)) for i, rec in enumerate(records)]
    D.check_output([out], [args.manifest, *paths], args.force)
    for rec, path in zip(records, paths):
        try:
            images.append((rec, D.load_image(path)))
        except D.InputError as e:
            missing.append(str(e))
    if not images:
        raise D.InputError(
            f"{args.images}: none of the {len(records)} records has its image <id>.png there")
    scored = [r for r, _ in images]
    rows = {"images": world_metrics([im for _, im in images], scored, args.manifest),
            **{k: world_metrics(sanity_images(scored, k, where=args.manifest), scored,
                                args.manifest)
               for k in SANITY}}
    print(metrics_table(rows))
    D.write_atomic(out, lambda f: f.write(
        json.dumps(dict(rows=rows, missing=missing), indent=1).encode()))
    print(f"scored {len(images)} records; {len(missing)} images missing or unreadable; wrote {out}",
          file=sys.stderr)
    return 0

# -----------------------------------------------------------------------------

MAX_SIDE = 512

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:               # score generated images by the world's metrics or reward
        args = R.eval_parser(__doc__).parse_args(argv[1:])
        try:
            records = [r for _, r in D.read_manifest(args.manifest)[0]]
            # this world's records: its metrics beside the sanity rows (the first world's: refused)
            if identified(records, args.manifest):
                return world_eval(args, records)
            # prompts and references only: the world's reward, as rewards.py eval scores a manifest
            reward = world_reward(R.reward_weights(args))
            names = dict(text="toy-text", aes="toy-aes", id="toy-ID", total="reward")
            return R.evaluate(args, lambda images, prompt, refs, captions: {
                names[k]: v for k, v in reward(images, prompt, refs, captions).items()})
        except (D.DataError, D.InputError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    p = CL.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=CL.int_in(1, 10_000_000), required=True, help="number of records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", type=int, nargs="+", default=[2, 3],
                   help="subjects per target (1-4), uniform")
    # a toy: sides past 512 px would only fill the disk (and a 100000 px side is 28 GB of one
    # image's memory)
    p.add_argument("--size", type=CL.int_in(8, MAX_SIDE), default=32,
                   help=f"target side (px, 8 to {MAX_SIDE})")
    p.add_argument("--ref-size", type=CL.int_in(4, MAX_SIDE), default=16,
                   help=f"reference side (px, 4 to {MAX_SIDE})")
    p.add_argument("--split", default="train", choices=list(SPLITS), help="whose identities: val "
                   "and test ones are never drawn for train")
    p.add_argument("--identities", type=int, default=1000,
                   help="identities of the split records draw from")
    p.add_argument("--hard", default=None, choices=list(HARD), help="hard pairs: two subjects of "
                   "one shape whose colours differ by %s (mean abs RGB)"
                   % ", ".join(f"{k} {v}" for k, v in HARD.items()))
    p.add_argument("--sprite", type=CL.int_in(1, MAX_SIDE), nargs=2, default=list(TARGET_PX),
                   metavar=("LO", "HI"), help="sprite side in targets (px, uniform); views in "
                   "references are scaled apart from it")
    D.add_force(p)
    args = p.parse_args(argv)
    try:
        D.check_output([args.out], [], args.force)          # never into a training run's checkpoint
        write_world(args.out, args.n, args.seed, args.split, args.subjects, args.size,
                    args.ref_size, args.identities, args.hard, tuple(args.sprite))
    except (D.InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())

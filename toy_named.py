"""
The first toy world: 192 named sprites (6 shapes x 8 colours x 4 patterns), every prompt naming each identity in
full ("a red striped circle and a blue dotted square"), one reference per identity, pixel-identical to its
rendering in the target. Text alone is enough there, so a model trained on it learns to ignore its references:
toy.py's world replaced it for every measurement of customization. It stays for comparison, for the tests and
fault drills that need a small manifest with exact masks and correspondences, and for the folders written by it
(`toy.py eval` and train_rl.py score them with toy_reward below). Its layout and background are the new world's.

    python -c "import toy_named; toy_named.write_toy('data/named', 100)"
"""
import json, os, re, sys
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

import data as D
import rewards as R

# -----------------------------------------------------------------------------
# identities and their rendering

# similar pairs on purpose (circle/hexagon, square/diamond; red/orange/pink, green/teal, blue/purple), so
# attribute leakage between subjects is measurable and not only gross
SHAPES = ("circle", "hexagon", "square", "diamond", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "orange": (240, 130, 30), "pink": (240, 110, 180), "yellow": (230, 210, 40),
           "green": (40, 170, 60), "teal": (30, 160, 160), "blue": (40, 80, 220), "purple": (140, 60, 200)}
PATTERNS = ("solid", "striped", "dotted", "checked")
BACKGROUND = (255, 255, 255)                 # both worlds draw on white

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

def layout(rng, n, px, size, tries=100):
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
    if px > size or (n > 1 and 2 * px + 1 > size):             # the corner fallback of layout must fit
        raise D.InputError(f"--size {size} cannot hold {n} sprites of {px} px (--ref-size {ref_size})")
    sprites = [SPRITES[k] for k in rng.choice(len(SPRITES), n, replace=False)]
    target, masks, points, boxes = np.full((size, size, 3), BACKGROUND, np.uint8), [], [], []
    o = (ref_size - px) // 2                                   # the sprite's offset inside its reference
    for s, (y, x) in zip(sprites, layout(rng, n, px, size)):
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
    """`python toy.py`: n records as PNGs under out/ (images/, masks/, refs/: one reference per identity)
    and out/manifest.jsonl in the manifest format, so every tool runs on it unchanged. Same seed, same bytes."""
    if not subjects or not all(1 <= k <= 4 for k in subjects) or n < 1:
        raise D.InputError("need --n >= 1 and --subjects between 1 and 4")
    for d in ("images", "masks", "refs"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    lines, written = [], set()
    for i in tqdm(range(n), desc="toy data", disable=n < 100):
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
    D.write_atomic(path, lambda f: f.write("".join(lines).encode()))
    print(f"wrote {n} records, {len(written)} references: {path}", file=sys.stderr)
    return path

# -----------------------------------------------------------------------------
# the toy world's scorers: the same reward on sprites, with exact stand-ins for the detector and the models
#   subjects  connected components of non-background pixels (the toy's detector)
#   embedding a component's "ink" (255 - pixels) on a sprite-sized square, centered and L2-normalized
#   text      do the subjects drawn match, attribute by attribute, the ones the prompt names (and as many)?
#   aes       the share of clean pixels: the background or a sprite colour (shade), not mud or noise

def _ink(crop, px):
    # (h, w, 3) uint8 crop (outside the subject already white) -> (px*px*3,) unit vector, zero-mean
    h, w = crop.shape[:2]
    side = max(h, w)
    sq = np.full((side, side, 3), 255, np.uint8)
    sq[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    v = (255.0 - np.asarray(Image.fromarray(sq).resize((px, px), Image.BILINEAR), np.float64)).ravel() / 255
    v = v - v.mean()
    return v / max(np.linalg.norm(v), 1e-12)

class ToySubjects:
    """The toy world's detector + embedder (faces' and objects' stand-in), and its attribute classifier.
    ref_size: the references' side (sprites are sprite_px(ref_size) pixels in references and targets)."""
    def __init__(self, ref_size=16, threshold=48, min_area=None):
        self.px = sprite_px(ref_size)
        self.threshold = threshold                                   # ink above this (any channel) is a subject
        self.min_area = min_area if min_area is not None else max(4, self.px * self.px // 8)
        # every identity drawn on white and seen through detect(), as in a clean image: classification is the
        # nearest template (the crop is the shape's own bounding box, so a triangle is cropped like one)
        pad = lambda s: np.pad(render_sprite(s, self.px)[0], ((2, 2), (2, 2), (0, 0)), constant_values=255)
        self.templates = np.stack([_ink(self.detect(pad(s))[0][1], self.px) for s in SPRITES])

    def detect(self, image):
        """PIL or (H, W, 3) uint8 -> [(box (y0, x0, y1, x1), crop with other pixels white)], largest first."""
        a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.uint8)
        fg = (255 - a.astype(np.int16)).max(-1) > self.threshold
        labels, n = ndimage.label(fg, structure=np.ones((3, 3)))    # 8-connected: a sprite's dots stay one
        out = []
        for k, sl in enumerate(ndimage.find_objects(labels), 1):
            m = labels[sl] == k
            if m.sum() < self.min_area:
                continue
            crop = np.where(m[..., None], a[sl], 255).astype(np.uint8)
            out.append(((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop), crop, int(m.sum())))
        out.sort(key=lambda o: -o[2])
        return [(box, crop) for box, crop, _ in out]

    def subjects(self, image, captions=None):
        found = self.detect(image)
        return np.stack([_ink(c, self.px) for _, c in found]) if found else np.zeros((0, self.templates.shape[1]))

    def references(self, images, captions=None):
        # a reference shows one sprite: its largest component (none found: a zero vector, which matches nothing)
        rows = [self.subjects(im)[:1] for im in images]
        return np.stack([r[0] if len(r) else np.zeros(self.templates.shape[1]) for r in rows])

    def classify(self, embeddings):
        """(M, D) subject embeddings -> [Sprite] nearest templates (the attributes a subject shows)."""
        return [SPRITES[i] for i in (np.asarray(embeddings) @ self.templates.T).argmax(1)] if len(embeddings) else []

def parse_toy_prompt(prompt):
    """'a red striped circle and a blue dotted square' -> [(colour, pattern, shape)] (None where unnamed)."""
    out = []
    for phrase in re.split(r",\s*|\s+and\s+", prompt.lower()):
        words = set(re.findall(r"[a-z]+", phrase))
        pick = lambda names: next((n for n in names if n in words), None)
        attrs = (pick(COLOURS), pick(PATTERNS), pick(SHAPES))
        if any(a is not None for a in attrs):
            out.append(attrs)
    return out

class ToyTextScore:
    """CLIP-T's stand-in: Hungarian over (named subject, drawn subject) pairs scored by the share of the three
    attributes that agree, divided by max(named, drawn): a missing or an extra subject costs alike."""
    def __init__(self, subjects: ToySubjects):
        self.subjects = subjects

    def __call__(self, images, prompts):
        out = []
        for im, prompt in zip(images, prompts):
            named = parse_toy_prompt(prompt)
            drawn = [(s.colour, s.pattern, s.shape) for s in self.subjects.classify(self.subjects.subjects(im))]
            if not named or not drawn:
                out.append(0.0)
                continue
            agree = np.array([[np.mean([a == b for a, b in zip(n, d) if a is not None]) for d in drawn] for n in named])
            out.append(R.hungarian(agree)[0] * len(named) / max(len(named), len(drawn)))
        return np.array(out)

class ToyAesthetic:
    """HPS's stand-in: the share of pixels within `tol` (every channel) of a colour the toy world paints
    with (white, each sprite colour and its darker pattern shade). Blur, noise and muddy mixes score lower."""
    def __init__(self, tol=32):
        c = np.array(list(COLOURS.values()))
        self.palette = np.concatenate([np.array([BACKGROUND]), c, c // 2]).astype(np.int16)     # (17, 3)
        self.tol = tol

    def __call__(self, images, prompts=None):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, np.int16).reshape(-1, 3)
            d = np.abs(a[:, None, :] - self.palette[None]).max(-1).min(1)                         # (H*W,)
            out.append(float((d <= self.tol).mean()))
        return np.array(out)

def toy_reward(ref_size=16, weights=R.WEIGHTS["object"]):
    """The composite reward of the toy world (object weights: its subjects are objects)."""
    subjects = ToySubjects(ref_size)
    return R.CompositeReward(ToyTextScore(subjects), ToyAesthetic(), R.MultiIDReward(subjects), weights)

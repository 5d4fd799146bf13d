"""
Training curves from runs' log.jsonl files, as one PNG, so runs can be compared by eye (PIL only, no
plotting library).

    python plot_log.py runs/multi                              # -> runs/multi/curves.png
    python plot_log.py runs/a runs/b --out ab.png              # two runs, one colour each, every shared metric
    python plot_log.py runs/rl/log.jsonl --keys val_total reward_total --smooth 5

A run is its folder (holding log.jsonl) or the file itself. Every numeric field of the records is a
metric, one panel each, against "step" (train_sft.py) or "iter" (train_rl.py); lists (expert_load)
and NaN/inf values are left out. --smooth N draws a trailing mean over N points (the raw curve
stays, faint). A missing file or a line that is not a JSON object is one error naming file:line
(exit status 2); nothing is written then.
"""
import json, math, os, sys

from PIL import Image, ImageDraw, ImageFont

import cli as CL
import data as D

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]
X_KEYS = ("step", "iter")            # train_sft.py logs by optimizer step, train_rl.py by iteration

def build_parser():
    p = CL.Parser(description=__doc__)
    p.add_argument("runs", nargs="+", help="run folders (holding log.jsonl) or log.jsonl files")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: curves.png beside the first run's log)")
    p.add_argument("--keys", nargs="+", default=None,
                   help="metrics to draw (default: every numeric one)")
    p.add_argument("--smooth", type=int, default=1,
                   help="trailing mean over this many points (1: none)")
    p.add_argument("--panel", type=int, nargs=2, default=(360, 220), metavar=("W", "H"),
                   help="panel size (px)")
    D.add_force(p)
    return p

# -----------------------------------------------------------------------------
# reading logs

def log_path(run):
    path = os.path.join(run, "log.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise D.InputError(f"{run}: no such log (a run folder holding log.jsonl, or the file)")
    return path

def read_log(path):
    """-> {metric: [(x, value)]} in file order; x is the record's step or iter."""
    series = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if not line.endswith(b"\n"):   # the last line of a run still writing: not yet whole
                    break
                raise D.InputError(f"{path}:{n}: not a JSON line") from None
            if not isinstance(rec, dict):
                raise D.InputError(f"{path}:{n}: not a JSON object")
            x = next((rec[k] for k in X_KEYS if isinstance(rec.get(k), (int, float))), None)
            if x is None:
                continue                       # a record of no step (none are written today)
            for k, v in rec.items():
                if (k not in X_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v)):
                    series.setdefault(k, []).append((x, float(v)))
    return series

def smoothed(points, n):
    # trailing mean over n points: the curve at x uses only what was logged up to x
    out, total = [], 0.0
    for i, (x, v) in enumerate(points):
        total += v - (points[i - n][1] if i >= n else 0.0)
        out.append((x, total / min(i + 1, n)))
    return out

# -----------------------------------------------------------------------------
# drawing

def fmt(v):
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"

def panel(draw, box, title, curves, font, smooth):
    """One metric: a frame, its title, min/max labels on both axes, one polyline per run."""
    x0, y0, x1, y1 = box
    left, top, right, bottom = x0 + 52, y0 + 20, x1 - 10, y1 - 24        # the plotting area
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    draw.text((x0 + 6, y0 + 4), title, fill=(0, 0, 0), font=font)
    pts = [p for _, c in curves for p in c]
    xs, vs = [p[0] for p in pts], [p[1] for p in pts]
    xa, xb, va, vb = min(xs), max(xs), min(vs), max(vs)
    if xb == xa:
        xb = xa + 1
    if vb == va:                                # a flat curve: centre it in a band around its value
        va, vb = va - 0.5 * (abs(va) or 1), vb + 0.5 * (abs(vb) or 1)
    to_px = lambda x, v: (left + (x - xa) / (xb - xa) * (right - left),
                          bottom - (v - va) / (vb - va) * (bottom - top))
    for label, (x, y) in ((fmt(vb), (x0 + 4, top - 4)), (fmt(va), (x0 + 4, bottom - 8)),
                          (fmt(xa), (left, bottom + 4)), (fmt(xb),
                                                          (right - 6 * len(fmt(xb)), bottom + 4))):
        draw.text((x, y), label, fill=(60, 60, 60), font=font)
    for colour, c in curves:
        faint = tuple(int(0.35 * ch + 0.65 * 255) for ch in colour)
        for line, col in (((c, faint), (smoothed(c, smooth), colour)) if smooth > 1
                          else ((c, colour),)):
            xy = [to_px(x, v) for x, v in line]
            if len(xy) == 1:
                draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=col)
            else:
                draw.line(xy, fill=col, width=2 if col == colour else 1)

def plot(runs, keys=None, smooth=1, size=(360, 220)):
    """runs: [(name, {metric: [(x, v)]})] -> a PIL image: a legend row, then a grid of panels
    (3 across)."""
    names = keys or sorted({k for _, s in runs for k in s})
    names = [k for k in names if any(k in s for _, s in runs)]
    if not names:
        raise D.InputError("no numeric metric to draw"
                           + (f" among --keys {' '.join(keys)}" if keys else ""))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    W, H, legend = size[0] * cols, size[1] * rows, 18 * len(runs) + 8
    img = Image.new("RGB", (W, H + legend), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for i, (name, _) in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([8, 8 + 18 * i, 22, 18 + 18 * i], fill=colour)
        draw.text((28, 7 + 18 * i), name, fill=(0, 0, 0), font=font)
    for j, k in enumerate(names):
        r, c = divmod(j, cols)
        box = (c * size[0], legend + r * size[1], (c + 1) * size[0], legend + (r + 1) * size[1])
        curves = [(COLOURS[i % len(COLOURS)], s[k]) for i, (_, s) in enumerate(runs) if s.get(k)]
        panel(draw, box, k, curves, font, smooth)
    return img

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.smooth < 1:
            raise D.InputError("--smooth: at least 1")
        paths = [log_path(r) for r in args.runs]
        runs = [(r, read_log(p)) for r, p in zip(args.runs, paths)]
        img = plot(runs, args.keys, args.smooth, tuple(args.panel))
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(paths[0])), "curves.png")
        if not out.lower().endswith(".png"):
            raise D.InputError(f"{out}: the output must be a .png file")
        D.check_output([out], paths, args.force)
        D.write_atomic(out, lambda f: img.save(f, format="PNG"))
    except D.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(runs)} run(s), {img.width}x{img.height})", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())

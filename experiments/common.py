"""
What the experiments here share. A work folder holds one experiment under its settings: the data
written whole, each trainer run and each score done once, and the seconds each took, so a rerun
reuses what is finished and processes with disjoint seeds may share the folder. Then the tables'
cells and the figures, drawn with Pillow alone.
"""
import json
import os
import shutil
import statistics as st
import subprocess
import sys
import time

from PIL import Image, ImageDraw

import data as D
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository (trainers)

# -----------------------------------------------------------------------------
# the work folder

def claim_work(work, settings):
    """Make work the folder of the experiment with these settings. A folder made under other
    settings is refused before anything is written: its runs and scores are reused only under the
    settings that made them."""
    path = os.path.join(work, "settings.json")
    if os.path.exists(path):
        made = json.load(open(path))
        if made != settings:
            raise SystemExit(f"error: {work} holds runs made with {made}, not {settings}: "
                             f"pass another --work")
    os.makedirs(work, exist_ok=True)
    D.write_atomic(path, lambda f: f.write(json.dumps(settings).encode()))

def world_data(folder, n, **world):
    """folder/manifest.jsonl of toy.write_world(folder, n, **world), written once. It is written
    whole under a temporary name, then renamed: a process sharing the work folder (or a rerun after
    a kill) finds it complete or absent, never half-written; of two writers the first rename wins
    (both wrote the same bytes)."""
    manifest = os.path.join(folder, "manifest.jsonl")
    if not os.path.exists(manifest):
        tmp = f"{folder}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        toy.write_world(tmp, n, **world)
        try:
            os.rename(tmp, folder)
        except OSError:                     # written meanwhile by another process: the same bytes
            shutil.rmtree(tmp)
            if not os.path.exists(manifest):
                raise SystemExit(f"error: {folder} exists without its manifest.jsonl: remove it "
                                 f"and rerun")
    return manifest

def seconds(work, key):
    # the wall time timed() has added up under key (0 before any)
    path = os.path.join(work, "seconds", f"{key}.json")
    return json.load(open(path))["seconds"] if os.path.exists(path) else 0.0

def timed(work, key, fn):
    """fn() with its wall time, an interrupted attempt's too, added to work/seconds/KEY.json: each
    key has its own file, so processes sharing the folder never overwrite each other's."""
    t0 = time.time()
    try:
        return fn()
    finally:
        os.makedirs(os.path.join(work, "seconds"), exist_ok=True)
        total = seconds(work, key) + time.time() - t0
        D.write_atomic(os.path.join(work, "seconds", f"{key}.json"),
                       lambda f: f.write(json.dumps({"seconds": total}).encode()))

def train_once(work, key, out, final, script, flags):
    """The project's trainer `script` run as a user runs it (a subprocess) with flags, which name
    --out out: skipped when out holds its final checkpoint ckpt-FINAL, resumed where an interrupted
    attempt left one; timed under key."""
    if not os.path.isdir(os.path.join(out, f"ckpt-{final:07d}")):
        cmd = [sys.executable, os.path.join(ROOT, script), *flags,
               *(["--resume"] if os.path.isdir(os.path.join(out, "latest")) else [])]
        print("  " + " ".join(cmd[1:]), flush=True)
        timed(work, key, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))

def score_path(work, name):
    return os.path.join(work, "scores", f"{name}.json")

def score_once(work, name, fn):
    """fn()'s JSON in work/scores/NAME.json, computed once (timed under score_NAME) and written
    atomically -> it, as read back, so a rerun gets what the first run got."""
    path = score_path(work, name)
    if not os.path.exists(path):
        got = timed(work, f"score_{name}", fn)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        D.write_atomic(path, lambda f: f.write(json.dumps(got).encode()))
    return json.load(open(path))

# -----------------------------------------------------------------------------
# tables and figures

def head(cols):
    # a markdown table's header and rule, its first column the row's name
    return ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

def cell(xs, digits=3):
    # a number over seeds: "mean ± std", or one seed's value; nan (none) left out, "-" if all are
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{st.mean(xs):.{digits}f} ± {st.stdev(xs):.{digits}f}"

class Chart:
    """A PNG line chart: a W x H canvas whose plot box leaves margins L (left), B (bottom), T (top)
    and R (right, the legend's). A caller draws its ticks and labels on .draw in pixels, then each
    series, then saves."""
    def __init__(self, W, H, L, B, T, R):
        self.W, self.H, self.L, self.B, self.T, self.R = W, H, L, B, T, R
        self.image = Image.new("RGB", (W, H), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.draw.line([(L, T), (L, H - B), (W - R, H - B)], fill="black")          # the axes

    def series(self, k, label, colour, points):
        # the k-th series: its points (pixels) joined and dotted, and its line in the legend
        d, x0, y0 = self.draw, self.W - self.R, self.T + 16 * k
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for px, py in points:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        d.line([(x0 + 10, y0 + 6), (x0 + 30, y0 + 6)], fill=colour, width=2)
        ascii_label = label.replace("→", "->").replace("λ", "l")         # the default font's
        d.text((x0 + 34, y0), ascii_label, fill="black")

    def save(self, path):
        D.write_atomic(path, lambda f: self.image.save(f, format="PNG"))

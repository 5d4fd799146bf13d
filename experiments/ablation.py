"""
MultiCrafter's Table 2 in miniature, on the toy world that tests customization (toy.py: identities
the prompt cannot name, references that are other views, held-out test identities). Run from the
repository root:

    python -m experiments.ablation --base runs/base/latest    # the defaults: 3 seeds
    python -m experiments.ablation --base runs/base/latest --seeds 0 &     # seeds in parallel processes on one
    python -m experiments.ablation --base runs/base/latest --seeds 1 2     # --work; then all seeds for the table
    python -m experiments.ablation --base assets/toy --work runs/ablation-quick --seeds 0 --n 64 --steps 4 \\
        --batch-size 4 --ippo-iters 1 --test-n 4 --eval-steps 2   # every stage once, a few minutes

Every row is trained by the project's own scripts (train_sft.py, train_rl.py, run as subprocesses)
from the same toy base, on the same data (1-4 subjects per record: the singles keep single-subject
following, which the shipped checkpoint is tested on), for the same steps, learning rate and seeds:

    L_diff (LoRA)         stage multi, plain LoRA (the FFNs get LoRA too), lambda_attn = 0
    + L_attn              the same with lambda_attn = 0.3 (the Dice attention loss, Eq. 5; reference
                          -> image)
    + MoE-LoRA            LoRA + MoE-LoRA (4 experts, top-1) on the FFNs, lambda_attn = 0.3
    + IPPO                train_rl.py from the + MoE-LoRA adapter, rewarded by toy.world_reward
                          (Eq. 9)
    + L_attn (img->ref)   as + L_attn with the probe's other direction (image queries over reference
                          keys)
    + SCAL/MDL            as L_diff with MOSAIC's two losses on the toy's exact correspondences
                          (0.1, 1)

then scored on held-out identities: test sets of 2, 3 and 4 subjects, and hard pairs
(one shape, colours at toy.HARD's near / medium / far distance). Per test set: the attention share
inside each subject's own mask (training.attention_metrics, teacher-forced at t = 0.5), and over one
deterministic sample per record: toy.world_metrics (drawn; on the matched subjects colour error,
code and shape accuracy, blend alpha, leakage; count accuracy) and toy.following (the record sampled
again with reference 0 swapped). Beside them, the sanity rows scored by the same code
(the targets, an averaging generator, a text-only one), and a PNG of blend alpha against the colour
distance to the nearest other reference. The work folder keeps the data, runs, samples and scores: a
rerun reuses what is finished (under the same settings only); processes with disjoint --seeds may
share it.
"""
import argparse
import os
import statistics as st
import sys
import time

import numpy as np
from PIL import Image

import cli as CL
import data as D
import dataset as DS
import toy
import training as TR
from experiments import common as C
from experiments import world as EW

def build_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.ablation", epilog=__doc__,
                                description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the base and the world (as the base was trained)")
    g.add_argument("--base", required=True,
                   help="a toy base checkpoint folder (`train_sft.py --stage base` output)")
    g.add_argument("--sprite", type=int, nargs=2, default=list(toy.TARGET_PX), metavar=("LO", "HI"),
                   help="target sprite side (toy.py --sprite)")
    g.add_argument("--ref-size", type=int, default=16,
                   help="reference side (toy.py / train_sft.py --ref-size)")
    g = p.add_argument_group("the runs")
    g.add_argument("--work", default="runs/ablation",
                   help="data, runs and scores (a rerun reuses what is finished)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--n", type=int, default=3000, help="training records, 1 to 4 subjects each")
    g.add_argument("--steps", type=int, default=300, help="stage-multi steps of every row")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3,
                   help="adapter learning rate of every stage-multi row")
    g.add_argument("--ippo-iters", type=int, default=30, help="IPPO iterations of the + IPPO row")
    g.add_argument("--drop-prompt", type=CL.float_in(0.0, 1.0), default=0.0,
                   help="train_sft.py --drop-prompt of every stage-multi row (keeps the empty "
                   "prompt's velocity for --text-guidance; reference dropout "
                   "is refused in stage multi)")
    g = p.add_argument_group("scoring")
    g.add_argument("--test-n", type=int, default=48, help="test records per test set")
    g.add_argument("--eval-steps", type=int, default=20,
                   help="sampling steps of the test generations")
    g.add_argument("--ref-guidance", type=float, default=1.0, help="guidance on the references "
                   "when sampling (default 1, none: the tables in "
                   "experiments/README.md were sampled so)")
    g.add_argument("--text-guidance", type=float, default=1.0,
                   help="guidance on the prompt when sampling (default 1)")
    g.add_argument("--table", default=None, help="also write the markdown tables to this file")
    g.add_argument("--figure", default=None,
                   help="blend alpha against colour distance, PNG (default WORK/alpha.png)")
    return p


# (row, how it is trained): stage multi from the base; IPPO from the + MoE-LoRA row's adapter
ROWS = [
    ("L_diff (LoRA)", ["--experts", "0", "--lambda-attn", "0"]),
    ("+ L_attn", ["--experts", "0", "--lambda-attn", "0.3"]),
    ("+ MoE-LoRA", ["--experts", "4", "--lambda-attn", "0.3"]),
    ("+ IPPO", None),
    ("+ L_attn (img→ref)", ["--experts", "0", "--lambda-attn", "0.3", "--attn-direction",
                            "img2ref"]),
    ("+ SCAL/MDL", ["--experts", "0", "--lambda-attn", "0", "--scal", "0.1", "--mdl", "1"]),
]
IPPO_FROM = 2
TESTS = {"2": dict(subjects=(2,), seed=102), "3": dict(subjects=(3,), seed=103),
         "4": dict(subjects=(4,), seed=104),
         **{h: dict(subjects=(2,), seed=110 + i, hard=h) for i, h in enumerate(toy.HARD)}}
MULTI = ("2", "3", "4")                          # the sets pooled in the main table

# -----------------------------------------------------------------------------
# scoring: the world's metrics on one set of images, and their pooling

def score_images(images, records, after=None, swapped=None):
    """-> world_metrics (+ following when the swaps are given) and, per multi-subject record's
    subject, (colour distance to the nearest other reference, blend alpha) for the figure."""
    m = toy.world_metrics(images, records)
    if after is not None:
        m["following"], m["n_swaps"] = toy.following(after, records, swapped)
    pairs = []
    for im, rec in zip(images, records):
        idents = [toy.identity_of(a, f"record {rec['id']}") for a in rec["attrs"]]
        for i, s in enumerate(toy.score_image(im, idents)["subjects"]):
            if s is not None and s["alpha"] is not None:
                d = min(toy.colour_distance(o.rgb, idents[i].rgb) for k, o in enumerate(idents)
                        if k != i)
                pairs.append([d, s["alpha"]])
    return dict(m, pairs=pairs)

WEIGHT = dict(drawn="n_refs", colour_err="n_subjects", texture_acc="n_subjects",
              shape_acc="n_subjects", alpha="n_alpha", leakage="n_alpha", following="n_swaps",
              count_acc="n_records", share="n_records")

def pool(per_set, key):
    """One metric over several test sets, each weighted by what it counts (subjects, alphas, swaps,
    records)."""
    got = [(m[key], m[WEIGHT[key]]) for m in per_set
           if key in m and m[WEIGHT[key]] and not np.isnan(m[key])]
    return sum(v * w for v, w in got) / sum(w for _, w in got) if got else float("nan")

def score_adapter(args, adapter, tests, samples):
    """Every test set sampled (seed = record index) with its references and with reference 0
    swapped, scored; the samples saved under `samples`/<set>/ -> {set: metrics}."""
    cfg, flux, text, ae = EW.load_toy(args.base, adapter, args.ref_size)
    guide, out = (args.ref_guidance, args.text_guidance), {}
    for name, manifest in tests.items():
        records = [r for _, r in D.read_manifest(manifest)[0]]
        root, here = os.path.dirname(manifest), os.path.join(samples, name)
        os.makedirs(here, exist_ok=True)
        ds = DS.ManifestDataset(manifest, ref_size=args.ref_size)
        share = TR.attention_metrics(TR.Denoiser(flux, text), ae, ds, "cpu", args.batch_size,
                                     max_batches=len(ds))["val_share_own"]
        images, after, swapped = [], [], []
        for i, rec in enumerate(records):
            refs = [D.load_image(os.path.join(root, p)) for p in rec["refs"]]
            images.append(EW.sample(cfg, flux, text, ae, rec["prompt"], refs, i, args.eval_steps,
                                    *guide))
            images[-1].save(os.path.join(here, f"{rec['id']}.png"))
            # a hard pair's shapes are equal: toy.following counts no swap there
            if "hard" not in rec:
                new, ref, _ = toy.swap_record(rec)
                swapped.append(new)
                after.append(EW.sample(cfg, flux, text, ae, rec["prompt"], [Image.fromarray(ref)]
                                       + refs[1:], i, args.eval_steps, *guide))
        m = score_images(images, records, *((after, swapped) if after else ()))
        out[name] = dict(m, share=share, n_records=len(records))
    return out

def score_sanity(tests):
    """The sanity rows (experiments.world.sanity_rows: the same metrics, swaps included) per test
    set."""
    out = {}
    for name, manifest in tests.items():
        records = [r for _, r in D.read_manifest(manifest)[0]]
        rows = EW.sanity_rows(records, manifest)
        for kind in toy.SANITY:
            got = score_images(toy.sanity_images(records, kind, where=manifest), records)
            rows[kind].update(pairs=got["pairs"], n_records=len(records))
        out[name] = rows
    return out

# -----------------------------------------------------------------------------
# the figure: blend alpha against the colour distance to the nearest other reference

BINS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
COLOURS = {"L_diff (LoRA)": (200, 60, 40), "+ L_attn": (40, 90, 200),
           "+ L_attn (img→ref)": (40, 160, 80), "averaging": (150, 150, 150), "targets": (0, 0, 0)}

def binned(pairs):
    # [(distance, alpha)] -> per bin of BINS (mean alpha or None, count)
    p = np.asarray(pairs, np.float64).reshape(-1, 2)
    out = []
    for lo, hi in zip(BINS, BINS[1:]):
        a = p[(p[:, 0] >= lo) & (p[:, 0] < hi), 1]
        out.append((float(a.mean()) if len(a) else None, len(a)))
    return out

def draw_figure(series, path, title):
    """series {label: [(distance, alpha)]} -> a PNG line chart of the binned means."""
    chart = C.Chart(560, 360, 56, 44, 30, 170)
    d, W, H, L, B, T, Rm = chart.draw, chart.W, chart.H, chart.L, chart.B, chart.T, chart.R
    x = lambda v: L + (v - BINS[0]) / (BINS[-1] - BINS[0]) * (W - L - Rm)
    y = lambda a: H - B - a * (H - B - T)
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([(L - 4, y(a)), (L, y(a))], fill="black")
        d.text((L - 34, y(a) - 6), f"{a:.2f}", fill="black")
    for v in BINS:
        d.line([(x(v), H - B), (x(v), H - B + 4)], fill="black")
        d.text((x(v) - 10, H - B + 6), f"{v:.2f}", fill="black")
    d.line([(L, y(toy.LEAK_ALPHA)), (W - Rm, y(toy.LEAK_ALPHA))], fill=(220, 220, 220))
    d.text((L + 4, y(toy.LEAK_ALPHA) - 12), "leakage threshold", fill=(160, 160, 160))
    d.text((L + 90, 8), title, fill="black")
    d.text((L + 60, H - 18), "colour distance to the nearest other reference (mean abs RGB)",
           fill="black")
    d.text((6, T - 18), "blend alpha", fill="black")
    for k, (label, pairs) in enumerate(series.items()):
        pts = [(x((lo + hi) / 2), y(a)) for (a, _), lo, hi in zip(binned(pairs), BINS, BINS[1:])
               if a is not None]
        chart.series(k, label, COLOURS.get(label, (120, 0, 160)), pts)
    chart.save(path)

# -----------------------------------------------------------------------------
# the experiment's parts: its settings, a row's run, the tables, the figure's series

def settings_of(args):
    # what a work folder's runs and scores were made under
    return dict(base=os.path.abspath(args.base), sprite=list(args.sprite), ref_size=args.ref_size,
                n=args.n, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                ippo_iters=args.ippo_iters, test_n=args.test_n, eval_steps=args.eval_steps,
                # sampled without guidance and trained without dropout unless asked (older
                # folders were)
                **{k: getattr(args, k) for k in ("ref_guidance", "text_guidance")
                   if getattr(args, k) != 1},
                **({"drop_prompt": args.drop_prompt} if args.drop_prompt else {}))

def train_row(args, work, train, seed, r):
    """Row r's run for seed, once: train_sft.py stage multi from the base, or (+ IPPO) train_rl.py
    from the + MoE-LoRA row's adapter -> the adapter of its final checkpoint."""
    out, how = os.path.join(work, "runs", f"seed{seed}", f"row{r}"), ROWS[r][1]
    flags = ["--init", args.base, "--data", train, "--out", out, "--seed", str(seed),
             "--ref-size", str(args.ref_size)]
    if how is not None:
        script, final = "train_sft.py", args.steps
        flags += ["--stage", "multi", *how, "--steps", str(args.steps),
                  "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                  "--ckpt-every", str(args.steps),
                  *(["--drop-prompt", str(args.drop_prompt)] if args.drop_prompt else [])]
    else:
        script, final = "train_rl.py", args.ippo_iters
        start = os.path.join(work, "runs", f"seed{seed}", f"row{IPPO_FROM}",
                             f"ckpt-{args.steps:07d}", "adapter.safetensors")
        flags += ["--adapter", start, "--iters", str(args.ippo_iters), "--group", "16",
                  "--prompts", "4", "--steps", "8", "--tau", "1000", "--lr", "3e-4",
                  "--ckpt-every", str(args.ippo_iters)]
    C.train_once(work, f"runs_seed{seed}_row{r}", out, final, script, flags)
    return os.path.join(out, f"ckpt-{final:07d}", "adapter.safetensors")

KEYS = [("share", "attention share in own mask ↑"), ("drawn", "drawn ↑"),
        ("colour_err", "colour error ↓"), ("texture_acc", "code acc ↑ (chance 0.07)"),
        ("shape_acc", "shape acc ↑ (chance 0.25)"), ("count_acc", "count acc ↑"),
        ("alpha", "blend α ↓"), ("leakage", "leakage ↓"),
        ("following", "reference following ↑")]                 # the main table's columns

def tables(args, scores, sanity, work, t_start):
    """The markdown tables -> lines: pooled over 2-4 subjects (mean ± std over seeds, "-" where a
    seed has no value), the hard pairs and each number of subjects (means over seeds), the time."""
    over = lambda row, key, sets: [pool([scores[row, s][k] for k in sets], key) for s in args.seeds]
    cell = lambda xs: "-" if any(np.isnan(xs)) else C.cell(xs)
    mean = lambda row, key, sets: f"{st.mean(over(row, key, sets)):.3f}"
    # pooled over the 2-, 3- and 4-subject sets
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"Toy world (held-out identities), {len(args.seeds)} seeds ({seeds}), mean ± std over "
             f"seeds; from `{args.base}`: {args.n} training records (1-4 subjects), {args.steps} "
             f"stage-multi steps at batch {args.batch_size}, lr {args.lr:g}, IPPO "
             f"{args.ippo_iters} iterations; test: {args.test_n} records per set, one "
             f"{args.eval_steps}-step sample each (and one with reference 0 swapped).", "",
             "Pooled over the 2-, 3- and 4-subject test sets:", "", *C.head([k[1] for k in KEYS])]
    lines += [f"| {row} | " + " | ".join(cell(over(row, k, MULTI)) for k, _ in KEYS) + " |"
              for row, _ in ROWS]
    lines += [f"| *{kind}* | - | " + " | ".join(f"{pool([sanity[k][kind] for k in MULTI], key):.3f}"
                                               for key, _ in KEYS[1:]) + " |"
              for kind in toy.SANITY]
    # the hard pairs
    hard = list(toy.HARD)
    lines += ["", "Hard pairs (two subjects of one shape; colour distance " +
              ", ".join(f"{h} {v}" for h, v in toy.HARD.items()) +
              "): blend α ↓ / leakage ↓ / colour error ↓", "", *C.head(hard)]
    lines += [f"| {row} | " + " | ".join(f"{mean(row, 'alpha', [h])} / {mean(row, 'leakage', [h])}"
                                         f" / {mean(row, 'colour_err', [h])}" for h in hard) + " |"
              for row, _ in ROWS]
    lines += [f"| *{kind}* | " + " | ".join(f"{sanity[h][kind]['alpha']:.3f} / "
                                            f"{sanity[h][kind]['leakage']:.3f} / "
                                            f"{sanity[h][kind]['colour_err']:.3f}" for h in hard) +
              " |" for kind in toy.SANITY]
    # per number of subjects
    lines += ["", "Per number of subjects (colour error ↓ / leakage ↓ / count acc ↑, mean over "
              "seeds):", "", *C.head([f"{k} subjects" for k in MULTI])]
    lines += [f"| {row} | " + " | ".join(f"{mean(row, 'colour_err', [k])} / "
                                         f"{mean(row, 'leakage', [k])} / "
                                         f"{mean(row, 'count_acc', [k])}" for k in MULTI) + " |"
              for row, _ in ROWS]
    # the time: every run and score of these seeds, as each timed itself
    spent = sum(C.seconds(work, f"{part}_seed{s}_row{r}") for s in args.seeds
                for r in range(len(ROWS)) for part in ("runs", "score")) / 60
    lines += ["", f"CPU wall time of the runs and scores above: {spent:.0f} min, as measured when "
              f"each ran (`seconds/` in {work}); this invocation: "
              f"{(time.time() - t_start) / 60:.1f} min."]
    return lines

def alpha_series(args, scores, sanity):
    # the figure's series: (distance, alpha) over every test set and seed, for the rows that differ
    # in L_attn and for two sanity rows
    rows = ("L_diff (LoRA)", "+ L_attn", "+ L_attn (img→ref)")
    series = {row: [p for s in args.seeds for k in TESTS for p in scores[row, s][k]["pairs"]]
              for row in rows}
    series.update({kind: [p for k in TESTS for p in sanity[k][kind]["pairs"]]
                   for kind in ("averaging", "targets")})
    return series

# -----------------------------------------------------------------------------
# the experiment: data, the runs of every row and seed, their scores, the tables and the figure

def ablation(args):
    t_start, work = time.time(), os.path.abspath(args.work)
    # the work folder holds one experiment: its runs and scores are reused only under the settings
    # that made them
    C.claim_work(work, settings_of(args))
    # the data: the training records and each test set, written once
    world = dict(size=32, ref_size=args.ref_size, sprite=tuple(args.sprite))
    data = lambda name: os.path.join(work, "data", name)
    train = C.world_data(data("train"), args.n, seed=0, subjects=(1, 2, 3, 4), **world)
    tests = {name: C.world_data(data(f"test{name}"), args.test_n, split="test", **t, **world)
             for name, t in TESTS.items()}
    # every row and seed trained, then sampled and scored on the test sets (each run and score once)
    scores = {}                                                  # (row, seed) -> {set: metrics}
    for seed in args.seeds:
        for r, (row, _) in enumerate(ROWS):
            adapter = train_row(args, work, train, seed, r)
            samples = os.path.join(work, "samples", f"seed{seed}", f"row{r}")
            scores[row, seed] = C.score_once(work, f"seed{seed}_row{r}",
                                             lambda: score_adapter(args, adapter, tests, samples))
            print(f"  seed {seed} {row}: trained and scored", flush=True)
    sanity = C.score_once(work, "sanity", lambda: score_sanity(tests))
    # the tables, then the figure
    lines = tables(args, scores, sanity, work, t_start)
    print("\n".join(lines))
    if args.table:
        D.write_atomic(args.table, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    figure = args.figure or os.path.join(work, "alpha.png")
    draw_figure(alpha_series(args, scores, sanity), figure,
                f"blend alpha vs colour distance ({len(args.seeds)} seeds, all test sets)")
    print(f"wrote {figure}", file=sys.stderr)
    return scores

if __name__ == "__main__":
    ablation(build_parser().parse_args())

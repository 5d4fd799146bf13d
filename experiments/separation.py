"""
Does separating attention stop leakage? MultiCrafter's premise (Eq. 4-6: L_attn makes each reference
attend to its own subject, and separated attention stops attributes bleeding between subjects),
tested on the toy world that tests customization. Run from the repository root (a rerun reuses every
finished run and score):

    python -m experiments.separation --seeds 0 &            # one process per seed shares --work
    python -m experiments.separation --seeds 1 2
    python -m experiments.separation --seeds 0 1 2 --table experiments/separation.md    # tables and figures

E1  Oracle separation, no training (model.Separation): in the double, single or all blocks, each
    subject's image tokens see no other reference (img2ref: the path that carries leakage) or each
    reference's queries see no other subject's image tokens (ref2img: the map L_attn asks for). The
    upper bound of what separation can buy, on the L_diff row's adapters and the paper's L_attn
    row's; teacher-forced (the colour error of the x0 prediction at t, split into pull and shrink)
    and at sampling (the oracle's owners: the targets' masks).
E2  L_attn (Dice, Eq. 5, reference -> image maps) on the double blocks (the paper's choice), the
    single blocks or all blocks, lambda 0.03 / 0.1 / 0.3, and image -> reference maps on the single
    blocks.
E3  Records of 2-4 subjects only (no singles, where the foreground map already is the perfect one),
    1,000 steps, scored at 250 and 1,000: can the Dice produce selectivity above 1 here at all?

Every row is trained by train_sft.py (a subprocess, as a user runs it) from the same base, data, lr
and seeds as experiments/ablation.py's rows, and scored on held-out identities (24 records each of
2, 3 and 4 subjects and of the three hard-pair distances): per block and probe direction,
teacher-forced, the attention's selectivity (training.attention_stats) and the wrong-reference
share; over one guided sample per record (seed = its index), toy.world_metrics: drawn, colour error,
code, shape and count accuracy, blend alpha and its split into pull toward the other subject and
shrinkage toward the mean colour, and the share of hard pairs with both subjects drawn.
"""
import argparse
import json
import math
import os
import statistics as st
import sys
import time

import numpy as np
import torch

import data as D
import dataset as DS
import model as M
import sampling as SM
import toy
import training as TR
from experiments import common as C
from experiments import world as EW
from experiments.ablation import TESTS, MULTI
from experiments.common import cell, head

def build_parser():
    p = argparse.ArgumentParser(prog="python -m experiments.separation", epilog=__doc__,
                                description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="assets/toy",
                   help="a toy base checkpoint folder (its adapter is not used)")
    p.add_argument("--work", default="runs/separation",
                   help="data, runs, scores (a rerun reuses what is finished)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=3000, help="training records per data set")
    p.add_argument("--steps", type=int, default=250, help="steps of the E2 rows (E3: 4x)")
    p.add_argument("--test-n", type=int, default=24, help="records per test set")
    p.add_argument("--eval-steps", type=int, default=10, help="sampling steps")
    p.add_argument("--ref-guidance", type=float, default=4.0,
                   help="guidance on the references when sampling")
    p.add_argument("--text-guidance", type=float, default=2.0,
                   help="guidance on the prompt when sampling")
    p.add_argument("--rows", nargs="*", default=None, help="only these row keys (default: all)")
    p.add_argument("--no-oracle", action="store_true", help="skip E1")
    p.add_argument("--no-train", action="store_true", help="score only the rows already trained "
                   "(skip the others; for a scoring process beside the training ones)")
    p.add_argument("--table", default=None, help="also write the tables (markdown) to this file")
    return p

LAMBDAS = ("0.03", "0.1", "0.3")
WHERE = ("double", "single", "all")
# (key, label, training data, steps as a multiple of --steps, train_sft.py flags)
ROWS = [("diff", "L_diff", "train", 1, ["--lambda-attn", "0"])]
ROWS += [(f"{w}-{lam}", f"L_attn {w} λ {lam}", "train", 1,
          ["--lambda-attn", lam, "--attn-blocks", w])
         for w in WHERE for lam in LAMBDAS]
ROWS += [("single-img2ref-0.3", "L_attn img→ref single λ 0.3", "train", 1,
          ["--lambda-attn", "0.3", "--attn-blocks", "single", "--attn-direction", "img2ref"])]
ROWS += [(f"e3-{k}", f"2-4 subjects: {lab}", "train24", 4, flags) for k, lab, flags in [
    ("diff", "L_diff", ["--lambda-attn", "0"]),
    ("double-0.3", "L_attn double λ 0.3", ["--lambda-attn", "0.3", "--attn-blocks", "double"]),
    ("single-0.3", "L_attn single λ 0.3", ["--lambda-attn", "0.3", "--attn-blocks", "single"])]]
# Rows that continue a row's adapter on hard pairs (key, label, from row, script, steps). IPPO
# (train_rl.py, guided as the rows are scored): does the Multi-ID reward, which scores a missing
# subject 0, stop the omission of one of two alike subjects? Its control: SFT on the same pairs with
# their ground truth, as many images as IPPO's rollouts (20 iterations x 4 prompts x 16 = 1,280 = 80
# steps x 16): is it the reward, or only more hard pairs?
FROM_ROWS = [("ippo-diff", "L_diff + IPPO (hard pairs)", "diff", "train_rl.py", 20),
             ("sft-hard-diff", "L_diff + SFT on the same pairs", "diff", "train_sft.py", 80)]
DATA = {"train": dict(subjects=(1, 2, 3, 4)), "train24": dict(subjects=(2, 3, 4)),
        # IPPO's prompts: medium hard pairs
        "hardtrain": dict(subjects=(2,), hard="medium", n=600, seed=5)}
# E1's oracle variants: (blocks, directions)
ORACLES = {"none": None, "img2ref double": ("double", ("img2ref",)),
           "img2ref single": ("single", ("img2ref",)),
           "ref2img double": ("double", ("ref2img",)), "ref2img single": ("single", ("ref2img",)),
           "both all": ("all", ("img2ref", "ref2img"))}
ORACLE_ROWS = ("diff", "double-0.3")
T_EVAL = (0.3, 0.5, 0.7, 0.9)

# -----------------------------------------------------------------------------
# a test set in one batch: its records, their references and masks, sampled or teacher-forced

class TestSet:
    """A test manifest loaded once: records, the dataset's batch (targets, references, token-grid
    masks)."""
    def __init__(self, manifest, ref_size):
        self.records = [r for _, r in D.read_manifest(manifest)[0]]
        ds = DS.ManifestDataset(manifest, ref_size=ref_size)
        if len(ds) != len(self.records):
            raise SystemExit(f"error: {manifest}: {len(self.records) - len(ds)} records unreadable")
        self.dataset, self.batch = ds, DS.collate([ds[i] for i in range(len(ds))])
        self.where = manifest

    def oracle(self, variant, cfg):
        # model.Separation for an ORACLES variant, its owners from this set's ground-truth masks
        if ORACLES[variant] is None:
            return None
        blocks, directions = ORACLES[variant]
        return M.Separation(M.owners(self.batch["masks"].float(), self.batch["mask_valid"]),
                            M.select_blocks([blocks], cfg), directions)

@torch.no_grad()
def sample_set(cfg, flux, text, ae, ts, steps, guide, oracle=None):
    """Every record of a test set sampled in one batch, record i from seed i's noise, as sample.py
    draws one sample (the byte encoder pads every prompt alike, so the batch changes no prompt's
    encoding) -> PIL images."""
    B, size = len(ts.records), cfg.image_size
    inp = TR.encode_batch(ts.batch, ae, "cpu")             # references encoded; its img is replaced
    noise = torch.cat([SM.get_noise(1, size, size, cfg.ae.z_channels, cfg.ae.factor, i)
                       for i in range(B)])
    txt, y = text(list(ts.batch["prompts"]) + [""])
    timesteps = SM.get_schedule(steps, (size // cfg.token_px) ** 2, shift=cfg.shift_schedule)
    x = SM.denoise(flux, M.pack(noise), inp["img_ids"], txt[:B], M.text_ids(txt[:B]), y[:B],
                   timesteps, cfg.guidance, inp["ref_img"], inp["ref_img_ids"], progress=False,
                   ref_guidance=guide[0], text_guidance=guide[1],
                   txt_null=txt[B:].expand(B, -1, -1), y_null=y[B:].expand(B, -1), oracle=oracle)
    return SM.decode_images(ae, x, size, size)

@torch.no_grad()
def teacher_forced_split(cfg, flux, text, ae, ts, t, oracle=None, seed=1234):
    """The colour error of the x0 prediction at noise level t, split as toy.split_error splits a
    drawn colour's: per pixel of each subject, error = decoded prediction - target, against
    (the same pixel rendered with the nearest other identity's colours - target) and (with the mean
    colour GREY - target). Pixels outside a subject have both directions 0 and weigh nothing. ->
    dict(pull, shrink, err) over the set's multi-subject records."""
    B = len(ts.records)
    inp = TR.encode_batch(ts.batch, ae, "cpu")
    x0 = inp["img"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = (1 - t) * x0 + t * noise
    txt, y = text(list(ts.batch["prompts"]))
    v = flux(x_t, inp["img_ids"], txt, M.text_ids(txt), torch.full((B,), t), y,
             torch.full((B,), cfg.guidance), inp["ref_img"], inp["ref_img_ids"], oracle=oracle)
    pred = np.stack([np.asarray(im, np.float64) / 255
                     for im in SM.decode_images(ae, x_t - t * v, *(2 * [cfg.image_size]))])
    errs, toward_other, toward_mean = [], [], []
    for b, rec in enumerate(ts.records):
        idents = [toy.identity_of(a, f"{ts.where}: record {rec['id']}") for a in rec["attrs"]]
        if len(idents) < 2:
            continue
        target = toy.render_boxes(rec, ts.where) / 255.0
        for i in range(len(idents)):
            recolour = lambda c: [c if k == i else r.rgb for k, r in enumerate(idents)]
            other = toy.render_boxes(rec, ts.where, recolour=recolour(
                toy.nearest_other(idents, i).rgb)) / 255.0
            grey = toy.render_boxes(rec, ts.where, recolour=recolour(toy.GREY)) / 255.0
            # subject i's pixels
            on = np.abs(other - target).sum(-1) + np.abs(grey - target).sum(-1) > 0
            errs.append((pred[b] - target)[on])
            toward_other.append((other - target)[on])
            toward_mean.append((grey - target)[on])
    pull, shrink = toy.split_error(np.concatenate(errs), np.concatenate(toward_other),
                                   np.concatenate(toward_mean))
    return dict(pull=pull, shrink=shrink, err=float(np.abs(np.concatenate(errs)).mean()))

# -----------------------------------------------------------------------------
# scoring one adapter

def pooled(ts_list, images_list):
    # toy.world_metrics over several test sets at once (one regression for the colour split, not a
    # mean of three)
    return toy.world_metrics([im for ims in images_list for im in ims],
                             [r for ts in ts_list for r in ts.records])

def subject_rows(ts, images):
    # per multi-subject record's matched subject: (colour distance to its nearest other reference,
    # alpha, split)
    out = []
    for im, rec in zip(images, ts.records):
        idents = [toy.identity_of(a, f"{ts.where}: record {rec['id']}") for a in rec["attrs"]]
        for i, s in enumerate(toy.score_image(im, idents)["subjects"]):
            if s is not None and s["split"]:
                out.append([toy.colour_distance(toy.nearest_other(idents, i).rgb, idents[i].rgb),
                            s["alpha"], s["split"]])
    return out

# scores whose attention part is older are recomputed (1: per-block means arithmetic)
ATTENTION_VERSION = 2

def score_attention(flux, text, ae, sets):
    """Per t, {stat: value} teacher-forced on the multi-subject sets (training.attention_metrics,
    per block), each set's value pooled as a geometric mean for selectivities, else an arithmetic
    one."""
    den = TR.Denoiser(flux, text)
    attention = {}
    for t in (0.3, 0.5, 0.7):
        per = [TR.attention_metrics(den, ae, sets[k].dataset, "cpu", 24, t_eval=t, max_batches=10,
                                    per_block=True)
               for k in MULTI]
        attention[str(t)] = {k: (math.exp(st.mean(math.log(p[k]) for p in per))
                                 if k.endswith("selectivity")
                                 else st.mean(p[k] for p in per)) for k in per[0]}
    return attention

def score_adapter(args, adapter, sets):
    """-> dict(attention: score_attention, samples: per set and pooled 'multi' world_metrics,
    subjects: subject_rows of every set)."""
    cfg, flux, text, ae = EW.load_toy(args.base, adapter, 16)
    attention = score_attention(flux, text, ae, sets)
    guide = (args.ref_guidance, args.text_guidance)
    images = {k: sample_set(cfg, flux, text, ae, ts, args.eval_steps, guide)
              for k, ts in sets.items()}
    samples = {k: toy.world_metrics(images[k], ts.records) for k, ts in sets.items()}
    samples["multi"] = pooled([sets[k] for k in MULTI], [images[k] for k in MULTI])
    return dict(attention=attention, attention_version=ATTENTION_VERSION, samples=samples,
                subjects=[r for k, ts in sets.items() for r in subject_rows(ts, images[k])])

def score_oracles(args, adapter, sets):
    """E1: every ORACLES variant on one adapter -> {variant: dict(tf: {t: split}, samples:
    world_metrics)}."""
    cfg, flux, text, ae = EW.load_toy(args.base, adapter, 16)
    guide, out = (args.ref_guidance, args.text_guidance), {}
    multi = [sets[k] for k in MULTI]
    for variant in ORACLES:
        tf = {}
        for t in T_EVAL:
            got = [teacher_forced_split(cfg, flux, text, ae, ts, t, ts.oracle(variant, cfg))
                   for ts in multi]
            tf[str(t)] = {k: st.mean(g[k] for g in got) for k in got[0]}
        keys = list(MULTI) + ["medium"]
        images = {k: sample_set(cfg, flux, text, ae, sets[k], args.eval_steps, guide,
                                sets[k].oracle(variant, cfg)) for k in keys}
        samples = {"multi": pooled(multi, [images[k] for k in MULTI]),
                   "medium": toy.world_metrics(images["medium"], sets["medium"].records)}
        out[variant] = dict(tf=tf, samples=samples)
        print(f"    oracle {variant}: pull {tf['0.7']['pull']:.3f} at t 0.7, sampled pull "
              f"{samples['multi']['pull']:.3f}", flush=True)
    return out

# -----------------------------------------------------------------------------
# the figures (Pillow only)

def line_chart(path, title, xlabel, ylabel, series, xticks, yticks, log_y=False):
    """series {label: (RGB, [(x, y)])} -> a PNG line chart; x positions by rank in xticks
    (categorical)."""
    chart = C.Chart(640, 380, 60, 48, 30, 200)
    d, W, H, L, B, T, Rm = chart.draw, chart.W, chart.H, chart.L, chart.B, chart.T, chart.R
    f = (lambda v: math.log(v)) if log_y else (lambda v: v)
    lo, hi = f(yticks[0]), f(yticks[-1])
    x = lambda v: L + xticks.index(v) / max(len(xticks) - 1, 1) * (W - L - Rm)
    y = lambda v: H - B - (min(max(f(v), lo), hi) - lo) / (hi - lo) * (H - B - T)
    for v in yticks:
        d.line([(L - 4, y(v)), (L, y(v))], fill="black")
        d.text((L - 40, y(v) - 6), f"{v:g}", fill="black")
    for v in xticks:
        d.text((x(v) - 10, H - B + 6), f"{v:g}", fill="black")
    d.text((L + 40, 8), title, fill="black")
    d.text((L + 60, H - 18), xlabel, fill="black")
    d.text((4, T - 20), ylabel, fill="black")
    for k, (label, (c, pts)) in enumerate(series.items()):
        chart.series(k, label, c, [(x(a), y(b)) for a, b in pts if b == b])          # nan: no point
    chart.save(path)

BLOCK_COLOURS = [(200, 60, 40), (230, 140, 40), (40, 90, 200), (40, 160, 200), (40, 160, 80),
                 (120, 0, 160)]
DIST_BINS = (0.0, 0.1, 0.2, 0.3, 0.6)

def pull_by_distance(subjects):
    # subject_rows -> per DIST_BINS bin the pooled pull (toy.split_error over the bin's subjects)
    out = []
    for a, b in zip(DIST_BINS, DIST_BINS[1:]):
        rows = [r[2] for r in subjects if a <= r[0] < b]
        out.append(toy.split_error(
            *(np.array([r[j] for r in rows]).reshape(-1, 3) for j in range(3)))[0]
            if len(rows) >= 3 else float("nan"))
    return out

# -----------------------------------------------------------------------------
# the experiment

def train_row(args, work, train, seed, key, data_key, steps, flags, script="train_sft.py"):
    """A row's run for seed, once: train_sft.py stage multi from the base, or train_rl.py -> its
    adapter at a step (a function of the step), or None when --no-train leaves it untrained."""
    out = os.path.join(work, "runs", f"seed{seed}", key)
    if args.no_train and not os.path.isdir(os.path.join(out, f"ckpt-{steps:07d}")):
        return None
    if script == "train_sft.py":
        how = ["--stage", "multi", "--experts", "0", "--steps", str(steps), "--batch-size", "16",
               "--lr", "1e-3", "--drop-prompt", "0.1", "--ckpt-every", str(args.steps),
               "--keep", "8"]
    else:
        how = ["--iters", str(steps), "--ckpt-every", str(steps)]
    C.train_once(work, f"train_seed{seed}_{key}", out, steps, script,
                 ["--init", os.path.abspath(args.base), "--data", train[data_key], "--out", out,
                  "--seed", str(seed), "--ref-size", "16", *how, *flags])
    return lambda step: os.path.join(out, f"ckpt-{step:07d}", "adapter.safetensors")

def scored(args, work, sets, name, fn, adapter=None):
    """common.score_once; for an adapter's scores whose attention part is older than
    ATTENTION_VERSION, that part recomputed and written back (the samples' part kept)."""
    got = C.score_once(work, name, fn)
    if adapter is not None and got.get("attention_version") != ATTENTION_VERSION:
        attention = C.timed(work, f"score_{name}",
                            lambda: score_attention(*EW.load_toy(args.base, adapter, 16)[1:], sets))
        got.update(attention=attention, attention_version=ATTENTION_VERSION)
        D.write_atomic(C.score_path(work, name), lambda f: f.write(json.dumps(got).encode()))
    return got

def score_sanity(sets):
    # the sanity rows on each test set, and pooled over the multi-subject ones
    rows = {k: {kind: toy.world_metrics(toy.sanity_images(ts.records, kind), ts.records)
                for kind in toy.SANITY} for k, ts in sets.items()}
    multi = [sets[k] for k in MULTI]
    pooled_rows = {kind: pooled(multi, [toy.sanity_images(ts.records, kind) for ts in multi])
                   for kind in toy.SANITY}
    return rows | {"multi": pooled_rows}

def main(argv=None):
    args = build_parser().parse_args(argv)
    t_start, work = time.time(), os.path.abspath(args.work)
    # the work folder holds one experiment: its runs and scores are reused only under the settings
    # that made them
    C.claim_work(work, dict(base=os.path.abspath(args.base), n=args.n, steps=args.steps,
                            test_n=args.test_n, eval_steps=args.eval_steps,
                            ref_guidance=args.ref_guidance, text_guidance=args.text_guidance))
    # the data: the training sets and each test set, written once
    world = dict(size=32, ref_size=16)
    data = lambda name: os.path.join(work, "data", name)
    train = {k: C.world_data(data(k), **{"n": args.n, "seed": 0, **v}, **world)
             for k, v in DATA.items()}
    sets = {k: TestSet(C.world_data(data(f"test{k}"), args.test_n, split="test", **t, **world), 16)
            for k, t in TESTS.items()}
    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows]

    # every row and seed trained (each run once), then scored (each score once): E3's rows at their
    # first and last checkpoint, E1's oracles on ORACLE_ROWS' adapters
    scores, oracle = {}, {}
    for seed in args.seeds:
        for key, label, data_key, mult, flags in rows:
            ckpt = train_row(args, work, train, seed, key, data_key, args.steps * mult, flags)
            if ckpt is None:
                print(f"  seed {seed} {key}: not trained yet (--no-train): skipped", flush=True)
                continue
            for step in sorted({args.steps, args.steps * mult}):
                scores[key, step, seed] = scored(args, work, sets, f"seed{seed}_{key}_{step}",
                                                 lambda: score_adapter(args, ckpt(step), sets),
                                                 ckpt(step))
            if key in ORACLE_ROWS and not args.no_oracle:
                oracle[key, seed] = C.score_once(work, f"oracle_seed{seed}_{key}",
                                                 lambda: score_oracles(args, ckpt(args.steps),
                                                                       sets))
            print(f"  seed {seed} {key}: trained and scored", flush=True)
        # rows continuing a row's adapter on the hard pairs: IPPO (guided as the rows are scored)
        # and its control, SFT on the same pairs
        for key, label, start, script, iters in FROM_ROWS:
            if (args.rows is not None and key not in args.rows
                or (start, args.steps, seed) not in scores):
                continue
            adapter = os.path.join(work, "runs", f"seed{seed}", start, f"ckpt-{args.steps:07d}",
                                   "adapter.safetensors")
            flags = ["--adapter", adapter] + ([
                "--group", "16", "--prompts", "4", "--steps", "8", "--tau", "1000", "--lr", "3e-4",
                "--ref-guidance", str(args.ref_guidance), "--text-guidance",
                str(args.text_guidance)]
                if script == "train_rl.py" else ["--lambda-attn", "0"])
            ckpt = train_row(args, work, train, seed, key, "hardtrain", iters, flags, script=script)
            if ckpt is not None:
                score = lambda: score_adapter(args, ckpt(iters), sets)
                scores[key, args.steps, seed] = scored(args, work, sets, f"seed{seed}_{key}", score,
                                                       ckpt(iters))
                print(f"  seed {seed} {key}: trained and scored", flush=True)
    sanity = C.score_once(work, "sanity", lambda: score_sanity(sets))

    # the tables, then the figures
    lines = tables(args, rows, scores, oracle, sanity, t_start, work)
    print("\n".join(lines))
    if args.table:
        D.write_atomic(args.table, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    figures(args, rows, scores, sanity, work)
    return 0

# -----------------------------------------------------------------------------
# the tables

SAMPLED = [("pull", "pull ↓"), ("shrink", "shrink ↓"), ("alpha", "blend α ↓"),
           ("colour_err", "colour err ↓"),
           ("texture_acc", "code acc ↑"), ("drawn", "drawn ↑"), ("count_acc", "count acc ↑")]

def tables(args, rows, scores, oracle, sanity, t_start, work):
    seeds, blocks = args.seeds, None
    lines = [f"Toy world, held-out identities; {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"mean ± std over seeds. Rows trained from `{args.base}` on {args.n} records for "
             f"{args.steps} steps (E3: {4 * args.steps}) at batch 16, lr 1e-3; test sets of "
             f"{args.test_n} records; one {args.eval_steps}-step sample per record, guidance "
             f"{args.ref_guidance:g} on the references and {args.text_guidance:g} on the prompt. "
             "Attention teacher-forced at t = 0.5."]
    row_steps = [(key, label, step) for key, label, _, mult, _ in rows
                 for step in sorted({args.steps, args.steps * mult})]
    row_steps += [(key, label, args.steps) for key, label, *_ in FROM_ROWS
                  if any((key, args.steps, s) in scores for s in seeds)]
    got = lambda key, step, fn: [fn(scores[key, step, s]) for s in seeds
                                 if (key, step, s) in scores]
    def label_of(key, label, step):
        # the row's name, its length for E3, and how many seeds it has when fewer than asked
        n = len(got(key, step, lambda s: 1))
        return label + (f" ({step} steps)" if key.startswith("e3-") else "") + \
            (f" [{n} seed{'s' * (n > 1)}]" if n < len(seeds) else "")
    # ---- E1: the oracle ----
    if oracle:
        lines += ["", "### E1: oracle separation (no training)", "",
                  "Teacher-forced: the colour error of the x0 prediction at t split into pull "
                  "toward the other subject and shrinkage toward the mean colour (per pixel). "
                  "Sampled: the same split over drawn subjects, the oracle's owners "
                  "taken from the targets' masks.", ""]
        for key in ORACLE_ROWS:
            if not any((key, s) in oracle for s in seeds):
                continue
            lines += [f"Adapter: {dict((r[0], r[1]) for r in ROWS)[key]}", "",
                      *head(["pull t 0.5", "pull t 0.7", "pull t 0.9", "shrink t 0.7",
                             "sampled pull", "sampled shrink", "sampled α", "code acc", "drawn",
                             "both drawn (medium)"])]
            for variant in ORACLES:
                o = [oracle[key, s][variant] for s in seeds if (key, s) in oracle]
                lines.append(f"| {variant} | " + " | ".join(
                    [cell([x["tf"][t]["pull"] for x in o]) for t in ("0.5", "0.7", "0.9")] +
                    [cell([x["tf"]["0.7"]["shrink"] for x in o])] +
                    [cell([x["samples"]["multi"][k] for x in o]) for k in (
                        "pull", "shrink", "alpha", "texture_acc", "drawn")] +
                    [cell([x["samples"]["medium"]["all_drawn"] for x in o])]) + " |")
            lines.append("")
    # ---- E2 / E3: attention per block ----
    any_score = next(iter(scores.values()))
    blocks = [k.split("_")[2] for k in any_score["attention"]["0.5"] if k.startswith("val_ref2img_")
              and k.endswith("_selectivity")]
    lines += ["### E2 / E3: where attention goes, per block (teacher-forced, t "
              "= 0.5, 2-4-subject test sets)", "", "Selectivity of the reference → image maps "
              "(own-mask share / area ÷ other subjects' share / area; 1 = cannot tell its subject "
              "from the others, e.g. foreground):", "", *head(blocks + ["L_attn's maps"])]
    for key, label, step in row_steps:
        a = lambda k: got(key, step, lambda s: s["attention"]["0.5"][k])
        lines.append(f"| {label_of(key, label, step)} | " + " | ".join(
            [cell(a(f"val_ref2img_{b}_selectivity"),
                  2) for b in blocks] + [cell(a("val_selectivity"), 2)]) + " |")
    lines += ["", "Image → reference: the share of a subject's image tokens' reference attention "
              "that lands on another subject's reference (chance 0.64 over these sets; lower = "
              "routed to its own) / their attention mass on the references:", "", *head(blocks)]
    for key, label, step in row_steps:
        a = lambda k: got(key, step, lambda s: s["attention"]["0.5"][k])
        lines.append(f"| {label_of(key, label, step)} | " + " | ".join(
            f"{cell(a(f'val_img2ref_{b}_wrong'))} / {st.mean(a(f'val_img2ref_{b}_ref_mass')):.2f}"
            for b in blocks) + " |")
    # ---- E2 / E3: samples ----
    lines += ["", "### E2 / E3: what is drawn (pooled over the 2-, 3- and 4-subject test sets)", "",
              *head([k[1] for k in SAMPLED])]
    for key, label, step in row_steps:
        lines.append(f"| {label_of(key, label, step)} | " + " | ".join(
            cell(got(key, step, lambda s: s["samples"]["multi"][k])) for k, _ in SAMPLED) + " |")
    lines += [f"| *{kind}* | " + " | ".join(f"{sanity['multi'][kind][k]:.3f}" for k, _ in SAMPLED)
              + " |" for kind in toy.SANITY]
    lines += ["", "Hard pairs (two subjects of one shape): both drawn ↑ / pull ↓ / blend α ↓", "",
              *head(list(toy.HARD))]
    for key, label, step in row_steps:
        lines.append(f"| {label_of(key, label, step)} | " + " | ".join(
            f"{cell(got(key, step, lambda s: s['samples'][h]['all_drawn']), 2)} / "
            f"{cell(got(key, step, lambda s: s['samples'][h]['pull']), 2)} / "
            f"{cell(got(key, step, lambda s: s['samples'][h]['alpha']), 2)}" for h in toy.HARD)
                     + " |")
    lines += [f"| *{kind}* | " + " | ".join(f"{sanity[h][kind]['all_drawn']:.2f} / "
                                            f"{sanity[h][kind]['pull']:.2f} / "
                                            f"{sanity[h][kind]['alpha']:.2f}" for h in toy.HARD)
              + " |" for kind in toy.SANITY]
    secs = sum(C.seconds(work, os.path.splitext(f)[0])
               for f in os.listdir(os.path.join(work, "seconds")))
    lines += ["", f"CPU wall time of every run and score in {work}: {secs / 60:.0f} min (one "
              f"process each; this invocation {(time.time() - t_start) / 60:.1f} min)."]
    return lines

def figures(args, rows, scores, sanity, work):
    """selectivity.png: per block, selectivity against lambda for each placement; pull.png: the pull
    toward the other subject against the colour distance between them."""
    seeds, path = args.seeds, lambda name: os.path.join(work, name)
    mean = lambda xs: math.exp(st.mean(math.log(x) for x in xs)) if xs else float("nan")
    blocks = [b for b in ("d0", "d1", "s0", "s1", "s2", "s3")]
    for where in WHERE:
        series = {}
        for b, c in zip(blocks, BLOCK_COLOURS):
            pts = []
            for lam in ("0",) + LAMBDAS:
                key = "diff" if lam == "0" else f"{where}-{lam}"
                xs = [scores[key, args.steps, s]["attention"]["0.5"].get(
                    f"val_ref2img_{b}_selectivity")
                    for s in seeds if (key, args.steps, s) in scores]
                pts.append((float(lam), mean([x for x in xs if x])))
            series[b] = (c, pts)
        line_chart(path(f"selectivity_{where}.png"),
                   f"L_attn on the {where} blocks: ref->img selectivity per block",
                   "lambda", "selectivity (log)", series, [0.0] + [float(x) for x in LAMBDAS],
                   [0.5, 1, 2, 4, 8], log_y=True)
    mids = [round((a + b) / 2, 2) for a, b in zip(DIST_BINS, DIST_BINS[1:])]
    series = {}
    for key, c in (("diff", (200, 60, 40)), ("double-0.3", (40, 90, 200)),
                   ("single-0.3", (40, 160, 80)), ("all-0.3", (120, 0, 160))):
        subs = [r for s in seeds if (key, args.steps, s) in scores
                for r in scores[key, args.steps, s]["subjects"]]
        if subs:
            series[dict((r[0],
                         r[1]) for r in ROWS)[key]] = (c, list(zip(mids, pull_by_distance(subs))))
    line_chart(path("pull.png"), "pull toward the nearest other subject vs their colour distance",
               "colour distance (mean abs RGB), bin centre", "pull", series, mids,
               [-0.1, 0, 0.1, 0.2, 0.3, 0.5])
    print(f"wrote {path('selectivity_*.png')} and {path('pull.png')}", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())

"""
MultiCrafter's Table 2 in miniature on the toy world, and the same rows on 2, 3 and 4 subjects. Run from the
repository root:

    python -m experiments.ablation --base runs/base/latest    # the defaults: 3 seeds (about an hour on 2 cores)
    python -m experiments.ablation --base runs/base/latest --work runs/ablation --table runs/ablation/table.md
    python -m experiments.ablation --base assets/toy --work runs/ablation-quick --seeds 0 --n 64 --steps 4 \\
        --batch-size 4 --ippo-iters 1 --test-n 4 --eval-steps 2   # every stage once, under a minute

Every row is trained by the project's own scripts (train_sft.py, train_rl.py, run as subprocesses) from the
same toy base, on the same data, for the same steps and seeds:

    L_diff (LoRA)   stage multi, plain LoRA (the FFNs get LoRA too), lambda_attn = 0
    + L_attn        the same with lambda_attn = 0.3 (the Dice attention loss, Eq. 5)
    + MoE-LoRA      LoRA + MoE-LoRA (4 experts, top-1) on the FFNs, lambda_attn = 0.3
    + IPPO          train_rl.py from the + MoE-LoRA adapter

then scored on held-out records of 2, 3 and 4 subjects: the attention share inside each subject's own mask
(training.attention_metrics, teacher-forced at t = 0.5) and, over one deterministic sample per test prompt, the
toy Multi-ID, attribute leakage, "any attribute wrong" and the composite reward (Eq. 9). The work folder keeps
the data, runs and scores: a rerun reuses what is finished (under the same settings only).
"""
import argparse
import json
import os
import statistics as st
import subprocess
import sys
import time

import torch

import data as D
import model as M
import moe_lora as ML
import toy
import training as TR

parser = argparse.ArgumentParser(prog="python -m experiments.ablation", epilog=__doc__,
                                 description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--base", required=True, help="a toy base checkpoint folder (`train_sft.py --stage base` output)")
parser.add_argument("--work", default="runs/ablation", help="data, runs and scores (a rerun reuses what is finished)")
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--n", type=int, default=2000, help="training records, 2 to 4 subjects each")
parser.add_argument("--steps", type=int, default=250, help="stage-multi steps of every row")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--ippo-iters", type=int, default=30, help="IPPO iterations of the last row")
parser.add_argument("--test-n", type=int, default=48, help="test records per number of subjects (2, 3, 4)")
parser.add_argument("--eval-steps", type=int, default=8, help="sampling steps of the test generations")
parser.add_argument("--table", default=None, help="also write the markdown tables to this file")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository: where the trainers are

ROWS = [  # (row, how it is trained): stage multi from the base, then IPPO from the third row's adapter
    ("L_diff (LoRA)", ["--experts", "0", "--lambda-attn", "0"]),
    ("+ L_attn", ["--experts", "0", "--lambda-attn", "0.3"]),
    ("+ MoE-LoRA", ["--experts", "4", "--lambda-attn", "0.3"]),
    ("+ IPPO", None),
]

# -----------------------------------------------------------------------------
# scoring

def reward_and_leakage(reward, images, prompts):
    """images[i] drawn for record i of a PromptDataset -> the mean of every reward term, and the leakage rate
    (leaking subjects / subjects matched to a reference)."""
    subjects, sums, leaks, wrong, matched = reward.multi_id.embedder, {}, 0, 0, 0     # toy.ToySubjects
    for i, image in enumerate(images):
        rec = prompts[i]
        for name, v in reward([image], rec["prompt"], rec["refs"]).items():
            sums[name] = sums.get(name, 0.0) + float(v[0])
        pairs = reward.multi_id([image], rec["refs"])["matches"][0]
        want, got = subjects.classify(subjects.references(rec["refs"])), subjects.classify(subjects.subjects(image))
        leaks += toy.leaked(want, got, pairs)
        wrong += sum(got[j] != want[i] for i, j in pairs)
        matched += len(pairs)
    return dict(leak=leaks / max(matched, 1), wrong=wrong / max(matched, 1), matched=matched,
                **{n: v / len(images) for n, v in sums.items()})

def score_targets(tests):
    """The same metrics on the test targets themselves: what a perfect generator would score."""
    out = {}
    for k, manifest in tests.items():
        prompts = D.PromptDataset(manifest)
        targets = [D.load_image(os.path.join(os.path.dirname(manifest), r["target"])) for r in prompts.records]
        out[k] = reward_and_leakage(toy.toy_reward(), targets, prompts)
    return out

@torch.no_grad()
def score_adapter(base, adapter, tests, eval_steps, batch_size):
    """-> {k: metrics} per number of subjects k: attention share inside the own mask (teacher-forced on the test
    targets at t = 0.5, the trainers' held-out evaluation), and over one deterministic sample per test prompt: the
    toy Multi-ID (rewards.py's Hungarian path), the composite reward (Eq. 9) and attribute leakage."""
    cfg = M.get_config("toy")
    flux, text, ae = M.Flux(cfg), M.ByteTextEncoder(cfg), M.AutoEncoder(cfg.ae)
    M.load_state_dict_strict(flux, os.path.join(base, "flux.safetensors"))      # fp32, whatever the file stores
    M.load_byte_encoder(text, os.path.join(base, "text_encoder.safetensors"))
    ML.load_adapter(flux, adapter)
    flux.eval()
    reward, size = toy.toy_reward(), cfg.image_size
    timesteps = M.get_schedule(eval_steps, (size // cfg.token_px) ** 2, shift=cfg.shift_schedule)
    out = {}
    for k, manifest in tests.items():
        ds = D.ManifestDataset(manifest)
        share = TR.attention_metrics(TR.Denoiser(flux, text), ae, ds, "cpu", batch_size,
                                     max_batches=len(ds))["val_share_own"]
        prompts, images = D.PromptDataset(manifest), []
        for i in range(len(prompts)):
            rec = prompts[i]
            c = M.sampling_inputs(cfg, ae, text, rec["prompt"], rec["refs"], size, size, seed=i)
            images += M.decode_images(ae, M.denoise(flux, **c, timesteps=timesteps, guidance=1.0, progress=False),
                                      size, size)
        out[k] = dict(share=share, **reward_and_leakage(reward, images, prompts))
    return out

# -----------------------------------------------------------------------------
# the experiment: data, the runs of every row and seed, their scores, the tables

def ablation(args):
    t_start, work = time.time(), os.path.abspath(args.work)
    path = lambda *a: os.path.join(work, *a)
    # a work folder holds one experiment: its runs and scores are reused only under the settings that made them
    settings = dict(base=os.path.abspath(args.base), n=args.n, steps=args.steps, batch_size=args.batch_size,
                    ippo_iters=args.ippo_iters, test_n=args.test_n, eval_steps=args.eval_steps)
    if os.path.exists(path("settings.json")):
        made = json.load(open(path("settings.json")))
        if made != settings:
            raise SystemExit(f"error: {work} holds runs made with {made}, not {settings}: pass another --work")
    os.makedirs(work, exist_ok=True)
    with open(path("settings.json"), "w") as f:
        json.dump(settings, f)
    train = path("data", "train", "manifest.jsonl")
    if not os.path.exists(train):
        toy.write_toy(path("data", "train"), args.n, seed=0, subjects=(2, 3, 4))
    tests = {}
    for k in (2, 3, 4):
        tests[k] = path("data", f"test{k}", "manifest.jsonl")
        if not os.path.exists(tests[k]):
            toy.write_toy(path("data", f"test{k}"), args.test_n, seed=100 + k, subjects=(k,))

    spent = json.load(open(path("seconds.json"))) if os.path.exists(path("seconds.json")) else {}

    def timed_once(key, fn):
        # fn() once per key, its wall time added to seconds.json (also an interrupted attempt's): a rerun reuses
        # the result and the time
        t0 = time.time()
        try:
            fn()
        finally:
            spent[key] = spent.get(key, 0.0) + time.time() - t0
            with open(path("seconds.json.tmp"), "w") as f:
                json.dump(spent, f)
            os.replace(path("seconds.json.tmp"), path("seconds.json"))

    def run(script, out, final, seed, extra):
        # one training run of the project's own scripts, skipped when its final checkpoint exists
        if not os.path.isdir(os.path.join(out, f"ckpt-{final:07d}")):
            cmd = [sys.executable, os.path.join(ROOT, script), "--init", args.base, "--data", train, "--out", out,
                   "--seed", str(seed), *extra, *(["--resume"] if os.path.isdir(os.path.join(out, "latest")) else [])]
            print("  " + " ".join(cmd[1:]), flush=True)
            timed_once(out, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
        return os.path.join(out, f"ckpt-{final:07d}", "adapter.safetensors")

    scores, used = {}, []                                 # (row, seed) -> {k: metrics}; the seconds.json keys
    for seed in args.seeds:
        for r, (row, how) in enumerate(ROWS):
            out, result = path("runs", f"seed{seed}", f"row{r}"), path("scores", f"seed{seed}_row{r}.json")
            used += [out, result]
            if how is not None:
                adapter = run("train_sft.py", out, args.steps, seed, ["--stage", "multi", *how, "--steps",
                              str(args.steps), "--batch-size", str(args.batch_size), "--ckpt-every", str(args.steps)])
            else:
                adapter = run("train_rl.py", out, args.ippo_iters, seed, [
                    "--adapter", path("runs", f"seed{seed}", "row2", f"ckpt-{args.steps:07d}", "adapter.safetensors"),
                    "--iters", str(args.ippo_iters), "--group", "16", "--prompts", "4", "--steps", "8",
                    "--tau", "1000", "--lr", "3e-4", "--ckpt-every", str(args.ippo_iters)])
            if not os.path.exists(result):
                def score():
                    got = score_adapter(args.base, adapter, tests, args.eval_steps, args.batch_size)
                    os.makedirs(path("scores"), exist_ok=True)
                    with open(result + ".tmp", "w") as f:
                        json.dump({str(k): v for k, v in got.items()}, f)
                    os.replace(result + ".tmp", result)
                timed_once(result, score)
                print(f"  seed {seed} {row}: trained and scored", flush=True)
            scores[row, seed] = {int(k): v for k, v in json.load(open(result)).items()}

    cell = lambda xs: f"{st.mean(xs):.3f} ± {st.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    def pool(per_k, m):
        # over the three test sets: rates per matched subject pool their counts (a 4-subject record has about twice
        # the subjects of a 2-subject one), the other metrics are means over records (the same number for each k)
        if m in ("leak", "wrong"):
            return sum(x[m] * x["matched"] for x in per_k) / max(sum(x["matched"] for x in per_k), 1)
        return st.mean(x[m] for x in per_k)
    pooled = lambda row, m: [pool([scores[row, s][k] for k in tests], m) for s in args.seeds]
    lines = [f"Toy world, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± std over seeds; "
             f"{args.n} training records (2-4 subjects), {args.steps} stage-multi steps at batch {args.batch_size}, "
             f"IPPO {args.ippo_iters} iterations; test: {args.test_n} records each of 2, 3 and 4 subjects (pooled), "
             f"one {args.eval_steps}-step sample per record.", "",
             "| row | attention share in own mask ↑ | Multi-ID (Hungarian) ↑ | attribute leakage ↓ | "
             "any attribute wrong | composite reward ↑ |", "|---|---|---|---|---|---|"]
    metrics = ("share", "id", "leak", "wrong", "total")
    lines += [f"| {row} | " + " | ".join(cell(pooled(row, m)) for m in metrics) + " |" for row, _ in ROWS]
    truth = score_targets(tests)
    lines += ["| *test targets (ground truth)* | - | " + " | ".join(f"{pool(list(truth.values()), m):.3f}"
                                                              for m in metrics[1:]) + " |"]
    lines += ["", "Per number of subjects (Multi-ID ↑ / leakage ↓, mean over seeds):", "",
              "| row | 2 subjects | 3 subjects | 4 subjects |", "|---|---|---|---|"]
    lines += [f"| {row} | " + " | ".join(f"{st.mean(scores[row, s][k]['id'] for s in args.seeds):.3f} / "
                                         f"{st.mean(scores[row, s][k]['leak'] for s in args.seeds):.3f}" for k in tests)
              + " |" for row, _ in ROWS]
    lines += ["| *test targets (ground truth)* | " + " | ".join(f"{truth[k]['id']:.3f} / {truth[k]['leak']:.3f}"
                                                           for k in tests) + " |"]
    lines += ["", f"CPU wall time of the runs and scores above: {sum(spent.get(k, 0.0) for k in used) / 60:.0f} min, as "
              f"measured when each ran (`seconds.json` in {work}); this invocation: {(time.time() - t_start) / 60:.1f} min."]
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(lines) + "\n")
    return scores

if __name__ == "__main__":
    ablation(parser.parse_args())

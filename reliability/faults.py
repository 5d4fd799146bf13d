"""
Kill (SIGKILL) toy training runs of both trainers at random points, also while they write a checkpoint, then
check what they left and resume. Run from the repository root:

    python -m reliability.faults                    # 6 kills per trainer (about 2 min on 2 cores)
    python -m reliability.faults --kills 2 --seed 1 --work /tmp/faults --table faults.md

For train_sft.py (stage multi) and train_rl.py, on a random toy base: one uninterrupted run, then `--kills`
runs killed a random moment after a random checkpoint, or while one is being written (the moment its temporary
folder appears). Each is checked for intact checkpoints (every one loads, `latest` names one), resumed with
--resume to the end, and its final adapter compared with the uninterrupted run's: it must be equal bit for bit
(CPU). The trainers run as subprocesses, as a user runs them. Also holds the random toy base that
reliability/badinput.py shares.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import model as M
import toy

parser = argparse.ArgumentParser(prog="python -m reliability.faults", epilog=__doc__,
                                 description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--kills", type=int, default=6, help="kill points per trainer (every other one during a "
                    "checkpoint write)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
parser.add_argument("--table", default=None, help="also write the markdown table to this file")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the repository: where the trainers are

def save_st(sd, path, meta=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)

def toy_base(folder):
    """A random toy base (seed 0) in the folder format stage base writes -> (folder, Flux, ByteTextEncoder)."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    flux, text = M.Flux(M.get_config("toy")), M.ByteTextEncoder(M.get_config("toy"))
    save_st(flux.state_dict(), os.path.join(folder, "flux.safetensors"))
    save_st(text.state_dict(), os.path.join(folder, "text_encoder.safetensors"))
    return folder, flux, text

def checkpoints_intact(out):
    """Every ckpt-* folder loads whole (adapter, optimizer state with weights_only, args) and OUT/latest names
    one. -> (ok, steps of the checkpoints, step of latest or 0)."""
    steps = []
    for d in sorted(x for x in os.listdir(out) if x.startswith("ckpt-")):
        load_file(os.path.join(out, d, "adapter.safetensors"))
        state = torch.load(os.path.join(out, d, "train_state.pt"), map_location="cpu", weights_only=True)
        json.load(open(os.path.join(out, d, "args.json")))
        steps.append(state["step"])
    latest = os.path.join(out, "latest")
    if not os.path.lexists(latest):
        return not steps, steps, 0
    return os.path.isdir(latest), steps, int(os.path.basename(os.path.realpath(latest))[5:])

def faults(args):
    """-> rows (trainer, kill point, checkpoints after the kill, resumed from, final adapter = uninterrupted)."""
    work, rng = args.work or tempfile.mkdtemp(prefix="faults-"), random.Random(args.seed)
    manifest = toy.write_toy(os.path.join(work, "data"), 16, seed=0)
    base = toy_base(os.path.join(work, "base"))[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # (script, checkpoints it writes: one per step, arguments)
    runs = [("train_sft.py", 8, ["--stage", "multi", "--steps", "8", "--batch-size", "2", "--lambda-attn", "0.3"]),
            ("train_rl.py", 6, ["--iters", "6", "--steps", "4", "--group", "4"])]
    rows = []
    for script, n, extra in runs:
        cmd = lambda out, *more: [sys.executable, os.path.join(ROOT, script), "--data", manifest, "--init", base,
                                  "--rank", "4", "--lr", "1e-2", "--ckpt-every", "1", "--out", out, *extra, *more]
        ref = os.path.join(work, script[:-3], "uninterrupted")
        subprocess.run(cmd(ref), env=env, check=True, capture_output=True)
        want = load_file(os.path.join(ref, "latest", "adapter.safetensors"))
        for k in range(args.kills):
            out = os.path.join(work, script[:-3], f"kill{k}")
            proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            j, point = rng.randint(1, n - 1), None                 # a checkpoint of the run, not the last
            while proc.poll() is None and point is None:
                if k % 2 and os.path.isdir(f"{out}/.tmp-ckpt-{j:07d}"):   # while checkpoint j is being written
                    point = f"writing checkpoint {j}"
                elif not k % 2 and os.path.isdir(f"{out}/ckpt-{j:07d}"):  # a random moment after checkpoint j
                    wait = rng.uniform(0.0, 0.5)
                    time.sleep(wait)
                    point = f"{wait:.2f} s after checkpoint {j}"
            if proc.poll() is not None:
                rows.append((script, "(finished before the kill)", "-", "-", "-"))
                continue
            proc.kill()
            proc.wait()
            try:
                ok, steps, latest = checkpoints_intact(out)
                state = f"{'intact' if ok else 'BROKEN'}: {steps}"
            except Exception as e:                     # a checkpoint that does not load: the failure to report
                latest, state = 0, f"BROKEN ({type(e).__name__}: {str(e)[:60]})"
            r = subprocess.run(cmd(out, "--resume"), env=env, capture_output=True, text=True)
            got = load_file(os.path.join(out, "latest", "adapter.safetensors")) if r.returncode == 0 else {}
            same = got.keys() == want.keys() and all(torch.equal(want[n], got[n]) for n in want)
            rows.append((script, point, state, str(latest), "yes" if same else f"NO (exit {r.returncode})"))
    lines = ["| trainer | killed (SIGKILL) | checkpoints after the kill | resumed from | final adapter = uninterrupted |",
             "|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows

if __name__ == "__main__":
    faults(parser.parse_args())

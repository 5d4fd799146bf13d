"""
Kill toy training runs of both trainers inside the checkpoint protocol, at every one of its stages,
and at random moments from outside, or corrupt a checkpoint file in place; check what each left and
resume it. Run from the repository root:

    python -m reliability.faults                    # every stage x both trainers + 2 random kills each (~10 min)
    python -m reliability.faults --kills 0 --work /tmp/faults --table faults.md
    python -m reliability.faults --kills 0 --stages          # only the corruptions

For train_sft.py (stage multi) and train_rl.py, on a random toy base, one checkpoint a step, --keep
2: one uninterrupted run, then one run per stage of runs.write_checkpoint (runs.checkpoint_hook: the
run SIGKILLs itself there, MULTICRAFTER_KILL_AT=STAGE@STEP) while it writes checkpoint J. The stages
that only run in some folders get that folder: `aside` (ckpt-J already there: an incomplete copy),
`unlinked-latest` (latest a real folder, as cp -rL leaves it: replaced when the run opens),
`previous` and a --fresh `begin` (a fresh run into a used folder, killed at its first checkpoint).
Then `--kills` runs killed from outside (SIGKILL) a random moment after a random checkpoint. Then
each file of checkpoint J gets one flipped bit, its size kept (flip_bit: in the adapter a weight
becomes ~1e37), and train_rl's best.safetensors is cut short beside a dead writer's temporaries.
Each folder is listed (complete checkpoints, `latest`), resumed with --resume to the end, and its
final adapter compared with the uninterrupted run's: it must be equal bit for bit (CPU). The
trainers run as subprocesses, as a user runs them. Also holds the random toy base and the bit
flipper that reliability/badinput.py and the tests share.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import encoders as EN
import model as M
import runs
import toy

def build_parser():
    p = argparse.ArgumentParser(prog="python -m reliability.faults", epilog=__doc__,
                                description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=2, help="random kills from outside per trainer")
    p.add_argument("--stages", nargs="*", default=None, help="the protocol stages killed at "
                   "(default: all; none: only the random kills and the corruptions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--table", default=None, help="also write the markdown table to this file")
    return p

# the repository: where the trainers are
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the stages of runs.write_checkpoint, in order (runs.checkpoint_hook's names for the adapter
# stages)
STAGES = ["begin", "adapter.safetensors", "train_state.pt", "args.json", "marker", "aside",
          "renamed", "unlinked-latest", "latest", "rotated", "previous", "done"]

def save_st(sd, path, meta=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)

def toy_base(folder):
    """A random toy base (seed 0) in the folder format stage base writes -> (folder, Flux,
    ByteTextEncoder)."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    flux, text = M.Flux(M.get_config("toy")), EN.ByteTextEncoder(M.get_config("toy"))
    save_st(flux.state_dict(), os.path.join(folder, "flux.safetensors"))
    save_st(text.state_dict(), os.path.join(folder, "text_encoder.safetensors"))
    return folder, flux, text

def flip_bit(path):
    """One flipped bit in a checkpoint file, its size kept: in a .safetensors file the exponent's
    top bit of its largest weight (0.01 becomes ~3e36: finite), in args.json the seed (0 -> 1),
    elsewhere the middle byte's."""
    data = bytearray(open(path, "rb").read())
    if path.endswith(".safetensors"):
        n, tensors = int.from_bytes(data[:8], "little"), load_file(path)
        key = max(tensors, key=lambda k: tensors[k].abs().max())
        start = json.loads(data[8:8 + n])[key]["data_offsets"][0]
        # fp32, little-endian
        data[8 + n + start + 4 * int(tensors[key].abs().flatten().argmax()) + 3] ^= 0x40
    elif path.endswith("args.json"):
        data[data.index(b'"seed": 0') + 8] ^= 1
    else:
        data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))

def dead_pid():
    # the pid of a process that has ended (a writer killed mid-write, gone since)
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)

def left(out):
    # what a killed run left: its complete checkpoints' steps, the incomplete ones, and where latest
    # leads
    found = runs.checkpoints(out)
    done = [s for s, _, why in found if why is None]
    bad = [s for s, _, why in found if why]
    latest = os.path.join(out, "latest")
    where = "missing" if not os.path.lexists(latest) else \
        os.readlink(latest)[5:].lstrip("0") or "0" if os.path.islink(latest) else "a real folder"
    return f"complete {done}" + (f", incomplete {bad}" if bad else "") + f"; latest: {where}"

def faults(args):
    """-> rows (trainer, where it was killed, what the folder held, resumed from, final adapter =
    uninterrupted)."""
    work, rng = args.work or tempfile.mkdtemp(prefix="faults-"), random.Random(args.seed)
    manifest = toy.write_world(os.path.join(work, "data"), 16, seed=0)
    base = toy_base(os.path.join(work, "base"))[0]
    # (script, checkpoints it writes: one per step, the flag for its length, arguments)
    trainers = [("train_sft.py", 6, "--steps", ["--stage", "multi", "--batch-size", "2",
                                                "--lambda-attn", "0.3"]),
                ("train_rl.py", 4, "--iters", ["--steps", "4", "--group", "4"])]
    rows = []
    for script, n, length, extra in trainers:
        name = script[:-3]
        def run(out, *more, kill=None, until=n, wait=True):
            env = dict(os.environ, OMP_NUM_THREADS="1", **({"MULTICRAFTER_KILL_AT": kill} if kill
                                                           else {}))
            cmd = [sys.executable, os.path.join(ROOT, script), "--data", manifest, "--init", base,
                   "--rank", "4", "--lr", "1e-2", "--ckpt-every", "1", "--keep", "2", "--out", out,
                   length, str(until), *extra, *more]
            if not wait:
                return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            return subprocess.run(cmd, env=env, capture_output=True, text=True)
        # train_rl validates too: best.safetensors (the same training: validation draws from its own
        # seeds)
        val = (["--val-data", manifest, "--val-n", "1", "--val-seeds", "1"]
               if script == "train_rl.py" else [])
        ref, cut = (os.path.join(work, name, k) for k in ("uninterrupted", "cut"))
        assert run(ref).returncode == 0 and run(cut, until=n // 2 - 1).returncode == 0
        want = load_file(os.path.join(ref, f"ckpt-{n:07d}", "adapter.safetensors"))

        def check(out, point, status, *more):
            # what the kill left (status None: no kill, a corruption), then --resume to the end and
            # compare
            state = (left(out) if status in (-signal.SIGKILL, None)
                     else f"NOT KILLED (exit {status})")
            r = run(out, "--resume", *more)
            said = re.search(r"resumed from (?:step|iteration) (\d+)|holds no checkpoint yet",
                             r.stderr)
            final = os.path.join(out, f"ckpt-{n:07d}", "adapter.safetensors")
            got = load_file(final) if r.returncode == 0 and os.path.isfile(final) else {}
            same = got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)
            rows.append((script, point, state, (said.group(1) or "0") if said else "?",
                         "yes" if same
                         else f"NO (exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]})"))

        j = n // 2                                     # the checkpoint each kill aims at
        stages = STAGES if args.stages is None else args.stages
        for stage in [s for s in STAGES if s in stages]:
            out = os.path.join(work, name, stage)
            shutil.rmtree(out, ignore_errors=True)
            more, at, point = [], j, f"{stage}, checkpoint {j}"
            if stage in ("aside", "unlinked-latest"):  # resumes from the cut run's checkpoint j - 1
                shutil.copytree(cut, out, symlinks=stage == "aside")
                more = ["--resume"]
                if stage == "aside":          # an incomplete ckpt-J: a copy of J - 1 without marker
                    shutil.copytree(os.path.join(cut, f"ckpt-{j - 1:07d}"),
                                    os.path.join(out, f"ckpt-{j:07d}"),
                                    ignore=shutil.ignore_patterns(runs.MARKER))
                    point += " (an incomplete copy there)"
                else:
                    at, point = (j - 1,
                                 f"{stage}, opening (latest a real folder: cp "
                                 f"-rL), resuming {j - 1}")
            r = run(out, *more, kill=f"{stage}@{at}")
            check(out, point, r.returncode)
        # --fresh into a used folder
        for stage in [s for s in ("begin", "previous") if s in stages]:
            out = os.path.join(work, name, f"fresh-{stage}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(ref, out, symlinks=True)
            r = run(out, "--fresh", kill=f"{stage}@1")
            check(out, f"{stage}, checkpoint 1 of a --fresh run (the old run in previous/)",
                  r.returncode)
        upto = os.path.join(work, name, "upto")      # checkpoints j - 1 and j, each corrupted below
        shutil.rmtree(upto, ignore_errors=True)
        assert run(upto, *val, until=j).returncode == 0      # (train_rl: with its best.safetensors)
        # one bit, the size kept
        for file in ("adapter.safetensors", "train_state.pt", "args.json"):
            out = os.path.join(work, name, f"flip-{file}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(upto, out, symlinks=True)
            flip_bit(os.path.join(out, f"ckpt-{j:07d}", file))
            check(out, f"one bit flipped in {file} of checkpoint {j} (its size kept)", None, *val)
        if script == "train_rl.py":                   # the best adapter cut short, temporaries left
            out = os.path.join(work, name, "best")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(upto, out, symlinks=True)
            best = os.path.join(out, "best.safetensors")
            open(best, "r+b").truncate(os.path.getsize(best) // 2)
            for tmp in (f"best.safetensors.tmp{dead_pid()}", f".tmp-{dead_pid()}-x"):
                open(os.path.join(out, tmp), "wb").write(b"half")
            check(out, "best.safetensors cut short, a dead writer's temporaries "
                  f"beside it (after checkpoint {j})", None, *val)
            left_over = [f for f in os.listdir(out) if "tmp" in f]
            rows[-1] = (*rows[-1][:4], rows[-1][4] + (f"; TEMPORARIES LEFT {left_over}" if left_over
                                                      else ""))
        for k in range(args.kills):               # from outside, a random moment after checkpoint i
            out = os.path.join(work, name, f"kill{k}")
            shutil.rmtree(out, ignore_errors=True)
            proc, i = run(out, wait=False), rng.randint(1, n - 1)
            while proc.poll() is None and not os.path.isdir(os.path.join(out, f"ckpt-{i:07d}")):
                time.sleep(0.01)
            wait = rng.uniform(0.0, 0.5)
            time.sleep(wait)
            if proc.poll() is not None:
                rows.append((script, "(finished before the kill)", "-", "-", "-"))
                continue
            proc.kill()
            proc.wait()
            check(out, f"from outside, {wait:.2f} s after checkpoint {i}", proc.returncode)
    lines = (["| trainer | killed (SIGKILL) at, or corrupted | the folder after it | resumed from "
              "| final adapter = uninterrupted |", "|---|---|---|---|---|"]
             + ["| " + " | ".join(r) + " |" for r in rows])
    print("\n".join(lines))
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows

if __name__ == "__main__":
    faults(build_parser().parse_args())

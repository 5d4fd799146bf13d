"""
The Outputs and Ranks families of `python -m reliability.badinput`: commands whose output is one of
their inputs or a run's checkpoint (data.check_output), two samplers on one set, caches and bases
checked before training's first step, a run that trained nothing, a full disk, a reward model whose
weights are a pickle that runs code; and torchrun with 2 CPU ranks: a rank killed, a rank hung, a
checkpoint resumed on another number of ranks.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

import cache
import moe_lora as ML
import rewards as R
import toy
from reliability.common import Opens, attempt, cell, run_script, said
from reliability.faults import ROOT, save_st, toy_base

# -----------------------------------------------------------------------------
# the Outputs table: commands that would destroy what they read, two writers on one set, what
# training loads checked before its first step, a full disk and a refused pickle

def ran(script, argv, errors=()):
    """`python SCRIPT ARGV` in this process -> "exit STATUS: its error line" (or its last line when
    it succeeds)."""
    _, text, status = attempt(lambda: run_script(script, argv), errors)
    lines = text.strip().splitlines() or [""]
    return f"exit {status}: {said(text, 'error:', 'TRACEBACK') or lines[-1].split(chr(13))[-1]}"

def kept(path, before):
    return "; unchanged" if open(path, "rb").read() == before else "; CHANGED"

def output_rows(work):
    """One row per command (or load) the run-folder protocol did not cover: an output that is an
    input or a run's checkpoint, two samplers on one set, a cache or base checked before training, a
    full disk, a code-running pickle."""
    root = os.path.join(work, "outputs")
    base, flux, _ = toy_base(os.path.join(root, "base"))
    manifest = toy.write_world(os.path.join(root, "data"), 4, seed=0)
    data, ref = os.path.dirname(manifest), os.path.join(root, "r.png")
    shutil.copy(os.path.join(ROOT, "assets", "orange_circle.png"), ref)
    acfg = ML.inject(flux, rank=4, n_experts=2)
    adapter = os.path.join(root, "adapter.safetensors")
    ML.save_adapter(flux, adapter, acfg)
    os.symlink(adapter, os.path.join(root, "link.safetensors"))
    run = os.path.join(root, "run")
    train = ["--data", manifest, "--init", base, "--stage", "multi", "--rank", "4", "--batch-size",
             "2", "--steps", "1"]
    ran("train_sft.py", train + ["--out", run])
    ckpt_adapter = os.path.join(run, "ckpt-0000001", "adapter.safetensors")
    bytes_of = {p: open(p, "rb").read() for p in (adapter, ckpt_adapter, manifest)}
    export = lambda out, *more: ran("export_lora.py",
                                    [adapter, out, "--arch", "toy", "--moe", "mean", *more])
    rows = [["export_lora.py A A --moe mean (the output is its input)",
             export(adapter) + kept(adapter, bytes_of[adapter])],
            ["export_lora.py A LINK (a link to A)", export(os.path.join(root, "link.safetensors")) +
             kept(adapter, bytes_of[adapter])],
            ["export_lora.py A RUN/latest/adapter.safetensors (a run's checkpoint)",
             export(os.path.join(run, "latest", "adapter.safetensors"))
             + kept(ckpt_adapter, bytes_of[ckpt_adapter])],
            ["sample.py --refs R --out R", ran("sample.py",
                                               ["--refs", ref, "--steps", "1", "--out", ref])],
            ["cache.py --out (the manifest's folder)", ran("cache.py", [
                "--manifest", manifest, "--out", data, "--device", "cpu"])],
            ["toy.py eval --out (the manifest)",
             ran("toy.py", ["eval", "--manifest", manifest, "--images", data, "--out", manifest]) +
             kept(manifest, bytes_of[manifest])],
            ["train_sft.py --adapter RUN/latest/adapter.safetensors --out RUN --fresh",
             ran("train_sft.py",
                 train + ["--adapter", os.path.join(run, "latest", "adapter.safetensors"), "--out",
                          run, "--fresh"]) + kept(ckpt_adapter, bytes_of[ckpt_adapter])]]

    # two samplers, other --steps, on one --out-dir: the second starts once the first has written a
    # sample
    out = os.path.join(root, "set")
    sampler = lambda steps: subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--manifest", manifest, "--out-dir", out,
         "--seeds",
         *map(str, range(8)), "--steps", steps], env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = sampler("2")
    wait_for(lambda: os.path.isdir(os.path.join(out, "0")) and os.listdir(os.path.join(out, "0")))
    second = sampler("3")
    errs = [p.communicate()[1] for p in (first, second)]
    steps = sorted({json.load(open(p))["steps"]
                    for p in glob.glob(os.path.join(out, "*", "*.json"))})
    rows.append(["two sample.py --out-dir D at once, --steps 2 and 3",
                 f"first exit {first.returncode}; second exit {second.returncode}: "
                 f"{said(errs[1], 'error:')}; the samples' --steps: {steps}"])

    # pre-flight: a toy base padding prompts to the batch's longest, cached, trained at batch 2 as
    # --data
    longest = os.path.join(root, "longest")
    shutil.copytree(base, longest)
    text_file = os.path.join(longest, "text_encoder.safetensors")
    save_st(load_file(text_file), text_file, {"txt_pad": "longest"})
    folder = os.path.join(root, "cache")
    cache.write_cache(manifest, folder, checkpoint=longest, device="cpu")
    two = ["--init", longest, "--stage", "multi", "--rank", "4", "--batch-size", "2", "--steps",
           "2", "--log-every", "1"]
    ran("train_sft.py", two + ["--data", manifest, "--out", os.path.join(root, "pix")])
    said_ = ran("train_sft.py", two + ["--cache", folder, "--out", os.path.join(root, "lat")])
    logs = [[json.loads(l)["diff"] for l in open(os.path.join(root, d, "log.jsonl"))]
            for d in ("pix", "lat")]
    rows.append([
        "train_sft.py --cache C --batch-size 2 (a toy base padding prompts to the batch's longest)",
        f"{said_.split(':')[0]}; loss vs --data: max abs diff "
        f"{max(abs(a - b) for a, b in zip(*logs)):.1e}"])
    shard = os.path.join(folder, "shard_00000.safetensors")
    save_st({**load_file(shard), "0/latent": torch.zeros(16, 16, 16)}, shard)
    rows.append(["a cache shard holding another AE's latents (16 channels)",
                 ran("train_sft.py", two + ["--cache", folder, "--out",
                                            os.path.join(root, "other-ae")])])
    nan = os.path.join(root, "nan-base")
    shutil.copytree(base, nan)
    sd = load_file(os.path.join(nan, "flux.safetensors"))
    sd["final_layer.linear.weight"][0, 0] = float("nan")
    save_st(sd, os.path.join(nan, "flux.safetensors"))
    rows.append(["a base DiT holding a NaN (train_sft.py --init)",
                 ran("train_sft.py", train + ["--init", nan, "--out", os.path.join(root, "nan")])])
    real = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = lambda *a, **k: torch.tensor(float("nan"))
    try:
        rows.append(["every update skipped (non-finite gradients, fewer than --max-bad-steps)",
                     ran("train_sft.py", train + ["--steps", "2", "--out",
                                                  os.path.join(root, "skipped")])])
    finally:
        torch.nn.utils.clip_grad_norm_ = real

    # a full disk under export_lora.py; a reward model folder whose weights are a code-running
    # pickle
    import safetensors.torch
    from safetensors import SafetensorError
    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    real, safetensors.torch.save_file = safetensors.torch.save_file, full
    try:
        rows.append(["export_lora.py onto a full disk",
                     export(os.path.join(root, "full", "x.safetensors"))])
    finally:
        safetensors.torch.save_file = real
    from transformers import CLIPConfig, CLIPModel
    clip = os.path.join(root, "clip")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=64),
                        vision_config=dict(small, image_size=32, patch_size=8))
    CLIPModel(config).save_pretrained(clip)
    os.remove(os.path.join(clip, "model.safetensors"))
    torch.save({"x": Opens(os.path.join(clip, "ran"))}, os.path.join(clip, "pytorch_model.bin"))
    _, text, status = attempt(lambda: R.load_pretrained(CLIPModel, clip, "CLIP", "clip"),
                              R.RewardModelError)
    rows.append([
        "a reward model folder whose weights are a code-running pickle (rewards.load_pretrained)",
        f"exit {status}: {said(text, 'error:', 'TRACEBACK')}" +
        ("; RAN CODE FROM THE PICKLE" if os.path.exists(os.path.join(clip, "ran"))
         else "; nothing ran")])
    return [[cell(c, root + os.sep, 300) for c in r] for r in rows]

# -----------------------------------------------------------------------------
# the Ranks table: torchrun's workers killed or stopped

def worker_pids(proc):
    """{rank: pid} of the workers a torchrun process started (its children, RANK from their
    environment)."""
    env = lambda pid: dict(kv.split("=", 1)
                           for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
    kids = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    return {int(env(pid)["RANK"]): int(pid) for pid in kids}

def alive(pid):
    # running or stopped, not a zombie waiting for its parent
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

def wait_for(cond, timeout=300):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("waited too long")
        time.sleep(0.05)
    return time.time() - t0

def adapter_gap(a, b):
    # largest difference between two runs' final adapters
    x, y = (load_file(os.path.join(d, "latest", "adapter.safetensors")) for d in (a, b))
    return max((x[k] - y[k]).abs().max().item() for k in x)

def dist_rows(work):
    """Ranks that die or hang under torchrun (2 CPU ranks, gloo), and resuming with another number
    of ranks."""
    base = toy_base(os.path.join(work, "base"))[0]
    manifest = toy.write_world(os.path.join(work, "dist-data"), 8, seed=0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [os.path.join(ROOT, "train_sft.py"), "--data", manifest, "--init", base, "--stage",
              "multi", "--rank", "4", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1",
              "--ckpt-every", "1", "--keep", "10"]
    torchrun = lambda out, *more: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *common, "--out", out,
         *more], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    one = lambda out, *more: subprocess.run([sys.executable, *common, "--grad-accum", "2", "--out",
                                             out, *more],
                                            env=env, capture_output=True, text=True)
    ckpt = lambda out, k: lambda: os.path.isdir(os.path.join(out, f"ckpt-{k:07d}"))
    rows, ref = [], os.path.join(work, "one")
    one(ref, "--steps", "6")                  # the uninterrupted run: 1 rank, the same global batch

    # a rank killed: torchrun stops the others; the checkpoints left resume on 1 rank
    out = os.path.join(work, "killed")
    p = torchrun(out, "--steps", "6")
    wait_for(ckpt(out, 2))
    pids = worker_pids(p)
    os.kill(pids[1], signal.SIGKILL)
    took = wait_for(lambda: p.poll() is not None)
    left = [pid for pid in pids.values() if alive(pid)]
    rows.append(["rank 1 of 2 killed (SIGKILL) after checkpoint 2",
                 f"torchrun ended the job {took:.1f} s later (exit "
                 f"{p.returncode}); workers left: {len(left)}"])
    r = one(out, "--steps", "6", "--resume")
    rows.append(["... resumed on 1 rank (--grad-accum 2: the same global batch)",
                 f"exit {r.returncode}: {said(r.stderr, 'resumed')}; final adapter vs "
                 f"uninterrupted 1-rank run: max abs diff {adapter_gap(out, ref):.1e}"])

    # a 1-rank checkpoint resumed on 2 ranks
    out = os.path.join(work, "grown")
    shutil.copytree(ref, out, symlinks=True)
    for k in range(3, 7):
        shutil.rmtree(os.path.join(out, f"ckpt-{k:07d}"))
    os.remove(os.path.join(out, "latest"))
    os.symlink("ckpt-0000002", os.path.join(out, "latest"))
    p = torchrun(out, "--steps", "6", "--resume")
    _, err = p.communicate()
    rows.append(["1-rank checkpoint 2 resumed on 2 ranks",
                 f"exit {p.returncode}: {said(err, '[rank0]: resumed', 'resumed')}; final adapter "
                 f"vs uninterrupted 1-rank run: max abs diff {adapter_gap(out, ref):.1e}"])

    # a rank hung (SIGSTOP): the others wait in a collective until --dist-timeout, then the job ends
    out = os.path.join(work, "hung")
    p = torchrun(out, "--steps", "100", "--dist-timeout", "5")
    wait_for(ckpt(out, 1))
    pids = worker_pids(p)
    os.kill(pids[1], signal.SIGSTOP)
    took = wait_for(lambda: not alive(pids[0]))
    _, err = p.communicate()
    rows.append(["rank 1 of 2 hung (SIGSTOP), --dist-timeout 5",
                 f"rank 0 stopped {took:.1f} s later "
                 f"({said(err, '[rank0]: RuntimeError').split('] ', 2)[-1]}); torchrun then ended "
                 f"the job (exit {p.returncode}); workers left: "
                 f"{len([pid for pid in pids.values() if alive(pid)])}"])
    return [[cell(c, work + os.sep, 240) for c in r] for r in rows]

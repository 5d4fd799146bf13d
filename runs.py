"""
Run folders: the folder --out holds one run, and no kill, signal, full disk or second trainer can
lose its work.

  Run               one run's folder for the life of the process: a lock (one writer), a used folder
                    refused unless --resume or --fresh, resume from the newest *complete* checkpoint
                    whatever `latest` says, the saved args.json compared with the new ones, SIGTERM
                    / Ctrl-C saving at the next step boundary
  write_checkpoint  the checkpoint protocol: files into .tmp-ckpt-N (each fsynced and hashed on its
                    way to the disk), a completion marker with each file's size and sha256, rename,
                    swap `latest`, rotate older checkpoints; checkpoint_hook runs between stages
                    (the fault harness kills the process there:
                    python -m reliability.faults)
  verify            on --resume: a checkpoint whose content is not what was written
                    (a flipped bit keeps its size) or whose weights no training makes is passed over
                    for the one before it
  add_run_args      the flags every run shares (seed, checkpoint cadence, timeouts), typed by cli.py

Both trainers use it through training.py; nothing here knows what is trained.
"""
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import threading

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

import cli as CL
import data as D
import moe_lora as ML
import weights as WT

def print0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, file=sys.stderr)

class TrainingError(RuntimeError):
    """A run that cannot go on (it diverged, its checkpoint cannot be written): the message says why
    and names the last checkpoint, intact."""

# -----------------------------------------------------------------------------
# the trainers' shared flags

def check_adapter_args(p, args):
    # what argparse cannot check flag by flag
    if args.experts and args.top_k > args.experts:
        p.error(f"argument --top-k: {args.top_k} must be at most --experts {args.experts}")

def add_run_args(p, ckpt_every, eval_every):
    """The run folder's flags, shared by both trainers."""
    g = p.add_argument_group("run (the folder --out holds one run; see runs.Run)")
    g.add_argument("--out", required=True)
    how = g.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue from OUT's newest complete checkpoint")
    how.add_argument("--fresh", action="store_true", help="start over in an OUT that holds a run: "
                     f"the old run is moved to OUT/{PREVIOUS}/ and removed when the new run's "
                     "first checkpoint is written")
    # every noise is seeded by seed * 1_000_003 + its index: under 2^32 that stays inside a
    # generator's 64 bits
    g.add_argument("--seed", type=CL.int_in(0, 2 ** 32 - 1), default=0)
    g.add_argument("--ckpt-every", type=CL.positive, default=ckpt_every)
    g.add_argument("--keep", type=CL.positive, default=2, help="checkpoints kept")
    D.add_force(g)
    g.add_argument("--eval-every", type=CL.positive, default=eval_every)
    g.add_argument("--device", default=None)
    g.add_argument("--dist-timeout", type=CL.positive_float, default=600,
                   help="seconds a rank waits for the others in a collective before the job stops "
                   "(a dead or hung rank; rank 0 also checkpoints meanwhile)")
    return g

def resolved(value, default):
    # a flag left unset takes its default; a value given (0 included) is kept
    return default if value is None else value

# -----------------------------------------------------------------------------
# checkpoints: OUT/ckpt-STEP folders written by a protocol that no kill can break
# (write_checkpoint), and read back by what the folder holds, not by what `latest` says
# (a copy can make it a real folder, a kill can leave it behind)

class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: in use, holds another run, no complete checkpoint to
    resume."""

class Stopped(Exception):
    """SIGTERM / SIGINT: the run saved a checkpoint at a step boundary and stops; exit status 128 +
    the signal."""
    def __init__(self, signum, message):
        super().__init__(message)
        self.status = 128 + signum

CKPT = re.compile(r"ckpt-(\d+)$")
# written last into a checkpoint: its step, ranks, each file's size and sha256
MARKER = D.CHECKPOINT_MARKER
PREVIOUS = "previous"            # the run --fresh moved aside, until the new run's first checkpoint
MOVING = "previous.part"         # ... while it is being moved
RUN_ENTRIES = D.RUN_FILES        # with ckpt-*: what makes a folder hold a run
# the flags naming what a trainer reads: never in OUT
INPUTS = ("data", "cache", "val_data", "init", "adapter")
GARBAGE = (".tmp-ckpt-", ".old-", ".latest.tmp")    # a killed write's leftovers: removed on opening

def checkpoint_hook(stage, step):
    """Called after each stage of write_checkpoint (its names: "begin", each file's name, "marker",
    "aside", "renamed", "unlinked-latest", "latest", "rotated", "previous", "done"). The fault
    harness kills the process there with MULTICRAFTER_KILL_AT=STAGE@STEP; tests replace it."""
    if os.environ.get("MULTICRAFTER_KILL_AT") == f"{stage}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)

def write_bytes(f, data):
    """The one writer of checkpoint bytes (a test replaces it with one that fills the disk)."""
    f.write(data)

class _Sink:
    # the file torch.save writes to: it keeps the OSError a write raised (torch reports any as
    # "unexpected pos"), and hashes the bytes on their way to the disk (no second read of a file
    # that may be gigabytes)
    def __init__(self, f):
        self.f, self.error, self.sha = f, None, hashlib.sha256()

    def write(self, b):
        try:
            write_bytes(self.f, b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(b)
        return len(b)

    def flush(self):
        self.f.flush()

def write_file(path, produce):
    """produce(file) writes path's content, then it is flushed to the disk (fsync). ->
    (its size in bytes, the sha256 of what was written). A failed write is its OSError
    (ENOSPC: the disk is full), whoever wrote."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            produce(sink)
        except Exception:
            if sink.error:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path), sink.sha.hexdigest()

# AdamW moves a weight by about lr <= MAX_LR a step, and a trained weight stays far below this; one
# flipped exponent bit multiplies a weight by up to 2^128 (0.01 -> 3e36): finite, so only a bound on
# the magnitude tells it
MAX_WEIGHT = 1e6

def first_bad(named, limit=None):
    """The first floating tensor of `named` ((name, tensor) pairs) holding a NaN or an inf, or
    (given a limit) a value of larger magnitude -> (name, what is wrong), or None."""
    for n, t in named:
        if not (torch.is_tensor(t) and t.is_floating_point()):
            continue
        if not torch.isfinite(t).all():
            return n, "is not finite"
        if limit is not None and t.numel() and t.abs().max() > limit:
            v = t.flatten()[t.abs().flatten().argmax()].item()
            return n, f"holds {v:.3g}, beyond any trained weight (|w| <= {limit:g}: a flipped bit?)"
    return None

def incomplete(path):
    """Why the checkpoint folder `path` is not whole (no marker, a file missing or of another size
    than the marker recorded: an interrupted copy), or None."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{marker}: missing or unreadable (an interrupted write or copy)"
    for name, size in files.items():
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have != size:
            return f"{file}: " + ("missing" if have is None else f"{have} bytes where its "
                                  f"checkpoint recorded {size} (an interrupted copy?)")
    return None

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()

def verify(path):
    """Why the complete checkpoint folder `path` cannot be trusted, or None: a file whose content is
    not what was written (its sha256 differs from the marker's: a flipped bit keeps the size, so
    `incomplete` cannot see it), or a weights file holding a value no training makes
    (first_bad: NaN, inf, or a flipped exponent bit's 1e37). Reads every file once
    (sha256 runs at ~1.6 GB/s on one core here). A marker written before digests were recorded has
    its weights checked only."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            digests = json.load(f).get("sha256", {})
        assert isinstance(digests, dict)
    except (OSError, ValueError, AssertionError):
        return f"{os.path.join(path, MARKER)}: unreadable"
    for name, want in digests.items():
        file = os.path.join(path, name)
        try:
            if sha256_of(file) != want:
                return (f"{file}: its content is not what its checkpoint recorded (sha256 differs: "
                        f"a corrupted disk or copy)")
        except OSError as e:
            return f"{file}: unreadable ({e.strerror})"
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            try:
                with safe_open(file, framework="pt") as f:
                    bad = first_bad(((k, f.get_tensor(k)) for k in f.keys()), MAX_WEIGHT)
            except Exception as e:                           # safetensors raises its own types
                return str(WT.unreadable(file, e))
            if bad:
                return f"{file}: {' '.join(bad)}"
    return None

def checkpoints(out):
    """OUT's checkpoint folders, newest first -> [(step, path, why it is incomplete or None)]."""
    found = []
    for name in os.listdir(out):
        m, path = CKPT.match(name), os.path.join(out, name)
        if m and os.path.isdir(path) and not os.path.islink(path):
            found.append((int(m.group(1)), path, incomplete(path)))
    return sorted(found, reverse=True)

def newest(out):
    # -> (step, path) of the newest complete checkpoint, or (None, None)
    return next(((s, p) for s, p, why in checkpoints(out) if why is None), (None, None))

def discard(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)

def remove(path):
    # a folder goes in two steps: renamed out of the way (atomic), then deleted (a kill leaves only
    # garbage)
    if os.path.lexists(path):
        aside = os.path.join(os.path.dirname(path), ".old-" + os.path.basename(path))
        discard(aside)
        os.replace(path, aside)
        discard(aside)

def point_latest(out, name, step):
    # OUT/latest -> name: a new symlink renamed over the old one (atomic). A real folder
    # (a cp -rL or rsync copy of the run) cannot be renamed over: it is moved aside first
    latest, link = os.path.join(out, "latest"), os.path.join(out, ".latest.tmp")
    if os.path.isdir(latest) and not os.path.islink(latest):
        remove(latest)
        checkpoint_hook("unlinked-latest", step)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(name, link)
    os.replace(link, latest)
    D.fsync_dir(out)

def write_checkpoint(out, step, files, world, keep):
    """The protocol: OUT/.tmp-ckpt-STEP gets every file ({name: produce(file)}, each fsynced) and
    last the marker, then is renamed to OUT/ckpt-STEP; then `latest` is swapped, this run's older
    checkpoints beyond `keep` go, and so does the run --fresh moved aside. A kill at any point
    leaves the last complete checkpoint and at worst garbage that the next opening removes;
    checkpoint_hook runs after each stage."""
    name = f"ckpt-{step:07d}"
    tmp, final = os.path.join(out, f".tmp-{name}"), os.path.join(out, name)
    checkpoint_hook("begin", step)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        sizes, digests = {}, {}
        for file, produce in files.items():
            sizes[file], digests[file] = write_file(os.path.join(tmp, file), produce)
            checkpoint_hook(file, step)
        marker = (
            json.dumps({"step": step, "world": world, "files": sizes, "sha256": digests}).encode())
        write_file(os.path.join(tmp, MARKER), lambda f: f.write(marker))
        D.fsync_dir(tmp)
        checkpoint_hook("marker", step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # a ckpt-STEP already there (an incomplete copy, or the same step of a run
    if os.path.lexists(final):
        remove(final)                # resumed from before it): ours replaces it
        checkpoint_hook("aside", step)
    os.replace(tmp, final)
    D.fsync_dir(out)
    checkpoint_hook("renamed", step)
    point_latest(out, name, step)
    checkpoint_hook("latest", step)
    # rotation: only checkpoints older than this one (never a higher-numbered one, whoever wrote
    # it). This one is verified: its digests were taken as it was written and Run.save refused
    # weights that first_bad names, so the newest verified checkpoint is never the one rotation
    # removes
    for _, path, _ in [c for c in checkpoints(out) if c[0] < step][keep - 1:]:
        remove(path)
    checkpoint_hook("rotated", step)
    remove(os.path.join(out, PREVIOUS))   # the new run has its first checkpoint: the old one may go
    checkpoint_hook("previous", step)
    checkpoint_hook("done", step)

def checkpoint_files(step, flux, text, acfg, opt, args, consumed, world):
    """What ckpt-STEP holds -> ({file: produce(file)}, first_bad's (name, why) of a weight or
    optimizer state that must not be saved, or None): the weights (the whole toy model in the base
    stage, a toy checkpoint folder: weights.toy_files; else the adapter), the optimizer state with
    the data position `consumed` (global micro-batches for train_sft, prompts for train_rl) and the
    ranks, and the arguments. Every tensor whole (weights.whole): an FSDP run's checkpoint is a
    one-process run's, so either resumes the other on any number of ranks; gathering the shards is a
    collective (every rank calls this then)."""
    if acfg is None:
        weights = {f: ({k: WT.whole(v).contiguous() for k, v in sd.items()}, meta)
                   for f, (sd, meta) in WT.toy_files(flux, text).items()}
    else:
        weights = {"adapter.safetensors": ML.adapter_file(flux, acfg, {"step": str(step)})}
    optimizer = opt.state_dict()
    optimizer["state"] = {i: {k: WT.whole(v) for k, v in s.items()}
                          for i, s in optimizer["state"].items()}
    state = {"step": step, "consumed": consumed, "world": world, "optimizer": optimizer}
    moments = [(f"optimizer state {k} of parameter {i}", v)
               for i, s in state["optimizer"]["state"].items() for k, v in s.items()]
    tensors = [(k, v) for sd, _ in weights.values() for k, v in sd.items()]
    bad = first_bad(tensors, MAX_WEIGHT) or first_bad(moments)
    files = {f: (lambda f, sd=sd, meta=meta: f.write(save_safetensors(sd, metadata=meta)))
             for f, (sd, meta) in weights.items()}
    files["train_state.pt"] = lambda f: torch.save(state, f)
    files["args.json"] = lambda f: f.write(json.dumps(vars(args), indent=2).encode())
    return files, bad

def load_checkpoint(path, flux, text, acfg, opt):
    """A checkpoint folder into the models and the optimizer -> (step, consumed, ranks that saved
    it). A checkpoint that is unreadable or belongs to another run (other adapters, another
    optimizer) is one CheckpointError naming the file."""
    if not os.path.isdir(path):
        raise WT.CheckpointError(f"{path}: not a checkpoint folder")
    # copied into the parameters the optimizer holds (assigning new ones would leave it
    if acfg is None:
        WT.load_toy(path, into=(flux, text))                                   # updating the old)
    else:
        file = os.path.join(path, "adapter.safetensors")
        ML.load_strict(flux, ML.read_adapter(file)[1], file)
    file = os.path.join(path, "train_state.pt")
    if not os.path.isfile(file):
        raise WT.CheckpointError(f"{file}: no such file")
    # weights_only: tensors and plain containers only, no object in the pickle is ever constructed
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        # the saved state's integer keys index these
        params = [p for g in opt.param_groups for p in g["params"]]
        state["optimizer"]["state"] = {i: {k: WT.placed_like(params[i], v) for k, v in s.items()}
                                       # FSDP: its shard
                                       for i, s in state["optimizer"]["state"].items()}
        opt.load_state_dict(state["optimizer"])
        return state["step"], state["consumed"], state["world"]
    except pickle.UnpicklingError:
        raise WT.CheckpointError(f"{file}: not a pickle of tensors only: refused (torch.load with "
                                 f"weights_only=True runs none of a pickle's code)") from None
    except Exception as e:   # missing, torn, another run's optimizer: all the file's fault
        raise WT.CheckpointError(f"{file}: not this run's training state ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

# -----------------------------------------------------------------------------
# the run folder: one run, one writer, never lost

def lock(out):
    """OUT/.lock (D.RUN_LOCK), held for the life of this process (flock: the kernel lets go when the
    process ends, however it ends), with our pid and host written in it -> its descriptor. Another
    holder: a RunFolderError."""
    fd = os.open(os.path.join(out, D.RUN_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(f"{out} is in use by {holder}: one trainer writes a run folder at a "
                             f"time (wait for it to end, or give another --out)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd

def trim_log(path, step):
    """OUT/log.jsonl as of checkpoint `step`: a killed run logged steps after it (they run again)
    and may have torn its last line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("step", rec.get("iter", 0)) <= step:
                kept.append(line.rstrip(b"\n") + b"\n")
    D.write_atomic(path, lambda f: f.writelines(kept))

def flag(name):
    return "--" + name.replace("_", "-")

def compare_args(saved, now, may_change, per_step, saved_world, world, where):
    """The arguments a checkpoint was saved with against this run's -> a note naming the deliberate
    changes (the flags in may_change) or None. A change of any other flag would make the resumed run
    something other than the saved run's continuation (other data or data order, another model or
    adapter shape, another stage or procedure): a RunFolderError naming each. per_step: the flag
    that, times the ranks, is the global number of micro-batches (or prompts) per step; the ranks
    may change where that product does not."""
    now = json.loads(json.dumps(now))                      # as args.json holds it (tuples -> lists)
    # a flag the checkpoint predates (added to the trainer since) is the same run while it is left
    # off
    predates = lambda k: k not in saved and now[k] in (None, False)
    changed = [k for k in now if k not in ("out", "resume", "fresh", "force") and not predates(k)
               and saved.get(k, "(unset)") != now[k]]
    say = lambda ks: ", ".join(f"{flag(k)} {saved.get(k, '(unset)')} -> {now[k]}" for k in ks)
    refused = [say([k]) for k in changed if k not in may_change]
    total = saved.get(per_step, 0) * saved_world                  # micro-batches (prompts) per step
    if total != now[per_step] * world:
        fix = f"pass {flag(per_step)} {total // world}" if total % world == 0 else \
            f"run on a number of ranks that divides {total}"
        refused.append(f"the global batch ({saved_world} rank(s) x {flag(per_step)} "
                       f"{saved.get(per_step)} -> {world} x {now[per_step]}: {fix})")
    if refused:
        raise RunFolderError(f"{where}: resuming needs the settings it was saved with: "
                             f"{', '.join(refused)} (change them back, or use "
                             "another --out or --fresh)")
    noted = [k for k in changed if k in may_change]
    return f"note: resuming {where} with {say(noted)}" if noted else None

class Run:
    """The folder --out holds one run, for the life of a trainer (a context manager):
    - one writer: rank 0 holds OUT/.lock (lock); the other ranks never touch the folder but to read
      the checkpoint rank 0 chose (every decision is rank 0's, broadcast);
    - an OUT that is or holds one of the run's inputs (INPUTS) or lies in a checkpoint is refused
      (data.check_output);
    - a folder holding a run (ckpt-*, latest, log.jsonl, best.safetensors) is refused without
      --resume or --fresh; --fresh moves that run to OUT/previous/ (write_checkpoint removes it once
      the new run has a checkpoint, so a kill in between loses nothing);
    - --resume takes the newest complete checkpoint that verify() trusts (whatever `latest` says;
      one it does not is a note, and the one before it is taken), after comparing its args.json;
    - save(): non-finite or absurd weights (first_bad) are never written, a failed write
      (a full disk) is one line and leaves the last checkpoint intact;
    - SIGTERM / SIGINT set a flag; at the next step boundary (step_done) the run saves and stops
      (Stopped)."""

    def __init__(self, args, argv, script, may_change, per_step, ddp, rank, world, device):
        self.out, self.args, self.argv, self.script = args.out, args, list(argv), script
        self.may_change, self.per_step = may_change, per_step
        self.ddp, self.master, self.world, self.device = ddp, rank == 0, world, device
        self.fd, self.signum, self.handlers = None, 0, {}
        self.made = None             # the outermost folder this run created, while it holds nothing
        self.last = None             # (step, path) of this run's newest checkpoint, on every rank
        self.resume_from = None      # the checkpoint to resume (a path), or None: start at step 0

    def __enter__(self):
        try:
            verdict = self._open() if self.master else None
        except (OSError, RunFolderError, D.InputError) as e:
            verdict = ("error", f"{self.out}: cannot use it as the run folder ({e.strerror or e})"
                       if isinstance(e, OSError) else str(e))
        except BaseException:
            self.__exit__()
            raise
        verdict = self._agree(verdict)
        if verdict[0] == "error":
            self.__exit__()
            raise RunFolderError(verdict[1])
        self.resume_from = verdict[1]
        self.last = newest_of(verdict[1])
        if threading.current_thread() is threading.main_thread():
            self.handlers = {s: signal.signal(s, self._signal)
                             for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.handlers.items():
            signal.signal(s, h)
        self.handlers = {}
        if self.fd is not None:
            os.close(self.fd)           # the lock goes with it
            self.fd = None
        if self.made:                   # a start that failed before writing anything leaves nothing
            self._unmake()
        self.made = None

    def _unmake(self):
        """Remove the folders this run created, if they hold nothing but the lock and an empty log:
        OUT, then each parent it made, while empty (another run may have made its own folder beside
        ours meanwhile)."""
        out = os.path.abspath(self.out)
        log = os.path.join(out, "log.jsonl")
        try:
            if (set(os.listdir(out)) - {".lock", "log.jsonl"}
                or os.path.isfile(log) and os.path.getsize(log)):
                return
            for name in (".lock", "log.jsonl"):
                if os.path.isfile(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
            folder = out
            while True:
                os.rmdir(folder)                           # fails (and stops) on a folder not empty
                if folder == self.made:
                    return
                folder = os.path.dirname(folder)
        except OSError:
            return

    def _agree(self, value):
        # rank 0's value on every rank (a collective: the other ranks wait for rank 0 here)
        if self.ddp:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def _open(self):
        """Rank 0: lock the folder, tidy it, decide -> ("ok", the checkpoint to resume or None)."""
        # the folder, ours alone and without a killed writer's leftovers
        self._claim()
        # what it holds decides: --resume continues its newest good checkpoint; otherwise a run
        # there is refused, or moved aside by --fresh
        found = checkpoints(self.out)
        return ("ok", self._resume(found) if self.args.resume else self._start(found))

    def _claim(self):
        """OUT refused if it is or holds an input of the run (data.check_output); made if missing
        (the outermost folder made is remembered: a start that fails removes it); locked; then
        tidied: garbage discarded, temporaries removed, a --fresh killed while moving the old run
        aside finished."""
        out = self.out
        made = os.path.abspath(out)
        while not os.path.lexists(os.path.dirname(made)):
            made = os.path.dirname(made)
        self.made = None if os.path.lexists(made) else made
        D.check_output([out], [getattr(self.args, k, None) for k in INPUTS], self.args.force)
        os.makedirs(out, exist_ok=True)
        self.fd = lock(out)
        for name in os.listdir(out):
            if name.startswith(GARBAGE):
                discard(os.path.join(out, name))
        D.clean_temporaries(out)           # e.g. best.safetensors' of a run killed writing it
        if os.path.isdir(os.path.join(out, MOVING)):     # a --fresh killed while moving: finish it
            self._move_aside()

    def _resume(self, found):
        """--resume, given checkpoints(OUT) -> the checkpoint to resume, None when there is none yet
        (step 0). The newest one whole and verified is taken, each passed over a note (its steps run
        again); its args.json must describe the same run (compare_args). Then `latest` names it, the
        log is cut back to its step, and a --fresh start's previous/ may go."""
        out = self.out
        if not found:
            print0(f"note: {out} holds no checkpoint yet: starting at step 0")
            trim_log(os.path.join(out, "log.jsonl"), -1)
            return None
        passed = []
        for step, path, why in found:                         # newest first
            why = why or verify(path)
            if why is None:
                break
            passed.append((step, why))
        else:
            raise RunFolderError(f"{passed[0][1]}; {out} holds no complete checkpoint "
                                 f"to resume from")
        for s, why in passed:
            print0(f"note: skipping checkpoint {s}: {why}")
        self._same_run(path)
        # `latest` names what we resume, whatever it said; the log goes back to its step; a --fresh
        # start's old run may go, since the checkpoint resumed is the new run's
        point_latest(out, os.path.basename(path), step)
        trim_log(os.path.join(out, "log.jsonl"), step)
        if os.path.lexists(os.path.join(out, PREVIOUS)):
            remove(os.path.join(out, PREVIOUS))
        return path

    def _same_run(self, path):
        # the checkpoint's arguments and rank count against this run's: another run is refused, a
        # deliberate change is a note
        with open(os.path.join(path, MARKER)) as f:
            saved_world = json.load(f).get("world", 1)
        try:
            with open(os.path.join(path, "args.json")) as f:
                saved = json.load(f)
            assert isinstance(saved, dict)
        except (OSError, ValueError, AssertionError):
            raise RunFolderError(f"{os.path.join(path, 'args.json')}: not a JSON object of "
                                 f"arguments") from None
        note = compare_args(saved, vars(self.args), self.may_change, self.per_step, saved_world,
                            self.world, path)
        if note:
            print0(note)

    def _start(self, found):
        """No --resume, given checkpoints(OUT) -> None (step 0): a folder holding a run is refused
        unless --fresh, which moves that run aside to OUT/previous/."""
        out = self.out
        done = [(s, p) for s, p, why in found if why is None]
        holds = found or any(os.path.lexists(os.path.join(out, n)) for n in RUN_ENTRIES)
        if holds and not self.args.fresh:
            step = done[0][0] if done else 0
            raise RunFolderError(f"{out} holds a run at step {step}: pass --resume to continue, or "
                                 f"another --out (or --fresh to start over)")
        if holds:
            self._move_aside(bool(done))
        return None

    def _move_aside(self, newer=True):
        """--fresh: every run entry of OUT into OUT/previous.part, then that renamed to
        OUT/previous. A previous/ already there is an earlier run that --fresh replaced: it goes if
        the run after it saved a checkpoint (newer), else it stays (it holds the newest checkpoints)
        and what the run after it left goes."""
        out = self.out
        prev, part = os.path.join(out, PREVIOUS), os.path.join(out, MOVING)
        entries = [n for n in os.listdir(out) if CKPT.match(n) or n in RUN_ENTRIES]
        if os.path.lexists(prev) and not os.path.isdir(part):
            if not newer:
                for n in entries:
                    remove(os.path.join(out, n))
                return
            remove(prev)
        os.makedirs(part, exist_ok=True)
        for n in entries:
            os.replace(os.path.join(out, n), os.path.join(part, n))
        os.replace(part, prev)
        D.fsync_dir(out)
        print0(f"note: --fresh: the run that was in {out} is now in {prev} (removed at "
               "this run's first checkpoint)")

    # ---- saving ----

    def save(self, step, flux, text, acfg, opt, consumed):
        """Every rank calls it; rank 0 writes OUT/ckpt-STEP (write_checkpoint). Non-finite weights
        or optimizer state are not written; a failed write leaves the last checkpoint: both a
        TrainingError on every rank."""
        if hasattr(opt, "consolidate_state_dict"):
            opt.consolidate_state_dict(to=0)        # ZeRO: gather the sharded optimizer state first
        # FSDP shards the weights and the optimizer state: every rank builds the checkpoint then
        # (gathering), rank 0 alone writes it
        made = checkpoint_files(step, flux, text, acfg, opt, self.args, consumed, self.world) \
            if self.master or WT.sharded(flux) else None
        error = None
        if self.master:
            files, bad = made
            if bad:
                error = (f"step {step}: {bad[0]} {bad[1]} (the run diverged: try a lower --lr): "
                         f"not saved; {self.intact()}")
            else:
                try:
                    write_checkpoint(self.out, step, files, self.world, self.args.keep)
                except OSError as e:
                    why = ("disk full" if e.errno == errno.ENOSPC
                           else f"{e.strerror or e} ({e.filename})")
                    error = (f"{self.out}: {why} writing checkpoint {step}; "
                             f"{self.intact(newest(self.out))}")
        error = self._agree(error)
        if error:
            raise TrainingError(error)
        self.last = (step, os.path.join(self.out, f"ckpt-{step:07d}"))

    def intact(self, last=None):
        step, path = last or self.last or (None, None)
        return f"checkpoint {step} intact ({path})" if path else "no checkpoint saved yet"

    # ---- stopping on a signal ----

    def _signal(self, signum, frame):
        if self.signum:                      # a second one: stop now, as if no handler were there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        print0(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
               f"stopping (again: stop now)")

    def step_done(self, step, due, flux, text, acfg, opt, consumed):
        """The end of a step: save if a checkpoint is due or a signal came (all ranks agree: the
        flag is all-reduced), and then stop with Stopped."""
        signum = self.signum
        if self.ddp:
            t = torch.tensor([signum], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        if due or (signum and not (self.last and self.last[0] == step)):
            self.save(step, flux, text, acfg, opt, consumed)
        if signum:
            raise Stopped(signum, f"stopped by {signal.Signals(signum).name} at step {step}: "
                          f"{self.intact()}; continue with: {self.resume_command()}")

    def resume_command(self):
        launcher = ["python"] if not self.ddp else ["torchrun", f"--nproc_per_node={self.world}"]
        argv = [a for a in self.argv if a not in ("--fresh", "--resume")]
        return shlex.join(launcher + [self.script] + argv + ["--resume"])

def newest_of(path):
    # a checkpoint folder -> (its step, path), or None
    return (int(CKPT.match(os.path.basename(path)).group(1)), path) if path else None

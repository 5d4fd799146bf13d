"""
Data: every image and file a user hands us (the one image opener, reference preprocessing, atomic
writes), manifests of (target, prompt, references, masks, correspondences) and their checker. What
training makes of them is dataset.py; the toy world that writes such manifests is toy.py; curation
of your own videos and photos is curate.py; the cache of text embeddings and latents is cache.py.

    python data.py check data/manifest.jsonl        # every bad record as file:line: field: why; exit 1 if any

A manifest is JSONL, one record a line, paths relative to the manifest's folder (and confined to
it):
  {"target": "t.jpg", "prompt": "a cat and a dog", "refs": ["cat.png", "dog.png"], "masks": ["m0.png", "m1.png"],
   "points": [[[ry, rx, ty, tx], ...], ...]}
masks[i] is subject i's region in the target (the target's size; grayscale, or a cut-out whose alpha
channel is the subject; value / 255 is the share inside).
points[i] are optional correspondences in [0, 1] coordinates (ry, rx in reference i; ty, tx in the
target) for MOSAIC's SCAL. RL records have no target and may give "kinds" ("face"/"object") and
"captions"; the toy world adds "attrs" (each subject's identity: shape, rgb, code) and "boxes".
Optional "id". UNO's JSON list of {"prompt", "image_paths", "image_tgt_path"} is read too.

"""
import fcntl, json, os, pickle, re, stat, sys, tempfile, warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps
from safetensors import SafetensorError

import cli as CL
import weights as WT

class DataError(ValueError):
    """A bad manifest or record: the message says which and why."""

# -----------------------------------------------------------------------------
# user files in and out: the one image opener (with its pixel cap), references as the model sees
# them, atomic writes

class InputError(ValueError):
    """A bad user input (a reference image, a size, a device): the message says which and why."""

# references per sample (MultiCrafter and UNO show up to 4); each adds (ref_size / 16)^2 tokens
MAX_REFS = 8
# larger images are refused: a tiny file can declare gigapixels (a decompression bomb)
MAX_PIXELS = 8192 * 8192

def utf8(text):
    # a str that has no UTF-8 bytes: lone surrogates, from a JSON "\ud800" or from argv bytes that
    # are not UTF-8
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False

def check_file(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")

class Preflight:
    """What a command checks before any work (reading a manifest, loading a model, making a run
    folder): every path it was given exists and is what it must be, every weight it will load is on
    this machine, its flags agree. The problems are collected, then check() raises one InputError
    naming them all, so one attempt shows everything to fix. Nothing is read here but names, folder
    listings and the local Hugging Face cache."""
    def __init__(self):
        self.problems = []

    def need(self, ok, problem):
        if not ok:
            self.problems.append(problem)
        return bool(ok)

    def file(self, flag, path, inside=None):
        """path (None: not given) must be a file; a folder holding `inside` is named as the file
        probably meant."""
        if path is None or os.path.isfile(path):
            return True
        if os.path.isdir(path):
            meant = os.path.join(path, inside) if inside else None
            hint = f" (pass {flag} {meant})" if meant and os.path.isfile(meant) else ""
            return self.need(False, f"{flag} {path}: a folder, not a file{hint}")
        return self.need(False, f"{flag} {path}: no such file")

    def folder(self, flag, path, holds=()):
        """path (None: not given) must be a folder holding the files `holds`."""
        if path is None:
            return True
        if not os.path.isdir(path):
            return self.need(False, f"{flag} {path}: " + (
                "a file, not a folder" if os.path.exists(path) else "no such folder"))
        lack = [f for f in holds if not os.path.isfile(os.path.join(path, f))]
        return self.need(not lack, f"{flag} {path}: no {' or '.join(lack)} in it")

    def weights(self, weights):
        """[weights.Weight]: each on this machine, or (one problem) every missing one with its
        download command."""
        try:
            WT.check_weights(weights)
        except WT.CheckpointError as e:
            self.problems.append(str(e))

    def check(self):
        if len(self.problems) == 1:
            raise InputError(self.problems[0])
        if self.problems:
            raise InputError(f"{len(self.problems)} problems, found before any work: "
                             + " | ".join(self.problems))

def read_image(path, decode):
    """The one way a user's image file is opened (sample.py --refs, data.py check, training):
    decode(im) -> result. Every failure is one InputError naming the file; the format comes from the
    bytes, never the extension."""
    check_file(path)
    try:
        with warnings.catch_warnings():
            # Pillow's notes on odd files; its bomb warning is checked below
            warnings.simplefilter("ignore")
            with Image.open(path) as im:             # reads the header only
                if im.width * im.height > MAX_PIXELS:
                    raise InputError(f"{path}: {im.width}x{im.height} is more than {MAX_PIXELS} "
                                     f"pixels (a decompression bomb?)")
                return decode(im)
    except InputError:
        raise
    except Image.DecompressionBombError:             # so many pixels that Pillow refuses to open it
        raise InputError(f"{path}: more than {MAX_PIXELS} pixels (a decompression bomb?)") from None
    except Exception as e:
        # not an image, truncated, corrupt, a gigapixel bomb: Pillow raises many types
        raise InputError(f"{path}: not a readable image "
                         f"({type(e).__name__}: {str(e)[:200]})") from None

def _upright(im):
    # the first frame (of an animated GIF/WebP/APNG), rotated as the camera meant it (EXIF), 16-bit
    # gray as 8-bit
    im.seek(0)
    im.load()
    img = ImageOps.exif_transpose(im)                        # a copy
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grayscale (Pillow gives 'I;16' or 32-bit 'I' holding 0..65535): scale, don't clip
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    return img

def alpha(img):
    """The alpha channel (H, W) uint8 of an image that carries transparency (RGBA, LA, PA, or a
    palette / gray / RGB file with a transparent colour), else None."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return np.asarray(img.convert("RGBA"))[..., 3]
    return None

def _upright_rgb(im):
    img = _upright(im)
    if alpha(img) is not None:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")                                # also L, 1, P, CMYK, YCbCr, F

def load_image(path):
    """Any image file -> RGB PIL image, upright (EXIF), first frame, transparency composited on
    white."""
    return read_image(path, _upright_rgb)

def fit_box(w, h, side):
    # (w, h) scaled so its longer side is `side` -> (rw, rh) and its (left, top) centered in a side
    # x side square
    s = max(w, h)
    rw, rh = max(1, round(w * side / s)), max(1, round(h * side / s))
    return rw, rh, (side - rw) // 2, (side - rh) // 2

def preprocess_ref(img, ref_size):
    """A reference as training sees it (data.py): resized to ref_size on its longer side
    (aspect kept) and centered on a white ref_size x ref_size square. Resized before padding: a 1 x
    60000 strip padded first is 3.6 gigapixels."""
    rw, rh, left, top = fit_box(*img.size, ref_size)
    out = Image.new("RGB", (ref_size, ref_size), (255, 255, 255))
    out.paste(img if img.size == (rw, rh) else img.resize((rw, rh), Image.LANCZOS), (left, top))
    return out

# what a training run owns (runs.py writes them): no other command writes over them
CHECKPOINT_MARKER = "checkpoint.json"       # written last into each checkpoint folder
RUN_LOCK = ".lock"                          # a run folder's lock file, held by its trainer
# a run folder's own entries beside its ckpt-*
RUN_FILES = ("latest", "log.jsonl", "best.safetensors")

def run_work(real):
    """The training run's work that the real path `real` is part of -> what it is, or None: a
    checkpoint folder (it holds CHECKPOINT_MARKER) or anything inside one, or a run folder's own
    entry."""
    folders = [real]                                          # real, its folder, ... up to /
    while os.path.dirname(folders[-1]) != folders[-1]:
        folders.append(os.path.dirname(folders[-1]))
    checkpoint = next((f for f in folders if os.path.isfile(os.path.join(f, CHECKPOINT_MARKER))),
                      None)
    if checkpoint:
        return f"checkpoint {checkpoint}"
    parent = os.path.dirname(real)
    if os.path.basename(real) in RUN_FILES and os.path.isfile(os.path.join(parent, RUN_LOCK)):
        return f"run folder {parent}"
    return None

def check_output(outs, inputs, force=False):
    """The one rule of every command that writes, before any work: each of `outs` (a file it writes,
    or a folder it writes into) is refused when it is one of `inputs` (files or folders it reads),
    holds one, or is part of a training run's work (run_work), all compared by real path, so a link
    to an input is that input. force: the user said so (--force). -> one InputError naming the
    output and what it would destroy."""
    if force:
        return
    # a repo id: not a path
    read = [(i, os.path.realpath(i)) for i in inputs if i and os.path.exists(i)]
    for out in outs:
        real = os.path.realpath(out)
        for i, r in read:
            if os.path.commonpath([real, r]) == real:
                raise InputError(f"{out}: {'is' if r == real else 'holds'} {i}, which this command "
                                 f"reads: refused, writing there would destroy it (give "
                                 f"another output, or --force)")
        work = run_work(real)
        if work:
            raise InputError(f"{out}: part of a training run's {work}: refused, writing there "
                             f"would destroy its work (give another output, or --force)")

def add_force(p):
    p.add_argument("--force", action="store_true", help="write even where an output is one of the "
                   "inputs, holds one, or is part of a training run (refused by "
                   "default: data.check_output)")

# what writing or reading a file raises besides our own errors: the OS (a full disk, no permission,
# a missing file), safetensors (a torn, foreign or unwritable file), pickle (a refused or torn one);
# each becomes one line (file_errors)
FILE_ERRORS = (OSError, SafetensorError, pickle.UnpicklingError, EOFError)

def file_problem(e):
    """What went wrong with a file, on one line: the OS's words (safetensors wraps them:
    "IoError(Os { ... message: "No space left on device" })"), a pickle refused for the code it
    would run, else the first line."""
    text = str(e).strip()
    said = re.search(r'message: "([^"]+)"', text)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if said:
        return said.group(1)
    # torch.load weights_only
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        return "a pickle that would construct objects or run code: refused unread"
    return (text.splitlines() or [type(e).__name__])[0][:200]

@contextmanager
def file_errors(path, doing, error=InputError):
    """The one error path for writes and loads: a FILE_ERRORS exception inside the block becomes one
    `error` naming the file: "PATH: cannot DOING (what went wrong)"."""
    try:
        yield
    except FILE_ERRORS as e:
        raise error(f"{path}: cannot {doing} ({file_problem(e)})") from None

# a temporary file is named for the process writing it, so whoever opens its folder later can tell a
# dead writer's leftover from a live one's: ours .tmp-PID-*, weights.save_safetensors' NAME.tmpPID
TEMPORARY = re.compile(r"\.tmp-(\d+)-|.+\.tmp(\d+)$")

def fsync_dir(path):
    # a rename is on the disk once its folder is
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def write_temporary(folder, write):
    """write(file) into a new temporary file in `folder`, flushed to the disk (fsync), readable like
    any file the user makes -> its path. A failure removes it."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp

def write_atomic(path, write):
    """The protocol of every single file we write (the checkpoint protocol's, for one file): a
    temporary in the same folder, fsynced, renamed over path, the folder fsynced: readers never see
    half a file, a crash never leaves a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    with file_errors(path, "write"):
        tmp = write_temporary(folder, write)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        fsync_dir(folder)

def clean_temporaries(folder):
    """Remove the temporaries (TEMPORARY) that writers no longer running left in `folder`
    (killed mid-write); a live writer's stay. Called when a command opens a folder it writes."""
    for name in os.listdir(folder):
        m, path = TEMPORARY.match(name), os.path.join(folder, name)
        if m and os.path.isfile(path) and not alive(int(m.group(1) or m.group(2))):
            os.remove(path)

def alive(pid):
    try:
        os.kill(pid, 0)                                      # signal 0: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:                                  # another user's process
        pass
    return True

def check_writable(folder):
    """Fail before any work where `folder` cannot be written, creating nothing: a temporary file in
    it, or in its nearest existing ancestor (the rest is made when the first sample is written)."""
    top = os.path.abspath(folder)
    while not os.path.exists(top):
        top = os.path.dirname(top)
    try:
        if not os.path.isdir(top):
            raise NotADirectoryError(f"{top} is a file")
        fd, tmp = tempfile.mkstemp(dir=top, prefix=".tmp-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"{folder}: cannot write there ({e.strerror or e})") from None

@contextmanager
def only_writer(folder):
    """The test set `folder` (made if missing) for this process alone while the block runs: flock on
    the folder itself (nothing is written into the set; the kernel lets go however the process
    ends). Held: one InputError. The temporaries a killed sampler left in its seed folders are
    removed."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"{folder}: another sample.py is writing this set: refused, their "
                           f"samples would mix (wait for it to end, or "
                           f"pass another --out-dir)") from None
    for seed in os.scandir(folder):
        if seed.is_dir():
            clean_temporaries(seed.path)
    try:
        yield
    finally:
        os.close(fd)

# -----------------------------------------------------------------------------
# reading manifests and validating records

def resolve(root, rel):
    """A manifest path -> a path inside root. Absolute paths, '..' and symlinks that lead out of the
    root are refused: a manifest from elsewhere must not make us read (or cache, or train on) files
    outside its folder."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise DataError(f"not a path: {rel!r}")
    if os.path.isabs(rel):
        raise DataError(
            f"{rel}: absolute paths are not allowed (paths are relative to the manifest)")
    if ".." in re.split(r"[/\\]", rel):
        raise DataError(f"{rel}: '..' is not allowed (paths must stay "
                        "inside the manifest's folder)")
    path = os.path.join(root, rel)
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise DataError(f"{rel}: resolves outside the manifest's folder (a link to {real})")
    return path

# bytes in one manifest line: a record of 8 references with 10,000 points each is ~3 MB
MAX_LINE = 16 << 20
MAX_LIST = 1 << 30    # bytes in a UNO JSON list (one document, read whole)
MAX_DEPTH = 16        # nesting in a record: record > points > reference > point is 4

def too_deep(value):
    # nesting past MAX_DEPTH, found level by level (no recursion: that is what fails)
    level = [value]
    for _ in range(MAX_DEPTH):
        level = [x for v in level if isinstance(v, (list, dict))
                 for x in (v.values() if isinstance(v, dict) else v)]
    return any(isinstance(v, (list, dict)) for v in level)

def parse_json(text, pos=None):
    """The one JSON parser for manifests: json.loads(text) (or, given pos, raw_decode from pos ->
    (value, end)). Whatever a line can make json (or later code) raise is one DataError: invalid
    JSON, nesting deeper than MAX_DEPTH (json's own recursion fails near 1,000; code that walks a
    value could fail far earlier), an integer of more digits than Python converts."""
    try:
        out = json.loads(text) if pos is None else json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as e:
        err = DataError(f"invalid JSON ({e.msg} at column {e.colno})")
        err.line = e.lineno                        # in a UNO list: the error's line, not the item's
        raise err from None
    except RecursionError:
        raise DataError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:            # the one other ValueError json raises: int('9' * 5000) is refused
        raise DataError(f"an integer of more than {sys.get_int_max_str_digits()} digits") from None
    if too_deep(out if pos is None else out[0]):
        raise DataError(f"nested deeper than {MAX_DEPTH} levels")
    return out

def _json_list(text):
    # (line, item) for each item of a JSON list (json.loads would lose where each item starts); a
    # broken item ends the list as (line, DataError)
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, seen = 1, 0                                         # newlines counted up to `seen` so far
    while text[pos:pos + 1] != "]":
        line, seen = line + text.count("\n", seen, pos), pos
        try:
            item, end = parse_json(text, pos)
        except DataError as e:
            yield getattr(e, "line", line), e
            return
        yield line, item
        pos = ws.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = ws.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            yield (line + text.count("\n", seen, pos),
                   DataError("invalid JSON (expected ',' or ']' after an item)"))
            return

def _lines(f):
    """(line number, bytes) of each line of an open binary file, reading at most MAX_LINE bytes at
    once. A longer line gives (line, None) and is skipped; in a stream that is no regular file
    (a device such as /dev/zero, a pipe) it ends the reading: such a stream may never reach a line
    end."""
    regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    line = 0
    while raw := f.readline(MAX_LINE + 1):
        line += 1
        if len(raw) <= MAX_LINE or raw.endswith(b"\n"):
            yield line, raw
            continue
        yield line, None
        if not regular:
            return
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)

def read_manifest(path):
    """-> records [(line, parsed JSON)], problems [(line, "record", why)] for lines that do not
    parse (parse_json). JSONL; a file that starts with '[' (and is not .jsonl) is UNO's JSON list,
    each item at the line it starts. Reading is bounded (MAX_LINE per line, MAX_LIST for a list)
    whatever the file is."""
    try:
        with open(path, "rb", buffering=1 << 16) as f:
            head = f.peek(1 << 16).removeprefix(b"\xef\xbb\xbf")           # a UTF-8 byte-order mark
            if head.lstrip()[:1] == b"[" and not path.endswith(".jsonl"):
                return _read_list(f.read(MAX_LIST + 1))
            records, problems = [], []
            for line, raw in _lines(f):
                if raw is None:
                    problems.append((line, "record",
                                     f"longer than {MAX_LINE >> 20} MiB (not a manifest line)"))
                    continue
                raw = raw.removesuffix(b"\n").removeprefix(b"\xef\xbb\xbf" if line == 1 else b"")
                if not raw.strip():
                    continue
                try:
                    records.append((line, parse_json(raw.decode("utf-8"))))
                except UnicodeDecodeError as e:
                    problems.append((line, "record", f"not UTF-8 (byte 0x{raw[e.start]:02x} at "
                                     f"column {e.start + 1})"))
                except DataError as e:
                    problems.append((line, "record", str(e)))
            return records, problems
    except OSError as e:
        raise DataError(f"{path}: cannot read the manifest ({e.strerror})") from None

def _read_list(data):
    # read_manifest for UNO's JSON list (the bytes of the whole file, or MAX_LIST + 1 of them)
    if len(data) > MAX_LIST:
        return [], [(1, "record", f"a JSON list of more than {MAX_LIST >> 20} MiB: write it "
                     "as JSONL, a record a line")]
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [(CL.count(b"\n", 0, e.start) + 1, "record",
                     f"not UTF-8 (byte 0x{data[e.start]:02x})")]
    records, problems = [], []
    for line, item in _json_list(text):
        if isinstance(item, DataError):
            problems.append((line, "record", str(item)))
        else:
            records.append((line, item))
    return records, problems

def image_size(path):
    """Upright (W, H) from the header alone: EXIF orientations 5-8 swap the sides, as load_image's
    transpose does (read from what Image.open parsed; im.getexif() would decode a whole PNG)."""
    def upright(im):
        exif = Image.Exif()
        if "exif" in im.info:
            exif.load(im.info["exif"])
        return im.size[::-1] if exif.get(0x0112, 1) in (5, 6, 7, 8) else im.size
    return read_image(path, upright)

def _mask_values(im):
    # a cut-out (transparency that is not opaque everywhere) is its alpha: the subject is what is
    # not transparent. Anything else is its gray level. Composited on white, as an image, a cut-out
    # would be all inside
    img = _upright(im)
    a = alpha(img)
    return a if a is not None and a.min() < 255 else np.asarray(img.convert("L"))

def load_mask(path):
    """A mask file -> float32 (H, W) in [0, 1]: its alpha channel where it carries one (a cut-out),
    else its gray level; binary masks give exact areas, soft (fractional) masks are kept as shares.
    Read as load_image reads the target it belongs to (first frame, EXIF rotation, 16-bit)."""
    m = read_image(path, _mask_values).astype(np.float32) / 255
    if m.max() < 0.5:
        raise DataError(f"{path}: empty mask (no pixel above 127)")
    return m

def _file(root, rel, field, deep, bad, mask=False):
    # one image of a record -> (path, (W, H)); a problem goes to `bad` and gives (None, None)
    try:
        path = resolve(root, rel)
        if not deep:
            return path, image_size(path)
        if mask:
            return path, load_mask(path).shape[::-1]
        return path, load_image(path).size
    except (DataError, InputError) as e:                # names the joined path: show the manifest's
        bad.append((field, str(e).replace(os.path.join(root, ""), "", 1)))
    return None, None

UNO_KEYS = ("image_paths", "image_path", "image_tgt_path")
# a record id names files (rewards.py eval): no paths
ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")

PER_REF = {"kinds": ('one of "face"/"object"', lambda v: v in ("face", "object")),
           "captions": ("a string of valid Unicode", lambda v: isinstance(v, str) and utf8(v)),
           "attrs": ("an object", lambda v: isinstance(v, dict))}

def _bad_point(p):
    return not (isinstance(p, list) and len(p) == 4 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                    for v in p))

def validate(rec, root, deep=True):
    """One parsed record -> (normalized dict, or None if bad; [(field, why)] listing every problem).
    deep=True decodes every image (finds truncated files and empty masks); deep=False reads only
    headers, cheap enough to run over a million-record manifest when a trainer starts."""
    if not isinstance(rec, dict):
        return None, [("record", f"not a JSON object (a {type(rec).__name__})")]
    if "refs" not in rec and any(k in rec for k in UNO_KEYS):      # UNO's names for the same fields
        refs = rec.get("image_paths", [rec["image_path"]] if "image_path" in rec else None)
        rec = dict(rec, refs=refs, target=rec.get("image_tgt_path"))
    bad = []
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        bad.append(("prompt", "missing or empty (need a string)"))
    elif not utf8(prompt):
        bad.append(("prompt", "not valid Unicode (a lone surrogate escape such as \\ud800)"))
    key = rec.get("id")
    if (key is not None and not (isinstance(key, (int, str)) and not isinstance(key, bool)
                                 and ID.fullmatch(str(key)))):
        bad.append(("id", f"{str(key)[:60]!r} is not an integer or a name of letters, digits, '.', "
                    f"'_', '-' (200 at most)"))
    refs = rec.get("refs")
    if not isinstance(refs, list) or not refs:
        bad.append(("refs", "missing or not a non-empty list of paths"))
        refs = []
    elif len(refs) > MAX_REFS:
        bad.append(("refs", f"{len(refs)} references, more than {MAX_REFS}"))
        refs = []
    n = len(refs)
    ref_paths = [_file(root, p, f"refs[{i}]", deep, bad)[0] for i, p in enumerate(refs)]
    target, size = ((None, None) if rec.get("target") is None
                    else _file(root, rec["target"], "target", deep, bad))

    masks = rec.get("masks")
    if masks is not None:
        if not isinstance(masks, list):
            bad.append(("masks", "not a list of paths"))
        elif len(masks) != n:
            bad.append(("masks", f"{len(masks)} masks for {n} references"))
        elif rec.get("target") is None:
            bad.append(("masks", "masks need a target image"))
        else:
            mask_paths = []
            for i, p in enumerate(masks):
                path, msize = _file(root, p, f"masks[{i}]", deep, bad, mask=True)
                mask_paths.append(path)
                if msize and size and tuple(msize) != tuple(size):
                    bad.append((f"masks[{i}]",
                                f"{msize[0]}x{msize[1]} mask for a {size[0]}x{size[1]} target"))
            masks = mask_paths

    points = rec.get("points")
    if points is not None:
        if not isinstance(points, list) or len(points) != n:
            bad.append(("points", f"need one list (or null) per reference ({n})"))
        elif rec.get("target") is None:
            bad.append(("points", "correspondences need a target image"))
        else:
            for i, pts in enumerate(points):
                if pts is not None and not isinstance(pts, list):
                    bad.append((f"points[{i}]", "not a list of [ry, rx, ty, tx]"))
                elif pts:
                    j = next((j for j, p in enumerate(pts) if _bad_point(p)), None)
                    if j is not None:
                        bad.append((f"points[{i}][{j}]",
                                    f"{str(pts[j])[:60]} is not [ry, rx, ty, tx] in [0, 1]"))

    for key, (what, ok) in PER_REF.items():
        v = rec.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == n and all(map(ok, v))):
            bad.append((key, f"need {what} per reference ({n})"))
    if bad:
        return None, bad
    return dict(prompt=prompt, target=target, size=size, refs=ref_paths, masks=masks, points=points,
                id=rec.get("id"),
                **{k: rec[k] for k in ("kinds", "captions", "attrs", "boxes") if k in rec}), []

def validate_all(records, root, deep=True):
    """validate() over read_manifest's records, plus what no single record shows: an "id" given
    twice (the first record keeps it; 1 and "1" are one id, as they name one file). ->
    [(line, normalized dict or None, [(field, why)])]"""
    out, seen = [], {}
    for line, rec in records:
        r, bad = validate(rec, root, deep)
        key = (str(rec["id"]) if isinstance(rec, dict) and isinstance(rec.get("id"), (int, str))
               else None)
        if key in seen:
            r, bad = None, bad + [("id", f"{rec['id']!r} is already the id of line {seen[key]}")]
        elif key is not None:
            seen[key] = line
        out.append((line, r, bad))
    return out

def check(manifest, deep=True):
    """`python data.py check`: print every problem as manifest:line: field: why, then a summary.
    -> exit status: 0 all good, 1 any problem."""
    records, problems = read_manifest(manifest)
    total = len(records) + len(problems)                              # parsed or not
    root = os.path.dirname(os.path.abspath(manifest))
    for line, _, bad in validate_all(records, root, deep):
        problems += [(line, field, why) for field, why in bad]
    problems.sort(key=lambda p: p[0])                                 # stable: fields stay in order
    for line, field, why in problems:
        print(f"{manifest}:{line}: {field}: {why}")
    n_bad = len({line for line, _, _ in problems})
    if total == 0:
        print(f"{manifest}: no records")
        return 1
    print(f"{manifest}: {total} records, {n_bad} bad"
          + (f" ({len(problems)} problems)" if problems else ", all good"))
    return 1 if problems else 0

# -----------------------------------------------------------------------------

MOVED = {"toy": "python toy.py", "curate": "python curate.py faces",
         "curate-objects": "python curate.py objects",
         "correspond": "python curate.py correspond", "cache": "python cache.py"}

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MOVED:                       # the commands that left this file
        print(f"error: `data.py {argv[0]}` is now `{MOVED[argv[0]]}` (same options)",
              file=sys.stderr)
        return 2
    p = CL.Parser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="report every bad record; exit 1 if any")
    c.add_argument("manifest")
    c.add_argument("--quick", action="store_true",
                   help="read image headers only (no truncation/empty-mask check)")
    args = p.parse_args(argv)
    try:
        return check(args.manifest, deep=not args.quick)
    except (DataError, InputError, WT.CheckpointError, *FILE_ERRORS) as e:
        # user mistakes: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())

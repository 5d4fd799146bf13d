"""
Rewards for IPPO (MultiCrafter section 4.4) and the paper's evaluation metrics (section 5.1), from
the same scorers.

  R = w_text R_text + w_aes R_aes + w_id R_id                                  (Eq. 9)
      human subjects 1.4 / 0.7 / 0.5, objects 1.4 / 0.7 / 1.0                 (Appendix B)
  R_id: the Multi-ID Alignment Reward. C[i, j] = cos(reference i, subject j found in the image); the
      assignment X maximizes sum C_ij X_ij with each reference and each subject used at most once
      (Eq. 10), found with scipy's Hungarian solver; unmatched references score 0; divided by the
      number of references. "At most once" is what stops one blended subject from standing in for
      every reference (a per-reference max would credit it to each); two drawn copies of a blend are
      two subjects and score as a max would.

An embedder turns reference images into one vector each and a generated image into one vector per
subject it finds; MultiIDReward does the rest, whatever the embedder (faces, objects, or the toy
world's in toy.py).

The scorers (`--reward human|object`; every model a local folder or a Hugging Face repo id, see
load_pretrained):
  R_text, CLIP-T    CLIP ViT-L/14 (openai/clip-vit-large-patch14): cos(image, prompt)
  R_aes, HPS        HPSv2 as a transformers CLIPModel (adams-story/HPSv2-hf): cos(image, prompt), as
                    HPSv2's own img_score; or PickScore_v1: logit_scale.exp() * cos / 26
                    (Flow-GRPO's normalization, ~0.7-0.9; the paper's w_aes was set for HPS, retune
                    it if you switch)
  R_id, human       insightface (antelopev2: SCRFD + ArcFace; non-commercial licence), every face
                    found
  R_id, object      Florence-2 phrase grounding (or OWLv2) of each reference's caption -> boxes ->
                    (SAM2 mask) -> DINOv2 CLS embedding (facebook/dinov2-base) of each crop
  CLIP-I, DINO-I    the same subjects (faces or detected objects) embedded with CLIP resp. DINOv2,
                    Hungarian-matched

    python rewards.py eval --manifest M.jsonl --images DIR --reward object --out metrics.json
    python toy.py eval --manifest data/toy_val/manifest.jsonl --images samples/0     # the toy world's scorers

eval scores one generated image per manifest record: DIR/<id>.png when the record has an "id", else
DIR/<i:06d>.png with i the record's 0-based position among the manifest's records. Missing or
unreadable images are counted and listed, not fatal. Prints mean and std per metric; writes every
record's scores.
"""
import argparse, glob, json, math, os, sys
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

import cli as CL
import data as D
from data import InputError, load_image, write_atomic

WEIGHTS = {"human": dict(text=1.4, aes=0.7, id=0.5), "object": dict(text=1.4, aes=0.7, id=1.0)}

class RewardModelError(ValueError):
    """A reward model that cannot be loaded: the message says which, where it was looked for, and
    how to get it."""

# -----------------------------------------------------------------------------
# the Multi-ID Alignment Reward (Eq. 10)

def hungarian(sim):
    """sim (n_ref, n_gen) similarities -> (score, [(ref, subject) matched pairs]).
    Eq. 10's constraints are <= 1: a reference may stay unmatched, so a pair of negative similarity
    must never lower the score. Clipping at 0 *before* assigning keeps the optimum exact
    (clipping after a full assignment is not: the solver would have traded a good pair for a less
    negative one)."""
    sim = np.asarray(sim, dtype=np.float64).reshape(len(sim), -1)
    n_ref = sim.shape[0]
    if n_ref == 0:
        raise ValueError("the Multi-ID reward needs at least one reference")
    if sim.shape[1] == 0:                     # nothing found in the image: every reference scores 0
        return 0.0, []
    c = np.clip(sim, 0.0, None)
    rows, cols = linear_sum_assignment(c, maximize=True)
    keep = c[rows, cols] > 0                  # a zero pair is no match
    return float(c[rows, cols].sum() / n_ref), [(int(i), int(j))
                                                for i, j in zip(rows[keep], cols[keep])]

class MultiIDReward:
    """embedder.references(images, captions) -> (N, D) and embedder.subjects(image, captions) ->
    (M, D), both L2-normalized rows (M may be 0). Call with a group's images (they share the
    references)."""
    def __init__(self, embedder):
        self.embedder = embedder

    def __call__(self, images, refs, captions=None):
        """-> dict(score (B,) numpy, matches [[(ref, subject)]], sims [(N, M) numpy])."""
        r = torch.as_tensor(self.embedder.references(refs, captions)).float()              # (N, D)
        scores, matches, sims = [], [], []
        for im in images:
            g = torch.as_tensor(self.embedder.subjects(im, captions)).float().reshape(
                -1, r.shape[1])  # (M, D)
            s = (r @ g.T).numpy()                                                   # (N, M) cosines
            score, pairs = hungarian(s)
            scores.append(score)
            matches.append(pairs)
            sims.append(s)
        return dict(score=np.array(scores), matches=matches, sims=sims)

class CompositeReward:
    """Eq. 9. text(images, prompts) and aes(images, prompts) -> (B,) scores; multi_id: a
    MultiIDReward. Returns every term and the weighted total, (B,) numpy each, so a trainer can log
    the breakdown."""
    def __init__(self, text, aes, multi_id, weights=WEIGHTS["object"]):
        self.text, self.aes, self.multi_id, self.weights = text, aes, multi_id, dict(weights)

    def __call__(self, images, prompt, refs, captions=None):
        prompts = [prompt] * len(images)
        terms = {"text": np.asarray(self.text(images, prompts), dtype=np.float64),
                 "aes": np.asarray(self.aes(images, prompts), dtype=np.float64),
                 "id": self.multi_id(images, refs, captions)["score"]}
        terms["total"] = sum(self.weights[k] * terms[k] for k in ("text", "aes", "id"))
        return terms

# -----------------------------------------------------------------------------
# loading the real scorers: transformers models from a folder or a repo id, in one dtype on one
# device

CLIP_REPO = "openai/clip-vit-large-patch14"
# kind -> its name, the weights' repo, the processor they were trained with, divisor (None: cos)
PREFERENCE = {
    "hps": dict(name="HPS", repo="adams-story/HPSv2-hf", processor="openai/clip-vit-base-patch32",
                logit_norm=None),
    "pickscore": dict(name="PickScore", repo="yuvalkirstain/PickScore_v1",
                      processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", logit_norm=26.0),
}
DINO_REPO = "facebook/dinov2-base"
SAM2_REPO = "facebook/sam2.1-hiera-tiny"
DETECTORS = {"florence2": "florence-community/Florence-2-base",
             "owlv2": "google/owlv2-base-patch16-ensemble"}

# fp32 on every device: rewards become group-normalized advantages, and samples of one prompt often
# differ by ~1e-2 in cosine; bf16 keeps ~3 significant digits, noise of that order. The scorers are
# small next to FLUX (CLIP-L 0.4B, HPS/PickScore ViT-H 1B, Florence-2-B 0.23B, DINOv2-B 0.09B
# parameters).
DTYPE = torch.float32

def load_pretrained(cls, path, what, flag, repo=None, **kw):
    """cls.from_pretrained(path). path: a local folder or a Hugging Face repo id already in the
    local hub cache, both read from disk only (nothing is downloaded: `hf download REPO` first).
    Concrete classes (and trust_remote_code=False for Auto ones): no code from a model repo runs.
    Missing or unreadable weights -> RewardModelError, one line; repo: what to download, in the
    message, when path is a folder."""
    path = os.path.expanduser(path)
    local = os.path.isdir(path)
    # else a repo id
    folder = local or os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1
    how = (f"get it with `hf download {repo if folder and repo else path} "
           f"--local-dir DIR` and pass --{flag} DIR")
    if folder and not local:
        raise RewardModelError(f"{what}: {path} is not a model folder (nor a repo id); {how}")
    where = path if local else cached_repo(path)
    if where is None:   # never a download: an offline machine fails here at once, not after retries
        raise RewardModelError(
            f"{what}: {path} is not in the Hugging Face cache; `hf download {path}` (or {how})")
    try:
        return cls.from_pretrained(where, local_files_only=True, **kw)
    except (*D.FILE_ERRORS, ValueError, ImportError) as e:
        # no such file, offline cache miss, a missing backend,
        # a pickle
        raise RewardModelError(f"{what}: cannot load {path} ({D.file_problem(e)}); {how}") from None

def cached_repo(repo):
    """The local snapshot folder of a Hugging Face repo in the hub cache, or None; no network
    (a processor-only repo has no config.json, hence the other files)."""
    from huggingface_hub import try_to_load_from_cache
    for f in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return os.path.dirname(hit)
    return None

def reward_models(args, metrics=False):
    """[(what, folder or repo id, flag)]: every transformers model build_reward (metrics:
    build_metrics, which adds DINOv2 for DINO-I) loads for these flags."""
    if args.reward == "toy":
        return []
    kind = PREFERENCE[args.preference_kind]
    preference = args.preference or kind["repo"]
    out = [("CLIP", args.clip, "clip"), (kind["name"], preference, "preference")]
    if not has_processor(preference):              # ClipScorer takes a folder's own processor first
        out += [(f"{kind['name']} processor", args.preference_processor or kind["processor"],
                 "preference-processor")]
    if args.reward == "object":
        out += [(args.detector_kind, args.detector or DETECTORS[args.detector_kind], "detector")]
    if args.reward == "object" or metrics:
        out += [("DINOv2", args.dinov2, "dinov2")]
    if args.reward == "object" and args.sam2:
        out += [("SAM2", args.sam2, "sam2")]
    return out

def has_processor(folder):
    return any(os.path.isfile(os.path.join(os.path.expanduser(folder), f))
               for f in ("preprocessor_config.json", "processor_config.json"))

def check_reward_models(args, metrics=False):
    """Before any work: every reward model of these flags on this machine (a folder, or a repo id in
    the hub cache), or one RewardModelError listing each missing one with its download command.
    Instant, offline."""
    missing = missing_reward_models(args, metrics)
    if missing:
        raise RewardModelError(f"{len(missing)} reward model(s) missing: " + " | ".join(missing))

def missing_reward_models(args, metrics=False):
    """check_reward_models' findings: [each missing model with how to get it] (a command's
    pre-flight lists them with its other problems)."""
    missing = []
    for what, path, flag in reward_models(args, metrics):
        p = os.path.expanduser(path)
        # a folder, not a repo id
        if os.path.exists(p) or p.startswith((".", "/")) or p.count("/") != 1:
            if not os.path.isdir(p):
                missing.append(f"{what} ({path}: no such folder; --{flag} DIR)")
        elif cached_repo(p) is None:
            missing.append(f"{what} ({path}: not in the Hugging Face cache; `hf download "
                           f"{path}`, or --{flag} DIR)")
    if args.reward == "human":
        try:
            face_pack_folder(args.face_pack, args.face_root)
        except RewardModelError as e:
            missing.append(str(e))
    return missing

def load_model(cls, path, what, flag, repo, device):
    return load_pretrained(cls, path, what, flag, repo,
                           dtype=DTYPE).to(device).eval().requires_grad_(False)

def _rgb(images):
    return [im.convert("RGB") for im in images]

# -----------------------------------------------------------------------------
# CLIP-like scorers: R_text / CLIP-T, R_aes (HPSv2, PickScore), CLIP-I embeddings

class ClipScorer:
    """A transformers CLIPModel as a scorer of (image_i, prompt_i): cos, or with logit_norm the
    model's own logit (logit_scale.exp() * cos) / logit_norm. The processor: the model folder's own
    when it has one, else `processor` (HPSv2-hf and PickScore publish weights whose processor lives
    in another repo)."""
    def __init__(self, path, device="cpu", processor=None, logit_norm=None, what="CLIP",
                 flag="clip", repo=None):
        # imported here: the toy world needs no transformers
        from transformers import CLIPModel, CLIPProcessor
        self.device, self.logit_norm = torch.device(device), logit_norm
        self.model = load_model(CLIPModel, path, what, flag, repo, self.device)
        if processor is None or has_processor(path):
            self.processor = load_pretrained(CLIPProcessor, path, f"{what} processor", flag, repo)
        else:
            self.processor = load_pretrained(CLIPProcessor, processor, f"{what} processor",
                                             f"{flag}-processor")

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images [PIL], prompts [str] -> (B,) numpy."""
        inp = self.processor(text=list(prompts), images=_rgb(images), return_tensors="pt",
                             padding=True, truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings)
        out = self.model(**inp.to(self.device))
        scale = self.model.logit_scale.exp()
        cos = out.logits_per_image.diagonal() / scale   # (B,) image i vs prompt i, any transformers
        score = cos if self.logit_norm is None else cos * scale / self.logit_norm
        return score.float().cpu().numpy()

    @torch.no_grad()
    def embed_images(self, images):
        """images [PIL] -> (N, D) numpy, L2-normalized (CLIP-I)."""
        if not images:
            return np.zeros((0, self.model.config.projection_dim))
        px = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        e = self.model.get_image_features(pixel_values=px.to(self.device, DTYPE))
        e = getattr(e, "pooler_output", e)                      # transformers 5: an output object
        return F.normalize(e.float(), dim=-1).cpu().numpy()

class CLIPScore(ClipScorer):
    """R_text and CLIP-T: cos(image, prompt), CLIP ViT-L/14 (torchmetrics would report 100 *
    max(cos, 0))."""
    def __init__(self, path=CLIP_REPO, device="cpu"):
        super().__init__(path, device, what="CLIP (R_text, CLIP-T)", flag="clip", repo=CLIP_REPO)

class PreferenceScore(ClipScorer):
    """R_aes. kind "hps": HPSv2 as a CLIPModel, the plain cosine (HPSv2's img_score, ~0.25-0.35);
    "pickscore": PickScore_v1, logit_scale.exp() * cos / 26 (its published score ~18-23, divided as
    Flow-GRPO)."""
    def __init__(self, path=None, kind="hps", device="cpu", processor=None):
        k = PREFERENCE[kind]
        super().__init__(path or k["repo"], device, processor or k["processor"], k["logit_norm"],
                         what=f"{k['name']} (R_aes)", flag="preference", repo=k["repo"])

# -----------------------------------------------------------------------------
# object subjects: DINOv2 embeddings, a phrase-grounding detector, optional SAM2 masks

class DinoEmbedder:
    """images -> (N, D) DINOv2 CLS tokens (last_hidden_state[:, 0], after the final layer norm),
    L2-normalized. Object subjects for R_id, and DINO-I."""
    def __init__(self, path=DINO_REPO, device="cpu"):
        from transformers import AutoImageProcessor, Dinov2Model
        self.device = torch.device(device)
        self.model = load_model(Dinov2Model, path, "DINOv2", "dinov2", DINO_REPO, self.device)
        self.processor = load_pretrained(AutoImageProcessor, path, "DINOv2 processor", "dinov2",
                                         DINO_REPO, trust_remote_code=False)

    @torch.no_grad()
    def __call__(self, images):
        if not images:
            return np.zeros((0, self.model.config.hidden_size))
        px = (self.processor(images=_rgb(images), return_tensors="pt")[
            "pixel_values"].to(self.device, DTYPE))
        cls = self.model(pixel_values=px).last_hidden_state[:, 0]                       # (N, D)
        return F.normalize(cls.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def patches(self, images, side=224):
        """images -> (N, g, g, D) unit patch tokens, g = side // patch size: each whole image
        squeezed to side x side (no center crop, unlike __call__), so patch (i, j) covers rows
        i/g..(i+1)/g and columns j/g..(j+1)/g of it. DINOv2's dense features, for correspondences
        (data.py correspond); the model interpolates its position embeddings to any side."""
        p = self.model.config.patch_size
        if side % p:
            raise InputError(f"--patch-side {side}: must be a multiple of DINOv2's patch size {p}")
        g = side // p
        px = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize(
            (side, side), Image.BICUBIC),
            np.float32)) for im in images]).permute(0, 3, 1, 2) / 255
        mean, std = (torch.tensor(getattr(self.processor, k)).view(1, 3, 1, 1)
                     for k in ("image_mean", "image_std"))
        tokens = self.model(pixel_values=((px - mean)
                                          / std).to(self.device,
                                                    DTYPE)).last_hidden_state  # (N, 1+g*g, D)
        return (
            F.normalize(tokens[:, 1:].float(), dim=-1).reshape(len(images), g, g, -1).cpu().numpy())

def clip_box(box, size):
    """(x0, y0, x1, y1) pixels -> clipped to the (W, H) image, or None when under a pixel wide or
    high (detectors emit such: OWLv2 boxes reach into its padding, a confused Florence-2 repeats one
    <loc_>)."""
    W, H = size
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = min(max(x0, 0.0), W), min(max(x1, 0.0), W)
    y0, y1 = min(max(y0, 0.0), H), min(max(y1, 0.0), H)
    return (x0, y0, x1, y1) if x1 - x0 >= 1 and y1 - y0 >= 1 else None

def _need_phrases(phrases):
    if not phrases:
        raise ValueError("object subjects are found by their captions: give each reference a "
                         "caption (the manifest's \"captions\")")

class Florence2Detector:
    """detect(image, phrases) -> per phrase [(box (x0, y0, x1, y1) pixels, score)]: Florence-2's
    phrase grounding, one prompt per phrase (batched), every box it grounds. Florence-2 gives no
    confidences: each score is 1.0."""
    task = "<CAPTION_TO_PHRASE_GROUNDING>"

    def __init__(self, path=DETECTORS["florence2"], device="cpu", max_new_tokens=256, num_beams=3):
        from transformers import Florence2ForConditionalGeneration, Florence2Processor
        self.device, self.max_new_tokens, self.num_beams = (torch.device(device), max_new_tokens,
                                                            num_beams)
        repo = DETECTORS["florence2"]
        self.model = load_model(Florence2ForConditionalGeneration, path, "Florence-2", "detector",
                                repo, self.device)
        self.processor = load_pretrained(Florence2Processor, path, "Florence-2 processor",
                                         "detector", repo)

    @torch.no_grad()
    def detect(self, image, phrases):
        _need_phrases(phrases)
        image = image.convert("RGB")
        inp = self.processor(text=[self.task + p for p in phrases], images=[image] * len(phrases),
                             return_tensors="pt", padding=True).to(self.device)
        ids = self.model.generate(**inp, max_new_tokens=self.max_new_tokens,
                                  num_beams=self.num_beams)
        out = []
        for text in self.processor.batch_decode(ids, skip_special_tokens=False):
            r = self.processor.post_process_generation(
                text, task=self.task, image_size=image.size)[self.task]
            out.append([(b, 1.0) for b in (clip_box(b, image.size) for b in r["bboxes"]) if b])
        return out

class Owlv2Detector:
    """detect(image, phrases) -> per phrase [(box, score)]: OWLv2, the phrase's best box
    (its own logit, not the box's best phrase) when its score (sigmoid) passes threshold; else
    none."""
    def __init__(self, path=DETECTORS["owlv2"], device="cpu", threshold=0.1):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor
        self.device, self.threshold = torch.device(device), threshold
        self.model = load_model(Owlv2ForObjectDetection, path, "OWLv2", "detector",
                                DETECTORS["owlv2"], self.device)
        self.processor = load_pretrained(Owlv2Processor, path, "OWLv2 processor", "detector",
                                         DETECTORS["owlv2"])

    @torch.no_grad()
    def detect(self, image, phrases):
        _need_phrases(phrases)
        image = image.convert("RGB")
        inp = self.processor(text=[list(phrases)], images=image, return_tensors="pt",
                             truncation=True)
        out = self.model(**inp.to(self.device))
        # every box in pixels (threshold -1 keeps all: scores are sigmoids); the processor knows
        # OWLv2's padding
        boxes = self.processor.post_process_grounded_object_detection(
            out, threshold=-1.0, target_sizes=[(image.height, image.width)])[0]["boxes"]    # (P, 4)
        score, best = out.logits[0].sigmoid().max(0)                               # (Q,) per phrase
        found = []
        for s, k in zip(score.tolist(), best.tolist()):
            b = clip_box(boxes[k].tolist(), image.size) if s > self.threshold else None
            found.append([(b, s)] if b else [])
        return found

class Sam2Masker:
    """masks(image, boxes) -> (K, H, W) bool: SAM2 prompted with each box, one mask each
    (needs torchvision: transformers' Sam2 image processor does)."""
    def __init__(self, path, device="cpu"):
        from transformers import Sam2Model, Sam2Processor
        self.device = torch.device(device)
        self.model = load_model(Sam2Model, path, "SAM2", "sam2", SAM2_REPO, self.device)
        self.processor = load_pretrained(Sam2Processor, path, "SAM2 processor", "sam2", SAM2_REPO)

    @torch.no_grad()
    def masks(self, image, boxes):
        inp = self.processor(images=image.convert("RGB"), input_boxes=[[list(b) for b in boxes]],
                             return_tensors="pt").to(self.device)
        out = self.model(**inp, multimask_output=False)          # pred_masks (1, K, 1, h, w) logits
        masks = self.processor.post_process_masks(out.pred_masks.cpu(),
                                                  inp["original_sizes"].cpu())[0]
        return masks[:, 0].numpy()                               # (K, H, W) bool, the image's size

def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0

class ObjectEmbedder:
    """The Multi-ID embedder of located subjects. references: embed(each reference image, whole);
    subjects: the detector's boxes for every reference's caption, near-duplicates dropped
    (IoU > iou_max: the higher score stays, so two captions grounding one object give one subject),
    each box cropped (with sam, its mask on white), embedded. embed: images -> (N, D) unit rows
    (DinoEmbedder, ClipScorer.embed_images); the detector may be a FaceEmbedder (CLIP-I / DINO-I of
    faces)."""
    def __init__(self, detector, embed, sam=None, iou_max=0.7):
        self.detector, self.embed, self.sam, self.iou_max = detector, embed, sam, iou_max

    def boxes(self, image, captions):
        found = [f for per_phrase in self.detector.detect(image, captions) for f in per_phrase]
        keep = []
        for box, _ in sorted(found, key=lambda f: -f[1]):    # stable: ties keep the captions' order
            if all(iou(box, k) <= self.iou_max for k in keep):
                keep.append(box)
        return keep

    def references(self, images, captions=None):
        return self.embed(_rgb(images))

    def subjects(self, image, captions=None):
        image = image.convert("RGB")
        boxes = self.boxes(image, captions)
        masks = self.sam.masks(image, boxes) if self.sam is not None and boxes else None
        a, crops = np.asarray(image), []
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            # every pixel the box touches
            x0, y0, x1, y1 = int(x0), int(y0), math.ceil(x1), math.ceil(y1)
            c = a[y0:y1, x0:x1]
            if masks is not None:                                      # background -> white
                c = np.where(masks[k][y0:y1, x0:x1, None], c, 255).astype(np.uint8)
            crops.append(Image.fromarray(c))
        return self.embed(crops)                                       # (M, D); M = 0 if none found

# -----------------------------------------------------------------------------
# human subjects: insightface (SCRFD detector + ArcFace embedding), from a local model pack only

def face_pack_folder(pack, root=None):
    """The folder of an insightface pack holding its *.onnx files, or RewardModelError saying how to
    get it."""
    root = os.path.expanduser(root or "~/.insightface")             # insightface's own default root
    folder = pack if os.path.isdir(pack) else os.path.join(root, "models", pack)
    if not glob.glob(os.path.join(folder, "*.onnx")):
        raise RewardModelError(
            f"face models: no *.onnx in {folder} (insightface pack {pack}); download {pack}.zip "
            f"from the insightface model zoo (github.com/deepinsight/insightface, "
            "python-package/README; non-commercial licence), unzip it so the .onnx files sit "
            f"directly in {folder} (move them up if the zip nests a {pack}/ folder), or "
            "pass --face-root / --face-pack")
    return folder

def load_face_app(pack="antelopev2", root=None, device="cpu", det_size=640):
    """insightface FaceAnalysis on <root>/models/<pack>/*.onnx (or pack = a folder), detection +
    recognition. Checked before insightface runs: given a missing pack it would try to download
    it."""
    root = os.path.expanduser(root or "~/.insightface")           # insightface's own default root
    folder = face_pack_folder(pack, root)
    import requests
    from insightface.app import FaceAnalysis
    # its errors derive from Exception only
    from onnxruntime.capi import onnxruntime_pybind11_state as ort
    cuda = torch.device(device).type == "cuda"
    try:   # name = the folder itself: insightface loads it and never reaches its downloader
        app = FaceAnalysis(name=folder, root=root, allowed_modules=["detection", "recognition"],
                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else
                           ["CPUExecutionProvider"])
        app.prepare(ctx_id=(torch.device(device).index or 0) if cuda else -1,
                    det_size=(det_size, det_size))
    except (AssertionError, OSError, requests.RequestException,   # no detector among the files, I/O
            # a corrupt or partial .onnx
            ort.InvalidProtobuf, ort.InvalidGraph, ort.NoSuchFile, ort.Fail) as e:
        raise RewardModelError(f"face models: insightface could not load {folder} "
                               f"({type(e).__name__}{': ' + str(e)[:200] if str(e) else ''}); "
                               "check the pack's files") from None
    return app

class FaceEmbedder:
    """The Multi-ID embedder of human subjects. references: the largest face of each reference image
    (none: a zero vector, which matches nothing); subjects: every face found, its normed_embedding.
    app: anything with .get(bgr uint8 (H, W, 3)) -> faces with .bbox (x0, y0, x1, y1) and
    .normed_embedding; default insightface."""
    dim = 512                                                      # ArcFace, every insightface pack

    def __init__(self, pack="antelopev2", root=None, device="cpu", app=None):
        self.app = app if app is not None else load_face_app(pack, root, device)

    def faces(self, image):
        # RGB -> BGR
        return self.app.get(np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1]))

    def references(self, images, captions=None):
        area = lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])
        best = [max(self.faces(im), key=area, default=None) for im in images]
        dim = next((len(f.normed_embedding) for f in best if f is not None), self.dim)
        return np.stack([np.zeros(dim) if f is None else np.asarray(f.normed_embedding, np.float64)
                         for f in best])

    def subjects(self, image, captions=None):
        e = [np.asarray(f.normed_embedding, np.float64) for f in self.faces(image)]
        return np.stack(e) if e else np.zeros((0, self.dim))

    def detect(self, image, phrases=None):
        """The detector interface for CLIP-I / DINO-I crops: one group, every face (captions are not
        used)."""
        return [[(b, float(getattr(f, "det_score", 1.0)))
                 for f in self.faces(image) if (b := clip_box(f.bbox, image.size))]]

# -----------------------------------------------------------------------------
# building a reward from command-line flags (train_rl.py calls add_reward_args and build_reward)

def add_reward_args(p):
    g = p.add_argument_group("reward") if isinstance(p, argparse.ArgumentParser) else p
    g.add_argument("--reward", default="toy", choices=["toy", "human", "object"],
                   help="which subjects R_id scores")
    for term in ("text", "aes", "id"):
        g.add_argument(f"--w-{term}", type=float, default=None,
                       help=f"w_{term} (default: the paper's, per kind)")
    g.add_argument("--clip", default=CLIP_REPO, help="R_text / CLIP-T: CLIP folder or repo id")
    g.add_argument("--preference", default=None,
                   help="R_aes folder or repo id (default: the kind's repo)")
    g.add_argument("--preference-kind", default="hps", choices=sorted(PREFERENCE))
    g.add_argument("--preference-processor", default=None,
                   help="processor folder when --preference has none (default: "
                   "the kind's processor repo)")
    g.add_argument("--face-pack", default="antelopev2",
                   help="insightface pack name (or its folder)")
    g.add_argument("--face-root", default=None,
                   help="insightface root holding models/<pack>/ (default ~/.insightface)")
    g.add_argument("--detector", default=None,
                   help="object detector folder or repo id (default: the kind's repo)")
    g.add_argument("--detector-kind", default="florence2", choices=sorted(DETECTORS))
    g.add_argument("--dinov2", default=DINO_REPO,
                   help="DINOv2 folder or repo id (object subjects, DINO-I)")
    g.add_argument("--sam2", default=None,
                   help="SAM2 folder or repo id: mask each object crop (default: off)")
    return g

def reward_weights(args):
    # the toy's subjects are objects
    w = dict(WEIGHTS["human" if args.reward == "human" else "object"])
    for k in w:
        if getattr(args, f"w_{k}") is not None:
            w[k] = getattr(args, f"w_{k}")
    return w

def build_subjects(args, device):
    """-> (the R_id embedder, the subject detector for CLIP-I / DINO-I crops, a DinoEmbedder or
    None)."""
    if args.reward == "human":
        faces = FaceEmbedder(args.face_pack, args.face_root, device)
        return faces, faces, None
    cls = Florence2Detector if args.detector_kind == "florence2" else Owlv2Detector
    detector = cls(args.detector or DETECTORS[args.detector_kind], device)
    dino = DinoEmbedder(args.dinov2, device)
    sam = Sam2Masker(args.sam2, device) if args.sam2 else None
    return ObjectEmbedder(detector, dino, sam), detector, dino

def build_reward(args, device="cpu"):
    """-> CompositeReward for args.reward: faces + CLIP + HPS, or detector + DINOv2 + CLIP + HPS
    (the toy world's reward, --reward toy, is toy.reward_for, which refuses a folder of the first
    toy world)."""
    if args.reward == "toy":
        raise ValueError("the toy reward is toy.reward_for (toy.py sits above this file)")
    subjects = build_subjects(args, device)[0]         # first: a missing face pack fails in no time
    clip = CLIPScore(args.clip, device)
    pref = PreferenceScore(args.preference, args.preference_kind, device, args.preference_processor)
    return CompositeReward(clip, pref, MultiIDReward(subjects), reward_weights(args))

# -----------------------------------------------------------------------------
# evaluation: the paper's metrics over a manifest and a folder of generated images

def build_metrics(args, device="cpu"):
    """-> fn(images, prompt, refs, captions) -> {metric: (B,) numpy}: the paper's metrics with the
    real models."""
    if args.reward == "toy":
        raise InputError("--reward toy: score toy images with `python toy.py eval` (same options)")
    id_embedder, detector, dino = build_subjects(args, device)
    if dino is None:                                        # human subjects: DINOv2 for DINO-I only
        dino = DinoEmbedder(args.dinov2, device)
    clip = CLIPScore(args.clip, device)
    pref = PreferenceScore(args.preference, args.preference_kind, device, args.preference_processor)
    ids = {"CLIP-I": MultiIDReward(ObjectEmbedder(detector, clip.embed_images)),
           "DINO-I": MultiIDReward(ObjectEmbedder(detector, dino))}
    if args.reward == "human":
        ids["Face-Sim"] = MultiIDReward(id_embedder)
    aes = PREFERENCE[args.preference_kind]["name"]

    def metrics(images, prompt, refs, captions):
        out = {"CLIP-T": clip(images, [prompt] * len(images)),
               aes: pref(images, [prompt] * len(images))}
        out.update({k: m(images, refs, captions)["score"] for k, m in ids.items()})
        return out
    return metrics

def image_name(rec, i):
    # the generated image of the i-th record: its id, else its position (sample.py --out-dir writes
    # them so)
    return f"{rec['id']}.png" if rec.get("id") is not None else f"{i:06d}.png"

def evaluate(args, metrics):
    """Score DIR/<id>.png (or <i:06d>.png) of each manifest record with metrics (build_metrics', or
    the toy's): a table on stdout, every record's scores in the JSON. -> exit status (1 when nothing
    could be scored). A record whose image name another record already has (an id given twice, an id
    "000003" and the fourth record without one) is a bad record: two records are never scored
    against one image. An image whose size is not the one most images have is scored and noted."""
    if not os.path.isdir(args.images):
        raise InputError(f"{args.images}: no such folder (the generated images)")
    records, problems = D.read_manifest(args.manifest)
    root = os.path.dirname(os.path.abspath(args.manifest))
    rows, missing, bad = [], [], [dict(line=line, why=why) for line, _, why in problems]
    named = {}                                       # image file name -> the line that has it
    checked = D.validate_all(records, root, deep=False)
    out = args.out or os.path.join(args.images, "metrics.json")
    reads = [p for i, (_, rec, _) in enumerate(checked) if rec
             for p in [os.path.join(args.images, image_name(rec, i)), *rec["refs"]]]
    D.check_output([out], [args.manifest, *reads], args.force)
    for i, (line, rec, why) in enumerate(tqdm(checked, desc="eval", disable=len(records) < 2)):
        if rec is None:
            bad.append(dict(line=line, why="; ".join(f"{f}: {w}" for f, w in why)))
            continue
        if args.reward == "object" and not rec.get("captions"):
            bad.append(dict(line=line,
                            why="captions: the object reward finds subjects by their captions"))
            continue
        name = image_name(rec, i)
        if name in named:
            bad.append(dict(line=line, why=f"id: its image {name} is already line {named[name]}'s"))
            continue
        named[name] = line
        path = os.path.join(args.images, name)
        try:
            image = load_image(path)
        except InputError as e:
            missing.append(dict(line=line, image=path, why=str(e)))
            continue
        try:
            refs = [load_image(p) for p in rec["refs"]]
        except InputError as e:                      # a truncated reference: only headers were read
            bad.append(dict(line=line, why=str(e)))
            continue
        scores = metrics([image], rec["prompt"], refs, rec.get("captions"))
        rows.append(dict(line=line, id=rec.get("id"), image=path, size=list(image.size),
                         **{k: float(v[0]) for k, v in scores.items()}))
    notes = size_notes(rows)
    names = [k for k in rows[0] if k not in ("line", "id", "image", "size")] if rows else []
    mean = {k: float(np.mean([r[k] for r in rows])) for k in names}
    std = {k: float(np.std([r[k] for r in rows])) for k in names}
    report = dict(manifest=args.manifest, images=args.images, reward=args.reward, n=len(rows),
                  mean=mean, std=std, missing=missing, bad=bad, notes=notes, records=rows)
    write_atomic(out, lambda f: f.write(json.dumps(report, indent=1).encode()))
    print("| metric | mean | std | n |\n|---|---|---|---|")
    for k in names:
        print(f"| {k} | {mean[k]:.4f} | {std[k]:.4f} | {len(rows)} |")
    if notes:
        n = notes[0]
        print(f"note: {len(notes)} generated images differ in size from most (first: {n['image']} "
              f"is {n['size'][0]}x{n['size'][1]}, most are {n['expected'][0]}x{n['expected'][1]}); "
              f"scored all the same, listed in the JSON's notes", file=sys.stderr)
    print(f"scored {len(rows)} records; {len(missing)} generated images missing or unreadable; "
          f"{len(bad)} bad records; wrote {out}", file=sys.stderr)
    return 0 if rows else 1

def size_notes(rows):
    # the scored images whose size is not the one most have: one run's images share a size, so
    # another is a sign of images from elsewhere in the folder (a target sizes nothing: generations
    # need not be its size)
    common = list(Counter(tuple(r["size"]) for r in rows).most_common(1)[0][0]) if rows else None
    return [dict(line=r["line"], image=r["image"], size=r["size"], expected=common) for r in rows
            if r["size"] != common]

def add_eval_args(e):
    # the options of `rewards.py eval` (and of `toy.py eval`, which reads the same layout)
    e.add_argument("--manifest", required=True)
    e.add_argument("--images", required=True, help="folder of generated images: <id>.png or "
                   "<record index:06d>.png (sample.py writes a seed's into OUT_DIR/SEED)")
    e.add_argument("--out", default=None, help="metrics JSON (default IMAGES/metrics.json)")
    e.add_argument("--device", default=None, help="default: cuda if available")
    D.add_force(e)
    add_reward_args(e)
    return e

def eval_parser(description):
    return add_eval_args(CL.Parser(description=description))

def main(argv=None):
    p = CL.Parser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="eval")
    add_eval_args(sub.add_parser(
        "eval", help="the paper's metrics over a manifest and a folder of generated images",
        description=__doc__))
    args = p.parse_args(argv)
    try:
        # the pre-flight: the manifest, the images' folder and every model, all named at once before
        # any work
        pf = D.Preflight()
        pf.file("--manifest", args.manifest)
        pf.folder("--images", args.images)
        pf.need(args.reward != "toy",
                "--reward toy: score toy images with `python toy.py eval` (same options)")
        pf.problems += missing_reward_models(args, metrics=True)
        pf.check()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return evaluate(args, build_metrics(args, device))
    except (D.DataError, InputError, RewardModelError, *D.FILE_ERRORS) as e:
        # user mistakes: one line
        print(f"error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())

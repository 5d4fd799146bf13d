"""
The test suite: `python -m pytest -q test_all.py` (CPU, fp32, no downloads; about a minute or two).

Tests are behavioural and compare against independent references: diffusers' FluxTransformer2DModel
and AutoencoderKL loaded through diffusers' own BFL->diffusers converters, torch.distributions,
hand-computed values. No test needs real weights: tiny random configs and synthetic checkpoints with
the official names.

One section per source file, in the layout order (the libraries, then the scripts, then the project
as a whole); the helpers used by several sections come first.
"""

import argparse
import ast
import copy
import errno
import glob
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import replace

import huggingface_hub.constants as HC
import huggingface_hub.file_download as FD
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as from_bytes, load_file, save_file
from scipy import ndimage
from torch.distributions import Categorical, kl_divergence

import bench
import cache
import curate as C
import data as D
import dataset as DS
import encoders as EN
import experiments.ablation as EA
import experiments.world as EW
import export_lora
import flux2 as F2
import losses as LS
import model as M
import moe_lora as ML
import plot_log
import rewards as R
import runs
import sample as S
import sampling as SM
import toy
import train_rl as RL
import train_sft as TS
import training as TR
import weights as WT
from benchmarks import gpu as BG, measure as BME, memory as BMEM
from benchmarks.memory import flash_like_attention
from data import InputError, load_image, preprocess_ref
from losses import dice_loss, scal_loss
from reliability import badinput as B
from reliability import outputs as RO
from reliability.faults import flip_bit
from sample import main
from sampling import denoise, euler_step, get_schedule, sde_step

torch.set_num_threads(min(2, torch.get_num_threads()))

# ---- shared fixtures: helpers used by several sections ----

def tiny_cfg(**kw):
    base = dict(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                num_heads=4,
                depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=True)
    base.update(kw)
    return M.FluxConfig(**base)

def randomize(module, seed=0):
    # every parameter away from its init (RMSNorm scales near 1, biases non-zero): a swapped or
    # unused tensor cannot hide behind a default value
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * (0.02 if p.ndim > 1 else 0.1)
                    + (1.0 if n.endswith((".scale", "norm.weight")) or
                       (".norm" in n and n.endswith(".weight")) else 0.0))
    return module

@pytest.fixture(scope="session")
def diffusers_oracle():
    """diffusers' FluxTransformer2DModel plus its own BFL->diffusers converter, generalized to any
    width (diffusers 0.42 hard-codes inner_dim = 3072 in it)."""
    pytest.importorskip("diffusers")
    import diffusers.loaders.single_file_utils as sfu
    from diffusers import FluxTransformer2DModel
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src, "diffusers changed its converter; update this patch"
    src = src.replace("inner_dim = 3072", 'inner_dim = checkpoint["img_in.weight"].shape[0]')
    ns = dict(vars(sfu))
    exec(src, ns)
    return FluxTransformer2DModel, ns["convert_flux_transformer_checkpoint_to_diffusers"]

def to_diffusers(cfg, ours, oracle):
    FluxTransformer2DModel, convert = oracle
    ref = FluxTransformer2DModel(patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth,
                                 num_single_layers=cfg.depth_single_blocks,
                                 attention_head_dim=cfg.hidden_size // cfg.num_heads,
                                 num_attention_heads=cfg.num_heads,
                                 joint_attention_dim=cfg.context_in_dim,
                                 pooled_projection_dim=cfg.vec_in_dim,
                                 guidance_embeds=cfg.guidance_embed,
                                 axes_dims_rope=tuple(cfg.axes_dim)).eval()
    sd = dict(ours.state_dict())
    ref.load_state_dict(convert(sd), strict=True)
    assert not sd, f"our model has keys diffusers' converter does not know: {sorted(sd)}"
    return ref

DEMO = ["assets/orange_circle.png", "assets/blue_square.png"]          # the README's quick start

def random_toy(folder):
    # the toy architecture with random weights (seed 0), as a checkpoint folder: a generator that
    # reads nothing
    cfg = M.get_config("toy")
    folder.mkdir()
    torch.manual_seed(0)
    save_file(M.Flux(cfg).state_dict(), folder / "flux.safetensors")
    save_file(EN.ByteTextEncoder(cfg).state_dict(), folder / "text_encoder.safetensors")
    return folder

def tiny_inputs(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, ids = (M.pack(torch.randn(B, cfg.in_channels // 4, 6, 4, generator=g)),
                M.grid_ids(3, 2, batch=B))
    refs = [M.pack(torch.randn(B, cfg.in_channels // 4, 4, 4, generator=g))]
    rids = M.ref_ids((3, 2), [(2, 2)], batch=B)
    return (img, ids, torch.randn(B, 5, cfg.context_in_dim, generator=g), torch.zeros(B, 5, 3),
            torch.rand(B, generator=g), torch.randn(B, cfg.vec_in_dim, generator=g),
            torch.full((B,), 3.5)), \
        dict(ref_img=refs, ref_img_ids=rids)

def read_jsonl(path):
    return [json.loads(line) for line in open(path)]

@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return toy.write_world(str(out), 12, seed=0, subjects=(2, 3))

def toy_reference(k, ref_size=16):
    # a reference of the toy world: a view of training identity k (PIL)
    view = toy.view(toy.draw_identity("train", k), np.random.default_rng(k), ref_size)[0]
    return Image.fromarray(view)

def solid_png(path, size, colour=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return os.path.basename(path)

@pytest.fixture
def bad_manifest(tmp_path):
    """A manifest with one of each bad case; -> (path, {line: field}) of the expected problems."""
    root = tmp_path / "data"
    root.mkdir()
    solid_png(root / "t.png", (32, 32))
    solid_png(root / "r.png", (16, 16))
    solid_png(root / "m.png", (32, 32), 255, "L")
    solid_png(root / "small.png", (16, 16), 255, "L")
    solid_png(root / "empty.png", (32, 32), 0, "L")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        root / "big.png")
    blob = (root / "big.png").read_bytes()
    (root / "trunc.png").write_bytes(blob[: len(blob) // 2])
    (root / "zero.png").write_bytes(b"")
    solid_png(tmp_path / "outside.png", (16, 16))
    os.symlink(tmp_path / "outside.png", root / "link.png")
    good = dict(target="t.png", prompt="a thing", refs=["r.png"], masks=["m.png"])
    lines = [
        (json.dumps(good), None),
        (json.dumps(dict(good, refs=["nope.png"])), "refs[0]"),                      # missing file
        (json.dumps(dict(good, target="trunc.png", masks=None)), "target"),        # truncated image
        (json.dumps(dict(good, refs=["zero.png"])), "refs[0]"),                    # zero-byte file
        (json.dumps(dict(good, masks=["small.png"])), "masks[0]"),          # mask of the wrong size
        (json.dumps(dict(good, masks=["empty.png"])), "masks[0]"),                 # empty mask
        (json.dumps(dict(good, refs=["r.png", "r.png"])), "masks"),                # 2 refs, 1 mask
        (json.dumps(dict(good, refs=["../outside.png"])), "refs[0]"),             # escapes the root
        (json.dumps(dict(good, target=str(root / "t.png"))), "target"),            # absolute path
        # not UTF-8 (latin-1 byte)
        ('{"target": "t.png", "prompt": "caf\xe9", "refs": ["r.png"]}', "record"),
        ('{"target": "t.png", "prompt": "a thing", "refs": ["r.png"]', "record"),  # invalid JSON
        (json.dumps(dict(good, refs=["link.png"])), "refs[0]"),            # symlink out of the root
        # a point outside [0, 1]
        (json.dumps(dict(good, points=[[[0.1, 0.2, 1.5, 0.1]]])), "points[0][0]"),
        ("", None),                                                           # blank lines are fine
        (json.dumps(dict(good, refs=[], masks=[])), "refs"),
        (json.dumps(good), None),
    ]
    data = b"".join(text.encode("latin-1" if "\xe9" in text else "utf-8") + b"\n"
                    for text, _ in lines)
    (root / "m.jsonl").write_bytes(data)
    return str(root / "m.jsonl"), {n: f for n, (_, f) in enumerate(lines, 1) if f}

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy data set and a random toy base in the folder format stage base writes (and sample.py
    reads)."""
    root = tmp_path_factory.mktemp("toyrun")
    manifest = toy.write_world(str(root / "data"), 16, seed=0, subjects=(2, 3))
    cfg = M.get_config("toy")
    torch.manual_seed(0)
    (root / "base").mkdir()
    save_file(M.Flux(cfg).state_dict(), str(root / "base" / "flux.safetensors"))
    save_file(EN.ByteTextEncoder(cfg).state_dict(), str(root / "base" / "text_encoder.safetensors"))
    return root, manifest

def sft(out, manifest, *extra):
    TS.main(["--data", manifest, "--out", str(out), "--batch-size", "2", "--log-every", "1",
             "--warmup", "1", "--rank", "4", *extra])

def read_log(out):
    return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]

def unit(*v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)

LETTERS = "abcdefghijklmnopqrstuvwxyz"

def images(n, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            for _ in range(n)]

@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    d = str(tmp_path_factory.mktemp("dino"))
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(d)
    BitImageProcessor(size={"shortest_edge": 32},
                      crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d

def florence_dir(d, answer):
    # a tiny random Florence-2 whose saved generation config forces `answer` (bigram sequence
    # biases), so the real generate -> batch_decode -> post_process_generation path yields known
    # boxes
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor)
    os.makedirs(d, exist_ok=True)
    words = ["Locate", "the", "phrases", "in", "caption:", "a", "red", "circle", "blue", "square"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in words + list(LETTERS + ":"):
        vocab.setdefault(w, len(vocab))
        vocab.setdefault("\u0120" + w, len(vocab))
    with open(f"{d}/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{d}/merges.txt", "w") as f:
        f.write("#version: 0.2\n")
    tok = BartTokenizer(f"{d}/vocab.json", f"{d}/merges.txt",
                        extra_special_tokens={"image_token": "<image>"})
    tok.add_tokens([f"<loc_{i}>" for i in range(1000)])
    # a 16 px image: one 4x4 stage of patches + 1 pooled token = 17 image tokens
    ip = CLIPImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16},
                            do_center_crop=False, image_seq_length=17)
    Florence2Processor(ip, tok,
                       post_processor_config={"phrase_grounding": {"banned_grounding_tokens": []}}
                       ).save_pretrained(d)
    torch.manual_seed(2)
    model = Florence2ForConditionalGeneration(Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tok), max_position_embeddings=320,
                         encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
                         encoder_attention_heads=1, decoder_attention_heads=1, d_model=16,
                         bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3],
                           patch_prenorm=[False], embed_dim=[16], num_heads=[1], num_groups=[1],
                           window_size=4, projection_dim=16),
        image_token_id=tok.image_token_id))
    seq = [2, 0] + tok.convert_tokens_to_ids(answer) + [2]
    assert len(set(seq[1:-1])) == len(seq) - 2 and tok.unk_token_id not in seq
    model.generation_config.sequence_bias = [[[a, b], 100.0] for a, b in zip(seq, seq[1:])]
    model.save_pretrained(d)
    return d

@pytest.fixture(scope="module")
def flo_dir(tmp_path_factory):
    return florence_dir(str(tmp_path_factory.mktemp("florence")), [
        "a", "\u0120red", "\u0120circle", "<loc_100>", "<loc_200>", "<loc_500>", "<loc_600>"])

class Face:
    def __init__(self, bbox, emb):
        self.bbox, self.normed_embedding, self.det_score = (np.asarray(bbox, np.float32),
                                                            unit(*emb), 0.9)

def rl(out, manifest, base, *extra):
    # unguided unless a test asks (the toy preset's default guides, 3 forwards a velocity: guidance
    # is tested apart)
    RL.main(["--data", manifest, "--init", str(base), "--out", str(out), "--rank", "4", "--steps",
             "4", "--window", "2", "--tau", "1", "--stride", "1", "--group", "4", "--lr", "1e-2",
             "--ref-guidance", "1", "--text-guidance", "1", *extra])

WHITE, RED = (255, 255, 255), (255, 0, 0)

def toy_weights(kind):
    """kind -> (a fresh model to load into, the file's tensors, its header, another architecture's
    tensors, load)."""
    cfg = M.get_config("toy")
    small = dict(hidden_size=64, axes_dim=(4, 6, 6))
    if kind == "dit":
        return (M.Flux(cfg), M.Flux(cfg).state_dict(), None,
                M.Flux(M.get_config("toy", **small)).state_dict(), WT.load_state_dict_strict)
    if kind == "ae":
        ae = M.AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, factor=2)
        return (EN.AutoEncoder(ae), EN.AutoEncoder(ae).state_dict(), None,
                EN.AutoEncoder(replace(ae, z_channels=8)).state_dict(), WT.load_state_dict_strict)
    f, other = M.Flux(cfg), M.Flux(M.get_config("toy", **small))
    acfg = ML.inject(f, rank=4)
    ML.inject(other, rank=4)
    for _, m in ML.adapters(f):
        torch.nn.init.normal_(m.up.weight)
    meta = {"multicrafter_adapter": json.dumps(acfg)}
    return (M.Flux(cfg), ML.adapter_state_dict(f), meta, ML.adapter_state_dict(other),
            ML.load_adapter)

def flux_call_args(cfg, B=1, h=8, w=6, refs=((4, 4),), L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = cfg.in_channels // 4
    img = M.pack(torch.randn(B, C, h, w, generator=g))
    ref_img = [M.pack(torch.randn(B, C, rh, rw, generator=g)) for rh, rw in refs]
    return (img,
            M.grid_ids(h // 2, w // 2, batch=B), torch.randn(B, L, cfg.context_in_dim, generator=g),
            torch.zeros(B, L, 3), torch.rand(B, generator=g),
            torch.randn(B, cfg.vec_in_dim, generator=g), torch.full((B,), 3.5), ref_img,
            M.ref_ids((h // 2, w // 2), [(rh // 2, rw // 2) for rh, rw in refs], batch=B))

def adapter_of(folder):
    return load_file(os.path.join(folder, "adapter.safetensors"))

def multi(root, *extra):
    # stage multi on the toy base, one checkpoint a step
    return ["--stage", "multi", "--init", str(root / "base"), "--lambda-attn", "0.3",
            "--ckpt-every", "1", "--lr", "1e-2", *extra]

def sft_cli(out, manifest, *extra):
    return TS.cli(["--data", manifest, "--out", str(out), "--batch-size", "2", "--log-every", "1",
                   "--warmup", "1", "--rank", "4", *extra])

def rl_cli(out, manifest, base, *extra):
    return RL.cli(["--data", manifest, "--init", str(base), "--out", str(out), "--rank", "4",
                   "--steps", "2", "--window", "1", "--group", "2", "--minibatches", "1", "--lr",
                   "1e-2", "--ckpt-every", "1", *extra])

def world(tmp_path, name, n, **kw):
    return read_jsonl(toy.write_world(str(tmp_path / name), n, **kw)), tmp_path / name

@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An offline machine with an empty Hugging Face cache and no MULTICRAFTER_* variables."""
    monkeypatch.setattr(HC, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for env in WT.WEIGHT_ENV.values():
        monkeypatch.delenv(env, raising=False)
    return tmp_path

def script_parser(name, first=None):
    """The argparse parser of a script ("sample.py") or module ("experiments.world"), caught as its
    main parses (first: the subcommand, for a main that picks its parser by it)."""
    mod = importlib.import_module(name.removesuffix(".py"))
    if not hasattr(mod, "main"):                    # a module run only as __main__: its own builder
        return mod.build_parser()
    caught = []

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise Caught
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(Caught):
            mod.main([first] if first else [])
    return caught[0]

SCRIPTS = ("sample.py", "train_sft.py", "train_rl.py", "cache.py", "export_lora.py", "rewards.py",
           "toy.py", "data.py", "curate.py", "plot_log.py", "bench.py")

def tiny_flux2(**kw):
    base = dict(in_channels=16, context_in_dim=24, hidden_size=64, num_heads=4, depth=2,
                depth_single_blocks=2, axes_dim=(4, 4, 4, 4), text_layers=(1, 2, 3), max_txt_len=12,
                ae=M.AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                                       factor=2, scale_factor=1.0, shift_factor=0.0),
                image_size=32, ref_size=16, sample_steps=4)
    base.update(kw)
    return F2.Flux2Config(**base)

# ---- cli.py: every script's parser: the nearest flag to a typo, help that shows the defaults ----

def test_a_mistyped_flag_gets_the_nearest_one(capsys):
    for run, argv, want in [(TS.main, ["--data", "m", "--out", "o", "--lamda-attn", "0.3"],
                             "--lambda-attn"),
                            (S.main, ["--refs", "a.png", "--seeed", "1"], "--seed"),
                            (importlib.import_module("curate").main,
                             ["faces", "--videos", "v", "--out", "o",
                              "--treshold", "0.3"], "--threshold")]:
        with pytest.raises(SystemExit) as e:
            run(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"(did you mean {want}?)" in err and err.count("\n") == 1, err

@pytest.mark.parametrize("script, argv", [(s, ["--help"]) for s in SCRIPTS if s != "bench.py"] +
                         [("toy.py", ["eval", "--help"]), ("rewards.py", ["eval", "--help"]),
                          ("data.py", ["check", "--help"]), ("curate.py", ["faces", "--help"])])
def test_every_scripts_help_exits_0_and_shows_the_defaults(script, argv, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script.removesuffix(".py")).main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage:" in out
    if (script, argv[0]) not in [("rewards.py", "--help"), ("data.py", "--help"),
                                 ("curate.py", "--help"),
                                 ("data.py", "check")]:   # subcommand lists; `check` has no default
        assert "(default: " in out, out
    if script == "train_sft.py":                 # a 20-step run learns its warm-up is 50 steps long
        assert re.search(r"--warmup WARMUP\s+\(default: 50\)", out), out
    with pytest.raises(SystemExit) as e:
        script_parser("bench.py").parse_args(["memory", "--help"])
    assert e.value.code == 0 and "(default: 512)" in capsys.readouterr().out

# ---- model.py: presets, the DiT against diffusers, ids, attention hook, probe, prepare ----

ORACLE_CASES = [
    # (config overrides, batch, latent h, latent w, reference latent sizes)
    (dict(), 2, 8, 6, []),                                                        # dev-like
    (dict(hidden_size=96, num_heads=2, axes_dim=(8, 20, 20), depth=1, depth_single_blocks=3,
          guidance_embed=False), 3, 6, 10, [(4, 4)]),                             # schnell-like
    (dict(hidden_size=128, num_heads=8, axes_dim=(4, 6, 6), depth=3, depth_single_blocks=1,
          in_channels=48, out_channels=48, vec_in_dim=16, context_in_dim=24), 2, 10, 4,
     [(4, 6), (2, 2), (6, 4)]),                                                   # toy-like, 3 refs
]

def naive_ref_maps(q, k, spans):
    # the full L x L attention logits, then a softmax restricted to the target image's keys
    S = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    a, b = spans.img
    return torch.stack([S[:, :, s:e, a:b].softmax(-1).mean((1, 2)) for s, e in spans.refs], 1)

def probe_inputs(seed):
    # random fp64 queries and keys over [txt 3 | img 7 | ref 4 | ref 6], for the probe against a
    # naive computation
    torch.manual_seed(seed)
    B, H, D, Lt, Mi, N1, N2 = 2, 5, 8, 3, 7, 4, 6
    L = Lt + Mi + N1 + N2
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    return q, k, M.Spans(txt=Lt, img=(Lt, Lt + Mi), refs=[(Lt + Mi, Lt + Mi + N1),
                                                          (Lt + Mi + N1, L)])

def naive_img_maps(q, k, spans):
    # the full L x L attention, softmax over every key; each target query's mass on each reference's
    # keys
    P = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    a, b = spans.img
    return torch.stack([P[:, :, a:b, s:e].sum(-1).mean(1) for s, e in spans.refs], 1)

def probed_model_inputs(seed=4, n_refs=2):
    # a tiny model with 2 double and 3 single blocks, and a batch of 2 with n_refs references
    cfg = tiny_cfg(depth=2, depth_single_blocks=3)
    f = randomize(M.Flux(cfg), seed=seed)
    torch.manual_seed(seed)
    B = 2
    args = (M.pack(torch.randn(B, 16, 6, 6)), M.grid_ids(3, 3, batch=B), torch.randn(B, 5, 48),
            torch.zeros(B, 5, 3), torch.rand(B), torch.randn(B, 32), torch.full((B,), 3.5))
    sides = [(2, 2), (1, 2), (2, 1)][:n_refs]
    refs = dict(ref_img=[M.pack(torch.randn(B, 16, 2 * h, 2 * w)) for h, w in sides],
                ref_img_ids=M.ref_ids((3, 3), sides, batch=B))
    return cfg, f, args, refs

def naive_masked_attention(q, k, v, allowed):
    # (B, L, H, D) by hand, with a boolean (B, L, L) mask: softmax over the allowed keys only
    s = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).flatten(2)

def test_presets():
    assert (M.get_config("flux-schnell").max_txt_len == 256
            and M.get_config("flux-dev").max_txt_len == 512)
    assert (not M.get_config("flux-schnell").shift_schedule
            and not M.get_config("flux-schnell").guidance_embed)
    cfg = M.get_config("toy")
    assert cfg.in_channels == 4 * cfg.ae.z_channels
    assert 1e6 < sum(p.numel() for p in M.Flux(cfg).parameters()) < 5e6
    with pytest.raises(ValueError, match="unknown model preset"):
        M.get_config("flux-pro")

@pytest.mark.parametrize("over,B,h,w,refs", ORACLE_CASES)
def test_flux_matches_diffusers(diffusers_oracle, over, B, h, w, refs):
    cfg = tiny_cfg(**over)
    torch.manual_seed(0)
    ours = randomize(M.Flux(cfg).eval())
    ref = to_diffusers(cfg, ours, diffusers_oracle)
    C = cfg.in_channels // 4
    img = M.pack(torch.randn(B, C, h, w))
    img_ids = M.grid_ids(h // 2, w // 2, batch=B)
    ref_img = [M.pack(torch.randn(B, C, rh, rw)) for rh, rw in refs]
    ref_img_ids = M.ref_ids((h // 2, w // 2), [(rh // 2, rw // 2) for rh, rw in refs], batch=B)
    L = 7
    txt, txt_ids, y = (torch.randn(B, L, cfg.context_in_dim), torch.zeros(B, L, 3),
                       torch.randn(B, cfg.vec_in_dim))
    t = torch.rand(B)
    g = torch.full((B,), 3.5) if cfg.guidance_embed else None
    with torch.no_grad():
        ours_out = ours(img, img_ids, txt, txt_ids, t, y, g,
                        ref_img=ref_img or None, ref_img_ids=ref_img_ids or None)
        # diffusers knows no references: UNO's forward is plain FLUX on [img | refs], sliced to img
        theirs = ref(hidden_states=torch.cat([img] + ref_img, 1), encoder_hidden_states=txt,
                     pooled_projections=y, timestep=t,
                     img_ids=torch.cat([img_ids] + ref_img_ids, 1)[0], txt_ids=txt_ids[0],
                     guidance=g, return_dict=False)[0][:, : img.shape[1]]
    assert ours_out.shape == (B, img.shape[1], cfg.out_channels)
    assert (ours_out - theirs).abs().max().item() < 1e-4
    # backward too (our RMSNorm's hand-written backward, complex RoPE, the last block's target-only
    # rows): every parameter gradient, mapped to diffusers' names by diffusers' own converter
    w = torch.randn(ours_out.shape)
    (ours(img, img_ids, txt, txt_ids, t, y, g, ref_img=ref_img or None,
          ref_img_ids=ref_img_ids or None) * w).sum() \
        .backward()
    (ref(hidden_states=torch.cat([img] + ref_img, 1), encoder_hidden_states=txt,
         pooled_projections=y, timestep=t,
         img_ids=torch.cat([img_ids] + ref_img_ids, 1)[0], txt_ids=txt_ids[0], guidance=g,
         return_dict=False)[0][:, : img.shape[1]] * w).sum().backward()
    ours_grads = diffusers_oracle[1]({n: p.grad for n, p in ours.named_parameters()})
    for n, p in ref.named_parameters():
        assert ((ours_grads[n] - p.grad).abs().max().item()
                < 1e-4 * max(1.0, p.grad.abs().max().item())), n

def test_rmsnorm_backward_against_finite_differences():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    scale = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(M.RMSNormFn.apply, (x, scale))

def test_references_equal_plain_flux_on_concatenated_sequence():
    # UNO: references appended after the target tokens == plain FLUX on the concatenation, sliced
    cfg = tiny_cfg(guidance_embed=False)
    torch.manual_seed(1)
    f = randomize(M.Flux(cfg).eval(), seed=1)
    B, img = 2, M.pack(torch.randn(2, 16, 6, 8))
    ids = M.grid_ids(3, 4, batch=B)
    refs = [M.pack(torch.randn(B, 16, 4, 4)), M.pack(torch.randn(B, 16, 2, 6))]
    rids = M.ref_ids((3, 4), [(2, 2), (1, 3)], batch=B)
    txt, txt_ids, y, t = (torch.randn(B, 5, 48), torch.zeros(B, 5, 3), torch.randn(B, 32),
                          torch.rand(B))
    with torch.no_grad():
        a = f(img, ids, txt, txt_ids, t, y, ref_img=refs, ref_img_ids=rids)
        b = f(torch.cat([img] + refs, 1),
              torch.cat([ids] + rids, 1), txt, txt_ids, t, y)[:, : img.shape[1]]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

def test_guidance_required_for_guidance_distilled_model():
    f = M.Flux(tiny_cfg())
    with pytest.raises(ValueError, match="guidance"):
        f(torch.randn(1, 4, 64), M.grid_ids(2, 2), torch.randn(1, 3, 48), torch.zeros(1, 3, 3),
          torch.rand(1), torch.randn(1, 32))

def test_full_size_models_have_the_official_keys(diffusers_oracle):
    with torch.device("meta"):
        dev, schnell = M.Flux(M.get_config("flux-dev")), M.Flux(M.get_config("flux-schnell"))
    sd_dev, sd_schnell = dev.state_dict(), schnell.state_dict()
    assert len(sd_dev) == 780 and len(sd_schnell) == 776
    assert sum(p.numel() for p in dev.parameters()) == 11_901_408_320
    assert sum(p.numel() for p in schnell.parameters()) == 11_891_178_560
    assert set(sd_dev) - set(sd_schnell) == {f"guidance_in.{a}.{b}"
                                             for a in ("in_layer", "out_layer")
                                             for b in ("weight", "bias")}
    # hand-written from the official flux1-dev.safetensors layout (BFL flux src/flux/model.py,
    # modules/layers.py)
    expect = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
              "vector_in.in_layer.weight": (3072, 768),
              "double_blocks.18.img_attn.qkv.weight": (9216, 3072),
              "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
              "double_blocks.0.img_mlp.2.weight": (3072, 12288),
              "double_blocks.3.txt_mod.lin.weight": (18432, 3072),
              "single_blocks.37.linear1.weight": (21504, 3072),
              "single_blocks.0.linear2.weight": (3072, 15360),
              "single_blocks.5.modulation.lin.bias": (9216,),
              "final_layer.adaLN_modulation.1.weight": (6144, 3072),
              "final_layer.linear.weight": (64, 3072)}
    for k, shape in expect.items():
        assert tuple(sd_dev[k].shape) == shape, k
    # and diffusers' own converter maps every key onto diffusers' flux-dev model, shapes included
    FluxTransformer2DModel, convert = diffusers_oracle
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(guidance_embeds=True).state_dict()
    sd = dict(sd_dev)
    converted = convert(sd)
    assert not sd
    assert ({k: tuple(v.shape) for k, v in converted.items()}
            == {k: tuple(v.shape) for k, v in theirs.items()})

def test_gradient_checkpointing_changes_nothing_but_memory():
    cfg = tiny_cfg()
    f = randomize(M.Flux(cfg), seed=9)
    args, kw = tiny_inputs(cfg)
    masks, results = torch.rand(2, 1, 6), []
    for ckpt in (False, True):
        f.zero_grad()
        f.grad_checkpoint = ckpt
        probe = M.AttentionProbe()
        out = f(*args, **kw, probe=probe)
        (out.square().mean() + LS.dice_loss(probe.mean_map(), masks)).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in f.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-7, rtol=1e-6)

def test_compile_changes_nothing_but_speed(toy_run, tmp_path, monkeypatch):
    # --compile in the trainer and the sampler: the same losses, adapters and samples. The backend
    # is aot_eager: dynamo's capture of our blocks and AOTAutograd's graphs, what inductor compiles,
    # without the minutes of C++ compiling inductor takes on this CPU (bench.py compile measures
    # inductor itself)
    monkeypatch.setattr(M, "COMPILE_BACKEND", "aot_eager")
    root, manifest = toy_run
    common = ["--stage", "multi", "--init", str(root / "base"), "--steps", "2", "--lr", "1e-2",
              "--grad-checkpoint"]
    try:
        sft(tmp_path / "eager", manifest, *common)
        sft(tmp_path / "compiled", manifest, *common, "--compile")
        run = lambda name, *flags: main(["--refs", *DEMO, "--seed", "3", "--steps", "3", "--out",
                                         str(tmp_path / name), *flags])
        run("eager.png")
        run("compiled.png", "--compile")
    finally:
        torch._dynamo.reset()                   # compiled code of this test's models: dropped
    for r1, r2 in zip(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled"), strict=True):
        assert abs(r1["diff"] - r2["diff"]) < 1e-5 and abs(r1["dice"] - r2["dice"]) < 1e-5
    a, b = (adapter_of(tmp_path / r / "latest") for r in ("eager", "compiled"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    eager, compiled = (np.asarray(Image.open(tmp_path / n), np.int16)
                       for n in ("eager.png", "compiled.png"))
    assert (np.abs(eager - compiled).max() <= 1
            and json.loads((tmp_path / "compiled.json").read_text())["compile"])

def test_attention_hook_is_the_one_swap_point_and_flash_takes_cuda_half_only(monkeypatch):
    # every DiT block attends through M.attention: a hook swapped there changes the output, and the
    # probe, which never goes through it, still sees the same q and k (its maps are unchanged)
    cfg = tiny_cfg()
    f = randomize(M.Flux(cfg), seed=3)
    args = (M.pack(torch.randn(1, 16, 4, 4)), M.grid_ids(2, 2), torch.randn(1, 3, 48),
            torch.zeros(1, 3, 3), torch.rand(1), torch.randn(1, 32), torch.full((1,), 3.5))
    refs = dict(ref_img=[M.pack(torch.randn(1, 16, 2, 2))], ref_img_ids=M.ref_ids((2, 2), [(1, 1)]))
    probe = M.AttentionProbe()
    plain = f(*args, **refs, probe=probe)
    calls = []
    # (B, L, H, D): softmax(q k^T / sqrt(D)) v by hand, then heads flattened
    def naive(q, k, v, mask=None):
        assert mask is None
        calls.append(q.shape)
        w = (torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5).softmax(-1)
        return torch.einsum("bhlm,bmhd->blhd", w, v).flatten(2)
    monkeypatch.setattr(M, "attention", naive)
    probe2 = M.AttentionProbe()
    torch.testing.assert_close(f(*args, **refs, probe=probe2), plain, rtol=1e-5, atol=1e-6)
    assert len(calls) == cfg.depth + cfg.depth_single_blocks
    torch.testing.assert_close(probe2.mean_map(), probe.mean_map())
    monkeypatch.setattr(M, "attention", lambda q, k, v, mask=None: torch.zeros_like(q).flatten(2))
    assert not torch.allclose(f(*args, **refs), plain)
    # flash-attention is taken only where it runs (CUDA, fp16/bf16, head dim <= 256), whatever is
    # installed
    monkeypatch.setattr(M, "flash_attn_func", lambda q, k, v: pytest.fail("flash called on CPU"))
    q = torch.randn(1, 4, 2, 8)
    assert not M.use_flash(q) and not M.use_flash(q.half())
    monkeypatch.setattr(M, "flash_attn_func", None)
    assert not M.use_flash(q)

def test_probe_matches_naive_attention_values_and_gradients():
    q, k, spans = probe_inputs(0)
    B, D, (a0, a1) = q.shape[0], q.shape[-1], spans.img
    rows = [torch.tensor([[0, 1], [1, 3], [0, 0]]), torch.tensor([[1, 5], [0, 2]])]
    probe = M.AttentionProbe(rows=rows, head_chunk=2)      # head chunks that do not divide H
    probe(q, k, spans)
    ours_map, ours_logp = probe.mean_map(), probe.mean_logp()
    naive = naive_ref_maps(q, k, spans)
    torch.testing.assert_close(ours_map, naive, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours_map.sum(-1), torch.ones(B, 2, dtype=torch.float64))
    S = q @ k.transpose(-1, -2) / D ** 0.5
    naive_logp = [torch.stack([S[b, :, s + r, a0:a1].softmax(-1).mean(0).log()
                               for b, r in rw.tolist()])
                  for (s, _), rw in zip(spans.refs, rows)]
    for a, b in zip(ours_logp, naive_logp):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    w = torch.randn_like(naive)
    loss = lambda m, lp: (m * w).sum() + sum((x * torch.linspace(-1, 1, x.numel(), dtype=x.dtype)
                                              .reshape(x.shape)).sum() for x in lp)
    g_ours = torch.autograd.grad(loss(ours_map, ours_logp), (q, k))
    g_naive = torch.autograd.grad(loss(naive, naive_logp), (q, k))
    for a, b in zip(g_ours, g_naive):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

def test_probe_img2ref_matches_naive_attention_values_and_gradients():
    q, k, spans = probe_inputs(1)
    B, Mi = q.shape[0], spans.img[1] - spans.img[0]
    probe = M.AttentionProbe(head_chunk=2, direction="img2ref")
    probe(q, k, spans)
    ours, naive = probe.mean_map(), naive_img_maps(q, k, spans)
    assert ours.shape == (B, 2, Mi)
    torch.testing.assert_close(ours, naive, atol=1e-12, rtol=0)
    w = torch.randn_like(naive)
    g_ours, g_naive = (torch.autograd.grad((m * w).sum(), (q, k)) for m in (ours, naive))
    for a, b in zip(g_ours, g_naive):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        M.AttentionProbe(direction="img2ref", rows=[torch.zeros(1, 2, dtype=torch.long)])

def test_probe_leaves_the_model_output_unchanged_and_passes_gradients():
    cfg = tiny_cfg(depth=3)
    torch.manual_seed(2)
    f = randomize(M.Flux(cfg), seed=2)
    B, img, ids = 2, M.pack(torch.randn(2, 16, 6, 6)), M.grid_ids(3, 3, batch=2)
    refs = [M.pack(torch.randn(B, 16, 4, 4)), M.pack(torch.randn(B, 16, 2, 4))]
    rids = M.ref_ids((3, 3), [(2, 2), (1, 2)], batch=B)
    args = (img, ids, torch.randn(B, 5, 48), torch.zeros(B, 5, 3), torch.rand(B),
            torch.randn(B, 32), torch.full((B,), 3.5))
    plain = f(*args, ref_img=refs, ref_img_ids=rids)
    probe = M.AttentionProbe(blocks=[0, 2])
    probed = f(*args, ref_img=refs, ref_img_ids=rids, probe=probe)
    assert torch.equal(plain, probed)                      # bit for bit
    assert len(probe.maps) == 2 and probe.mean_map().shape == (B, 2, 9)
    probe.mean_map()[:, 0, :4].sum().backward()
    assert f.double_blocks[0].img_attn.qkv.weight.grad.abs().sum() > 0
    assert f.double_blocks[1].img_attn.qkv.weight.grad is None or \
        f.double_blocks[2].img_attn.qkv.weight.grad.abs().sum() > 0
    assert f.final_layer.linear.weight.grad is None          # the probe's gradient stops at block 2

@pytest.mark.parametrize("direction", ["ref2img", "img2ref"])
def test_probe_in_single_blocks_matches_naive_attention_values_and_gradients(
        monkeypatch, direction):
    # every block's q and k captured where the model attends (the last single block included: a
    # probe there needs every query); the probe's maps in the single blocks equal the naive
    # full-attention ones, and so do their gradients with respect to the single blocks' weights
    cfg, f, args, refs = probed_model_inputs()
    plain = f(*args, **refs)
    seen, real = [], M.attention
    def capture(q, k, v, mask=None):
        seen.append((q.transpose(1, 2), k.transpose(1, 2)))
        return real(q, k, v, mask)
    monkeypatch.setattr(M, "attention", capture)
    probe = M.AttentionProbe(blocks=M.select_blocks(["single"], cfg), direction=direction,
                             head_chunk=3)
    out = f(*args, **refs, probe=probe)
    # the probe changes nothing it returns
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    assert probe.names == ["s0", "s1", "s2"] and len(seen) == 5
    L_txt, L_img = 5, 9
    start, spans_refs = L_txt + L_img, []
    for r in refs["ref_img"]:
        spans_refs.append((start, start + r.shape[1]))
        start += r.shape[1]
    spans = M.Spans(txt=L_txt, img=(L_txt, L_txt + L_img), refs=spans_refs)
    naive = naive_ref_maps if direction == "ref2img" else naive_img_maps
    w = torch.randn(2, 2, L_img)
    for (q, k), ours in zip(seen[2:], probe.maps):
        want = naive(q, k, spans)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
        weight = f.single_blocks[0].linear1.weight
        g_ours, = torch.autograd.grad((ours * w).sum(), weight, retain_graph=True)
        g_want, = torch.autograd.grad((want * w).sum(), weight, retain_graph=True)
        torch.testing.assert_close(g_ours, g_want, rtol=1e-4, atol=1e-7)
        assert g_ours.abs().sum() > 0

def test_block_words_name_blocks_and_refuse_unknown_ones():
    cfg = tiny_cfg(depth=2, depth_single_blocks=3)
    assert M.block_names(cfg) == ["d0", "d1", "s0", "s1", "s2"]
    assert M.select_blocks(None, cfg) == ["d0", "d1"]      # the paper's default: every double block
    assert (M.select_blocks(["single"], cfg) == ["s0", "s1", "s2"]
            and M.select_blocks(["all"], cfg)[-1] == "s2")
    # an integer is a double block; no repeats
    assert M.select_blocks([1, "s0", "d1"], cfg) == ["d1", "s0"]
    for bad in (["s3"], ["d2"], ["-1"], ["7"], ["singles"]):
        with pytest.raises(ValueError, match="d0, d1, s0, s1, s2"):
            M.select_blocks(bad, cfg)

def test_oracle_separation_hides_exactly_the_other_subjects_and_equals_naive_masked_attention(
    monkeypatch,
):
    cfg, f, args, refs = probed_model_inputs(n_refs=2)
    masks = torch.zeros(2, 2, 9)
    masks[:, 0, :3], masks[:, 1, 4:6] = 1.0, 1.0
    masks[1, 0, 4], masks[1, 1, 4] = 0.6, 0.3          # token 4 of sample 1: mostly subject 0
    owner = M.owners(masks)
    assert owner[0].tolist() == [0, 0, 0, -1, 1, 1, -1, -1, -1] and owner[1, 4] == 0
    L_txt, L_img, (n1, n2) = 5, 9, (r.shape[1] for r in refs["ref_img"])
    L = L_txt + L_img + n1 + n2
    # who each token is: (kind, subject); the rule written out by hand, token by token
    def who(b, j):
        if j < L_txt:
            return "txt", -1
        if j < L_txt + L_img:
            return "img", int(owner[b, j - L_txt])
        return "ref", 0 if j < L_txt + L_img + n1 else 1
    for directions in (("img2ref",), ("ref2img",), ("img2ref", "ref2img")):
        allowed = torch.ones(2, L, L, dtype=torch.bool)
        for b in range(2):
            for i in range(L):
                for j in range(L):
                    (kq, sq), (kk, sk) = who(b, i), who(b, j)
                    hide = sq >= 0 and sk >= 0 and sq != sk and (
                        ("img2ref" in directions and kq == "img" and kk == "ref") or
                        ("ref2img" in directions and kq == "ref" and kk == "img"))
                    allowed[b, i, j] = not hide
        oracle = M.Separation(owner, M.select_blocks(["all"], cfg), directions)
        ours = f(*args, **refs, oracle=oracle)
        # the plain forward's last single block computes the target's queries only: their rows of
        # the mask
        rows = lambda q: allowed if q.shape[1] == L else allowed[:, L_txt:L_txt + L_img]
        monkeypatch.setattr(M, "attention",
                            lambda q, k, v, mask=None: naive_masked_attention(q, k, v, rows(q)))
        want = f(*args, **refs)
        monkeypatch.undo()
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
        assert (ours - f(*args, **refs)).abs().max() > 1e-6              # it does change the output
    # only the chosen blocks: an oracle on no block at all is the plain forward
    assert torch.equal(f(*args, **refs, oracle=M.Separation(owner, [], ("img2ref",))),
                       f(*args, **refs))

def test_oracle_with_one_reference_changes_nothing_bit_for_bit():
    cfg, f, args, refs = probed_model_inputs(n_refs=1)
    masks = torch.zeros(2, 1, 9)
    masks[:, 0, 2:5] = 1.0
    for directions in (("img2ref",), ("ref2img",), ("img2ref", "ref2img")):
        oracle = M.Separation(M.owners(masks), M.select_blocks(["all"], cfg), directions)
        assert torch.equal(f(*args, **refs, oracle=oracle), f(*args, **refs))
    with pytest.raises(ValueError):
        M.Separation(M.owners(masks), None, ("both",))

def test_pack_and_ids_match_diffusers_pipeline():
    pytest.importorskip("diffusers")
    from diffusers import FluxPipeline
    z = torch.randn(2, 16, 6, 10)
    torch.testing.assert_close(M.pack(z), FluxPipeline._pack_latents(z, 2, 16, 6, 10), atol=0,
                               rtol=0)
    torch.testing.assert_close(M.unpack(M.pack(z), 6, 10), z, atol=0, rtol=0)
    theirs = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(M.grid_ids(3, 5)[0], theirs, atol=0, rtol=0)

def test_reference_ids_follow_uno_offsets():
    # target 4x3 tokens, refs 2x2 then 1x3: 'd' puts ref 1 at rows 4.., cols 3..; ref 2 at rows 6..,
    # cols 5..
    d = M.ref_ids((4, 3), [(2, 2), (1, 3)], pe="d")
    assert d[0][0, :, 1].tolist() == [4, 4, 5, 5] and d[0][0, :, 2].tolist() == [3, 4, 3, 4]
    assert d[1][0, :, 1].tolist() == [6, 6, 6] and d[1][0, :, 2].tolist() == [5, 6, 7]
    h = M.ref_ids((4, 3), [(2, 2), (1, 3)], pe="h")
    assert h[1][0, :, 1].tolist() == [6, 6, 6] and h[1][0, :, 2].tolist() == [0, 1, 2]
    w = M.ref_ids((4, 3), [(2, 2), (1, 3)], pe="w")
    assert w[1][0, :, 1].tolist() == [0, 0, 0] and w[1][0, :, 2].tolist() == [5, 6, 7]
    o = M.ref_ids((4, 3), [(2, 2)], pe="o")
    assert o[0][0, :, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert all((x[..., 0] == 0).all() for x in d)      # axis 0 stays 0, as in UNO
    with pytest.raises(ValueError):
        M.ref_ids((4, 3), [(2, 2)], pe="x")

def test_prepare_builds_the_joint_sequence_with_uno_ids():
    # BFL's prepare by hand: 2x2 patches row-major, target ids (0, row, col), references diagonally
    # after it (pe d) or overlapping it (pe o); text ids all zero
    img, r1, r2 = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 4, 2)
    out = M.prepare(img, [r1, r2], "d", txt=torch.randn(2, 5, 7), y=torch.randn(2, 9))
    assert (out["img"].shape == (2, 6, 12)
            and torch.equal(out["img"][:, 1], img[:, :, 0:2, 2:4].permute(0, 2, 3, 1)
                                .reshape(2, 4, 3).transpose(1, 2).reshape(2, 12)))
    assert out["img_ids"][0].tolist() == [[0, r, c] for r in range(2) for c in range(3)]
    assert out["ref_img_ids"][0][0].tolist() == [[0, 2, 3]]            # after the 2 x 3 target grid
    assert out["ref_img_ids"][1][0].tolist() == [[0, 3, 4], [0, 4, 4]]   # after the first reference
    assert torch.equal(out["txt_ids"], torch.zeros(2, 5, 3)) and out["y"].shape == (2, 9)
    o = M.prepare(img, [r1], "o")
    assert o["ref_img_ids"][0][0].tolist() == [[0, 0, 0]] and "txt" not in o
    assert M.prepare(img)["ref_img"] == []

# ---- encoders.py: the AutoEncoder, the T5 + CLIP and byte text encoders ----

def vae_config(block_out, layers, z):
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"]
                * len(block_out),
                up_block_types=["UpDecoderBlock2D"] * len(block_out), block_out_channels=block_out,
                layers_per_block=layers, act_fn="silu", latent_channels=z, norm_num_groups=32,
                sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True)

def make_tiny_text_models(root):
    # a word-level tokenizer plus random tiny T5 and CLIP text models, saved like Hugging Face repos
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config,
                              T5EncoderModel)
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>", "a", "red", "cat", "dog",
                                         "on", "grass"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=10, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
                   ).save_pretrained(root / "t5")
    CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77, eos_token_id=1,
                                 pad_token_id=0, bos_token_id=3)).save_pretrained(root / "clip")
    fast.save_pretrained(root / "t5")
    fast.save_pretrained(root / "clip")

def test_full_size_autoencoder_has_the_official_keys():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    with torch.device("meta"):
        ae = EN.AutoEncoder(M.AutoEncoderConfig())
    sd = ae.state_dict()
    assert len(sd) == 244 and sum(p.numel() for p in ae.parameters()) == 83_819_683
    for k, shape in {"encoder.conv_in.weight": (128, 3, 3, 3),
                     "encoder.down.1.block.0.nin_shortcut.weight":
                     (256, 128, 1, 1), "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                     "encoder.conv_out.weight": (32, 512, 3, 3),
                     "decoder.conv_in.weight": (512, 16, 3, 3),
                     "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                     "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                     "decoder.conv_out.weight": (3, 128, 3, 3)
                     }.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("decoder.up.0.upsample")
                   or k.startswith("encoder.down.3.downsample") for k in sd)
    cfg = vae_config([128, 256, 512, 512], 2, 16)
    with torch.device("meta"):
        theirs = AutoencoderKL(**cfg).state_dict()
    converted = convert_ldm_vae_checkpoint(dict(sd), cfg)
    assert ({k: tuple(v.shape) for k, v in converted.items()}
            == {k: tuple(v.shape) for k, v in theirs.items()})

@pytest.mark.parametrize("ch,mult,nrb,z,hw", [(32, (1, 2), 1, 4, (32, 48)),
                                              (32, (1, 1, 2), 2, 8, (40, 24))])
def test_autoencoder_matches_diffusers(ch, mult, nrb, z, hw):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    p = M.AutoEncoderConfig(ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=z,
                            factor=2 ** (len(mult) - 1))
    ours = randomize(EN.AutoEncoder(p).eval(), seed=3)
    cfg = vae_config([ch * m for m in mult], nrb, z)
    vae = AutoencoderKL(**cfg).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(ours.state_dict()), cfg), strict=True)
    x = torch.rand(2, 3, *hw) * 2 - 1
    with torch.no_grad():
        z_ours = ours.encode(x)
        z_ref = (vae.encode(x).latent_dist.mode() - 0.1159) * 0.3611
        assert z_ours.shape == (2, z, hw[0] // p.factor, hw[1] // p.factor)
        assert (z_ours - z_ref).abs().max().item() < 1e-4
        assert ((ours.decode(z_ref) - vae.decode(z_ref / 0.3611 + 0.1159).sample).abs().max().item()
                < 1e-4)

def test_toy_autoencoder_is_an_exact_inverse():
    ae = EN.AutoEncoder(M.get_config("toy").ae)
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 12, 16, 12) and list(ae.parameters()) == []
    torch.testing.assert_close(ae.decode(z), x, atol=0, rtol=0)

def test_byte_text_encoder():
    cfg = M.get_config("toy")
    torch.manual_seed(0)
    enc = EN.ByteTextEncoder(cfg).eval()
    txt, y = enc(["a red square", "ü" * 200])
    assert txt.shape == (2, cfg.max_txt_len, cfg.context_in_dim) and y.shape == (2, cfg.vec_in_dim)
    ids = enc.tokenize(["ab", "ü"])
    assert ids[0, :3].tolist() == [97, 98, 256] and ids[1, :3].tolist() == [0xC3, 0xBC, 256]
    txt2, y2 = enc(["a red square"])
    torch.testing.assert_close(txt2[0], txt[0], atol=1e-5, rtol=0)      # no dependence on the batch
    assert not torch.allclose(enc(["a blue square"])[1], y2)

def test_byte_encoder_pads_to_the_longest_prompt_when_asked():
    # what a checkpoint whose header does not say pads to
    assert M.get_config("toy").txt_pad == "max"
    torch.manual_seed(0)
    full = EN.ByteTextEncoder(M.get_config("toy")).eval()
    short = EN.ByteTextEncoder(M.get_config("toy", txt_pad="longest")).eval()
    short.load_state_dict(full.state_dict())
    prompts = ["a circle", "two circles and a square"]
    (t1, y1), (t2, y2) = full(prompts), short(prompts)
    assert t1.shape[1] == 128 and t2.shape[1] == len(prompts[1])
    # the encoder masks its padding, so the real bytes read alike; the DiT sees fewer pad tokens
    for i, p in enumerate(prompts):
        torch.testing.assert_close(t2[i, :len(p)], t1[i, :len(p)], atol=1e-5, rtol=0)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=0)

def test_t5_clip_encoder_on_tiny_local_models(tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
    make_tiny_text_models(tmp_path)
    enc = EN.T5CLIPEncoder(12, t5=str(tmp_path / "t5"), clip=str(tmp_path / "clip"),
                           dtype=torch.float32)
    txt, y = enc(["a red cat", "a dog on grass"])
    assert txt.shape == (2, 12, 16) and y.shape == (2, 16)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t5"))
    ids = tok(["a dog on grass"], max_length=12, padding="max_length", truncation=True,
              return_tensors="pt")
    expect = T5EncoderModel.from_pretrained(str(tmp_path / "t5")).eval()(input_ids=ids.input_ids)
    torch.testing.assert_close(txt[1:], expect.last_hidden_state, atol=1e-6, rtol=0)
    ids = tok(["a red cat"], max_length=77, padding="max_length", truncation=True,
              return_tensors="pt")
    pooled = (
        CLIPTextModel.from_pretrained(str(tmp_path
                                          / "clip")).eval()(input_ids=ids.input_ids).pooler_output)
    torch.testing.assert_close(y[:1], pooled, atol=1e-6, rtol=0)
    assert enc.truncated == 0
    enc(["a red cat " * 20, "a dog"])                 # 60 words: cut to 12 tokens, with one warning
    assert enc.truncated == 1 and "cut to the text encoder's 12" in capsys.readouterr().err
    with pytest.raises(WT.CheckpointError, match="could not load the text encoders"):
        WT.load_t5_clip(M.get_config("flux-dev"), t5=str(tmp_path / "nope"),
                        clip=str(tmp_path / "clip"))

# ---- weights.py: locating weights, the missing ones, strict loading, low VRAM ----

def write_tiny_checkpoint(tmp_path, cfg, name="flow.safetensors", edit=None):
    sd = {k: v.contiguous() for k, v in randomize(M.Flux(cfg), seed=5).state_dict().items()}
    if edit:
        edit(sd)
    path = tmp_path / name
    save_file(sd, str(path))
    return path, sd

def _drop(k):
    return lambda sd: sd.pop(k)

CORRUPTIONS = [
    ("missing key", _drop("double_blocks.1.img_attn.norm.key_norm.scale"),
     "missing keys: double_blocks.1.img_attn.norm.key_norm.scale"),
    ("extra key", lambda sd: sd.__setitem__("double_blocks.2.img_mod.lin.weight", torch.zeros(3)),
     "unexpected keys: double_blocks.2.img_mod.lin.weight"),
    ("wrong shape", lambda sd: sd.__setitem__("txt_in.weight", torch.zeros(64, 47)),
     r"txt_in.weight \(64, 47\) != expected \(64, 48\)"),
]

# fault -> the reason in the one-line CheckpointError, or None: it loads (floats cast exactly,
# silently)
WEIGHT_FAULTS = {
    "missing file": "no such file", "empty file": "not a readable safetensors file",
    "text file": "not a readable safetensors file",
    "pickle (torch.save) instead": "a pickle (torch.save) file",
    "pickle that runs code": "a pickle (torch.save) file",
    "malformed header": "not a readable safetensors file",
    "truncated": "not a readable safetensors file", "missing key": "missing keys: ",
    "extra key": "unexpected keys: extra.weight", "wrong shape": "wrong shapes: ",
    "another architecture": "wrong shapes: ", "float16 tensors": None,
    "int64 where a float belongs": "wrong dtypes: ",
}

# relative L2 error of the DiT output against fp32, random weights: fp8 storage with fp32 compute
# measured 0.0016 and 0.0032 (the two configs below); with bf16 compute 0.0061 and 0.0065, where
# bf16 weights and compute give 0.0056, 0.0059
FP8_TOLERANCE = 0.01

def test_load_flux_from_synthetic_checkpoint(tmp_path):
    cfg = tiny_cfg()
    path, sd = write_tiny_checkpoint(tmp_path, cfg)
    f = WT.load_flux(cfg, str(path), dtype=torch.float32)
    assert all(torch.equal(f.state_dict()[k], v) for k, v in sd.items())
    assert not any(p.is_meta for p in f.parameters())
    fb = WT.load_flux(cfg, str(path))
    assert all(p.dtype == torch.bfloat16 for p in fb.parameters())      # bf16 is the default
    assert all(torch.equal(fb.state_dict()[k], v.bfloat16()) for k, v in sd.items())
    # ComfyUI-style copies prefix every key; the loader strips it
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()},
              str(tmp_path / "prefixed.safetensors"))
    WT.load_flux(cfg, str(tmp_path / "prefixed.safetensors"), dtype=torch.float32)

def test_weights_are_found_in_a_folder_and_the_offline_hub_cache(tmp_path, monkeypatch):
    cfg = tiny_cfg(flow_file="flux1-tiny.safetensors")
    write_tiny_checkpoint(tmp_path, cfg, name="flux1-tiny.safetensors")
    WT.load_flux(cfg, str(tmp_path), dtype=torch.float32)               # a folder holding flow_file
    # a Hugging Face repo id resolved from the local cache with HF_HUB_OFFLINE=1 (cache layout by
    # hand)
    snap = tmp_path / "hub" / "models--acme--tiny-flux" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--tiny-flux" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-flux" / "refs" / "main").write_text("a" * 40)
    os.replace(tmp_path / "flux1-tiny.safetensors", snap / "flux1-tiny.safetensors")
    monkeypatch.setattr(HC, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(HC, "HF_HUB_OFFLINE", True)
    WT.load_flux(cfg, "acme/tiny-flux", dtype=torch.float32)
    with pytest.raises(WT.CheckpointError, match="hf download acme/other"):
        WT.load_flux(cfg, "acme/other", dtype=torch.float32)
    # a repo folder (T5) in the cache counts once it holds weights, not only its config
    t5 = tmp_path / "hub" / "models--google--t5-v1_1-xxl" / "snapshots" / ("b" * 40)
    t5.mkdir(parents=True)
    (tmp_path / "hub" / "models--google--t5-v1_1-xxl" / "refs").mkdir()
    (tmp_path / "hub" / "models--google--t5-v1_1-xxl" / "refs" / "main").write_text("b" * 40)
    (t5 / "config.json").write_text("{}")
    w = WT.flux_weights("flux-dev", ("t5",))
    with pytest.raises(WT.CheckpointError, match="cached without its weights"):
        WT.check_weights(w)
    (t5 / "model.safetensors").write_bytes(b"x")
    assert WT.check_weights(w) == [str(t5)]

def test_missing_weights_are_listed_at_once_offline_in_under_a_second(tmp_path, monkeypatch):
    monkeypatch.setattr(HC, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")         # even "online", nothing may reach the network
    monkeypatch.setattr(FD, "hf_hub_download", lambda *a, **k: pytest.fail("the check downloaded"))
    for env in WT.WEIGHT_ENV.values():
        monkeypatch.delenv(env, raising=False)
    ae_dir = tmp_path / "ae_here"
    ae_dir.mkdir()
    (ae_dir / "ae.safetensors").write_bytes(b"x")     # present: located, not listed
    t0 = time.perf_counter()
    with pytest.raises(WT.CheckpointError) as e:
        WT.check_weights(WT.flux_weights("flux-dev", ae=str(ae_dir),
                                         clip=str(tmp_path / "no_clip")))
    took = time.perf_counter() - t0
    msg = str(e.value)
    assert took < 1.0 and "\n" not in msg and msg.startswith("3 of 4 weights missing")
    assert ("hf download black-forest-labs/FLUX.1-dev flux1-dev.safetensors" in msg
            and "gated" in msg)
    assert "hf download google/t5-v1_1-xxl" in msg and "no_clip: no such file or folder" in msg
    assert ("--model / MULTICRAFTER_DIT" in msg and "--t5 / MULTICRAFTER_T5" in msg
            and "ae.safetensors (" not in msg)
    assert "--init / MULTICRAFTER_DIT" in str(pytest.raises(WT.CheckpointError, WT.check_weights,
                                                            WT.flux_weights(
                                                                "flux-dev", ("dit",),
                                                                dit_flag="--init")).value)
    with pytest.raises(WT.CheckpointError, match="not gated: `hf download "
                       "black-forest-labs/FLUX.1-schnell flux1-schnell"):
        WT.check_weights(WT.flux_weights("flux-schnell", ("dit",)))
    # the environment variable is the default; the flag's value wins over it
    monkeypatch.setenv("MULTICRAFTER_AE", str(tmp_path / "elsewhere"))
    assert WT.flux_weights("flux-dev", ("ae",))[0].source == str(tmp_path / "elsewhere")
    assert WT.check_weights(WT.flux_weights("flux-dev", ("ae",), ae=str(ae_dir))) == [str(
        ae_dir / "ae.safetensors")]

@pytest.mark.parametrize("what,edit,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_checkpoints_give_one_line_errors(tmp_path, what, edit, message):
    cfg = tiny_cfg()
    path, _ = write_tiny_checkpoint(tmp_path, cfg, edit=edit)
    with pytest.raises(WT.CheckpointError, match=message) as e:
        WT.load_flux(cfg, str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)

def test_unreadable_files_give_one_line_errors(tmp_path):
    cfg = tiny_cfg()
    path, _ = write_tiny_checkpoint(tmp_path, cfg)
    data = path.read_bytes()
    cases = {"text.safetensors": b"this is not a checkpoint\n",
             "truncated.safetensors": data[: len(data) // 2],
             "header.safetensors": (200).to_bytes(8, "little")
             + b'{"a": {"dtype": "F32", "shape": [1]' + b" " * 200, "empty.safetensors": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WT.CheckpointError) as e:
            WT.load_flux(cfg, str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value), name
    for missing in (str(tmp_path / "absent.safetensors"), "./ckpt/dit", str(tmp_path / "dir/dit")):
        with pytest.raises(WT.CheckpointError, match="no such file or folder"):
            WT.load_flux(cfg, missing)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(WT.CheckpointError, match="folder has no flux1-dev.safetensors"):
        WT.load_flux("flux-dev", str(tmp_path / "empty_dir"))

def test_load_ae_from_synthetic_checkpoint(tmp_path):
    p = M.AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, factor=2)
    cfg = M.FluxConfig(ae=p)
    sd = {k: v.contiguous() for k, v in randomize(EN.AutoEncoder(p), seed=2).state_dict().items()}
    save_file(sd, str(tmp_path / "ae.safetensors"))
    ae = WT.load_ae(cfg, str(tmp_path))
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in sd.items())
    del sd["decoder.conv_out.bias"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WT.CheckpointError, match="missing keys: decoder.conv_out.bias"):
        WT.load_ae(cfg, str(tmp_path / "bad.safetensors"))

def test_every_bad_weights_fault_is_checked():
    assert set(WEIGHT_FAULTS) == set(B.BAD_WEIGHTS)

@pytest.mark.parametrize("kind", ["dit", "ae", "adapter"])
@pytest.mark.parametrize("fault", list(B.BAD_WEIGHTS))
def test_bad_weights_one_line_errors_or_a_noted_cast(tmp_path, capsys, fault, kind):
    model, sd, meta, other, load = toy_weights(kind)
    sd = {k: v.detach().clone() for k, v in sd.items()}
    path, want = str(tmp_path / "w.safetensors"), WEIGHT_FAULTS[fault]
    if B.BAD_WEIGHTS[fault]:
        B.BAD_WEIGHTS[fault](path, sd, meta, other)
    if want is None:                                # float16 on disk: loaded as the model's float32
        load(model, path)
        got = model.state_dict() if kind != "adapter" else ML.adapter_state_dict(model)
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.half().float())
                   for k, v in sd.items())
        assert "note:" not in capsys.readouterr().err       # fp16 -> fp32 is exact: nothing to say
        return
    with pytest.raises(WT.CheckpointError, match=re.escape(want)) as e:
        load(model, path)
    assert path in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 600
    assert not os.path.exists(path + ".ran")        # nothing was unpickled

def test_a_cast_that_loses_precision_is_noted(tmp_path, capsys):
    f = M.Flux(tiny_cfg())
    save_file({k: v.contiguous() for k, v in f.state_dict().items()}, tmp_path / "w.safetensors")
    WT.load_state_dict_strict(f, str(tmp_path / "w.safetensors"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in f.parameters())
    assert "stores float32 tensors: cast to bfloat16" in capsys.readouterr().err

def test_saved_weights_are_as_readable_as_any_file_the_user_makes(tmp_path):
    # safetensors >= 0.7 writes 0600: a checkpoint hidden from the group that shares the run folder
    flux = M.Flux(tiny_cfg())
    acfg = ML.inject(flux, rank=2)
    ML.save_adapter(flux, str(tmp_path / "adapter.safetensors"), acfg)
    WT.save_safetensors({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "plain.txt").write_text("")
    mode = lambda name: oct(os.stat(tmp_path / name).st_mode & 0o777)
    assert mode("adapter.safetensors") == mode("w.safetensors") == mode("plain.txt")
    # no temporaries
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "plain.txt", "w.safetensors"]

def test_a_base_trained_padding_to_the_longest_prompt_samples_so(toy_run, tmp_path):
    # the byte encoder's padding is part of the model: a base checkpoint records it, and every
    # loader honours it
    root, manifest = toy_run
    sft(tmp_path / "b", manifest, "--stage", "base", "--steps", "1", "--txt-pad", "longest")
    with safe_open(str(tmp_path / "b" / "latest" / "text_encoder.safetensors"),
                   framework="pt") as f:
        assert f.metadata()["txt_pad"] == "longest"
    _, _, text, _ = S.load_models(str(tmp_path / "b" / "latest"), "toy", torch.device("cpu"))
    assert text.txt_pad == "longest" and text.tokenize(["ab", "abcd"]).shape == (2, 4)
    _, _, shipped, _ = S.load_models("toy", "toy", torch.device("cpu"))  # assets/toy trained so too
    assert shipped.txt_pad == "longest" and shipped.tokenize(["ab"]).shape == (1, 2)
    _, _, old, _ = S.load_models(str(random_toy(tmp_path / "old")), "toy", torch.device("cpu"))
    # no header: padded to 128
    assert old.txt_pad == "max" and old.tokenize(["ab"]).shape == (1, 128)

def test_resident_moves_a_model_in_and_back_out():
    # on a CPU machine "meta" stands in for the CPU home (and the CPU for the GPU): the move is
    # visible
    for fail in (False, True):
        lin = torch.nn.Linear(3, 2).to("meta")
        with pytest.raises(RuntimeError) if fail else nullcontext():
            with WT.resident(lin.to_empty(device="cpu"), "cpu", home="meta") as m:
                assert m.weight.device.type == "cpu" and m(torch.randn(1, 3)).shape == (1, 2)
                if fail:
                    raise RuntimeError("a failing encoder")
        assert lin.weight.is_meta                          # sent home, also when the encoder failed

def test_streamed_blocks_give_identical_outputs_one_block_resident_at_a_time():
    cfg = tiny_cfg()
    flux = randomize(M.Flux(cfg).eval())
    ML.inject(flux, rank=4, n_experts=2)            # adapters stream with their blocks
    randomize(flux, seed=1)
    args = flux_call_args(cfg)
    with torch.no_grad():
        want = flux(*args)
        streamed = copy.deepcopy(flux)
        WT.stream_blocks(streamed, "cpu")
        blocks = list(streamed.double_blocks) + list(streamed.single_blocks)
        home = [[p.data_ptr() for p in b.parameters()] for b in blocks]
        resident = []                               # per block run: which blocks hold device copies
        for b in blocks:
            b.register_forward_pre_hook(lambda m, a: resident.append(
                [any(p.data_ptr() != h for p, h in zip(x.parameters(), hs))
                 for x, hs in zip(blocks, home)]))
        got = streamed(*args)
    assert torch.equal(got, want)
    assert resident == [[j == i for j in range(len(blocks))] for i in range(len(blocks))]
    # freed after
    assert all(p.data_ptr() == h for b, hs in zip(blocks, home) for p, h in zip(b.parameters(), hs))

def test_fp8_linear_is_exact_on_its_grid_and_within_its_rounding_elsewhere():
    torch.manual_seed(0)
    # weights on the fp8 grid times a row scale (the row's max maps to 448): stored exactly, up to
    # the fp32 rounding of the weights and scales themselves (~1e-7, where fp8 rounding would be
    # ~1e-2)
    grid = torch.tensor([448.0, -256.0, 1.5, 0.125, -3.0, 20.0])
    s = torch.tensor([1e-3, 2e-2, 7.0])
    lin = torch.nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight.copy_(grid[torch.randperm(6)][None] * s[:, None]
                         * torch.tensor([[1.0], [-1.0], [1.0]]))
    f8 = WT.Fp8Linear.from_linear(lin)
    assert f8.weight.dtype == torch.float8_e4m3fn and f8.weight.element_size() == 1
    x = torch.randn(4, 6, dtype=torch.float64)
    want = x @ lin.weight.double().T + lin.bias.double()
    torch.testing.assert_close(f8(x), want, atol=1e-6, rtol=1e-6)
    # random weights: e4m3 keeps 3 mantissa bits, a relative rounding error of at most 2^-4 per
    # weight
    lin = torch.nn.Linear(256, 64)
    f8 = WT.Fp8Linear.from_linear(lin)
    deq = f8.weight.double() * f8.weight_scale.double()[:, None]
    err = ((deq - lin.weight.double()).abs() / lin.weight.double().abs().clamp_min(1e-30))
    normal = lin.weight.abs() / f8.weight_scale[:, None] >= 2 ** -6             # fp8's normal range
    assert err[normal].max() <= 2 ** -4 + 1e-9 and err[normal].max() > 2 ** -6  # really rounded
    with torch.autocast("cpu", dtype=torch.bfloat16):                                 # bf16 compute
        assert f8(torch.randn(2, 256)).dtype == torch.bfloat16

@pytest.mark.parametrize("over", [dict(), dict(hidden_size=128, num_heads=2, axes_dim=(16, 24, 24),
                                               depth=3, depth_single_blocks=4)])
def test_fp8_storage_within_the_stated_tolerance_of_fp32(over):
    cfg = tiny_cfg(**over)
    flux = randomize(M.Flux(cfg).eval())
    args = flux_call_args(cfg)
    with torch.no_grad():
        want = flux(*args)
        f8 = WT.store_fp8(copy.deepcopy(flux))
        got = f8(*args)
        rel = ((got - want).norm() / want.norm()).item()
        assert 1e-5 < rel < FP8_TOLERANCE
        # bf16 compute (autocast, as on GPU): fp8 storage adds little to what bf16 alone costs
        # (0.0061 vs 0.0056)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rel8 = ((f8(*args).float() - want).norm() / want.norm()).item()
            rel16 = ((flux(*args).float() - want).norm() / want.norm()).item()
        assert rel8 < FP8_TOLERANCE and rel8 < 1.5 * rel16
        n8 = sum(p.numel() for p in f8.parameters() if p.dtype == torch.float8_e4m3fn)
        blocks = sum(m.weight.numel() for b in (flux.double_blocks, flux.single_blocks)
                     for m in b.modules() if isinstance(m, torch.nn.Linear))
        assert n8 == blocks                                       # every block Linear, nothing else
        # fp8 streamed: still identical to fp8 resident
        WT.stream_blocks(f8, "cpu")
        assert torch.equal(f8(*args), got)
    # with an adapter: the frozen layer it wraps becomes fp8, its own LoRA layers stay fp32
    flux = randomize(M.Flux(cfg).eval())
    ML.inject(flux, rank=4)
    WT.store_fp8(flux)
    lora = dict(ML.adapters(flux))["double_blocks.0.img_attn.qkv"]
    assert isinstance(lora.base, WT.Fp8Linear) and lora.down.weight.dtype == torch.float32

# ---- sampling.py: the schedule, Euler and SDE steps, denoise and guidance, inputs ----

def flow_grpo_reference(x, v, sigmas, i, eta):
    # Flow-GRPO's sde_step_with_logprob algebra, written independently of sampling.sde_step
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    dt = sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma))) * eta
    mean = (x * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
            + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    return mean, std_dev_t * math.sqrt(-dt)

@pytest.mark.parametrize("n", [1, 4, 28, 50])
def test_schedule_matches_diffusers(n):
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    for seq in (16, 64, 256, 1024, 4096, 8192):
        s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096,
                                            time_shift_type="exponential")
        s.set_timesteps(sigmas=np.linspace(1, 1 / n, n), mu=calculate_shift(seq))
        ours = get_schedule(n, seq)
        assert len(ours) == n + 1 and ours[0] == 1.0 and ours[-1] == 0.0
        np.testing.assert_allclose(ours, s.sigmas.double().numpy(), atol=1e-6, rtol=0)

def test_schedule_hand_values():
    # BFL flux src/flux/sampling.py get_schedule: schnell is unshifted; dev at 4096 tokens
    # (1024x1024)
    np.testing.assert_allclose(get_schedule(4, 4096, shift=False), [1, .75, .5, .25, 0], atol=1e-7)
    np.testing.assert_allclose(get_schedule(4, 4096), [1, .9045, .7595, .5128, 0], atol=1e-4)
    assert (get_schedule(4, 4096, shift=M.get_config("flux-schnell").shift_schedule)
            == get_schedule(4, 1, shift=False))

@pytest.mark.parametrize("i", [0, 1, 3])       # i = 0 is t = 1, where the std borrows sigmas[1]
def test_sde_logprob_matches_normal(i):
    g = torch.Generator().manual_seed(i)
    sigmas = get_schedule(4, 256)
    x, v = (torch.randn(3, 16, 12, generator=g, dtype=torch.float64),
            torch.randn(3, 16, 12, generator=g, dtype=torch.float64))
    x_next, logp, mean, std = sde_step(x, v, sigmas[i], sigmas[i + 1], eta=0.7, generator=g)
    ref_mean, ref_std = flow_grpo_reference(x, v, sigmas, i, 0.7)
    torch.testing.assert_close(mean, ref_mean)
    assert abs(std.item() - ref_std) < 1e-12 and logp.shape == (3,)
    normal = torch.distributions.Normal(ref_mean, ref_std)
    torch.testing.assert_close(logp, normal.log_prob(x_next).mean(dim=(1, 2)))
    # scoring a given sample (the trainer's replay), in fp32 from bf16 inputs, with (B,) times
    prev = torch.randn(3, 16, 12, generator=g, dtype=torch.float64)
    t, tn = torch.full((3,), sigmas[i]), torch.full((3,), sigmas[i + 1])
    out, logp2, mean2, _ = sde_step(x.bfloat16(), v.bfloat16(), t, tn, eta=0.7, prev=prev)
    assert out.dtype == logp2.dtype == torch.float32 and torch.equal(out, prev.float())
    want = torch.distributions.Normal(mean2.double(), ref_std).log_prob(prev).mean(dim=(1, 2))
    torch.testing.assert_close(logp2.double(), want, rtol=1e-5, atol=1e-5)

def test_sde_sample_statistics():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 64).expand(8192, 64), torch.randn(1, 64).expand(8192, 64)
    x_next, _, mean, std = sde_step(x, v, 0.8, 0.6, eta=0.9, generator=g)
    n_std = std.item() / math.sqrt(8192)
    assert (x_next.mean(0) - mean[0]).abs().max() < 5 * n_std          # unbiased around the mean
    assert abs(x_next.std(0).mean().item() / std.item() - 1) < 0.02     # with the stated spread

def test_sde_eta0_is_euler():
    x, v = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    for t, tn in [(1.0, 0.9), (0.5, 0.3), (torch.tensor([1.0, 0.7]), torch.tensor([0.8, 0.2]))]:
        x_next, logp, mean, std = sde_step(x, v, t, tn, eta=0.0,
                                           generator=torch.Generator().manual_seed(0))
        assert torch.equal(x_next, euler_step(x, v, t, tn)) and torch.equal(mean, x_next)
        assert (std == 0).all() and torch.isnan(logp).all()    # a deterministic step has no density

def test_denoise_is_euler_over_the_schedule():
    calls = []
    v = torch.randn(1, 4, 48)
    def fake_model(img, img_ids, txt, txt_ids, t, y, guidance, ref_img, ref_img_ids, probe=None,
                   oracle=None):
        calls.append((t.item(), guidance.item()))
        return v
    img = torch.randn(1, 4, 48)
    ts = get_schedule(5, 4)
    out = denoise(fake_model, img, None, None, None, None, ts, 2.5, progress=False)
    torch.testing.assert_close(out, img - v)                          # the dt's sum to -1
    assert calls == [(pytest.approx(t), 2.5) for t in ts[:-1]]

@pytest.mark.parametrize("batched", [False, True])
def test_denoise_guides_each_condition_against_the_full_velocity(batched, monkeypatch):
    # constant velocities per condition: with the references and the prompt 1.0, without the
    # references 0.2, with the empty prompt 0.5 (read per row: batched, the prompt and the empty
    # prompt are one forward of 2B rows); one Euler step from t = 1 to 0 subtracts the guided
    # velocity once
    monkeypatch.setattr(SM, "BATCH_GUIDANCE", batched)
    txt, txt_null = torch.zeros(1, 3, 8), torch.ones(1, 3, 8)
    calls = []
    def fake_model(img, img_ids, txt_, txt_ids, t, y, guidance, ref_img=None, ref_img_ids=None,
                   probe=None, oracle=None):
        null = txt_[:, 0, 0] == 1                                              # (rows,)
        calls.append((ref_img is not None, tuple(null.tolist())))
        v = torch.where(null, 0.5, 1.0) if ref_img is not None else torch.full(null.shape, 0.2)
        return v[:, None, None].expand_as(img)
    img, refs, ids = torch.randn(1, 4, 48), [torch.randn(1, 2, 48)], torch.zeros(1, 4, 3)
    run = lambda **kw: denoise(fake_model, img, ids, txt, ids, torch.zeros(1, 8), [1.0, 0.0], 1.0,
                               refs, [ids[:, :2]],
                               progress=False, txt_null=txt_null, y_null=torch.zeros(1, 8), **kw)
    torch.testing.assert_close(run(), img - 1.0)                   # w = 1: no guidance, one forward
    assert calls == [(True, (False,))]
    # 1 + (2 - 1)(1 - 0.2) + (3 - 1)(1 - 0.5) = 2.8; 0.2 + 2 (1 - 0.2) = 1.8, the usual v_u + w
    # (v_c - v_u)
    torch.testing.assert_close(run(ref_guidance=2.0, text_guidance=3.0), img - 2.8)
    torch.testing.assert_close(run(ref_guidance=2.0), img - 1.8)
    torch.testing.assert_close(run(text_guidance=3.0), img - 2.0)
    with_null = [(True, (False, True))] if batched else [(True, (False,)), (True, (True,))]
    assert (calls[1:] == with_null + [(False, (False,))] + [(True, (False,)), (False, (False,))]
            + with_null)
    with pytest.raises(ValueError, match="txt_null"):
        denoise(fake_model, img, None, txt, None, None, [1.0, 0.0], 1.0, progress=False,
                text_guidance=2.0)

def test_batched_guidance_equals_two_forwards(monkeypatch):
    # the prompt and the empty prompt as one forward of 2B rows (sampling.BATCH_GUIDANCE): the same
    # samples and the same IPPO policy velocities as two forwards, up to float rounding
    # (GEMMs blocked by batch size; the guidance multiplies a difference by up to 5 a step), on the
    # shipped toy at its guidance (4 / 2)
    flux, ae, text, _ = S.load_models("toy", "toy", torch.device("cpu"))
    refs = [preprocess_ref(load_image(p), 16) for p in DEMO]
    c = SM.sampling_inputs(flux.cfg, ae, text, "a circle and a square", refs, 32, 32, [0, 1],
                           null_text=True)
    c1 = dict({k: v[:1] if torch.is_tensor(v) else [r[:1] for r in v] for k, v in c.items()},
              scales=(4.0, 2.0))
    x = torch.randn(3, *c["img"].shape[1:])
    def both():
        with torch.no_grad():
            return (denoise(flux, **c, timesteps=get_schedule(4, 64), guidance=1.0, progress=False,
                            ref_guidance=4.0,
                            text_guidance=2.0), TR.velocity(flux, x, c1, 0.6, 1.0))
    batched = both()
    monkeypatch.setattr(SM, "BATCH_GUIDANCE", False)
    for a, b in zip(batched, both()):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-4)
    plain = denoise(flux, **c, timesteps=get_schedule(4, 64), guidance=1.0, progress=False,
                    ref_guidance=4.0)
    assert (plain - batched[0]).abs().max() > 0.01                 # the text guidance acts

def test_prepare_shapes_and_ids():
    cfg = M.get_config("toy")
    refs = [Image.new("RGB", (16, 8)), Image.new("RGB", (8, 16))]
    inp = SM.sampling_inputs(cfg, EN.AutoEncoder(cfg.ae), EN.ByteTextEncoder(cfg), "a cat", refs,
                             35, 33, seed=0)   # rounded down to 32
    assert (inp["img"].shape == (1, 64, 48) and inp["txt"].shape == (1, 128, 64)
            and inp["y"].shape == (1, 64))
    assert [r.shape for r in inp["ref_img"]] == [(1, 8, 48), (1, 8, 48)]
    ids = inp["ref_img_ids"]             # UNO 'd': diagonally after the 8x8 target, then each other
    assert ids[0][0, 0].tolist() == [0, 8, 8] and ids[1][0, 0].tolist() == [0, 10, 12]
    # BFL get_noise, unpacked
    noise = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(M.unpack(inp["img"], 16, 16), noise)

def test_sampling_inputs_encode_the_empty_prompt_as_training_saw_it():
    # text guidance's empty prompt, encoded with the prompt (one length) at sampling
    # (eval, no grad), is what the encoder gave it in training (a batch in train mode), finite:
    # torch's fused inference path alone gives NaN
    cfg = M.get_config("toy", txt_pad="longest")
    torch.manual_seed(0)
    text, ae = EN.ByteTextEncoder(cfg).eval(), EN.AutoEncoder(cfg.ae)
    c = SM.sampling_inputs(cfg, ae, text, "two circles", [], 32, 32, seed=0, null_text=True)
    assert c["txt_null"].shape == c["txt"].shape == (1, len("two circles"), cfg.context_in_dim)
    txt, y = text.train()(["two circles", ""])
    for got, want in ((c["txt"], txt[:1]), (c["txt_null"], txt[1:]), (c["y"], y[:1]),
                      (c["y_null"], y[1:])):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

# ---- flux2.py: FLUX.2 against diffusers' models and the klein pipelines, end to end ----

def flux2_to_diffusers(cfg, ours, kv=False):
    """diffusers' Flux2Transformer2DModel holding our weights, converted by diffusers' own
    BFL->diffusers converter (kv: with the KV pipeline's attention processors)."""
    pytest.importorskip("diffusers")
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers as convert)
    from diffusers.models.transformers.transformer_flux2 import (Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor)
    ref = Flux2Transformer2DModel(in_channels=cfg.in_channels, num_layers=cfg.depth,
                                  num_single_layers=cfg.depth_single_blocks,
                                  attention_head_dim=cfg.hidden_size // cfg.num_heads,
                                  num_attention_heads=cfg.num_heads,
                                  joint_attention_dim=cfg.context_in_dim,
                                  axes_dims_rope=tuple(cfg.axes_dim),
                                  guidance_embeds=cfg.guidance_embed).eval()
    sd = dict(ours.state_dict())
    ref.load_state_dict(convert(sd), strict=True)
    assert not sd, f"keys diffusers' converter does not know: {sorted(sd)}"
    if kv:
        for b in ref.transformer_blocks:
            b.attn.set_processor(Flux2KVAttnProcessor())
        for b in ref.single_transformer_blocks:
            b.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return ref

def flux2_inputs(cfg, B=2, hw=(8, 6), refs=((4, 4),), L=5, pe="t", seed=0):
    g = torch.Generator().manual_seed(seed)
    z = cfg.in_channels // 4
    txt = torch.randn(B, L, cfg.context_in_dim, generator=g)
    inp = F2.prepare(torch.randn(B, z, *hw, generator=g),
                     [torch.randn(B, z, *r, generator=g) for r in refs], pe,
                     txt, txt.new_zeros(B, 0))
    return dict(inp, timesteps=torch.rand(B, generator=g),
                guidance=torch.full((B,), 4.0) if cfg.guidance_embed else None)

def diffusers_call(ref, inp, **kw):
    # diffusers knows no references apart: [img | refs] as one image sequence with concatenated ids,
    # sliced to img
    out = ref(hidden_states=torch.cat([inp["img"]] + inp["ref_img"], 1),
              encoder_hidden_states=inp["txt"], timestep=inp["timesteps"],
              img_ids=torch.cat([inp["img_ids"]] + inp["ref_img_ids"], 1)[0],
              txt_ids=inp["txt_ids"][0], guidance=inp["guidance"], return_dict=False, **kw)[0]
    return out[:, :inp["img"].shape[1]]

def flux2_vae_config(block_out, layers, z):
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"]
                * len(block_out),
                up_block_types=["UpDecoderBlock2D"] * len(block_out), block_out_channels=block_out,
                layers_per_block=layers, latent_channels=z, norm_num_groups=32, sample_size=32)

def flux2_ae_to_diffusers(ours, cfg):
    # BFL's ae.safetensors names -> AutoencoderKLFlux2: diffusers' LDM VAE converter for the FLUX.1
    # part, its (post-) quant convolutions moved out of the encoder / decoder, the batch-norm
    # statistics as they are
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    sd = {k.replace("encoder.quant_conv", "quant_conv").replace(
        "decoder.post_quant_conv", "post_quant_conv"): v
        for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if not k.startswith("bn.")},
                                           cfg)
    vae = AutoencoderKLFlux2(**cfg).eval()
    vae.load_state_dict({**converted, **{k: v for k, v in sd.items() if k.startswith("bn.")}},
                        strict=True)
    return vae

def make_tiny_qwen3(root):
    # a word-level tokenizer with a chat template, and a random 3-layer Qwen3, saved like a Hugging
    # Face repo
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    words = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "think", "a",
             "red", "cat", "dog", "on", "grass", "two", "friends"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                          "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> "
                          "assistant {% if enable_thinking is defined and not enable_thinking "
                          "%}think think {% endif %}{% endif %}")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(words), hidden_size=8, intermediate_size=16,
                                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=4, max_position_embeddings=64)
                     ).save_pretrained(root)
    fast.save_pretrained(root)
    return root

def write_flux2_weights(root, cfg, seed=5):
    """A DiT file and an AE file with BFL's names and a tiny Qwen3 folder -> their paths."""
    torch.manual_seed(seed)
    dit = {k: v.contiguous() for k, v in randomize(F2.Flux2(cfg), seed=seed).state_dict().items()}
    save_file(dit, str(root / "flux2.safetensors"))
    save_file(dict(F2.AutoEncoder(cfg.ae).state_dict()), str(root / "ae.safetensors"))
    return root / "flux2.safetensors", root / "ae.safetensors", make_tiny_qwen3(root / "qwen")

@pytest.fixture
def klein_tiny(tmp_path_factory, monkeypatch):
    """A tiny FLUX.2 preset ("klein-tiny": 32 px images, 16 px references, as the toy world's) with
    weights in BFL's files (DiT, AE) and a Qwen3 folder, found through the environment; a toy world
    to train it on."""
    root = tmp_path_factory.mktemp("klein")
    cfg = tiny_flux2(in_channels=16, context_in_dim=24)
    dit, ae, qwen = write_flux2_weights(root, cfg)
    monkeypatch.setitem(F2.CONFIGS, "klein-tiny", cfg)
    monkeypatch.setenv("MULTICRAFTER_AE", str(ae))
    monkeypatch.setenv("MULTICRAFTER_TEXT", str(qwen))
    return root, dit, toy.write_world(str(root / "data"), 4, seed=0, subjects=(2,))

@pytest.mark.parametrize("over,refs,pe",
                         [(dict(), [], "t"), (dict(guidance_embed=True, depth=1), [(4, 4)], "t"),
                          (dict(depth_single_blocks=3), [(4, 6), (2, 2), (6, 4)], "d")])
def test_flux2_matches_diffusers(over, refs, pe):
    cfg = tiny_flux2(**over)
    ours = randomize(F2.Flux2(cfg).eval())
    ref = flux2_to_diffusers(cfg, ours)
    inp = flux2_inputs(cfg, refs=refs, pe=pe)
    with torch.no_grad():
        mine, theirs = ours(**inp), diffusers_call(ref, inp)
    assert mine.shape == inp["img"].shape and (mine - theirs).abs().max().item() < 1e-4
    # backward too: every parameter's gradient, mapped to diffusers' names by its converter
    w = torch.randn(mine.shape)
    (ours(**inp) * w).sum().backward()
    (diffusers_call(ref, inp) * w).sum().backward()
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers as convert)
    grads = convert({n: p.grad for n, p in ours.named_parameters()})
    for n, p in ref.named_parameters():
        assert ((grads[n] - p.grad).abs().max().item()
                < 1e-4 * max(1.0, p.grad.abs().max().item())), n

def test_flux2_reference_kv_matches_the_kv_pipeline_and_the_uncached_path():
    # klein-9B-KV: references see only each other at t = 0. diffusers' "extract" forward
    # ([txt | refs | img]) and "cached" forward are the oracle; our uncached path (references every
    # step) equals the cached one
    cfg = tiny_flux2(ref_kv=True, guidance_embed=True)
    ours = randomize(F2.Flux2(cfg).eval())
    ref = flux2_to_diffusers(cfg, ours, kv=True)
    inp = flux2_inputs(cfg, refs=[(4, 4), (2, 6)])
    n_ref = sum(r.shape[1] for r in inp["ref_img"])
    kv = F2.RefKV()
    with torch.no_grad():
        mine = ours(**inp, kv=kv)
        out = ref(hidden_states=torch.cat(inp["ref_img"] + [inp["img"]], 1),
                  encoder_hidden_states=inp["txt"], timestep=inp["timesteps"],
                  img_ids=torch.cat(inp["ref_img_ids"] + [inp["img_ids"]], 1)[0],
                  txt_ids=inp["txt_ids"][0], guidance=inp["guidance"], kv_cache_mode="extract",
                  num_ref_tokens=n_ref, ref_fixed_timestep=0.0)
        assert (mine - out.sample).abs().max().item() < 1e-4
        assert (ours(**inp) - mine).abs().max().item() < 1e-6       # uncached: the same computation
        later = dict(inp, img=torch.randn_like(inp["img"]), timesteps=torch.rand(2))
        no_refs = {k: v for k, v in later.items() if k not in ("ref_img", "ref_img_ids")}
        cached = ours(**no_refs, kv=kv)
        theirs = ref(hidden_states=later["img"], encoder_hidden_states=inp["txt"],
                     timestep=later["timesteps"],
                     img_ids=inp["img_ids"][0], txt_ids=inp["txt_ids"][0], guidance=inp["guidance"],
                     kv_cache=out.kv_cache, kv_cache_mode="cached").sample
        assert (cached - theirs).abs().max().item() < 1e-4
        assert (cached - ours(**later)).abs().max().item() < 1e-5
        # the sampler: references' K/V once (flux2.denoise) == every step, with guidance's extra
        # forwards
        common = dict(txt_null=inp["txt"] * 0.5, y_null=inp["y"], timesteps=F2.get_schedule(4, 12),
                      guidance=4.0, progress=False, ref_guidance=2.0, text_guidance=3.0)
        args = {k: inp[k] for k in ("img", "img_ids", "txt", "txt_ids", "y", "ref_img",
                                    "ref_img_ids")}
        calls = []
        hook = ours.register_forward_hook(              # how many references each forward was given
            lambda m, a, kw, o: calls.append(len((a[7] if len(a) > 7
                                                  else kw.get("ref_img")) or [])), with_kwargs=True)
        fast = F2.denoise(ours, **args, **common)
        hook.remove()
        slow = SM.denoise(ours, **args, **common)
    assert (fast - slow).abs().max().item() < 1e-5
    assert calls[:3] == [2, 0, 0] and calls.count(2) == 1  # the references ran once, in 12 forwards
    with pytest.raises(ValueError, match="a model trained for it"):
        F2.Flux2(tiny_flux2())(**inp, kv=F2.RefKV())

def test_flux2_full_size_presets_have_bfl_keys_and_diffusers_shapes():
    pytest.importorskip("diffusers")
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers as convert)
    params = {}
    for name in ("klein-4b", "klein-9b", "flux2-dev"):
        cfg = F2.get_config(name)
        with torch.device("meta"):
            ours = F2.Flux2(cfg)
            theirs = Flux2Transformer2DModel(num_layers=cfg.depth,
                                             num_single_layers=cfg.depth_single_blocks,
                                             num_attention_heads=cfg.num_heads,
                                             joint_attention_dim=cfg.context_in_dim,
                                             guidance_embeds=cfg.guidance_embed).state_dict()
        sd = ours.state_dict()
        params[name] = sum(p.numel() for p in ours.parameters())
        converted = convert(dict(sd))
        assert ({k: tuple(v.shape) for k, v in converted.items()}
                == {k: tuple(v.shape) for k, v in theirs.items()})
        assert not any(k.endswith(".bias") for k in sd)                      # no biases anywhere
    # BFL's names and shapes at klein-4B, written out from black-forest-labs/flux2
    # src/flux2/model.py
    with torch.device("meta"):
        sd = F2.Flux2(F2.get_config("klein-base-4b")).state_dict()
    for k, shape in {"img_in.weight": (3072, 128), "txt_in.weight": (3072, 7680),
                     "time_in.in_layer.weight": (3072, 256),
                     "double_stream_modulation_img.lin.weight": (18432, 3072),
                     "single_stream_modulation.lin.weight": (9216, 3072),
                     "double_blocks.4.img_attn.qkv.weight": (9216, 3072),
                     "double_blocks.0.img_mlp.0.weight": (18432, 3072),
                     "double_blocks.0.txt_mlp.2.weight": (3072, 9216),
                     "double_blocks.0.txt_attn.norm.key_norm.scale": (128,),
                     "single_blocks.19.linear1.weight": (27648, 3072),
                     "single_blocks.0.linear2.weight": (3072, 12288),
                     "final_layer.adaLN_modulation.1.weight": (6144, 3072),
                     "final_layer.linear.weight": (128, 3072)
                     }.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("guidance_in") for k in sd) and len(sd) == 5 * 12 + 20 * 4 + 9
    # 3.88B in all for klein-4B; 3.68B / 8.72B / 31.4B in the blocks (field_and_users.md §2.2,
    # derived from BFL's code)
    assert params == {"klein-4b": 3_875_544_576, "klein-9b": 9_078_581_248,
                      "flux2-dev": 32_223_281_152}

def test_flux2_autoencoder_matches_diffusers():
    pytest.importorskip("diffusers")
    from diffusers import Flux2KleinPipeline as P
    p = tiny_flux2().ae
    ours = randomize(F2.AutoEncoder(p).eval(), seed=3)
    g = torch.Generator().manual_seed(4)
    ours.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.3)
    ours.bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    vae = flux2_ae_to_diffusers(ours, flux2_vae_config([32, 64], 1, 4))
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)                                                          # (2, 4, 12, 20)
        mean, std = (vae.bn.running_mean.view(1, -1, 1, 1),
                     (vae.bn.running_var.view(1, -1, 1, 1) + 1e-4).sqrt())
        # (2, 16, 6, 10)
        theirs = (P._patchify_latents(vae.encode(x).latent_dist.mode()) - mean) / std
        assert z.shape == (2, 4, 12, 20) and (F2.patchify(z) - theirs).abs().max().item() < 1e-4
        # the DiT's tokens are the pipeline's: model.pack of our latent == its patchify + pack
        torch.testing.assert_close(M.pack(z), P._pack_latents(theirs), atol=1e-4, rtol=0)
        back = vae.decode(P._unpatchify_latents(theirs * std + mean)).sample
        assert (ours.decode(z) - back).abs().max().item() < 1e-4

def test_flux2_prompt_encoding_matches_the_klein_pipeline(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from diffusers import Flux2KleinPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = str(make_tiny_qwen3(tmp_path / "qwen"))
    cfg = tiny_flux2()
    enc = F2.TextEncoder(cfg, folder, dtype=torch.float32)
    prompts = ["a red cat on grass", "two friends"]
    txt, y = enc(prompts)
    theirs = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder),
        prompts, max_sequence_length=cfg.max_txt_len, hidden_states_layers=cfg.text_layers)
    assert txt.shape == (2, 12, 24) == theirs.shape and y.shape == (2, 0)
    torch.testing.assert_close(txt, theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(txt[0], txt[1])
    enc(["a red cat " * 5])                       # 15 words + the chat's: cut to 12, with a warning
    assert enc.truncated == 1 and "cut to the text encoder's 12" in capsys.readouterr().err
    with pytest.raises(WT.CheckpointError,
                       match=r"the text model Qwen3-4B \(.*nope: no such file or folder"):
        F2.TextEncoder(cfg, str(tmp_path / "nope"))

@pytest.mark.parametrize("steps,seq", [(4, 1024), (50, 4096), (28, 6000)])
def test_flux2_schedule_and_positions_match_diffusers(steps, seq):
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline as P
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    assert F2.empirical_mu(seq, steps) == pytest.approx(compute_empirical_mu(seq, steps), abs=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True,
                                            time_shift_type="exponential")
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                        mu=compute_empirical_mu(seq, steps))
    np.testing.assert_allclose(F2.get_schedule(steps, seq), sched.sigmas.numpy(), atol=1e-6, rtol=0)
    # positions: (t, h, w, l) as the pipeline builds them; references at t = 10, 20, ...
    z = torch.randn(2, 4, 6, 10)
    out = F2.prepare(z, [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 6)], "t",
                     torch.randn(2, 7, 3))
    torch.testing.assert_close(out["img_ids"],
                               P._prepare_latent_ids(P._patchify_latents(z)).float())
    theirs = P._prepare_image_ids([P._patchify_latents(torch.randn(1, 4, 4, 4)),
                                   P._patchify_latents(torch.randn(1, 4, 2, 6))])
    torch.testing.assert_close(torch.cat(out["ref_img_ids"], 1), theirs.float().expand(2, -1, -1))
    torch.testing.assert_close(out["txt_ids"], P._prepare_text_ids(torch.randn(2, 7, 3)).float())
    # UNO's offsets, on h and w
    uno = F2.prepare(z, [torch.randn(2, 4, 4, 4)], "d")["ref_img_ids"][0][0]
    assert uno[0].tolist() == [0, 3, 5, 0] and uno[-1].tolist() == [0, 4, 6, 0]

def test_flux2_probe_reads_the_attention_in_any_block_both_directions(monkeypatch):
    # the probe gets the q, k the block attends with (model.attention, the one hook, sees the same):
    # its img2ref map is the attention mass each target token puts on each reference, its ref2img
    # rows are distributions
    cfg = tiny_flux2()
    flux = randomize(F2.Flux2(cfg).eval())
    inp = flux2_inputs(cfg, refs=[(4, 4), (2, 2)])
    seen, attention = {}, M.attention
    def spy(q, k, v, mask=None):
        seen.setdefault("qk", []).append((q, k))
        return attention(q, k, v, mask)
    monkeypatch.setattr(M, "attention", spy)
    with torch.no_grad():
        plain = flux(**inp)
        for direction in ("img2ref", "ref2img"):
            seen.clear()
            probe = M.AttentionProbe(["d1", "s0"], direction=direction)
            torch.testing.assert_close(flux(**inp, probe=probe), plain, atol=0, rtol=0)
            assert probe.names == ["d1", "s0"] and probe.maps[0].shape == (2, 2, 12)
            if direction == "ref2img":
                torch.testing.assert_close(probe.maps[1].sum(-1), torch.ones(2, 2))
                continue
            q, k = seen["qk"][2]                          # s0's attention: the third of the forward
            L_txt, L_img = inp["txt"].shape[1], inp["img"].shape[1]
            p = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)
                 * q.shape[-1] ** -0.5).softmax(-1)
            img_rows = p[:, :, L_txt:L_txt + L_img]                                   # (B, H, M, L)
            want = torch.stack([img_rows[..., a:b].sum(-1)
                                for a, b in [(17, 21), (21, 22)]], 1).mean(2)
            torch.testing.assert_close(probe.maps[1], want, atol=1e-5, rtol=0)

def test_flux2_loading_is_strict_with_one_line_errors(tmp_path):
    cfg = tiny_flux2()
    dit, ae, _ = write_flux2_weights(tmp_path, cfg)
    f = F2.load_flux(cfg, str(dit), dtype=torch.float32)
    assert all(torch.equal(f.state_dict()[k], v) for k, v in load_file(str(dit)).items())
    sd = load_file(str(dit))
    sd["double_blocks.0.img_attn.qkv.bias"] = torch.zeros(192)   # a FLUX.1-style bias: not FLUX.2's
    del sd["single_stream_modulation.lin.weight"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WT.CheckpointError, match=r"missing keys: "
                       r"single_stream_modulation.lin.weight \| unexpected keys: "
                       r"double_blocks.0.img_attn.qkv.bias"):
        F2.load_flux(cfg, str(tmp_path / "bad.safetensors"))
    # BFL's BatchNorm2d keeps a step counter some copies of ae.safetensors have: taken or not, never
    # needed
    a = F2.load_ae(cfg, str(ae))
    sd = load_file(str(ae))
    sd["bn.num_batches_tracked"] = torch.tensor(7)
    save_file(sd, str(tmp_path / "ae_bn.safetensors"))
    b = F2.load_ae(cfg, str(tmp_path / "ae_bn.safetensors"))
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(a.encode(x), b.encode(x))
    del sd["bn.running_var"]
    save_file(sd, str(tmp_path / "ae_bad.safetensors"))
    with pytest.raises(WT.CheckpointError, match="missing keys: bn.running_var"):
        F2.load_ae(cfg, str(tmp_path / "ae_bad.safetensors"))

def test_flux2_offline_sample_lists_every_missing_weight_at_once(tmp_path, monkeypatch, capsys):
    for var in ("MULTICRAFTER_DIT", "MULTICRAFTER_AE", "MULTICRAFTER_TEXT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    Image.new("RGB", (40, 40), "red").save(tmp_path / "a.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "b.png")
    with pytest.raises(SystemExit) as e:
        main(["--model", "klein-base-4b", "--refs", str(tmp_path / "a.png"),
              str(tmp_path / "b.png"), "--prompt", "two friends", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "3 of 3 weights missing" in err
    for line in (
            "hf download black-forest-labs/FLUX.2-klein-base-4B flux-2-klein-base-4b.safetensors",
            "gated: accept the licence on https://huggingface.co/black-forest-labs/FLUX.2-dev",
            "hf download black-forest-labs/FLUX.2-dev ae.safetensors", "hf download Qwen/Qwen3-4B`",
            "--text-model / MULTICRAFTER_TEXT"):
        assert line in err, line
    assert not (tmp_path / "o.png").exists()

def test_flux2_lora_export_loads_into_diffusers(tmp_path):
    pytest.importorskip("peft")
    cfg = tiny_flux2()
    ours = randomize(F2.Flux2(cfg).eval())
    ref = flux2_to_diffusers(cfg, ours)
    # every layer kind the FLUX.2 table maps; the single blocks' linear1 LoRA on its q|k|v rows
    # (UNO's), one on all
    ML.inject(ours, lora_targets=ML.DEFAULT_LORA
              + ("double_blocks.*.img_mlp.0", "double_blocks.*.txt_mlp.2",
                 "single_blocks.*.linear2"), moe_targets=(), rank=4, alpha=2)
    ours.single_blocks[1].linear1 = ML.LoRALinear(ours.single_blocks[1].linear1.base, rank=3)
    torch.manual_seed(1)
    for _, m in ML.adapters(ours):
        torch.nn.init.normal_(m.up.weight, std=3.0)
    sd, _ = ML.export_diffusers(ours, tmp_path / "lora.safetensors")
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight" in sd
    assert (
        sd["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight"][3 * 64 :]
        .abs()
        .sum()
        == 0
    )
    ref.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="transformer",
                          adapter_name="ours")
    inp = flux2_inputs(cfg, refs=[(4, 4)])
    with torch.no_grad():
        mine, theirs = ours(**inp), diffusers_call(ref, inp)
        with ML.disabled(ours):
            base = ours(**inp)
    assert (mine - base).abs().max() > 1e-2 and (mine - theirs).abs().max().item() < 1e-4

def test_flux2_trains_all_three_stages_and_samples(klein_tiny, tmp_path):
    root, dit, manifest = klein_tiny
    common = ["--preset", "klein-tiny", "--init", str(dit), "--data", manifest, "--batch-size", "2",
              "--rank", "4", "--warmup", "1", "--log-every", "1"]
    TS.main([*common, "--stage", "single", "--steps", "1", "--experts", "0", "--out",
             str(tmp_path / "single")])
    TS.main([*common, "--stage", "multi", "--steps", "2", "--attn-blocks", "all",
             "--attn-direction", "img2ref", "--adapter",
             str(tmp_path / "single" / "latest" / "adapter.safetensors"), "--out",
             str(tmp_path / "multi")])
    log = read_log(tmp_path / "multi")
    assert {"diff", "dice"} <= set(log[-1]) and all(math.isfinite(r["dice"]) for r in log)
    # from a cache: the text model's hidden states and the AE's latents precomputed, neither loaded
    # to train
    cache.write_cache(manifest, str(tmp_path / "cache"), "klein-tiny", device="cpu")
    TS.main([*common[:4], "--cache", str(tmp_path / "cache"), "--batch-size", "2", "--rank", "4",
             "--stage", "single", "--steps", "1", "--out", str(tmp_path / "cached")])
    assert math.isfinite(read_log(tmp_path / "cached")[-1]["diff"])
    adapter = tmp_path / "multi" / "latest" / "adapter.safetensors"
    RL.main(["--preset", "klein-tiny", "--init", str(dit), "--data", manifest, "--adapter",
             str(adapter), "--out", str(tmp_path / "rl"), "--steps", "3", "--window", "1",
             "--group", "2", "--iters", "1", "--text-guidance", "2"])
    rec = read_log(tmp_path / "rl")[-1]
    # G w, 2 forwards
    assert rec["iter"] == 1 and math.isfinite(rec["loss"]) and rec["dit_update"] == 2 * 1 * 2
    refs = [str(root / "data" / r) for r in json.loads(open(manifest).readline())["refs"]]
    main(["--model", str(dit), "--arch", "klein-tiny", "--refs", *refs, "--prompt", "two friends",
          "--steps", "2", "--seed", "0", "--lora", str(tmp_path / "rl" / "latest"
                                                       / "adapter.safetensors"), "--save-attn",
          "--out", str(tmp_path / "s.png")])
    meta = json.loads((tmp_path / "s.json").read_text())
    assert (Image.open(tmp_path / "s.png").size == (32, 32) and meta["pe"] == "t"
            and meta["arch"] == "klein-tiny")
    assert (tmp_path / "s_attn1.png").exists()
    # a test set, two seeds as one batch, with the low-VRAM options (fp8 block weights, blocks
    # streamed)
    main(["--model", str(dit), "--arch", "klein-tiny", "--manifest", manifest, "--out-dir",
          str(tmp_path / "set"),
          "--seeds", "0", "1", "--batch-size", "2", "--steps", "2", "--offload", "--fp8"])
    assert len(list((tmp_path / "set").glob("*/*.png"))) == 2 * 4
    assert export_lora.main([str(adapter), str(tmp_path / "d.safetensors"), "--arch", "klein-tiny",
                             "--moe", "skip"]) == 0

# ---- moe_lora.py: LoRA, MoE-LoRA, strength, adapter files, UNO import, diffusers export ----

def test_fresh_adapters_change_nothing_and_train_only_adapters():
    cfg = tiny_cfg()
    # frozen first: autograd flags alone can
    f = randomize(M.Flux(cfg), seed=4).requires_grad_(False)
    args, kw = tiny_inputs(cfg)                                  # change kernels at the 1e-8 level
    with torch.no_grad():
        before = f(*args, **kw)
    ML.inject(f, rank=4, n_experts=3)
    with torch.no_grad():
        assert torch.equal(f(*args, **kw), before)                       # bit for bit
    trainable = {n for n, p in f.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[-2] in ("down", "up", "router") for n in trainable)
    kinds = {n: type(m).__name__ for n, m in ML.adapters(f)}
    assert (kinds["double_blocks.0.img_mlp.2"] == "MoELoRALinear"
            and kinds["single_blocks.1.linear2"] == "MoELoRALinear")
    assert (kinds["double_blocks.1.txt_attn.qkv"] == "LoRALinear"
            and "double_blocks.0.txt_mlp.2" not in kinds)
    assert f.single_blocks[0].linear1.up.weight.shape == (3 * 64, 4)     # q|k|v rows only
    with pytest.raises(ValueError, match="match no nn.Linear"):
        ML.inject(M.Flux(cfg), lora_targets=["double_blocks.*.nonexistent"], moe_targets=[])

def test_an_adapter_config_out_of_range_is_a_value_error():
    f = M.Flux(M.get_config("toy"))
    for kw, why in ((dict(rank=0), "rank 0 is not a positive integer"),
                    (dict(top_k=5), "top_k 5 is more than n_experts 4"),
                    (dict(n_experts=True), "n_experts True is not"),
                    (dict(alpha=math.inf), "alpha inf is not a finite"),
                    (dict(moe_rank=-2), "moe_rank -2"), (dict(lora_targets="double_blocks.*"),
                                                         "not a list of name")):
        with pytest.raises(ValueError, match=re.escape(why)):
            ML.inject(f, **kw)
    assert not ML.adapters(f)                                           # nothing was wrapped

@pytest.mark.parametrize("k,gate", [(1, "st"), (2, "st"), (1, "switch"), (2, "paper")])
def test_sparse_moe_dispatch_equals_dense_reference(k, gate):
    torch.manual_seed(0)
    m = ML.MoELoRALinear(torch.nn.Linear(24, 40), n_experts=5, rank=6, alpha=3.0, top_k=k,
                         gate=gate)
    torch.nn.init.normal_(m.up.weight)
    x = torch.randn(3, 7, 24)
    # dense reference written out per token: base + scale * sum over chosen experts of w_e B_e A_e x
    probs = torch.softmax(x @ m.router.weight.T, -1)
    top_p, idx = probs.topk(k, -1)
    w = top_p if gate == "switch" else top_p / top_p.sum(-1, keepdim=True)
    A, Bm = m.down.weight.view(5, 6, 24), m.up.weight.view(40, 5, 6)
    ref = m.base(x).clone()
    for b in range(3):
        for l in range(7):
            for s in range(k):
                e = idx[b, l, s]
                ref[b, l] += m.scale * w[b, l, s] * (Bm[:, e] @ (A[e] @ x[b, l]))
    for dispatch in ("sparse", "dense"):
        m.dispatch = dispatch
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    assert m.load.sum().item() == 2 * 3 * 7 * k                          # every routed slot counted

def test_router_gradient_default_gate_and_the_papers_zero_gradient():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 16)
    grads = {}
    for gate in ("st", "switch", "paper"):
        torch.manual_seed(1)
        m = ML.MoELoRALinear(torch.nn.Linear(16, 12), n_experts=4, rank=4, top_k=1, gate=gate)
        torch.nn.init.normal_(m.up.weight)
        m(x).pow(2).mean().backward()
        grads[gate] = m.router.weight.grad.abs().max().item()
    assert grads["st"] > 1e-3 and grads["switch"] > 1e-3
    # Softmax(TopK(logits, 1)) == 1 for any logits: no task gradient reaches the router
    # (rounding only)
    assert grads["paper"] < 1e-5 * grads["st"]

def test_lora_strength_zero_is_the_base_and_s_scales_the_update_by_hand():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 9))
    x = torch.randn(5, 8)
    base = net(x)
    lora, moe = (ML.LoRALinear(net[0], rank=2, alpha=4.0),
                 ML.MoELoRALinear(net[1], n_experts=3, rank=2, alpha=1.0))
    net[0], net[1] = lora, moe
    for m in (lora, moe):
        torch.nn.init.normal_(m.up.weight)
        torch.nn.init.normal_(m.down.weight)
    ML.set_strength(net, 0.0)
    assert torch.equal(net(x), base)                      # bit for bit: the adapter-free model
    s = 0.3
    ML.set_strength(net, s)
    # W x + s (alpha/r) B A x
    h = net[0].base(x) + s * (4.0 / 2) * x @ lora.down.weight.T @ lora.up.weight.T
    torch.testing.assert_close(lora(x), h)
    e = (h @ moe.router.weight.T).argmax(-1)              # top-1: the gate is exactly 1
    A, B = moe.down.weight.view(3, 2, 6), moe.up.weight.view(9, 3, 2)
    want = torch.stack([net[1].base(h[i]) + s * (1.0 / 2) * B[:, e[i]] @ (A[e[i]] @ h[i])
                        for i in range(5)])
    torch.testing.assert_close(net(x), want)
    lora.merge()
    with pytest.raises(ValueError):                       # a merged LoRA's update is in the weights
        ML.set_strength(net, 1.0)

def test_lora_merge_unmerge_and_save_load(tmp_path):
    cfg = tiny_cfg()
    f = randomize(M.Flux(cfg), seed=6)
    base_w = f.single_blocks[0].linear1.weight.clone()
    acfg = ML.inject(f, moe_targets=[], rank=3, alpha=6.0)
    torch.manual_seed(3)
    for _, m in ML.adapters(f):
        torch.nn.init.normal_(m.up.weight, std=0.05)
    args, kw = tiny_inputs(cfg)
    with torch.no_grad():
        unmerged = f(*args, **kw)
        ML.merge(f)
        torch.testing.assert_close(f(*args, **kw), unmerged, atol=1e-5, rtol=1e-5)
        ML.unmerge(f)
        torch.testing.assert_close(f.single_blocks[0].linear1.base.weight, base_w, atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(f(*args, **kw), unmerged, atol=1e-6, rtol=0)
    ML.save_adapter(f, str(tmp_path / "a.safetensors"), acfg)
    g = randomize(M.Flux(cfg), seed=6)
    assert ML.load_adapter(g, str(tmp_path / "a.safetensors"))["rank"] == 3
    with torch.no_grad():
        assert torch.equal(g(*args, **kw), unmerged)

def test_moe_adapter_save_load(tmp_path):
    cfg = tiny_cfg()
    f = randomize(M.Flux(cfg), seed=7)
    acfg = ML.inject(f, rank=2, n_experts=3, top_k=2)
    for _, m in ML.adapters(f):
        torch.nn.init.normal_(m.up.weight, std=0.05)
    args, kw = tiny_inputs(cfg)
    with torch.no_grad():
        want = f(*args, **kw)
    ML.save_adapter(f, str(tmp_path / "moe.safetensors"), acfg)
    g = randomize(M.Flux(cfg), seed=7)
    ML.load_adapter(g, str(tmp_path / "moe.safetensors"))
    with torch.no_grad():
        assert torch.equal(g(*args, **kw), want)
    with pytest.raises(ValueError, match="cannot be merged"):
        ML.merge(g)

@pytest.mark.parametrize("fault", list(B.ADAPTER_FAULTS))
def test_an_adapter_header_is_checked_against_its_tensors_before_anything_is_allocated(
        tmp_path, monkeypatch, fault):
    _, sd, meta, other, _ = toy_weights("adapter")
    path = str(tmp_path / "a.safetensors")
    B.ADAPTER_FAULTS[fault](path, {k: v.detach().clone() for k, v in sd.items()}, meta, other)
    assert os.path.getsize(path) < 1_000_000                 # the file is small, whatever it claims
    def refuse(*a, **kw):
        raise AssertionError("an adapter was allocated before its header was checked")
    monkeypatch.setattr(ML.LoRALinear, "__init__", refuse)
    monkeypatch.setattr(ML.MoELoRALinear, "__init__", refuse)
    with pytest.raises(WT.CheckpointError) as e:
        ML.load_adapter(M.Flux(M.get_config("toy")), path)
    assert (str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
            and len(str(e.value)) < 600)

def test_uno_lora_layout_loads_into_the_right_rows(tmp_path):
    cfg = tiny_cfg()
    D, r = cfg.hidden_size, 4
    f = randomize(M.Flux(cfg), seed=8)
    g = torch.Generator().manual_seed(0)
    uno = {}
    shapes = {"qkv_lora1": (D, 3 * D), "proj_lora1": (D, D), "qkv_lora2": (D, 3 * D),
              "proj_lora2": (D, D)}
    for i in range(cfg.depth):
        for n, (din, dout) in shapes.items():
            uno[f"double_blocks.{i}.processor.{n}.down.weight"] = (
                torch.randn(r, din, generator=g) * 0.1)
            uno[f"double_blocks.{i}.processor.{n}.up.weight"] = (
                torch.randn(dout, r, generator=g) * 0.1)
    for i in range(cfg.depth_single_blocks):
        uno[f"single_blocks.{i}.processor.qkv_lora.down.weight"] = (
            torch.randn(r, D, generator=g) * 0.1)
        uno[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = (
            torch.randn(3 * D, r, generator=g) * 0.1)
        uno[f"single_blocks.{i}.processor.proj_lora.down.weight"] = (torch.randn(
            r, 5 * D, generator=g) * 0.1)
        uno[f"single_blocks.{i}.processor.proj_lora.up.weight"] = (
            torch.randn(D, r, generator=g) * 0.1)
    save_file(uno, str(tmp_path / "dit_lora.safetensors"))
    # expected merged weights, by hand: W += up @ down (UNO's scale is 1); linear1 only in its first
    # 3D rows
    expect = {k: v.clone() for k, v in f.state_dict().items()}
    for i in range(cfg.depth):
        for n, target in (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                          ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
            p = f"double_blocks.{i}.processor.{n}"
            expect[f"double_blocks.{i}.{target}.weight"] += (uno[p + ".up.weight"] @ uno[
                p + ".down.weight"])
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}.processor"
        expect[f"single_blocks.{i}.linear1.weight"][: 3 * D] += (
            uno[p + ".qkv_lora.up.weight"] @ uno[p + ".qkv_lora.down.weight"])
        expect[f"single_blocks.{i}.linear2.weight"] += (uno[p + ".proj_lora.up.weight"]
                                                        @ uno[p + ".proj_lora.down.weight"])
    args, kw = tiny_inputs(cfg)
    plain = randomize(M.Flux(cfg), seed=8)
    plain.load_state_dict(expect)
    with torch.no_grad():
        want = plain(*args, **kw)
        ML.load_adapter(f, str(tmp_path / "dit_lora.safetensors"))       # detects the UNO layout
        torch.testing.assert_close(f(*args, **kw), want, atol=1e-5, rtol=1e-5)
        ML.merge(f)
    sd = {k.replace(".base.", "."): v for k, v in f.state_dict().items()
          if ".down." not in k and ".up." not in k}
    for k in expect:
        torch.testing.assert_close(sd[k], expect[k], atol=1e-6, rtol=0)
    lin1 = "single_blocks.0.linear1.weight"
    assert torch.equal(sd[lin1][3 * D:], randomize(M.Flux(cfg), seed=8).state_dict()[lin1][3 * D:])

def test_diffusers_export_loads_into_flux_transformer_and_matches_ours(diffusers_oracle, tmp_path):
    pytest.importorskip("peft")      # diffusers' load_lora_adapter needs it (requirements-test.txt)
    cfg = tiny_cfg()
    torch.manual_seed(0)
    ours = randomize(M.Flux(cfg).eval())
    ref = to_diffusers(cfg, ours, diffusers_oracle)
    # every layer kind the export maps, single blocks both ways: q|k|v rows only (UNO's) and the
    # whole linear1
    ML.inject(ours, lora_targets=ML.DEFAULT_LORA
              + ("double_blocks.*.img_mlp.0", "double_blocks.*.txt_mlp.2",
                 "double_blocks.*.img_mod.lin", "single_blocks.*.linear2",
                 "single_blocks.*.modulation.lin"), moe_targets=(), rank=4, alpha=2)
    # all of its rows
    ours.single_blocks[1].linear1 = ML.LoRALinear(ours.single_blocks[1].linear1.base, rank=3)
    torch.manual_seed(1)
    for _, m in ML.adapters(ours):
        torch.nn.init.normal_(m.up.weight, std=0.5)
    sd, skipped = ML.export_diffusers(ours, tmp_path / "lora.safetensors")
    assert not skipped and any(".proj_mlp." in k for k in sd)
    (tmp_path / "plain.txt").write_text("")                    # what any file the user creates gets
    mode = lambda p: oct(os.stat(p).st_mode & 0o777)
    assert mode(tmp_path / "lora.safetensors") == mode(tmp_path / "plain.txt")
    ref.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="transformer",
                          adapter_name="ours")
    B, h, w = 2, 8, 6
    img, img_ids, txt, txt_ids, t, y, g, _, _ = flux_call_args(cfg, B=B, h=h, w=w, refs=())
    with torch.no_grad():
        theirs = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                     img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=g, return_dict=False)[0]
        mine = ours(img, img_ids, txt, txt_ids, t, y, g)
        with ML.disabled(ours):
            base = ours(img, img_ids, txt, txt_ids, t, y, g)
    assert (mine - base).abs().max() > 1e-2                    # the adapter does something
    assert (mine - theirs).abs().max().item() < 1e-4
    # MoE-LoRA has no diffusers layer: refused by name, or left out and listed in the file's header
    torch.manual_seed(0)
    moe = M.Flux(cfg).eval()
    ML.inject(moe, rank=4, n_experts=2)
    with pytest.raises(ValueError, match=r"MoE-LoRA layers have no diffusers equivalent "
                       r"\(double_blocks.0.img_mlp.2"):
        ML.export_diffusers(moe)
    sd, skipped = ML.export_diffusers(moe, tmp_path / "partial.safetensors", moe="skip")
    with safe_open(str(tmp_path / "partial.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["multicrafter_skipped_moe"]) == skipped
    assert (skipped == ["double_blocks.0.img_mlp.2", "double_blocks.1.img_mlp.2",
                        "single_blocks.0.linear2", "single_blocks.1.linear2"]
            and not any("ff.net.2" in k or "proj_out" in k for k in sd))

def test_moe_mean_export_is_the_routing_averaged_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    m = ML.MoELoRALinear(base, n_experts=3, rank=2, alpha=4)
    torch.nn.init.normal_(m.up.weight, std=0.3)
    x = torch.randn(50, 8)
    with torch.no_grad():
        m(x)                                                      # counts the routing into m.load
        share = torch.bincount(m.last_idx.flatten(), minlength=3).float() / 50
        A, B = ML.moe_as_lora(m)
        # by hand: sum_e share_e * (alpha / r) * B_e A_e
        want = sum(share[e] * 2.0 * m.up.weight[:, 2 * e:2 * e + 2] @ m.down.weight[2 * e:2 * e + 2]
                   for e in range(3))
    torch.testing.assert_close(B @ A, want, atol=1e-6, rtol=1e-6)

# ---- losses.py: flow matching, Dice, SCAL, MDL, load balance, advantages, GSPO ----

def test_flow_matching_loss_is_zero_for_the_true_velocity():
    x0, noise, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.rand(2)
    seen = {}
    def oracle(x_t, tt):
        seen["x_t"] = x_t
        return noise - x0
    assert LS.flow_matching_loss(oracle, x0, t, noise).item() == 0
    torch.testing.assert_close(seen["x_t"], (1 - t[:, None, None]) * x0 + t[:, None, None] * noise)
    assert abs(LS.flow_matching_loss(lambda x, tt: torch.zeros_like(x), x0, t, noise).item()
               - (noise - x0).pow(2).mean().item()) < 1e-6
    assert (LS.mosaic_warmup(9_999) == 0 and LS.mosaic_warmup(10_500) == 0.5
            and LS.mosaic_warmup(20_000) == 1)

def test_timestep_sampling_follows_the_schedule_shift():
    g = torch.Generator().manual_seed(0)
    t = LS.sample_timesteps(20000, 4096, generator=g)
    u = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    mu = 1.15                                                      # at 4096 tokens (dev at 1024 px)
    torch.testing.assert_close(t, math.exp(mu) / (math.exp(mu) + (1 / u - 1)))
    assert (0 < t.min() and t.max() < 1 and abs(LS.sample_timesteps(20000, 64, shift=False,
                                                                    generator=g).median().item()
                                                - 0.5) < 0.02)

def test_dice_loss_values_bounds_and_gradient():
    maps = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]], dtype=torch.float64)
    masks = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]], dtype=torch.float64)
    # subject 0: a map uniform on its mask scores 0; subject 1 by hand: m/max = [.25 .5 .75 1],
    # 1 - (2 * 1.75 + 1) / (2.5 + 2 + 1) = 1/5.5
    torch.testing.assert_close(LS.dice_loss(maps, masks, eps=1.0),
                               torch.tensor(1 / 5.5, dtype=torch.float64))
    assert (LS.dice_loss(maps, masks, valid=torch.tensor([[1.0, 0.0]], dtype=torch.float64)).item()
            == 0.0)
    g = torch.Generator().manual_seed(0)
    rnd = torch.rand(4, 3, 16, generator=g, dtype=torch.float64).softmax(-1)
    m = (torch.rand(4, 3, 16, generator=g, dtype=torch.float64) > 0.7).double()
    assert 0 <= LS.dice_loss(rnd, m).item() <= 3                         # bounded by N
    # perfect maps
    assert LS.dice_loss(m / m.sum(-1, keepdim=True).clamp_min(1), m, eps=1e-6).item() < 1e-5
    rnd.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: LS.dice_loss(x, m), (rnd,))

def test_scal_loss_vectorized_and_finite_under_underflow():
    lp = [torch.log_softmax(torch.randn(3, 5, dtype=torch.float64), -1),
          torch.log_softmax(torch.randn(2, 5,
          dtype=torch.float64), -1)]
    tg = [torch.tensor([0, 4, 2]), torch.tensor([1, 1])]
    want = -(lp[0][0, 0] + lp[0][1, 4] + lp[0][2, 2] + lp[1][0, 1] + lp[1][1, 1]) / 5
    torch.testing.assert_close(LS.scal_loss(lp, tg), want)
    # through the probe: the target token's probability underflows in fp32 (scores 200 apart)
    B, H, D = 1, 2, 4
    q = torch.zeros(B, H, 3, D)
    k = torch.zeros(B, H, 3, D)
    q[..., 2, 0] = 20.0                        # reference token (position 2)
    k[..., 0, 0], k[..., 1, 0] = 20.0, -20.0   # image tokens 0, 1: scores +200 / -200 (x 1/sqrt(4))
    probe = M.AttentionProbe(rows=[torch.tensor([[0, 0]])])
    probe(q, k, M.Spans(txt=0, img=(0, 2), refs=[(2, 3)]))
    loss = LS.scal_loss(probe.mean_logp(), [torch.tensor([1])])
    # scores q.k/sqrt(d) = +200 and -200: -log p(token 1) = 200 - (-200) = 400 (p = e^-400
    # underflows fp32)
    assert torch.isfinite(loss) and abs(loss.item() - 400) < 1e-3
    assert LS.scal_loss([torch.zeros(0, 5)], [torch.zeros(0, dtype=torch.long)]).item() == 0
    x = [l.clone().requires_grad_(True) for l in lp]
    assert torch.autograd.gradcheck(lambda a, b: LS.scal_loss([a, b], tg), tuple(x))

def test_mdl_loss_against_torch_distributions():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]], dtype=torch.float64)
    maps = p[None]
    C = [Categorical(probs=x) for x in p]
    pairs = [(0, 1), (0, 2), (1, 2)]
    sym = [kl_divergence(C[i], C[j]) + kl_divergence(C[j], C[i]) for i, j in pairs]
    torch.testing.assert_close(LS.mdl_loss(maps, eps=1e-30), -sum(sym) / 3)
    js = [0.5 * (kl_divergence(C[i], Categorical(probs=(p[i] + p[j]) / 2)) +
                 kl_divergence(C[j], Categorical(probs=(p[i] + p[j]) / 2))) for i, j in pairs]
    torch.testing.assert_close(LS.mdl_loss(maps, kind="js", eps=1e-30), -sum(js) / 3)
    assert LS.mdl_loss(p[:1].expand(2, 3)[None]).item() == 0            # identical distributions
    assert LS.mdl_loss(p[None, :1]).item() == 0                          # a single reference
    # padded references do not count
    torch.testing.assert_close(
        LS.mdl_loss(maps, valid=torch.tensor([[1.0, 1.0, 0.0]]), eps=1e-30).double(),
        -sym[0].double())
    x = p[None].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: LS.mdl_loss(m, eps=1e-30), (x,))

def test_balance_loss_uniform_and_skewed():
    E = 4
    uniform_p = torch.full((2, 8, E), 1 / E)
    idx = torch.arange(16).reshape(2, 8, 1) % E                         # each expert gets a quarter
    assert abs(LS.balance_loss(uniform_p, idx, E).item() - 1) < 1e-6
    skew_p = torch.tensor([0.97, 0.01, 0.01, 0.01]).expand(2, 8, E)
    assert (
        abs(LS.balance_loss(skew_p, torch.zeros(2, 8, 1, dtype=torch.long), E).item() - E * 0.97)
        < 1e-5)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :4] = True                                                    # only these tokens count
    idx2 = idx.clone()
    idx2[:, 4:] = 0
    assert abs(LS.balance_loss(uniform_p, idx2, E, mask).item() - 1) < 1e-6
    # gradient: only through P_e (f_e is a count); by hand d/dP_e of E * sum f_e P_e, P_e = mean
    # over tokens
    p = torch.rand(2, 8, E, dtype=torch.float64).softmax(-1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: LS.balance_loss(q, idx2, E), (p,))
    f = torch.bincount(idx2.flatten(), minlength=E).double() / idx2.numel()
    LS.balance_loss(p, idx2, E).backward()
    torch.testing.assert_close(p.grad, (E * f / 16).expand(2, 8, E))

def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 100.0]])
    a = LS.group_advantages(r, eps=0.0 + 1e-12, clip=1.5)
    sd = math.sqrt(1.25)                                  # population std of 1, 2, 3, 4
    assert torch.allclose(a[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / sd)
    assert torch.equal(a[1], torch.zeros(4))              # a group that scores alike learns nothing
    # clamped at 1.5
    assert a[2].max() == 1.5 and torch.allclose(a[2, :3], torch.full((3,), -1 / math.sqrt(3)))

def test_gspo_ratio_is_one_on_policy_and_the_gradient_is_the_policy_gradient():
    torch.manual_seed(0)
    old = torch.randn(5, 3, dtype=torch.float64)
    logp = old.clone().requires_grad_(True)
    adv = torch.randn(5, dtype=torch.float64)
    loss, s, cut = LS.gspo_loss(logp, old, adv)
    assert torch.equal(s, torch.ones(5, dtype=torch.float64)) and not cut.any()
    loss.backward()
    # -(1/B) sum_i A_i * (1/w) sum_t grad log pi: the REINFORCE form
    assert torch.allclose(logp.grad, (-adv / (5 * 3))[:, None].expand(5, 3))
    # off policy: the ratio is the geometric mean of the per-step ratios (Eq. 7)
    shifted = old + torch.tensor([[1e-4, 2e-4, 3e-4]], dtype=torch.float64)
    _, s, _ = LS.gspo_loss(shifted, old, adv, 1.0, 1.0)
    assert torch.allclose(s, torch.full((5,), math.exp(2e-4), dtype=torch.float64))

@pytest.mark.parametrize("adv,delta,cut", [(1.0, 1e-3, True), (1.0, -1e-3, False),
                                           (-1.0, -1e-3, True), (-1.0, 1e-3, False),
                                           (1.0, 1e-4, False), (-1.0, -1e-4, False)])
def test_gspo_clipping_stops_the_gradient_in_the_direction_of_the_advantage(adv, delta, cut):
    # s = exp(delta); eps 3e-4 / 4e-4: A > 0 is cut once s > 1 + 4e-4, A < 0 once s < 1 - 3e-4
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.full((1, 2), delta, dtype=torch.float64, requires_grad=True)
    loss, s, clipped = LS.gspo_loss(logp, old, torch.tensor([adv], dtype=torch.float64), 3e-4, 4e-4)
    loss.backward()
    assert bool(clipped[0]) == cut
    if cut:
        assert torch.equal(logp.grad, torch.zeros(1, 2, dtype=torch.float64))
        assert loss.item() == pytest.approx(-adv * (1 + (4e-4 if adv > 0 else -3e-4)))
    else:       # the unclipped branch: d(-s A)/d logp_t = -A s / w
        assert torch.allclose(logp.grad, torch.full((1, 2), -adv * math.exp(delta) / 2,
                                                    dtype=torch.float64))

# ---- data.py: images in, manifests, check, masks, writers, moved commands, pre-flight ----

# fault -> the reason in its one-line error, or what the loaded image must be
IMAGE_FAULTS = {
    "missing file": "no such file", "zero bytes": "empty file", "a folder": "not a file",
    "not an image (text)": "not a readable image", "truncated PNG": "truncated",
    "truncated JPEG": "truncated", "decompression bomb (30000x30000 header)": "decompression bomb",
    "10000x10000 (over MAX_PIXELS)": "10000x10000",
    "JPEG named .png": lambda im: im.size == (8, 8) and im.getpixel((4, 4))[0] > 240,
    "1x1": lambda im: im.size == (1, 1) and im.getpixel((0, 0)) == RED,
    "1x4000 strip": lambda im: im.size == (1, 4000),
    "CMYK JPEG": lambda im: im.getpixel((4, 4))[0] > 200 and max(im.getpixel((4, 4))[1:]) < 50,
    "16-bit grayscale": lambda im: im.getpixel((4, 4)) == WHITE,       # 65535 is white, not clipped
    "palette + transparent index": lambda im: im.getpixel((0, 0)) == WHITE
    and im.getpixel((4, 4)) == (0, 255, 0),
    "RGBA, fully transparent red": lambda im: im.getpixel((4, 4)) == WHITE,    # composited on white
    "animated GIF (red, blue)": lambda im: im.getpixel((4, 4)) == RED,             # the first frame
    "animated WebP (red, blue)": lambda im: im.getpixel((4, 4))[0] > 240 and im.getpixel((4, 4))[2]
    < 16, "EXIF-rotated JPEG (40x20, rotate 90)": lambda im: im.size == (20, 40),        # upright
}

# fault -> the reason in the manifest's one-line problem for line 2 (training skips it), or None: a
# good record
MANIFEST_FAULTS = {
    "path with ..": "'..' is not allowed", "absolute path": "absolute paths are not allowed",
    "symlink out of the root": "resolves outside", "id given twice": "already the id of line 1",
    "id that is a path (../x)": "not an integer or a name", "0 references": "not a non-empty list",
    "100 references (MAX_REFS = 8)": "100 references, more than 8",
    "empty prompt": "missing or empty",
    "10,000-character prompt": None, "lone surrogate in the prompt": "not valid Unicode",
    "non-UTF-8 byte in the prompt": "not UTF-8", "invalid JSON": "invalid JSON",
}

# the faults added to reliability.badinput's Manifests table -> the reason of their one-line problem
# (line 2)
JSON_FAULTS = {
    "100,000-deep nested array": "nested deeper than 16 levels",
    "a field nested 20 deep": "nested deeper than 16",
    "5,000-digit id": "an integer of more than 4300 digits", "300-digit id": "(200 at most)",
    "lone surrogate in a caption": "need a string of valid Unicode",
    "a 17 MiB line": "longer than 16 MiB",
}

# the subject's tokens in a 32 x 32 target of 4 px tokens: rows 8..15 are token rows 2-3, columns
# 4..11 token columns 1-2
SUBJECT_TOKENS = [2 * 8 + 1, 2 * 8 + 2, 3 * 8 + 1, 3 * 8 + 2]

def test_load_image_modes_the_fault_table_leaves_out(tmp_path):
    # reliability.badinput's BAD_IMAGES
    # (test_bad_images_same_behaviour_in_loader_check_and_training) holds a fully transparent RGBA,
    # a palette image, a CMYK JPEG, an animated GIF, an EXIF-rotated JPEG, a missing, an empty and a
    # text file; here: half transparency, 16-bit levels below white, a PNG cut inside its header
    Image.new("LA", (3, 2), (0, 128)).save(tmp_path / "la.png")             # half-transparent black
    assert load_image(str(tmp_path / "la.png")).getpixel((0, 0)) == (127, 127, 127)
    a16 = np.array([[0, 200 * 257, 65535]], dtype=np.uint16)      # 16-bit white is 65535, not 65280
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert ([load_image(str(tmp_path / "g16.png")).getpixel((i, 0))[0] for i in range(3)]
            == [0, 200, 255])
    Image.new("RGB", (64, 64)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(InputError, match="cut.png"):
        load_image(str(tmp_path / "cut.png"))

def test_every_bad_image_fault_is_checked():
    assert set(IMAGE_FAULTS) == set(B.BAD_IMAGES)

@pytest.mark.parametrize("fault", list(B.BAD_IMAGES))
def test_bad_images_same_behaviour_in_loader_check_and_training(tmp_path, capsys, fault):
    names, want = B.write_bad_images(str(tmp_path)), IMAGE_FAULTS[fault]
    path, manifest = str(tmp_path / names[fault]), str(tmp_path / "m.jsonl")
    with open(manifest, "w") as f:                  # the bad reference (line 1), then a good record
        f.writelines(json.dumps(dict(target="t.png", prompt="x", refs=[r])) + "\n"
                     for r in (names[fault], "t.png"))
    status = D.main(["check", manifest])
    out = capsys.readouterr().out
    ds = DS.ManifestDataset(manifest, size=32, ref_size=16, token_px=4)
    if callable(want):
        assert want(load_image(path)) and status == 0
        assert len(ds) == 2 and ds[0]["refs"].shape == (1, 3, 16, 16) and ds.n_failed == 0
        return
    with pytest.raises(InputError, match=want) as e:
        load_image(path)
    assert names[fault] in str(e.value) and "\n" not in str(e.value)
    assert status == 1 and f"{manifest}:1: refs[0]: " in out and want in out
    if ds.n_skipped:                                 # refused from the header alone ...
        assert ds.skipped[0][0] == 1 and want in ds.skipped[0][2] and len(ds) == 1
    else:                                            # ... or when decoded: replaced, with a warning
        assert ds[0]["prompt"] == "x" and ds.n_failed == 1 and want in capsys.readouterr().err

def test_preprocess_ref_resizes_then_pads_on_white():
    for size in ((300, 200), (1, 1), (500, 3), (17, 90)):
        assert preprocess_ref(Image.new("RGB", size), 320).size == (320, 320)
    r = preprocess_ref(Image.new("RGB", (300, 100), (0, 0, 0)), 30)   # padded on white, aspect kept
    assert r.getpixel((15, 2)) == (255, 255, 255) and r.getpixel((15, 15)) == (0, 0, 0)
    assert r.getpixel((15, 27)) == (255, 255, 255)
    # a 1 x 60000 strip padded to a square first would be 3.6 gigapixels; resized first it is 16 x
    # 16 at once
    ref = preprocess_ref(Image.new("RGB", (1, 60000), RED), 16)
    assert ref.size == (16, 16) and ref.getpixel((7, 8)) == RED and ref.getpixel((8, 8)) == WHITE

def test_check_good_manifest(toy_manifest, capsys):
    assert D.main(["check", toy_manifest]) == 0
    assert "12 records, 0 bad, all good" in capsys.readouterr().out
    assert D.main(["check", toy_manifest + ".missing"]) == 2    # no manifest at all: one-line error

def test_check_reports_every_bad_record(bad_manifest, capsys):
    path, expected = bad_manifest
    assert D.main(["check", path]) == 1
    out = capsys.readouterr().out
    for line, field in expected.items():
        assert f"{path}:{line}: {field}: " in out, (line, field)
    assert f"{path}: 15 records, {len(expected)} bad" in out           # the blank line is no record
    # quick mode reads headers only: the truncated image and the empty mask pass
    assert D.main(["check", "--quick", path]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3:" not in out and f"{path}:6:" not in out and f"{path}:2: refs[0]" in out

def test_every_manifest_fault_is_checked():
    assert set(B.manifest_faults("/r")) == set(MANIFEST_FAULTS) | set(JSON_FAULTS)

@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
def test_bad_manifest_records_in_check_and_training(tmp_path, capsys, fault):
    manifest, want = B.write_bad_manifests(str(tmp_path))[fault], MANIFEST_FAULTS[fault]
    status = D.main(["check", manifest])
    out = capsys.readouterr().out
    ds = DS.ManifestDataset(manifest, size=32, ref_size=16, token_px=4)
    if want is None:                       # a long prompt is fine: the encoder cuts it, and says so
        assert status == 0 and len(ds) == 2
        enc = EN.ByteTextEncoder(M.get_config("toy"))
        txt, _ = enc([ds[1]["prompt"], ds[0]["prompt"]])
        assert (enc.truncated == 1
                and "10000 tokens is cut to the text encoder's 128" in capsys.readouterr().err)
        assert txt.shape == (2, 128, 64)
        return
    line = [l for l in out.splitlines() if l.startswith(f"{manifest}:2: ")]
    assert status == 1 and len(line) == 1 and want in line[0], out
    assert (len(ds) == 1 and ds.skipped[0][0] == 2 and want in ds.skipped[0][2]
            and ds[0]["prompt"] == "a thing")

@pytest.mark.parametrize("fault", list(JSON_FAULTS))
def test_manifest_lines_json_cannot_take_are_findings_in_check_training_and_eval(
        tmp_path, capsys, fault):
    # each reader (check, the training dataset, eval) names line 2 and keeps line 1; nothing raises
    manifest, want = B.write_bad_manifests(str(tmp_path))[fault], JSON_FAULTS[fault]
    status = D.main(["check", manifest])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(f"{manifest}:2: ")]
    assert status == 1 and len(lines) == 1 and want in lines[0]
    ds = DS.ManifestDataset(manifest, size=32, ref_size=16, token_px=4)
    assert len(ds) == 1 and ds.skipped[0][0] == 2 and want in ds.skipped[0][2]
    gen = tmp_path / "gen"
    gen.mkdir()
    Image.new("RGB", (32, 32)).save(gen / "a.png")
    assert toy.main(["eval", "--manifest", manifest, "--images", str(gen), "--out", str(
        tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert (report["n"] == 1 and [b["line"] for b in report["bad"]] == [2]
            and want in report["bad"][0]["why"])

@pytest.mark.parametrize("stream", ["device", "pipe"])
def test_an_endless_manifest_is_read_boundedly(stream):
    # /dev/zero (a device) and an endless pipe have no line end: one finding after MAX_LINE bytes,
    # in a process that may not hold more than 3 GB (reading all of it would need unbounded memory)
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    feed = (subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE) if stream == "pipe"
            else None)
    try:
        r = subprocess.run([sys.executable, "data.py", "check",
                            "/dev/zero" if feed is None else "/dev/stdin"],
                           stdin=feed.stdout if feed else None, preexec_fn=limit,
                           capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        if feed:
            feed.kill()
            feed.wait()
    out = r.stdout.splitlines()
    assert (r.returncode == 1
            and out[0].endswith(":1: record: longer than 16 MiB (not a manifest line)")), r.stderr
    assert out[1].endswith("1 records, 1 bad (1 problems)") and not r.stderr

def test_ids_that_name_one_file_are_one_id(tmp_path, capsys):
    root = tmp_path
    Image.new("RGB", (32, 32)).save(root / "t.png")
    (root / "m.jsonl").write_text("".join(json.dumps(dict(
        id=i, target="t.png", prompt="x", refs=["t.png"])) + "\n"
        for i in ("1", 1, 2)))
    assert D.main(["check", str(root / "m.jsonl")]) == 1
    assert f"{root / 'm.jsonl'}:2: id: 1 is already the id of line 1" in capsys.readouterr().out

def test_uno_json_list(tmp_path, capsys):
    solid_png(tmp_path / "t.png", (40, 32))
    solid_png(tmp_path / "a.png", (16, 16))
    items = [dict(prompt="a and a", image_paths=["a.png", "a.png"], image_tgt_path="t.png"),
             dict(prompt="one", image_path="a.png", image_tgt_path="t.png"),
             dict(prompt="missing", image_paths=["b.png"], image_tgt_path="t.png")]
    (tmp_path / "uno.json").write_text(json.dumps(items, indent=2))
    assert D.main(["check", str(tmp_path / "uno.json")]) == 1
    out = capsys.readouterr().out
    # where the third item starts
    line = json.dumps(items, indent=2).splitlines().index("  {", 10) + 1
    assert f"uno.json:{line}: refs[0]: " in out and "3 records, 1 bad" in out
    ds = DS.ManifestDataset(str(tmp_path / "uno.json"), size=32, ref_size=16, token_px=4)
    assert len(ds) == 2 and ds[0]["refs"].shape == (2, 3, 16, 16) and ds[1]["prompt"] == "one"
    (tmp_path / "broken.json").write_text('[\n {"prompt": "x"},\n {"prompt": }\n]')
    assert D.main(["check", str(tmp_path / "broken.json")]) == 1
    assert "broken.json:3: record: invalid JSON" in capsys.readouterr().out
    # an item JSON cannot take ends the list there, with one finding
    good = json.dumps(dict(prompt="x", image_paths=["r.png"], image_tgt_path="t.png"))
    (tmp_path / "u.json").write_text(f"[{good},\n{good},\n" + "[" * 100_000 + "]" * 100_000
                                     + f",\n{good}]")
    records, problems = D.read_manifest(str(tmp_path / "u.json"))
    assert [line for line, _ in records] == [1, 2] and problems == [(
        3, "record", "nested deeper than 16 levels")]

def test_paths_cannot_escape_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    solid_png(root / "sub" / "in.png", (4, 4))
    solid_png(tmp_path / "out.png", (4, 4))
    os.symlink(tmp_path / "out.png", root / "out_link.png")
    os.symlink(root / "sub" / "in.png", root / "in_link.png")
    os.symlink(tmp_path, root / "up")
    for bad in ("../out.png", "sub/../../out.png", "sub\\..\\..\\out.png",
                str(tmp_path / "out.png"), "out_link.png", "up/out.png", "", None, 3, "a\0b"):
        with pytest.raises(D.DataError):
            D.resolve(str(root), bad)
    assert D.resolve(str(root), "sub/in.png") == str(root / "sub" / "in.png")
    assert D.resolve(str(root), "in_link.png")                    # a link that stays inside is fine

def test_every_mask_fault_is_checked():
    assert B.SUBJECT == (slice(8, 16), slice(4, 12)) and len(B.MASK_FAULTS) == 8

@pytest.mark.parametrize("fault", list(B.MASK_FAULTS))
def test_a_cut_out_mask_is_its_alpha_in_check_and_training(tmp_path, capsys, fault):
    # cut-outs (RGBA, LA, palette or RGB with a transparent colour) are their alpha; gray and opaque
    # files their gray
    manifest = B.write_mask_manifests(str(tmp_path))[fault]
    assert D.main(["check", manifest]) == 0
    assert (
        D.load_mask(str(tmp_path / "masks" / f"mask{list(B.MASK_FAULTS).index(fault)}.png")).sum()
        == 64)
    masks = DS.ManifestDataset(manifest, size=32, ref_size=16, token_px=4)[0]["masks"][0]    # (64,)
    want = torch.zeros(64)
    want[SUBJECT_TOKENS] = 1.0
    assert torch.equal(masks, want)

def test_a_fully_transparent_cut_out_is_an_empty_mask(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "t.png")
    # white, but transparent
    Image.new("RGBA", (32, 32), (255, 255, 255, 0)).save(tmp_path / "m.png")
    (tmp_path / "m.jsonl").write_text(json.dumps(dict(target="t.png", prompt="x", refs=["t.png"],
                                                      masks=["m.png"])))
    assert D.main(["check", str(tmp_path / "m.jsonl")]) == 1
    assert f"{tmp_path / 'm.jsonl'}:1: masks[0]: m.png: empty mask" in capsys.readouterr().out

def test_rl_records_and_exif_orientation(tmp_path, capsys):
    # a camera JPEG stored 40x20 with "rotate 90" in EXIF is 20x40 upright: its masks are 20x40 too
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "cam.jpg", exif=exif.tobytes())
    solid_png(tmp_path / "m.png", (20, 40), 255, "L")
    solid_png(tmp_path / "a.png", (16, 16))
    recs = [dict(target="cam.jpg", prompt="p", refs=["a.png"], masks=["m.png"]),
            dict(prompt="two things", refs=["a.png", "a.png"], kinds=["face", "object"],
                 captions=["a", "b"]),
            dict(prompt="bad kinds", refs=["a.png"], kinds=["animal"]),
            dict(prompt="masks without a target", refs=["a.png"], masks=["m.png"])]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert D.main(["check", str(tmp_path / "m.jsonl")]) == 1
    out = capsys.readouterr().out
    assert (":3: kinds: " in out and ":4: masks: masks need a target" in out
            and "4 records, 2 bad" in out)
    ds = DS.ManifestDataset(str(tmp_path / "m.jsonl"), ref_size=16, token_px=4,
                            buckets=[(32, 32), (64, 32)])
    # RL records have no target to train on
    assert len(ds) == 1 and ds.bucket_of(0) == ((64, 32), 1)
    assert ds[0]["masks"].sum() * 16 == pytest.approx(64 * 32)  # the upright mask covers everything

def test_no_writer_overwrites_what_it_reads_or_a_runs_work(tmp_path, capsys):
    # data.check_output, the one rule of every command that writes: by real path, links followed;
    # --force overrides
    torch.manual_seed(0)
    flux = M.Flux(M.get_config("toy"))
    acfg = ML.inject(flux, rank=4, n_experts=2)
    adapter = tmp_path / "adapter.safetensors"
    ML.save_adapter(flux, str(adapter), acfg)
    os.symlink(adapter, tmp_path / "link.safetensors")
    manifest = toy.write_world(str(tmp_path / "data"), 2, seed=0)
    data = os.path.dirname(manifest)
    ref = os.path.join(data, json.loads(open(manifest).readline())["refs"][0])
    world = toy.write_world(str(tmp_path / "world"), 1)
    run = tmp_path / "run"                                   # someone's run: a checkpoint, its lock
    run.mkdir()
    (run / ".lock").write_text("")
    runs.write_checkpoint(str(run), 1,
                          {"adapter.safetensors": lambda f: f.write(adapter.read_bytes())}, 1, 2)
    exit_status = (lambda fn, argv: fn(argv) if fn is not main
                   else pytest.raises(SystemExit, main, argv).value.code)
    cases = [  # (command, its arguments, the file it must leave alone)
        (export_lora.main, [str(adapter), str(adapter), "--arch", "toy", "--moe", "mean"], adapter),
        (export_lora.main, [str(adapter), str(tmp_path / "link.safetensors"), "--arch", "toy",
                            "--moe", "mean"],
         adapter),
        (export_lora.main, [str(adapter), str(run / "latest" / "adapter.safetensors"), "--arch",
                            "toy"],
         run / "ckpt-0000001" / "adapter.safetensors"),
        (main, ["--refs", ref, "--steps", "1", "--out", ref], ref),
        (main, ["--manifest", manifest, "--steps", "1", "--out-dir", data], manifest),
        (cache.main, ["--manifest", manifest, "--out", data, "--device", "cpu"], manifest),
        # rewards'
        (toy.main, ["eval", "--manifest", manifest, "--images", data, "--out", manifest], manifest),
        # the world's own
        (toy.main, ["eval", "--manifest", world, "--images", data, "--out", world], world),
        (toy.main, ["--out", str(run / "latest"), "--n", "1"],
         run / "ckpt-0000001" / "checkpoint.json"),
        (C.main, ["objects", "--manifest", manifest, "--out", data], manifest),
        (TS.cli, ["--data", manifest, "--init", "assets/toy", "--adapter",
                         str(run / "latest" / "adapter.safetensors"), "--out", str(run), "--fresh",
                         "--steps", "1"],
         run / "ckpt-0000001" / "adapter.safetensors"),
    ]
    for fn, argv, kept in cases:
        before = open(kept, "rb").read()
        capsys.readouterr()
        assert exit_status(fn, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refused, writing there would destroy" in err[0], (argv, err)
        assert (open(kept, "rb").read() == before and sorted(os.listdir(run))
                == [".lock", "ckpt-0000001", "latest"])
    assert export_lora.main(cases[0][1] + ["--force"]) == 0                  # told explicitly
    assert "multicrafter_moe_export" in WT.read_header(str(adapter), metadata=True)[1]

def test_a_full_disk_is_one_line_naming_the_file_in_every_writer(
        tmp_path, capsys, monkeypatch, toy_manifest):
    flux = M.Flux(M.get_config("toy"))
    ML.save_adapter(flux, str(tmp_path / "adapter.safetensors"),
                    ML.inject(flux, rank=4, n_experts=2))
    def full(*a, **k):                                    # what safetensors raises onto a full disk
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    out = tmp_path / "x" / "lora.safetensors"
    with monkeypatch.context() as mp:
        mp.setattr(safetensors.torch, "save_file", full)
        assert export_lora.main([str(tmp_path / "adapter.safetensors"), str(out), "--arch", "toy",
                                 "--moe", "mean"]) == 2
    assert (capsys.readouterr().err.strip().splitlines()
            == [f"error: {out}: cannot write (No space left on device)"])
    assert os.listdir(tmp_path / "x") == []                                # no temporary left
    # the disk fills as data.write_atomic flushes (fsync reports it): cache.py's shards, as every
    # such file
    def fsync_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync_full)
    assert (
        cache.main(["--manifest", toy_manifest, "--out", str(tmp_path / "c"), "--device", "cpu"])
        == 2)
    assert (capsys.readouterr().err.strip().splitlines()[-1] ==
            f"error: {tmp_path / 'c' / 'shard_00000.safetensors'}: cannot "
            "write (No space left on device)")
    assert os.listdir(tmp_path / "c") == []

def test_moved_commands_point_to_their_new_home(capsys):
    for old, new in (("toy", "toy.py"), ("curate", "curate.py faces"),
                     ("curate-objects", "curate.py objects"),
                     ("correspond", "curate.py correspond"), ("cache", "cache.py")):
        assert D.main([old, "--out", "x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and new in err
    assert R.main(["eval", "--manifest", "m.jsonl", "--images", ".", "--reward", "toy"]) == 2
    assert "toy.py eval" in capsys.readouterr().err

def test_preflight_names_every_problem_before_reading_any_data(no_weights, monkeypatch, capsys):
    tmp = no_weights
    monkeypatch.setattr(D, "read_manifest",
                        lambda *a, **k: pytest.fail("data read before the pre-flight"))
    manifest = tmp / "m.jsonl"
    manifest.write_text("{}\n")
    out = tmp / "runs" / "x"
    # train_sft.py on FLUX: the four weights, the missing held-out set and the mistyped adapter, in
    # one line
    with pytest.raises(D.InputError) as e:
        TS.main(["--preset", "flux-dev", "--stage", "multi", "--data", str(manifest), "--val-data",
                 str(tmp / "val.jsonl"), "--adapter", str(tmp / "adaptr.safetensors"), "--out",
                 str(out)])
    msg = str(e.value)
    for part in ("3 problems", "4 of 4 weights missing", "flux1-dev.safetensors", "ae.safetensors",
                 "T5-XXL", "CLIP-L", "val.jsonl: no such file", "adaptr.safetensors: no such file"):
        assert part in msg, (part, msg)
    # train_rl.py: the FLUX weights and the reward models, together
    with pytest.raises(D.InputError) as e:
        RL.main(["--preset", "flux-dev", "--reward", "human", "--face-root", str(tmp), "--data",
                 str(manifest), "--out", str(out)])
    msg = str(e.value)
    assert ("4 of 4 weights missing" in msg and "HPS" in msg
            and "face models" in msg and "CLIP (" in msg), msg
    # rewards.py eval: every model its metrics load (DINOv2 for DINO-I too) and the images' folder
    assert R.main(["eval", "--manifest", str(manifest), "--images", str(tmp / "samples"),
                   "--reward", "human", "--face-root", str(tmp)]) == 2
    err = capsys.readouterr().err
    for part in ("CLIP (", "HPS (", "DINOv2 (", "face models", "samples: no such folder"):
        assert part in err, (part, err)
    # cache.py: the AE, T5 and CLIP at once
    assert (
        cache.main(["--manifest", str(manifest), "--out", str(tmp / "c"), "--model", "flux-dev"])
        == 2)
    assert "3 of 3 weights missing" in capsys.readouterr().err
    assert not (tmp / "runs").exists() and not (tmp / "c").exists()

def test_a_mistyped_path_is_named_as_the_users_own_mistake_first(no_weights, toy_run, capsys):
    tmp, (root, manifest) = no_weights, toy_run
    # not "--prompt is required", not a FLUX download
    for extra in ([], ["--prompt", "two circles"]):
        with pytest.raises(SystemExit):
            S.main(["--model", "assets/tyo", "--refs", *DEMO, "--out", str(tmp / "x.png"), *extra])
        err = capsys.readouterr().err
        assert (err.startswith("error: --model assets/tyo: no such file or folder")
                and "weights missing" not in err)
    # the trainers: a mistyped --init is named, with the mistyped data, before the manifest is read
    assert TS.cli(["--init", "assets/tyo", "--data", manifest + "l", "--out", str(tmp / "o")]) == 2
    err = capsys.readouterr().err
    assert "--init assets/tyo: no such folder" in err and "manifest.jsonll: no such file" in err
    # the toy's adapters need a base
    assert TS.cli(["--data", manifest, "--out", str(tmp / "o")]) == 2
    assert "--init assets/toy" in capsys.readouterr().err and not (tmp / "o").exists()

# ---- dataset.py: items, buckets, points to tokens, collate, batches, prompts ----

class FakeDataset:
    def __init__(self, n, keys=3):
        self.n, self.keys = n, keys

    def __len__(self):
        return self.n

    def bucket_of(self, i):
        return ((32, 32), i % self.keys + 1)

def test_dataset_items(toy_manifest):
    ds = DS.ManifestDataset(toy_manifest, size=32, ref_size=16, token_px=4)
    recs = read_jsonl(toy_manifest)
    assert len(ds) == len(recs) and ds.skipped == [] and ds.n_skipped == 0
    for i in range(len(ds)):
        it, N = ds[i], len(recs[i]["refs"])
        assert ds.bucket_of(i) == ((32, 32), N) and it["bucket"] == (32, 32) and it["index"] == i
        assert it["target"].shape == (3, 32, 32) and it["refs"].shape == (N, 3, 16, 16)
        assert (it["target"].min() >= -1 and it["target"].max() <= 1
                and it["prompt"] == recs[i]["prompt"])
        assert it["masks"].shape == (N, 64) and len(it["points"]) == N
        ref0 = np.array(Image.open(os.path.join(os.path.dirname(toy_manifest), recs[i]["refs"][0])))
        ref0 = torch.from_numpy(ref0).permute(2, 0, 1)                          # the file itself
        assert torch.allclose(it["refs"][0], ref0 / 127.5 - 1)
        for k, p in enumerate(it["points"]):
            assert p.dtype == torch.long and p.shape[1] == 2 and len(p) > 0
            assert p[:, 0].max() < 16 and p[:, 1].max() < 64
            assert (it["masks"][k][p[:, 1]] > 0).all()        # every target token is on the subject
            # no target token is shared between references
            others = torch.cat([q[:, 1] for j, q in enumerate(it["points"]) if j != k])
            assert not torch.isin(p[:, 1], others).any()

def test_dataset_skips_bad_records_with_a_warning(bad_manifest, capsys):
    path, expected = bad_manifest
    ds = DS.ManifestDataset(path, size=32, ref_size=16, token_px=4)
    err = capsys.readouterr().err
    # headers only at construction: the truncated target (line 3) and the empty mask (line 6) get
    # through
    assert len(ds) == 4 and ds.n_skipped == len(expected) - 2 and "skipped 11 of 15 records" in err
    assert {line for line, _, _ in ds.skipped} == set(expected) - {3, 6}
    items = [ds[i] for i in range(len(ds))]                            # an epoch does not crash ...
    # ... and does not hide failures
    assert ds.n_failed == 2 and "warning" in capsys.readouterr().err
    assert all(it["target"].shape == (3, 32, 32) for it in items)
    strict = DS.ManifestDataset(path, size=32, ref_size=16, token_px=4, verify=True)
    assert len(strict) == 2 and strict.n_skipped == len(expected)
    only_bad = os.path.join(os.path.dirname(path), "only_bad.jsonl")
    open(only_bad, "w").write('{"prompt": "x"}\n')
    with pytest.raises(D.DataError, match="no usable records"):
        DS.ManifestDataset(only_bad)
    with pytest.raises(D.DataError, match="cannot read the manifest"):
        DS.ManifestDataset(path + ".missing")

def test_points_to_tokens_by_hand():
    # 4x4 reference tokens, 8x8 target tokens
    ref0 = torch.tensor([[0.1, 0.6, 0.3, 0.9],      # ref (0, 2) -> 2;  target (2, 7) -> 23
                         [0.12, 0.62, 0.31, 0.91],  # the same tokens again: kept once
                         [1.0, 1.0, 1.0, 1.0],      # the far corner: ref 15, target 63
                         # ref (3, 0) -> 12; target (4, 4) -> 36, also claimed by ref1
                         [0.99, 0.0, 0.5, 0.5]],
                        dtype=torch.float64)
    # 10 -> 36, 0 -> 0
    ref1 = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = DS.points_to_tokens([ref0, ref1, torch.zeros(0, 4, dtype=torch.float64)], (4, 4), (8, 8))
    assert out[0].tolist() == [[2, 23], [15, 63]]            # 36 is dropped from both references
    assert out[1].tolist() == [[0, 0]]
    assert out[2].shape == (0, 2) and out[2].dtype == torch.long

def test_buckets_resize_crop_and_points(tmp_path):
    solid_png(tmp_path / "wide.png", (80, 40))                    # W x H
    solid_png(tmp_path / "tall.png", (30, 60))
    solid_png(tmp_path / "square.png", (50, 50))
    solid_png(tmp_path / "crop.png", (40, 30))
    solid_png(tmp_path / "ref.png", (40, 20))      # wide reference: padded on white above and below
    m = np.zeros((40, 80), np.uint8)
    m[5:25, 10:50] = 255                                      # 800 px
    Image.fromarray(m).save(tmp_path / "mask.png")
    recs = [dict(target="wide.png", prompt="w", refs=["ref.png"], masks=["mask.png"],
                 points=[[[0.5, 0.5, 15 / 40, 30 / 80], [0.0, 0.0, 15 / 40, 30 / 80]]]),
            dict(target="tall.png", prompt="t", refs=["ref.png", "ref.png"]),
            dict(target="square.png", prompt="s", refs=["ref.png"]),
            dict(target="crop.png", prompt="c", refs=["ref.png"],
                 points=[[[0.5, 0.5, 0.5, 0.05], [0.5, 0.5, 0.5, 0.5]]])]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = DS.ManifestDataset(str(tmp_path / "m.jsonl"), ref_size=16, token_px=4,
                            buckets=[(32, 32), (32, 64), (64, 32)])
    assert [ds.bucket_of(i) for i in range(4)] == [((32, 64), 1), ((64, 32), 2), ((32, 32), 1),
                                                   ((32, 32), 1)]
    wide = ds[0]
    assert wide["target"].shape == (3, 32, 64) and wide["masks"].shape == (1, 8 * 16)
    # 80x40 -> 64x32 (x 0.8): the mask's area scales by 0.64 (BOX keeps area shares exact)
    assert wide["masks"].sum() * 16 == pytest.approx(800 * 0.64, rel=1e-4)
    assert wide["mask_valid"].tolist() == [True]
    # target pixel (15, 30) -> (12, 24) -> token (3, 6) = 54 of 16 per row; ref (0.5, 0.5) -> token
    # (2, 2) = 10, ref (0, 0) lies under the padding: (0 * 20 + 10) / 40 = 0.25 -> token (1, 0) = 4
    assert wide["points"][0].tolist() == [[4, 54], [10, 54]]
    assert torch.allclose(wide["refs"][0, :, 0], torch.ones(3, 16))              # white padding row
    assert ds[1]["target"].shape == (3, 64, 32) and ds[1]["mask_valid"].tolist() == [False, False]
    assert ds[1]["masks"].abs().sum() == 0
    # 40x30 covers 32x32 as 43x32 with 5 px cut on the left: tx = 0.05 falls off; 0.5 -> x =
    # (21.5 - 5) / 32
    assert ds[3]["points"][0].tolist() == [[10, 4 * 8 + 4]]

def test_aspect_buckets(toy_run, tmp_path):
    # UNO's buckets at 512 px (bytedance/UNO uno/dataset/uno.py), written out by hand
    assert sorted(DS.uno_buckets(512)) == sorted([(256, 768), (320, 768), (320, 704), (384, 640),
                                                  (448, 576), (512, 512), (768, 256), (768, 320),
                                                  (704, 320), (640, 384), (576, 448)])
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in DS.uno_buckets(32, 4))
    root, manifest = toy_run
    sft(tmp_path / "b", manifest, "--stage", "multi", "--init", str(root / "base"), "--steps", "1",
        "--aspect-buckets")
    assert math.isfinite(read_log(tmp_path / "b")[0]["diff"])

def test_collate(toy_manifest):
    ds = DS.ManifestDataset(toy_manifest, size=32, ref_size=16, token_px=4)
    by_key = {}
    for i in range(len(ds)):
        by_key.setdefault(ds.bucket_of(i), []).append(i)
    (_, N), idx = max(by_key.items(), key=lambda kv: len(kv[1]))
    items = [ds[i] for i in idx[:3]]
    b = DS.collate(items)
    assert b["target"].shape == (3, 3, 32, 32) and b["refs"].shape == (3, N, 3, 16, 16)
    assert b["masks"].shape == (3, N, 64) and b["mask_valid"].shape == (3, N)
    assert b["prompts"] == [it["prompt"] for it in items] and b["index"].tolist() == idx[:3]
    assert len(b["points"]) == N
    for k, p in enumerate(b["points"]):
        assert p.shape[1] == 3
        for bi, it in enumerate(items):                     # (batch index, ref token, target token)
            assert torch.equal(p[p[:, 0] == bi, 1:], it["points"][k])
    if len(by_key) > 1:
        other = next(v[0] for k, v in by_key.items() if k[1] != N)
        with pytest.raises(ValueError, match="one bucket key"):
            DS.collate([items[0], ds[other]])

def test_batches_are_deterministic_and_split_across_ranks():
    ds = FakeDataset(103)
    one = DS.batches(ds, 4, seed=0, epoch=0)
    assert one == DS.batches(ds, 4, seed=0, epoch=0) and one != DS.batches(ds, 4, seed=0, epoch=1)
    assert one != DS.batches(ds, 4, seed=1, epoch=0)
    assert all(len(b) == 4 and len({ds.bucket_of(i) for i in b}) == 1 for b in one)
    assert len({i for b in one for i in b}) == sum(len(b) for b in one)                 # no repeats
    for world in (2, 3, 5):
        ranks = [DS.batches(ds, 4, 0, 0, rank=r, world_size=world) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1                                         # lock-step
        # batch b on rank b % world
        dealt = [ranks[b % world][b // world] for b in range(world * len(ranks[0]))]
        assert dealt == one[:len(dealt)] and len(one) - len(dealt) < world
    # keeping partial batches: every index appears, ranks padded by repeating the first batches
    full = DS.batches(ds, 4, 0, 0, drop_last=False)
    assert sorted(i for b in full for i in b) == list(range(103))
    ranks = [DS.batches(ds, 4, 0, 0, r, 4, drop_last=False) for r in range(4)]
    assert (len({len(r) for r in ranks}) == 1 and {i for r in ranks for b in r for i in b}
            == set(range(103)))
    with pytest.raises(ValueError):
        DS.batches(ds, 4, 0, 0, rank=2, world_size=2)

def test_toy_batch_drives_the_probe_and_losses(toy_manifest):
    # the layouts data.py hands out are the ones model.AttentionProbe and losses.py take
    cfg = M.get_config("toy")
    ds = DS.ManifestDataset(toy_manifest, size=32, ref_size=16, token_px=2 * cfg.ae.factor)
    b = DS.collate([ds[i] for i in DS.batches(ds, 2, seed=0, epoch=0)[0]])
    B, N = b["masks"].shape[:2]
    torch.manual_seed(0)
    flux, text, ae = M.Flux(cfg), EN.ByteTextEncoder(cfg), EN.AutoEncoder(cfg.ae)
    z = ae.encode(b["target"])                                                     # (B, 12, 16, 16)
    refs = [M.pack(ae.encode(b["refs"][:, k])) for k in range(N)]                  # [(B, 16, 48)]
    txt, y = text(b["prompts"])
    img = M.pack(z)
    assert img.shape[1] == b["masks"].shape[2] == 64
    probe = M.AttentionProbe(rows=[p[:, :2] for p in b["points"]])
    flux(img, M.grid_ids(8, 8, batch=B), txt, torch.zeros(B, txt.shape[1], 3),
         torch.full((B,), 0.5), y,
         torch.full((B,), 3.5), refs, M.ref_ids((8, 8), [(4, 4)] * N, batch=B), probe=probe)
    assert torch.isfinite(dice_loss(probe.mean_map(), b["masks"], b["mask_valid"]))
    assert torch.isfinite(scal_loss(probe.mean_logp(), [p[:, 2] for p in b["points"]]))

def test_prompt_dataset_reads_rl_records(tmp_path):
    # RL records need no target; a bad one is skipped with the others kept; references come
    # preprocessed
    toy_reference(0, 20).save(tmp_path / "a.png")
    Image.new("RGB", (30, 10), "red").save(tmp_path / "b.png")
    lines = [{"prompt": "a thing", "refs": ["a.png", "b.png"], "captions": ["x", "y"]},
             {"prompt": "gone", "refs": ["missing.png"]}, {"prompt": "", "refs": ["a.png"]}]
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    ds = DS.PromptDataset(str(tmp_path / "rl.jsonl"), ref_size=16)
    assert len(ds) == 1 and ds.n_skipped == 2
    item = ds[0]
    assert item["prompt"] == "a thing" and item["captions"] == ["x", "y"] and item["kinds"] is None
    assert [r.size for r in item["refs"]] == [(16, 16), (16, 16)]
    assert (item["refs"][1].getpixel((8, 0)) == (255, 255, 255)
            and item["refs"][1].getpixel((8, 8))[0] > 200)

# ---- cache.py: precomputed latents and text, and what a broken cache says ----

def test_cache_round_trip(toy_manifest, tmp_path, capsys):
    cfg = M.get_config("toy")
    torch.manual_seed(0)
    text = EN.ByteTextEncoder(cfg).eval()
    (tmp_path / "ckpt").mkdir()
    save_file(text.state_dict(), str(tmp_path / "ckpt" / "text_encoder.safetensors"))
    out = tmp_path / "cache"
    assert cache.main(["--manifest", toy_manifest, "--out", str(out), "--model", "toy",
                       "--checkpoint",
                   str(tmp_path / "ckpt"), "--shard-size", "5", "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == ["index.json"] + [f"shard_{k:05d}.safetensors"
                                                        for k in range(3)]
    ds, cached = DS.ManifestDataset(toy_manifest, 32, 16, 4), cache.CachedDataset(str(out))
    ae = EN.AutoEncoder(cfg.ae)
    assert len(cached) == len(ds)
    with torch.no_grad():
        for i in range(len(ds)):
            a, b = ds[i], cached[i]
            txt, y = text([a["prompt"]])
            assert (cached.bucket_of(i) == ds.bucket_of(i) and b["prompt"] == a["prompt"]
                    and b["index"] == i)
            assert (torch.allclose(b["txt"], txt[0], atol=1e-5)
                    and torch.allclose(b["y"], y[0], atol=1e-5))
            assert torch.equal(b["latent"], ae.encode(a["target"][None])[0])
            assert torch.equal(b["ref_latents"], ae.encode(a["refs"]))
            assert (torch.equal(b["masks"], a["masks"])
                    and torch.equal(b["mask_valid"], a["mask_valid"]))
            assert all(torch.equal(p, q) for p, q in zip(b["points"], a["points"]))
    batch = DS.collate([cached[i] for i in DS.batches(cached, 2, 0, 0)[0]])
    assert batch["latent"].shape == (2, 12, 16, 16) and batch["txt"].shape == (2, 128, 64)
    with_pixels = cache.CachedDataset(str(out), pixels=True)[3]
    assert (torch.equal(with_pixels["target"], ds[3]["target"])
            and torch.equal(with_pixels["refs"], ds[3]["refs"]))

def test_cache_without_weights_is_a_one_line_error(toy_manifest, no_weights, tmp_path, capsys):
    code = cache.main(["--manifest", toy_manifest, "--out", str(tmp_path / "c"), "--model", "toy",
                   "--checkpoint", str(tmp_path / "nothing"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "nothing" in err
    assert not (tmp_path / "c").exists()
    # each family's encoders are the weights listed: FLUX.2's AE and text model, not T5 and CLIP
    for model, named, never in (("klein-base-4b", ["Qwen3-4B", "--text-model", "FLUX.2-dev"], "T5"),
                                ("flux-dev", ["T5-XXL", "CLIP-L", "--clip-text"], "Qwen")):
        code = cache.main(["--manifest", toy_manifest, "--out", str(tmp_path / "c"), "--model",
                           model])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and all(n in err for n in named), err
        assert never not in err and "Traceback" not in err and not (tmp_path / "c").exists()

def test_broken_cache_is_one_line_before_training(toy_manifest, tmp_path, capsys):
    cfg, ckpt, out = M.get_config("toy"), tmp_path / "ckpt", tmp_path / "cache"
    ckpt.mkdir()
    save_file(EN.ByteTextEncoder(cfg).state_dict(), str(ckpt / "text_encoder.safetensors"))
    assert cache.main(["--manifest", toy_manifest, "--out", str(out), "--model", "toy",
                       "--checkpoint", str(ckpt), "--shard-size", "5", "--device", "cpu"]) == 0
    shard = out / "shard_00001.safetensors"
    good = shard.read_bytes()
    for broken, why in ((good[: len(good) // 2], "not a readable safetensors file"),
                        (b"", "not a readable"), (None, "no such file")):
        shard.unlink()
        if broken is not None:
            shard.write_bytes(broken)
        with pytest.raises(D.DataError, match=why) as e:
            cache.CachedDataset(str(out))
        assert str(shard) in str(e.value) and "\n" not in str(e.value)
    save_file({"x/latent": torch.zeros(1)}, str(shard))             # a shard of another cache
    with pytest.raises(D.DataError, match="cache shard without '0/txt' \\(and"):
        cache.CachedDataset(str(out))
    # one tensor short
    save_file({k: v for k, v in from_bytes(good).items() if k != "1/points0"}, str(shard))
    with pytest.raises(D.DataError, match="cache shard without '1/points0': rebuild"):
        cache.CachedDataset(str(out))
    capsys.readouterr()
    # a whole base: the cache is what fails
    save_file(M.Flux(cfg).state_dict(), str(ckpt / "flux.safetensors"))
    assert TS.cli(["--cache", str(out), "--stage", "multi", "--init", str(ckpt), "--out",
                   str(tmp_path / "r"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "shard_00001" in err and "Traceback" not in err

@pytest.mark.parametrize("index",
                         ["[" * 100_000 + "]" * 100_000, "[]", '{"records": [{"key": "0"}]}',
                          '{"records": 3}', '{"records": [{"shard": "../x", "key": "0", "prompt": '
                          '"x", "n_refs": 1, "bucket": [32, 32]}]}', '{"records": [], "size": 32}'],
                         ids=["100,000-deep", "a list", "a record without fields",
                              "records not a list",
                              "a shard outside the folder", "no manifest (pixels=True)"])
def test_a_cache_index_that_is_not_one_is_one_line(tmp_path, index):
    # a cache folder's index.json is read like a manifest line: a value of the wrong shape is one
    # DataError
    (tmp_path / "index.json").write_text(index)
    with pytest.raises(D.DataError, match="not a cache") as e:
        cache.CachedDataset(str(tmp_path), pixels=True)
    assert str(e.value).startswith(str(tmp_path)) and "\n" not in str(e.value)

def test_cached_tensors_are_checked_against_the_model_before_the_first_step(
        toy_run, tmp_path, capsys):
    root, manifest = toy_run
    folder = tmp_path / "cache"
    cache.write_cache(manifest, str(folder), model="toy", checkpoint=str(root / "base"),
                      device="cpu")
    shard = folder / "shard_00000.safetensors"
    good, index = load_file(str(shard)), (folder / "index.json").read_text()
    cfg = M.get_config("toy")
    for key, value, said in ((
            "0/latent", torch.zeros(16, 16, 16), "0/latent is (16, 16, 16) "
            "torch.float32 where the model takes (12, 16, "
            "16) float"),          # another AE's latents
            ("1/mask_valid", torch.ones(n := len(good["1/mask_valid"])), f"1/mask_valid is ({n},) "
             f"torch.float32 where the model takes ({n},) torch.bool"),
            ("2/txt", torch.zeros(27, 64), "2/txt is (27, 64) torch.float32 where the model takes "
             "(128, 64) float")):               # a prompt stored cut (older cache)
        save_file({**good, key: value}, str(shard))
        with pytest.raises(D.DataError) as e:
            cache.CachedDataset(str(folder), cfg=cfg)
        assert (str(e.value) == f"{shard}: {said} (a cache of another model, size or version): "
                f"rebuild it with `python cache.py`")
        capsys.readouterr()
        assert TS.cli(["--cache", str(folder), "--stage", "multi", "--init", str(root / "base"),
                       "--batch-size", "2",
                       "--out", str(tmp_path / f"run-{key[0]}"), "--steps", "1"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {e.value}"]
    save_file(good, str(shard))
    (folder / "index.json").write_text(index.replace('"txt_len": 128', '"txt_len": 129', 1))
    with pytest.raises(D.DataError, match="txt_len 129, outside 1..128"):
        cache.CachedDataset(str(folder), cfg=cfg)

# ---- rewards.py: Multi-ID, the scorers on tiny models, faces, reward flags, eval ----

def brute_force(sim):
    # every partial assignment: reference i -> subject p[i] or nothing, subjects used at most once
    n, m = sim.shape
    best = 0.0
    for p in itertools.product([None] + list(range(m)), repeat=n):
        used = [j for j in p if j is not None]
        if len(used) == len(set(used)):
            best = max(best, sum(sim[i, j] for i, j in enumerate(p) if j is not None))
    return best / n

class FakeEmbedder:
    # references and subjects given directly as vectors (images are ignored)
    def __init__(self, refs, subjects):
        self.refs, self.subj = (np.asarray(refs, float),
                                np.asarray(subjects, float).reshape(-1, len(refs[0])))

    def references(self, images, captions=None):
        return self.refs

    def subjects(self, image, captions=None):
        return self.subj

def clip_tokenizer(d, max_len=None):
    # a character-level CLIP BPE: every letter, alone or word-final (</w>), no merges
    from transformers import CLIPTokenizer
    vocab = {c: i for i, c in enumerate(LETTERS)} | {c + "</w>": 26 + i
                                                     for i, c in enumerate(LETTERS)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{d}/merges.txt", "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt",
                         **({"model_max_length": max_len} if max_len else {}))

TEXT = dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, bos_token_id=52, eos_token_id=53, pad_token_id=53)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8)

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    d = str(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(30.0))        # not 1/0.07: a wrong scale factor would show
    model.save_pretrained(d)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=clip_tokenizer(d)).save_pretrained(d)
    return d

@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    from transformers import (Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor,
                              Owlv2Processor)
    d = str(tmp_path_factory.mktemp("owl"))
    torch.manual_seed(3)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=TEXT | dict(max_position_embeddings=16),
                                                vision_config=VISION, projection_dim=32))
    # the random heads saturate (sigmoid 1, zero-width boxes): shrink them towards the priors
    with torch.no_grad():
        for p in [*model.box_head.parameters(), *model.class_head.parameters()]:
            p.mul_(0.01)
    model.save_pretrained(d)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=clip_tokenizer(d, max_len=16)).save_pretrained(d)
    return d

class FakeApp:
    # faces by image width: 20 px wide -> two faces (small, large), 30 -> none, 40 -> three
    def __init__(self):
        self.seen = []

    def get(self, bgr):
        self.seen.append(bgr)
        return {20: [Face((0, 0, 4, 4), (1, 0, 0)), Face((2, 2, 12, 14), (0, 1, 0))], 30: [],
                40: [Face((0, 0, 5, 5), (1, 0, 0)), Face((5, 5, 9, 9), (0, 0, 1)),
                     Face((9, 0, 19, 9), (0, 1, 0))]
                }[bgr.shape[1]]

def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, m = rng.integers(1, 6), rng.integers(1, 6)
        sim = rng.uniform(-1, 1, (n, m))
        score, pairs = R.hungarian(sim)
        assert score == pytest.approx(brute_force(sim), abs=1e-12)
        assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})   # one-to-one
        assert all(sim[i, j] > 0 for i, j in pairs)

def test_at_most_once_against_per_reference_max():
    r1, r2 = unit(1, 0, 0, 0), unit(0, 1, 0, 0)
    blend = unit(1, 1, 0, 0)                              # cos 0.707 with both references
    # cos 0.7 each, own reference
    good = [unit(0.7, 0, np.sqrt(1 - 0.49), 0), unit(0, 0.7, 0, np.sqrt(1 - 0.49))]
    per_ref_max = lambda subj: np.mean((np.stack([r1, r2]) @ np.stack(subj).T).max(1))
    score = lambda subj: R.MultiIDReward(FakeEmbedder([r1, r2],
                                                      subj))([None], [None, None])["score"][0]
    # one blended subject standing in for both: a per-reference max prefers it to the right image,
    # Eq. 10 does not
    assert (per_ref_max([blend]) == pytest.approx(0.7071, abs=1e-4)
            and per_ref_max(good) == pytest.approx(0.7))
    assert (score([blend]) == pytest.approx(0.7071 / 2, abs=1e-4)
            and score(good) == pytest.approx(0.7))
    # two copies of the blend are two subjects: each reference gets one, so Eq. 10 scores them as
    # the max does
    assert score([blend, blend]) == pytest.approx(per_ref_max([blend, blend]))

def test_zero_detections_score_zero():
    out = R.MultiIDReward(FakeEmbedder([unit(1, 0), unit(0, 1)], np.zeros((0, 2))))(
        [None, None], [None, None])
    assert out["score"].tolist() == [0.0, 0.0] and out["matches"] == [[], []]

def test_clip_and_preference_scores(clip_dir):
    from transformers import CLIPModel, CLIPProcessor
    model, proc = (CLIPModel.from_pretrained(clip_dir).eval(),
                   CLIPProcessor.from_pretrained(clip_dir))
    ims, prompts = images(3), ["a red cat", "two dogs", "a blue hat on a chair"]
    inp = proc(text=prompts, images=ims, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = F.normalize(model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output,
                          dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=inp["input_ids"],
                                                  attention_mask=inp[
                                                      "attention_mask"]).pooler_output, dim=-1)
    cos = (img * txt).sum(-1).numpy()                                     # (3,) image i vs prompt i
    np.testing.assert_allclose(R.CLIPScore(clip_dir)(ims, prompts), cos, atol=1e-5)
    np.testing.assert_allclose(R.PreferenceScore(clip_dir, "hps")(ims, prompts), cos, atol=1e-5)
    np.testing.assert_allclose(R.PreferenceScore(clip_dir, "pickscore")(ims, prompts),
                               30.0 * cos / 26, atol=1e-5)
    # CLIP-I embeddings: the forward's own normalized image_embeds
    with torch.no_grad():
        ref = model(**inp).image_embeds.numpy()
    emb = R.CLIPScore(clip_dir).embed_images(ims)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)

def test_dino_embedder(dino_dir):
    from transformers import AutoImageProcessor, Dinov2Model
    model, proc = (Dinov2Model.from_pretrained(dino_dir).eval(),
                   AutoImageProcessor.from_pretrained(dino_dir))
    ims = images(3, seed=1)
    with torch.no_grad():
        ref = F.normalize(model(**proc(images=ims, return_tensors="pt")).pooler_output,
                          dim=-1).numpy()
    emb = R.DinoEmbedder(dino_dir)(ims)
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert R.DinoEmbedder(dino_dir)([]).shape == (0, 32)

def test_a_reward_model_holding_a_pickle_that_runs_code_is_one_line(clip_dir, tmp_path):
    from transformers import CLIPModel
    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    os.remove(folder / "model.safetensors")
    # unpickled, it makes a file
    torch.save({"x": B.Opens(str(tmp_path / "ran"))}, folder / "pytorch_model.bin")
    with pytest.raises(R.RewardModelError) as e:
        R.load_pretrained(CLIPModel, str(folder), "CLIP", "clip")
    assert (str(e.value).startswith(f"CLIP: cannot load {folder} (a pickle that would construct "
                                    f"objects or run code: refused unread); get it with")
            and "\n" not in str(e.value))
    assert not (tmp_path / "ran").exists()

def test_missing_reward_models_are_one_line_listed_at_once_and_never_downloaded(
        tmp_path, monkeypatch, clip_dir):
    for path in (str(tmp_path / "nowhere"), str(tmp_path)):    # no folder; a folder without weights
        with pytest.raises(R.RewardModelError) as e:
            R.CLIPScore(path)
        msg = str(e.value)
        assert ("\n" not in msg and "CLIP" in msg and path in msg
                and "hf download openai/clip-vit-large-patch14" in msg)
    monkeypatch.setattr(HC, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("the network was reached"))
    p = argparse.ArgumentParser()
    R.add_reward_args(p)
    args = p.parse_args(["--reward", "object", "--dinov2", str(tmp_path / "no_dino"), "--clip",
                         clip_dir])
    t0 = time.perf_counter()
    with pytest.raises(R.RewardModelError) as e:
        R.check_reward_models(args)
    msg = str(e.value)
    assert (time.perf_counter() - t0 < 1.0 and "\n" not in msg
            and msg.startswith("4 reward model(s) missing"))
    for part in ("`hf download adams-story/HPSv2-hf`", "`hf download openai/clip-vit-base-patch32`",
                 "`hf download florence-community/Florence-2-base`",
                 "no_dino: no such folder; --dinov2 DIR"):
        assert part in msg
    assert "CLIP (" not in msg                          # the local CLIP folder is there
    with pytest.raises(R.RewardModelError,
                       match="not in the Hugging Face cache; `hf download openai/clip-vit-large"):
        R.CLIPScore()                                   # a repo id not cached: at once, no download
    with pytest.raises(R.RewardModelError, match="face models: no"):
        R.check_reward_models(p.parse_args(["--reward", "human", "--clip", clip_dir, "--preference",
                                            clip_dir, "--preference-processor", clip_dir,
                                            "--face-root", str(tmp_path)]))
    R.check_reward_models(p.parse_args(["--reward", "object", "--clip", clip_dir, "--preference",
                                        clip_dir, "--preference-processor", clip_dir, "--detector",
                                        clip_dir, "--dinov2", clip_dir]))

def test_florence2_detector_and_object_embedder(flo_dir, dino_dir):
    det = R.Florence2Detector(flo_dir, max_new_tokens=12)
    im = images(1, seed=3, size=(40, 30))[0]
    found = det.detect(im, ["a red circle", "a blue square"])
    # Florence-2's bins: 1000 per side, a box at each bin's centre, truncated to int pixels
    W, H = im.size
    expect = (int(100.5 * W / 1000), int(200.5 * H / 1000), int(500.5 * W / 1000),
              int(600.5 * H / 1000))
    assert expect == (4, 6, 20, 18)
    assert found == [[(expect, 1.0)], [(expect, 1.0)]]          # the forced answer for both prompts
    # both captions grounded on one box: one subject after the IoU dedup, a unit DINOv2 row
    emb = R.ObjectEmbedder(det, R.DinoEmbedder(dino_dir)).subjects(im, [
        "a red circle", "a blue square"])
    assert emb.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="captions"):
        det.detect(im, None)

def test_owlv2_detector(owl_dir, dino_dir):
    im = images(1, seed=4, size=(40, 30))[0]
    phrases = ["a red cat", "a dog with a very long caption that owl must truncate"]
    found = R.Owlv2Detector(owl_dir, threshold=0.0).detect(im, phrases)
    assert len(found) == 2 and any(found)
    for per_phrase in found:
        assert len(per_phrase) <= 1
        for (x0, y0, x1, y1), s in per_phrase:
            assert (0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 30 and x1 - x0 >= 1 and y1 - y0 >= 1
                    and 0 < s < 1)
    # each phrase's box, by hand: its highest-logit box, (cx, cy, w, h) of the padded 40 x 40
    # square, clipped
    from transformers import Owlv2ForObjectDetection, Owlv2Processor
    model, proc = (Owlv2ForObjectDetection.from_pretrained(owl_dir).eval(),
                   Owlv2Processor.from_pretrained(owl_dir))
    with torch.no_grad():
        out = model(**proc(text=[phrases], images=im, return_tensors="pt", truncation=True))
    for q, per_phrase in enumerate(found):
        k = out.logits[0, :, q].argmax()
        cx, cy, w, h = (out.pred_boxes[0, k] * 40).tolist()
        x0, y0, x1, y1 = (max(cx - w / 2, 0), max(cy - h / 2, 0), min(cx + w / 2, 40),
                          min(cy + h / 2, 30))
        if per_phrase:
            assert per_phrase[0][0] == pytest.approx((x0, y0, x1, y1), abs=1e-4)
            assert per_phrase[0][1] == pytest.approx(out.logits[0, k, q].sigmoid().item(), abs=1e-6)
        else:
            assert x1 - x0 < 1 or y1 - y0 < 1
    # a threshold no sigmoid passes: zero detections -> (0, D) subjects -> score 0, no error
    obj = R.ObjectEmbedder(R.Owlv2Detector(owl_dir, threshold=1.0), R.DinoEmbedder(dino_dir))
    assert obj.subjects(im, phrases).shape == (0, 32)
    assert R.MultiIDReward(obj)([im], images(2, seed=5), phrases)["score"].tolist() == [0.0]

def test_object_embedder_dedup_and_mask():
    # two captions, three boxes: (0..10) twice-ish (IoU 0.81, the higher score stays) and a distinct
    # one
    class Det:
        def detect(self, image, phrases):
            return [[((0, 0, 10, 10), 0.5)], [((0, 0, 10, 9), 0.9), ((20, 5, 30, 15), 0.3)]]

    class Sam:   # a mask: the left half of every box
        def masks(self, image, boxes):
            m = np.zeros((len(boxes), image.height, image.width), bool)
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                m[k, int(y0):int(y1), int(x0):int((x0 + x1) / 2)] = True
            return m

    crops = []
    embed = lambda ims: crops.extend(np.asarray(im) for im in ims) or np.eye(4)[:len(ims)]
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    out = R.ObjectEmbedder(Det(), embed, Sam()).subjects(im, ["x", "y"])
    assert out.shape == (2, 4) and [c.shape for c in crops] == [(9, 10, 3), (10, 10, 3)]
    for c in crops:
        # outside the mask: white
        assert (c[:, :5] == (10, 20, 30)).all() and (c[:, 5:] == 255).all()

def test_face_pack_missing_empty_or_corrupt(tmp_path, monkeypatch):
    import insightface.app
    real = insightface.app.FaceAnalysis
    def no(*a, **k):
        raise RuntimeError("insightface (or the network) must not be reached")
    monkeypatch.setattr(insightface.app, "FaceAnalysis", no)
    monkeypatch.setattr(socket.socket, "connect", no)
    folder = tmp_path / "models" / "antelopev2"
    for make in (False, True):                                   # no folder; a folder without .onnx
        if make:
            os.makedirs(folder)
        with pytest.raises(R.RewardModelError) as e:
            R.FaceEmbedder("antelopev2", str(tmp_path))
        msg = str(e.value)
        assert "antelopev2" in msg and str(folder) in msg and "model zoo" in msg and "\n" not in msg
    # a corrupt .onnx: insightface itself fails, re-raised as one line
    (folder / "det_10g.onnx").write_bytes(b"partial download")
    monkeypatch.setattr(insightface.app, "FaceAnalysis", real)
    with pytest.raises(R.RewardModelError, match="det_10g.onnx|antelopev2"):
        R.FaceEmbedder("antelopev2", str(tmp_path))

def test_face_embedder_with_fake_app():
    app = FakeApp()
    faces = R.FaceEmbedder(app=app)
    refs = faces.references([Image.new("RGB", (20, 16), (200, 10, 0)), Image.new("RGB", (30, 16))])
    np.testing.assert_array_equal(refs[0], [0, 1, 0])       # the larger face (10x12), not the first
    assert refs.shape == (2, 3) and not refs[1].any()       # no face: a zero row
    assert (app.seen[0][0, 0] == (0, 10, 200)).all()        # insightface gets BGR
    subj = faces.subjects(Image.new("RGB", (40, 16)))
    np.testing.assert_array_equal(subj, [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert faces.subjects(Image.new("RGB", (30, 16))).shape == (0, 512)
    assert len(faces.detect(Image.new("RGB", (40, 16)))[0]) == 3

def test_face_embedder_through_the_installed_insightface_with_stand_in_models(
        tmp_path, monkeypatch):
    # insightface's own FaceAnalysis (its loading, prepare, get and Face) runs; only the two ONNX
    # networks are stand-ins: a "detector" boxing each solid-colour square of the picture, a
    # "recognizer" embedding a face as its colour. So the reward sees each reference's colour found
    # (or not) among the generated image's faces
    import insightface
    import insightface.model_zoo.model_zoo as zoo
    calls = []
    class Detector:
        taskname, input_shape, input_mean, input_std = "detection", (1, 3, 640, 640), 127.5, 128.0
        def prepare(self, ctx_id, input_size=None, det_thresh=0.5):
            calls.append(("det", ctx_id, tuple(input_size)))
        def detect(self, img, max_num=0, metric="default"):
            boxes = []
            for colour in np.unique(img.reshape(-1, 3), axis=0):
                if (colour == 255).all():
                    continue
                ys, xs = np.nonzero((img == colour).all(-1))
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9])
            boxes = np.array(boxes, np.float32).reshape(-1, 5)
            kps = np.stack([np.tile(b[None, :2], (5, 1)) for b in boxes]) if len(boxes) else None
            return boxes, kps
    class Recognizer:
        taskname, input_shape, input_mean, input_std = "recognition", (1, 3, 112, 112), 127.5, 127.5
        def prepare(self, ctx_id):
            calls.append(("rec", ctx_id))
        def get(self, img, face):
            x0, y0 = face.bbox[:2].astype(int)
            e = np.zeros(512, np.float32)
            e[:3] = img[y0, x0]                                # BGR, as insightface hands it
            face.embedding = e + 1.0                           # Face.normed_embedding normalizes it
            return face.embedding
    monkeypatch.setattr(zoo, "get_model", lambda f, **kw: Detector() if "det" in os.path.basename(f)
                        else Recognizer())
    pack = tmp_path / "models" / "antelopev2"
    pack.mkdir(parents=True)
    for f in ("det_10g.onnx", "glintr100.onnx"):
        (pack / f).write_bytes(b"stand-in")
    emb = R.FaceEmbedder("antelopev2", str(tmp_path))
    assert calls == [("det", -1, (640, 640)), ("rec", -1)]                # the CPU, at our det_size
    def picture(*squares):
        a = np.full((64, 96, 3), 255, np.uint8)
        for (y, x, s), c in squares:
            a[y:y + s, x:x + s] = c
        return Image.fromarray(a)
    red, blue, green = (200, 0, 0), (0, 0, 200), (0, 150, 0)
    # largest face counts
    refs = [picture(((4, 4, 30), red), ((40, 60, 8), green)), picture(((10, 10, 20), blue))]
    gen = picture(((5, 5, 20), blue), ((5, 50, 20), red))
    r = R.MultiIDReward(emb)([gen, picture(((5, 5, 20), blue))], refs)
    # each found, each once
    assert r["score"][0] == pytest.approx(1.0, abs=1e-5) and len(r["matches"][0]) == 2
    assert all(r["sims"][0][i, j] > 1 - 1e-5 for i, j in r["matches"][0])
    # the second image has only the blue face: it goes to the blue reference, the red one is
    # unmatched and scores 0
    assert (r["score"][1] == pytest.approx(0.5, abs=1e-5) and r["matches"][1] == [(1, 0)]
            and r["sims"][1][0, 0] < 0.999)

def test_reward_args_and_toy_reward():
    p = argparse.ArgumentParser()
    R.add_reward_args(p)
    args = p.parse_args([])
    assert args.reward == "toy" and R.reward_weights(args) == R.WEIGHTS["object"]
    assert (R.reward_weights(p.parse_args(["--reward", "human", "--w-id", "2"]))
            == dict(text=1.4, aes=0.7, id=2.0))
    reward = toy.world_reward(R.reward_weights(p.parse_args(["--w-aes", "0"])))
    target, _, _, refs, rec = toy.world_example(0, 0)
    refs = [Image.fromarray(r) for r in refs]
    out = reward([Image.fromarray(target)], rec["prompt"], refs, rec["captions"])
    # (id up to the 8-bit rounding of the colours read: 1e-3 in the kernel)
    assert out["id"][0] == pytest.approx(1.0, abs=1e-3) and out["text"][0] == pytest.approx(1.0)
    assert out["total"][0] == pytest.approx(1.4 * 1.0 + 1.0 * 1.0, abs=1e-3)

def test_object_reward_and_eval_wiring(tmp_path, flo_dir, dino_dir, clip_dir):
    # --reward object through the flags, on tiny models: every metric present and in range
    flags = ["--reward", "object", "--detector", flo_dir, "--dinov2", dino_dir, "--clip", clip_dir,
             "--preference", clip_dir]
    p = argparse.ArgumentParser()
    R.add_reward_args(p)
    reward = R.build_reward(p.parse_args(flags))
    target, _, _, refs, rec = toy.world_example(0, 1)
    refs = [Image.fromarray(r) for r in refs]
    out = reward([Image.fromarray(target)], rec["prompt"], refs, rec["captions"])
    assert out["total"][0] == pytest.approx(1.4 * out["text"][0] + 0.7 * out["aes"][0]
                                            + 1.0 * out["id"][0])
    manifest = toy.write_world(str(tmp_path / "toy"), 1, seed=0)
    shutil.copy(tmp_path / "toy" / "images" / "000000.png", tmp_path / "train000000.png")
    assert R.main(["eval", "--manifest", manifest, "--images", str(tmp_path)] + flags) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["mean"]) == {"CLIP-T", "HPS", "CLIP-I", "DINO-I"} and m["n"] == 1
    assert all(-1 <= v <= 1 for v in m["mean"].values()) and 0 <= m["mean"]["DINO-I"] <= 1

@pytest.mark.parametrize("fault", list(B.eval_faults()))
def test_eval_scores_no_image_twice_and_notes_a_size_apart(tmp_path, capsys, fault):
    records, images = B.eval_faults()[fault]
    args = B.write_eval_case(str(tmp_path), records, images)
    assert toy.main(["eval", *args, "--out", str(tmp_path / "e.json")]) == 0
    report, err = json.loads((tmp_path / "e.json").read_text()), capsys.readouterr().err
    if fault == "an image of another size":                 # three scored, the 16 x 16 one noted
        assert (report["n"] == 3 and not report["bad"]
                and "note: 1 generated images differ in size" in err)
        assert [(n["line"], n["size"],
                 n["expected"]) for n in report["notes"]] == [(3, [16, 16], [32, 32])]
        return
    # line 1 keeps the image
    assert report["n"] == 1 and [r["line"] for r in report["records"]] == [1]
    assert ([b["line"] for b in report["bad"]] == [2] and "id: " in report["bad"][0]["why"]
            and not report["notes"])
    assert "1 bad records" in err

# ---- toy.py: the toy world: writing, reading, metrics, reward, old folders, command line ----

def first_world_folder(folder):
    """A folder as the first toy world wrote it (its code is in git history only): a prompt naming
    its subject in full, attrs naming a colour and a pattern -> its manifest."""
    os.makedirs(folder)
    yy, xx = np.mgrid[0:32, 0:32]
    disc = (yy - 10) ** 2 + (xx - 10) ** 2 <= 25
    target = np.full((32, 32, 3), 255, np.uint8)
    target[disc] = (220, 40, 40)
    Image.fromarray(target).save(folder / "target.png")
    Image.fromarray(target[2:18, 2:18]).save(folder / "ref.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(folder / "mask.png")
    rec = dict(id="toy000000", target="target.png", prompt="a red striped circle", refs=["ref.png"],
               masks=["mask.png"], attrs=[dict(shape="circle", colour="red", pattern="striped")],
               captions=["red striped circle"], kinds=["object"])
    (folder / "manifest.jsonl").write_text(json.dumps(rec) + "\n")
    return str(folder / "manifest.jsonl")

def all_files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}

@pytest.mark.parametrize("kw,n,n_short,seed",
                         [({}, 6, 3, 3), (dict(subjects=(1, 2, 3), pool=30), 40, 5, 0)],
                         ids=["defaults", "a pool of 30 identities"])
def test_toy_worlds_are_deterministic(tmp_path, kw, n, n_short, seed):
    folders = (("a", n, seed), ("b", n, seed), ("c", n, seed + 1), ("short", n_short, seed))
    a, b, c, short = (toy.write_world(str(tmp_path / k), m, seed=s, **kw) for k, m, s in folders)
    assert all_files(tmp_path / "a") == all_files(tmp_path / "b")      # same seed: same bytes
    assert open(a, "rb").read() != open(c, "rb").read()                # another seed: another world
    assert read_jsonl(short) == read_jsonl(a)[:n_short]                # records do not depend on n

def test_world_test_identities_are_never_trained_on(tmp_path):
    a, _ = world(tmp_path, "a", 40, seed=0, subjects=(1, 2, 3), pool=30)
    test, _ = world(tmp_path, "test", 40, seed=0, split="test", subjects=(1, 2, 3), pool=30)
    key = lambda at: (at["shape"], tuple(at["rgb"]), tuple(at["code"]))
    train_ids, test_ids = ({key(x) for r in a for x in r["attrs"]},
                           {key(x) for r in test for x in r["attrs"]})
    assert len(train_ids) <= 30 and sum(len(r["attrs"]) for r in a) > 60  # a pool: identities recur
    assert not train_ids & test_ids                                # held out: disjoint seed streams
    assert {x["shape"] for r in a for x in r["attrs"]} == set(toy.WORLD_SHAPES)

def test_toy_world_has_enough_similar_attributes():
    # every shape and every two-tone code is drawn, colours vary continuously, no two identities
    # look alike
    idents = [toy.draw_identity("train", k) for k in range(300)]
    assert len(toy.WORLD_SHAPES) >= 4 and {i.shape for i in idents} == set(toy.WORLD_SHAPES)
    assert len({i.code for i in idents}) == 2 ** toy.CODE_CELLS ** 2 - 2               # 14 codes
    assert len({i.rgb for i in idents}) == len(idents)
    renders = {toy.render_identity(i, 12)[0].tobytes() for i in idents}
    assert len(renders) == len(idents)                                          # all distinct

def test_toy_masks_are_exact(toy_manifest):
    ds = DS.ManifestDataset(toy_manifest, size=32, ref_size=16, token_px=4)
    root = os.path.dirname(toy_manifest)
    for i, rec in enumerate(read_jsonl(toy_manifest)):
        target = np.asarray(Image.open(os.path.join(root, rec["target"])))
        masks = [np.asarray(Image.open(os.path.join(root, m))) / 255 for m in rec["masks"]]
        for m, attrs, (y0, _, y1, _) in zip(masks, rec["attrs"], rec["boxes"]):
            assert set(np.unique(m)) <= {0.0, 1.0}
            px = round((y1 - y0) * 32)                                          # the sprite's side
            ident = toy.identity_of(attrs, "t")
            assert m.sum() == toy.render_identity(ident, px)[1].sum()          # the sprite's pixels
        union = np.sum(masks, 0)
        assert union.max() == 1                                                      # disjoint
        assert (target[union == 0] == 255).all() and (target[union == 1] != 255).any(-1).all()
        item = ds[i]
        assert item["mask_valid"].all()
        # token shares: each token holds 4 x 4 pixels, so the shares sum to area / 16
        assert torch.allclose(item["masks"].sum(1) * 16,
                              torch.tensor([m.sum() for m in masks], dtype=torch.float32))
        assert item["masks"].min() >= 0 and item["masks"].max() <= 1

def test_toy_correspondences_land_on_their_subject(toy_manifest):
    root = os.path.dirname(toy_manifest)
    for rec in read_jsonl(toy_manifest):
        target = np.asarray(Image.open(os.path.join(root, rec["target"])))
        for k, pts in enumerate(rec["points"]):
            ref = np.asarray(Image.open(os.path.join(root, rec["refs"][k])))
            mask = np.asarray(Image.open(os.path.join(root, rec["masks"][k])))
            assert len(pts) > 10
            for ry, rx, ty, tx in pts:
                t, r = (int(ty * 32), int(tx * 32)), (int(ry * 16), int(rx * 16))
                assert mask[t] == 255 and (target[t] == ref[r]).all()

def test_toy_prompt_names_each_subject(toy_manifest):
    # by its shape, the one attribute a prompt names here
    for rec in read_jsonl(toy_manifest):
        assert len(rec["attrs"]) == len(rec["refs"]) in (2, 3)
        assert sorted(toy.prompt_shapes(rec["prompt"])) == sorted(a["shape"] for a in rec["attrs"])
    assert toy.name_shapes(["circle", "square"]) == "a circle and a square"

def test_world_prompts_name_only_shapes_and_counts():
    assert toy.name_shapes(["circle", "square", "circle"]) == "two circles and a square"
    assert toy.name_shapes(["triangle"]) == "a triangle"
    assert toy.name_shapes(["square", "diamond", "circle"]) == "a square, a diamond and a circle"
    for i in range(30):
        _, _, idents, _, rec = toy.world_example(0, i, subjects=(1, 2, 3, 4))
        words = set(rec["prompt"].replace(",", "").split())
        assert (words <= {"a", "and", "two", "three", "four"} | set(toy.WORLD_SHAPES)
                | {s + "s" for s in toy.WORLD_SHAPES})

def test_world_references_are_other_views_and_masks_exact(tmp_path):
    recs, root = world(tmp_path, "w", 12, seed=1, subjects=(2, 3))
    for rec in recs:
        target = np.asarray(Image.open(root / rec["target"])).astype(int)
        union = 0
        for k, at in enumerate(rec["attrs"]):
            ident = toy.identity_of(at, "t")
            mask = np.asarray(Image.open(root / rec["masks"][k])) > 0
            union = union + mask
            light, dark = (np.round(np.array(ident.rgb) * 255),
                           np.round(np.array(ident.rgb) * toy.DARK * 255))
            tones = target[mask]
            # the subject's own two tones
            assert (np.all(tones == light, 1) | np.all(tones == dark, 1)).all()
            assert {tuple(t) for t in tones} == {tuple(light), tuple(dark)}       # both tones shown
            ref = np.asarray(Image.open(root / rec["refs"][k])).astype(int)
            sprite = (ref == light).all(-1) | (ref == dark).all(-1)       # the identity's own tones
            assert (ref[sprite] == light).all(1).any() and (ref[sprite] == dark).all(1).any()
            assert len(np.unique(ref[~sprite], axis=0)) == 1                # on one background tint
            # another scale than in the target: a taller sprite (references are 16 px, targets 32)
            assert np.ptp(np.nonzero(sprite.any(1))[0]) > np.ptp(np.nonzero(mask.any(1))[0])
            for ry, rx, ty, tx in rec["points"][k]:  # correspondences: subject pixels on both sides
                assert mask[int(ty * 32), int(tx * 32)] and sprite[int(ry * 16), int(rx * 16)]
        assert union.max() == 1 and (target[union == 0] == 255).all()

def test_world_sprite_sizes_and_views_scale_apart(tmp_path):
    recs, root = world(tmp_path, "big", 12, seed=0, subjects=(1, 2, 3), ref_size=24,
                       sprite=(10, 14))
    lo, hi = toy.view_px(24)
    assert (lo, hi) == (18, 22) and toy.view_px(16) == toy.VIEW_PX
    for rec in recs:
        for k, (y0, x0, y1, x1) in enumerate(rec["boxes"]):
            assert 10 <= round((y1 - y0) * 32) <= 14
            ref = np.asarray(Image.open(root / rec["refs"][k])).astype(int)
            ident = toy.identity_of(rec["attrs"][k], "t")
            sprite = (ref == np.round(np.array(ident.rgb) * 255)).all(-1) | \
                (ref == np.round(np.array(ident.rgb) * toy.DARK * 255)).all(-1)
            rows = np.nonzero(sprite.any(1))[0]
            # a shape may not fill its box
            assert ref.shape[:2] == (24, 24) and lo - 1 <= np.ptp(rows) + 1 <= hi
    # a view at a target's scale: refused
    for sprite, ref_size in (((12, 16), 16), ((5, 20), 24), ((0, 3), 16)):
        with pytest.raises(D.InputError, match="another scale|LO <= HI"):
            toy.write_world(str(tmp_path / "x"), 2, sprite=sprite, ref_size=ref_size)

def test_world_hard_pairs_share_a_shape_at_the_set_colour_distance(tmp_path):
    for name, d in toy.HARD.items():
        recs, _ = world(tmp_path, name, 10, seed=2, split="test", hard=name)
        for r in recs:
            a, b = (toy.identity_of(x, "t") for x in r["attrs"])
            assert (a.shape == b.shape and toy.colour_distance(a.rgb, b.rgb)
                    == pytest.approx(d, abs=1e-3))
            assert r["prompt"] == f"two {a.shape}s"

def test_world_reader_is_exact_on_clean_renders():
    for k in range(40):
        ident = toy.draw_identity("val", k)
        for px in range(toy.TARGET_PX[0], toy.VIEW_PX[1] + 1):
            im = np.full((20, 20, 3), 255, np.uint8)
            toy.paint(im, ident, 3, 2, px)
            (d,) = toy.read_subjects(im)
            assert d["shape"] == ident.shape and d["code"] == ident.code
            # up to the rounding of a pixel to 1 / 255 (a dark one's read back as the colour: /
            # DARK)
            assert np.abs(d["rgb"] - ident.rgb).max() <= 0.5 / 255 / toy.DARK + 1e-9

def test_world_reader_reads_blurred_noisy_sprites_by_their_tones():
    # a generator's sprites are soft: blurred (sigma 0.5 px) and noisy (2 / 255 ... 10 / 255); the
    # reader fits the world's two-tone model and leaves the fringe (tones fading into the white
    # background) out of colour and code
    rng, errs, codes = np.random.default_rng(0), [], []
    for k in range(60):
        ident, px = toy.draw_identity("val", k), int(rng.integers(*toy.TARGET_PX))
        rgb, m = toy.render_identity(ident, px)
        im = np.ones((20, 20, 3))
        im[4:4 + px, 3:3 + px][m] = rgb[m]
        im = np.stack([ndimage.gaussian_filter(im[..., c], 0.5) for c in range(3)], -1)
        im = np.clip(np.round((im + rng.normal(0, rng.uniform(2, 10) / 255, im.shape)) * 255), 0,
                     255)
        (d,) = toy.read_subjects(im.astype(np.uint8))
        errs.append(toy.colour_distance(d["rgb"], ident.rgb))
        codes.append(d["code"] == ident.code)
    # the median of the light pixels (the reader before this one) read 0.14 here, the fringe's
    # near-white
    assert np.mean(errs) < 0.04 and np.max(errs) < 0.12 and np.mean(codes) >= 0.85

def test_colour_error_split_separates_pull_from_shrinkage():
    own = np.array([[0.2, 0.4, 0.6], [0.7, 0.3, 0.3], [0.5, 0.8, 0.2]])
    other = np.array([[0.6, 0.4, 0.2], [0.2, 0.2, 0.6], [0.3, 0.3, 0.7]])
    grey = np.full((3, 3), 0.5)
    split = lambda drawn: toy.split_error(drawn - own, other - own, grey - own)
    assert split(own) == pytest.approx((0, 0), abs=1e-12)                           # faithful
    assert split((own + other) / 2) == pytest.approx((0.5, 0), abs=1e-12)           # pure averaging
    assert split(own + 0.3 * (grey - own)) == pytest.approx((0, 0.3), abs=1e-12)    # pure shrinkage
    assert (split(own + 0.2 * (other - own) + 0.1 * (grey - own))
            == pytest.approx((0.2, 0.1), abs=1e-12))
    # error orthogonal to both directions counts as neither (each row's cross product with its two
    # directions)
    assert split(own + 0.1 * np.cross(other - own, grey - own)) == pytest.approx((0, 0), abs=1e-12)
    # one row: undetermined
    assert all(math.isnan(v) for v in toy.split_error(own[:1] - own[:1], own[:1], own[:1]))

def test_world_metrics_split_and_both_drawn_on_the_sanity_rows(tmp_path):
    two, _ = world(tmp_path, "two", 30, seed=3, split="test", subjects=(2, 3))
    rows = {k: toy.world_metrics(toy.sanity_images(two, k), two) for k in toy.SANITY}
    assert abs(rows["targets"]["pull"]) < 0.01 and abs(rows["targets"]["shrink"]) < 0.01
    assert (rows["averaging"]["pull"] == pytest.approx(0.5, abs=0.01)
            and abs(rows["averaging"]["shrink"]) < 0.01)
    # shrinkage toward grey: blend alpha reads it as blending (well above 0), the split does not
    assert rows["shrinking"]["pull"] == pytest.approx(0, abs=0.01)
    assert (rows["shrinking"]["shrink"] == pytest.approx(toy.SHRINK, abs=0.01)
            and rows["shrinking"]["alpha"] > 0.2)
    # random colours
    assert rows["text-only"]["shrink"] > 0.6 and abs(rows["text-only"]["pull"]) < 0.15
    assert all(rows[k]["all_drawn"] == 1 for k in toy.SANITY)
    blank = [np.full((32, 32, 3), 255, np.uint8)] * len(two)
    assert toy.world_metrics(blank, two)["all_drawn"] == 0

def test_world_metrics_hand_values():
    A = toy.Identity("square", (0.2, 0.4, 0.6), (1, 0, 0, 0))
    B = toy.Identity("square", (0.6, 0.4, 0.2), (0, 1, 1, 1))
    rec = dict(id="r", attrs=[A.attrs(), B.attrs()])
    im = np.full((32, 32, 3), 255, np.uint8)
    # A's colour and code, wrong shape
    toy.paint(im, toy.Identity("circle", A.rgb, A.code), 2, 2, 10)
    # halfway to A, one cell off
    toy.paint(im, toy.Identity("square", (0.4, 0.4, 0.4), (0, 1, 1, 0)), 18, 18, 10)
    m = toy.world_metrics([im], [rec])
    # colour errors 0 and (0.2 + 0 + 0.2) / 3; alpha 0 and 0.5 (the mean of its own and the other
    # reference's); up to the 8-bit rounding of the drawn pixels
    q = 0.5 / 255 / toy.DARK
    assert m["colour_err"] == pytest.approx(0.4 / 3 / 2, abs=q)
    assert (m["texture_acc"], m["shape_acc"], m["count_acc"], m["drawn"]) == (0.5, 0.5, 1.0, 1.0)
    assert m["alpha"] == pytest.approx(0.25, abs=2 * q) and m["leakage"] == 0.5
    one = np.full((32, 32, 3), 255, np.uint8)
    toy.paint(one, B, 5, 5, 9)                                              # B alone: A is missing
    m = toy.world_metrics([one], [rec])
    # A unmatched: counted in drawn and count accuracy only; B matched exactly, its alpha 0
    # (A is its other)
    assert m["drawn"] == 0.5 and m["count_acc"] == 0 and m["n_refs"] == 2 and m["n_subjects"] == 1
    assert m["colour_err"] <= q and m["texture_acc"] == m["shape_acc"] == 1
    assert m["alpha"] == pytest.approx(0, abs=2 * q) and m["leakage"] == 0
    assert (toy.blend_alpha((0.3, 0.5, 0.1), (0.2, 0.4, 0.2), [(0.6, 0.8, -0.2), (0.9, 0.9, 0.9)])
            == pytest.approx(0.25))

def test_world_reward_hand_values():
    reward = toy.world_reward()
    assert toy.prompt_shapes("two circles, a square and three diamonds") == \
        ["circle", "circle", "square", "diamond", "diamond", "diamond"]
    for i in range(20):            # the targets: every term at its maximum, Eq. 9 = 1.4 + 0.7 + 1.0
        target, _, _, refs, rec = toy.world_example(0, i, "test", subjects=(1, 2, 3))
        assert toy.prompt_shapes(rec["prompt"]) == sorted(toy.prompt_shapes(rec["prompt"]),
                                                          key=rec["captions"].index)
        drawn = sorted(d["shape"] for d in toy.read_subjects(target))
        assert drawn == sorted(rec["captions"])                      # every subject found and named
        t = reward([target], rec["prompt"], refs)
        # (id up to the 8-bit rounding of the colours read: 1e-3 in the kernel)
        assert t["text"][0] == 1 and t["aes"][0] == 1 and t["id"][0] == pytest.approx(1, abs=1e-3)
        assert t["total"][0] == pytest.approx(3.1, abs=1e-3)
    A = toy.Identity("circle", (0.2, 0.4, 0.6), (1, 0, 0, 0))
    B = toy.Identity("circle", (0.7, 0.3, 0.2), (0, 1, 1, 1))
    refs = []
    for ident in (A, B):
        r = np.full((16, 16, 3), 240, np.uint8)
        toy.paint(r, ident, 1, 1, 13)
        refs.append(r)
    def drawn(*idents):
        im = np.full((32, 32, 3), 255, np.uint8)
        for (y, x), ident in zip(((2, 2), (18, 18)), idents):
            toy.paint(im, ident, y, x, 10)
        return im
    both, one, swapped = drawn(A, B), drawn(A), drawn(toy.Identity("circle", B.rgb, A.code), B)
    t = reward([both, one, swapped, np.full((32, 32, 3), 255, np.uint8)], "two circles", refs)
    assert t["text"].tolist() == [1, 0.5, 1, 0]                 # one circle of two named; none
    three = drawn(A, B)
    toy.paint(three, toy.Identity("square", B.rgb, B.code), 2, 18, 10)    # a third subject, unnamed
    text = reward([three], "two circles", refs)["text"][0]
    assert text == pytest.approx(2 / 3)                                  # over max(named, drawn)
    assert t["id"][0] == pytest.approx(1, abs=1e-3) and t["id"][1] == pytest.approx(0.5, abs=1e-3)
    # A's subject in B's colour: shape and code agree (2 of 3 parts), the colour part is the mean
    # over channels of the Gaussian kernel exp(-d^2 / (4 w^2)), w = 0.08, at channel distances 0.5,
    # 0.1 and 0.4
    kernel = np.mean(np.exp(-np.array([0.5, 0.1, 0.4]) ** 2 / (4 * 0.08 ** 2)))
    assert t["id"][2] == pytest.approx(((2 + kernel) / 3 + 1) / 2, abs=0.01) and t["id"][3] == 0
    muddy = drawn(A, B)
    # two rows of noise, off the subjects
    muddy[30:32] = np.random.default_rng(0).integers(0, 256, (2, 32, 3))
    assert 1 - 64 / 1024 <= reward([muddy], "two circles", refs)["aes"][0] < 1 - 48 / 1024

def test_toy_reward_follows_the_world_of_the_records(tmp_path):
    new = read_jsonl(toy.write_world(str(tmp_path / "w"), 2))
    plain = [{k: v for k, v in r.items() if k != "attrs"} for r in new]    # prompts and references
    old = read_jsonl(first_world_folder(tmp_path / "o"))
    assert toy.reward_for(new, "w").multi_id.embedder.__class__ is toy.WorldSubjects
    assert toy.reward_for(plain, "w").multi_id.embedder.__class__ is toy.WorldSubjects
    with pytest.raises(InputError, match="first toy world") as e:
        toy.reward_for(old, "o")
    assert str(e.value).startswith("o: first record: ") and "\n" not in str(e.value)

@pytest.mark.parametrize("argv", [["--size", "100000"], ["--ref-size", "0"], ["--n", "0"],
                                  ["--size", "x"]])
def test_toy_sizes_are_bounded_before_anything_is_drawn(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        toy.main(["--out", str(tmp_path / "t"), "--n", "1", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument --") and err.count("\n") == 1
    assert not (tmp_path / "t").exists()

def test_toy_cli_writes_checked_worlds_and_gives_one_line_errors(tmp_path, capsys):
    for k in (1, 4):
        assert toy.main([
            "--out", str(tmp_path / str(k)), "--n", "5", "--subjects", str(k), "--seed", "1"]) == 0
        recs = read_jsonl(tmp_path / str(k) / "manifest.jsonl")
        assert all(len(r["refs"]) == len(r["masks"]) == k for r in recs)
        assert D.check(str(tmp_path / str(k) / "manifest.jsonl")) == 0
    assert toy.main(["--out", str(tmp_path / "x"), "--n", "2", "--subjects", "5"]) == 2
    # 2 sprites cannot fit
    assert toy.main(["--out", str(tmp_path / "y"), "--n", "2", "--size", "20"]) == 2
    assert capsys.readouterr().err.count("error:") == 2
    assert (toy.main(["--out", str(tmp_path / "w"), "--n", "3", "--split", "val", "--hard", "far"])
            == 0)
    assert toy.main(["--out", str(tmp_path / "z"), "--n", "2", "--identities", "0"]) == 2
    assert D.check(str(tmp_path / "w" / "manifest.jsonl")) == 0
    recs = read_jsonl(tmp_path / "w" / "manifest.jsonl")
    gen = tmp_path / "gen"
    gen.mkdir()
    shutil.copy(tmp_path / "w" / recs[0]["target"], gen / f"{recs[0]['id']}.png")
    capsys.readouterr()
    assert (toy.main(["eval", "--manifest", str(tmp_path
                                                / "w" / "manifest.jsonl"), "--images", str(gen)])
            == 0)
    m = json.loads((gen / "metrics.json").read_text())["rows"]
    assert m["images"]["colour_err"] < 0.01 and m["images"]["texture_acc"] == 1
    # up to 8-bit rounding
    assert m["averaging"]["alpha"] == pytest.approx(0.5, abs=2 * 0.5 / 255 / toy.DARK)
    old = first_world_folder(tmp_path / "old")
    capsys.readouterr()
    for refused in (lambda: EW.main(["sanity", "--manifest", old]),
                    lambda: toy.main(["eval", "--manifest", old, "--images", str(gen)])):
        assert refused() == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert "first toy world" in err and "rgb" in err

def test_eval_cli_toy(tmp_path, capsys):
    # a manifest of prompts and references only (no identities: no metrics) is scored by the world's
    # reward
    recs = [{k: v for k, v in r.items() if k != "attrs"}
            for r in read_jsonl(toy.write_world(str(tmp_path / "toy"), 4, seed=0))]
    manifest = str(tmp_path / "toy" / "plain.jsonl")
    (tmp_path / "toy" / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    gen = tmp_path / "gen"
    gen.mkdir()
    for r in recs[:2]:                                           # the true targets as "generations"
        shutil.copy(tmp_path / "toy" / r["target"], gen / f"{r['id']}.png")
    # a blank one; recs[3]: missing
    Image.new("RGB", (32, 32), "white").save(gen / f"{recs[2]['id']}.png")
    out = tmp_path / "m.json"
    assert toy.main(["eval", "--manifest", manifest, "--images", str(gen), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    # (up to the 8-bit rounding of the colours read: 1e-3 in the kernel)
    assert [r["toy-ID"] for r in m["records"]] == pytest.approx([1.0, 1.0, 0.0], abs=1e-3)
    assert (m["n"] == 3 and len(m["missing"]) == 1
            and m["missing"][0]["image"].endswith(f"{recs[3]['id']}.png"))
    assert m["mean"]["toy-ID"] == pytest.approx(2 / 3, abs=1e-3)
    assert "| toy-ID |" in capsys.readouterr().out
    # a missing manifest: exit 2, one line
    assert toy.main(["eval", "--manifest", str(tmp_path / "none.jsonl"), "--images", str(gen)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "none.jsonl" in err and "\n" not in err

# ---- curate.py: faces from videos and pairs, object masks, correspondences ----

SPR = dict(A=toy.Identity("circle", (0.85, 0.16, 0.16), (0, 1, 1, 0)),
           B=toy.Identity("square", (0.16, 0.31, 0.85), (1, 0, 0, 1)),
           C=toy.Identity("triangle", (0.16, 0.67, 0.24), (0, 0, 1, 1)),
           F=toy.Identity("diamond", (0.55, 0.24, 0.78), (1, 1, 0, 0)))

PX = 24                                                        # sprites of 24 px

def embedding(d):
    # a subject the toy's reader read (or an identity) -> the toy's embedding of shape, code, colour
    return toy.embed_subject(dict(shape=d["shape"], code=d["code"], rgb=np.asarray(d["rgb"])))

class ToyFaceApp:
    """insightface's app interface over the toy world's reader: every subject is a face, embedded by
    the toy."""
    def get(self, bgr):
        found = toy.read_subjects(np.ascontiguousarray(bgr[..., ::-1]))
        return [Face((x0, y0, x1, y1), embedding(d)) for d in found
                for y0, x0, y1, x1 in [d["box"]]]

def toy_faces():
    return C.face_detector(R.FaceEmbedder(app=ToyFaceApp()))     # the path insightface's faces take

def scene(placed, W=96, H=64):
    """[(sprite key, x, y)] -> (H, W, 3) uint8 on white, and each sprite's exact box
    (x0, y0, x1, y1)."""
    a, boxes = np.full((H, W, 3), 255, np.uint8), []
    for k, x, y in placed:
        rgb, m = toy.render_identity(SPR[k], PX)
        a[y:y + PX, x:x + PX][m] = np.round(rgb[m] * 255)
        ys, xs = np.nonzero(m)
        boxes.append((x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1))
    return a, boxes

def write_clip(path, frames):
    import cv2
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, frames[0].shape[1::-1])
    for f in frames:
        w.write(np.ascontiguousarray(f[..., ::-1]))
    w.release()

def identity(img):
    # the toy's verdict on the largest subject of an image, the nearest of SPR: the independent
    # check of who is where
    e = embedding(toy.read_subjects(np.asarray(img))[0])
    return max(SPR.values(), key=lambda s: e @ embedding(vars(s)))

def masked(target, mask):
    return np.where(np.asarray(mask)[..., None] > 127, np.asarray(target), 255).astype(np.uint8)

def toy_detector(image, phrases):
    # phrase grounding for the toy world, whose captions are shapes: each phrase's boxes are the
    # subjects the toy's reader reads as that shape
    found = [((x0, y0, x1, y1), d["shape"]) for d in toy.read_subjects(np.asarray(image))
             for y0, x0, y1, x1 in [d["box"]]]
    return [[(b, 1.0) for b, shape in found if shape == p] for p in phrases]

def shapes_differ(recs):
    # the records whose subjects' shapes all differ (a caption names a shape: two subjects of one
    # shape ground on one)
    return [i for i, r in enumerate(recs) if len(set(r["captions"])) == len(r["captions"])]

def toy_masker(image, boxes):
    # SAM2's stand-in: the non-white pixels in each box
    a = (np.asarray(image) < 200).any(-1)
    m = np.zeros((len(boxes), *a.shape), bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        m[k, int(y0):math.ceil(y1),
          int(x0):math.ceil(x1)] = a[int(y0):math.ceil(y1), int(x0):math.ceil(x1)]
    return m

def pixel_patches(images, p=8):
    # a feature extractor that is exactly translation-equivariant: each p x p patch's pixels,
    # zero-mean
    out = []
    for im in images:
        a = np.asarray(im, np.float64)
        h, w = a.shape[0] // p, a.shape[1] // p
        f = a[:h * p, :w * p].reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, -1)
        out.append(f - f.mean(-1, keepdims=True))
    return out

def translated(shift=(8, 16), seed=0):
    """A noise texture; the reference shows its window at (0, 0), the target (96 x 96, white) the
    window at shift, placed at (16, 24): ref pixel (y, x) is target pixel (y - shift_y + 16, x -
    shift_x + 24)."""
    tex = np.random.default_rng(seed).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    ref, tgt = tex[:64, :64], np.full((96, 96, 3), 255, np.uint8)
    tgt[16:80, 24:88] = tex[shift[0]:shift[0] + 64, shift[1]:shift[1] + 64]
    mask = np.zeros((96, 96), np.float32)
    mask[16:80, 24:88] = 1
    return Image.fromarray(ref), Image.fromarray(tgt), mask

def offsets(points, ref_side=64, tgt_side=96):
    # points -> (P, 2) pixel offsets target - reference
    p = np.asarray(points)
    return np.round(p[:, 2:] * tgt_side - p[:, :2] * ref_side).astype(int)

def test_curate_videos_verifies_identities_and_counts_every_drop(tmp_path, capsys):
    d = tmp_path / "clips"
    d.mkdir()
    moving = lambda a, b, n=11: [scene([(a, 4 + 6 * t, 4), (b, 70 - 6 * t, 36)])[0]
                                 for t in range(n)]
    write_clip(d / "good.avi", moving("A", "B"))
    (d / "good.txt").write_text("a red circle meets\n a blue square")
    write_clip(d / "nocap.avi", moving("F", "C"))
    # B's place taken by C mid-clip
    write_clip(d / "swapped.avi", moving("A", "B")[:5] + moving("A", "C")[5:])
    write_clip(d / "twins.avi", moving("A", "A"))
    write_clip(d / "one.avi", [scene([("A", 4 + 6 * t, 4)])[0] for t in range(11)])
    write_clip(d / "empty.avi", [np.full((64, 96, 3), 255, np.uint8)] * 11)
    write_clip(d / "tiny.avi", [np.full((24, 24, 3), 255, np.uint8)] * 11)
    write_clip(d / "still.avi", moving("A", "B", 1))
    (d / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    s = C.curate(C.video_items(str(d)), str(out), toy_faces(), min_size=32)
    assert (s["kept"] == 2 and s["dropped"] == {"duplicate_identity": 1, "too_few_faces": 2,
                                                "too_short": 1,
                                                "too_small": 1, "unreadable": 1, "unverified": 1})
    why = {os.path.basename(i["source"]): i.get("reason") for i in s["items"]}
    assert why == {"broken.mp4": "unreadable", "empty.avi": "too_few_faces", "good.avi": None,
                   "nocap.avi": None, "one.avi": "too_few_faces", "still.avi": "too_short",
                   "swapped.avi": "unverified",
                   "tiny.avi": "too_small", "twins.avi": "duplicate_identity"}
    assert json.loads((out / "summary.json").read_text())["dropped"] == s["dropped"]
    assert "generic prompt" in capsys.readouterr().err
    assert D.check(str(out / "manifest.jsonl")) == 0
    recs = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert recs["good"]["prompt"] == "a red circle meets a blue square"
    assert recs["nocap"]["prompt"] == "a photo of 2 people"
    # frame 1 gives the references, frame 5 the target; at frame 5 the first sprite is the left one
    for key, order in (("good", "AB"), ("nocap", "FC")):
        r = recs[key]
        target = Image.open(out / r["target"])
        assert target.size == (64, 64)                       # the largest square of a 96 x 64 frame
        for k, who in enumerate(order):
            assert identity(Image.open(out / r["refs"][k])) == SPR[who]
            assert identity(masked(target, Image.open(out / r["masks"][k]))) == SPR[who]
    assert all(c > 0.9 for i in s["items"] if i["kept"] for c in i["cosines"])

def test_curate_pairs_crop_masks_and_hooks(tmp_path):
    d = tmp_path / "pairs"
    # swapped sides
    for name, ref, tgt in (("p0", [("A", 4, 20), ("B", 60, 20)], [("B", 50, 4), ("A", 70, 36)]),
                           ("p1", [("A", 4, 20), ("B", 60, 20)], [("A", 30, 20)]),        # one face
                           ("p2", [("F", 4, 20), ("C", 60, 20), ("A", 32, 36)],      # A: not in the
                            [("C", 4, 4), ("F", 30, 36)]),                                  # target
                           # 96 px apart
                           ("p4", [("A", 4, 20), ("B", 60, 20)], [("A", 0, 4), ("B", 72, 36)])):

        (d / name).mkdir(parents=True)
        Image.fromarray(scene(ref)[0]).save(d / name / "ref.png")
        Image.fromarray(scene(tgt)[0]).save(d / name / "target.png")
    (d / "p0" / "prompt.txt").write_text("swapped")
    (d / "p3").mkdir()                                # no images at all
    Image.fromarray(scene([])[0]).save(d / "p3" / "ref.png")
    out = tmp_path / "out"
    s = C.curate(C.pair_items(str(d)), str(out), toy_faces(), min_size=32,
                 caption=lambda target, refs: f"{len(refs)} sprites, {target.size[0]} px")
    assert s["kept"] == 2 and s["unverified_faces"] == 1
    assert s["dropped"] == {"no_square_fit": 1, "too_few_faces": 1, "unreadable": 1}
    assert [i["unverified"] for i in s["items"] if i["kept"]] == [0, 1]
    recs = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert recs["p0"]["prompt"] == "swapped" and recs["p2"]["prompt"] == "2 sprites, 64 px"
    # p0: the subjects sit right of centre, so the 64 px square is pushed against the right edge: x
    # from 32
    _, boxes = scene([("B", 50, 4), ("A", 70, 36)])
    for k, (x0, y0, x1, y1) in enumerate(boxes):      # B is left of A in the target: subject 0 is B
        expect = np.zeros((64, 64), np.uint8)
        expect[y0:y1, x0 - 32:x1 - 32] = 255
        np.testing.assert_array_equal(np.asarray(Image.open(out / recs["p0"]["masks"][k])), expect)
        assert identity(Image.open(out / recs["p0"]["refs"][k])) == SPR["BA"[k]]
    # p2: each reference is its face box grown by 0.4 x the longer side each way, clipped to the
    # frame (F's, left)
    ref_img, ref_boxes = scene([("F", 4, 20), ("C", 60, 20), ("A", 32, 36)])
    # in the target C is left of F: F is subject 1
    for k, (x0, y0, x1, y1) in zip((1, 0), ref_boxes):
        half, cx, cy = 0.9 * max(x1 - x0, y1 - y0), (x0 + x1) / 2, (y0 + y1) / 2
        l, t = max(0, round(cx - half)), max(0, round(cy - half))
        r, b = min(96, round(cx + half)), min(64, round(cy + half))
        got = np.asarray(Image.open(out / recs["p2"]["refs"][k]), np.float64)
        # JPEG
        assert got.shape[:2] == (b - t, r - l) and np.abs(got - ref_img[t:b, l:r]).mean() < 4
        assert (l == 0) == (k == 1)                   # F's crop meets the frame's left edge
    # a person masker (SAM2's interface): its largest connected component is kept, stray blobs go
    seen = []
    def masker(image, boxes):
        seen.append(boxes)
        m = np.zeros((len(boxes), image.height, image.width), bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            m[k, int(y0):int(y1), int(x0):int(x0) + 3] = True     # the person: a strip down the box
            m[k, 0, 63] = True                                    # a stray pixel
        return m
    s = C.curate(C.pair_items(str(d)), str(tmp_path / "sam"), toy_faces(), min_size=32,
                 masker=masker)
    m = np.asarray(Image.open(tmp_path / "sam" / "masks" / "p0_0.png")) > 0
    x0, y0 = boxes[0][0] - 32, boxes[0][1]       # B's face; its person box starts a face width left
    w, h = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
    assert seen[0][0] == (max(0, x0 - w), max(0, y0 - h / 2), min(64, x0 + 2 * w), 64.0)  # in frame
    assert m.sum() == 3 * (64 - int(max(0, y0 - h / 2))) and not m[0, 63]
    with pytest.raises(C.Drop, match="empty"):
        C.region_masks(Image.new("RGB", (8, 8)), [(0, 0, 4, 4)],
                       lambda image, boxes: np.zeros((1, 8, 8), bool))

def test_curate_real_models_without_weights_are_one_line_errors(tmp_path, capsys, toy_manifest):
    (tmp_path / "clips").mkdir()
    no = str(tmp_path / "no")
    for argv, what in ((["faces", "--videos", str(tmp_path / "clips"),
                         "--face-root", str(tmp_path)], "model zoo"),
                       (["objects", "--manifest", toy_manifest, "--detector", no], "Florence-2"),
                       (["correspond", "--manifest", toy_manifest, "--dinov2", no], "DINOv2")):
        assert C.main(argv + ["--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and what in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()                  # nothing written before the models load

def test_curate_objects_masks_the_captioned_subjects(toy_manifest, tmp_path, flo_dir):
    root = os.path.dirname(toy_manifest)
    recs = read_jsonl(toy_manifest)
    # MUSAR-Gen-like
    plain = [{k: v for k, v in r.items() if k not in ("masks", "points")} for r in recs]
    found = shapes_differ(recs)[:3]                                                    # detected
    same, star, uncaptioned, given = [i for i in range(len(recs)) if i not in found][:4]
    captions = plain[same]["captions"]
    plain[same]["captions"] = [captions[0]] * len(captions)               # two captions, one object
    plain[star]["captions"] = ["white plain star"] + plain[star]["captions"][1:]  # not in the image
    del plain[uncaptioned]["captions"]
    lines = [json.dumps(plain[i]) for i in found + [same, star, uncaptioned]]
    lines += [json.dumps(recs[given]), "{oops"]
    root_m = os.path.join(root, "musar.jsonl")
    with open(root_m, "w") as f:
        f.write("\n".join(lines) + "\n")
    for masker, out in ((None, tmp_path / "box"), (toy_masker, tmp_path / "sam")):
        s = C.curate_objects(root_m, str(out), toy_detector, masker)
        assert s["kept"] == 4 and s["masks_given"] == 1
        assert s["dropped"] == {"bad_record": 1, "no_captions": 1, "not_found": 1, "same_object": 1}
        assert D.check(str(out / "manifest.jsonl")) == 0
        got = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
        for i in found:
            for k, path in enumerate(got[recs[i]["id"]]["masks"]):
                exact = np.asarray(Image.open(os.path.join(root, recs[i]["masks"][k]))) > 0
                m = np.asarray(Image.open(out / path)) > 0
                ys, xs = np.nonzero(exact)
                box = np.zeros_like(exact)
                box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
                np.testing.assert_array_equal(m, exact if masker else box)
        assert got[recs[given]["id"]]["masks"] == recs[given]["masks"]  # given masks pass unchanged
    with pytest.raises(InputError, match="overwrite"):
        C.curate_objects(toy_manifest, root, toy_detector)
    # the real Florence-2 path (the tiny model answers one box for every phrase): a box mask, or one
    # object twice
    (tmp_path / "flo").mkdir()
    images(1, seed=3, size=(40, 30))[0].save(tmp_path / "flo" / "t.png")
    with open(tmp_path / "flo" / "m.jsonl", "w") as f:
        for caps in (["a red circle"], ["a red circle", "a blue square"]):
            f.write(json.dumps(dict(
                target="t.png", refs=["t.png"] * len(caps), captions=caps, prompt="x")) + "\n")
    det = R.Florence2Detector(flo_dir, max_new_tokens=12).detect
    s = C.curate_objects(str(tmp_path / "flo" / "m.jsonl"), str(tmp_path / "flo_out"), det)
    assert s["kept"] == 1 and s["dropped"] == {"same_object": 1}
    m = np.asarray(Image.open(tmp_path / "flo_out" / "object_masks" / "000000_0.png")) > 0
    assert m.sum() == (20 - 4) * (18 - 6) and m[6:18, 4:20].all()           # the box (4, 6, 20, 18)

def test_curate_objects_ids_that_clean_alike_keep_their_own_masks(toy_manifest, tmp_path):
    root, recs = os.path.dirname(toy_manifest), read_jsonl(toy_manifest)
    plain = [{k: v for k, v in r.items() if k not in ("masks", "points")} for r in recs]
    a, b, c, d = shapes_differ(recs)[:4]
    picks = [dict(plain[a], id="x"), dict(plain[b], id="x."),
             {k: v for k, v in plain[c].items() if k != "id"},
             dict(plain[d], id="000002")]         # the id-less record is number 2: "000002" as well
    with open(os.path.join(root, "clash.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in picks))
    s = C.curate_objects(os.path.join(root, "clash.jsonl"), str(tmp_path / "o"), toy_detector)
    assert s["kept"] == 4
    got = read_jsonl(tmp_path / "o" / "manifest.jsonl")
    paths = [p for r in got for p in r["masks"]]
    assert len(set(paths)) == len(paths)                     # no record's masks overwrite another's
    for r, src in zip(got, (recs[a], recs[b], recs[c], recs[d])):
        exact = np.asarray(Image.open(os.path.join(root, src["masks"][0]))) > 0
        m = np.asarray(Image.open(tmp_path / "o" / r["masks"][0])) > 0
        ys, xs = np.nonzero(exact)
        assert (m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
                and m.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1))

def test_correspond_recovers_a_translation():
    ref, tgt, mask = translated((8, 16))
    pts = C.record_correspondences(tgt, [ref], [mask], pixel_patches)[0]
    expect = (16 - 8, 24 - 16)
    off = offsets(pts)
    # the 7 x 6 patches both images show all match, each at the true shift; the rest is noise
    # against noise
    # the patch's top-left
    corner = lambda p: tuple(np.round(np.asarray(p[:2]) * 64 - 4).astype(int))
    hits = {corner(p) for p, o in zip(pts, off) if tuple(o) == expect}
    assert hits == {(y, x) for y in range(8, 64, 8) for x in range(16, 64, 8)}
    assert (off == expect).all(1).sum() >= 0.75 * len(pts)
    p = np.asarray(pts)
    assert ((p >= 0) & (p <= 1)).all() and all(mask[int(ty * 96),
                                                    int(tx * 96)] for _, _, ty, tx in pts)

def test_correspond_with_a_tiny_dinov2(dino_dir):
    ref, tgt, mask = translated((8, 16), seed=1)
    dino = R.DinoEmbedder(dino_dir)
    f = dino.patches([ref, tgt], side=64)
    assert f.shape == (2, 8, 8, 32) and np.allclose(np.linalg.norm(f, axis=-1), 1, atol=1e-5)
    pts = C.record_correspondences(tgt, [ref], [mask], lambda ims: dino.patches(ims, side=64))[0]
    off = offsets(pts)
    # random weights, yet every one of the 7 x 6 patches both show is found at the true shift
    # (measured: 42 of 46)
    assert (off == (8, 8)).all(1).sum() == 42 and (off == (8, 8)).all(1).mean() > 0.75, off
    with pytest.raises(InputError, match="multiple of"):
        dino.patches([ref], side=60)

def test_correspond_keeps_references_disjoint():
    ref, tgt, mask = translated((8, 16))
    other = np.zeros_like(mask)
    for lo, claimed in ((80, False), (56, True)):   # a second subject next to, then over, the first
        other[:] = 0
        other[16:80, lo:96] = 1
        pts = C.record_correspondences(tgt, [ref, ref], [mask, other], pixel_patches)
        first, second = (np.asarray(p).reshape(-1, 4) for p in pts)
        in_band = lambda p: ((p[:, 3] * 96 >= 56) & (p[:, 3] * 96 < 88)).sum()
        assert (in_band(first) == 0) == claimed     # the overlap is nobody's
        for mine, theirs in ((first, other), (second, mask)):
            assert not any(theirs[int(ty * 96), int(tx * 96)] for _, _, ty, tx in mine)
        tokens = DS.points_to_tokens([torch.tensor(first), torch.tensor(second)], (8, 8), (24, 24))
        # no target token lost to a shared claim
        assert [len(t) for t in tokens] == [len(first), len(second)]

def test_curated_pairs_get_points_check_and_train(toy_run, dino_dir, tmp_path, monkeypatch):
    # the CLI end to end: curate (the toy's faces in place of insightface) -> correspond
    # (a tiny DINOv2) -> check -> train_sft with L_attn and SCAL on the toy preset
    root, _ = toy_run
    d = tmp_path / "pairs"
    for i in range(4):
        (d / f"p{i}").mkdir(parents=True)
        Image.fromarray(scene([("A", 4 + i, 20), ("B", 60, 20 - i)])[0]).save(
            d / f"p{i}" / "ref.png")
        Image.fromarray(scene([("B", 8, 4 + i), ("A", 40 - i, 36)])[0]).save(
            d / f"p{i}" / "target.png")
    real = R.FaceEmbedder
    monkeypatch.setattr(R, "FaceEmbedder", lambda pack, root, device: real(app=ToyFaceApp()))
    assert (C.main(["faces", "--pairs", str(d), "--out", str(tmp_path / "cur"), "--min-size", "32"])
            == 0)
    assert C.main(["correspond", "--manifest", str(tmp_path / "cur" / "manifest.jsonl"), "--out",
                   str(tmp_path / "pts"), "--dinov2", dino_dir, "--patch-side", "32"]) == 0
    s = json.loads((tmp_path / "pts" / "summary.json").read_text())
    assert s["kept"] == 4 and s["points_per_reference"] >= 1
    manifest = str(tmp_path / "pts" / "manifest.jsonl")
    assert (D.main(["check", manifest]) == 0 and all(all(p) for r in read_jsonl(manifest)
                                                     for p in r["points"]))
    sft(tmp_path / "m", manifest, "--stage", "multi", "--init", str(root / "base"), "--steps", "2",
        "--scal", "0.1")
    log = [r for r in read_log(tmp_path / "m") if "diff" in r]
    assert ([r["step"] for r in log] == [1, 2] and all(math.isfinite(r["scal"]) and r["dice"] > 0
                                                       for r in log))

# ---- runs.py: the run folder: refusals, lock, checkpoints, resume, signals ----

@pytest.fixture(scope="module")
def one_step_run(toy_run, tmp_path_factory):
    root, manifest = toy_run
    out = tmp_path_factory.mktemp("onestep") / "run"
    sft(out, manifest, "--stage", "multi", "--init", str(root / "base"), "--steps", "1")
    return out

def same_adapter(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

@pytest.fixture(scope="module")
def two_step_run(toy_run, tmp_path_factory):
    # a 3-step uninterrupted run (its final adapter is what every interrupted one must reach) and
    # the same run stopped after step 2 (keep 3: all its checkpoints stay)
    root, manifest = toy_run
    runs = tmp_path_factory.mktemp("runs")
    sft(runs / "full", manifest, *multi(root, "--steps", "3", "--keep", "3"))
    sft(runs / "cut", manifest, *multi(root, "--steps", "2", "--keep", "3"))
    return runs, adapter_of(runs / "full" / "ckpt-0000003")

def test_rotation_removes_only_older_checkpoints(tmp_path):
    out = str(tmp_path)
    write = lambda step, keep: runs.write_checkpoint(out, step,
                                                     {"x.bin": lambda f: f.write(b"x" * step)}, 1,
                                                     keep)
    for step in (9, 1, 2, 3):                                 # ckpt-9: a higher step from elsewhere
        write(step, keep=2)
    assert sorted(os.listdir(out)) == ["ckpt-0000002", "ckpt-0000003", "ckpt-0000009", "latest"]
    assert os.readlink(tmp_path / "latest") == "ckpt-0000003"
    assert json.loads((tmp_path / "ckpt-0000003" / "checkpoint.json").read_text()) == \
        {"step": 3, "world": 1, "files": {"x.bin": 3},
         "sha256": {"x.bin": hashlib.sha256(b"xxx").hexdigest()}}

@pytest.mark.parametrize("trainer", ["sft", "rl"])
def test_a_used_out_is_refused_and_fresh_keeps_the_old_run_until_its_first_checkpoint(
        toy_run, tmp_path, capsys, monkeypatch, trainer):
    root, manifest = toy_run
    go = (lambda out, *a: sft_cli(out, manifest, *multi(root, *a))) if trainer == "sft" else \
        (lambda out, *a: rl_cli(out, manifest, root / "base",
                                *[x.replace("--steps", "--iters") for x in a]))
    out = tmp_path / "run"
    assert go(out, "--steps", "2") == 0
    before = sorted(os.listdir(out))
    capsys.readouterr()
    assert go(out, "--steps", "1") == 2     # the README command run again: refused, nothing touched
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out} holds a run at step 2: pass --resume to continue, or another "
                   f"--out (or --fresh to start over)"]
    assert sorted(os.listdir(out)) == before
    # --fresh killed before its first checkpoint: the old run waits in previous/, whole
    real = runs.checkpoint_hook
    def killed(stage, step):
        raise KeyboardInterrupt             # an interruption nothing catches
    monkeypatch.setattr(runs, "checkpoint_hook", killed)
    with pytest.raises(KeyboardInterrupt):
        go(out, "--steps", "1", "--fresh")
    assert sorted(os.listdir(out / "previous")) == ["ckpt-0000001", "ckpt-0000002", "latest",
                                                    "log.jsonl"]
    assert runs.incomplete(str(out / "previous" / "ckpt-0000002")) is None
    # ... and goes once the new run has one; the log and the checkpoints are the new run's only
    monkeypatch.setattr(runs, "checkpoint_hook", real)
    assert go(out, "--steps", "1", "--fresh") == 0
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000001", "latest", "log.jsonl"]
    assert len([r for r in read_log(out) if r.get("step", r.get("iter")) == 1]) == 1

def test_a_second_trainer_on_the_same_out_is_refused_naming_the_holder(toy_run, tmp_path, capsys):
    root, manifest = toy_run
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, runs; runs.lock(sys.argv[1]); "
                               "print('held', flush=True); sys.stdin.read()", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert sft_cli(out, manifest, *multi(root, "--steps", "1")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {out} is in use by pid {holder.pid} on {socket.gethostname()}: one "
                       f"trainer writes a run folder at a time (wait for it to "
                       f"end, or give another --out)"]
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.communicate("")
    # the holder is gone: the folder is free
    assert sft_cli(out, manifest, *multi(root, "--steps", "1")) == 0

def test_a_start_that_fails_leaves_no_run_folder(toy_run, tmp_path, capsys):
    root, manifest = toy_run
    base = ["--data", manifest, "--init", str(root / "base"), "--rank", "4"]
    # refused by the pre-flight: nothing made, not even the parent folder
    assert TS.cli(["--data", manifest + "x", "--out", str(tmp_path / "runs" / "a")]) == 2
    # refused inside the run (fewer records than one batch), after the run folder was opened
    assert TS.cli(base + ["--out", str(tmp_path / "runs" / "b"), "--batch-size", "64"]) == 2
    assert "fewer usable records than one batch" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # a folder that was there before stays, and so does a run that wrote a checkpoint
    (tmp_path / "mine").mkdir()
    assert TS.cli(base + ["--out", str(tmp_path / "mine"), "--batch-size", "64"]) == 2
    assert (tmp_path / "mine").is_dir()

def test_a_kill_at_every_stage_of_the_checkpoint_protocol_leaves_a_folder_that_resumes_exactly(
        toy_run, two_step_run, tmp_path, monkeypatch):
    # A kill (SIGKILL) leaves the folder as it is at that instant: the hook copies it there, and
    # each copy must resume to the uninterrupted run's adapter bit for bit. The folder starts as a
    # cp -rL copy leaves it (latest a real folder) with an incomplete ckpt-2 (a copy without its
    # marker), so the stages that handle those run too
    root, manifest = toy_run
    folders, want = two_step_run
    out = tmp_path / "run"
    # symlinks followed: cp -rL
    shutil.copytree(folders / "cut", out, ignore=shutil.ignore_patterns("ckpt-0000002"))
    shutil.copytree(folders / "cut" / "ckpt-0000002", out / "ckpt-0000002",
                    ignore=shutil.ignore_patterns("*.json"))
    assert (out / "latest").is_dir() and not (out / "latest").is_symlink()
    kills = {}
    def copy_now(stage, step):
        if step in (1, 2):                            # opening (resuming step 1), then checkpoint 2
            kills[stage] = tmp_path / f"killed-{len(kills)}-{stage}"
            shutil.copytree(out, kills[stage], symlinks=True)
    monkeypatch.setattr(runs, "checkpoint_hook", copy_now)
    sft(out, manifest, *multi(root, "--steps", "3", "--keep", "1"), "--resume")
    assert list(kills) == ["unlinked-latest", "begin", "adapter.safetensors", "train_state.pt",
                           "args.json", "marker",
                           "aside", "renamed", "latest", "rotated", "previous", "done"]
    assert same_adapter(adapter_of(out / "latest"), want)
    monkeypatch.setattr(runs, "checkpoint_hook", lambda stage, step: None)
    for stage, folder in kills.items():
        sft(folder, manifest, *multi(root, "--steps", "3", "--keep", "1"), "--resume")
        assert same_adapter(adapter_of(folder / "latest"), want), stage
        assert not [n for n in os.listdir(folder) if n.startswith(".") and n != ".lock"], stage
        # steps logged after it: once
        assert [r["step"] for r in read_log(folder)] == [1, 2, 3], stage

@pytest.mark.parametrize("edit", ["latest removed", "latest rolled back to ckpt-1",
                                  "latest a real folder"])
def test_resume_reads_the_folder_not_latest(toy_run, two_step_run, tmp_path, edit):
    root, manifest = toy_run
    folders, want = two_step_run
    out = tmp_path / "run"
    shutil.copytree(folders / "cut", out, symlinks=True)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "di')                            # killed while it logged step 3
    (out / "latest").unlink()
    if edit == "latest rolled back to ckpt-1":
        (out / "latest").symlink_to("ckpt-0000001")
    elif edit == "latest a real folder":
        shutil.copytree(out / "ckpt-0000002", out / "latest")
    sft(out, manifest, *multi(root, "--steps", "3", "--keep", "3"), "--resume")
    assert (same_adapter(adapter_of(out / "latest"), want)
            and os.readlink(out / "latest") == "ckpt-0000003")
    assert [r["diff"] for r in read_log(out)] == [r["diff"] for r in read_log(folders / "full")]

def test_resume_without_a_complete_checkpoint_is_one_line(toy_run, two_step_run, tmp_path, capsys):
    root, manifest = toy_run
    folders, _ = two_step_run
    out = tmp_path / "run"
    shutil.copytree(folders / "cut", out, symlinks=True,
                    ignore=shutil.ignore_patterns("ckpt-0000001"))
    path = out / "ckpt-0000002" / "train_state.pt"
    path.write_bytes(path.read_bytes()[:100])                 # an interrupted copy
    assert sft_cli(out, manifest, *multi(root, "--steps", "3"), "--resume") == 2
    size = (folders / "cut" / "ckpt-0000002" / "train_state.pt").stat().st_size
    assert (capsys.readouterr().err.strip().splitlines()[-1] ==
            f"error: {path}: 100 bytes where its checkpoint recorded {size} (an interrupted "
            f"copy?); {out} holds no complete checkpoint to resume from")

@pytest.mark.parametrize("fault", list(B.STATE_FAULTS) + ["adapter: another architecture"])
def test_resume_from_a_broken_checkpoint_is_one_line(toy_run, one_step_run, tmp_path, capsys,
                                                     fault):
    root, manifest = toy_run
    name, write = (("adapter.safetensors", B.BAD_WEIGHTS["another architecture"])
                   if fault.startswith("adapter") else ("train_state.pt", B.STATE_FAULTS[fault]))
    out, path = B.broken_copy(str(tmp_path / "run"), str(one_step_run),
                              os.path.join("ckpt-0000001", name), write, {}, None,
                              {"double_blocks.0.img_attn.qkv.down.weight": torch.zeros(4, 3)})
    status = TS.cli(["--data", manifest, "--out", out, "--stage", "multi", "--init",
                     str(root / "base"), "--rank",
                     "4", "--batch-size", "2", "--steps", "2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (status == 2 and err[-1].startswith(f"error: {path}: ")
            and not os.path.exists(path + ".ran"))
    # nothing trained or saved
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000001", "latest", "log.jsonl"]

@pytest.mark.parametrize("name", ["adapter.safetensors", "train_state.pt", "args.json"])
def test_a_checkpoint_corrupted_in_place_is_passed_over_for_the_one_before(
        toy_run, two_step_run, tmp_path, capsys, name):
    # a flipped bit keeps the file's size: the marker's sha256 tells it, and --resume takes
    # checkpoint 1 instead
    root, manifest = toy_run
    folders, want = two_step_run
    out = tmp_path / "run"
    shutil.copytree(folders / "cut", out, symlinks=True)
    flip_bit(str(out / "ckpt-0000002" / name))
    capsys.readouterr()
    assert sft_cli(out, manifest, *multi(root, "--steps", "3", "--keep", "3"), "--resume") == 0
    err = capsys.readouterr().err
    assert (f"note: skipping checkpoint 2: {out / 'ckpt-0000002' / name}: its content is not what "
            f"its checkpoint recorded (sha256 differs" in err and "resumed from step 1 " in err)
    assert same_adapter(adapter_of(out / "latest"), want)
    # step 2 ran again, its checkpoint rewritten
    assert runs.verify(str(out / "ckpt-0000002")) is None

def test_absurd_weights_are_never_resumed_nor_saved(toy_run, two_step_run, tmp_path, capsys,
                                                    monkeypatch):
    root, manifest = toy_run
    folders, want = two_step_run
    # checkpoint 2 holds a flipped exponent bit and a marker that agrees (as a run that saved it
    # would write)
    out = tmp_path / "run"
    shutil.copytree(folders / "cut", out, symlinks=True,
                    ignore=shutil.ignore_patterns("ckpt-0000001"))
    ckpt = out / "ckpt-0000002"
    flip_bit(str(ckpt / "adapter.safetensors"))
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    marker["sha256"]["adapter.safetensors"] = (hashlib.sha256(
        (ckpt / "adapter.safetensors").read_bytes()).hexdigest())
    (ckpt / "checkpoint.json").write_text(json.dumps(marker))
    capsys.readouterr()
    assert sft_cli(out, manifest, *multi(root, "--steps", "3", "--keep", "1"), "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (len(err) == 1
            and re.fullmatch(r"error: " rf"{re.escape(str(ckpt / 'adapter.safetensors'))}: \S+ "
                             rf"holds \S+, beyond any trained weight .*; {re.escape(str(out))} "
                             rf"holds no complete checkpoint to resume from", err[0])), err
    # nothing removed
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000002", "latest", "log.jsonl"]
    # a run whose weights become absurd (finite) does not save them, and its last checkpoint stays
    out = tmp_path / "diverged"
    real, calls = torch.optim.AdamW.step, [0]
    def flip_at_step_2(self, *a, **k):
        calls[0] += 1
        real(self, *a, **k)
        if calls[0] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = -1.9e37
    monkeypatch.setattr(torch.optim.AdamW, "step", flip_at_step_2)
    assert sft_cli(out, manifest, *multi(root, "--steps", "3", "--keep", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (re.fullmatch(
        rf"error: step 2: \S+ holds -1\.9e\+37, beyond any trained weight .*: not "
        rf"saved; checkpoint 1 intact \({re.escape(str(out / 'ckpt-0000001'))}\)", err)), err
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000001", "latest", "log.jsonl"]

def test_non_finite_weights_are_never_saved(toy_run, tmp_path, capsys, monkeypatch):
    root, manifest = toy_run
    out = tmp_path / "run"
    real, calls = torch.optim.AdamW.step, [0]
    def diverge_at_step_2(self, *a, **k):         # a finite gradient, a step too large: NaN weights
        calls[0] += 1
        real(self, *a, **k)
        if calls[0] == 2:
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(float("nan"))
    monkeypatch.setattr(torch.optim.AdamW, "step", diverge_at_step_2)
    assert sft_cli(out, manifest, *multi(root, "--steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: step 2: \S+ is not finite \(the run diverged: try a lower "
                        r"--lr\): not saved; checkpoint 1 intact "
                        rf"\({re.escape(str(out / 'ckpt-0000001'))}\)", err), err
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000001", "latest", "log.jsonl"]
    assert all(torch.isfinite(v).all() for v in adapter_of(out / "latest").values())

def test_a_torn_best_adapter_blocks_no_resume_and_dead_writers_temporaries_go(
        toy_run, tmp_path, capsys):
    root, manifest = toy_run
    out = tmp_path / "rl"
    val = ["--val-data", manifest, "--val-n", "1", "--val-seeds", "1"]
    assert rl_cli(out, manifest, root / "base", "--iters", "1", *val) == 0
    best = out / "best.safetensors"
    best.write_bytes(best.read_bytes()[:1000])                          # an interrupted copy
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    dead = int(dead.stdout)                                  # a writer killed mid-write, gone since
    for name in (f"best.safetensors.tmp{dead}", f".tmp-{dead}-x1", f".tmp-{os.getpid()}-live"):
        (out / name).write_bytes(b"half")
    capsys.readouterr()
    assert rl_cli(out, manifest, root / "base", "--iters", "2", *val, "--resume") == 0
    assert f"note: {best} is not a best adapter we wrote (" in capsys.readouterr().err
    assert WT.read_header(str(best), metadata=True)[1]["iter"] == "2"
    # a live one's stays
    assert sorted(n for n in os.listdir(out) if "tmp" in n) == [f".tmp-{os.getpid()}-live"]

@pytest.mark.parametrize("errno_, said", [(errno.ENOSPC, "disk full"),
                                          (errno.EIO, "Input/output error (")])
def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_last_checkpoint(
        toy_run, tmp_path, capsys, monkeypatch, errno_, said):
    root, manifest = toy_run
    out = tmp_path / "run"
    calls = []
    def fill_the_disk(f, data):              # the 2nd checkpoint's optimizer state: half, then full
        calls.append(f)
        if len({id(c) for c in calls}) >= 5:
            f.write(bytes(data)[:len(data) // 2])
            raise OSError(errno_, os.strerror(errno_), f.name if hasattr(f, "name") else None)
        f.write(data)
    monkeypatch.setattr(runs, "write_bytes", fill_the_disk)
    assert sft_cli(out, manifest, *multi(root, "--steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out}: {said}") and \
        err.endswith(f"writing checkpoint 2; checkpoint 1 intact ({out / 'ckpt-0000001'})"), err
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000001", "latest", "log.jsonl"]
    assert runs.incomplete(str(out / "ckpt-0000001")) is None

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_step_boundary_and_says_how_to_resume(
        toy_run, two_step_run, tmp_path, capsys, monkeypatch, signum):
    root, manifest = toy_run
    folders, want = two_step_run
    out = tmp_path / "run"
    real, calls = LS.flow_matching_loss, [0]
    def signal_in_step_2(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(LS, "flow_matching_loss", signal_in_step_2)
    argv = ["--data", manifest, "--out", str(out), "--batch-size", "2", "--log-every", "1",
            "--warmup", "1",
            "--rank", "4", *multi(root, "--steps", "3", "--keep", "3", "--ckpt-every", "100")]
    caught = []                               # what this process does with the signal outside a run
    before = signal.signal(signum, lambda s, f: caught.append(s))
    try:
        status = TS.cli(argv)
    finally:
        outside = signal.signal(signum, before)
    assert status == 128 + signum and not caught and outside is not before      # the run handled it
    err = capsys.readouterr().err
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    command = f"python train_sft.py {' '.join(argv)} --resume"
    assert err.strip().splitlines()[-1] == f"stopped by {name} at step 2: checkpoint 2 intact " \
                                           f"({out / 'ckpt-0000002'}); continue with: {command}"
    assert outside.__qualname__.endswith("<lambda>")         # ... and put the handler it found back
    monkeypatch.setattr(LS, "flow_matching_loss", real)
    assert TS.cli(command.split()[2:]) == 0   # the printed command, as given
    assert same_adapter(adapter_of(out / "latest"), want)

def test_resume_compares_the_saved_arguments(toy_run, two_step_run, tmp_path, capsys):
    root, manifest = toy_run
    folders, _ = two_step_run
    other = toy.write_world(str(tmp_path / "other"), 4, seed=1)
    out = tmp_path / "run"
    shutil.copytree(folders / "cut", out, symlinks=True)
    before = sorted(os.listdir(out))
    common = lambda *a: ["--out", str(out), "--log-every", "1", "--warmup", "1", "--rank", "4",
                         *multi(root, "--steps", "3", "--keep", "3"), "--resume", *a]
    for argv, names in [(["--data", other, "--batch-size", "4"],
                         [f"--data {manifest} -> {other}", "--batch-size 2 -> 4"]),
                        (["--data", manifest, "--batch-size", "2", "--rank", "8", "--seed", "1"],
                         ["--seed 0 -> 1", "--rank 4 -> 8"]),
                        (["--data", manifest, "--batch-size", "2", "--grad-accum", "2"],
                         ["the global batch (1 rank(s) x --grad-accum 1 -> 1 "
                          "x 2: pass --grad-accum 1)"])]:
        capsys.readouterr()
        assert TS.cli(common() + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (len(err) == 1 and err[0].startswith(f"error: {out / 'ckpt-0000002'}: resuming "
                                                    f"needs the settings it was saved with: ")
                and all(n in err[0] for n in names)), err
        assert sorted(os.listdir(out)) == before
    # a deliberate change (the lr, the length) is taken, with a note naming it
    assert TS.cli(["--data", manifest, "--batch-size",
                   "2"] + common("--lr", "2e-2", "--steps", "4")) == 0
    err = capsys.readouterr().err
    note = next(l for l in err.splitlines() if l.startswith("note: resuming"))
    # lr-end follows lr
    assert note.startswith(f"note: resuming {out / 'ckpt-0000002'} with ") and \
        sorted(note.split(" with ")[1].split(", ")) == \
        ["--lr 0.01 -> 0.02", f"--lr-end {0.01 / 3} -> {0.02 / 3}", "--steps 2 -> 4"], note
    assert read_log(out)[-1]["step"] == 4

# ---- training.py: what both trainers share: attention stats, IPPO policy, bad steps, flags ----

@pytest.fixture(scope="module")
def rl_setup():
    """A toy Flux with random adapters (not a no-op), its encoders and one group's conditioning."""
    torch.manual_seed(0)
    cfg = M.get_config("toy")
    flux = M.Flux(cfg)
    ML.inject(flux, rank=4)
    for _, m in ML.adapters(flux):
        torch.nn.init.normal_(m.up.weight, std=0.1)
    ae, text = EN.AutoEncoder(cfg.ae), EN.ByteTextEncoder(cfg)
    refs = [toy_reference(3), toy_reference(77)]
    c = SM.sampling_inputs(cfg, ae, text, "two sprites", refs, 32, 32, seed=3)
    return flux, c, get_schedule(6, 64)

SFT_BAD = [("--ckpt-every", "0"), ("--log-every", "0"), ("--grad-accum", "0"),
           ("--batch-size", "0"), ("--rank", "0"), ("--top-k", "5"), ("--keep", "0"),
           ("--eval-every", "0"), ("--steps", "-1"), ("--size", "0"), ("--experts", "-1"),
           ("--lr", "nan"), ("--lr", "inf"), ("--lr", "1e39"), ("--lr", "-1"), ("--lr", "0"),
           ("--lr", "2"), ("--lr-end", "nan"), ("--clip", "0"), ("--lambda-attn", "inf"),
           ("--dist-timeout", "0"), ("--alpha", "nan"), ("--warmup", "-1"),
           ("--max-bad-steps", "0"), ("--attn-blocks", "-1"),
           ("--seed", "-1"), ("--seed", str(2 ** 64))]

RL_BAD = [("--group", "1"), ("--window", "0"), ("--steps", "0"), ("--tau", "0"), ("--prompts", "0"),
          ("--minibatches", "0"), ("--micro-batch", "0"), ("--iters", "-1"), ("--top-k", "5"),
          ("--lr", "0"), ("--lr", "nan"), ("--eta", "inf"), ("--kl", "-1"), ("--val-n", "0"),
          ("--ckpt-every", "0")]

def test_attention_selectivity_tells_separation_from_foreground_and_swaps():
    # 2 records x 2 subjects on 8 tokens: subject 0 on tokens 0-1, subject 1 on tokens 4-6
    # (areas 2 and 3)
    masks = torch.zeros(2, 2, 8)
    masks[:, 0, :2], masks[:, 1, 4:7] = 1.0, 1.0
    valid = torch.ones(2, 2, dtype=torch.bool)
    own = masks / masks.sum(-1, keepdim=True)                # each map uniform on its own subject
    # every map on the foreground, per token alike
    fg = (masks.sum(1, keepdim=True) / 5).expand(-1, 2, -1)
    swapped = own.flip(1)
    stats = lambda m, d="ref2img": TR.attention_stats(m, masks, valid, d)
    assert torch.all(stats(own)["selectivity"] > 1e6)        # perfect: no mass on the other subject
    torch.testing.assert_close(stats(fg)["selectivity"], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(stats(fg)["own"],
                               torch.tensor([0.4, 0.6, 0.4, 0.6], dtype=torch.float64))
    assert torch.all(stats(swapped)["selectivity"] < 1e-6)
    torch.testing.assert_close(stats(torch.full((2, 2, 8), 1 / 8))["selectivity"],
                               torch.ones(4, dtype=torch.float64))
    # hand values: map 0 puts 0.3 on its own 2 tokens, 0.6 on the other 3: (0.3 / 2) / (0.6 / 3) =
    # 0.75
    m = own.clone()
    m[0, 0] = torch.tensor([0.15, 0.15, 0.1, 0.0, 0.2, 0.2, 0.2, 0.0])
    assert stats(m)["selectivity"][0].item() == pytest.approx(0.75)
    # img2ref: token j's mass on each reference. Subject 0's tokens put 0.3 on reference 0 and 0.1
    # on reference 1: mass on references 0.4, wrong share 0.25; subject 1's read only their own:
    # wrong 0
    img = torch.zeros(2, 2, 8)
    img[:, 0, :2], img[:, 1, :2], img[:, 1, 4:7] = 0.3, 0.1, 0.5
    s = stats(img, "img2ref")
    torch.testing.assert_close(s["ref_mass"], torch.tensor([0.4, 0.5, 0.4, 0.5],
                                                           dtype=torch.float64))
    torch.testing.assert_close(s["wrong"], torch.tensor([0.25, 0.0, 0.25, 0.0],
                                                        dtype=torch.float64))
    torch.testing.assert_close(s["chance"], torch.full((4,), 0.5, dtype=torch.float64))
    # a record whose second subject is padding has no other subject: only its own share counts
    one = valid.clone()
    one[1, 1] = False
    s = TR.attention_stats(own, masks, one, "ref2img")
    assert len(s["own"]) == 3 and len(s["selectivity"]) == 2
    # pooled: selectivity's mean is geometric (x4 and /4 average to 1)
    for key in ("selectivity", "ref2img_d1_selectivity"):                # the per-block ones too
        assert TR.summarize_stats({key: [torch.tensor([4.0, 0.25])]})[key] == pytest.approx(1)
    assert (TR.summarize_stats({"ref2img_d1_own": [torch.tensor([4.0, 0.25])]})["ref2img_d1_own"]
            == 2.125)

@pytest.mark.parametrize("l", [0, 2, 4])
def test_rollout_shares_the_prefix_records_old_logprobs_and_replays_exactly(rl_setup, l):
    flux, c, ts = rl_setup
    G, window, rows = 4, range(l, l + 2), []
    hook = flux.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    x0, tr, n = TR.rollout(flux, c, G, ts, window, 0.7, 3.5, torch.Generator().manual_seed(1))
    hook.remove()
    # one DiT call per step; batch 1 before the window (the group's shared prefix), G from its start
    assert rows == [1] * l + [G] * (6 - l) and n == sum(rows) <= G * 6
    assert (tr["x"].shape == tr["x_next"].shape == (G, 2, *c["img"].shape[1:])
            and tr["old_logp"].shape == (G, 2))
    assert (tr["x"][:, 0] == tr["x"][0, 0]).all()      # identical until the window's first SDE step
    assert not torch.equal(x0[0], x0[1])                          # diverged after it
    # the recorded log-probs are Gaussian log-densities of the recorded samples
    # (torch.distributions)
    steps = [(ts[i], ts[i + 1]) for i in window]
    for j, (t, t_next) in enumerate(steps):
        v = TR.velocity(flux, tr["x"][:, j], c, t, 3.5)
        _, _, mean, std = sde_step(tr["x"][:, j], v, t, t_next, 0.7, prev=tr["x_next"][:, j])
        ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(
            tr["x_next"][:, j].double())
        torch.testing.assert_close(tr["old_logp"][:, j].double(), ref.flatten(1).mean(1), atol=1e-4,
                                   rtol=1e-5)
    # replaying the window with the same weights gives pi_old's log-probs bit for bit: the ratio is
    # exactly 1
    rows.clear()
    hook = flux.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    logp, _, _ = TR.WindowPolicy(flux)(c, tr["x"], tr["x_next"], steps, 0.7, 3.5)
    hook.remove()
    # G w DiT rows for the update, nothing more
    assert torch.equal(logp, tr["old_logp"]) and rows == [G, G]

def test_guided_policy_is_the_sampler_users_run(rl_setup):
    # IPPO with guidance: each velocity is sampling.guide's combination of three velocities
    # (by hand below), and the rollout's deterministic prefix is exactly what denoise samples with
    # the same guidance
    flux, c0, ts = rl_setup
    cfg, ae, text = flux.cfg, EN.AutoEncoder(flux.cfg.ae), EN.ByteTextEncoder(flux.cfg)
    refs = [toy_reference(3), toy_reference(77)]
    c = dict(SM.sampling_inputs(cfg, ae, text, "two sprites", refs, 32, 32, seed=3, null_text=True),
             scales=(3.0, 2.0))
    x, g, t = c["img"], torch.full((1,), 3.5), torch.full((1,), 0.6)
    base = (x, c["img_ids"])
    v_c = flux(*base, c["txt"], c["txt_ids"], t, c["y"], g, c["ref_img"], c["ref_img_ids"])
    v_n = flux(*base, c["txt"], c["txt_ids"], t, c["y"], g)
    v_t = flux(*base, c["txt_null"], c["txt_ids"], t, c["y_null"], g, c["ref_img"],
               c["ref_img_ids"])
    torch.testing.assert_close(TR.velocity(flux, x, c, 0.6, 3.5),
                               v_c + 2 * (v_c - v_n) + (v_c - v_t))
    rows = []
    hook = flux.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    _, tr, n = TR.rollout(flux, c, 2, ts, range(5, 6), 0.7, 3.5, torch.Generator().manual_seed(1))
    hook.remove()
    # per step two forwards (the prompt's and the empty prompt's rows batched, then no references),
    # three rows a sample
    assert len(rows) == 2 * 6 and n == sum(rows) == 3 * (5 + 2) == 3 * 7
    want = denoise(flux, **{k: v for k, v in c.items() if k != "scales"}, timesteps=ts[:6],
                   guidance=3.5, progress=False, ref_guidance=3.0, text_guidance=2.0)
    torch.testing.assert_close(tr["x"][:, 0], want.expand(2, -1, -1), rtol=1e-5, atol=1e-6)
    assert TR.forwards_per_velocity(c) == 3 and TR.forwards_per_velocity(c0) == 1

def test_policy_gradient_through_the_model_equals_the_reinforce_form(rl_setup):
    # with theta = theta_old, grad GSPO = -(1/G) sum_i A_i (1/w) sum_t grad log N(x_t+1;
    # mu_theta(x_t), std^2), the log-density written independently with torch.distributions
    flux, c, ts = rl_setup
    G, window = 4, range(2, 4)
    steps = [(ts[i], ts[i + 1]) for i in window]
    _, tr, _ = TR.rollout(flux, c, G, ts, window, 0.7, 3.5, torch.Generator().manual_seed(2))
    adv = torch.tensor([1.0, -0.5, 2.0, -2.5])
    params = [p for p in flux.parameters() if p.requires_grad]
    logp, _, _ = TR.WindowPolicy(flux)(c, tr["x"], tr["x_next"], steps, 0.7, 3.5)
    ours = torch.autograd.grad(LS.gspo_loss(logp, tr["old_logp"], adv)[0], params)
    lp = []
    for j, (t, t_next) in enumerate(steps):
        v = TR.velocity(flux, tr["x"][:, j], c, t, 3.5)
        _, _, mean, std = sde_step(tr["x"][:, j], v, t, t_next, 0.7, prev=tr["x_next"][:, j])
        lp.append(
            torch.distributions.Normal(mean, std).log_prob(tr["x_next"][:, j]).flatten(1).mean(1))
    ref = torch.autograd.grad(-(adv * torch.stack(lp, 1).mean(1)).mean(), params)
    assert sum(g.abs().sum() for g in ref) > 0
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-4)

def test_kl_to_the_base_model_matches_torch_distributions(rl_setup):
    flux, c, ts = rl_setup
    window = range(1, 3)
    steps = [(ts[i], ts[i + 1]) for i in window]
    _, tr, _ = TR.rollout(flux, c, 3, ts, window, 0.7, 3.5, torch.Generator().manual_seed(4))
    _, mean, std = TR.WindowPolicy(flux)(c, tr["x"], tr["x_next"], steps, 0.7, 3.5)
    kl = TR.kl_to_base(flux, c, tr["x"], tr["x_next"], mean, std, steps, 0.7, 3.5)
    ref = []
    for j, (t, t_next) in enumerate(steps):
        with ML.disabled(flux):
            v0 = TR.velocity(flux, tr["x"][:, j], c, t, 3.5)
        base = sde_step(tr["x"][:, j], v0, t, t_next, 0.7, prev=tr["x_next"][:, j])[2]
        d = torch.distributions.kl_divergence(torch.distributions.Normal(mean[:, j], std[j]),
                                              torch.distributions.Normal(base, std[j]))
        ref.append(d.flatten(1).mean(1))
    torch.testing.assert_close(kl, torch.stack(ref, 1).mean(1))
    assert (kl > 0).all()
    f = M.Flux(M.get_config("toy"))
    ML.inject(f, rank=4)                                        # fresh adapters are the base: KL 0
    _, mean0, std0 = TR.WindowPolicy(f)(c, tr["x"], tr["x_next"], steps, 0.7, 3.5)
    assert torch.equal(TR.kl_to_base(f, c, tr["x"], tr["x_next"], mean0, std0, steps, 0.7, 3.5),
                       torch.zeros(3))

def test_non_finite_steps_are_skipped_counted_and_stop_a_diverged_run(
        toy_run, tmp_path, monkeypatch):
    root, manifest = toy_run
    common = ["--stage", "multi", "--init", str(root / "base"), "--lambda-attn", "0",
              "--ckpt-every", "1"]
    real_fm, real_gspo, n = LS.flow_matching_loss, LS.gspo_loss, [0]
    def fm_nan_on_call_2(*a, **k):
        n[0] += 1
        return real_fm(*a, **k) * (float("nan") if n[0] == 2 else 1.0)
    monkeypatch.setattr(LS, "flow_matching_loss", fm_nan_on_call_2)
    sft(tmp_path / "sft", manifest, *common, "--steps", "3")
    assert [r["skipped"] for r in read_log(tmp_path / "sft")] == [0, 1, 1]
    # every step non-finite from here: the run stops after --max-bad-steps in a row; the checkpoint
    # is intact
    before = load_file(str(tmp_path / "sft" / "latest" / "adapter.safetensors"))
    monkeypatch.setattr(LS, "flow_matching_loss", lambda *a, **k: real_fm(*a, **k) * float("inf"))
    with pytest.raises(TR.TrainingError, match="3 non-finite gradients in a row"):
        sft(tmp_path / "sft", manifest, *common, "--steps", "20", "--max-bad-steps", "3",
            "--resume")
    after = load_file(str(tmp_path / "sft" / "latest" / "adapter.safetensors"))
    assert all(torch.equal(before[k], after[k]) and torch.isfinite(after[k]).all() for k in before)
    # the RL trainer: one poisoned minibatch is skipped and counted
    monkeypatch.setattr(LS, "flow_matching_loss", real_fm)
    calls = [0]
    def gspo_nan_on_call_3(*a, **k):
        calls[0] += 1
        loss, s, cut = real_gspo(*a, **k)
        return loss * (float("nan") if calls[0] == 3 else 1.0), s, cut
    monkeypatch.setattr(LS, "gspo_loss", gspo_nan_on_call_3)
    rl(tmp_path / "rl", manifest, root / "base", "--iters", "2", "--minibatches", "2",
       "--micro-batch", "2")
    assert [r["skipped"] for r in read_log(tmp_path / "rl")] == [0, 1]

@pytest.mark.parametrize("trainer", ["sft", "rl"])
def test_a_base_holding_a_nan_is_refused_and_a_run_that_trained_nothing_fails(
        toy_run, tmp_path, capsys, monkeypatch, trainer):
    root, manifest = toy_run
    go = (lambda out, base: sft_cli(out, manifest, *multi(root, "--steps", "2"), "--init",
                                    str(base))) \
        if trainer == "sft" else (lambda out, base: rl_cli(out, manifest, base, "--iters", "2"))
    base = tmp_path / "nan-base"
    shutil.copytree(root / "base", base)
    sd = load_file(str(base / "flux.safetensors"))
    sd["final_layer.linear.weight"][0, 0] = float("nan")
    save_file(sd, str(base / "flux.safetensors"))
    capsys.readouterr()
    assert go(tmp_path / "a", base) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {base}: weight "
                                                            f"final_layer.linear.weight is "
                                                            f"not finite: this base cannot "
                                                            f"be trained on"]
    assert not (tmp_path / "a").exists()         # refused before its first step: no run folder left
    # every update skipped (non-finite gradients, fewer than --max-bad-steps): not a success
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda *a, **k: torch.tensor(float("nan")))
    assert go(tmp_path / "b", root / "base") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: all \d updates of this run were skipped \(non-finite gradients\): "
                        r"nothing was trained; checkpoint 2 intact \(.*\) holds the "
                        r"weights it started from .*", err), err

@pytest.mark.parametrize("script, bad", [("sft", b) for b in SFT_BAD] + [("rl", b) for b in RL_BAD])
def test_trainer_flags_out_of_range_are_one_line_errors_before_any_work(
        toy_run, tmp_path, capsys, script, bad):
    root, manifest = toy_run
    out = tmp_path / "run"
    main_ = TS.main if script == "sft" else RL.main
    # if it ran: briefly
    short = ["--steps", "1", "--batch-size", "2"] if script == "sft" else \
        ["--iters", "1", "--steps", "2", "--window", "1", "--group", "2", "--minibatches", "1"]
    with pytest.raises(SystemExit) as e:
        main_(["--data", manifest, "--init", str(root / "base"), "--out", str(out), "--rank", "4",
               *short, *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert (e.value.code == 2 and len(err) == 1
            and f"argument {bad[0]}: " in err[0] and not out.exists()), err

def test_wandb_gets_every_logged_record_and_its_absence_is_one_line(
        toy_run, tmp_path, monkeypatch, capsys):
    # --wandb through a stand-in module: each log.jsonl record reaches wandb.log at its step, the
    # run is finished; without the package the run stops before any work, in one line
    root, manifest = toy_run
    calls = []
    class FakeRun:
        def log(self, values, step):
            calls.append((step, values))
        def finish(self):
            calls.append("finish")
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw["project"]))
                                 or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sft(tmp_path / "w", manifest, "--stage", "multi", "--init", str(root / "base"), "--steps", "2",
        "--wandb", "proj")
    logged = [r for r in read_log(tmp_path / "w")]
    assert calls[0] == ("init", "proj") and calls[-1] == "finish"
    assert [(s, v["diff"]) for s, v in calls[1:-1]] == [(r["step"], r["diff"]) for r in logged]
    monkeypatch.setitem(sys.modules, "wandb", None)          # `import wandb` now raises ImportError
    assert TS.cli(["--data", manifest, "--stage", "multi", "--init", str(root / "base"), "--out",
                   str(tmp_path / "x"), "--wandb", "proj"]) == 2
    assert "pip install wandb" in capsys.readouterr().err and not (tmp_path / "x").exists()

def test_under_torchrun_an_error_is_printed_once_and_left_in_the_error_file(
        tmp_path, monkeypatch, capsys):
    def bad(argv):
        raise D.InputError("--data x: no such file")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error{rank}.json"))
        assert TR.cli(bad) == 2
        assert capsys.readouterr().err == ("error: --data x: no such file\n" if rank == "0" else "")
        said = json.loads((tmp_path / f"error{rank}.json").read_text())["message"]
        assert said["message"] == "error: --data x: no such file"    # what torchrun's summary shows

# ---- train_sft.py: stages, exact resume, caches, dropout, torchrun and FSDP ----

def torchrun(out, *args):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "train_sft.py", "--out", str(out), *args],
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

def test_base_stage_writes_a_toy_checkpoint_sample_reads(toy_run, tmp_path):
    root, manifest = toy_run
    sft(tmp_path / "base", manifest, "--stage", "base", "--steps", "2", "--ckpt-every", "1")
    log = read_log(tmp_path / "base")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["diff"]) for r in log)
    assert sorted(os.listdir(tmp_path / "base")) == [".lock", "ckpt-0000001", "ckpt-0000002",
                                                     "latest", "log.jsonl"]
    main(["--model", str(tmp_path / "base" / "latest"), "--arch", "toy", "--refs",
          "assets/orange_circle.png", "--prompt", "a red disc", "--steps", "2", "--seed", "0",
          "--out", str(tmp_path / "s.png")])
    assert (json.loads((tmp_path / "s.json").read_text())["weights"]
            == str(tmp_path / "base" / "latest"))

def test_base_stage_resume_keeps_training_the_whole_model(toy_run, tmp_path):
    # a resumed base stage must update the weights it loaded: 2 steps + resume 2 == 4 uninterrupted,
    # bit for bit (loading by assignment gave the model new parameters the optimizer never saw:
    # every resumed step a no-op)
    root, manifest = toy_run
    common = ["--stage", "base", "--ckpt-every", "2", "--warmup", "1"]
    sft(tmp_path / "full", manifest, *common, "--steps", "4")
    sft(tmp_path / "cut", manifest, *common, "--steps", "2")
    sft(tmp_path / "cut", manifest, *common, "--steps", "4", "--resume")
    for f in ("flux.safetensors", "text_encoder.safetensors"):
        full, cut = (load_file(str(tmp_path / r / "latest" / f)) for r in ("full", "cut"))
        two = (load_file(str(tmp_path / "cut" / "ckpt-0000002" / f))
               if (tmp_path / "cut" / "ckpt-0000002").is_dir() else None)
        assert all(torch.equal(full[k], cut[k]) for k in full), f
        # the resumed steps did train
        assert two is None or any(not torch.equal(two[k], cut[k]) for k in cut), f
    assert [r["grad_norm"] > 0 for r in read_log(tmp_path / "cut")] == [True] * len(read_log(
        tmp_path / "cut"))

def test_base_stage_can_read_references(tmp_path):
    manifest = toy.write_world(str(tmp_path / "w"), 4, seed=0, subjects=(1,))
    args = TS.build_parser().parse_args(["--out", str(tmp_path / "r"), "--stage", "base",
                                         "--base-refs"])
    args.pe = "d"
    flux, ae, text, _, _ = TR.build_models("toy", "base", "cpu", seed=0)
    ds = DS.ManifestDataset(manifest, size=32, ref_size=16, token_px=4)
    batch = DS.collate([ds[i] for i in range(4)])
    seen = []
    flux.register_forward_pre_hook(lambda m, a, kw: seen.append(len(kw.get("ref_img") or [])),
                                   with_kwargs=True)
    for base_refs in (False, True):
        args.base_refs = base_refs
        TS.step_losses(args, TR.Denoiser(flux, text), TR.Denoiser(flux, text), ae, batch, 0,
                       torch.Generator().manual_seed(0), "cpu")
    assert seen == [0, 1]

def test_condition_dropout_drops_prompts_per_sample_and_references_per_step(tmp_path, capsys):
    # --drop-prompt p: each sample's prompt is "" with probability p; --drop-refs p: a step has no
    # references with probability p; with both 0 the batch's generator stream (t, noise) is
    # untouched
    manifest = toy.write_world(str(tmp_path / "w"), 8, seed=0, subjects=(1,))
    args = TS.build_parser().parse_args(["--out", str(tmp_path / "r"), "--stage", "base",
                                         "--base-refs"])
    args.pe = "d"
    flux, ae, text, _, _ = TR.build_models("toy", "base", "cpu", seed=0)
    batch = DS.collate([DS.ManifestDataset(manifest, size=32, ref_size=16, token_px=4)[i]
                        for i in range(8)])
    refs, prompts, ts = [], [], []
    flux.register_forward_pre_hook(lambda m, a, kw: refs.append(bool(kw.get("ref_img")))
                                   or ts.append(kw["timesteps"]), with_kwargs=True)
    text.register_forward_pre_hook(lambda m, a: prompts.extend(a[0]))
    def steps(n, drop_prompt, drop_refs):
        refs.clear(), prompts.clear(), ts.clear()
        args.drop_prompt, args.drop_refs = drop_prompt, drop_refs
        with torch.no_grad():
            for s in range(n):
                TS.step_losses(args, TR.Denoiser(flux, text), TR.Denoiser(flux, text), ae, batch, s,
                               torch.Generator().manual_seed(s), "cpu")
        return list(refs), list(prompts), list(ts)
    r0, p0, t0 = steps(24, 0.0, 0.0)
    assert all(r0) and p0 == batch["prompts"] * 24
    r1, p1, t1 = steps(24, 0.5, 0.5)
    # 24 steps, 192 prompts at p = 0.5: outside these bounds with probability < 1e-3
    assert 4 <= r1.count(False) <= 20 and 70 <= p1.count("") <= 122
    assert all(q in ("", p) for q, p in zip(p1, batch["prompts"] * 24))
    # without dropout t is the generator's first draw, as before the option existed
    first = [LS.sample_timesteps(8, 64, True, generator=torch.Generator().manual_seed(s))
             for s in range(24)]
    assert all(torch.equal(a, b) for a, b in zip(t0, first)) and not torch.equal(t1[0], t0[0])
    assert (TS.cli(["--cache", str(tmp_path), "--out", str(tmp_path / "x"), "--drop-prompt", "0.1"])
            == 2)
    assert "--drop-prompt: a cache holds" in capsys.readouterr().err
    # stage multi's attention losses need every step's references
    assert TS.cli(["--data", manifest, "--out", str(tmp_path / "y"), "--stage", "multi",
                   "--drop-refs", "0.1"]) == 2
    assert "--drop-refs: not with --stage multi" in capsys.readouterr().err

def test_multi_stage_logs_every_loss_term_and_saves_an_adapter(toy_run, tmp_path):
    root, manifest = toy_run
    sft(tmp_path / "m", manifest, "--stage", "multi", "--init", str(root / "base"), "--steps", "2",
        "--scal", "0.1", "--mdl", "1", "--balance", "1e-3", "--val-data", manifest, "--eval-every",
        "2")
    log = read_log(tmp_path / "m")
    train = [r for r in log if "diff" in r]
    assert all(math.isfinite(r[k]) for r in train for k in ("diff", "dice", "scal", "mdl",
                                                            "balance"))
    assert abs(sum(train[-1]["expert_load"]) - 1) < 1e-6 and len(train[-1]["expert_load"]) == 4
    val = [r for r in log if "val_dice" in r][0]
    assert 0 <= val["val_share_own"] <= 1 and 0 <= val["val_dice"] <= 3
    f = M.Flux(M.get_config("toy"))
    acfg = ML.load_adapter(f, str(tmp_path / "m" / "latest" / "adapter.safetensors"))
    assert acfg["rank"] == 4 and acfg["n_experts"] == 4

def test_resume_is_exact(toy_run, tmp_path):
    root, manifest = toy_run
    common = ["--stage", "multi", "--init", str(root / "base"), "--steps", "4", "--scal", "0.1",
              "--ckpt-every", "2"]
    sft(tmp_path / "full", manifest, *common)
    sft(tmp_path / "cut", manifest, *common[:-4], "--steps", "2", "--scal", "0.1", "--ckpt-every",
        "2")
    sft(tmp_path / "cut", manifest, *common, "--resume")
    a = load_file(str(tmp_path / "full" / "latest" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "latest" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)         # bitwise on CPU
    assert [r["diff"] for r in read_log(tmp_path / "full")] == [r["diff"] for r in read_log(
        tmp_path / "cut")]

def test_training_from_a_cache_equals_training_from_the_manifest(toy_run, tmp_path):
    # cache.py precomputes text embeddings and latents; training on them must see the same numbers
    root, manifest = toy_run
    cache.write_cache(manifest, str(tmp_path / "cache"), model="toy", checkpoint=str(root / "base"),
                      device="cpu")
    common = ["--stage", "multi", "--init", str(root / "base"), "--steps", "2", "--scal", "0.1",
              "--lr", "1e-2"]
    sft(tmp_path / "pix", manifest, *common)
    TS.main(["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lat"), "--batch-size",
             "2", "--log-every", "1", "--warmup", "1", "--rank", "4", *common])
    for a, b in zip(read_log(tmp_path / "pix"), read_log(tmp_path / "lat")):
        assert abs(a["diff"] - b["diff"]) < 1e-5 and abs(a["dice"] - b["dice"]) < 1e-5
    with pytest.raises(ValueError, match="cannot read precomputed"):
        TS.main(["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "x"), "--stage",
                 "base"])

def test_a_cache_of_prompts_padded_to_the_longest_batches_and_trains_as_the_manifest(
        toy_run, tmp_path):
    # a toy base whose encoder pads to the batch's longest prompt: each cached prompt is stored
    # whole, and a batch takes its longest prompt's positions, pads included, as --data's encoder
    # does
    root, manifest = toy_run
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(root / "base" / "flux.safetensors", base)
    save_file(load_file(str(root / "base" / "text_encoder.safetensors")),
              str(base / "text_encoder.safetensors"), metadata={"txt_pad": "longest"})
    cache.write_cache(manifest, str(tmp_path / "cache"), model="toy", checkpoint=str(base),
                      device="cpu")
    common = ["--stage", "multi", "--init", str(base), "--steps", "2", "--lr", "1e-2"]
    sft(tmp_path / "pix", manifest, *common)
    TS.main(["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lat"), "--batch-size",
             "2", "--log-every", "1", "--warmup", "1", "--rank", "4", *common])
    for a, b in zip(read_log(tmp_path / "pix"), read_log(tmp_path / "lat"), strict=True):
        assert abs(a["diff"] - b["diff"]) < 1e-5 and abs(a["dice"] - b["dice"]) < 1e-5

def test_a_finished_run_says_what_it_made_and_the_command_samples_it(toy_run, tmp_path, capsys):
    root, manifest = toy_run
    out = tmp_path / "multi"
    assert TS.cli(["--data", manifest, "--init", str(root / "base"), "--out", str(out), "--steps",
                   "2", "--batch-size", "2", "--rank", "4", "--warmup", "1"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    adapter = out / "ckpt-0000002" / "adapter.safetensors"
    assert (last.startswith(
        f"done, step 2: the adapter at {adapter}; sample it with: python sample.py ")), last
    argv = shlex.split(last.split("sample it with: ")[1])[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "s.png")           # as printed, written here
    S.main(argv + ["--steps", "2"])
    assert json.loads((tmp_path / "s.json").read_text())["lora"] == str(adapter)

def test_torchrun_ranks_equal_one_process_and_resume_across_ranks_and_fsdp(
        toy_run, tmp_path, capsys, monkeypatch):
    # one process accumulating 2 micro-batches is the reference; 2 ranks equal it: DDP, --zero, and
    # --fsdp with --grad-checkpoint (and its evaluation on every rank). Resumed from another run's
    # step-2 checkpoint (its step-4 one removed): --zero from --zero bit for bit (its sharded
    # optimizer states consolidated on save, re-sharded on resume); one process from the FSDP run's
    # and FSDP on 2 ranks from the one process's, as the reference does: FSDP saves whole tensors,
    # the format one process saves
    root, manifest = toy_run
    common = ["train_sft.py", "--data", manifest, "--stage", "multi", "--init", str(root / "base"),
              "--rank", "4", "--batch-size", "2", "--log-every", "1", "--warmup", "1",
              "--lambda-attn", "0.3", "--lr", "1e-2", "--ckpt-every", "2", "--steps", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    def run(out, *a, ranks=2):
        launch = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                  if ranks == 2 else [])
        r = subprocess.run([sys.executable, *launch, *common, "--out", str(tmp_path / out), *a],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    def cut(src, dst):                       # a copy of a run as its step-2 checkpoint left it
        shutil.copytree(tmp_path / src, tmp_path / dst, symlinks=True)
        shutil.rmtree(tmp_path / dst / "ckpt-0000004")
    run("one", "--grad-accum", "2", ranks=1)
    run("two")
    run("zero", "--zero")
    run("fsdp", "--fsdp", "--grad-checkpoint", "--val-data", manifest, "--eval-every", "4")
    for src, dst, flags, ranks in (("zero", "zero_cut", ["--zero"], 2),
                                   ("fsdp", "from_fsdp", ["--grad-accum", "2"], 1),
                                   ("one", "to_fsdp", ["--fsdp"], 2)):
        cut(src, dst)
        run(dst, *flags, "--resume", ranks=ranks)
    adapter = lambda run: load_file(str(tmp_path / run / "latest" / "adapter.safetensors"))
    want = adapter("one")
    for other in ("two", "zero", "fsdp", "from_fsdp", "to_fsdp"):
        log, got = [r for r in read_log(tmp_path / other) if "diff" in r], adapter(other)
        assert len(log) == 4, other
        for r1, r2 in zip(read_log(tmp_path / "one"), log):
            assert (abs(r1["diff"] - r2["diff"]) < 1e-5
                    and abs(r1["dice"] - r2["dice"]) < 1e-5), other
        assert got.keys() == want.keys(), other
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    full, resumed = adapter("zero"), adapter("zero_cut")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    # the FSDP run's optimizer states are whole too: AdamW's moments as one process holds them
    state = lambda run: torch.load(tmp_path / run / "latest" / "train_state.pt",
                                   weights_only=True)["optimizer"]
    one, fsdp = state("one"), state("fsdp")
    assert one["state"].keys() == fsdp["state"].keys()
    for i, s in one["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fsdp["state"][i][k], s[k], atol=1e-6, rtol=1e-3)
    # evaluated on every rank, logged once
    assert any("val_dice" in r for r in read_log(tmp_path / "fsdp"))
    # --fsdp needs the ranks torchrun starts; --zero is part of it
    with pytest.raises(SystemExit):
        TS.main(common[1:] + ["--out", str(tmp_path / "bad"), "--fsdp"])
    assert "launch with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        TS.main(common[1:] + ["--out", str(tmp_path / "bad"), "--fsdp", "--zero"])
    assert "--fsdp already shards the optimizer states" in capsys.readouterr().err

def test_torchrun_dead_rank_ends_the_job_and_resume_may_change_the_rank_count(toy_run, tmp_path):
    # save on 2 ranks, resume on 1, and the reverse: the same global batch (ranks x --grad-accum)
    # continues the same global order of micro-batches, so both equal one uninterrupted run
    root, manifest = toy_run
    common = ["--data", manifest, "--stage", "multi", "--init", str(root / "base"), "--rank", "4",
              "--batch-size", "2", "--warmup", "1", "--lr", "1e-2", "--ckpt-every", "1", "--keep",
              "9", "--steps", "5", "--lambda-attn", "0"]
    sft(tmp_path / "one", manifest, *common, "--grad-accum", "2")
    p = torchrun(tmp_path / "killed", *common)
    RO.wait_for(lambda: (tmp_path / "killed" / "ckpt-0000002").is_dir(), timeout=120)
    pids = RO.worker_pids(p)
    os.kill(pids[1], 9)
    assert RO.wait_for(lambda: p.poll() is not None, timeout=60) < 30 and p.returncode != 0
    assert not any(RO.alive(pid) for pid in pids.values())
    assert not (tmp_path / "killed" / "ckpt-0000005").exists()          # it did stop before the end
    sft(tmp_path / "killed", manifest, *common, "--grad-accum", "2", "--resume")
    # a 1-rank run stopped after step 2, resumed on 2 ranks
    grown = tmp_path / "grown"
    shutil.copytree(tmp_path / "one", grown, symlinks=True,
                    ignore=shutil.ignore_patterns("ckpt-000000[3-5]"))
    (grown / "latest").unlink()
    (grown / "latest").symlink_to("ckpt-0000002")
    p = torchrun(grown, *common, "--resume")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-6000:]
    assert ("resumed from step 2 at global micro-batch 4 "
            "(saved by 1 rank(s), now 2)" in p.stderr.read())
    want = load_file(str(tmp_path / "one" / "latest" / "adapter.safetensors"))
    for run in ("killed", "grown"):
        got = load_file(str(tmp_path / run / "latest" / "adapter.safetensors"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)

def test_torchrun_hung_rank_times_out(toy_run, tmp_path):
    root, manifest = toy_run
    p = torchrun(tmp_path / "hung", "--data", manifest, "--stage", "multi", "--init",
                 str(root / "base"), "--rank", "4",
                 "--batch-size", "2", "--steps", "500", "--ckpt-every", "1", "--lambda-attn", "0",
                 "--dist-timeout", "3")
    RO.wait_for(lambda: (tmp_path / "hung" / "ckpt-0000001").is_dir(), timeout=120)
    pids = RO.worker_pids(p)
    os.kill(pids[1], signal.SIGSTOP)          # rank 1 stops answering; rank 0 waits in a collective
    took = RO.wait_for(lambda: not RO.alive(pids[0]), timeout=120)
    os.kill(pids[1], signal.SIGCONT)          # so torchrun's SIGTERM reaches it
    assert p.wait(timeout=60) != 0 and took < 3 + 15 and "Timed out" in p.stderr.read()
    assert not any(RO.alive(pid) for pid in pids.values())

# ---- train_rl.py: IPPO end to end: the window, exact resume, ranks, learning ----

@pytest.mark.parametrize("T,w,tau,s", [(16, 2, 50, 1), (8, 3, 2, 2), (5, 5, 1, 1), (10, 1, 3, 0),
                                       (6, 2, 1, 4)])
def test_window_schedule_matches_algorithm_1(T, w, tau, s):
    l, seen = 0, []                                    # Algorithm 1, lines 1-2 and 21-23, literally
    for m in range(1, 40):
        seen.append(l)
        if m % tau == 0:
            l = min(l + s, T - w)
    assert [RL.window_start(m, T, w, tau, s) for m in range(1, 40)] == seen
    assert all(0 <= l and l + w <= T for l in seen)    # the window never runs past the last step
    with pytest.raises(ValueError):
        RL.window_start(1, T, T + 1, tau, s)

def test_train_rl_end_to_end_logs_moves_the_window_and_resumes_exactly(toy_run, tmp_path):
    root, manifest = toy_run
    f = M.Flux(M.get_config("toy"))                            # a stage-2 adapter to start from
    acfg = ML.inject(f, rank=4)
    for _, m in ML.adapters(f):
        torch.nn.init.normal_(m.up.weight, std=0.05)
    ML.save_adapter(f, str(tmp_path / "stage2.safetensors"), acfg)
    common = ["--adapter", str(tmp_path / "stage2.safetensors"), "--kl", "0.01", "--ckpt-every",
              "2"]
    rl(tmp_path / "full", manifest, root / "base", *common, "--iters", "4", "--val-data", manifest,
       "--val-n", "2", "--val-seeds", "1", "--eval-every", "2")
    rl(tmp_path / "cut", manifest, root / "base", *common, "--iters", "2")
    rl(tmp_path / "cut", manifest, root / "base", *common, "--iters", "4", "--resume")
    log = read_log(tmp_path / "full")
    train = [r for r in log if "r_total" in r]
    assert [r["window"] for r in train] == [0, 1, 2, 2]        # tau 1, stride 1, stops at T - w = 2
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("r_text", "r_aes", "r_id", "r_total", "ratio_mean",
                                                 "clip_frac", "loss", "kl", "grad_norm"))
        assert r["dit_rollout"] == r["window"] + 4 * (4 - r["window"]) and r["dit_update"] == 4 * 2
        assert r["ratio_min"] <= 1 <= r["ratio_max"] or r["ratio_min"] == r["ratio_max"] == 1
    val = [r for r in log if "val_total" in r]
    assert [r["iter"] for r in val] == [0, 2, 4]
    # the best held-out adapter
    with safe_open(str(tmp_path / "full" / "best.safetensors"), framework="pt") as f:
        best = max(val, key=lambda r: r["val_total"])
        assert (int(f.metadata()["iter"]) == best["iter"]
                and float(f.metadata()["val_total"]) == best["val_total"])
    a = load_file(str(tmp_path / "full" / "latest" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "latest" / "adapter.safetensors"))
    start = load_file(str(tmp_path / "stage2.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)             # resume: bitwise on CPU
    assert any(not torch.equal(a[k], start[k]) for k in a)     # and the adapter did learn
    assert [r["r_total"] for r in read_log(tmp_path / "full") if "r_total" in r] == \
           [r["r_total"] for r in read_log(tmp_path / "cut") if "r_total" in r]

def test_train_rl_torchrun_two_ranks_equals_one_process(toy_run, tmp_path):
    root, manifest = toy_run
    common = ["train_rl.py", "--data", manifest, "--init", str(root / "base"), "--rank", "4",
              "--steps", "4", "--group", "4", "--iters", "2", "--lr", "1e-2", "--minibatches", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, *a], env=env, capture_output=True, text=True,
                                    timeout=300)
    one = run(*common, "--prompts", "2", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common]
    two = run(*torchrun, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    # FSDP: rollouts, updates and the held-out evaluation on every rank (each forward gathers the
    # shards)
    fsdp = run(*torchrun, "--fsdp", "--val-data", manifest, "--val-n", "1", "--val-seeds", "1",
               "--eval-every", "2", "--out", str(tmp_path / "fsdp"))
    assert fsdp.returncode == 0, fsdp.stderr[-2000:]
    a = load_file(str(tmp_path / "one" / "latest" / "adapter.safetensors"))
    for other in ("two", "fsdp"):
        for r1, r2 in zip(read_log(tmp_path / "one"), [r for r in read_log(tmp_path / other)
                                                       if "r_total" in r]):
            assert (r1["r_total"] == pytest.approx(r2["r_total"], abs=1e-6)
                    and r1["dit_rollout"] == r2["dit_rollout"])
        b = load_file(str(tmp_path / other / "latest" / "adapter.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    best = load_file(str(tmp_path / "fsdp" / "best.safetensors"))   # gathered whole from the shards
    assert {k: v.shape for k, v in best.items()} == {k: v.shape for k, v in a.items()}

def test_ippo_learns_an_easy_reward(toy_run, tmp_path, monkeypatch):
    # end to end, the policy gradient must climb a reward it can reach: image brightness
    root, manifest = toy_run
    def brightness(records, where, weights):
        def reward(images, prompt, refs, captions=None):
            b = np.array([np.asarray(im, np.float64).mean() / 255 for im in images])
            return {"text": b, "aes": b, "id": b, "total": b}
        return reward
    monkeypatch.setattr(toy, "reward_for", brightness)             # in place of the world's reward
    rl(tmp_path / "rl", manifest, root / "base", "--iters", "12", "--prompts", "2", "--group", "8",
       "--tau", "1000", "--minibatches", "1", "--lr", "3e-2")
    r = [x["r_total"] for x in read_log(tmp_path / "rl")]
    assert np.mean(r[-3:]) > np.mean(r[:3]) + 0.08, r            # measured: 0.50 -> 0.65

# ---- sample.py: the command line: checks before work, toy folders, adapters, test sets ----

@pytest.fixture
def refs(tmp_path):
    d = tmp_path / "refs"
    d.mkdir()
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(d / "rgba.png")
    Image.fromarray((np.arange(60000).reshape(200, 300) % 65536).astype(np.uint16)).save(
        d / "big16.png")
    Image.new("L", (1, 2), 7).save(d / "tiny.png")
    p = Image.new("P", (20, 50), 3)
    p.putpalette(list(range(256)) * 3)
    p.save(d / "pal.png", transparency=0)
    return [str(d / n) for n in ("rgba.png", "big16.png", "tiny.png", "pal.png")]

def run_toy(out, refs, *extra):
    main(["--model", "toy", "--refs", *refs, "--prompt", "a red ball", "--steps", "3", "--seed",
          "7", "--out", str(out), *extra])

def toy_base(folder):
    """The shipped toy base without its adapter (the frozen model an adapter's strength 0 must give
    back)."""
    os.makedirs(folder, exist_ok=True)
    for f in ("flux.safetensors", "text_encoder.safetensors"):
        shutil.copy(os.path.join(WT.TOY_DIR, f), os.path.join(folder, f))
    return str(folder)

def sample_fails(capsys, *argv):
    """sample.py argv -> its error line; it must be its one error, its last line, with exit status 2
    and no traceback (a progress bar may come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().split("\n")
    assert e.value.code == 2 and lines[-1].startswith("error:") and err.count("error:") == 1, err
    assert "Traceback" not in err
    return lines[-1]

def toy_adapter(path, alpha=None, up_times=1.0, fill=None):
    """A rank-4 LoRA + MoE-LoRA adapter for the toy, with a chosen header alpha and its up weights
    scaled (a diverged one) or filled (NaN)."""
    f = M.Flux(M.get_config("toy"))
    finite = alpha is None or math.isfinite(alpha)
    acfg = ML.inject(f, rank=4, alpha=alpha if finite else None)
    acfg["alpha"] = alpha                    # a header inject itself refuses (NaN) is written as is
    torch.manual_seed(0)
    for _, m in ML.adapters(f):
        torch.nn.init.normal_(m.up.weight, std=0.05)
        with torch.no_grad():
            m.up.weight.mul_(up_times)
            if fill is not None:
                m.up.weight[0, 0] = fill
    ML.save_adapter(f, str(path), acfg)
    return str(path)

def test_cli_end_to_end(tmp_path, refs):
    out = tmp_path / "o" / "img.png"
    run_toy(out, refs, "--save-attn")
    assert Image.open(out).size == (32, 32)
    meta = json.loads((tmp_path / "o" / "img.json").read_text())
    assert (meta["prompt"] == "a red ball" and meta["refs"] == refs and meta["seed"] == 7
            and meta["steps"] == 3)
    assert (meta["width"], meta["height"], meta["model"], meta["pe"]) == (32, 32, "toy", "d")
    assert meta["guidance"] == 1.0      # the toy trains with guidance 1 (as UNO): it samples with 1
    attn = sorted(f for f in os.listdir(tmp_path / "o") if "_attn" in f)
    assert attn == [f"img_attn{i}.png" for i in range(4)]
    assert all(Image.open(tmp_path / "o" / f).size == (32, 32) for f in attn)
    assert not [f for f in os.listdir(tmp_path / "o") if f.startswith(".tmp")]

def test_save_attn_reads_the_blocks_asked_for(tmp_path, refs, capsys):
    # --attn-blocks picks the blocks the overlays average (the leakage of the toy runs through the
    # single blocks); the probe only reads: the sample itself is the same whichever blocks it reads
    run_toy(tmp_path / "a.png", refs, "--save-attn")
    run_toy(tmp_path / "b.png", refs, "--save-attn", "--attn-blocks", "d0", "d1")
    run_toy(tmp_path / "c.png", refs, "--save-attn", "--attn-blocks", "single")
    read = lambda stem: [(tmp_path / f"{stem}{x}.png").read_bytes()
                         for x in ["", "_attn0", "_attn1"]]
    a, b, c = read("a"), read("b"), read("c")
    assert a == b                                        # the default is every double block (Eq. 4)
    assert c[0] == a[0] and c[1] != a[1] and c[2] != a[2]
    assert json.loads((tmp_path / "c.json").read_text())["attn_blocks"] == ["s0", "s1", "s2", "s3"]
    capsys.readouterr()
    for extra, said in ((["--save-attn", "--attn-blocks", "s9"],
                         "this model's blocks are d0, d1, s0"),
                        (["--attn-blocks", "single"], "pass --save-attn")):
        with pytest.raises(SystemExit) as e:
            run_toy(tmp_path / "x.png", refs, *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: --attn-blocks") and said in err, err
    assert not (tmp_path / "x.png").exists()

def test_cli_deterministic(tmp_path, refs):
    run_toy(tmp_path / "a.png", refs)
    run_toy(tmp_path / "b.png", refs)
    run_toy(tmp_path / "c.png", refs, "--seed", "8")
    a, b, c = ((tmp_path / f).read_bytes() for f in ("a.png", "b.png", "c.png"))
    assert a == b and a != c

@pytest.mark.parametrize("bad", ["missing.png", "empty.png", "text.png"])
def test_cli_bad_reference_writes_nothing(tmp_path, refs, capsys, bad):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as e:
        run_toy(out / "x.png", [refs[0], str(tmp_path / bad)], "--save-attn")
    err = capsys.readouterr().err
    assert e.value.code == 2 and bad in err and "error:" in err and "Traceback" not in err
    assert os.listdir(out) == []

def test_cli_bad_model_and_sizes(tmp_path, refs, capsys):
    for extra in (["--model", str(tmp_path / "nope.safetensors")], ["--width", "2"],
                  ["--out", str(tmp_path / "x.jpg")], ["--device", "nonsense"]):
        with pytest.raises(SystemExit) as e:
            main(["--refs", refs[0], "--prompt", "x", "--model", "toy", "--out",
                  str(tmp_path / "x.png"), *extra])
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error:")
    assert sorted(os.listdir(tmp_path)) == ["refs"]

@pytest.mark.parametrize("flag,value", [
    ("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-1"),
    ("--lora-scale", "nan"), ("--lora-scale", "1e39"), ("--seed", str(2 ** 64)),
    ("--seed", "-1"), ("--seeds", str(2 ** 64)), ("--steps", "0"),
    ("--steps", "1000000"), ("--width", "0"), ("--ref-size", "1e3")])
def test_sample_flags_out_of_range_are_usage_errors(tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.setattr(S, "load_models", None)                      # refused before any work
    err = sample_fails(capsys, "--refs", DEMO[0], flag, value, "--out", str(tmp_path / "x.png"))
    assert f"argument {flag}: " in err and os.listdir(tmp_path) == []

@pytest.mark.parametrize("flags",
                         [["--width", "100000"], ["--height", "100000"], ["--ref-size", "100000"],
                          ["--width", "2048", "--height", "2048", "--model", "flux-dev", "--prompt",
                           "x"],
                          ["--ref-size", "1024", "--model", "flux-schnell", "--prompt", "x"]])
def test_sample_sizes_are_bounded_before_allocating(tmp_path, capsys, monkeypatch, flags):
    def allocated(*a, **k):
        raise AssertionError("allocated before the size was checked")
    for mod, name in ((D, "preprocess_ref"), (SM, "get_noise"), (S, "load_models")):
        monkeypatch.setattr(mod, name, allocated)
    extra = [DEMO[0]] * (8 if "1024" in flags else 1)        # 8 references of 1024 px: 32768 tokens
    err = sample_fails(capsys, "--refs", *extra, *flags, "--out", str(tmp_path / "x.png"))
    assert f"more than {S.MAX_TOKENS}" in err and os.listdir(tmp_path) == []

def test_sample_refuses_too_many_references_and_a_prompt_that_is_not_text(tmp_path, capsys):
    Image.new("RGB", (16, 16), RED).save(tmp_path / "r.png")
    for refs, prompt, why in (([str(tmp_path / "r.png")] * 9, "x", "9 references, more than 8"),
                              ([str(tmp_path / "r.png")],
                               b"a \xff b".decode("utf-8", "surrogateescape"),
                               # what Python makes of argv bytes that are not UTF-8
                               "--prompt: not valid UTF-8")):
        with pytest.raises(SystemExit) as e:
            main(["--refs", *refs, "--prompt", prompt, "--out", str(tmp_path / "o.png")])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["r.png"]

def test_sample_checks_out_first_and_writes_a_sample_as_one_set(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with monkeypatch.context() as mp:
        mp.setattr(S, "load_models", None)         # the check comes before any work
        assert "cannot write" in sample_fails(capsys, "--refs", DEMO[0], "--out",
                                              str(tmp_path / "file" / "x.png"))
    three = ["assets/orange_circle.png", "assets/pink_circle.png", "assets/blue_square.png"]
    out = tmp_path / "o" / "x.png"
    run = lambda refs, *extra: main(["--refs", *refs, "--steps", "2", "--seed", "0", "--out",
                                     str(out), *extra])
    listing = lambda: sorted(os.listdir(out.parent))
    run(three, "--save-attn")
    assert listing() == ["x.json", "x.png", "x_attn0.png", "x_attn1.png", "x_attn2.png"]
    run(DEMO[:1], "--save-attn")                   # an earlier sample's maps are not left beside it
    assert listing() == ["x.json", "x.png", "x_attn0.png"]
    assert json.loads((tmp_path / "o" / "x.json").read_text())["files"] == [str(out), str(
        out.parent / "x_attn0.png")]
    before = {f: (out.parent / f).read_bytes() for f in listing()}
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(S.json, "dumps", full)     # the disk fills while the set is written
    err = sample_fails(capsys, "--refs", *three, "--steps", "2", "--seed", "1", "--save-attn",
                       "--out", str(out))
    assert "No space left on device" in err
    # the earlier set whole, no temporary
    assert {f: (out.parent / f).read_bytes() for f in listing()} == before

def test_toy_names_its_references_or_asks_for_a_prompt(tmp_path, capsys):
    three = ["assets/orange_circle.png", "assets/pink_circle.png", "assets/blue_square.png"]
    # read at the toy's 16 px, whatever --ref-size; named as its prompts are
    for size in ("8", "16", "32"):
        main(["--refs", *three, "--ref-size", size, "--steps", "1", "--seed", "0",
              "--out", str(tmp_path / f"{size}.png")])
        assert (json.loads((tmp_path / f"{size}.json").read_text())["prompt"]
                == "two circles and a square")
    Image.new("RGB", (16, 16), "white").save(tmp_path / "blank.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
        tmp_path / "noise.png")
    for bad in ("blank.png", "noise.png"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["--refs", DEMO[0], str(tmp_path / bad), "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and bad in err and "--prompt" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()

def test_sample_reads_a_toy_checkpoint_folder_and_notes_what_the_toy_never_saw(
        tmp_path, refs, capsys):
    # a folder of toy weights through --model, its kind told (--arch) or found from its files;
    # a wrong checkpoint is one error and writes nothing, a folder holding an adapter is one error
    cfg, ckpt = M.get_config("toy"), tmp_path / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(1)                                 # weights unlike the seed-0 random fallback
    save_file(M.Flux(cfg).state_dict(), ckpt / "flux.safetensors")
    save_file(EN.ByteTextEncoder(cfg).state_dict(), ckpt / "text_encoder.safetensors")
    run_toy(tmp_path / "ck.png", refs, "--model", str(ckpt), "--arch", "toy")
    run_toy(tmp_path / "rnd.png", refs)
    assert json.loads((tmp_path / "ck.json").read_text())["weights"] == str(ckpt)
    assert (tmp_path / "ck.png").read_bytes() != (tmp_path / "rnd.png").read_bytes()
    save_file({"img_in.weight": torch.zeros(3, 3)}, ckpt / "flux.safetensors")  # a wrong checkpoint
    with pytest.raises(SystemExit) as e:
        run_toy(tmp_path / "bad.png", refs, "--model", str(ckpt), "--arch", "toy")
    assert e.value.code == 2 and "does not match" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists() and not (tmp_path / "bad.json").exists()
    base = toy_base(tmp_path / "base")
    common = ["--refs", *DEMO, "--steps", "2", "--seed", "0"]
    # no --arch: its kind from its files
    main(common + ["--model", base, "--out", str(tmp_path / "found.png")])
    main(common + ["--model", base, "--arch", "toy", "--out", str(tmp_path / "told.png")])
    assert (tmp_path / "found.png").read_bytes() == (tmp_path / "told.png").read_bytes()
    assert json.loads((tmp_path / "found.json").read_text())["arch"] == "toy"
    os.makedirs(tmp_path / "run")
    shutil.copy(os.path.join(WT.TOY_DIR, "adapter.safetensors"), tmp_path / "run")
    assert "holds an adapter" in sample_fails(capsys, *common, "--model", str(tmp_path / "run"),
                                              "--out", str(tmp_path / "x.png"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg")
    for extra, said in (([], None), (["--width", "64"], "64x32 images"),
                        (["--ref-size", "32"], "32 px references"),
                        (["--refs", str(tmp_path / "photo.jpg"), "--prompt", "a cat"],
                         "photo.jpg (not a sprite)")):
        capsys.readouterr()
        main(common + extra + ["--out", str(tmp_path / "n.png")])
        notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith("note:")]
        assert (notes == ([] if said is None else [notes[0]])
                and (said is None or said in notes[0])), notes

def test_text_guidance_defaults_to_the_presets_only_for_an_encoder_trained_on_the_empty_prompt(
        toy_run, tmp_path, capsys):
    # a base trained with --drop-prompt says so in its text encoder's header; sample.py then guides
    # on the prompt at the preset's scale, and a base trained without it gets none unless asked
    # (and then a note)
    root, manifest = toy_run
    for drop in ("0", "0.5"):
        sft(tmp_path / drop, manifest, "--stage", "base", "--steps", "1", "--ckpt-every", "1",
            "--drop-prompt", drop)
    resolve = (
        lambda *argv: S.resolve_run(S.build_parser().parse_args(["--refs", "x.png", *argv]))[1][
            "text_guidance"])
    trained, untrained = (str(tmp_path / d / "ckpt-0000001") for d in ("0.5", "0"))
    assert (WT.byte_encoder_header(os.path.join(trained, "text_encoder.safetensors"))
            == ("max", True))
    assert (WT.byte_encoder_header(os.path.join(untrained, "text_encoder.safetensors"))
            == ("max", False))
    assert M.get_config("toy").text_guidance != 1
    capsys.readouterr()
    assert resolve("--model", trained) == M.get_config("toy").text_guidance
    assert resolve("--model", untrained) == 1 and "note:" not in capsys.readouterr().err
    assert resolve("--model", untrained, "--text-guidance", "2") == 2
    assert "was not trained on the empty prompt" in capsys.readouterr().err
    assert resolve("--model", "flux-dev") == M.get_config("flux-dev").text_guidance == 1

def test_sample_lora_and_its_scale_zero_is_the_base_and_one_is_the_default(toy_run, tmp_path,
                                                                          capsys):
    base = toy_base(tmp_path / "base")
    common = ["--refs", *DEMO, "--steps", "2", "--seed", "3"]
    main(common + ["--model", base, "--out", str(tmp_path / "base.png")])
    for scale in ("0", "1", "0.5"):
        main(common + ["--model", WT.TOY_DIR, "--lora-scale", scale, "--out",
                       str(tmp_path / f"s{scale}.png")])
    main(common + ["--out", str(tmp_path / "default.png")])
    png = lambda n: (tmp_path / f"{n}.png").read_bytes()
    assert (png("s0") == png("base") and png("s1") == png("default")
            and png("s0.5") not in (png("s0"), png("s1")))
    assert json.loads((tmp_path / "s0.5.json").read_text())["lora_scale"] == 0.5
    assert "no adapter" in sample_fails(capsys, *common, "--model", base, "--lora-scale", "0.5",
                                        "--out", str(tmp_path / "x.png"))
    # a random adapter on a random base changes its samples; a file that is no adapter is refused,
    # nothing written
    root, manifest = toy_run
    f = M.Flux(M.get_config("toy"))
    acfg = ML.inject(f, rank=4)
    for _, m in ML.adapters(f):
        torch.nn.init.normal_(m.up.weight, std=0.5)
    ML.save_adapter(f, str(tmp_path / "a.safetensors"), acfg)
    args = ["--model", str(root / "base"), "--arch", "toy", "--refs", "assets/orange_circle.png",
            "--prompt", "x", "--steps", "2", "--seed", "0"]
    main(args + ["--out", str(tmp_path / "plain.png")])
    main(args + ["--out", str(tmp_path / "lora.png"), "--lora", str(tmp_path / "a.safetensors")])
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "lora.png").read_bytes()
    (tmp_path / "bad.safetensors").write_text("nope")
    with pytest.raises(SystemExit):
        main(args + ["--out", str(tmp_path / "bad.png"), "--lora",
                     str(tmp_path / "bad.safetensors")])
    assert not (tmp_path / "bad.png").exists()

@pytest.mark.parametrize("case,why", [("alpha nan", "alpha"), ("alpha 1e30", "alpha"),
                                      ("diverged", "overflowed"), ("nan weights", "nan")])
def test_sample_refuses_a_sample_that_is_not_finite(tmp_path, capsys, case, why):
    kw = {"alpha nan": dict(alpha=float("nan")), "alpha 1e30": dict(alpha=1e30),
          "diverged": dict(up_times=1e20), "nan weights": dict(fill=float("nan"))}[case]
    lora, out = toy_adapter(tmp_path / "a.safetensors", **kw), tmp_path / "out"
    err = sample_fails(capsys, "--model", toy_base(tmp_path / "base"), "--lora", lora, "--refs",
                       DEMO[0],
                       "--prompt", "x", "--steps", "2", "--seed", "0", "--out", str(out / "x.png"))
    assert why in err.lower(), err
    assert not out.exists() or os.listdir(out) == []                 # no black PNG, no JSON

def test_batch_sampling_equals_single_sample_seed_for_seed_and_continues(tmp_path, capsys):
    manifest = toy.write_world(str(tmp_path / "toy"), 2, seed=5, subjects=(2,))
    recs = [json.loads(l) for l in open(manifest)]
    plain = dict(recs[0], prompt="a cross")
    del plain["id"]
    lines = [json.dumps(recs[0]), json.dumps(recs[1]), '{"prompt": "no refs"}', json.dumps(plain)]
    with open(manifest, "w") as f:
        f.write("\n".join(lines) + "\n")
    out, root = tmp_path / "set", os.path.dirname(manifest)
    batch = ["--manifest", manifest, "--out-dir", str(out), "--seeds", "0", "4", "--steps", "2"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                # a bad record: exit 1, the others sampled
        main(batch)
    err = capsys.readouterr().err
    assert e.value.code == 1 and [l for l in err.splitlines() if l.startswith(manifest)] == \
        [f"{manifest}:3: refs: missing or not a non-empty list of paths"]
    names = [recs[0]["id"], recs[1]["id"], "000003"]    # an id, else the position among the records
    assert sorted(os.listdir(out)) == ["0", "4"] and all(
        sorted(f for f in os.listdir(out / s) if f.endswith(".png")) == sorted(
            f"{n}.png" for n in names) for s in "04")
    for rec, name in zip([recs[0], recs[1], plain], names):
        for seed in ("0", "4"):                         # the single-sample command, byte for byte
            one = tmp_path / f"one_{name}_{seed}.png"
            main(["--refs", *[os.path.join(root, r) for r in rec["refs"]], "--prompt",
                  rec["prompt"], "--seed", seed, "--steps", "2", "--out", str(one)])
            assert one.read_bytes() == (out / seed / f"{name}.png").read_bytes()
    stamps = {p: os.stat(p).st_mtime_ns for p in out.glob("*/*")}
    os.unlink(out / "4" / "000003.png")                 # as if killed before that sample's PNG
    with pytest.raises(SystemExit):
        main(batch)
    err = capsys.readouterr().err
    assert "wrote 1 samples" in err and "skipped 5 already there" in err
    redone = {out / "4" / "000003.png", out / "4" / "000003.json"}
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items() if p not in redone)
    assert (out / "4" / "000003.png").read_bytes() == (tmp_path / "one_000003_4.png").read_bytes()
    # generate, then score
    assert toy.main(["eval", "--manifest", manifest, "--images", str(out / "4")]) == 0
    metrics = json.loads((out / "4" / "metrics.json").read_text())
    # every sample scored; the bad record (line 3, position 2) has none
    assert metrics["rows"]["images"]["n_records"] == 3 and len(metrics["missing"]) == 1
    assert metrics["missing"][0].endswith("000002.png: no such file")
    with pytest.raises(SystemExit) as e:                # never mixed with another run's samples
        main(batch[:-1] + ["3"])
    assert (e.value.code == 2
            and "other settings (steps differ)" in capsys.readouterr().err.splitlines()[-1])
    (tmp_path / "p.txt").write_bytes(b"a red ball\n\n\xff bad\na blue box\n")
    with pytest.raises(SystemExit) as e:
        main(["--prompts", str(tmp_path / "p.txt"), "--refs", DEMO[0], "--out-dir",
              str(tmp_path / "pp"), "--seeds", "1", "--steps", "2"])
    assert e.value.code == 1 and "p.txt:3: not UTF-8" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "pp" / "1")) == ["000000.json", "000000.png", "000002.json",
                                                         "000002.png"]
    main(["--refs", DEMO[0], "--prompt", "a blue box", "--seed", "1", "--steps", "2", "--out",
          str(tmp_path / "b.png")])
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "pp" / "1" / "000002.png").read_bytes()

def test_batched_seeds_equal_one_at_a_time_and_a_non_finite_one_loses_only_itself(
        tmp_path, capsys, monkeypatch):
    manifest = toy.write_world(str(tmp_path / "toy"), 2, seed=5, subjects=(2,))
    names = [json.loads(l)["id"] for l in open(manifest)]
    common = ["--manifest", manifest, "--seeds", "0", "4", "7", "--steps", "3"]
    main(common + ["--out-dir", str(tmp_path / "one")])
    # batches of 2 and 1 per record
    main(common + ["--out-dir", str(tmp_path / "two"), "--batch-size", "2"])
    for seed in ("0", "4", "7"):
        for n in names:
            a, b = (np.asarray(Image.open(tmp_path / d / seed / f"{n}.png"), np.int16)
                    for d in ("one", "two"))
            assert np.abs(a - b).max() <= 1                                # float rounding, at most
            meta = json.loads((tmp_path / "two" / seed / f"{n}.json").read_text())
            assert meta["seed"] == int(seed) and meta["id"] == n and meta["batch_size"] == 2
    # the same samples: all skipped
    main(common + ["--out-dir", str(tmp_path / "one"), "--batch-size", "3"])
    assert "wrote 0 samples" in capsys.readouterr().err
    real = SM.denoise
    def second_is_nan(*a, **k):
        x = real(*a, **k)
        return torch.cat([x[:1], torch.full_like(x[1:2], float("nan")), x[2:]]) if len(x) > 1 else x
    monkeypatch.setattr(SM, "denoise", second_is_nan)
    err = sample_fails(capsys, *common, "--out-dir", str(tmp_path / "nan"), "--batch-size", "3")
    assert f"{tmp_path / 'nan' / '4' / names[0]}.png: not written: the sample is not finite" in err
    assert sorted(os.listdir(tmp_path / "nan" / "0")) == [f"{names[0]}.json", f"{names[0]}.png"]
    assert (not (tmp_path / "nan" / "4").exists()
            and (tmp_path / "nan" / "7" / f"{names[0]}.png").is_file())
    assert "--batch-size: batches a test set" in sample_fails(
        capsys, "--refs", DEMO[0], "--batch-size", "2", "--out", str(tmp_path / "x.png"))

def test_batch_ids_that_cannot_name_a_sample_are_findings_and_ctrl_c_keeps_what_is_written(
        tmp_path, capsys, monkeypatch):
    ref = os.path.abspath(DEMO[0])
    shutil.copy(ref, tmp_path / "r.png")
    rec = lambda **kw: json.dumps(dict(prompt="a red solid circle", refs=["r.png"], **kw))
    manifest = tmp_path / "m.jsonl"          # line 2: no id, position 1 -> "000001", as line 3's id
    manifest.write_text("\n".join([rec(id=7), rec(), rec(id="000001"), rec(id="7"),
                                   rec(id=10 ** 300), rec(id="ok")]) + "\n")
    batch = ["--manifest", str(manifest), "--out-dir", str(tmp_path / "s"), "--steps", "1"]
    calls = []
    def interrupted(*a, **k):                # Ctrl-C during the second sample
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    real = SM.denoise
    monkeypatch.setattr(SM, "denoise", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(batch)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted" in err.splitlines()[-1] and "Traceback" not in err
    assert [l.split(": ", 1)[0] for l in err.splitlines() if l.startswith(str(manifest))] == \
        [f"{manifest}:{n}" for n in (3, 4, 5)]    # each a finding; none overwrites another's sample
    assert sorted(os.listdir(tmp_path / "s" / "0")) == ["7.json", "7.png"]
    monkeypatch.setattr(SM, "denoise", real)
    with pytest.raises(SystemExit) as e:
        main(batch)
    assert e.value.code == 1 and "wrote 2 samples" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "s" / "0")) == ["000001.json", "000001.png", "7.json",
                                                        "7.png", "ok.json", "ok.png"]

def test_two_samplers_on_one_set_are_refused_never_mixed(tmp_path, capsys, monkeypatch):
    manifest = toy.write_world(str(tmp_path / "toy"), 2, seed=5, subjects=(2,))
    out = tmp_path / "set"
    common = ["--manifest", manifest, "--out-dir", str(out), "--seeds", "0", "1"]
    real, second = S.write_set, []
    # another sampler, other settings, starts as the first writes its first sample
    def meanwhile(files):
        if not second:
            second.append("started")
            try:
                second.append(main(common + ["--steps", "3"]))
            except SystemExit as e:
                second.append(e.code)
            second.append(capsys.readouterr().err)
        return real(files)
    monkeypatch.setattr(S, "write_set", meanwhile)
    assert main(common + ["--steps", "2"]) == 0
    _, status, err = second
    assert (status == 2 and err.strip().endswith(f"error: {out}: another sample.py is writing this "
                                                 f"set: refused, their samples would mix (wait for "
                                                 f"it to end, or pass another --out-dir)")), err
    assert sorted({json.loads(p.read_text())["steps"] for p in out.glob("*/*.json")}) == [2]
    # nothing else in the set
    assert len(list(out.glob("*/*.png"))) == 4 and sorted(os.listdir(out)) == ["0", "1"]

def test_sample_offload_is_bit_identical_and_fp8_is_close(tmp_path):
    # the low-VRAM options through the command line, on the shipped toy: --offload moves weights,
    # never changes them
    run = lambda name, *flags: main(["--refs", *DEMO, "--seed", "3", "--steps", "3", "--out",
                                     str(tmp_path / name), *flags])
    run("plain.png")
    run("offload.png", "--offload")
    run("fp8.png", "--fp8")
    plain, fp8 = (np.asarray(Image.open(tmp_path / n), np.float64)
                  for n in ("plain.png", "fp8.png"))
    assert (tmp_path / "plain.png").read_bytes() == (tmp_path / "offload.png").read_bytes()
    assert 0 < np.abs(plain - fp8).mean() < 4.0         # fp8 rounding: a few levels of 255, no more
    assert json.loads((tmp_path / "fp8.json").read_text())["fp8"] is True

# ---- export_lora.py: the diffusers export command ----

def test_export_lora_cli_rebuilds_the_adapter_without_base_weights(tmp_path, capsys):
    torch.manual_seed(0)
    flux = M.Flux(M.get_config("toy"))
    acfg = ML.inject(flux, rank=4, n_experts=2)
    for _, m in ML.adapters(flux):
        torch.nn.init.normal_(m.up.weight, std=0.1)
    ML.save_adapter(flux, str(tmp_path / "adapter.safetensors"), acfg)
    out = tmp_path / "out" / "lora.safetensors"
    assert export_lora.main([str(tmp_path / "adapter.safetensors"), str(out), "--arch", "toy"]) == 2
    err = capsys.readouterr().err
    assert (err.startswith("error: 6 MoE-LoRA layers have no diffusers equivalent")
            and not out.exists())
    assert export_lora.main([str(
        tmp_path / "adapter.safetensors"), str(out), "--arch", "toy", "--moe", "skip"]) == 0
    assert "6 MoE-LoRA layers left out" in capsys.readouterr().err
    want, _ = ML.export_diffusers(flux, moe="skip")         # the same adapter, exported from memory
    got = load_file(str(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the uniform-routing approximation: every MoE-LoRA as one LoRA of rank E * r
    assert export_lora.main([str(
        tmp_path / "adapter.safetensors"), str(out), "--arch", "toy", "--moe", "mean"]) == 0
    got = load_file(str(out))
    assert got["transformer.transformer_blocks.0.ff.net.2.lora_A.weight"].shape == (8, 512)
    assert export_lora.main([str(tmp_path / "nope.safetensors"), str(out)]) == 2

# ---- plot_log.py: curves of log.jsonl ----

def test_plot_log_draws_each_run_and_rejects_bad_lines(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # a falls from 1 to 0 over steps 0..10; b rises; an eval record and a list are not curves of
    # their own
    (a / "log.jsonl").write_text("".join(json.dumps({
        "step": s, "diff": 1 - s / 10, "expert_load": [0.5, 0.5]}) + "\n"
        for s in range(11)) + json.dumps({"step": 10, "dice": float("nan")}) + "\n")
    (b / "log.jsonl").write_text("".join(json.dumps({"step": s, "diff": s / 10}) + "\n"
                                         for s in range(11))
                                 + '{"step": 11, "di')     # a run still writing: its torn last line
    assert plot_log.main([str(a), str(b / "log.jsonl"), "--out", str(tmp_path / "c.png"), "--panel",
                          "300", "200"]) == 0
    img = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    legend = 18 * 2 + 8
    assert img.shape == (legend + 200, 300, 3)                         # one panel: "diff" only
    for colour, falls in ((plot_log.COLOURS[0], True), (plot_log.COLOURS[1], False)):
        ys, xs = np.nonzero((np.abs(img - np.array(colour)) < 8).all(-1)[legend:])
        left, right = ys[xs < xs.min() + 5].mean(), ys[xs > xs.max() - 5].mean()
        assert (left < right) == falls and abs(left - right) > 100     # image y grows downwards
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "diff": 0.5}\n[1, 2]\n{"step": 2}\n')
    assert plot_log.main([str(bad), "--out", str(tmp_path / "d.png")]) == 2
    assert (f"{bad}:2: not a JSON object" in capsys.readouterr().err
            and not (tmp_path / "d.png").exists())
    assert plot_log.main([str(tmp_path / "nope")]) == 2

# ---- bench.py + benchmarks/: measured peaks, the memory budget, the GPU rows ----

def test_meta_device_inference_peak_equals_the_profilers_count_on_cpu():
    cfg = tiny_cfg(hidden_size=128, num_heads=2, axes_dim=(16, 24, 24), depth=2,
                   depth_single_blocks=3)
    flux = randomize(M.Flux(cfg).eval())
    with torch.device("meta"):
        meta = M.Flux(cfg).eval()
    def forward(f, device):
        G, R, L = 16, 8, 20
        with torch.no_grad():
            f(torch.randn(1, G * G, cfg.in_channels, device=device),
              M.grid_ids(G, G, device=device), torch.randn(1, L, cfg.context_in_dim, device=device),
              torch.zeros(1, L, 3, device=device), torch.rand(1, device=device),
              torch.randn(1, cfg.vec_in_dim, device=device), torch.ones(1, device=device),
              [torch.randn(1, R * R, cfg.in_channels, device=device)] * 2,
              M.ref_ids((G, G), [(R, R)] * 2, device=device))
    profiler = BME.peak_memory(lambda: forward(flux, "cpu"))["tensors"]       # the profiler's count
    assert BME.live_peak(lambda: forward(flux, "cpu")) == profiler
    attention = M.attention
    M.attention = flash_like_attention    # on meta, what CPU SDPA's fused kernel keeps (out, LSE)
    try:
        assert BME.live_peak(lambda: forward(meta, "meta")) == profiler
    finally:
        M.attention = attention
    # the streamed DiT's peak counts the one block copied in: its weights more than the resident
    # model's
    streamed = M.Flux(cfg).eval()
    WT.stream_blocks(streamed, "cpu")
    largest = max(BME.nbytes(b) for b in (*streamed.double_blocks, *streamed.single_blocks))
    assert BME.live_peak(lambda: forward(streamed, "cpu")) >= profiler + largest - 4 * 2 ** 20

def test_bench_measurements_print_no_profiler_noise():
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    code = ("from benchmarks import measure; import torch; "
            "print(measure.peak_memory(lambda: torch.ones(1000) * 2)['tensors'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert p.returncode == 0 and int(p.stdout) >= 8000     # the two 4000-byte tensors, live at once
    assert ("STAGE" not in p.stderr and "USDT" not in p.stderr
            and "profiler" not in p.stderr), p.stderr

@pytest.mark.parametrize("family", ["FLUX.1", "FLUX.2"])
def test_bench_memory_fsdp_column_shards_what_fsdp_shards(family):
    # the budget from module shapes on the meta device: DDP replicates everything, ZeRO shards
    # AdamW's states, FSDP the weights, gradients and states, and each rank then holds the units
    # that compute (the root, two blocks and one block's gradients). The same accounting for both
    # families
    cfg = tiny_cfg(max_txt_len=16) if family == "FLUX.1" else tiny_flux2(max_txt_len=16)
    b = BMEM.training_budget(cfg, 8, 4, 64, 32, 2, 1)
    flux = F2.dit(cfg)
    ML.inject(flux, rank=8, n_experts=4)
    assert b["frozen_params"] + b["adapter_params"] == sum(p.numel() for p in flux.parameters())
    assert b["adapter_params"] == sum(p.numel() for p in flux.parameters() if p.requires_grad) > 0
    assert b["act"] > b["act_ckpt"] > 0
    cols = BMEM.budget_columns(b, gpus=8)
    one, ddp, zero, fsdp = cols["1 GPU"], cols["8 GPUs"], cols["8 + ZeRO"], cols["8 + FSDP"]
    assert one == ddp
    for row in ("frozen DiT", "adapters (fp32)", "adapter gradients (fp32)"):
        assert zero[row] == one[row] and fsdp[row] == one[row] / 8
    for row in ("AdamW states (fp32 x 2)", "AdamW step temporary (fp32)"):
        assert zero[row] == fsdp[row] == one[row] / 8
    gathered = fsdp["FSDP units gathered"]
    assert (gathered == b["root"] + 2 * b["block"] + b["block_grads"] > 0
            == one["FSDP units gathered"])
    # bf16 base
    as_trained = lambda m: sum(p.numel() * (4 if p.requires_grad else 2) for p in m.parameters())
    block = max((*flux.double_blocks, *flux.single_blocks), key=as_trained)
    assert b["block_grads"] == 4 * sum(p.numel() for p in block.parameters() if p.requires_grad)

def test_bench_memory_flux2_table_has_the_fsdp_columns(capsys):
    # `bench.py memory --preset klein-*`: one GPU and 8 with --fsdp, both summed by budget_columns;
    # a resident text model sits in FSDP's root unit, gathered for the whole step: whole on every
    # GPU, beside its shard
    args = bench.build_parser().parse_args(["memory", "--preset", "klein-base-4b", "--rank", "16"])
    res = BMEM.memory(args)
    GiB, b, totals = 2 ** 30, res["budget"], res["totals_GiB"]
    cache, text, ae = "--cache (no text model, no AE)", res["text_GiB"], res["ae_GiB"]
    for size in (512, 1024):
        cols = BMEM.budget_columns(b[size], gpus=8)
        ckpt = ", --grad-checkpoint"
        for name, key in ((cache, "total"), (cache + ckpt, "total" + ckpt)):
            for layout in ("1 GPU", "8 + FSDP"):
                assert totals[name][layout][size] == cols[layout][key] / GiB
        resident = totals["text model + AE resident, --grad-checkpoint"]
        cached = totals[cache + ckpt]
        assert resident["1 GPU"][size] - cached["1 GPU"][size] == pytest.approx(text + ae)
        fsdp = resident["8 + FSDP"][size] - cached["8 + FSDP"][size]
        assert fsdp == pytest.approx(text * 9 / 8 + ae)
        assert cached["8 + FSDP"][size] < cached["1 GPU"][size] / 2
    out = capsys.readouterr().out
    assert "8 GPUs, --fsdp" in out and out.count(cache) == 2

def test_bench_gpu_tiny_runs_every_gpu_check_on_the_cpu(tmp_path, capsys):
    # `bench.py gpu` is what a GPU session runs in one call; --tiny is the same code at tiny shapes
    # on the CPU
    args = bench.build_parser().parse_args(["gpu", "--tiny", "--json", str(tmp_path / "gpu.json")])
    res = BG.gpu(args)
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(res))
    cases = res["dit"]["cases"]
    assert list(cases) == ["64px + 1 ref", "64px + 4 ref", "128px + 1 ref"]
    for r in cases.values():       # our DiT against diffusers' in bf16, forward and input gradients
        assert r["rel_diff_out"] < 2e-2 and r["rel_diff_grad"] < 4e-2
        for m in (r["ours"], r["diffusers"]):
            assert 0 < m["fwd_flops"] < m["train_flops"] and m["train_peak_bytes"] > 0
    att = res["attention"]         # the CPU has SDPA's flash and math kernels, not CUDA's
    assert att["flash_attn_installed"] is False
    assert att["FLASH_ATTENTION"]["rel_err"] < 1e-2 and att["MATH"]["rel_err"] < 1e-2
    assert "unavailable" in att["EFFICIENT_ATTENTION"] and "unavailable" in att["CUDNN_ATTENTION"]
    sft = res["sft"]               # the measured peak of paper-like steps against the estimate
    assert 0.85 < sft["peak_bytes"] / sft["estimate_bytes"] < 1.2
    assert all(res["sampling"][k] > 0 for k in ("resident_s", "fp8_s", "offload_s"))
    # the same rows at klein Base 4B's roles: FLUX.2's DiT against diffusers'
    # Flux2Transformer2DModel, one LoRA SFT step against `bench.py memory --preset klein-base-4b`'s
    # estimate, seconds per image
    klein = res["klein"]
    assert klein["preset"] == "klein-base-4b" and list(klein["dit"]["cases"]) == list(cases)
    for r in klein["dit"]["cases"].values():
        assert r["rel_diff_out"] < 2e-2 and r["rel_diff_grad"] < 4e-2
        for m in (r["ours"], r["diffusers"]):
            assert 0 < m["fwd_flops"] < m["train_flops"] and m["train_peak_bytes"] > 0
            assert all(math.isfinite(t) and t > 0 for t in m["fwd_s"] + m["train_s"])
    assert 0.85 < klein["sft"]["peak_bytes"] / klein["sft"]["estimate_bytes"] < 1.2
    assert math.isfinite(klein["sft"]["step_s"])
    images = [klein["sampling"][n] for n in ("klein-base-4b", "klein-4b")]   # own steps, guidance
    assert [(r["steps"], r["text_guidance"]) for r in images] == [(50, 4.0), (4, 1.0)]
    assert all(math.isfinite(r["s"]) and r["s"] > 0 for r in images)
    table = capsys.readouterr().out
    assert table.count("\nDiT forward") == 6 and "flash-attn" in table
    assert "SDPA's own kernels" in table and table.count("\nklein DiT forward") == 6
    assert "\nSFT step peak memory" in table and table.count("\nklein SFT step peak memory") == 1
    assert table.count("\ns per 128px image") == 3 and table.count("\nklein s per 128px image") == 2

def test_bench_gpu_rows_say_what_was_skipped_or_ran_out_of_memory(monkeypatch):
    # without diffusers the DiT rows time ours alone and say why; a section out of device memory is
    # one row
    def no_diffusers(cfg, state):
        raise ImportError("No module named 'diffusers'")
    monkeypatch.setattr(BG, "diffusers_flux", no_diffusers)
    monkeypatch.setattr(BG, "diffusers_flux2", no_diffusers)
    S = dict(BG.TINY_SHAPES, refs=(1,))
    dit = BG.dit_section(BG.tiny_config(), S, torch.device("cpu"), 0)
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    klein = {"dit": BG.dit_section(BG.tiny_klein(), S, torch.device("cpu"), 0), "sft": {},
             "sampling": BG.guarded(oom, None, S, torch.device("cpu"), 0)}
    res = {"matmul_bf16_flops_per_s": 1e9, "shapes": S, "dit": dit, "attention": {}, "sft": {},
           "sampling": BG.guarded(oom, None, S, torch.device("cpu"), 0), "klein": klein}
    rows = BG.gpu_rows(res)
    dit_rows = [f"{prefix}DiT {m}, {case} + 1 ref" for prefix in ("", "klein ")
                for case in ("64px", "128px") for m in ("forward", "forward+backward")]
    assert [r[0] for r in rows] == dit_rows + ["sampling", "klein sampling"]
    assert all("diffusers: not installed here" in r[4] for r in rows[:8])
    assert rows[8][1] == rows[9][1] == "out of memory"

# ---- experiments/: the world's sanity rows, the ablation ----

def test_world_sanity_rows_separate(tmp_path):
    two, _ = world(tmp_path, "two", 40, seed=3, split="test", subjects=(2,))
    near, _ = world(tmp_path, "near", 40, seed=4, split="test", hard="near")
    single, _ = world(tmp_path, "one", 80, seed=5, split="test", subjects=(1,))
    for recs in (two, near):
        rows = EW.sanity_rows(recs, "t")
        assert rows["targets"]["alpha"] < 0.05 and rows["targets"]["leakage"] == 0
        assert 0.4 <= rows["averaging"]["alpha"] <= 0.6 and rows["averaging"]["leakage"] == 1
        assert rows["targets"]["texture_acc"] == rows["targets"]["shape_acc"] == 1
    rows = EW.sanity_rows(single, "t")
    assert rows["targets"]["following"] == 1 and rows["targets"]["colour_err"] < 0.01
    # chance
    assert 0.3 <= rows["text-only"]["following"] <= 0.7 and rows["text-only"]["n_swaps"] == 80
    assert rows["text-only"]["colour_err"] > 0.15 and rows["text-only"]["texture_acc"] < 0.25

def test_ablation_pools_each_metric_by_what_it_counts():
    sets = [dict(alpha=0.2, n_alpha=1, following=float("nan"), n_swaps=0, colour_err=0.1,
                 n_subjects=2),
            dict(alpha=0.5, n_alpha=3, following=0.75, n_swaps=4, colour_err=0.4, n_subjects=6)]
    assert EA.pool(sets, "alpha") == pytest.approx((0.2 + 1.5) / 4)
    assert EA.pool(sets, "following") == 0.75                  # a set with no swap does not count
    assert EA.pool(sets, "colour_err") == pytest.approx((0.2 + 2.4) / 8)
    b = EA.binned([(0.01, 0.2), (0.02, 0.4), (0.12, 0.1), (0.45, 1.0)])
    assert (b[0] == (pytest.approx(0.3), 2) and b[2] == (0.1, 1) and b[1] == (None, 0)
            and b[-1] == (1.0, 1))

def test_ablation_refuses_a_work_folder_made_under_other_settings(tmp_path):
    # a folder of an earlier experiment (no guidance, no prompt dropout: its settings carry neither
    # key) is never mixed into one trained with dropout or sampled with guidance; refused before
    # anything is written (were it taken, the tiny run would fail fast on its missing base)
    base, work, small = (tmp_path / "nobase", tmp_path / "work",
                         dict(n=1, steps=1, batch_size=1, ippo_iters=1,
                              test_n=1, eval_steps=1))
    made = dict(base=str(base), sprite=[7, 11], ref_size=16, n=1, steps=1, batch_size=1, lr=1e-3,
                ippo_iters=1, test_n=1, eval_steps=1)
    work.mkdir()
    (work / "settings.json").write_text(json.dumps(made))
    flags = [a for k, v in small.items() for a in ("--" + k.replace("_", "-"), str(v))]
    for extra in (["--drop-prompt", "0.1"], ["--ref-guidance", "4"], ["--text-guidance", "2"]):
        with pytest.raises(SystemExit, match="holds runs made with .* pass another --work"):
            EA.ablation(EA.build_parser().parse_args(["--base", str(base), "--work", str(work),
                                                      *flags, *extra]))
    assert (json.loads((work / "settings.json").read_text()) == made
            and os.listdir(work) == ["settings.json"])

# ---- the project as a whole: layout rule, no pickles, flags in messages, docs, shipped toy ----

def follows_own_colour(tmp_path, model_args, distance=toy.HARD["far"], pairs=6, seeds=4):
    """Single references that differ only in colour, by `distance` (mean abs RGB; toy.hard_pair's
    colours, one shape, code, size, place and tint), prompt "a circle", seeds fixed, sampled by
    sample.py's batch mode -> the share of samples whose subject is closer in colour to its own
    reference than to the pair's other one (chance 0.5)."""
    records, colours = [], {}
    for k in range(pairs):
        a, b = (toy.Identity("circle", x.rgb, toy.draw_identity("test", k).code)
                for x in toy.hard_pair(np.random.default_rng([8, k]), "test", 4000 + k, distance))
        for tag, ident in (("a", a), ("b", b)):
            path = tmp_path / f"{k}{tag}.png"
            Image.fromarray(toy.view(ident, np.random.default_rng([9, k]))[0]).save(path)
            records.append(dict(id=f"{k}{tag}", prompt="a circle", refs=[path.name]))
            colours[f"{k}{tag}"] = (ident.rgb, (b if tag == "a" else a).rgb)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    main(["--manifest", str(tmp_path / "m.jsonl"), "--out-dir", str(tmp_path / "out"),
          "--seeds", *map(str, range(seeds)), *model_args])
    hits = []
    for seed in range(seeds):
        for key, (own, other) in colours.items():
            drawn = toy.read_subjects(Image.open(tmp_path / "out" / str(seed) / f"{key}.png"))
            hits.append(bool(drawn) and toy.colour_distance(drawn[0]["rgb"], own) <
                        toy.colour_distance(drawn[0]["rgb"], other))
    return float(np.mean(hits))

def option_strings(parser):
    subs = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for p in a.choices.values()]
    return set(parser._option_string_actions).union(*map(option_strings, subs))

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")

def flags_said(text, script):
    """(script, --flag) for every flag a message names, each for the script named before it on its
    line (else `script`): "use train_sft.py --drop-prompt" is train_sft.py's flag."""
    out = []
    for line in text.splitlines():
        current = script
        for m in re.finditer(r"\b(\w+\.py|torchrun|hf|pip)\b|" + FLAG.pattern, line):
            if m.group(1):                         # torchrun's, hf's and pip's own flags are theirs
                current = (m.group(1) if m.group(1) in SCRIPTS else None
                           if m.group(1) in ("torchrun", "hf", "pip") else current)
            elif current:
                out.append((current, m.group(0)))
    return out

def sh_commands(text, docstring=False):
    """The commands of a text's ```sh blocks (a docstring's: its indented example lines),
    continuation lines joined, comments dropped, split at && -> [argv]."""
    if docstring:
        lines, more = [], False
        for line in text.splitlines():
            if more or re.match(r"\s+(python|torchrun|OMP_NUM_THREADS=)", line):
                lines.append(line)
                more = line.rstrip().endswith("\\")
        blocks = ["\n".join(lines)]
    else:
        blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    out = []
    for block in blocks:
        # a program, not a command
        block = re.sub(r'python -c "(?:[^"\\]|\\.)*"', "python -c CODE", block)
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            # an example's unquoted " ..."
            cmd, line = [], re.sub(r"(?<=\s)\.\.\.(?=\s|$)", " ABRIDGED ", line)
            for token in shlex.split(line, comments=True) + ["&&"]:
                if token != "&&":
                    cmd.append(token)
                elif cmd:
                    out.append(cmd)
                    cmd = []
    return out

def script_argv(argv):
    """A command -> (script or module, its arguments), or None if it runs no project script."""
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):                    # OMP_NUM_THREADS=1 ...
        argv = argv[1:]
    if argv[:1] == ["torchrun"]:
        argv = ["python"] + argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
    if argv[:2] == ["python", "-m"] and argv[2].startswith(("experiments.", "reliability.")):
        return argv[2], argv[3:]
    if argv[:1] == ["python"] and len(argv) > 1 and argv[1] in SCRIPTS:
        return argv[1], argv[2:]
    return None

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir("docs"))

def test_layout_rule_imports_go_down_and_no_script_is_a_library():
    # the layout rule, read from the code: each library file imports only library files below it
    # (the order below), no file imports a command-line script, and no own module is imported inside
    # a function; benchmarks/ is bench.py's library: its modules import the libraries, never a
    # script
    here = os.path.dirname(os.path.abspath(__file__))
    order = ["cli", "model", "encoders", "weights", "sampling", "flux2", "moe_lora", "losses",
             "data", "dataset", "cache", "rewards", "toy", "curate", "runs", "training"]
    scripts = {"sample", "train_sft", "train_rl", "bench", "plot_log", "export_lora"}
    own = set(order) | scripts | {"benchmarks"}
    files = [os.path.join(here, f"{n}.py") for n in order + sorted(scripts)] + \
        [f for folder in ("benchmarks", "experiments", "reliability")
         for f in glob.glob(os.path.join(here, folder, "*.py"))]
    assert len(glob.glob(os.path.join(here, "benchmarks", "*.py"))) > 1
    for path in files:
        name, tree = os.path.splitext(os.path.basename(path))[0], ast.parse(open(path).read())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module
                    and node.level == 0 else [])
            for mod in (m.split(".")[0] for m in mods):
                if mod not in own:
                    continue
                where = f"{os.path.relpath(path, here)}:{node.lineno} imports {mod}"
                assert mod not in scripts, where + ", a script"
                assert node.col_offset == 0, where + " inside a function"
                if name in order:
                    assert mod in order, where + ", not a library"
                    assert order.index(mod) < order.index(name), where + ", a file above it"

def test_no_pickle_is_unpickled_and_no_remote_code_is_trusted():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = {f: open(os.path.join(here, f)).read() for f in os.listdir(here)
               if f.endswith(".py") and f != "test_all.py"}
    assert "model.py" in sources and "train_sft.py" in sources
    for f, src in sources.items():
        for call in re.findall(r"torch\.load\((.*)", src):
            assert "weights_only=True" in call, (f, call)
        assert (not re.search(
            r"pickle\.loads?\(|trust_remote_code\s*=\s*True|weights_only\s*=\s*False", src)), f

def test_every_flag_a_message_suggests_is_one_its_command_accepts(no_weights, monkeypatch, capsys):
    known = {s: option_strings(script_parser(s)) for s in SCRIPTS}
    # toy.py eval: rewards.py eval's
    known["toy.py"] |= option_strings(script_parser("toy.py", "eval"))
    # libraries with a command line of their own (and bench.py, which reports on the trainers) speak
    # to every script that uses them: any script's flag will do for their strings (the run below
    # checks what each says)
    anyone = set().union(*known.values())
    speaks = {s: anyone if s in ("rewards.py", "toy.py", "data.py", "bench.py") else known[s]
              for s in SCRIPTS}
    # every string of every script: its messages, help texts and examples
    bad = []
    benchmarks = [("bench.py", f) for f in sorted(glob.glob("benchmarks/*.py"))]   # bench.py's
    sources = [(s, s) for s in SCRIPTS] + benchmarks
    for script, path in sources:
        tree = ast.parse(open(path).read())
        parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            # an f-string: its text, each {expression} as written
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant)
                               else "{" + ast.unparse(v.value) + "}" for v in node.values)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in parts):
                text = node.value
            else:
                continue
            bad += [f"{script}: {text[:100]!r} names {flag}, not a {where} flag"
                    for where, flag in flags_said(text, script)
                    if flag not in (speaks[script] if where == script else known[where])]
    assert not bad, "\n".join(bad)
    # what each command says on an offline machine without weights (the messages the libraries
    # compose for it)
    tmp, manifest = no_weights, no_weights / "m.jsonl"
    manifest.write_text("{}\n")
    said = {}
    for script, run in [("sample.py", lambda: S.main(["--model", "flux-dev", "--refs", DEMO[0]])),
                        ("train_sft.py", lambda: TS.cli(["--preset", "flux-dev", "--data",
                                                         str(manifest), "--out", str(tmp / "o")])),
                        ("train_rl.py", lambda: RL.cli(["--preset", "flux-dev", "--reward",
                                                        "object", "--data",
                                                        str(manifest), "--out", str(tmp / "o")])),
                        ("cache.py", lambda: cache.main(["--manifest", str(manifest), "--out",
                                                         str(tmp / "c"), "--model", "flux-dev"])),
                        ("rewards.py", lambda: R.main(["eval", "--manifest", str(manifest),
                                                       "--images", str(tmp), "--reward", "human",
                                                       "--face-root", str(tmp)]))]:
        try:
            run()
        except SystemExit:
            pass
        said[script] = capsys.readouterr().err
        assert "error:" in said[script], script
        for where, flag in flags_said(said[script], script):
            assert flag in known[where], (
                f"{script} says {flag}, which {where} does not accept: {said[script]}")
    assert "--ae" in said["cache.py"] and "--t5" in said["train_sft.py"]
    # a resume refused for the global batch says which flag restores it
    with pytest.raises(runs.RunFolderError) as e:
        runs.compare_args({"grad_accum": 1, "lr": 1}, {"grad_accum": 1, "lr": 1}, set(),
                          "grad_accum", 2, 1, "ckpt")
    assert "pass --grad-accum 2" in str(e.value) and ": ," not in str(e.value)
    # a flag added since the checkpoint was saved is the same run while it is off, and refused once
    # it is on
    assert runs.compare_args({"lr": 1, "grad_accum": 1},
                             {"lr": 1, "grad_accum": 1, "ae": None, "fp8": False},
                             set(), "grad_accum", 1, 1, "ckpt") is None
    with pytest.raises(runs.RunFolderError, match=r"--ae \(unset\) -> x\.safetensors"):
        runs.compare_args({"lr": 1, "grad_accum": 1}, {"lr": 1, "grad_accum": 1,
                                                       "ae": "x.safetensors"},
                          set(), "grad_accum", 1, 1, "ckpt")
    # the README's export of a toy adapter: its architecture is read from its tensors
    flux = M.Flux(M.get_config("toy"))
    ML.save_adapter(flux, str(tmp / "a.safetensors"),
                    ML.inject(flux, rank=4, n_experts=1, moe_targets=[]))
    assert export_lora.main([str(tmp / "a.safetensors"), str(
        tmp / "lora.safetensors")]) == 0, (capsys.readouterr().err)

def test_every_command_of_the_readme_and_docs_parses_as_written():
    n = 0
    sources = [(f, open(f).read(), False) for f in DOCS] + \
        [(s, importlib.import_module(s.removesuffix(".py")).__doc__ or "", True) for s in SCRIPTS]
    for where, text, docstring in sources:
        for argv in sh_commands(text, docstring):
            found = script_argv(argv)
            if found is None:
                continue
            script, args = found
            parser = script_parser(script, args[0] if args and not args[0].startswith("-")
                                   else None)
            # toy.py eval hands the rest to its own parser
            if script == "toy.py" and args[:1] == ["eval"]:
                args = args[1:]
            if "ABRIDGED" in args:                      # "...": its flags exist, the rest is elided
                assert (set(a.split("=")[0] for a in args if a.startswith("--"))
                        <= option_strings(parser)), argv
            else:
                try:
                    parser.parse_args(args)
                except SystemExit:
                    pytest.fail(f"{where}: {shlex.join(argv)}")
            for a in args:                                    # what a fresh clone holds is there
                assert not a.startswith("assets/") or os.path.exists(a), f"{where}: {a}"
            n += 1
    assert n >= 40

def test_the_readmes_recipes_hold_out_their_sets_and_name_what_eval_prints():
    text = open("README.md").read()
    outs = {}
    for f in DOCS:
        for argv in sh_commands(open(f).read()):
            found = script_argv(argv)
            if not found:
                continue
            script, args = found
            opt = lambda k: args[args.index(k) + 1] if k in args else None
            name = os.path.basename(os.path.normpath(opt("--out") or ""))
            if script == "toy.py" and args[:1] != ["eval"] and re.search(r"val|test", name):
                assert opt("--split") in ("val", "test"), (
                    f"{f}: {shlex.join(argv)} draws training identities")
            if script == "sample.py" and opt("--out-dir"):
                outs[f] = outs.get(f, set()) | {opt("--out-dir")}
            # a seed folder of a test set
            if script in ("toy.py", "rewards.py") and args[:1] == ["eval"]:
                images = opt("--images")
                assert (re.fullmatch(r".+/\d+", images)
                        and os.path.dirname(images) in outs.get(f, {""})), \
                    f"{f}: {shlex.join(argv)}"
    # the README names the columns and rows `toy.py eval` prints, and no others
    paragraph = text[text.index("`toy.py eval` prints"):].split("\n\n")[0]
    names = {w for w in re.findall(r"`([a-z_-]+)`", paragraph)}
    assert names == set(toy.METRICS) | {"images", *toy.SANITY}, names ^ (set(toy.METRICS) | {
        "images", *toy.SANITY})

def test_shipped_toy_checkpoint_draws_the_demo_subjects(tmp_path):
    """The README's main job: assets/toy through the real loader, the prompt named from the
    references as this world's prompts are (shapes and count only); the same seed gives the same
    bytes, and the world's Multi-ID (rewards.py's Hungarian path) of its samples is far above that
    of the same architecture with random weights."""
    flux, _, _, weights = S.load_models("toy", "toy", torch.device("cpu"))
    assert weights == f"{WT.TOY_DIR} + {os.path.join(WT.TOY_DIR, 'adapter.safetensors')}"
    assert any(isinstance(m, ML.MoELoRALinear) for m in flux.modules())    # stage 1's adapter is on
    assert all(p.dtype == torch.float32 for p in flux.parameters())  # stored fp16, runs fp32 on CPU
    rnd = random_toy(tmp_path / "random")
    refs, multi_id, scores = ([D.load_image(p) for p in DEMO], R.MultiIDReward(toy.WorldSubjects()),
                              {})
    # random weights read nothing: sampled in 4 steps without guidance, they only set the floor
    for name, model in (("shipped", []), ("random", ["--model", str(rnd), "--arch", "toy",
                                                     "--steps", "4", "--ref-guidance", "1"])):
        for seed in range(6):
            main(["--refs", *DEMO, "--seed", str(seed), "--out",
                  str(tmp_path / f"{name}{seed}.png"), *model])
        scores[name] = multi_id([Image.open(tmp_path
                                            / f"{name}{k}.png") for k in range(6)], refs)["score"]
    assert json.loads((tmp_path / "shipped0.json").read_text())["prompt"] == "a circle and a square"
    main(["--refs", *DEMO, "--seed", "0", "--out", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "shipped0.png").read_bytes()
    print(scores)
    assert scores["shipped"].mean() > scores["random"].mean() + 0.4    # measured: 0.85 against 0.23

def test_shipped_checkpoint_follows_references_that_differ_only_in_colour(tmp_path):
    """Prompt and seed fixed, single references that differ only in colour (far pairs: 0.30 mean abs
    RGB), 6 pairs x 3 seeds x 2, at the shipped checkpoint's defaults: the drawn subject takes its
    own reference's colour. Measured (near / medium / far pairs, 4 seeds): 0.98 / 1.00 / 1.00 for
    the shipped checkpoint; 0.46 / 0.52 / 0.50 for the first world's (its prompts named every
    identity), i.e. chance, which random weights also score (asserted below; sampled in 4 steps
    without guidance, which a generator that reads nothing does not need)."""
    (tmp_path / "shipped").mkdir()
    assert follows_own_colour(tmp_path / "shipped", ["--batch-size", "3"], seeds=3) >= 0.9
    (tmp_path / "rnd").mkdir()
    rnd = ["--model", str(random_toy(tmp_path / "random")), "--arch", "toy", "--steps", "4",
           "--ref-guidance", "1"]
    assert 0.3 <= follows_own_colour(tmp_path / "rnd", [*rnd, "--batch-size", "4"]) <= 0.7

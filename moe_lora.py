"""
Adapters for the frozen FLUX DiT: LoRA and MoE-LoRA (MultiCrafter section 4.3).

  LoRALinear     y = W x + (alpha/r) * B A x                       B zero-initialized: a fresh adapter is a no-op
  MoELoRALinear  y = W x + (alpha/r) * sum_e g_e(x) * B_e A_e x    top-k routed experts (paper: 4 experts, top-1)

`inject(model, ...)` wraps Linears by name pattern, `save_adapter`/`load_adapter` keep only the
adapter tensors (safetensors, the adapter config in the header), `load_uno_lora` imports UNO's
released `dit_lora.safetensors`, `merge`/`unmerge` fold plain LoRA into the base weights.

The router gate. The paper writes p = Softmax(TopK(W_g h, k)): for k = 1 that is exactly 1 whatever
the logits, so d p / d W_g = 0 and the router never learns from the task loss (gate="paper" keeps
it, tested). The default gate="st" is straight-through: its forward value is the paper's
(hard routing, weight 1 at k = 1), its backward is that of the selected softmax probability over all
experts, so the router learns. gate="switch" scales each expert by its softmax probability (Switch
Transformer).
"""
import fnmatch
import json
import math
from collections import namedtuple
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import flux2 as F2
import weights as WT

# UNO's layout (bytedance/UNO set_lora): attention in/out projections of both streams, single-block
# q|k|v rows of linear1 and linear2; MultiCrafter's MoE-LoRA replaces it on the FFN output layers.
DEFAULT_LORA = ("double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj",
                "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj",
                "single_blocks.*.linear1")
DEFAULT_MOE = ("double_blocks.*.img_mlp.2", "single_blocks.*.linear2")
UNO_LORA = DEFAULT_LORA + ("single_blocks.*.linear2",)
# FLUX.2 keeps these names (BFL's keys), so the defaults name the same layers there; it has no
# per-block modulation to adapt (one for all double blocks, one for all single blocks), and its
# linear1's rows past q|k|v hold the SwiGLU's two halves (lora_rows leaves them to the base, as in
# FLUX.1)

def autocasting(x):
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)

def as_input(x, weight):
    # under autocast the matmul casts for itself; otherwise bring x to the adapter's (fp32) dtype
    return x if autocasting(x) else x.to(weight.dtype)

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update of its output rows [rows[0], rows[1]) (all rows by
    default)."""
    def __init__(self, base: nn.Linear, rank, alpha=None, rows=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rows = tuple(rows) if rows else (0, base.out_features)
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.scale = self.alpha / rank
        dev = base.weight.device          # meta stays meta (memory budgets without allocating)
        self.down = nn.Linear(base.in_features, rank, bias=False, device=dev)          # A (r, D_in)
        # B (D_out, r)
        self.up = nn.Linear(rank, self.rows[1] - self.rows[0], bias=False, device=dev)
        nn.init.zeros_(self.up.weight)
        self.merged, self.enabled = False, True
        self.strength = 1.0    # set_strength: 0 is the base model exactly, 1 the adapter as trained

    def delta(self, x):
        return self.strength * self.scale * self.up(self.down(as_input(x, self.down.weight)))

    def forward(self, x):
        y = self.base(x)
        # 0 returns the base output untouched
        if self.merged or not self.enabled or self.strength == 0:
            return y
        a, b = self.rows
        d = self.delta(x).to(y.dtype)
        if (a, b) == (0, y.shape[-1]):
            return y + d
        return torch.cat([y[..., :a], y[..., a:b] + d, y[..., b:]], dim=-1)

    @torch.no_grad()
    def merge(self, sign=1.0):
        # W[rows] += scale * B A, computed in fp32 (exact to rounding of the base dtype)
        if self.merged == (sign > 0):
            return
        a, b = self.rows
        W = self.base.weight
        s = sign * self.strength * self.scale
        W[a:b] = (
            (W[a:b].float() + s * (self.up.weight.float() @ self.down.weight.float())).to(W.dtype))
        self.merged = sign > 0

    def unmerge(self):
        self.merge(sign=-1.0)

class MoELoRALinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts, stored stacked (down: E*r x D_in, up: D_out x E*r),
    chosen per token by a router (top-k of a softmax over all experts, in fp32)."""
    def __init__(self, base: nn.Linear, n_experts=4, rank=16, alpha=None, top_k=1, gate="st",
                 dispatch="auto"):
        super().__init__()
        if gate not in ("st", "switch", "paper") or dispatch not in ("auto", "dense", "sparse"):
            raise ValueError("gate must be st/switch/paper and dispatch auto/dense/sparse, "
                             f"got {gate}, {dispatch}")
        self.base = base.requires_grad_(False)
        self.E, self.rank, self.top_k, self.gate, self.dispatch = (
            n_experts, rank, top_k, gate, dispatch)
        self.alpha = float(alpha if alpha is not None else rank)
        self.scale = self.alpha / rank
        dev = base.weight.device          # meta stays meta (memory budgets without allocating)
        self.router = nn.Linear(base.in_features, n_experts, bias=False, device=dev)
        self.down = nn.Linear(base.in_features, n_experts * rank, bias=False, device=dev)
        self.up = nn.Linear(n_experts * rank, base.out_features, bias=False, device=dev)
        nn.init.normal_(self.router.weight, std=0.02)
        for e in range(n_experts):        # each expert's A initialized like its own nn.Linear
            nn.init.kaiming_uniform_(self.down.weight[e * rank:(e + 1) * rank], a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.last_probs = self.last_idx = None           # for the balance loss (losses.py)
        self.enabled, self.strength = True, 1.0          # strength: as LoRALinear's
        # routed tokens per expert
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)

    def route(self, x):
        """probs (..., E) softmax over all experts; weights and expert indices (..., k) of the
        chosen ones."""
        # router logits and softmax in fp32 always: bf16 rounding would flip top-1 choices
        with torch.autocast(x.device.type, enabled=False) if autocasting(x) else nullcontext():
            probs = self.router(x.to(self.router.weight.dtype)).softmax(-1)
        top_p, idx = probs.topk(self.top_k, dim=-1)
        # = Softmax(TopK(logits)): identically 1 when k = 1
        renorm = top_p / top_p.sum(-1, keepdim=True)
        if self.gate == "paper":
            w = renorm
        elif self.gate == "switch":
            w = top_p
        else:                                   # straight-through: forward renorm, backward d top_p
            w = renorm.detach() + top_p - top_p.detach()
        return probs, w, idx

    def forward(self, x):
        y = self.base(x)
        if not self.enabled or self.strength == 0:
            return y
        probs, w, idx = self.route(x)
        self.last_probs, self.last_idx = probs, idx
        with torch.no_grad():
            self.load.scatter_add_(0, idx.flatten(), torch.ones(
                idx.numel(), device=idx.device, dtype=self.load.dtype))
        # meta tensors (memory budgets) have no values to route by: they take the dense path
        sparse = not x.is_meta and (self.dispatch == "sparse" or (
            self.dispatch == "auto" and self.E > self.top_k and self.rank >= 64))
        d = self._sparse(x, w, idx) if sparse else self._dense(x, w, idx)
        return y + (self.strength * self.scale * d).to(y.dtype)

    def _dense(self, x, w, idx):
        # every expert on every token, masked by the gates: 2 GEMMs, cost grows with E
        # (fine for small E*r)
        gates = torch.zeros(*idx.shape[:-1], self.E, device=x.device,
                            dtype=w.dtype).scatter(-1, idx, w)
        # (..., E, r)
        h = self.down(as_input(x, self.down.weight)).unflatten(-1, (self.E, self.rank))
        return self.up((h * gates[..., None].to(h.dtype)).flatten(-2))

    def _sparse(self, x, w, idx):
        # tokens sorted by expert, one (n_e, D_in) x (D_in, r) and (n_e, r) x (r, D_out) GEMM per
        # expert: cost grows with top_k * r, not with E * r. One host sync (the per-expert counts).
        D_in = x.shape[-1]
        xf = as_input(x.reshape(-1, D_in), self.down.weight)                  # (N, D_in)
        e_flat = idx.reshape(-1)                                        # (N*k,) expert of each slot
        order = torch.argsort(e_flat, stable=True)
        tok, w_sorted = order // self.top_k, w.reshape(-1)[order]  # source token, gate of each slot
        counts = torch.bincount(e_flat, minlength=self.E).tolist()
        A = self.down.weight.view(self.E, self.rank, D_in)              # (E, r, D_in)
        B = self.up.weight.view(-1, self.E, self.rank)                  # (D_out, E, r)
        out = xf.new_zeros(xf.shape[0], B.shape[0])                     # (N, D_out)
        for e, (te, we) in enumerate(zip(tok.split(counts), w_sorted.split(counts))):
            if counts[e]:   # the gate scales the rank-r hidden (cheaper than the D_out-wide output)
                h = F.linear(xf[te], A[e]) * we[:, None].to(xf.dtype)   # (n_e, r)
                out.index_add_(0, te, F.linear(h, B[:, e]).to(out.dtype))
        return out.view(*x.shape[:-1], -1)

# -----------------------------------------------------------------------------
# injection by name pattern

def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)

def adapter_config(lora_targets=DEFAULT_LORA, moe_targets=DEFAULT_MOE, rank=16, alpha=None,
                   n_experts=4, top_k=1, gate="st", moe_rank=None, dispatch="auto"):
    """The adapter config (inject()'s keywords, what save_adapter stores), each field checked for
    its kind and range: a config from a file's header fails here, in one line, before anything is
    allocated (ValueError; an unknown field is a TypeError)."""
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
    names = lambda v: isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)
    problems = [f"{k} {v!r} is not a list of name patterns" for k, v in
                (("lora_targets", lora_targets), ("moe_targets", moe_targets)) if not names(v)]
    problems += [f"{k} {v!r} is not a positive integer" for k, v in
                 (("rank", rank), ("n_experts", n_experts), ("top_k", top_k)) if not count(v)]
    if moe_rank is not None and not count(moe_rank):
        problems.append(f"moe_rank {moe_rank!r} is not a positive integer")
    if (alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                   and math.isfinite(alpha))):
        problems.append(f"alpha {alpha!r} is not a finite number")
    if count(top_k) and count(n_experts) and top_k > n_experts:
        problems.append(f"top_k {top_k} is more than n_experts {n_experts}")
    if gate not in ("st", "switch", "paper") or dispatch not in ("auto", "dense", "sparse"):
        problems.append("gate must be st/switch/paper and dispatch auto/dense/sparse, "
                        f"got {gate!r}, {dispatch!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return dict(lora_targets=list(lora_targets), moe_targets=list(moe_targets), rank=rank,
                alpha=alpha,
                n_experts=n_experts, top_k=top_k, gate=gate, moe_rank=moe_rank, dispatch=dispatch)

def plan(model, lora_targets, moe_targets):
    """What inject() wraps, found without allocating anything: [(name, nn.Linear, "moe" | "lora")].
    A moe target wins where both match; a pattern that matches nothing is a ValueError."""
    found, matched = [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        kind = "moe" if any(fnmatch.fnmatchcase(name, p) for p in moe_targets) else \
            "lora" if any(fnmatch.fnmatchcase(name, p) for p in lora_targets) else None
        if kind:
            found.append((name, mod, kind))
            matched.update(p for p in (*moe_targets, *lora_targets) if fnmatch.fnmatchcase(name, p))
    unused = [p for p in (*lora_targets, *moe_targets) if p not in matched]
    if unused:
        raise ValueError(f"adapter target patterns match no nn.Linear: {unused}")
    return found

def lora_rows(name, mod):
    # a LoRA on a single block's linear1 adapts only its q|k|v rows, as UNO's does (None: all rows)
    return ((0, 3 * mod.in_features) if name.startswith("single_blocks.")
            and name.endswith(".linear1") else None)

Planned = namedtuple("Planned", "shape dtype")    # a tensor not allocated, for weights.match_state

def adapter_shapes(model, lora_targets, moe_targets, rank, n_experts, moe_rank, **_):
    """{key: shape} of the tensors inject() with this config would create (adapter_state_dict's
    keys), computed from the model's Linears alone: a file's tensors are checked against it before
    anything is allocated."""
    out = {}
    for name, mod, kind in plan(model, lora_targets, moe_targets):
        if kind == "moe":
            er = n_experts * (moe_rank or rank)
            out.update({f"{name}.router.weight": (n_experts, mod.in_features),
                        f"{name}.down.weight": (er, mod.in_features),
                        f"{name}.up.weight": (mod.out_features, er)})
        else:
            a, b = lora_rows(name, mod) or (0, mod.out_features)
            out.update({f"{name}.down.weight": (rank, mod.in_features),
                        f"{name}.up.weight": (b - a, rank)})
    return out

def inject(model, **cfg):
    """Freeze `model` and wrap every nn.Linear whose name matches a pattern (fnmatch, e.g.
    "double_blocks.*.img_attn.qkv"): MoE-LoRA where a moe target matches, plain LoRA where a lora
    target does. cfg: adapter_config's keywords (rank, n_experts, ...). Returns the full adapter
    config (what save_adapter stores and load_adapter replays)."""
    cfg = adapter_config(**cfg)
    model.requires_grad_(False)
    rank = cfg["rank"]
    for name, mod, kind in plan(model, cfg["lora_targets"], cfg["moe_targets"]):
        _replace(model, name, MoELoRALinear(mod, cfg["n_experts"], cfg["moe_rank"] or rank,
                                            cfg["alpha"],
                                            cfg["top_k"], cfg["gate"], cfg["dispatch"])
                 if kind == "moe" else LoRALinear(mod, rank, cfg["alpha"], lora_rows(name, mod)))
    return cfg

def adapters(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, MoELoRALinear))]

def adapter_state_dict(model):
    # only the adapter tensors (router, down, up); the frozen base stays in the official file
    return {f"{n}.{k}": v for n, m in adapters(model) for k, v in m.state_dict().items()
            if not k.startswith("base.")}

def merge(model):
    for _, m in adapters(model):
        if isinstance(m, MoELoRALinear):
            raise ValueError("MoE-LoRA routes per token and cannot be merged into the base weights")
        m.merge()

def unmerge(model):
    for _, m in adapters(model):
        m.unmerge()

@contextmanager
def disabled(model):
    """Run `model` as its frozen base (every adapter a no-op): the reference policy of the RL KL
    term."""
    mods = [m for _, m in adapters(model)]
    if any(getattr(m, "merged", False) for m in mods):
        raise ValueError(
            "unmerge the LoRA before disabling it: a merged LoRA is inside the base weights")
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True

def set_strength(model, s):
    """Every adapter's update times s (a LoRA weight, as UNO's lora_weight and diffusers'
    set_adapters give): y = W x + s * (alpha/r) * B A x. 0 gives the frozen base exactly, 1 the
    adapter as trained. MoE-LoRA routes as before and scales its experts' sum. Not on a merged LoRA:
    its update is inside the base weights."""
    for name, m in adapters(model):
        if getattr(m, "merged", False):
            raise ValueError(f"{name}: unmerge the LoRA before changing its strength")
        m.strength = float(s)

def adapter_file(model, cfg, extra_meta=None):
    """What an adapter file holds -> (its tensors on the CPU, its header: the config and
    extra_meta). An FSDP-sharded model's tensors are gathered whole (weights.whole: every rank calls
    this)."""
    sd = {k: WT.whole(v).detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    return sd, {"multicrafter_adapter": json.dumps(cfg), **(extra_meta or {})}

def save_adapter(model, path, cfg, extra_meta=None):
    """Adapter tensors + config (in the safetensors header) written atomically: tmp file, then
    rename."""
    sd, meta = adapter_file(model, cfg, extra_meta)
    WT.save_safetensors(sd, path, meta)

def read_adapter(path):
    """(header metadata, tensors) of a safetensors file; anything else (a pickle, a torn or
    truncated file) is one CheckpointError, and nothing is ever unpickled."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise WT.unreadable(path, e) from None

def configure(model, path, sd, **cfg):
    """inject() for a file's adapter config, once every field is checked against the file's tensors
    sd: their keys and shapes must be those the config would create (adapter_shapes), so a header
    cannot make us allocate more than the file holds. A config another model or version wrote is the
    file's fault: one CheckpointError."""
    try:
        cfg = adapter_config(**cfg)                          # an unknown field: TypeError
        want = adapter_shapes(model, **cfg)
    except (TypeError, ValueError) as e:
        raise WT.CheckpointError(f"{path}: its adapter config does "
                                 f"not fit this model ({e})") from None
    WT.match_state(path, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()},
                   {k: Planned(shape, torch.float32) for k, shape in want.items()},
                   "the adapters its config describes")
    return inject(model, **cfg)

def load_adapter(model, path):
    """Inject the adapters described in `path`'s header into `model`, then load their tensors
    strictly."""
    meta, sd = read_adapter(path)
    if "multicrafter_adapter" not in meta:
        if not any(".processor." in k for k in sd):
            raise WT.CheckpointError(
                f"{path}: neither a multicrafter adapter nor a UNO dit_lora file")
        return load_uno_lora(model, path, sd)
    try:
        cfg = json.loads(meta["multicrafter_adapter"])
    except (ValueError, RecursionError):              # not JSON, or JSON that json cannot read back
        cfg = None
    if not isinstance(cfg, dict):
        raise WT.CheckpointError(f"{path}: the adapter config in its header is not a JSON object")
    configure(model, path, sd, **cfg)
    load_strict(model, sd, path)
    return cfg

def load_strict(model, sd, path):
    """Copy sd into the model's adapters: every key and shape must match (weights.match_state);
    floats are cast."""
    want = adapter_state_dict(model)
    stored = WT.match_state(path, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, want,
                            "the model's adapters")
    WT.note_cast(path, stored, next(iter(want.values())).dtype)
    with torch.no_grad():
        for k, v in sd.items():
            # FSDP: this rank's shard of the file's tensor
            want[k].copy_(WT.placed_like(want[k], v))

# UNO processor names -> the Linear they adapt (bytedance/UNO uno/flux/modules/layers.py)
UNO_NAMES = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
             "qkv_lora2": "txt_attn.qkv",
             "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}

def load_uno_lora(model, path, sd=None):
    """UNO's released dit_lora.safetensors (keys
    `double_blocks.{i}.processor.qkv_lora1.down.weight`, ..., rank 512, scale 1): plain LoRAs on the
    blocks it names, loaded strictly. sd: its tensors, if already read."""
    sd = read_adapter(path)[1] if sd is None else sd
    ours = {}
    for k, v in sd.items():
        parts = k.split(".")        # double_blocks, i, processor, qkv_lora1, down|up, weight
        if len(parts) != 6 or parts[2] != "processor" or parts[3] not in UNO_NAMES:
            raise WT.CheckpointError(f"{path}: unexpected key {k} for a UNO LoRA")
        ours[f"{parts[0]}.{parts[1]}.{UNO_NAMES[parts[3]]}.{parts[4]}.{parts[5]}"] = v
    targets = sorted({k.rsplit(".", 2)[0] for k in ours})
    ranks = [next(iter(v.shape), 0) for k, v in ours.items() if k.endswith("down.weight")]
    if not ranks:
        raise WT.CheckpointError(f"{path}: a UNO LoRA without any down.weight")
    # the rank is read off the first down.weight; configure checks every tensor against it
    cfg = configure(model, path, ours, lora_targets=targets, moe_targets=[], rank=ranks[0],
                    alpha=ranks[0])
    load_strict(model, ours, path)
    return cfg

# -----------------------------------------------------------------------------
# export to diffusers: the PEFT FLUX LoRA layout (FluxPipeline.load_lora_weights,
# FluxTransformer2DModel.load_lora_adapter; FLUX.2's tables, for Flux2Transformer2DModel, are in
# flux2.py)

# our Linear (inside block i) -> diffusers' Linears it becomes, each with the rows of ours it takes
# (in units of the hidden size D; "mlp" = the single block's MLP rows of linear1, from 3D to the
# end)
DIFFUSERS_DOUBLE = {"img_attn.qkv": [("attn.to_q", 0), ("attn.to_k", 1), ("attn.to_v", 2)],
                    "txt_attn.qkv": [("attn.add_q_proj", 0), ("attn.add_k_proj", 1),
                                     ("attn.add_v_proj", 2)],
                    "img_attn.proj": [("attn.to_out.0", None)],
                    "txt_attn.proj": [("attn.to_add_out", None)],
                    "img_mlp.0": [("ff.net.0.proj", None)], "img_mlp.2": [("ff.net.2", None)],
                    "txt_mlp.0": [("ff_context.net.0.proj", None)],
                    "txt_mlp.2": [("ff_context.net.2", None)],
                    "img_mod.lin": [("norm1.linear", None)],
                    "txt_mod.lin": [("norm1_context.linear", None)]}
DIFFUSERS_SINGLE = {"linear1": [("attn.to_q", 0), ("attn.to_k", 1), ("attn.to_v", 2),
                                ("proj_mlp", "mlp")],
                    "linear2": [("proj_out", None)], "modulation.lin": [("norm.linear", None)]}

def _diffusers_targets(name, cfg):
    # "double_blocks.3.img_attn.qkv" -> ("transformer_blocks.3", its entries); None where diffusers
    # has no such layer
    kind, i, rest = (name.split(".", 2) + ["", ""])[:3]
    double, single = (F2.DIFFUSERS_DOUBLE, F2.DIFFUSERS_SINGLE) if F2.is_flux2(cfg) else \
        (DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE)
    table = {"double_blocks": ("transformer_blocks", double),
             "single_blocks": ("single_transformer_blocks", single)}.get(kind)
    if table is None or rest not in table[1]:
        return None
    return f"{table[0]}.{i}", table[1][rest]

def moe_as_lora(m):
    """A documented approximation of a MoE-LoRA as one plain LoRA of rank E*r: sum_e p_e B_e A_e,
    the routed update averaged over tokens, p_e = the share of tokens routed to expert e since the
    adapter was built or loaded (uniform when none was). Exact only where the router sends every
    token to the same experts. -> (A (E*r, D_in), B (D_out, E*r) with the scale and p folded in)."""
    p = (m.load / m.load.sum() if m.load.sum() > 0
         else torch.full((m.E,), 1.0 / m.E, device=m.load.device))
    per_col = p.repeat_interleave(m.rank)                 # (E*r,) expert e's share on its r columns
    return m.down.weight.float(), m.scale * m.up.weight.float() * per_col[None]

def export_diffusers(model, path=None, moe="refuse", prefix="transformer"):
    """The model's plain LoRAs as a diffusers/PEFT FLUX (or FLUX.2) LoRA state dict
    ({prefix}.{diffusers layer}.lora_A/B.weight): the scale alpha/r folded into lora_B, a fused
    q|k|v LoRA split into to_q/to_k/to_v sharing lora_A (exact).
    MoE-LoRA routes per token and has no diffusers equivalent: moe="refuse" raises, naming the
    layers; "skip" leaves them out, and the file's header lists them (nothing dropped unsaid);
    "mean" exports moe_as_lora's approximation. path: also write it as safetensors (atomically). ->
    (state dict, names of the skipped MoE-LoRA layers)."""
    if moe not in ("refuse", "skip", "mean"):
        raise ValueError(f"moe must be refuse/skip/mean, got {moe!r}")
    moes = [n for n, m in adapters(model) if isinstance(m, MoELoRALinear)]
    if moes and moe == "refuse":
        raise ValueError(f"{len(moes)} MoE-LoRA layers have no diffusers equivalent "
                         f"({', '.join(moes[:3])}{' ...' if len(moes) > 3 else ''}): export with "
                         f"moe='skip' (--moe skip: left out, listed in the file) or moe='mean' "
                         f"(--moe mean: the routing-averaged LoRA, an approximation)")
    D, sd = model.cfg.hidden_size, {}
    for name, m in adapters(model):
        if isinstance(m, MoELoRALinear):
            if moe == "skip":
                continue
            A, B, rows = *moe_as_lora(m), (0, m.base.out_features)
        else:
            A, B, rows = m.down.weight.float(), m.scale * m.up.weight.float(), m.rows
        where = _diffusers_targets(name, model.cfg)
        if where is None:
            raise ValueError(f"{name}: no diffusers FLUX layer to export this adapter to")
        block, entries = where
        for target, part in entries:      # part: which D-row slice of ours this diffusers layer is
            lo, hi = ((0, m.base.out_features) if part is None else (3 * D, m.base.out_features)
                      if part == "mlp" else (part * D, (part + 1) * D))
            a, b = max(lo, rows[0]), min(hi, rows[1])
            if a >= b:       # the LoRA does not reach these rows (a single block's q|k|v-only LoRA)
                continue
            key = f"{prefix}.{block}.{target}"
            sd[f"{key}.lora_A.weight"] = A.clone()                 # a copy each: q, k, v share ours
            # (rows of target, r): zero where our LoRA does not reach (FLUX.2's fused linear1: its
            # MLP rows), exact
            sd[f"{key}.lora_B.weight"] = F.pad(B[a - rows[0]:b - rows[0]], (0, 0, a - lo, hi - b))
    skipped = moes if moe == "skip" else []
    if path is not None:
        WT.save_safetensors(sd, path, {"format": "pt",
                                       "multicrafter_skipped_moe": json.dumps(skipped),
                                       "multicrafter_moe_export": moe if moes else "none"})
    return sd, skipped

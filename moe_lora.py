"""
Adapters for the frozen FLUX DiT: LoRA and MoE-LoRA (MultiCrafter section 4.3).

  LoRALinear     y = W x + (alpha/r) * B A x                       B zero-initialized: a fresh adapter is a no-op
  MoELoRALinear  y = W x + (alpha/r) * sum_e g_e(x) * B_e A_e x    top-k routed experts (paper: 4 experts, top-1)

`inject(model, ...)` wraps Linears by name pattern, `save_adapter`/`load_adapter` keep only the adapter
tensors (safetensors, the adapter config in the header), `load_uno_lora` imports UNO's released
`dit_lora.safetensors`, `merge`/`unmerge` fold plain LoRA into the base weights.

The router gate. The paper writes p = Softmax(TopK(W_g h, k)): for k = 1 that is exactly 1 whatever the
logits, so d p / d W_g = 0 and the router never learns from the task loss (gate="paper" keeps it, tested).
The default gate="st" is straight-through: its forward value is the paper's (hard routing, weight 1 at
k = 1), its backward is that of the selected softmax probability over all experts, so the router learns.
gate="switch" scales each expert by its softmax probability (Switch Transformer).
"""
import fnmatch
import json
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M

# UNO's layout (bytedance/UNO set_lora): attention in/out projections of both streams, single-block
# q|k|v rows of linear1 and linear2; MultiCrafter's MoE-LoRA replaces it on the FFN output layers.
DEFAULT_LORA = ("double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj",
                "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj", "single_blocks.*.linear1")
DEFAULT_MOE = ("double_blocks.*.img_mlp.2", "single_blocks.*.linear2")
UNO_LORA = DEFAULT_LORA + ("single_blocks.*.linear2",)

def autocasting(x):
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)

def as_input(x, weight):
    # under autocast the matmul casts for itself; otherwise bring x to the adapter's (fp32) dtype
    return x if autocasting(x) else x.to(weight.dtype)

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update of its output rows [rows[0], rows[1]) (all rows by default)."""
    def __init__(self, base: nn.Linear, rank, alpha=None, rows=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rows = tuple(rows) if rows else (0, base.out_features)
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.scale = self.alpha / rank
        dev = base.weight.device          # meta stays meta (memory budgets without allocating)
        self.down = nn.Linear(base.in_features, rank, bias=False, device=dev)           # A (r, D_in)
        self.up = nn.Linear(rank, self.rows[1] - self.rows[0], bias=False, device=dev)  # B (D_out, r)
        nn.init.zeros_(self.up.weight)
        self.merged, self.enabled = False, True

    def delta(self, x):
        return self.scale * self.up(self.down(as_input(x, self.down.weight)))

    def forward(self, x):
        y = self.base(x)
        if self.merged or not self.enabled:
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
        W[a:b] = (W[a:b].float() + sign * self.scale * (self.up.weight.float() @ self.down.weight.float())).to(W.dtype)
        self.merged = sign > 0

    def unmerge(self):
        self.merge(sign=-1.0)

class MoELoRALinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts, stored stacked (down: E*r x D_in, up: D_out x E*r),
    chosen per token by a router (top-k of a softmax over all experts, in fp32)."""
    def __init__(self, base: nn.Linear, n_experts=4, rank=16, alpha=None, top_k=1, gate="st", dispatch="auto"):
        super().__init__()
        if gate not in ("st", "switch", "paper") or dispatch not in ("auto", "dense", "sparse"):
            raise ValueError(f"gate must be st/switch/paper and dispatch auto/dense/sparse, got {gate}, {dispatch}")
        self.base = base.requires_grad_(False)
        self.E, self.rank, self.top_k, self.gate, self.dispatch = n_experts, rank, top_k, gate, dispatch
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
        self.enabled = True
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)   # routed tokens per expert

    def route(self, x):
        """probs (..., E) softmax over all experts; weights and expert indices (..., k) of the chosen ones."""
        # router logits and softmax in fp32 always: bf16 rounding would flip top-1 choices
        with torch.autocast(x.device.type, enabled=False) if autocasting(x) else nullcontext():
            probs = self.router(x.to(self.router.weight.dtype)).softmax(-1)
        top_p, idx = probs.topk(self.top_k, dim=-1)
        renorm = top_p / top_p.sum(-1, keepdim=True)     # = Softmax(TopK(logits)): identically 1 when k = 1
        if self.gate == "paper":
            w = renorm
        elif self.gate == "switch":
            w = top_p
        else:                                            # straight-through: forward renorm, backward d top_p
            w = renorm.detach() + top_p - top_p.detach()
        return probs, w, idx

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        probs, w, idx = self.route(x)
        self.last_probs, self.last_idx = probs, idx
        with torch.no_grad():
            self.load.scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), device=idx.device, dtype=self.load.dtype))
        # meta tensors (memory budgets) have no values to route by: they take the dense path
        sparse = not x.is_meta and (self.dispatch == "sparse" or (self.dispatch == "auto" and self.E > self.top_k
                                                                   and self.rank >= 64))
        d = self._sparse(x, w, idx) if sparse else self._dense(x, w, idx)
        return y + (self.scale * d).to(y.dtype)

    def _dense(self, x, w, idx):
        # every expert on every token, masked by the gates: 2 GEMMs, cost grows with E (fine for small E*r)
        gates = torch.zeros(*idx.shape[:-1], self.E, device=x.device, dtype=w.dtype).scatter(-1, idx, w)
        h = self.down(as_input(x, self.down.weight)).unflatten(-1, (self.E, self.rank))    # (..., E, r)
        return self.up((h * gates[..., None].to(h.dtype)).flatten(-2))

    def _sparse(self, x, w, idx):
        # tokens sorted by expert, one (n_e, D_in) x (D_in, r) and (n_e, r) x (r, D_out) GEMM per expert:
        # cost grows with top_k * r, not with E * r. One host sync (the per-expert counts).
        D_in = x.shape[-1]
        xf = as_input(x.reshape(-1, D_in), self.down.weight)                  # (N, D_in)
        e_flat = idx.reshape(-1)                                               # (N*k,) expert of each slot
        order = torch.argsort(e_flat, stable=True)
        tok, w_sorted = order // self.top_k, w.reshape(-1)[order]              # source token, gate of each slot
        counts = torch.bincount(e_flat, minlength=self.E).tolist()
        A = self.down.weight.view(self.E, self.rank, D_in)                     # (E, r, D_in)
        B = self.up.weight.view(-1, self.E, self.rank)                         # (D_out, E, r)
        out = xf.new_zeros(xf.shape[0], B.shape[0])                            # (N, D_out)
        for e, (te, we) in enumerate(zip(tok.split(counts), w_sorted.split(counts))):
            if counts[e]:   # the gate scales the rank-r hidden (cheaper than the D_out-wide output)
                h = F.linear(xf[te], A[e]) * we[:, None].to(xf.dtype)          # (n_e, r)
                out.index_add_(0, te, F.linear(h, B[:, e]).to(out.dtype))
        return out.view(*x.shape[:-1], -1)

# -----------------------------------------------------------------------------
# injection by name pattern

def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)

def inject(model, lora_targets=DEFAULT_LORA, moe_targets=DEFAULT_MOE, rank=16, alpha=None, n_experts=4,
           top_k=1, gate="st", moe_rank=None, dispatch="auto"):
    """Freeze `model` and wrap every nn.Linear whose name matches a pattern (fnmatch, e.g.
    "double_blocks.*.img_attn.qkv"): MoE-LoRA where a moe target matches, plain LoRA where a lora target
    does. A LoRA on a single block's linear1 adapts only its q|k|v rows, as UNO's does.
    Returns the adapter config (what save_adapter stores and load_adapter replays)."""
    cfg = dict(lora_targets=list(lora_targets), moe_targets=list(moe_targets), rank=rank, alpha=alpha,
               n_experts=n_experts, top_k=top_k, gate=gate, moe_rank=moe_rank, dispatch=dispatch)
    model.requires_grad_(False)
    matched = set()
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in moe_targets):
            _replace(model, name, MoELoRALinear(mod, n_experts, moe_rank or rank, alpha, top_k, gate, dispatch))
        elif any(fnmatch.fnmatchcase(name, p) for p in lora_targets):
            rows = (0, 3 * mod.in_features) if name.startswith("single_blocks.") and name.endswith(".linear1") else None
            _replace(model, name, LoRALinear(mod, rank, alpha, rows))
        else:
            continue
        matched.update(p for p in (*moe_targets, *lora_targets) if fnmatch.fnmatchcase(name, p))
    unused = [p for p in (*lora_targets, *moe_targets) if p not in matched]
    if unused:
        raise ValueError(f"adapter target patterns match no nn.Linear: {unused}")
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
    """Run `model` as its frozen base (every adapter a no-op): the reference policy of the RL KL term."""
    mods = [m for _, m in adapters(model)]
    if any(getattr(m, "merged", False) for m in mods):
        raise ValueError("unmerge the LoRA before disabling it: a merged LoRA is inside the base weights")
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True

def adapter_file(model, cfg, extra_meta=None):
    """What an adapter file holds -> (its tensors on the CPU, its header: the config and extra_meta)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    return sd, {"multicrafter_adapter": json.dumps(cfg), **(extra_meta or {})}

def save_adapter(model, path, cfg, extra_meta=None):
    """Adapter tensors + config (in the safetensors header) written atomically: tmp file, then rename."""
    from safetensors.torch import save_file
    sd, meta = adapter_file(model, cfg, extra_meta)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)

def read_adapter(path):
    """(header metadata, tensors) of a safetensors file; anything else (a pickle, a torn or truncated file) is one
    CheckpointError, and nothing is ever unpickled."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise M.unreadable(path, e) from None

def configure(model, path, **cfg):
    # inject() for a file's adapter config; a config another model or version wrote is the file's fault
    try:
        return inject(model, **cfg)
    except (TypeError, ValueError) as e:
        raise M.CheckpointError(f"{path}: its adapter config does not fit this model ({e})") from None

def load_adapter(model, path):
    """Inject the adapters described in `path`'s header into `model`, then load their tensors strictly."""
    meta, sd = read_adapter(path)
    if "multicrafter_adapter" not in meta:
        if not any(".processor." in k for k in sd):
            raise M.CheckpointError(f"{path}: neither a multicrafter adapter nor a UNO dit_lora file")
        return load_uno_lora(model, path, sd)
    try:
        cfg = json.loads(meta["multicrafter_adapter"])
    except ValueError:
        cfg = None
    if not isinstance(cfg, dict):
        raise M.CheckpointError(f"{path}: the adapter config in its header is not a JSON object")
    configure(model, path, **cfg)
    load_strict(model, sd, path)
    return cfg

def load_strict(model, sd, path):
    """Copy sd into the model's adapters: every key and shape must match (model.match_state); floats are cast."""
    want = adapter_state_dict(model)
    stored = M.match_state(path, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, want, "the model's adapters")
    M.note_cast(path, stored, next(iter(want.values())).dtype)
    with torch.no_grad():
        for k, v in sd.items():
            want[k].copy_(v)

# UNO processor names -> the Linear they adapt (bytedance/UNO uno/flux/modules/layers.py)
UNO_NAMES = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
             "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}

def load_uno_lora(model, path, sd=None):
    """UNO's released dit_lora.safetensors (keys `double_blocks.{i}.processor.qkv_lora1.down.weight`, ...,
    rank 512, scale 1): plain LoRAs on the blocks it names, loaded strictly. sd: its tensors, if already read."""
    sd = read_adapter(path)[1] if sd is None else sd
    ours = {}
    for k, v in sd.items():
        parts = k.split(".")        # double_blocks, i, processor, qkv_lora1, down|up, weight
        if len(parts) != 6 or parts[2] != "processor" or parts[3] not in UNO_NAMES:
            raise M.CheckpointError(f"{path}: unexpected key {k} for a UNO LoRA")
        ours[f"{parts[0]}.{parts[1]}.{UNO_NAMES[parts[3]]}.{parts[4]}.{parts[5]}"] = v
    targets = sorted({k.rsplit(".", 2)[0] for k in ours})
    ranks = [v.shape[0] for k, v in ours.items() if k.endswith("down.weight")]
    if not ranks:
        raise M.CheckpointError(f"{path}: a UNO LoRA without any down.weight")
    cfg = configure(model, path, lora_targets=targets, moe_targets=[], rank=ranks[0], alpha=ranks[0])
    load_strict(model, ours, path)
    return cfg

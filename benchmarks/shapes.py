"""
A DiT of either family (FLUX.1, FLUX.2) at a preset's shapes with random weights, and the random
inputs of one forward: what the memory budgets, the GPU checks and the K/V speed-up run, nothing
downloaded.
"""
import torch

import flux2 as F2

def random_dit(cfg, device, dtype, seed):
    """cfg's DiT with random weights, made in place on device in dtype (flux-dev: 24 GB of bf16,
    never an fp32 copy): weights N(0, 0.02), biases N(0, 0.1), RMSNorm scales around 1."""
    with torch.device("meta"):
        flux = F2.dit(cfg).to(dtype)
    flux = flux.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in flux.named_parameters():
            p.normal_(0, 0.02 if p.ndim > 1 else 0.1, generator=g)
            if name.endswith(".scale"):
                p.add_(1)
    return flux.eval()

def dit_inputs(cfg, size, ref_size, n_refs, batch=1, device="cpu", dtype=torch.float32, seed=0):
    """The keyword arguments of one forward of cfg's DiT: a size px square target, n_refs square
    references of ref_size px at the family's own reference positions, cfg.max_txt_len text tokens,
    t and the preset's guidance. Values random in dtype, position ids in fp32, all on device (the
    meta device: shapes only)."""
    fam, g = F2.family(cfg), torch.Generator().manual_seed(seed)
    G, R = size // cfg.token_px, ref_size // cfg.token_px                   # token grid sides
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    txt = rnd(batch, cfg.max_txt_len, cfg.context_in_dim)
    return dict(img=rnd(batch, G * G, cfg.in_channels),
                img_ids=fam.grid_ids(G, G, batch=batch, device=device),
                txt=txt, txt_ids=fam.text_ids(txt), y=rnd(batch, cfg.vec_in_dim),
                timesteps=torch.rand(batch, generator=g).to(device, dtype),
                guidance=torch.full((batch,), cfg.guidance).to(device, dtype),
                ref_img=[rnd(batch, R * R, cfg.in_channels) for _ in range(n_refs)],
                ref_img_ids=fam.ref_ids((G, G), [(R, R)] * n_refs, F2.default_pe(cfg), batch,
                                        device))

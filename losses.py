"""
Training objectives.

  L_diff   flow matching (rectified flow): x_t = (1 - t) x0 + t eps, predict v = eps - x0
  L_attn   MultiCrafter Eq. 5: Dice between each subject's attention map and its mask, summed over
           subjects
  SCAL     MOSAIC: each correspondence's target token should be where its reference token attends
  MDL      MOSAIC: the references' attention distributions should differ (negative symmetric KL or
           JS)
  balance  Switch Transformer load balance for MoE routers: E * sum_e f_e P_e (1 at uniform routing)
  GSPO     MultiCrafter Eq. 7-8 (IPPO): a clipped sequence-level ratio over the window's denoising
           steps, with group-normalized advantages (Eq. 3)

The attention inputs come from model.AttentionProbe: `maps` (B, N, M) are distributions over the M
target tokens (rows sum to 1), `logps` per reference (P_i, M) log-probabilities of selected
reference rows.
"""

import torch

from model import fp32
from sampling import get_lin_function, time_shift

def sample_timesteps(batch, image_seq_len, shift=True, generator=None, device="cpu", mu=None):
    """Logit-normal t (sigmoid of a standard normal: most samples mid-way, few at the ends;
    SD3/FLUX), pushed through the same resolution-dependent shift as the sampling schedule, so
    training sees the noise levels sampling visits. shift=False for schnell-like models. mu: the
    shift's (default FLUX.1's, linear in image_seq_len; FLUX.2's: flux2.train_mu)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator)).to(device)
    if shift:
        t = time_shift(get_lin_function()(image_seq_len) if mu is None else mu, 1.0, t)
    return t

def flow_matching_loss(model_fn, x0, t, noise):
    """x0, noise (B, L, C) packed latents; t (B,). model_fn(x_t, t) -> predicted velocity
    (B, L, C)."""
    tb = t.to(x0.dtype)[:, None, None]
    x_t = (1 - tb) * x0 + tb * noise
    pred = model_fn(x_t, t)
    return (pred.float() - (noise - x0).float()).pow(2).mean()

def dice_loss(maps, masks, valid=None, eps=1.0):
    """MultiCrafter Eq. 5. maps (B, N, M): each subject's attention distribution over the M target
    tokens; masks (B, N, M) in [0, 1]: the share of each token inside the subject's mask; valid
    (B, N) marks real (not padded) subjects. Each map is divided by its maximum, so it lives on the
    mask's scale: a map uniform on the mask and zero elsewhere scores 0. (A sum-to-one map could not
    score below 1 - 2/(1 + |mask|).) Returns the sum over subjects, averaged over the batch: in
    [0, N]."""
    m_hat = maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    inter = (m_hat * masks).sum(-1)                                                   # (B, N)
    dice = 1 - (2 * inter + eps) / (m_hat.sum(-1) + masks.sum(-1) + eps)             # (B, N)
    if valid is not None:
        dice = dice * valid
    return dice.sum(1).mean()

def scal_loss(logps, targets):
    """MOSAIC's semantic-correspondence alignment loss. logps: per reference (P_i, M) head- and
    block-averaged log-probabilities of the correspondence rows (AttentionProbe.mean_logp); targets:
    per reference (P_i,) the target token each row should attend to. Mean negative log-likelihood
    over all points, in log space (finite where a probability underflows), one gather for all
    points."""
    lp, tg = torch.cat(list(logps)), torch.cat(list(targets)).to(logps[0].device)    # (P, M), (P,)
    if lp.shape[0] == 0:
        return lp.sum() * 0                                               # no points: 0, graph kept
    return -lp.gather(1, tg[:, None].long()).mean()

def mdl_loss(maps, valid=None, kind="kl", eps=1e-8):
    """MOSAIC's multi-reference disentanglement loss: minus the mean pairwise divergence between the
    references' attention distributions maps (B, N, M). kind "kl": symmetric KL(p||q) + KL(q||p);
    "js": Jensen-Shannon (bounded by log 2). 0 for identical maps; fewer than 2 references give
    0."""
    B, N, _ = maps.shape
    if valid is None:
        valid = torch.ones(B, N, device=maps.device)
    p = fp32(maps).clamp_min(eps)
    i, j = torch.triu_indices(N, N, offset=1, device=maps.device)          # all pairs i < j
    pi, pj = p[:, i], p[:, j]                                              # (B, pairs, M)
    if kind == "kl":
        d = ((pi - pj) * (pi.log() - pj.log())).sum(-1)                    # KL(pi||pj) + KL(pj||pi)
    elif kind == "js":
        m = (pi + pj) / 2
        d = 0.5 * ((pi * (pi / m).log()).sum(-1) + (pj * (pj / m).log()).sum(-1))
    else:
        raise ValueError(f"mdl kind must be kl or js, got {kind!r}")
    w = (valid[:, i] * valid[:, j]).float()                                # pairs of real refs
    return -(d * w).sum() / w.sum().clamp_min(1)

def balance_loss(probs, idx, n_experts, mask=None):
    """Switch load balance E * sum_e f_e * P_e. probs (..., E) router softmax, idx (..., k) chosen
    experts, mask (...) bool: which tokens count (e.g. target-image tokens). f_e, the share of
    routed slots, carries no gradient; P_e, the mean probability, does. 1 at uniform routing, up to
    E when all go to one expert."""
    if mask is not None:
        probs, idx = probs[mask], idx[mask]
    probs, idx = fp32(probs.reshape(-1, n_experts)), idx.reshape(-1)
    f = torch.bincount(idx, minlength=n_experts).float() / max(idx.numel(), 1)
    return n_experts * (f * probs.mean(0)).sum()

def mosaic_warmup(step, start=10_000, ramp=1_000):
    # MOSAIC's MDL weight: 0 until `start`, then linear to 1 over `ramp` steps
    return min(max((step - start) / ramp, 0.0), 1.0) if ramp > 0 else float(step >= start)

def group_advantages(rewards, eps=1e-4, clip=5.0):
    """Eq. 3 per group: rewards (P, G) for P prompts x G samples -> (R - mean) / (std + eps),
    clamped to +-clip (MixGRPO: 5). A group whose samples all score alike gets zero advantages, not
    a division by 0."""
    r = fp32(rewards)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True,
                                                   unbiased=False) + eps)).clamp(-clip, clip)

def gspo_loss(logp, old_logp, adv, eps_low=3e-4, eps_high=4e-4):
    """MultiCrafter Eq. 7-8. logp, old_logp (B, w): per trajectory the log-probabilities of its w
    window steps under pi_theta (with grad) and under pi_old (recorded in the rollout); adv (B,).
      s_i = exp(mean_t [log pi_theta - log pi_old])                        (Eq. 7, the geometric-mean ratio)
      L   = -mean_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)  (Eq. 8, maximized as -L)
    Where min() takes the clipped branch the gradient is zero: for A > 0 once s > 1 + eps_high, for
    A < 0 once s < 1 - eps_low. Returns (loss, s (B,) detached, clipped (B,) bool: trajectories
    whose gradient was cut)."""
    s = torch.exp((fp32(logp) - fp32(old_logp)).mean(1))                             # (B,)
    adv = fp32(adv)
    surrogate = torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv)
    clipped = ((adv > 0) & (s > 1 + eps_high)) | ((adv < 0) & (s < 1 - eps_low))
    return -surrogate.mean(), s.detach(), clipped

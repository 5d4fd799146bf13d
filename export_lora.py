"""
Export a trained adapter (train_sft.py / train_rl.py's adapter.safetensors) to the diffusers/PEFT
FLUX LoRA layout, so that diffusers loads it: FluxPipeline.load_lora_weights(FILE) or
FluxTransformer2DModel.load_lora_adapter(FILE) (--arch klein-base-4b and the other FLUX.2 presets:
Flux2KleinPipeline / Flux2Transformer2DModel's layout).

    python export_lora.py runs/multi/latest/adapter.safetensors out/lora_diffusers.safetensors    # --arch: read
    python export_lora.py runs/rl/best.safetensors out/lora.safetensors --moe skip    # MoE-LoRA left out, listed
    python export_lora.py runs/rl/best.safetensors out/lora.safetensors --moe mean    # MoE-LoRA approximated

Plain LoRA exports exactly (moe_lora.export_diffusers). MoE-LoRA routes each token to its own
experts and has no diffusers equivalent: by default the export refuses and names those layers; --moe
skip writes the plain part and lists the skipped layers in the file's header and here; --moe mean
writes each MoE-LoRA as the routing-averaged LoRA (an approximation, moe_lora.moe_as_lora: uniform
over experts, as the routing counts are not saved with an adapter). No base weights are needed: the
model is built on the meta device, only the adapter tensors are real. The architecture the adapter
was trained on is the one whose layers its tensors fit (toy, or FLUX.1: dev and schnell have the
same layers), unless --arch says it.
"""
import json, os, sys

import torch

import cli as CL
import data as D
import flux2 as F2
import moe_lora as ML
import weights as WT

def build_parser():
    p = CL.Parser(description=__doc__)
    p.add_argument("adapter",
                   help="a multicrafter adapter .safetensors (its config is in the header)")
    p.add_argument("out", help="the diffusers LoRA .safetensors to write")
    p.add_argument("--arch", default=None, choices=F2.presets(), help="the architecture it was "
                   "trained on (default: the one its tensors fit; a FLUX.2 preset "
                   "writes diffusers' FLUX.2 layout)")
    p.add_argument("--moe", default="refuse", choices=["refuse", "skip", "mean"],
                   help="what to do with MoE-LoRA layers")
    D.add_force(p)
    return p

def adapter_model(arch, path):
    """A meta-device DiT carrying the file's adapters, their tensors real (on the CPU) and loaded
    strictly. arch None: the first preset (flux-dev, flux-schnell, toy) whose layers the tensors
    fit."""
    meta, sd = ML.read_adapter(path)
    if "multicrafter_adapter" not in meta:
        raise WT.CheckpointError(
            f"{path}: not a multicrafter adapter (UNO's dit_lora files load with sample.py --lora)")
    try:
        cfg = json.loads(meta["multicrafter_adapter"])
    except (ValueError, RecursionError):
        cfg = None
    if not isinstance(cfg, dict):
        raise WT.CheckpointError(f"{path}: the adapter config in its header is not a JSON object")
    for name in [arch] if arch else F2.presets():
        with torch.device("meta"):
            flux = F2.dit(F2.get_config(name))
        try:
            ML.configure(flux, path, sd, **cfg)     # the header checked against the tensors first
            break
        except WT.CheckpointError:
            if arch:
                raise
    else:
        raise WT.CheckpointError(f"{path}: its adapters fit none of the architectures "
                                 f"{', '.join(F2.presets())} (pass --arch to see what differs)")
    # the adapters' own layers and buffers onto the CPU; the base stays
    for _, m in ML.adapters(flux):
        for name, child in m.named_children():
            if name != "base":
                child.to_empty(device="cpu")
        for k, b in m._buffers.items():
            m._buffers[k] = torch.zeros(b.shape, dtype=b.dtype)
    ML.load_strict(flux, sd, path)
    return flux

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        D.check_file(args.adapter)
        if not args.out.endswith(".safetensors"):
            raise D.InputError(f"{args.out}: the output must be a .safetensors file")
        D.check_output([args.out], [args.adapter], args.force)    # never what it reads, nor a run's
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        model = adapter_model(args.arch, args.adapter)
        with D.file_errors(args.out, "write"):            # a full disk: one line, no temporary left
            sd, skipped = ML.export_diffusers(model, args.out, moe=args.moe)
    except (D.InputError, WT.CheckpointError, ValueError) as e:
        # ValueError: MoE-LoRA refused, or an unmappable layer
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = (
        f"; {len(skipped)} MoE-LoRA layers left out (listed in its header): {', '.join(skipped)}"
        if skipped else "")
    print(f"wrote {args.out}: {len(sd) // 2} diffusers LoRA layers{note}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())

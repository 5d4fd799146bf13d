"""
Export a trained adapter (train_sft.py / train_rl.py's adapter.safetensors) to the diffusers/PEFT FLUX LoRA layout,
so that diffusers loads it: FluxPipeline.load_lora_weights(FILE) or FluxTransformer2DModel.load_lora_adapter(FILE)
(--arch klein-base-4b and the other FLUX.2 presets: Flux2KleinPipeline / Flux2Transformer2DModel's layout).

    python export_lora.py runs/multi/latest/adapter.safetensors out/lora_diffusers.safetensors
    python export_lora.py runs/rl/best.safetensors out/lora.safetensors --moe skip    # MoE-LoRA left out, listed
    python export_lora.py runs/rl/best.safetensors out/lora.safetensors --moe mean    # MoE-LoRA approximated

Plain LoRA exports exactly (moe_lora.export_diffusers). MoE-LoRA routes each token to its own experts and has no
diffusers equivalent: by default the export refuses and names those layers; --moe skip writes the plain part and
lists the skipped layers in the file's header and here; --moe mean writes each MoE-LoRA as the routing-averaged LoRA
(an approximation, moe_lora.moe_as_lora: uniform over experts, as the routing counts are not saved with an adapter).
No base weights are needed: the model is built on the meta device, only the adapter tensors are real.
"""
import argparse, json, os, sys

import torch

import data as D
import flux2 as F2
import model as M
import moe_lora as ML

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="a multicrafter adapter .safetensors (its config is in the header)")
    p.add_argument("out", help="the diffusers LoRA .safetensors to write")
    p.add_argument("--arch", default="flux-dev", choices=F2.presets(), help="the architecture it was trained on "
                   "(a FLUX.2 preset writes diffusers' FLUX.2 layout, for Flux2Transformer2DModel)")
    p.add_argument("--moe", default="refuse", choices=["refuse", "skip", "mean"], help="what to do with MoE-LoRA layers")
    return p

def adapter_model(arch, path):
    """A meta-device DiT carrying the file's adapters, their tensors real (on the CPU) and loaded strictly."""
    meta, sd = ML.read_adapter(path)
    if "multicrafter_adapter" not in meta:
        raise M.CheckpointError(f"{path}: not a multicrafter adapter (UNO's dit_lora files load with sample.py --lora)")
    try:
        cfg = json.loads(meta["multicrafter_adapter"])
    except (ValueError, RecursionError):
        cfg = None
    if not isinstance(cfg, dict):
        raise M.CheckpointError(f"{path}: the adapter config in its header is not a JSON object")
    with torch.device("meta"):
        flux = F2.dit(F2.get_config(arch))
    ML.configure(flux, path, sd, **cfg)             # the header checked against the tensors first
    for _, m in ML.adapters(flux):                 # the adapters' own layers and buffers onto the CPU; the base stays
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
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        sd, skipped = ML.export_diffusers(adapter_model(args.arch, args.adapter), args.out, moe=args.moe)
    except (D.InputError, M.CheckpointError, ValueError) as e:   # ValueError: MoE-LoRA refused, or an unmappable layer
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = f"; {len(skipped)} MoE-LoRA layers left out (listed in its header): {', '.join(skipped)}" if skipped else ""
    print(f"wrote {args.out}: {len(sd) // 2} diffusers LoRA layers{note}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())

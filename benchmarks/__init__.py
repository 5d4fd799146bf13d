"""
The measurements behind `python bench.py <command>` (bench.py holds the command line), one module
per concept:

    measure.py           timing, FLOPs and peak memory (the profiler on the CPU; autograd's saved
                         tensors and the live tensors on the meta device)
    shapes.py            a random DiT of either family at a preset's shapes, one forward's inputs
    versus_diffusers.py  `dit`: our DiT against diffusers' FluxTransformer2DModel on this CPU
    method.py            what the method costs: the probe (`sft`), MoE-LoRA (`moe`), an IPPO
                         iteration (`rl`)
    memory.py            `memory`: per-GPU training budgets (FLUX.1, FLUX.2) and FLUX.1's
                         inference peaks
    speedups.py          `guidance`, `compile`, `kv`: a speed-up against its baseline, outputs
                         compared
    gpu.py               `gpu`: the checks a GPU session runs in one call (`--tiny`: the same code
                         on the CPU)
"""
import os

# the profiler measure.peak_memory runs prints its stages ("STAGE: ... Completed Stage", "USDT:
# profiler_start") to stderr for every measurement; level 6 is above them all. Set here, before any
# module of the package loads torch's profiler; KINETO_LOG_LEVEL overrides
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

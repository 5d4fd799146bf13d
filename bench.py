"""
Performance measurements, each printed as a side-by-side ratio measured in one run.

    python bench.py dit                          # our DiT vs diffusers' FluxTransformer2DModel (~2 min, 2 cores)
    python bench.py dit --json dit.json          # ... and write the numbers as JSON
    python bench.py dit --reps 3 --train-reps 2  # fewer repetitions (noisier, faster)
    python bench.py dit --ours /tmp/x/model.py   # benchmark another copy of model.py against diffusers
    python bench.py sft                          # SFT step with probe + Dice on vs off; our probe vs MOSAIC's
    python bench.py moe                          # MoE-LoRA top-1 of 4 vs one LoRA of the same rank
    python bench.py memory                       # per-GPU memory budget for flux-dev at the paper's settings
    python bench.py rl                           # one IPPO iteration: DiT evaluations, peak memory T = 8 vs 16
    python bench.py guidance                     # prompt + empty prompt as one batched forward vs two (toy)
    python bench.py compile                      # --compile (torch.compile of the blocks) vs eager (toy)
    python bench.py gpu --json $OUT/gpu.json     # a GPU session's one call, est. 4-6 min on an H100
    python bench.py gpu --tiny                   # the same code on the CPU at tiny shapes (the suite runs it)
    python bench.py memory --preset klein-base-4b # FLUX.2: on one GPU and on 8 with --fsdp
    python bench.py kv                           # FLUX.2 references' K/V kept (klein-9B-KV) vs recomputed: time

`gpu`: random weights in bf16, nothing downloaded; an estimated 4-6 minutes on one H100 (flux-dev's
rows 3-5, klein's about one; most of it sampling). At flux-dev's shapes: our DiT against diffusers'
(forward and forward+backward into the inputs, 512px with 1 and 4 references of 320px and 1024px
with one; MFU against the bf16 matmul speed measured in the run), every attention kernel through
model.attention (flash-attn where installed, else SDPA's own: flash, memory-efficient, cuDNN, math;
each against fp32 math), the peak memory of two paper-scale SFT steps (rank 512, MoE-LoRA, gradient
checkpointing) against `memory`'s estimate, and seconds per 1024px image at 28 steps resident,
--offload and --fp8. At klein Base 4B's shapes (FLUX.2): our DiT against diffusers'
Flux2Transformer2DModel on the same cases, two SFT steps at the same settings against `memory
--preset klein-base-4b`'s estimate, and seconds per 1024px image resident at klein Base's 50 steps
with text guidance 4 and at the distilled klein's 4 steps. One table, and the JSON. It needs torch,
transformers, safetensors; diffusers only for its rows (without it they say so). A GPU machine
without diffusers takes its wheel carried along:
    python -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1     # here, once
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site \
        python3 bench.py gpu --json $OUT/gpu.json                                       # there

Performance only: the toy ablation is experiments/ablation.py, the fault and bad-input harnesses are
in reliability/ (each folder's README says how to run them).

`dit`: a mid-sized FLUX (hidden 512, 8 heads of 64, 4 double + 8 single blocks) on 1024 image tokens
(32x32), two 16x16 references with UNO ids and 128 text tokens, batch 1, fp32, guidance-embedded.
diffusers' model gets the same weights through diffusers' own BFL->diffusers converter
(patched for hidden sizes other than 3072) and sees the references as part of one image sequence
with concatenated ids, its output sliced to the target tokens: exactly what our model computes.
Measured for each: forward (no_grad) and forward+backward time (backward w.r.t. all parameters of
loss = mean(out^2)), model FLOPs (torch's FlopCounterMode), model FLOP utilization against this
machine's fp32 matmul speed measured in the same run, and peak memory.
"""
import os

import cli as CL
import data as D
from benchmarks import gpu, memory, method, speedups, versus_diffusers


def build_parser():
    parser = CL.Parser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_dit = sub.add_parser("dit", help="our Flux DiT vs diffusers' FluxTransformer2DModel (time, "
                           "FLOP utilization, memory)")
    p_dit.add_argument("--hidden", type=int, default=512)
    p_dit.add_argument("--heads", type=int, default=8)
    p_dit.add_argument("--axes", type=str, default="16,24,24",
                       help="RoPE axes_dim, sums to hidden/heads")
    p_dit.add_argument("--depth", type=int, default=4, help="double stream blocks")
    p_dit.add_argument("--depth-single", type=int, default=8, help="single stream blocks")
    p_dit.add_argument("--grid", type=int, default=32,
                       help="target image token grid side (tokens = grid^2)")
    p_dit.add_argument("--ref-grid", type=int, default=16, help="reference token grid side")
    p_dit.add_argument("--refs", type=int, default=2, help="number of reference images")
    p_dit.add_argument("--txt", type=int, default=128, help="text tokens")
    p_dit.add_argument("--batch", type=int, default=1)
    p_dit.add_argument("--reps", type=int, default=6,
                       help="timed forward repetitions per model (interleaved)")
    p_dit.add_argument("--train-reps", type=int, default=4,
                       help="timed forward+backward repetitions per model")
    p_dit.add_argument("--ours", type=str, default=None,
                       help="path of the model.py to benchmark (default: ./model.py)")
    p_dit.add_argument("--seed", type=int, default=0)
    p_dit.add_argument("--json", type=str, default=None,
                       help="also write the results to this JSON file")

    p_sft = sub.add_parser("sft", help="adapter training step with the attention probe + Dice on "
                           "vs off; vs a MOSAIC-style probe")
    p_sft.add_argument("--rank", type=int, default=16)
    p_sft.add_argument("--reps", type=int, default=6)
    p_sft.add_argument("--seed", type=int, default=0)

    p_moe = sub.add_parser("moe", help="MoE-LoRA top-1 of 4 vs one LoRA of the same rank "
                           "(forward+backward time)")
    p_moe.add_argument("--scale", type=int, default=8,
                       help="divide the paper's rank 512 on 3072 -> 12288 by this")
    p_moe.add_argument("--tokens", type=int, default=4096)
    p_moe.add_argument("--reps", type=int, default=10)
    p_moe.add_argument("--seed", type=int, default=0)

    p_memory = sub.add_parser("memory", help="per-GPU memory budget at paper scale, from module "
                              "shapes on the meta device")
    p_memory.add_argument("--preset", default="flux-dev")
    p_memory.add_argument("--rank", type=int, default=512)
    p_memory.add_argument("--experts", type=int, default=4)
    p_memory.add_argument("--size", type=int, default=512)
    p_memory.add_argument("--ref-size", type=int, default=320)
    p_memory.add_argument("--refs", type=int, default=2)
    p_memory.add_argument("--batch", type=int, default=1)

    p_guidance = sub.add_parser("guidance", help="the prompt and the empty prompt as one batched "
                                "forward vs two (shipped toy)")
    p_guidance.add_argument("--batch", type=int, default=1, help="samples denoised together")
    p_guidance.add_argument("--group", type=int, default=4,
                            help="IPPO group size of the policy's forward+backward")
    p_guidance.add_argument("--reps", type=int, default=6)
    p_guidance.add_argument("--seed", type=int, default=0)

    p_compile = sub.add_parser("compile", help="--compile (torch.compile of the DiT blocks) vs "
                               "eager (shipped toy)")
    p_compile.add_argument("--batch", type=int, default=16, help="training batch")
    p_compile.add_argument("--reps", type=int, default=6)
    p_compile.add_argument("--seed", type=int, default=0)

    p_gpu = sub.add_parser("gpu", help="the GPU checks in one run: DiT vs diffusers in bf16, "
                           "attention kernels, paper-scale SFT memory against its estimate, "
                           "seconds per image resident / --fp8 / --offload")
    p_gpu.add_argument("--tiny", action="store_true",
                       help="the same code on the CPU at tiny shapes (the test suite runs it)")
    p_gpu.add_argument("--json", default=os.path.join("out", "bench_gpu.json"),
                       help="where the results go")
    p_gpu.add_argument("--seed", type=int, default=0)

    p_kv = sub.add_parser("kv", help="FLUX.2 sampling with the references' K/V kept (klein-9B-KV) "
                          "vs recomputed each step")
    p_kv.add_argument("--hidden", type=int, default=256, help="DiT width (heads of 64)")
    p_kv.add_argument("--grid", type=int, default=16, help="target token grid side")
    p_kv.add_argument("--ref-grid", type=int, default=16, help="reference token grid side")
    p_kv.add_argument("--steps", type=int, default=4,
                      help="sampling steps (klein's distilled models: 4)")
    p_kv.add_argument("--reps", type=int, default=5)
    p_kv.add_argument("--seed", type=int, default=0)

    p_rl = sub.add_parser("rl", help="one IPPO iteration: DiT evaluations and peak memory at T = 8 "
                          "vs T = 16")
    p_rl.add_argument("--group", type=int, default=4, help="samples per prompt G")
    p_rl.add_argument("--window", type=int, default=2, help="SDE window w")
    p_rl.add_argument("--hidden", type=int, default=256, help="DiT width (heads of 64)")
    p_rl.add_argument("--grid", type=int, default=16, help="target token grid side")
    p_rl.add_argument("--seed", type=int, default=0)
    return parser

# each subcommand's measurement, in benchmarks/
COMMANDS = {"dit": versus_diffusers.dit, "sft": method.sft, "moe": method.moe,
            "memory": memory.memory, "rl": method.rl, "gpu": gpu.gpu, "guidance": speedups.guidance,
            "compile": speedups.compile_bench, "kv": speedups.kv}

def main(argv=None):
    args = build_parser().parse_args(argv)
    return COMMANDS[args.cmd](args)


if __name__ == "__main__":
    main()

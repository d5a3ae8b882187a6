"""PGGAN training throughput on one CUDA GPU: fp32 vs automatic mixed precision, at 256² and 1024².

    python -m benchmarks.bench_gan_gpu [--seconds 10] [--resolutions 256 1024] [--batch 256=32 1024=16]

Uses the `paper-1024` networks (Segal et al. channels 512..16, latent 512) and times full training
iterations (critic step with gradient penalty, generator step, EMA update) in the stabilising phase at
each resolution, with the real batch already on the GPU so that the figure is the GPU's, not the
loader's. Variants run one after another in the same process:

    fp32            float32 (cuDNN convolutions may use TF32, PyTorch's default)
    amp-fp16        autocast float16 + GradScaler (gradient penalty unscaled in fp32)
    amp-bf16        autocast bfloat16, no scaler
    amp-fp16-cl     amp-fp16 with channels_last tensors

Needs CUDA; on a machine without it, it says so and exits 2. The timed seconds are the small part:
setting up each variant and its warm-up steps (cuDNN autotuning of every convolution, forward,
backward and the penalty's double backward) dominate; on an H200 the first six rows took 6 minutes,
so give it 8-10 (or pass fewer --variants).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.data import TensorDataset

VARIANTS = {
    "fp32": ["train.amp=off"],
    "amp-fp16": ["train.amp=on", "train.amp_dtype=float16"],
    "amp-bf16": ["train.amp=on", "train.amp_dtype=bfloat16"],
    "amp-fp16-cl": ["train.amp=on", "train.amp_dtype=float16", "train.channels_last=true"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="timed seconds per variant and resolution"
    )
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", nargs="*", default=["256=32", "1024=16"], help="RESOLUTION=BATCH per GPU")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            f"bench_gan_gpu needs one CUDA GPU, but torch {torch.__version__} sees none "
            "(a CPU-only build or no driver). Run it on a GPU machine with a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2

    from training.gan.config import load_config
    from training.gan.training_loop import PGGANTrainer
    from training.runtime import init_distributed

    torch.backends.cudnn.benchmark = True
    batches = {int(k): int(v) for k, v in (item.split("=") for item in args.batch)}
    context = init_distributed("cuda")
    print(
        f"PGGAN paper-1024 networks on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"img/s (one critic + one generator step per image)"
    )
    print(
        f"{'resolution':>10s}  {'batch':>5s}  {'variant':>12s}  {'img/s':>9s}  {'vs fp32':>8s}  {'peak GiB':>8s}"
    )
    for resolution in args.resolutions:
        batch = batches.get(resolution, 16)
        reference = None
        for name in args.variants:
            overrides = VARIANTS[name] + [f"schedule.batch_size.{resolution}={batch}"]
            config = load_config("paper-1024", overrides)
            placeholder = TensorDataset(torch.zeros(1, 1, 1, 1), torch.zeros(1, 14), torch.zeros(1, 14))
            trainer = PGGANTrainer(
                config, placeholder, "/tmp/bench-gan-gpu", context, progress=False, tensorboard=False
            )
            reals = torch.rand(batch, 1, 1024, 1024, device=context.device) * 2 - 1
            trainer._next_reals = lambda per_rank, reals=reals: reals[:per_rank]  # GPU-resident batch
            phase = next(
                p for p in trainer.schedule.phases if p.resolution == resolution and p.kind == "stable"
            )
            trainer.images_shown, trainer.phase_index = phase.start, phase.index
            torch.cuda.reset_peak_memory_stats()
            for _ in range(5):  # warm-up: cuDNN autotuning, allocator
                trainer.step()
            torch.cuda.synchronize()
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                trainer.step()
                count += batch
            torch.cuda.synchronize()
            rate = count / (time.perf_counter() - start)
            reference = reference or rate
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(
                f"{resolution:>9d}²  {batch:>5d}  {name:>12s}  {rate:>9.1f}  {rate / reference:>7.2f}×  {peak:>8.1f}",
                flush=True,
            )
            del trainer, reals
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

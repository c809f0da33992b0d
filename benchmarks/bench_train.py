"""Training throughput: the training loop itself (``train._loop._train_epoch``: shuffled gather,
input pipeline, on-device augmentation, step, its host syncs and progress bar) against the bare
jitted step on one resident batch. Issue target: the loop reaches >= 90% of the bare step.

Both use the preset's own step (its frozen blocks, clipping, warm-up schedule). Bare and loop
alternate over ``--rounds`` rounds after a warm-up of each (compilation), and the JSON keeps every
round; the ratio is that of the medians.

    python benchmarks/bench_train.py                 # VGG19 at 224x224, batch 32 (GPU)
    python benchmarks/bench_train.py --quick         # 1/8-width VGG19 at 64x32, for a CPU
    python benchmarks/bench_train.py --host-prefetch # force the prefetching (not resident) path
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from sapsam_jax.train import PAPER, QUICK  # noqa: E402
from sapsam_jax.train import _data as train_data  # noqa: E402
from sapsam_jax.train._loop import _replicate, _train_epoch  # noqa: E402
from sapsam_jax.train._model import build_model  # noqa: E402
from sapsam_jax.train._step import (  # noqa: E402
    StepSpec,
    frozen_block_names,
    make_optimizer,
    make_train_step,
)


def _setup(cfg, size, n_images):
    model, preprocessing = build_model(cfg, num_classes=2, seed=0)
    spec = StepSpec(image_size=size, preprocessing=preprocessing)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    steps_per_epoch = n_images // cfg.batch_size
    optimizer = make_optimizer(model, cfg, steps_per_epoch=steps_per_epoch)
    _replicate((model, optimizer), NamedSharding(mesh, P()))
    rng = np.random.default_rng(0)
    images = rng.random((n_images, *size, 3), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, 2, n_images).astype(np.int32)
    return model, optimizer, spec, mesh, images, labels


def bare_step(model, optimizer, spec, mesh, images, labels, batch, steps, frozen):
    """img/s of the jitted step alone, on one batch already on the device."""
    from sapsam_jax.train._step import set_train_mode

    set_train_mode(model, frozen)
    step = make_train_step(spec)
    x, y = jax.device_put((images[:batch], labels[:batch]), NamedSharding(mesh, P("data")))
    start = time.perf_counter()
    for i in range(steps):
        loss, _ = step(model, optimizer, x, y, jax.random.key(i))
    jax.block_until_ready(loss)
    return steps * batch / (time.perf_counter() - start)


def make_batches(mesh, images, labels, resident):
    """The loop's own input pipeline: device-resident gather, or host prefetch when forced."""
    train_data.fits_on_device = (lambda _n: True) if resident else (lambda _n: False)
    return train_data.Batches(
        images, labels, NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    )


def loop_epoch(cfg, model, optimizer, spec, mesh, batches, frozen, epoch):
    """img/s of one epoch of the training loop (its own timer, from the first gather on)."""
    record = _train_epoch(cfg, model, optimizer, batches, spec, frozen, epoch, cfg.batch_size, mesh)
    return record["images_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="tiny model and images (CPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating bare/loop rounds")
    parser.add_argument("--host-prefetch", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # One epoch = one round; every sample of the synthetic set is drawn (no rotations here).
    cfg = (QUICK if args.quick else PAPER).replace(rotations_per_epoch=None, epochs=None)
    size = (64, 32) if args.quick else (224, 224)
    batch = cfg.batch_size
    steps = args.steps or (20 if args.quick else 50)
    model, optimizer, spec, mesh, images, labels = _setup(cfg, size, n_images=steps * batch)
    frozen = frozen_block_names(model, cfg.frozen_blocks)
    batches = make_batches(mesh, images, labels, resident=not args.host_prefetch)
    # Warm-up: compile the step and the gather, and fill any prefetch queue's first use.
    bare_step(model, optimizer, spec, mesh, images, labels, batch, 3, frozen)
    loop_epoch(cfg, model, optimizer, spec, mesh, batches, frozen, epoch=0)
    bare, loop = [], []
    for r in range(args.rounds):
        bare.append(bare_step(model, optimizer, spec, mesh, images, labels, batch, steps, frozen))
        loop.append(loop_epoch(cfg, model, optimizer, spec, mesh, batches, frozen, epoch=r + 1))
    bare_median, loop_median = statistics.median(bare), statistics.median(loop)
    record = {
        "benchmark": "train_loop_vs_bare_step",
        "model": f"{cfg.arch} width {cfg.width}, head {cfg.head_units}",
        "frozen_blocks": cfg.frozen_blocks,
        "image_size": list(size),
        "batch": batch,
        "steps_per_round": steps,
        "rounds": args.rounds,
        "devices": [str(d) for d in jax.devices()],
        "device_resident_data": batches.device_resident,
        "bare_step_images_per_s": bare,
        "loop_images_per_s": loop,
        "bare_step_images_per_s_median": bare_median,
        "loop_images_per_s_median": loop_median,
        "loop_over_bare": loop_median / bare_median,
    }
    path = write_json(record, "train_quick" if args.quick else "train", args.out)
    print(
        f"bare step {bare_median:.1f} img/s, loop {loop_median:.1f} img/s "
        f"({100 * loop_median / bare_median:.0f}%, medians of {args.rounds} rounds) -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

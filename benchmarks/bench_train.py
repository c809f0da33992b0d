"""Training throughput: the full loop (input pipeline + on-device augmentation + step) against the
bare jitted step on one resident batch. Issue target: the loop reaches >= 90% of the bare step.

    python benchmarks/bench_train.py                 # VGG19 at 224x224, batch 32 (GPU)
    python benchmarks/bench_train.py --quick         # 1/8-width VGG19 at 64x32, for a CPU
    python benchmarks/bench_train.py --host-prefetch # force the prefetching (not resident) path
"""

from __future__ import annotations

import argparse
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
from sapsam_jax.train._loop import _replicate  # noqa: E402
from sapsam_jax.train._model import build_model  # noqa: E402
from sapsam_jax.train._step import StepSpec, make_optimizer, make_train_step  # noqa: E402


def _setup(cfg, size, n_images):
    model, preprocessing = build_model(cfg, num_classes=2, seed=0)
    spec = StepSpec(image_size=size, preprocessing=preprocessing)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    optimizer = make_optimizer(model, cfg.replace(frozen_blocks=2), steps_per_epoch=100)
    _replicate((model, optimizer), NamedSharding(mesh, P()))
    rng = np.random.default_rng(0)
    images = rng.random((n_images, *size, 3), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, 2, n_images).astype(np.int32)
    return model, optimizer, spec, mesh, images, labels


def bare_step(model, optimizer, spec, mesh, images, labels, batch, steps):
    """img/s of the jitted step alone, on one batch already on the device."""
    step = make_train_step(spec)
    x, y = jax.device_put((images[:batch], labels[:batch]), NamedSharding(mesh, P("data")))
    for _ in range(3):
        loss, _ = step(model, optimizer, x, y, jax.random.key(0))
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(steps):
        loss, _ = step(model, optimizer, x, y, jax.random.key(i))
    jax.block_until_ready(loss)
    return steps * batch / (time.perf_counter() - start)


def full_loop(model, optimizer, spec, mesh, images, labels, batch, steps, resident):
    """img/s of the training loop's own path: shuffled gather (device or prefetch) + step."""
    step = make_train_step(spec)
    train_data.fits_on_device = (lambda _n: True) if resident else (lambda _n: False)
    batches = train_data.Batches(
        images, labels, NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    )
    order = np.random.default_rng(1).permutation(len(labels))[: (steps + 3) * batch]
    it = batches.iterate(order, batch)
    for _ in range(3):  # warm-up (compilation)
        loss, _ = step(model, optimizer, *next(it), jax.random.key(0))
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i, (x, y) in enumerate(it):
        loss, _ = step(model, optimizer, x, y, jax.random.key(i))
    jax.block_until_ready(loss)
    return steps * batch / (time.perf_counter() - start), batches.device_resident


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and images (CPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--host-prefetch", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else PAPER
    size = (64, 32) if args.quick else (224, 224)
    batch = cfg.batch_size
    steps = args.steps or (20 if args.quick else 50)
    setup = _setup(cfg, size, n_images=(steps + 3) * batch)
    bare = bare_step(*setup, batch, steps)
    loop, resident = full_loop(*setup, batch, steps, resident=not args.host_prefetch)
    record = {
        "benchmark": "train_loop_vs_bare_step",
        "model": f"vgg19 width {cfg.width}",
        "image_size": list(size),
        "batch": batch,
        "steps": steps,
        "devices": [str(d) for d in jax.devices()],
        "device_resident_data": resident,
        "bare_step_images_per_s": bare,
        "loop_images_per_s": loop,
        "loop_over_bare": loop / bare,
    }
    path = write_json(record, "train_quick" if args.quick else "train", args.out)
    print(f"bare step {bare:.1f} img/s, loop {loop:.1f} img/s ({100 * loop / bare:.0f}%) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

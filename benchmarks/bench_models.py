"""Model throughput: forward and training-step images/s and model FLOP utilisation (MFU) of the
Flax VGG19 (224x224) and InceptionV3 (299x299), float32 and bfloat16, at batch 32 and at the
largest batch that fits (doubling search); optionally PyTorch VGG19 side by side.

    python benchmarks/bench_models.py                       # GPU: both archs, both dtypes
    python benchmarks/bench_models.py --arch vgg19 --dtype bfloat16 --torch
    python benchmarks/bench_models.py --quick               # 1/8 width, tiny images (CPU)

FLOPs per image come from XLA's cost analysis of the compiled function (a multiply-add counts
2). MFU = achieved FLOP/s / the device's dense peak for the dtype (GPU float32 matmuls and convs
run as TF32 under JAX's default precision, so TF32 is the float32 peak); null where unknown.
The training step is SGD momentum 0.9, lr 1e-4 (paper 3.1) with every layer trainable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import same_device_kind, write_json  # noqa: E402

from sapsam_jax.models import build_model  # noqa: E402

IMAGE_SIZES = {"vgg19": 224, "inception_v3": 299}  # the published input sizes
QUICK_SIZES = {"vgg19": 32, "inception_v3": 75}  # the smallest each architecture accepts
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Dense peak FLOP/s by device kind (vendor datasheets, SXM parts); float32 = TF32 tensor cores.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}


def peak_flops(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAK_FLOPS.items():
        if name in kind:
            return peaks[dtype]
    return None


def _batch(size: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(size=(batch, size, size, 3)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, 2, batch), jnp.int32)


def compile_forward(model, x):
    """AOT-compiled eval-mode forward on the split state, and its FLOPs."""
    model.eval()
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile()
    return (lambda: compiled(state, x)), _flops(compiled)


def compile_train_step(model, x, y):
    """AOT-compiled SGD step (params, batch stats and optimiser state donated), and its FLOPs."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(1e-4, momentum=0.9)

    def step(params, rest, opt_state, x, y):
        model = nnx.merge(graphdef, params, rest)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)  # updates the BatchNorm statistics
        updates, opt_state = tx.update(grads, opt_state, params)
        rest = nnx.split(model, nnx.Param, ...)[2]
        return optax.apply_updates(params, updates), rest, opt_state, loss

    carry = [params, rest, tx.init(params)]
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*carry, x, y).compile()

    def run():
        carry[0], carry[1], carry[2], loss = compiled(*carry, x, y)
        return loss

    return run, _flops(compiled)


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def throughput(run, batch: int, min_seconds: float, windows: int = 3) -> float:
    """Best images/s over ``windows`` timing windows of >= ``min_seconds`` each (after warm-up)."""
    jax.block_until_ready(run())
    best = 0.0
    for _ in range(windows):
        start, n = time.perf_counter(), 0
        while True:
            out = run()
            n += 1
            if n >= 3 and time.perf_counter() - start >= min_seconds:
                break
        jax.block_until_ready(out)
        best = max(best, n * batch / (time.perf_counter() - start))
    return best


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _train_runner(model_fn, size: int, batch: int):
    """(run, flops, compile seconds) of a training step that compiled and ran once."""
    start = time.perf_counter()
    run, flops = compile_train_step(model_fn(), *_batch(size, batch))
    jax.block_until_ready(run())
    return run, flops, time.perf_counter() - start


def search_train_runners(model_fn, size: int, start: int, cap: int) -> dict:
    """Double the batch from ``start`` while a training step compiles and runs (up to ``cap``).
    Returns {batch: runner} for the first and the largest batch (reused for timing) and why the
    search stopped ("out_of_memory" or "cap")."""
    runners, batch = {}, start
    while batch <= cap:
        try:
            runners[batch] = _train_runner(model_fn, size, batch)
        except Exception as error:  # XlaRuntimeError; only out-of-memory ends the search
            if not _is_oom(error):
                raise
            return runners, "out_of_memory"
        for old in list(runners)[1:-1]:  # free all but the first and the last that fitted
            del runners[old]
        batch *= 2
    return runners, "cap"


def bench_jax(arch, dtype, size, args, first_batch, cap) -> list[dict]:
    def model_fn():
        return build_model(
            arch,
            rngs=nnx.Rngs(0),
            width=args.width,
            head_units=args.head_units,
            dtype=DTYPES[dtype],
        )

    peak, rows = peak_flops(dtype), []
    runners, stopped_by = search_train_runners(model_fn, size, first_batch, cap)
    for batch, (train_run, train_flops, train_compile_s) in sorted(runners.items()):
        x, _ = _batch(size, batch)
        start = time.perf_counter()
        forward_run, forward_flops = compile_forward(model_fn(), x)
        compile_s = time.perf_counter() - start
        for mode, run, flops, seconds in (
            ("forward", forward_run, forward_flops, compile_s),
            ("train_step", train_run, train_flops, train_compile_s),
        ):
            images_per_s = throughput(run, batch, args.min_seconds)
            row = _row("jax", arch, dtype, size, batch, mode, images_per_s, flops, peak, seconds)
            row.update(largest_fitting_batch=max(runners), search_stopped_by=stopped_by)
            rows.append(row)
            print(row, flush=True)
    return rows


def _row(framework, arch, dtype, size, batch, mode, images_per_s, flops, peak, compile_s=None):
    per_image = None if flops is None else flops / batch
    achieved = None if per_image is None else per_image * images_per_s
    return dict(
        framework=framework,
        arch=arch,
        dtype=dtype,
        image_size=size,
        batch=batch,
        mode=mode,
        images_per_s=round(images_per_s, 2),
        flops_per_image=per_image,
        achieved_tflops=None if achieved is None else round(achieved / 1e12, 3),
        mfu=None if achieved is None or peak is None else round(achieved / peak, 4),
        compile_s=None if compile_s is None else round(compile_s, 1),
    )


# ----------------------------------------------------------------------------- PyTorch side


def _torch_vgg19(width: float, head_units: int):
    """VGG19 features (torchvision's when available at full width) + the paper's head."""
    import torch.nn as nn

    if width == 1.0:
        try:
            from torchvision.models import vgg19

            features, channels = vgg19().features, 512
        except ImportError:
            features, channels = None, None
    if width != 1.0 or features is None:
        layers, cin = [], 3
        for n_convs, c in zip((2, 2, 4, 4, 4), (64, 128, 256, 512, 512), strict=True):
            c = max(1, round(c * width))
            for _ in range(n_convs):
                layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(inplace=True)]
                cin = c
            layers.append(nn.MaxPool2d(2, 2))
        features, channels = nn.Sequential(*layers), cin
    return nn.Sequential(
        features,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, head_units),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(head_units, head_units),
        nn.ReLU(inplace=True),
        nn.Linear(head_units, 2),
    )


def _torch_runners(batch, dtype, size, args, device):
    """(forward, train_step, net) closures for one batch size."""
    import torch

    # The same network as the JAX side (width and head): the FLOPs credited are the JAX model's.
    net = _torch_vgg19(args.width, args.head_units).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    x = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    compiled = torch.compile(net) if device == "cuda" else net

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def forward():
        with torch.no_grad(), autocast():
            return compiled(x)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(compiled(x).float(), y)
        loss.backward()
        optimizer.step()
        return loss

    return forward, train_step, net


def bench_torch(dtype, size, batches, args, flops_per_image) -> list[dict]:
    """torch VGG19: channels_last, bf16 autocast, torch.compile (CUDA only), same batches.
    ``flops_per_image[mode]``: XLA's count for the same network (torch has no cost analysis)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's default float32 precision on GPU
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    rows = []
    for batch in batches:
        forward, train_step, net = _torch_runners(batch, dtype, size, args, device)
        for mode, fn in (("forward", forward), ("train_step", train_step)):
            net.train(mode == "train_step")
            try:
                images_per_s = _torch_throughput(fn, batch, args.min_seconds, device)
            except torch.OutOfMemoryError:
                rows.append(
                    dict(
                        framework="torch",
                        arch="vgg19",
                        dtype=dtype,
                        batch=batch,
                        mode=mode,
                        error="out of memory",
                    )
                )
                continue
            flops = None if flops_per_image.get(mode) is None else flops_per_image[mode] * batch
            peak = peak_flops(dtype) if device == "cuda" else None
            row = _row("torch", "vgg19", dtype, size, batch, mode, images_per_s, flops, peak)
            row.update(device=device, compiled=device == "cuda", channels_last=True)
            rows.append(row)
            print(row, flush=True)
    return rows


def _ratios(rows, jax_platform: str) -> list[dict]:
    """JAX images/s over torch images/s where both ran the same (dtype, mode, batch) on the same
    kind of device."""
    torch_rows = {
        (r["dtype"], r["mode"], r["batch"]): r
        for r in rows
        if r["framework"] == "torch" and "images_per_s" in r
    }
    out = []
    for r in rows:
        peer = torch_rows.get((r["dtype"], r["mode"], r["batch"]))
        if r["framework"] == "jax" and r["arch"] == "vgg19" and peer:
            ratio = r["images_per_s"] / peer["images_per_s"]
            if not same_device_kind(jax_platform, peer["device"]):
                ratio = f"not compared: JAX on {jax_platform}, torch on {peer['device']}"
            else:
                ratio = round(ratio, 3)
            out.append({k: r[k] for k in ("dtype", "mode", "batch")} | {"ratio": ratio})
    return out


def _torch_throughput(fn, batch, min_seconds, device, windows=3) -> float:
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: compilation, cudnn autotuning
        fn()
    sync()
    best = 0.0
    for _ in range(windows):
        start, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - start < min_seconds:
            fn()
            n += 1
        sync()
        best = max(best, n * batch / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="1/8 width, tiny images (CPU)")
    parser.add_argument("--arch", choices=sorted(IMAGE_SIZES), action="append")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="cap of the largest-batch search (default 1024, quick 4)",
    )
    parser.add_argument("--min-seconds", type=float, default=None)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch VGG19")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.width = 0.125 if args.quick else 1.0
    args.head_units = 32 if args.quick else 1024
    args.min_seconds = args.min_seconds or (0.2 if args.quick else 2.0)
    cap = args.max_batch if args.max_batch is not None else (4 if args.quick else 1024)
    first_batch = 2 if args.quick else 32
    if cap < first_batch:  # the search starts at first_batch: it would time nothing
        parser.error(f"--max-batch {cap} is below the first batch timed ({first_batch})")
    rows = []
    for arch in args.arch or sorted(IMAGE_SIZES):
        size = (QUICK_SIZES if args.quick else IMAGE_SIZES)[arch]
        for dtype in args.dtype or ("float32", "bfloat16"):
            jax_rows = bench_jax(arch, dtype, size, args, first_batch, cap)
            rows += jax_rows
            if args.torch and arch == "vgg19":
                batches = sorted({r["batch"] for r in jax_rows})
                per_image = {
                    r["mode"]: r["flops_per_image"] for r in jax_rows if r["batch"] == first_batch
                }
                rows += bench_torch(dtype, size, batches, args, per_image)
    record = dict(
        benchmark="bench_models",
        quick=args.quick,
        width=args.width,
        head_units=args.head_units,
        jax_over_torch=_ratios(rows, jax.default_backend()),
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        flax_version=_version("flax"),
        torch_version=_version("torch") if args.torch else None,
        max_batch_cap=cap,
        results=rows,
    )
    out = write_json(record, "models_quick" if args.quick else "models", args.out)
    print(f"wrote {out}")
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())

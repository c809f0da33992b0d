"""Grad-CAM maps per second for VGG19 at 224x224, batched (paper 2.5, eq. (1)).

    python benchmarks/bench_gradcam.py                    # VGG19, 224x224, batch 32, 3 methods
    python benchmarks/bench_gradcam.py --quick            # CPU-friendly: batch 4, Grad-CAM only
    python benchmarks/bench_gradcam.py --torch            # + pytorch-grad-cam on torchvision VGG19

Ours: ``sapsam_jax.explain.grad_cam`` (one jitted forward + VJP per batch) on the NNX VGG19 with
the paper's head, Grad-CAM layer ``block5_conv4``. ``--torch``: the ``pytorch-grad-cam``
package's GradCAM on torchvision's VGG19 (``features[35]``, the ReLU after conv5_4, the same
layer), on CUDA when torch sees a GPU; skipped with a note when torch, torchvision or
pytorch-grad-cam is missing. Both get random weights (speed does not depend on them); the first
call (compilation, cuDNN autotuning) is timed separately. JSON goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import same_device_kind, write_json  # noqa: E402

from sapsam_jax.explain import CAM_METHODS, grad_cam  # noqa: E402
from sapsam_jax.models import VGG19  # noqa: E402

TORCH_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM"}


def time_calls(fn, repeat: int) -> tuple[float, float]:
    """(seconds of the first call, best seconds of ``repeat`` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def bench_ours(args) -> list[dict]:
    model = VGG19(num_classes=2, rngs=nnx.Rngs(0), width=args.width)
    model.eval()
    x = jax.random.uniform(jax.random.key(0), (args.batch, args.size, args.size, 3))
    forward = nnx.jit(lambda m, x: m(x))
    rows = []
    first, best = time_calls(lambda: forward(model, x).block_until_ready(), args.repeat)
    rows.append(_row("sapsam_jax", "forward only", args, first, best))
    print(_line(rows[-1]), flush=True)
    for method in args.methods:
        first, best = time_calls(
            lambda m=method: grad_cam(model, x, 1, method=m).block_until_ready(), args.repeat
        )
        rows.append(_row("sapsam_jax", method, args, first, best))
        print(_line(rows[-1]), flush=True)
    return rows


def bench_torch(args) -> list[dict] | str:
    """pytorch-grad-cam rows, or why they could not be measured."""
    try:
        import pytorch_grad_cam
        import torch
        import torchvision
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as err:
        return f"skipped: {err}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.vgg19(weights=None).to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    targets = [ClassifierOutputTarget(1)] * args.batch
    rows = []
    for method in args.methods:
        cam = getattr(pytorch_grad_cam, TORCH_METHODS[method])(model, [model.features[35]])
        first, best = time_calls(lambda c=cam: c(input_tensor=x, targets=targets), args.repeat)
        rows.append(_row("pytorch-grad-cam", method, args, first, best, device=device))
        print(_line(rows[-1]), flush=True)
    return rows


def _row(impl, method, args, first, best, device=None) -> dict:
    return {
        "impl": impl,
        "method": method,
        "device": device or str(jax.devices()[0].device_kind),
        "batch": args.batch,
        "image_size": args.size,
        "width": args.width,
        "first_call_s": round(first, 4),
        "seconds_per_batch": round(best, 4),
        "maps_per_s": round(args.batch / best, 2),
    }


def _ratios(rows, jax_platform: str) -> dict:
    """Our maps/s over pytorch-grad-cam's, per method both ran on the same kind of device."""
    ours = {r["method"]: r["maps_per_s"] for r in rows if r["impl"] == "sapsam_jax"}
    peers = {r["method"]: r for r in rows if r["impl"] == "pytorch-grad-cam"}
    out = {}
    for method, maps_per_s in ours.items():
        peer = peers.get(method)
        if peer is None or not peer["maps_per_s"]:
            continue
        if same_device_kind(jax_platform, peer["device"]):
            out[method] = round(maps_per_s / peer["maps_per_s"], 3)
        else:
            out[method] = f"not compared: JAX on {jax_platform}, torch on {peer['device']}"
    return out


def _line(row: dict) -> str:
    return (
        f"{row['impl']:>16} {row['method']:>12} on {row['device']}: "
        f"{row['maps_per_s']:8.2f} maps/s (batch {row['batch']}, "
        f"first call {row['first_call_s']} s)"
    )


def _versions() -> dict:
    out = {}
    for name in ("flax", "torch", "torchvision", "grad-cam"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, Grad-CAM only, 2 repeats")
    parser.add_argument("--torch", action="store_true", help="also time pytorch-grad-cam")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0, help="VGG19 channel multiplier")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--methods", nargs="+", choices=CAM_METHODS, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.torch and args.width != 1.0:
        # The peer is torchvision's full-width VGG19: a narrower one of ours does other work.
        parser.error("--torch compares full-width VGG19s: leave --width at 1.0")
    args.batch = args.batch or (4 if args.quick else 32)
    args.repeat = args.repeat or (2 if args.quick else 5)
    args.methods = args.methods or (["gradcam"] if args.quick else list(CAM_METHODS))
    rows = bench_ours(args)
    torch_rows = bench_torch(args) if args.torch else "not requested (--torch)"
    if isinstance(torch_rows, list):
        rows += torch_rows
    record = {
        "benchmark": "gradcam",
        "quick": args.quick,
        "ours_over_pytorch_grad_cam": _ratios(rows, jax.default_backend()),
        "jax_backend": jax.default_backend(),
        "extra_versions": _versions(),
        "results": rows,
        "torch": "measured" if isinstance(torch_rows, list) else torch_rows,
    }
    name = "gradcam_quick" if args.quick else "gradcam"
    print(f"wrote {write_json(record, name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

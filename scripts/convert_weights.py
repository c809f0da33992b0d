"""Convert published ImageNet weights into a weights directory (Orbax + weights.json).

    python scripts/convert_weights.py --arch vgg19 --from keras \
        --input vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 --output weights/vgg19_keras

Nothing is downloaded; see the README, "ImageNet weights", for the files to fetch by hand.
"""

import argparse
import sys

from sapsam_jax.models import ARCHITECTURES, convert_weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    parser.add_argument("--from", dest="source", required=True, choices=("keras", "torchvision"))
    parser.add_argument("--input", required=True, help="Keras .h5 or torchvision .pth/.safetensors")
    parser.add_argument("--output", required=True, help="weights directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        out = convert_weights(
            args.arch, args.source, args.input, args.output, overwrite=args.overwrite
        )
    except FileExistsError:  # the library's message names its keyword, overwrite=True
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError) as err:  # missing, wrong or unreadable file
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

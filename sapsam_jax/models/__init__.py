"""Flax NNX VGG19 / InceptionV3 with the paper's head (paper 2.4), ImageNet weight conversion.

See the README, "Models", and the Models contract in docs/ARCHITECTURE.md.
"""

from ._checkpoint import load_weights, read_weights_info, save_weights
from ._head import HEAD_KERNEL_INIT, ClassifierHead
from ._inception import InceptionV3, InceptionV3Tiny
from ._preprocess import PREPROCESSING, preprocess_input
from ._registry import ARCHITECTURES, MIN_INPUT_SIZE, build_model, convert_weights
from ._vgg import VGG, VGG16, VGG19, VGG19Tiny
from ._weights import (
    WEIGHT_FILES,
    load_keras_weights,
    load_torchvision_weights,
    read_keras_h5,
    read_torch_state_dict,
    require_weights_file,
)

__all__ = [
    "MIN_INPUT_SIZE",
    "ARCHITECTURES",
    "HEAD_KERNEL_INIT",
    "PREPROCESSING",
    "VGG",
    "VGG16",
    "VGG19",
    "VGG19Tiny",
    "WEIGHT_FILES",
    "ClassifierHead",
    "InceptionV3",
    "InceptionV3Tiny",
    "build_model",
    "convert_weights",
    "load_keras_weights",
    "load_torchvision_weights",
    "load_weights",
    "preprocess_input",
    "read_keras_h5",
    "read_torch_state_dict",
    "read_weights_info",
    "require_weights_file",
    "save_weights",
]

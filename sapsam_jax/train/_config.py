"""Training configuration: one frozen dataclass per job, presets built by overriding the paper's.

``paper`` is the paper's setup (sections 2.3, 2.4, 3.1-3.3); ``quick`` shrinks cohort, grid, image
and model so the README's main command finishes in about 10 minutes on 2 CPU cores; ``tiny`` is for
tests. Run any of them with::

    python scripts/train.py --task signs --axis axial --preset quick
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sapsam_jax.config import AXES, SIGN_CHOICES, TASKS
from sapsam_jax.data.synthetic import DEFAULT_CONTROL_FRACTION
from sapsam_jax.models import MIN_INPUT_SIZE

ARCHS = ("vgg19", "inception_v3")
# Paper 3.1-3.3: epochs per task (signs: "240-300"; we take the lower end, the best validation
# epoch is kept anyway).
PAPER_EPOCHS = {"disease": 60, "signs": 240, "survival": 20}
# Smallest input each backbone accepts (Keras applications: VGG 32x32, InceptionV3 75x75).


@dataclass(frozen=True)
class SyntheticCohortConfig:
    """The built-in synthetic phantom cohort used when no data is given."""

    n_patients: int = 48
    shape: tuple[int, int, int] = (160, 256, 256)  # (k, j, i) voxels of each phantom CT
    spacing: tuple[float, float, float] = (2.0, 1.4, 1.4)  # (dk, dj, di) mm
    seed: int = 0
    control_fraction: float = DEFAULT_CONTROL_FRACTION  # paper 1.1: 76 of 352 are controls

    def __post_init__(self):
        # Checked here, so a bad --patients / --control-fraction stops before any work.
        if self.n_patients < 1 or not 0.0 <= self.control_fraction <= 1.0:
            raise ValueError(
                f"synthetic cohort needs n_patients >= 1 and 0 <= control_fraction <= 1 "
                f"(got {self.n_patients} and {self.control_fraction})"
            )

    @property
    def name(self) -> str:
        """Folder name part: patients, seed and (when not the paper's share) the controls."""
        share = self.control_fraction
        controls = "" if share == DEFAULT_CONTROL_FRACTION else f"-controls{share:g}"
        return f"n{self.n_patients}-seed{self.seed}{controls}"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; ``epochs=None`` means the task's paper value."""

    task: str = "signs"
    axis: str = "axial"
    sign: str = "all"  # one sign, "all" (one binary network per sign, paper 2.4) or "multi"
    arch: str = "vgg19"  # paper 2.4: VGG19 performed best
    preset: str = "paper"
    preprocess_preset: str = "paper"  # which sapsam_jax.config preprocessing preset feeds it
    width: float = 1.0  # channel multiplier of the backbone
    image_size: tuple[int, int] | None = None  # None: the projection's native size
    dtype: str = "float32"  # compute dtype; "bfloat16" keeps float32 parameters
    # Paper 3.1/3.2: SGD, momentum 0.9, learning rate 1e-4, first two blocks frozen, batch 32.
    optimizer: str = "sgd"
    learning_rate: float = 1e-4
    momentum: float = 0.9  # SGD's momentum; with optimizer "adam", Adam's b1
    warmup_epochs: float = 0.0
    # Not in the paper: clip the gradient to this global norm (None: no clipping). Keeps a
    # from-scratch VGG without normalisation layers from jumping out of its basin at a large
    # learning rate (quick preset, README "Measured").
    grad_clip_norm: float | None = None
    frozen_blocks: int = 2
    batch_size: int = 32
    epochs: int | None = None
    # Paper 3.1/3.2: "checkpoint evaluated on the validation data" (Keras' ModelCheckpoint). The
    # paper does not name what it monitored; Keras' default is the validation loss. The others
    # keep the epoch of the highest validation accuracy, F1 or ROC AUC (SELECT_BY).
    select_by: str = "val_loss"
    # Paper 2.3 trains on all 27 rotations of each scan every epoch (None); a smaller number draws
    # that many of the rotations afresh each epoch (seeded), for shorter epochs on a CPU.
    rotations_per_epoch: int | None = None
    # Paper 2.3/3.1: the 27 rotations augment the cohort before the split, and the test scores
    # count rotated projections too (822 axial test projections); "identity" evaluates on the
    # unrotated scans only.
    eval_rotations: str = "all"
    # Paper 2.4 head: two dense layers of 1024 units, dropout 0.5 between them.
    head_units: int = 1024
    dropout_rate: float = 0.5
    # Paper 2.3 / 3.1: rotation factor 20 degrees, scaled between 80% and 120%.
    max_rotation_deg: float = 20.0
    zoom_range: tuple[float, float] = (0.8, 1.2)
    # Not in the paper: also mirror half of the training images left-right. A sign looks the same
    # mirrored, and a right-lung image mirrored looks like a left-lung one, which shows the
    # network signs in places Table 1 rarely puts them.
    flip: bool = False
    # Paper 2.3: split by patient, balanced after the split; 3.3: survival has no validation set.
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    # Survival (paper 3.3): its test share is the test share of the disease network a survival
    # job trains first, whose test patients the survival network is tested on (_loop).
    survival_split_fractions: tuple[float, float, float] = (2 / 3, 0.0, 1 / 3)
    train_balance: str = "oversample"
    test_balance: str = "undersample"
    # Signs, not in the paper: balance the training classes inside each sub-region
    # (data.balance_indices groups) so the sub-region's shape cannot stand in for the sign (Table
    # 1: mostly upper lobes). Off: on the quick cohort it left the training set at ~25% positives
    # and the networks at p < 0.5 (pleural thickening test F1 0.0 against 0.97 without it).
    balance_by_subregion: bool = False
    seed: int = 0
    weights: str | None = None  # converted ImageNet checkpoint (scripts/convert_weights.py)
    init_from: str | None = None  # survival: the disease workdir to start from (paper 2.4)
    manifest: str | None = None
    cache: str | None = None
    data_dir: str = "runs/data"  # where the synthetic cohort and caches are built
    workdir: str | None = None
    backend: str = "auto"  # preprocessing backend
    bootstrap: int = 1000  # resamples for the report's 95% intervals
    # How this run's activation maps are drawn unless a caller asks otherwise (scripts/gradcam.py,
    # localisation scores): paper 2.5 is Grad-CAM on the last convolution (None).
    cam_method: str = "gradcam"
    cam_layer: str | None = None
    tensorboard: bool = False
    synthetic: SyntheticCohortConfig = field(default_factory=SyntheticCohortConfig)

    def __post_init__(self):
        _check_choice("task", self.task, TASKS)
        _check_choice("axis", self.axis, tuple(AXES))
        _check_choice("sign", self.sign, SIGN_CHOICES)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        _check_choice("eval_rotations", self.eval_rotations, ("all", "identity"))
        _check_choice("train_balance", self.train_balance, BALANCE_MODES)
        # Runs made before test_balance was limited to undersampling still load (evaluate,
        # explain, resume); new runs are refused it (check_new_run).
        _check_choice("test_balance", self.test_balance, BALANCE_MODES)
        _check_choice("cam_method", self.cam_method, ("gradcam", "gradcam++", "hirescam"))
        _check_choice("select_by", self.select_by, SELECT_BY)
        if self.rotations_per_epoch is not None and not 1 <= self.rotations_per_epoch <= 27:
            raise ValueError(
                f"rotations_per_epoch must be in 1..27, not {self.rotations_per_epoch}"
            )
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:  # NaN too
            raise ValueError(f"grad_clip_norm must be > 0, not {self.grad_clip_norm}")
        if self.warmup_epochs < 0:  # optax would hold the learning rate at 0 for the whole run
            raise ValueError(f"warmup_epochs must be >= 0, not {self.warmup_epochs}")
        if self.frozen_blocks < 0:
            raise ValueError(f"frozen_blocks must be >= 0, not {self.frozen_blocks}")
        if not 0.0 <= self.dropout_rate < 1.0:  # 1 zeroes the head; < 0 rescales the training pass
            raise ValueError(f"dropout_rate must be in [0, 1), not {self.dropout_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if not 0.0 <= self.momentum < 1.0:  # SGD momentum or Adam's b1: 1 never forgets a step
            raise ValueError(f"momentum must be in [0, 1), not {self.momentum}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, not {self.learning_rate}")
        if self.epochs is not None and self.epochs < 1:
            # 0 epochs used to "train" nothing and report the untrained network's scores.
            raise ValueError(f"epochs must be >= 1, not {self.epochs}")
        self._check_tuples()

    def _check_tuples(self) -> None:
        """Shapes of the tuple fields, checked before any work (a bad one failed deep in JAX)."""
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"image_size takes 2 positive values (H W), not {self.image_size}")
        if self.image_size is not None and min(self.image_size) < MIN_INPUT_SIZE[self.arch]:
            # Smaller images leave the backbone no pixel (NaN logits, now a model error).
            raise ValueError(
                f"image_size {tuple(self.image_size)} is below {self.arch}'s smallest input, "
                f"{MIN_INPUT_SIZE[self.arch]} x {MIN_INPUT_SIZE[self.arch]}"
            )
        lo_hi = tuple(self.zoom_range)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"zoom_range takes 2 values 0 < LO <= HI, not {self.zoom_range}")
        for name in ("split_fractions", "survival_split_fractions"):
            fractions = tuple(getattr(self, name))
            if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
                raise ValueError(
                    f"{name} takes 3 values >= 0 (train, validation, test) summing to 1, "
                    f"not {fractions}"
                )

    @property
    def multi_label(self) -> bool:
        """One network with an output per sign (``--sign multi``); other tasks ignore ``sign``."""
        return self.task == "signs" and self.sign == "multi"

    @property
    def num_epochs(self) -> int:
        return self.epochs if self.epochs is not None else PAPER_EPOCHS[self.task]

    @property
    def run_name(self) -> str:
        sign = f"-{self.sign}" if self.task == "signs" else ""
        return f"{self.task}-{self.axis}{sign}"

    @property
    def workdir_path(self) -> Path:
        """``workdir``, or ``runs/<run_name>`` when none is given."""
        return Path(self.workdir or Path("runs") / self.run_name)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        values["synthetic"] = SyntheticCohortConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in values["synthetic"].items()}
        )
        tuples = ("image_size", "zoom_range", "split_fractions", "survival_split_fractions")
        for key in tuples:
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


BALANCE_MODES = ("oversample", "undersample")
# What the best checkpoint is chosen by: the validation loss (lowest) or a validation metric
# (highest; an undefined one, e.g. F1 without a predicted or a true positive, never wins).
SELECT_BY = ("val_loss", "val_accuracy", "val_f1", "val_auc")
TEST_BALANCE = ("undersample",)


def check_new_run(cfg: TrainConfig) -> None:
    """Settings a run made before them may hold, but a new run may not."""
    if cfg.test_balance not in TEST_BALANCE:
        # Validation and test images are not augmented: an oversampled copy is the same image
        # with the same prediction, counted again in the metrics and the kept epoch's loss.
        raise ValueError(
            f"test_balance {cfg.test_balance!r}: validation and test sets are balanced by "
            "undersampling only (their images are not augmented, so oversampled copies would "
            "count the same prediction twice)"
        )


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


PAPER = TrainConfig()

# About 10 minutes on 2 CPU cores for `--task signs --sign all`: small phantoms on the quick
# preprocessing grid, a 1/8-width VGG19 trained from scratch. Without ImageNet weights the paper's
# 1e-4 SGD and frozen random blocks barely move in a few epochs, so quick trains every block with
# a larger learning rate; pass --weights to fine-tune as the paper does.
QUICK = PAPER.replace(
    preset="quick",
    preprocess_preset="quick",
    width=0.125,
    head_units=128,
    learning_rate=0.01,
    warmup_epochs=1.0,
    # At 0.01 a pleural-thickening network once fell back to chance for four epochs (loss 0.69,
    # train F1 0.5) before it recovered; clipped at 1.0 the same run trained smoothly.
    grad_clip_norm=1.0,
    frozen_blocks=0,
    epochs=None,
    rotations_per_epoch=9,
    bootstrap=500,
    # Quick sub-region images are 64x32, a quarter of the paper's 256x128: the last convolution's
    # receptive field (252 px) is four times the image and its map is 4x2, so every cell sees the
    # whole image and its maximum cannot point at a lesion. block2_conv2 (receptive field 14 px,
    # 32x16 map) can, and HiResCAM (gradient x activation, summed over channels) is the faithful
    # map for a layer followed by further convolutions. Measured choice, README "Localisation".
    cam_method="hirescam",
    cam_layer="block2_conv2",
    synthetic=SyntheticCohortConfig(n_patients=40, shape=(80, 128, 128), spacing=(3.6, 2.6, 2.6)),
)
QUICK_EPOCHS = {"disease": 15, "signs": 8, "survival": 5}
# The paper's share of controls (1 in 4) leaves 2 control patients in a 40-patient test split,
# too few to measure CPA-vs-control; the quick disease task gets a cohort of its own, half
# controls. (Signs and survival need the CPA patients.)
QUICK_DISEASE_CONTROL_FRACTION = 0.5

# For tests: a handful of tiny phantoms, two epochs.
TINY = QUICK.replace(
    preset="tiny",
    preprocess_preset="tiny",
    width=0.0625,
    head_units=16,
    epochs=2,
    bootstrap=50,
    batch_size=8,
    synthetic=SyntheticCohortConfig(n_patients=8, shape=(48, 64, 64), spacing=(6.0, 5.0, 5.0)),
)

TRAIN_PRESETS = {"paper": PAPER, "quick": QUICK, "tiny": TINY}


def preset_config(name: str, task: str) -> TrainConfig:
    """The named preset with the task's epoch count (``auto`` is resolved by the caller)."""
    _check_choice("preset", name, tuple(TRAIN_PRESETS))
    cfg = TRAIN_PRESETS[name].replace(task=task)
    if name == "quick":
        cfg = cfg.replace(epochs=QUICK_EPOCHS[task])
        if task != "signs":  # one image per scan (not six): every rotation, every epoch
            cfg = cfg.replace(rotations_per_epoch=None)
        else:
            # Warm up over as many steps as one pass over all 27 rotations: 3 epochs of 9. The
            # README's sign numbers were measured so; one epoch left the seed-0 pleural network
            # at test F1 72.9 (against 85.7), cavity 98.6 and fungus ball 96.9 (98.4, 99.0).
            cfg = cfg.replace(warmup_epochs=3.0)
        if task == "disease":
            cfg = cfg.replace(
                synthetic=dataclasses.replace(
                    cfg.synthetic, control_fraction=QUICK_DISEASE_CONTROL_FRACTION
                )
            )
    return cfg


def resolve_preset(name: str) -> tuple[str, str]:
    """Resolve ``auto``: ``paper`` when JAX sees an accelerator, ``quick`` otherwise.

    Returns the preset and a one-line reason, which the trainer prints first.
    """
    if name != "auto":
        return name, f"preset {name} (chosen on the command line)"
    import jax

    from sapsam_jax.train._distributed import maybe_initialize_distributed

    # Asking for the backend starts it, and jax.distributed.initialize refuses to run after that:
    # a multi-host job (JAX_COORDINATOR_ADDRESS) joins first, or train() could never join it.
    maybe_initialize_distributed()
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm", "tpu"):
        return "paper", f"preset paper (auto: JAX sees {platform} accelerator(s))"
    return "quick", "preset quick (auto: JAX sees no accelerator, only the CPU)"

"""Training samples for each task, read from the projection cache (paper 2.3, 3.1-3.3).

- disease: whole-scan grayscale projections along one axis (conservative mask), label ``cpa``;
- survival: the same images of CPA scans that carry a ``survival_2y`` label; the positive class
  is death within two years (paper 3.3), i.e. ``survival_2y == 0``;
- signs: sub-region RGB band projections (refined mask), one sample per annotated sub-region,
  label the sub-region's flag for the sign (or all three flags, ``sign="multi"``).
Training uses all 27 rotations of a scan (paper 2.3); evaluation uses all 27 too by default
(``TrainConfig.eval_rotations="all"``, as the paper's test images are augmented), or only the
unrotated scan (``"identity"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sapsam_jax.config import SIGN_CHOICES, SIGNS, SUBREGIONS, TASKS


@dataclass(frozen=True)
class SampleSet:
    """Images (N, H, W, C) in [0, 1] with labels and where each image came from."""

    images: np.ndarray
    labels: np.ndarray  # (N,) int32, or (N, 3) for sign="multi"
    study_ids: np.ndarray  # (N,) str
    patient_ids: np.ndarray  # (N,) str
    rotations: np.ndarray  # (N,) rotation index 0-26
    subregions: np.ndarray  # (N,) index into config.SUBREGIONS, -1 for whole-scan images

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> SampleSet:
        return SampleSet(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def study_label(meta: dict, task: str, sign: str = "all") -> int | None:
    """The scan-level label of a study for ``task`` (None: the study does not take part).

    Signs: a study without an annotated sub-region for ``sign`` takes no part (sparse labels,
    paper 1.2); the others are stratified by disease status.
    """
    _check_task(task, sign)
    if task == "disease":
        return int(meta["cpa"])
    if task == "survival":
        # Paper 3.3: survival of CPA patients; scans of patients who died within two years are
        # the positive class (survival_2y = 1: alive two years after the scan). A control's
        # follow-up takes no part: the network starts from the disease one and would score it
        # "survived" for having no CPA.
        value = meta.get("survival_2y")
        return None if value is None or int(meta["cpa"]) != 1 else 1 - int(value)
    if len(_annotated_subregions(meta, sign)[0]) == 0:
        return None
    return int(meta["cpa"])


def task_samples(
    cache,
    study_ids: Sequence[str],
    *,
    task: str,
    axis: str,
    sign: str = "all",
    rotations: str = "all",
) -> SampleSet:
    """Gather the samples of ``study_ids`` for one task and axis from a ProjectionCache.

    ``rotations="all"`` takes the 27 augmented rotations, ``"identity"`` only the unrotated scan.
    Signs take one sign (a binary label) or ``"multi"`` (all three); ``"all"`` is one network per
    sign (paper 2.4, ``sapsam_jax.train.train`` runs them in turn), not a sample set.
    """
    _check_task(task, sign)
    if task == "signs" and sign == "all":
        raise ValueError(
            "sign='all' means one network per sign: gather the samples of one sign at a time, "
            "or sign='multi' for one label per sign"
        )
    rot_index = _rotation_indices(cache, rotations)
    parts = [
        _study_samples(cache, sid, task=task, axis=axis, sign=sign, rot_index=rot_index)
        for sid in study_ids
    ]
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError(f"no {task} samples among {len(study_ids)} studies of the cache")
    fields = SampleSet.__dataclass_fields__
    return SampleSet(*(np.concatenate([p[f] for p in parts]) for f in fields))


def _check_task(task: str, sign: str) -> None:
    # Anything but disease or survival would otherwise be read as the sign task.
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "signs" and sign not in SIGN_CHOICES:
        raise ValueError(f"unknown sign {sign!r}; expected one of {', '.join(SIGN_CHOICES)}")


def _rotation_indices(cache, rotations: str) -> np.ndarray:
    geometry = cache.config.geometry
    if rotations == "identity":
        return np.array([geometry.identity_rotation_index])
    if rotations == "all":
        return np.arange(len(geometry.rotations()))
    raise ValueError(f"rotations must be 'all' or 'identity', not {rotations!r}")


def _study_samples(cache, study_id, *, task, axis, sign, rot_index) -> dict | None:
    meta = cache.meta(study_id)
    if task in ("disease", "survival"):
        label = study_label(meta, task)
        if label is None:
            return None
        images = np.asarray(cache.gray(study_id, axis)[rot_index])[..., None]
        labels = np.full(len(rot_index), label, np.int32)
        regions = np.full(len(rot_index), -1)
        rots = rot_index
    else:
        regions, labels = _annotated_subregions(meta, sign)
        if len(regions) == 0:
            return None
        bands = cache.bands(study_id, axis)  # (27, 6, H, W, 3)
        images = np.asarray(bands[rot_index][:, regions]).reshape(-1, *bands.shape[2:])
        labels = np.tile(labels, (len(rot_index),) + (1,) * (labels.ndim - 1))
        rots = np.repeat(rot_index, len(regions))
        regions = np.tile(regions, len(rot_index))
    n = len(labels)
    return {
        "images": images,
        "labels": labels,
        "study_ids": np.full(n, study_id, dtype=object),
        "patient_ids": np.full(n, meta["patient_id"], dtype=object),
        "rotations": np.asarray(rots),
        "subregions": np.asarray(regions),
    }


def _annotated_subregions(meta: dict, sign: str) -> tuple[np.ndarray, np.ndarray]:
    """Sub-regions whose flag(s) for ``sign`` are annotated, with those flags (paper 1.2)."""
    wanted = SIGNS if sign in ("multi", "all") else (sign,)
    regions, labels = [], []
    for index, name in enumerate(SUBREGIONS):
        flags = [meta["annotations"].get(name, {}).get(s) for s in wanted]
        if any(f is None for f in flags):
            continue  # empty = not annotated: the sub-region takes no part (sparse labels)
        regions.append(index)
        labels.append(flags if sign == "multi" else flags[0])
    return np.asarray(regions, dtype=int), np.asarray(labels, dtype=np.int32)

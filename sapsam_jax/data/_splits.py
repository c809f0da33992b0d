"""Patient-level splits and class balancing, paper 2.3.

"train and test subsets were split by patients, such that a given patient cannot occur in both sets.
To avoid any bias of the network towards one class, train and test subsets were balanced after the
split." Splits are seeded and stratified by the patient's label so every split sees both classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


class SplitError(ValueError):
    """The cohort is too small for the asked split: a set that should hold patients holds none."""


def check_split(split: dict, fractions: Sequence[float], flag: str = "--split-fractions") -> None:
    """Raise :class:`SplitError` when a set with a share above 0 got no patient (a cohort of a
    few patients), naming the sets and what to change (``flag``), before any training starts."""
    empty = [
        n for n, share in zip(SPLIT_NAMES, fractions, strict=True) if share > 0 and not split[n]
    ]
    if empty:
        patients = sum(len(split[n]) for n in SPLIT_NAMES)
        shares = " / ".join(
            f"{n} {share:g}" for n, share in zip(SPLIT_NAMES, fractions, strict=True)
        )
        raise SplitError(
            f"{patients} patient(s) leave no patient for the {' and '.join(empty)} set(s) "
            f"(split {shares}); add patients or change {flag}"
        )


def split_by_patient(
    patient_ids: Sequence[str],
    patient_labels: Sequence[int],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Assign each patient to train/val/test, stratified by label; no patient is in two sets.

    ``patient_ids``/``patient_labels`` have one entry per study; a patient's label is the maximum of
    its studies' labels (a patient with any positive scan is a positive patient). A fraction of 0
    (e.g. no validation set for survival, paper 3.3) gives an empty split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1: {fractions}"
        )
    label_of: dict[str, int] = {}
    for pid, label in zip(patient_ids, patient_labels, strict=True):
        label_of[pid] = max(label_of.get(pid, 0), int(label))
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for label in sorted(set(label_of.values())):
        group = sorted(pid for pid, lab in label_of.items() if lab == label)
        rng.shuffle(group)
        for name, part in zip(SPLIT_NAMES, _partition(len(group), fractions), strict=True):
            splits[name].extend(group[part])
    return {name: sorted(ids) for name, ids in splits.items()}


def _partition(n: int, fractions: Sequence[float]) -> list[slice]:
    """Cut ``n`` items into consecutive parts; a non-zero fraction gets >= 1 item if it can."""
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    # Largest-remainder rounding, then make sure no wanted split is empty.
    for idx in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[idx] += 1
    for idx in np.flatnonzero((counts == 0) & (np.asarray(fractions) > 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[idx] += 1
    edges = np.concatenate([[0], np.cumsum(counts)])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def balance_indices(
    labels: Sequence[int],
    *,
    mode: str = "undersample",
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> np.ndarray:
    """Indices of a class-balanced subset (paper 2.3: balanced after the split).

    ``undersample`` keeps as many samples of each class as the rarest class has; ``oversample``
    repeats samples of the rarer classes (drawn without replacement first, then cycled) up to the
    most common class. Returned indices are sorted so the subset keeps its original order.

    With ``groups`` (e.g. the sub-region of each sample) the classes are balanced inside every
    group that has both, and single-class groups are kept whole: the group then says nothing
    about the label, so a network cannot learn "upper sub-region, so a sign" (Table 1 puts most
    signs in the upper lobes) instead of the sign itself. The whole set may stay unbalanced.
    """
    if mode not in ("undersample", "oversample"):
        raise ValueError(f"unknown balancing mode {mode!r}; expected undersample or oversample")
    labels = np.asarray(labels)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups {groups.shape} and labels {labels.shape} differ in shape")
        chosen = []
        for g, group in enumerate(np.unique(groups)):
            members = np.flatnonzero(groups == group)
            kept = balance_indices(labels[members], mode=mode, seed=seed + g)
            chosen.append(members[kept])
        return np.sort(np.concatenate(chosen))
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    target = counts.min() if mode == "undersample" else counts.max()
    chosen = []
    for cls in classes:
        members = rng.permutation(np.flatnonzero(labels == cls))
        reps = int(np.ceil(target / len(members)))
        chosen.append(np.tile(members, reps)[:target])
    return np.sort(np.concatenate(chosen))

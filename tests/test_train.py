"""Training: splits, balancing, augmentation, frozen blocks, sharding, resume (issue 5 checks)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from _fake_cache import FakeCache
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sapsam_jax.config import SIGNS
from sapsam_jax.data import (
    augment_batch,
    balance_indices,
    rotate_zoom,
    split_by_patient,
    study_label,
    task_samples,
)
from sapsam_jax.train import TINY, binary_metrics, bootstrap_intervals, roc_auc
from sapsam_jax.train._loop import (
    _replicate,
    _step_spec,
    epoch_order,
    fit,
    load_run_data,
    positive_weights,
)
from sapsam_jax.train._model import build_model
from sapsam_jax.train._step import (
    StepSpec,
    frozen_block_names,
    make_optimizer,
    make_train_step,
    per_sample_loss,
    set_train_mode,
)

# ---------------------------------------------------------------- splits and balancing (2.3)


def test_split_by_patient_has_no_leakage_and_is_stratified():
    patients = [f"P{i // 3}" for i in range(60)]  # 20 patients, 3 studies each
    labels = [int(i // 3 % 4 == 0) for i in range(60)]  # 5 positive patients
    split = split_by_patient(patients, labels, fractions=(0.6, 0.2, 0.2), seed=3)
    sets = [set(split[name]) for name in ("train", "val", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2])
    assert sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(patients)
    positives = {p for p, lab in zip(patients, labels, strict=True) if lab}
    assert all(s & positives for s in sets), "every split must see positive patients"
    assert [len(s) for s in sets] == [12, 4, 4]
    assert split == split_by_patient(patients, labels, fractions=(0.6, 0.2, 0.2), seed=3)
    assert split != split_by_patient(patients, labels, fractions=(0.6, 0.2, 0.2), seed=4)


def test_split_allows_no_validation_set():
    split = split_by_patient(
        [f"P{i}" for i in range(9)],
        [i % 2 for i in range(9)],
        fractions=(2 / 3, 0.0, 1 / 3),
        seed=0,
    )
    assert split["val"] == [] and len(split["train"]) == 6 and len(split["test"]) == 3


@pytest.mark.parametrize("mode, expected", [("undersample", 3), ("oversample", 9)])
def test_balance_indices(mode, expected):
    labels = np.array([0] * 9 + [1] * 3)
    idx = balance_indices(labels, mode=mode, seed=0)
    assert np.bincount(labels[idx]).tolist() == [expected, expected]
    if mode == "undersample":
        assert len(set(idx)) == len(idx)  # no repeats
    else:
        assert set(idx[labels[idx] == 1]) == {9, 10, 11}  # every minority sample is used


def test_balance_indices_by_group_removes_the_group_shortcut():
    # Sub-region 0 ("upper"): 2 positives, 6 negatives; 1: 1 positive, 2 negatives; 2: no sign.
    groups = np.array([0] * 8 + [1] * 3 + [2] * 5)
    labels = np.array([1, 1] + [0] * 6 + [1, 0, 0] + [0] * 5)
    idx = balance_indices(labels, mode="oversample", seed=0, groups=groups)
    for group, size in [(0, 6), (1, 2)]:
        chosen = labels[idx][groups[idx] == group]
        assert np.bincount(chosen).tolist() == [size, size]  # P(sign | sub-region) = 1/2
    assert sorted(idx[groups[idx] == 2]) == [11, 12, 13, 14, 15]  # single-class group kept whole
    under = balance_indices(labels, mode="undersample", seed=0, groups=groups)
    assert np.bincount(labels[under][groups[under] == 0]).tolist() == [2, 2]
    with pytest.raises(ValueError, match="differ in shape"):
        balance_indices(labels, groups=groups[:-1])


def test_epoch_order_draws_rotations_per_epoch_reproducibly():
    rotations = np.repeat(np.arange(27), 4)
    full = epoch_order(rotations, None, seed=0, epoch=1)
    assert sorted(full) == list(range(len(rotations)))
    part = epoch_order(rotations, 9, seed=0, epoch=1)
    assert len(np.unique(rotations[part])) == 9 and len(part) == 36
    np.testing.assert_array_equal(part, epoch_order(rotations, 9, seed=0, epoch=1))
    assert set(rotations[part]) != set(rotations[epoch_order(rotations, 9, seed=0, epoch=2)])


def test_study_labels_per_task():
    meta = {"cpa": 1, "survival_2y": 1}
    assert study_label(meta, "disease") == 1
    assert study_label(meta, "survival") == 0  # alive at two years: negative (paper 3.3)
    assert study_label({"cpa": 1, "survival_2y": 0}, "survival") == 1
    assert study_label({"cpa": 0, "survival_2y": None}, "survival") is None
    # A control's follow-up takes no part: survival of CPA patients (paper 3.3).
    assert study_label({"cpa": 0, "survival_2y": 1}, "survival") is None
    annotated = {"cpa": 1, "annotations": {"left_upper": {"cavity": 1, "fungus_ball": None}}}
    assert study_label(annotated, "signs", "cavity") == 1
    assert study_label(annotated, "signs", "fungus_ball") is None  # not annotated: no part
    assert study_label({"cpa": 1, "annotations": {}}, "signs", "cavity") is None


def test_sign_split_holds_only_patients_with_annotated_subregions(tmp_path):
    cache = FakeCache(n_patients=10)
    annotated = {"P01", "P03", "P05", "P06", "P08"}
    for sid in cache.study_ids:
        if cache.meta(sid)["patient_id"] not in annotated:
            cache.meta(sid)["annotations"] = {}  # sparse labels (paper 1.2)
    cfg = TINY.replace(task="signs", sign="cavity", workdir=str(tmp_path))
    data = load_run_data(cfg, cache, tmp_path)
    split = json.loads((tmp_path / "split.json").read_text())
    assert set(split["train"]) | set(split["val"]) | set(split["test"]) == annotated
    for part in (data.train, data.val, data.test):
        assert len(part) and set(part.patient_ids) <= annotated


# ---------------------------------------------------------------- augmentation (2.3)


def _smooth_image(shape=(41, 33), seed=0):
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 3).astype(np.float32)


@pytest.mark.parametrize("angle", [17.0, -9.5])
def test_rotation_matches_scipy(angle):
    img = _smooth_image()
    ref = ndi.rotate(img, angle, reshape=False, order=1, mode="constant", cval=0.0)
    out = np.asarray(rotate_zoom(jnp.asarray(img[..., None]), angle, 1.0))[..., 0]
    # Compare where the source pixel lies inside the image (the libraries treat edges differently).
    ones = np.ones_like(img)
    inside = (ndi.rotate(ones, angle, reshape=False, order=1) > 0.999) & (
        np.asarray(rotate_zoom(jnp.asarray(ones[..., None]), angle, 1.0))[..., 0] > 0.999
    )
    assert inside.mean() > 0.6
    np.testing.assert_allclose(out[inside], ref[inside], atol=2e-5)


def test_zoom_scales_a_blob_by_the_requested_factor():
    yy, xx = np.mgrid[:65, :65] - 32.0
    blob = np.exp(-(yy**2 + xx**2) / (2 * 6.0**2)).astype(np.float32)
    for zoom in (0.8, 1.2):
        out = np.asarray(rotate_zoom(jnp.asarray(blob[..., None]), 0.0, zoom))[..., 0]
        sigma = np.sqrt((out * (yy**2 + xx**2)).sum() / out.sum() / 2)
        assert sigma == pytest.approx(6.0 * zoom, rel=0.02)


def test_augment_batch_keeps_statistics_and_is_seeded():
    images = jnp.asarray(np.stack([_smooth_image(seed=s) for s in range(16)])[..., None])
    a = augment_batch(images, jax.random.key(1))
    b = augment_batch(images, jax.random.key(1))
    c = augment_batch(images, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    centre = (slice(None), slice(12, 29), slice(10, 23))
    # Rotation and zoom move content but keep the intensity distribution of the centre.
    assert float(a[centre].mean()) == pytest.approx(float(images[centre].mean()), abs=0.01)
    assert float(a.max()) <= float(images.max()) + 1e-6


def test_flip_mirrors_about_half_and_leaves_the_rest_as_without_it():
    images = jnp.asarray(np.stack([_smooth_image(seed=s) for s in range(32)])[..., None])
    plain = np.asarray(augment_batch(images, jax.random.key(3)))
    flipped = np.asarray(augment_batch(images, jax.random.key(3), flip=True))
    same = np.all(np.isclose(plain, flipped, atol=1e-6), axis=(1, 2, 3))
    assert 8 <= (~same).sum() <= 24  # Bernoulli(1/2) over 32 images
    # Without rotation or zoom a flipped image is exactly the mirror of its input.
    still = np.asarray(
        augment_batch(
            images, jax.random.key(3), max_rotation_deg=0.0, zoom_range=(1.0, 1.0), flip=True
        )
    )
    for out, image in zip(still, np.asarray(images), strict=True):
        assert np.allclose(out, image, atol=1e-5) or np.allclose(out, image[:, ::-1], atol=1e-5)
    assert not np.allclose(still[~same], np.asarray(images)[~same], atol=1e-5)


# ---------------------------------------------------------------- metrics


def test_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) * 0.5 + y * 0.3, 2)  # ties included
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert roc_auc(y, s) == pytest.approx(brute)
    m = binary_metrics(y, s)
    pred = s >= 0.5
    tp = np.sum(pred & (y == 1))
    assert m["precision"] == pytest.approx(tp / pred.sum())
    assert m["recall"] == pytest.approx(tp / (y == 1).sum())
    fp, fn = np.sum(pred & (y == 0)), np.sum(~pred & (y == 1))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["accuracy"] == pytest.approx(np.mean(pred == (y == 1)))
    ci = bootstrap_intervals(y, s, n_resamples=200)
    assert ci["f1"][0] <= m["f1"] <= ci["f1"][1]
    assert ci["auc"][1] - ci["auc"][0] < 0.2


def test_roc_curve_steps_diagonally_over_ties_and_encloses_the_auc():
    from sapsam_jax.train import roc_curve

    fpr, tpr = roc_curve([1, 0, 1, 0], [0.5] * 4)  # one threshold: one diagonal step
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.6 + y * 0.2, 1)  # 9 distinct scores: many mixed ties
    fpr, tpr = roc_curve(y, s)
    assert len(fpr) == len(np.unique(s)) + 1
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # trapezoids (NumPy 1.26 has no
    assert area == pytest.approx(brute)  # np.trapezoid)


def test_undefined_metrics_are_nan_and_bootstraps_skip_them():
    nan = pytest.approx(np.nan, nan_ok=True)
    none_positive = binary_metrics([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4])
    assert none_positive["accuracy"] == 1.0
    assert [none_positive[k] for k in ("precision", "recall", "f1", "auc")] == [nan] * 4
    missed = binary_metrics([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4])  # nothing called positive
    assert (missed["precision"], missed["recall"], missed["f1"]) == (nan, 0.0, 0.0)

    # A perfect classifier, 2 positive patients of 8: resamples without a positive patient have
    # no recall; they must not enter its interval as zeros.
    patient_y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    y = np.repeat(patient_y, 5)
    s = np.where(y == 1, 0.9, 0.1)
    ci = bootstrap_intervals(y, s, n_resamples=200, groups=np.repeat(np.arange(8), 5))
    assert ci["recall"] == ci["precision"] == ci["f1"] == (1.0, 1.0)
    assert bootstrap_intervals([0, 0], [0.1, 0.2], n_resamples=5)["recall"] == (nan, nan)
    # No samples at all: every metric is undefined, accuracy too (it read 0 %).
    empty = binary_metrics([], [])
    assert [empty[k] for k in ("accuracy", "precision", "recall", "f1", "auc")] == [nan] * 5
    assert empty["n"] == 0


def test_patient_bootstrap_is_wider_when_images_of_a_patient_agree():
    # 12 patients x 40 images; each patient's images share one score: 12 observations, not 480.
    rng = np.random.default_rng(1)
    patient_y = np.array([0, 1] * 6)
    patient_s = np.clip(0.5 + (patient_y - 0.5) * 0.4 + rng.normal(0, 0.25, 12), 0, 1)
    y, s = np.repeat(patient_y, 40), np.repeat(patient_s, 40)
    patients = np.repeat([f"P{i:02d}" for i in range(12)], 40)
    images = bootstrap_intervals(y, s, n_resamples=300, seed=0)
    by_patient = bootstrap_intervals(y, s, n_resamples=300, seed=0, groups=patients)
    for name in ("f1", "auc"):
        assert np.diff(by_patient[name])[0] > 2 * np.diff(images[name])[0], name
    own = bootstrap_intervals(y, s, n_resamples=50, seed=3, groups=np.arange(len(y)))
    assert own == bootstrap_intervals(y, s, n_resamples=50, seed=3)  # one image per group
    with pytest.raises(ValueError, match="groups for"):
        bootstrap_intervals(y, s, groups=patients[:-1])


# ---------------------------------------------------------------- steps: freezing, sharding


def _tiny_setup(cfg, n_devices=None):
    model, preprocessing = build_model(cfg, num_classes=2, seed=0)
    spec = StepSpec(image_size=(32, 32), preprocessing=preprocessing)
    optimizer = make_optimizer(model, cfg, steps_per_epoch=10)
    devices = np.array(jax.devices()[: n_devices or len(jax.devices())])
    mesh = Mesh(devices, ("data",))
    _replicate((model, optimizer), NamedSharding(mesh, P()))
    return model, optimizer, spec, mesh


def _batch(mesh, n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 32, 32, 3)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.int32)
    return jax.device_put((images, labels), NamedSharding(mesh, P("data")))


def test_frozen_blocks_do_not_change_and_the_rest_does():
    cfg = TINY.replace(frozen_blocks=2, warmup_epochs=0.0, learning_rate=0.05)
    model, optimizer, spec, mesh = _tiny_setup(cfg)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    set_train_mode(model, ("block1", "block2"))
    make_train_step(spec)(model, optimizer, *_batch(mesh), jax.random.key(0))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for block in before:
        changed = jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(np.any(a != b)), before[block], after[block])
        )
        if block in ("block1", "block2"):
            assert not any(changed), f"{block} is frozen but changed"
        else:
            assert all(changed), f"{block} should train"


def test_adam_takes_momentum_as_its_first_moment_decay():
    # --momentum was silently ignored with --optimizer adam; it is now Adam's b1. Two steps of
    # the optimizer against Adam written out in NumPy (b2 0.999, eps 1e-8, bias-corrected).
    lr, b1, b2, eps = 0.1, 0.5, 0.999, 1e-8
    cfg = TINY.replace(optimizer="adam", momentum=b1, learning_rate=lr, warmup_epochs=0.0)
    model, _ = build_model(cfg.replace(grad_clip_norm=None), num_classes=2, seed=0)
    tx = make_optimizer(model, cfg.replace(grad_clip_norm=None), steps_per_epoch=1).tx
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)]
    grads.append(jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params))
    for g in grads:
        updates, state = tx.update(g, state, params)
    g1, g2 = (np.asarray(jax.tree.leaves(g)[-1]) for g in grads)
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    expected = -lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(updates)[-1]), expected, rtol=1e-4)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), not 1.0"):
        TINY.replace(momentum=1.0)


def test_a_negative_frozen_block_count_is_refused_not_sliced_from_the_end():
    # names[:-1] would freeze every block but the last, silently (--frozen-blocks -1).
    with pytest.raises(ValueError, match="frozen_blocks must be >= 0"):
        TINY.replace(frozen_blocks=-1)
    model, _ = build_model(TINY, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="cannot freeze -1 blocks"):
        frozen_block_names(model, -1)


def test_frozen_inception_blocks_keep_their_batchnorm_statistics():
    # Paper 3.1 freezes the first two blocks; a frozen block's BatchNorm must not keep learning
    # running statistics either (train mode elsewhere updates them).
    cfg = TINY.replace(arch="inception_v3", cam_layer=None, frozen_blocks=2)
    cfg = cfg.replace(warmup_epochs=0.0, learning_rate=0.05)
    model, optimizer, _, mesh = _tiny_setup(cfg)
    spec = StepSpec(image_size=(75, 75), preprocessing="tf")
    frozen = frozen_block_names(model, 2)

    def snapshot(kind):
        return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, kind)))

    params, stats = snapshot(nnx.Param), snapshot(nnx.BatchStat)
    set_train_mode(model, frozen)
    rng = np.random.default_rng(0)
    images = rng.random((8, 75, 75, 3)).astype(np.float32)
    batch = jax.device_put((images, np.arange(8) % 2), NamedSharding(mesh, P("data")))
    make_train_step(spec)(model, optimizer, *batch, jax.random.key(0))
    params_after, stats_after = snapshot(nnx.Param), snapshot(nnx.BatchStat)

    def changed(a, b):
        return any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), a, b)))

    for block in stats:
        if block in frozen:
            assert not changed(stats[block], stats_after[block]), f"{block} statistics moved"
            assert not changed(params[block], params_after[block]), f"{block} weights moved"
        elif block.startswith("mixed"):
            assert changed(stats[block], stats_after[block]), f"{block} statistics frozen"
    assert set(frozen) <= set(stats)


def test_sign_all_is_not_a_sample_set():
    with pytest.raises(ValueError, match="one network per sign"):
        task_samples(FakeCache(n_patients=2), ["P00-S0"], task="signs", axis="axial", sign="all")


def test_an_unknown_task_or_sign_is_refused_not_read_as_signs():
    # A task that was not disease or survival (a typo such as "survial") was taken for the sign
    # task: cavity flags of sub-region band images came back as its samples, silently.
    cache = FakeCache(n_patients=2)
    with pytest.raises(ValueError, match="unknown task 'survial'.*disease, signs, survival"):
        task_samples(cache, ["P01-S0"], task="survial", axis="axial")
    with pytest.raises(ValueError, match="unknown task 'survial'"):
        study_label(cache.meta("P01-S0"), "survial")
    # An unknown sign read no flag and ended in "no signs samples among 1 studies".
    with pytest.raises(ValueError, match="unknown sign 'cavities'.*cavity"):
        task_samples(cache, ["P01-S0"], task="signs", axis="axial", sign="cavities")


def _one_step_update(cfg):
    """Parameter change of one train step from the same initial weights, batch and key."""
    model, optimizer, spec, mesh = _tiny_setup(cfg)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    set_train_mode(model, ())
    make_train_step(spec)(model, optimizer, *_batch(mesh), jax.random.key(0))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda a, b: np.asarray(b, np.float64) - a, before, after)


def test_gradient_clipping_scales_the_step_to_the_requested_norm():
    lr = 0.05
    # The quick and tiny presets clip at 1.0 themselves: start from an unclipped step.
    cfg = TINY.replace(frozen_blocks=0, warmup_epochs=0.0, learning_rate=lr, grad_clip_norm=None)
    free = _one_step_update(cfg)
    # First SGD step (momentum trace starts at 0): update = -lr * gradient.
    grad_norm = np.sqrt(sum(np.sum(u * u) for u in jax.tree.leaves(free))) / lr
    clip = grad_norm / 4
    clipped = _one_step_update(cfg.replace(grad_clip_norm=float(clip)))
    jax.tree.map(
        lambda c, f: np.testing.assert_allclose(c, f * clip / grad_norm, rtol=2e-3, atol=1e-7),
        clipped,
        free,
    )
    loose = _one_step_update(cfg.replace(grad_clip_norm=float(4 * grad_norm)))  # no effect
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), loose, free)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        cfg.replace(grad_clip_norm=0.0)


def test_sharded_step_equals_single_device_step():
    assert len(jax.devices()) == 2, "conftest sets 2 fake CPU devices"
    cfg = TINY.replace(frozen_blocks=0, warmup_epochs=0.0, learning_rate=0.05)
    results = []
    for n_devices in (1, 2):
        model, optimizer, spec, mesh = _tiny_setup(cfg, n_devices)
        loss, _ = make_train_step(spec)(model, optimizer, *_batch(mesh), jax.random.key(0))
        results.append((float(loss), nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        results[0][1],
        results[1][1],
    )


def test_multi_label_loss_weighs_each_signs_positives():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, size=(6, 3))
    labels = rng.integers(0, 2, size=(6, 3))
    weight = (5.0, 1.0, 0.5)

    def reference(w):  # binary cross-entropy written out, positive term scaled per sign
        p = 1.0 / (1.0 + np.exp(-logits))
        return -(np.asarray(w) * labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean(-1)

    plain = per_sample_loss(jnp.asarray(logits), jnp.asarray(labels), multi_label=True)
    np.testing.assert_allclose(plain, reference((1.0, 1.0, 1.0)), rtol=1e-5)
    weighted = per_sample_loss(jnp.asarray(logits), jnp.asarray(labels), True, weight)
    np.testing.assert_allclose(weighted, reference(weight), rtol=1e-5)


def test_multi_label_run_weighs_signs_by_their_training_balance(tmp_path):
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]])
    assert positive_weights(labels) == pytest.approx((3 / 3, 5 / 1, 5 / 1))
    assert positive_weights(np.zeros((4, 3))) == (1.0, 1.0, 1.0)  # no positives: no weighting

    cfg = TINY.replace(task="signs", sign="multi", epochs=1, workdir=str(tmp_path))
    train_set = load_run_data(cfg, FakeCache(n_patients=6), tmp_path).train
    spec = _step_spec(cfg, train_set, "caffe")
    assert spec.multi_label and spec.positive_weight == positive_weights(train_set.labels)
    assert max(spec.positive_weight) > 1.0, "the fake cohort's signs are rarer than their absence"
    metrics = fit(cfg, FakeCache(n_patients=6), log=lambda *_: None)
    predictions = np.load(tmp_path / "predictions_test.npz")
    assert (
        predictions["probs"].shape == predictions["labels"].shape == (len(predictions["probs"]), 3)
    )
    assert json.loads((tmp_path / "run.json").read_text())["multi_label"] is True
    from sapsam_jax.evaluate import write_run_figures

    names = {path.name for path in write_run_figures(tmp_path)}
    assert {f"roc_{s}.png" for s in SIGNS} | {f"confusion_{s}.png" for s in SIGNS} <= names
    assert 0.0 <= metrics["auc"] <= 1.0


# ---------------------------------------------------------------- data and the loop


def test_run_data_splits_by_patient_and_balances(tmp_path):
    cache = FakeCache(n_patients=10)
    cfg = TINY.replace(task="signs", sign="cavity", workdir=str(tmp_path))
    data = load_run_data(cfg, cache, tmp_path)
    patients = {name: set(getattr(data, name).patient_ids) for name in ("train", "val", "test")}
    assert patients["train"].isdisjoint(patients["test"] | patients["val"])
    assert np.bincount(data.train.labels).tolist()[0] == np.bincount(data.train.labels)[1]
    for held_out in (data.val, data.test):  # scored on equal classes, as the test is
        assert np.bincount(held_out.labels)[0] == np.bincount(held_out.labels)[1] > 0
    assert set(np.unique(data.train.rotations)) == set(range(27))  # paper 2.3 rotations
    assert set(np.unique(data.test.rotations)) == set(range(27))  # as the paper's test set
    unrotated = load_run_data(cfg.replace(eval_rotations="identity"), cache, tmp_path)
    assert set(np.unique(unrotated.test.rotations)) == {13}
    assert set(unrotated.test.study_ids) <= set(data.test.study_ids)
    assert json.loads((tmp_path / "split.json").read_text())["train"] == sorted(patients["train"])


def test_survival_data_holds_only_cpa_scans(tmp_path):
    # A manifest that records follow-up for controls too: they were "survived" negatives.
    cache = FakeCache(n_patients=8)
    for study in cache.study_ids:
        if cache.meta(study)["cpa"] == 0:
            cache.meta(study)["survival_2y"] = 1
    data = load_run_data(TINY.replace(task="survival", workdir=str(tmp_path)), cache, tmp_path)
    for samples in (data.train, data.test):
        assert len(samples) > 0
        assert all(cache.meta(study)["cpa"] == 1 for study in samples.study_ids)


def test_sign_multi_does_not_unbalance_other_tasks(tmp_path):
    # --sign multi means one output per sign for the sign task only; a disease run given it was
    # trained and scored on unbalanced sets.
    cfg = TINY.replace(task="disease", sign="multi", workdir=str(tmp_path))
    assert not cfg.multi_label
    data = load_run_data(cfg, FakeCache(n_patients=7), tmp_path)
    for samples in (data.train, data.val, data.test):
        counts = np.bincount(samples.labels)
        assert counts[0] == counts[1] > 0


def test_evaluation_sets_are_not_oversampled(tmp_path):
    # Validation and test images are not augmented: copies would count one prediction twice.
    cfg = TINY.replace(test_balance="oversample", workdir=str(tmp_path / "run"), cache="fake")
    with pytest.raises(ValueError, match="undersampling only"):
        fit(cfg, FakeCache(n_patients=6), log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # refused before any file
    # A run made before the rule still loads (evaluate, explain, resume).
    assert type(cfg).from_dict(json.loads(cfg.to_json())).test_balance == "oversample"
    with pytest.raises(ValueError, match="unknown train_balance"):
        TINY.replace(train_balance="smote")


def _fit(tmp_path, epochs, **changes):
    cfg = TINY.replace(
        task="disease",
        epochs=epochs,
        workdir=str(tmp_path),
        cache="fake",
        learning_rate=0.02,
        **changes,
    )
    return fit(cfg, FakeCache(n_patients=6), log=lambda *_: None)


def _metrics_lines(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(test metrics, workdir) of the 3-epoch run the interrupted ones must reproduce."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return _fit(workdir, epochs=3), workdir


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, uninterrupted):
    full, full_dir = uninterrupted
    # Interrupted run: the third epoch dies half way (as a kill -9 would), then we rerun.
    import sapsam_jax.train._loop as loop

    original = loop._train_epoch

    def dying(cfg, *args):
        if args[5] == 3:  # epoch argument
            raise KeyboardInterrupt
        return original(cfg, *args)

    monkeypatch.setattr(loop, "_train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", epochs=3)
    assert len(_metrics_lines(tmp_path / "cut")) == 2
    monkeypatch.setattr(loop, "_train_epoch", original)
    resumed = _fit(tmp_path / "cut", epochs=3)
    assert resumed == pytest.approx(full)
    a, b = _metrics_lines(full_dir), _metrics_lines(tmp_path / "cut")
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-6)


def test_warmup_lasts_one_epoch_of_the_rotations_an_epoch_draws(tmp_path, monkeypatch):
    import sapsam_jax.train._loop as loop

    seen = {}
    original = loop.make_optimizer

    def spy(model, cfg, steps_per_epoch):
        seen["steps_per_epoch"] = steps_per_epoch
        return original(model, cfg, steps_per_epoch)

    monkeypatch.setattr(loop, "make_optimizer", spy)
    cfg = TINY.replace(task="disease", epochs=1, rotations_per_epoch=3, workdir=str(tmp_path))
    cache = FakeCache(n_patients=6)
    fit(cfg, cache, log=lambda *_: None)
    rotations = load_run_data(cfg, cache, tmp_path).train.rotations
    drawn = len(epoch_order(rotations, 3, seed=cfg.seed, epoch=1))
    assert drawn == len(rotations) * 3 // 27  # an epoch holds 3 of the 27 rotations
    assert seen["steps_per_epoch"] == drawn // cfg.batch_size


def test_a_negative_warmup_is_refused_not_a_learning_rate_of_zero():
    # optax's warm-up over a negative number of steps stays at its initial value, 0, forever:
    # --warmup-epochs -1 trained nothing, silently.
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        TINY.replace(warmup_epochs=-1.0)


def test_a_dropout_rate_outside_0_1_is_refused():
    # Dropout of 1 zeroes the head's activations (nothing can be learnt); a negative rate scales
    # them in training only.
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
            TINY.replace(dropout_rate=bad)
    assert TINY.replace(dropout_rate=0.0).dropout_rate == 0.0


def test_survival_starts_from_a_torchvision_convention_inception_disease_run(tmp_path, monkeypatch):
    import sapsam_jax.data
    from sapsam_jax.train import load_trained
    from sapsam_jax.train._checkpoint import RunCheckpoints
    from sapsam_jax.train._model import new_model

    cfg = TINY.replace(arch="inception_v3", cam_layer=None, frozen_blocks=0, cache="fake")
    # A disease run whose network has torchvision's conventions (BatchNorm scale, padded average
    # pools), as fit leaves it after loading converted torchvision weights.
    disease = cfg.replace(task="disease", workdir=str(tmp_path / "disease"))
    source = new_model(disease, 2, nnx.Rngs(0))
    source.set_conventions(bn_scale=True, pool_include_pad=True)
    run = {"preprocessing": "tf", "image_size": [75, 75], "num_classes": 2, "multi_label": False}
    run["model_conventions"] = {"bn_scale": True, "pool_include_pad": True}
    workdir = disease.workdir_path
    workdir.mkdir()
    (workdir / "config.json").write_text(disease.to_json())
    (workdir / "run.json").write_text(json.dumps(run))
    (workdir / "split.json").write_text('{"train": [], "val": [], "test": []}')
    ckpts = RunCheckpoints(workdir)
    ckpts.save(source, make_optimizer(source, disease, 1), {"epoch": 1}, best=True)
    ckpts.close()
    monkeypatch.setattr(sapsam_jax.data, "ProjectionCache", lambda path, **kwargs: None)
    assert load_trained(workdir).model.config["bn_scale"]

    model, _ = build_model(
        cfg.replace(task="survival", init_from=str(workdir)), num_classes=2, seed=0
    )
    assert model.config["bn_scale"] and model.config["pool_include_pad"]
    x = jnp.asarray(np.random.default_rng(0).random((2, 75, 75, 3)), jnp.float32)
    model.eval()
    source.eval()
    np.testing.assert_allclose(
        model.mixed0(model.stem(x)), source.mixed0(source.stem(x)), rtol=1e-5
    )


def test_a_kill_between_the_best_and_the_latest_checkpoint_keeps_the_best(
    tmp_path, monkeypatch, uninterrupted
):
    from sapsam_jax.train._checkpoint import RunCheckpoints

    full, full_dir = uninterrupted
    original = RunCheckpoints._save_latest
    best_epochs = []

    def dies_after_best(self, step, *args):
        if step == 2 and self.best.latest_step() == 2:  # epoch 2 was a new best: committed
            best_epochs.append(step)
            raise KeyboardInterrupt
        return original(self, step, *args)

    monkeypatch.setattr(RunCheckpoints, "_save_latest", dies_after_best)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", epochs=3)
    assert best_epochs == [2], "the tiny run's epoch 2 must improve for this test to mean much"
    monkeypatch.setattr(RunCheckpoints, "_save_latest", original)
    assert _fit(tmp_path / "cut", epochs=3) == pytest.approx(full, nan_ok=True)
    # Same kept weights, so the same test predictions (the metrics alone can coincide).
    a, b = (np.load(p / "predictions_test.npz")["probs"] for p in (full_dir, tmp_path / "cut"))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dies_in", ["_append_metrics", "save"])
def test_a_kill_between_metrics_line_and_checkpoint_loses_no_line(
    tmp_path, monkeypatch, dies_in, uninterrupted
):
    import sapsam_jax.train._loop as loop

    full, _ = uninterrupted
    owner = loop if dies_in == "_append_metrics" else loop.RunCheckpoints
    original = getattr(owner, dies_in)

    def dies_at_epoch_2(*args, **kwargs):
        record = args[-1]  # _append_metrics(path, record), save(self, model, optimizer, meta)
        if record["epoch"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, dies_in, dies_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", epochs=3)
    monkeypatch.setattr(owner, dies_in, original)
    assert _fit(tmp_path / "cut", epochs=3) == pytest.approx(full)
    assert [r["epoch"] for r in _metrics_lines(tmp_path / "cut")] == [1, 2, 3]


def test_a_metrics_line_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
    # The line is written before its epoch's checkpoint, so a line cut off mid-write (kill -9,
    # disk full) is always of an epoch the resumed run redoes; it stopped every rerun instead.
    from sapsam_jax.train._loop import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 0.7}\n{"epoch": 2, "train_loss": 0.6}\n{"epo')
    _truncate_metrics(path, 2)
    assert path.read_text() == '{"epoch": 1, "train_loss": 0.7}\n{"epoch": 2, "train_loss": 0.6}\n'


def test_a_damaged_config_or_split_file_is_an_error_naming_it(tmp_path):
    from sapsam_jax.train import TINY
    from sapsam_jax.train._loop import WorkdirError, _check_config, _load_or_make_split
    from sapsam_jax.train._model import load_trained

    cfg = TINY.replace(task="disease", workdir=str(tmp_path))
    for text in ('{"task": "disea', '{"task": "disease"}', "[1, 2]"):  # cut off; fields missing
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(WorkdirError, match=f"{tmp_path / 'config.json'} is damaged"):
            _check_config(cfg, tmp_path)
    (tmp_path / "split.json").write_bytes(b'{"train": ["P0"], "te\xff')
    with pytest.raises(WorkdirError, match=f"{tmp_path / 'split.json'} is damaged"):
        _load_or_make_split(cfg, None, tmp_path)
    # Valid JSON of the wrong shape (edited by hand, an older tool) was a KeyError/TypeError.
    for text in ("[]", '{"train": ["P0"], "val": []}', '{"train": "P0", "val": [], "test": []}'):
        (tmp_path / "split.json").write_text(text)
        with pytest.raises(WorkdirError, match="damaged .it must hold the patient-id lists"):
            _load_or_make_split(cfg, None, tmp_path)
    (tmp_path / "run.json").write_text("")  # gradcam and evaluate load runs this way
    with pytest.raises(WorkdirError, match=f"{tmp_path / 'config.json'} is damaged"):
        load_trained(tmp_path)
    (tmp_path / "config.json").write_text(cfg.to_json())
    for text in ("", "{}", "[]"):
        (tmp_path / "run.json").write_text(text)
        with pytest.raises(WorkdirError, match=f"{tmp_path / 'run.json'} is damaged"):
            load_trained(tmp_path)


def test_workdir_of_another_run_is_refused_and_tensorboard_logs(tmp_path):
    _fit(tmp_path, epochs=1, tensorboard=True)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert b"train/loss" in events.read_bytes() and b"val/f1" in events.read_bytes()
    with pytest.raises(ValueError, match="different run"):
        _fit(tmp_path, epochs=1, seed=5)
    # The split of the checkpoint's run is in split.json: a rerun cannot ask for another one.
    with pytest.raises(ValueError, match=r"split_fractions: \(0\.6, 0\.2, 0\.2\) != \(0\.2"):
        _fit(tmp_path, epochs=2, tensorboard=True, split_fractions=(0.2, 0.2, 0.6))
    _fit(tmp_path, epochs=2, tensorboard=False)  # training longer, without logs: a resume
    assert [r["epoch"] for r in _metrics_lines(tmp_path)] == [1, 2]


def test_a_map_layer_the_architecture_lacks_fails_before_any_work(tmp_path):
    from sapsam_jax.train import train
    from sapsam_jax.train._cli import build_parser, config_from_args

    cfg = TINY.replace(task="signs", cam_layer="block9_conv9", data_dir=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="block9_conv9.*block2_conv2"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "data").exists()  # nothing generated or written
    # Switching architecture drops the preset's VGG map layer unless one is asked for.
    args = ["--preset", "quick", "--arch", "inception_v3"]
    assert config_from_args(build_parser().parse_args(args))[0].cam_layer is None
    args += ["--cam-layer", "mixed9"]
    assert config_from_args(build_parser().parse_args(args))[0].cam_layer == "mixed9"


def test_quick_disease_cohort_is_half_controls_and_named_apart():
    from sapsam_jax.train import preset_config
    from sapsam_jax.train._cli import build_parser, config_from_args

    signs, disease = preset_config("quick", "signs"), preset_config("quick", "disease")
    assert signs.synthetic.control_fraction == 0.25 and signs.synthetic.name == "n40-seed0"
    assert disease.synthetic.control_fraction == 0.5
    assert disease.synthetic.name == "n40-seed0-controls0.5"  # its own cohort and cache
    args = ["--preset", "quick", "--task", "disease", "--control-fraction", "0.3"]
    cfg = config_from_args(build_parser().parse_args(args))[0]
    assert cfg.synthetic.control_fraction == 0.3 and cfg.synthetic.n_patients == 40
    with pytest.raises(ValueError, match="control_fraction <= 1"):
        config_from_args(build_parser().parse_args(["--control-fraction", "1.5"]))


def test_preprocessing_without_a_terminal_logs_progress_lines(monkeypatch):
    from sapsam_jax.train import _data

    lines = []
    monkeypatch.setattr(_data, "PROGRESS_LOG_SECONDS", 0.0)
    progress = _data._LogProgress(82, lines.append, enabled=True)
    progress.update(10)
    progress.update(40)
    _data._LogProgress(82, lines.append, enabled=False).update(50)  # a terminal: the bar shows
    assert lines == ["preprocess: 10/82 studies", "preprocess: 40/82 studies"]


def test_a_set_of_one_class_is_reported():
    from types import SimpleNamespace

    from sapsam_jax.train import TINY
    from sapsam_jax.train._loop import _warn_one_class_sets

    class Samples:
        def __init__(self, labels):
            self.labels = np.asarray(labels)

        def __len__(self):
            return len(self.labels)

    samples = Samples

    lines = []
    data = SimpleNamespace(train=samples([0, 1, 1]), val=None, test=samples([0, 0]))
    _warn_one_class_sets(data, TINY.replace(task="signs", sign="fungus_ball"), lines.append)
    assert lines == [
        "warning: the test set holds no positive sample for fungus_ball (2 samples): "
        "too few patients or annotations for this task"
    ]
    lines.clear()
    multi = samples([[0, 1, 1], [1, 1, 0]])  # every sample shows a fungus ball
    _warn_one_class_sets(SimpleNamespace(train=multi, val=None, test=multi), TINY, lines.append)
    assert len(lines) == 2 and all("no negative sample for fungus_ball" in ln for ln in lines)


def test_host_prefetch_raises_the_producers_error_and_stops_with_the_consumer(monkeypatch):
    import threading

    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from sapsam_jax.train import _data

    monkeypatch.setattr(_data, "fits_on_device", lambda _n: False)  # the prefetching path
    mesh = Mesh(np.array(jax.devices()), ("data",))
    images = np.arange(8 * 4 * 4 * 3, dtype=np.float32).reshape(8, 4, 4, 3)
    batches = _data.Batches(
        images,
        np.arange(8, dtype=np.int32),
        NamedSharding(mesh, P("data")),
        NamedSharding(mesh, P()),
    )
    assert not batches.device_resident
    got = [np.asarray(y) for _, y in batches.iterate(np.array([3, 1, 0, 2]), 2)]
    assert [g.tolist() for g in got] == [[3, 1], [0, 2]]
    # A failing gather (index 99 of 8) is raised in the loop instead of leaving it waiting.
    with pytest.raises(IndexError):
        list(batches.iterate(np.array([0, 1, 99, 2]), 2))
    # A loop that stops early stops the producer too (it held batches and blocked forever).
    before = threading.active_count()
    stream = batches.iterate(np.arange(8), 2)
    next(stream)
    stream.close()
    assert threading.active_count() == before


def test_non_finite_weights_are_not_checkpointed():
    from sapsam_jax.train._loop import NonFiniteLossError, _check_finite_parameters

    model, _ = build_model(TINY, num_classes=2, seed=0)
    _check_finite_parameters(model, 1)  # finite: no error
    kernel = model.head.fc1.kernel
    kernel.set_value(kernel[...].at[0, 0].set(np.inf))
    with pytest.raises(NonFiniteLossError, match="non-finite weights after epoch 3"):
        _check_finite_parameters(model, 3)
    # A BatchNorm running variance gone NaN is caught too.
    model, _ = build_model(TINY.replace(arch="inception_v3", cam_layer=None), num_classes=2, seed=0)
    _check_finite_parameters(model, 1)
    stats = nnx.state(model, nnx.BatchStat)
    nan = jax.tree.map(lambda x: np.full_like(x, np.nan), nnx.to_pure_dict(stats))
    nnx.replace_by_pure_dict(stats, nan)
    nnx.update(model, stats)
    with pytest.raises(NonFiniteLossError, match="after epoch 2"):
        _check_finite_parameters(model, 2)


def test_init_from_must_be_the_same_network():
    from sapsam_jax.train._model import check_same_network

    with pytest.raises(ValueError, match="head_units 32 there, 16 here"):
        check_same_network(TINY.replace(init_from="runs/disease"), TINY.replace(head_units=32))
    check_same_network(TINY, TINY.replace(dropout_rate=0.3))


def test_init_from_is_checked_before_any_work(tmp_path):
    from sapsam_jax.train._loop import WorkdirError, check_init_from

    source = tmp_path / "disease"
    cfg = TINY.replace(task="survival", init_from=str(source))
    with pytest.raises(WorkdirError, match="not a training workdir: config.json is missing"):
        check_init_from(cfg)
    source.mkdir()
    (source / "config.json").write_text(TINY.replace(task="disease", head_units=32).to_json())
    for name in ("run.json", "split.json"):
        (source / name).write_text("{}")
    (source / "checkpoints" / "latest" / "1.orbax-checkpoint-tmp-3").mkdir(parents=True)
    with pytest.raises(WorkdirError, match="holds no checkpoint yet"):
        check_init_from(cfg)  # a save still in progress is no checkpoint
    from sapsam_jax.evaluate import find_trained_runs

    assert find_trained_runs([tmp_path]) == []  # nor a run for evaluate.py to rebuild
    (source / "checkpoints" / "latest" / "1").mkdir()
    assert find_trained_runs([tmp_path]) == [source.resolve()]
    with pytest.raises(WorkdirError, match="another network .head_units 32 there, 16 here"):
        check_init_from(cfg)
    # Survival splits by the source run's test patients: a split.json without its patient lists
    # was found only after preprocessing, with config.json left in the new workdir and the advice
    # to train in a new --workdir, which cannot help.
    with pytest.raises(WorkdirError, match=r"--init-from .*split.json is damaged.*--init-from"):
        check_init_from(cfg.replace(head_units=32))
    (source / "split.json").write_text('{"train": [], "val": [], "test": []}')
    check_init_from(cfg.replace(head_units=32))


def test_a_cohort_too_small_for_the_split_is_refused_and_leaves_no_run(tmp_path):
    from sapsam_jax.data import SplitError

    workdir = tmp_path / "run" / "cavity"  # --sign all: fit makes both folders
    cfg = TINY.replace(task="disease", epochs=1, workdir=str(workdir), cache="fake")
    with pytest.raises(SplitError, match=r"2 patient\(s\) leave no patient for the val and test"):
        fit(cfg, FakeCache(n_patients=2), log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # no config.json to refuse the corrected rerun with


def test_survival_split_has_no_validation_set_whatever_its_share(tmp_path):
    from sapsam_jax.train._loop import _load_or_make_split

    cache = FakeCache(n_patients=12)
    disease = tmp_path / "disease"
    disease.mkdir()
    patients = sorted({cache.meta(s)["patient_id"] for s in cache.study_ids})
    (disease / "split.json").write_text(
        json.dumps({"train": patients[:8], "val": [], "test": patients[8:]})
    )
    cfg = TINY.replace(task="survival", init_from=str(disease))
    split = _load_or_make_split(
        cfg.replace(survival_split_fractions=(0.6, 0.2, 0.2)), cache, tmp_path / "run"
    )
    assert split["val"] == [] and split["test"] and split["train"]  # paper 3.3, not refused


def test_a_cache_run_records_the_cache_s_preset_and_still_resumes(tmp_path, monkeypatch):
    import sapsam_jax.train._loop as loop
    from sapsam_jax.train._loop import _check_or_write_config

    cache = FakeCache(n_patients=6)  # a "tiny" cache, given to a quick-preset run
    monkeypatch.setattr(loop, "prepare_cache", lambda cfg, log=None: cache)
    lines = []
    cfg = TINY.replace(task="disease", epochs=1, preprocess_preset="quick", cache="fake")
    loop.train(cfg.replace(workdir=str(tmp_path / "run")), log=lines.append)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["preprocess_preset"] == "tiny"
    assert any("holds preprocessing preset 'tiny', not 'quick'" in str(x) for x in lines)

    old = TINY.replace(preprocess_preset="paper", cache="c", workdir=str(tmp_path))
    _check_or_write_config(old, tmp_path)  # a run recorded before the cache's preset was
    _check_or_write_config(old.replace(preprocess_preset="tiny"), tmp_path)  # resumes


def test_a_trained_run_reads_its_manifest_s_studies(tmp_path):
    from sapsam_jax.io import Study, write_manifest
    from sapsam_jax.train._model import manifest_study_ids

    manifest = write_manifest(
        tmp_path / "m.csv", [Study(f"S{i}", "P", tmp_path / f"s{i}.nii.gz", cpa=1) for i in (1, 2)]
    )
    assert manifest_study_ids(TINY.replace(manifest=str(manifest))) == ["S1", "S2"]
    assert manifest_study_ids(TINY.replace(manifest=str(tmp_path / "gone.csv"))) is None
    assert manifest_study_ids(TINY) is None  # the synthetic cohort: its whole folder


def test_frozen_random_blocks_are_warned_about(tmp_path):
    lines = []
    cfg = TINY.replace(task="disease", epochs=1, frozen_blocks=1, workdir=str(tmp_path))
    fit(cfg, FakeCache(n_patients=6), log=lines.append)
    assert any("frozen at their random initialisation" in str(line) for line in lines)


def test_resume_on_changed_data_is_refused(tmp_path):
    from sapsam_jax.train._loop import WorkdirError

    cfg = TINY.replace(task="disease", epochs=1, workdir=str(tmp_path), cache="fake")
    cache = FakeCache(n_patients=6)
    fit(cfg, cache, log=lambda *_: None)
    fit(cfg.replace(epochs=2), cache, log=lambda *_: None)  # same data: a resume
    relabelled = FakeCache(n_patients=6)
    sid = relabelled.study_ids[0]
    relabelled._meta[sid] = relabelled._meta[sid] | {"cpa": 1 - relabelled._meta[sid]["cpa"]}
    with pytest.raises(WorkdirError, match=f"relabelled .* studies {sid}"):
        fit(cfg.replace(epochs=3), relabelled, log=lambda *_: None)
    bigger = FakeCache(n_patients=8)  # a new patient's scans would join no set: also refused
    with pytest.raises(WorkdirError, match="began on other data"):
        fit(cfg.replace(epochs=3), bigger, log=lambda *_: None)


def test_survival_job_trains_disease_first_and_tests_on_its_test_patients(tmp_path, monkeypatch):
    import sapsam_jax.data
    import sapsam_jax.train._loop as loop
    from sapsam_jax.train import train

    cache = FakeCache(n_patients=12)
    monkeypatch.setattr(loop, "prepare_cache", lambda cfg, log=None: cache)
    # load_trained opens the disease run's cache by path: the same stand-in.
    monkeypatch.setattr(sapsam_jax.data, "ProjectionCache", lambda path, **kwargs: cache)
    cfg = TINY.replace(task="survival", epochs=1, workdir=str(tmp_path), cache="fake")
    results = train(cfg, log=lambda *_: None)
    assert set(results) == {"survival"}
    disease = json.loads((tmp_path / "disease" / "split.json").read_text())
    survival = json.loads((tmp_path / "split.json").read_text())
    # Paper 3.3: no validation set; tested only on patients the disease network never saw.
    assert survival["val"] == [] and survival["test"]
    assert set(survival["test"]) <= set(disease["test"])
    assert not set(survival["test"]) & (set(disease["train"]) | set(disease["val"]))
    # The disease network got the survival test share (a third) as its test share.
    assert json.loads((tmp_path / "disease" / "config.json").read_text())["split_fractions"] == [
        pytest.approx(v) for v in (1 - 0.2 - 1 / 3, 0.2, 1 / 3)
    ]


# Scripted validation results per epoch: the loss is lowest at epoch 2, F1 highest at epoch 1,
# undefined (no predicted positive) at epoch 4. The run resumes after epoch 2: had it lost its
# best score, epoch 3 (loss) or epochs 3 and 5 (F1) would have been kept instead.
_SCRIPTED_VAL = {
    1: {"loss": 0.50, "f1": 0.60},
    2: {"loss": 0.40, "f1": 0.50},
    3: {"loss": 0.45, "f1": 0.55},
    4: {"loss": 0.80, "f1": float("nan")},
    5: {"loss": 0.70, "f1": 0.58},
}


@pytest.mark.parametrize(
    ("select_by", "kept"), [("val_loss", 2), ("val_f1", 1)], ids=["loss", "f1"]
)
def test_the_best_checkpoint_is_chosen_by_select_by_also_across_a_resume(
    tmp_path, monkeypatch, select_by, kept
):
    import sapsam_jax.train._loop as loop
    from sapsam_jax.train._checkpoint import RunCheckpoints

    epoch = {"n": 0}

    def scripted(*args):
        epoch["n"] += 1
        values = _SCRIPTED_VAL[epoch["n"]]
        return {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "auc": 0.5} | values

    monkeypatch.setattr(loop, "evaluate_samples", scripted)
    _fit(tmp_path, epochs=2, select_by=select_by)  # stopped after epoch 2, then resumed
    _fit(tmp_path, epochs=5, select_by=select_by)
    ckpts = RunCheckpoints(tmp_path)
    assert ckpts.best.latest_step() == kept
    assert ckpts._best_meta()["best_score"] == _SCRIPTED_VAL[kept][select_by[4:]]
    ckpts.close()


def test_a_checkpoint_from_before_select_by_resumes_against_its_best_val_loss(tmp_path):
    from sapsam_jax.train._checkpoint import RunCheckpoints

    ckpts = RunCheckpoints(tmp_path)
    model, _ = build_model(TINY.replace(task="disease"), num_classes=2, seed=0)
    optimizer = make_optimizer(model, TINY, 1)
    # Epoch 1 as the older code saved it: the best validation loss under its old key.
    ckpts.save(model, optimizer, {"epoch": 1, "best_val_loss": 0.123, "best_epoch": 1}, best=True)
    assert ckpts.restore_latest(model, optimizer)["best_score"] == 0.123
    ckpts.close()


def test_the_data_mesh_lists_each_process_devices_together(monkeypatch):
    # to_global gives process i the i-th contiguous slice of a batch: that holds only when the
    # mesh lists every process's devices together, whatever order jax.devices() returns.
    from types import SimpleNamespace

    from sapsam_jax.train._data import data_mesh

    fake = [SimpleNamespace(process_index=p, id=i) for i, p in ((3, 1), (0, 0), (2, 1), (1, 0))]
    monkeypatch.setattr(jax, "devices", lambda: fake)
    monkeypatch.setattr("jax.sharding.Mesh", lambda devices, names: (list(devices), names))
    devices, names = data_mesh()
    assert [(d.process_index, d.id) for d in devices] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert names == ("data",)
    monkeypatch.undo()
    assert data_mesh().devices.tolist() == jax.devices()  # the 2 fake CPU devices, in order


def test_no_epoch_with_a_defined_select_by_metric_is_a_warning(tmp_path, monkeypatch):
    import sapsam_jax.train._loop as loop
    from sapsam_jax.train._checkpoint import saved_epochs

    nan = float("nan")  # e.g. a validation set of one class has no ROC AUC
    scores = {"loss": 0.5, "accuracy": 0.5, "precision": nan, "recall": nan, "f1": nan, "auc": nan}
    monkeypatch.setattr(loop, "evaluate_samples", lambda *args: scores)
    lines = []
    cfg = TINY.replace(task="disease", epochs=2, workdir=str(tmp_path), cache="fake")
    fit(cfg.replace(select_by="val_auc"), FakeCache(n_patients=6), log=lines.append)
    assert saved_epochs(tmp_path, "best") == [] and saved_epochs(tmp_path, "latest") == [1, 2]
    assert any(
        "no epoch had a defined val_auc; the test predictions come from" in line for line in lines
    )

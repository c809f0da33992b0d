"""An in-memory stand-in for ProjectionCache with learnable toy images, for training unit tests.

Positive images carry a bright square (gray) / a strong soft-tissue band patch (bands); negatives
are noise. Patients have 2 studies each so patient-level splitting is exercised.
"""

import numpy as np

from sapsam_jax.config import SIGNS, SUBREGIONS, preprocess_preset


class FakeCache:
    def __init__(self, n_patients=8, shape=(32, 32), seed=0, path="fake-cache"):
        self.path = path
        self.config = preprocess_preset("tiny")
        self.preset = self.config.name
        rng = np.random.default_rng(seed)
        self._meta, self._gray, self._bands = {}, {}, {}
        for p in range(n_patients):
            cpa = p % 2
            for s in range(2):
                sid = f"P{p:02d}-S{s}"
                self._meta[sid] = _meta(sid, f"P{p:02d}", cpa, rng)
                self._gray[sid] = _images(rng, (27, *shape), cpa)
                self._bands[sid] = _bands(rng, shape, self._meta[sid])

    @property
    def study_ids(self):
        return sorted(self._meta)

    def meta(self, sid):
        return self._meta[sid]

    def gray(self, sid, axis):
        return self._gray[sid]

    def bands(self, sid, axis):
        return self._bands[sid]

    def lesions(self, sid, axis):
        return None


def _meta(sid, pid, cpa, rng):
    annotations = {
        region: {flag: int(cpa and rng.random() < 0.5) for flag in ("preexisting", *SIGNS)}
        for region in SUBREGIONS
    }
    return {
        "study_id": sid,
        "patient_id": pid,
        "cpa": cpa,
        "survival_2y": int(rng.random() < 0.5) if cpa else None,
        "annotations": annotations,
    }


def _images(rng, shape, positive):
    images = rng.normal(0.3, 0.05, shape).astype(np.float32)
    if positive:
        images[..., 10:20, 10:20] += 0.5
    return np.clip(images, 0, 1).astype(np.float16)


def _bands(rng, shape, meta):
    out = rng.normal(0.3, 0.05, (27, len(SUBREGIONS), *shape, 3)).astype(np.float32)
    for r, region in enumerate(SUBREGIONS):
        if meta["annotations"][region]["cavity"]:
            out[:, r, 8:20, 8:20, 0] += 0.6
    return np.clip(out, 0, 1).astype(np.float16)

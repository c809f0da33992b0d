"""Where a training run's projections come from, and how they reach the device.

With no data given the built-in synthetic cohort is generated once (cached under ``data_dir``) and
preprocessed; ``--manifest`` preprocesses a cohort into a cache; ``--cache`` uses one as is.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from queue import Full, Queue

import jax
import numpy as np
from tqdm.auto import tqdm

from sapsam_jax.backend import get_backend
from sapsam_jax.config import preprocess_preset
from sapsam_jax.data import ProjectionCache, preprocess_cohort
from sapsam_jax.data._cache import PROJECTION_VERSION
from sapsam_jax.data._cohort import manifest_studies
from sapsam_jax.train._distributed import barrier, is_primary

# Keep the whole training set on the device when it takes at most this share of device memory.
DEVICE_RESIDENT_FRACTION = 0.25


def prepare_cache(cfg, log=print) -> ProjectionCache:
    """The ProjectionCache this run trains on, building it (and the synthetic cohort) if needed."""
    if cfg.cache:
        return ProjectionCache(cfg.cache)
    config = preprocess_preset(cfg.preprocess_preset)
    manifest = Path(cfg.manifest) if cfg.manifest else ensure_synthetic_cohort(cfg, log=log)
    cache_dir = cache_dir_for(cfg, manifest, config)
    log(f"preprocessing {manifest} -> {cache_dir} (finished studies are reused)")
    if jax.process_count() > 1 or get_backend(cfg.backend).is_gpu or _cpu_workers() == 1:
        # Across processes each one preprocesses its own shard of the cohort (preprocess_cohort
        # follows jax.distributed), then all wait for the whole cache.
        preprocess_cohort(manifest, cache_dir, config=config, backend=cfg.backend)
        barrier(f"projection cache {cache_dir.name}")
    else:
        _preprocess_on_cpu_cores(manifest, cache_dir, config, _cpu_workers(), log=log)
    # The manifest's studies only: studies an edited manifest dropped stay in the folder.
    return ProjectionCache(cache_dir, studies=[s.study_id for s in manifest_studies(manifest)])


def cache_dir_for(cfg, manifest: Path, config) -> Path:
    """Where the projections of ``manifest`` under preprocessing ``config`` are cached."""
    # A user's manifest: its name and a digest of its path, so two cohorts' `cohort.csv` in
    # different folders never share (and mix in) one cache. The synthetic cohort's folder name
    # says what it holds.
    name = manifest.stem if cfg.manifest else manifest.parent.name
    if cfg.manifest:
        name += "-" + hashlib.sha1(str(Path(manifest).resolve()).encode()).hexdigest()[:8]
    # The config's digest too: a changed preprocessing config gets a cache of its own instead of
    # mixing projections of two configs.
    return Path(cfg.data_dir) / f"cache-{name}-{cfg.preprocess_preset}-{config_digest(config)}"


def config_digest(config) -> str:
    """Short stable digest of a PreprocessConfig and of how this code projects (a new
    ``PROJECTION_VERSION`` gets a cache of its own instead of an error in the old one)."""
    record = {"config": dataclasses.asdict(config), "projections": PROJECTION_VERSION}
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _cpu_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _preprocess_on_cpu_cores(
    manifest: Path, cache_dir: Path, config, workers: int, log=print
) -> None:
    """The CPU backend is single-threaded per scan: run one shard per core, one progress bar.

    Shards are disjoint (no shared state but the cache folder, see preprocess_cohort), and the
    processes are spawned, not forked, so no JAX or BLAS thread state is inherited. Without a
    terminal (output to a log file) the bar is off, so a line goes to ``log`` every
    ``PROGRESS_LOG_SECONDS`` instead.
    """
    from sapsam_jax.io import read_manifest

    total = len(read_manifest(manifest))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(_preprocess_shard, manifest, cache_dir, config, (k, workers))
            for k in range(workers)
        ]
        with tqdm(total=total, desc="preprocess", unit="study", disable=None) as bar:
            progress = _LogProgress(total, log, enabled=bar.disable)
            while not all(f.done() for f in futures):
                time.sleep(1.0)
                done = _finished_studies(cache_dir)
                bar.update(done - bar.n)
                progress.update(done)
            bar.update(_finished_studies(cache_dir) - bar.n)
    failed = sum(f.result().failed for f in futures)
    if failed:
        log(f"{failed} studies failed to preprocess: see {cache_dir / 'failures.csv'}")


PROGRESS_LOG_SECONDS = 30.0


class _LogProgress:
    """``preprocess: 40/82 studies`` to ``log`` at most every ``PROGRESS_LOG_SECONDS``."""

    def __init__(self, total: int, log, *, enabled: bool):
        self.total, self.log, self.enabled = total, log, enabled
        self.last = time.monotonic()

    def update(self, done: int) -> None:
        if self.enabled and time.monotonic() - self.last >= PROGRESS_LOG_SECONDS:
            self.log(f"preprocess: {done}/{self.total} studies")
            self.last = time.monotonic()


def _preprocess_shard(manifest, cache_dir, config, shard):
    return preprocess_cohort(
        manifest, cache_dir, config=config, backend="cpu", shard=shard, progress=False
    )


def _finished_studies(cache_dir: Path) -> int:
    studies = Path(cache_dir) / "studies"
    if not studies.is_dir():
        return 0
    return sum(1 for p in studies.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))


def ensure_synthetic_cohort(cfg, log=print) -> Path:
    """Generate the built-in synthetic cohort once; a finished cohort is reused.

    Returns its manifest. In a multi-process job the first process generates it and the others
    wait for it.
    """
    from sapsam_jax.data.synthetic import GENERATOR_VERSION, MANIFEST_NAME

    name = f"synthetic-{cfg.preset}-{cfg.synthetic.name}-v{GENERATOR_VERSION}"
    out = Path(cfg.data_dir) / name
    if is_primary() and not (out / MANIFEST_NAME).is_file():
        _generate_synthetic_cohort(cfg.synthetic, out, log)
    barrier(f"synthetic cohort {name}")
    return out / MANIFEST_NAME


def _generate_synthetic_cohort(syn, out: Path, log) -> None:
    """Write the cohort to a temporary sibling of ``out`` and rename it when complete; an
    interrupted generation resumes there (make_cohort keeps the patients it finished)."""
    from sapsam_jax.data.synthetic import make_cohort

    log(f"generating the synthetic cohort ({syn.n_patients} patients, {syn.shape}) in {out}")
    tmp = out.with_name(f".tmp-{out.name}")
    generate = functools.partial(
        make_cohort,
        tmp,
        n_patients=syn.n_patients,
        shape=syn.shape,
        spacing=syn.spacing,
        seed=syn.seed,
        control_fraction=syn.control_fraction,
    )
    try:
        generate()
    except FileExistsError:  # a leftover of other arguments, or finished but not renamed
        shutil.rmtree(tmp)
        generate()
    # Relative paths in the manifest resolve against its folder, so the rename keeps it valid.
    tmp.rename(out)


def fits_on_device(nbytes: int) -> bool:
    """True when ``nbytes`` is a small share of the first device's memory (always on CPU)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return True
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit is None or nbytes <= DEVICE_RESIDENT_FRACTION * limit


def data_mesh():
    """A 1-D ``data`` mesh over every device of every process, ordered by process: each
    process's devices then hold one contiguous slice of a batch, as :func:`to_global` hands it
    out and :func:`to_host` gathers it back (``jax.devices()`` need not list them so)."""
    from jax.sharding import Mesh

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), ("data",))


def to_global(host_batch, sharding):
    """Host arrays -> one global batch sharded over every device of every process.

    One process: a plain ``device_put``. Several (``jax.distributed``): every process holds the
    same global batch and contributes its own contiguous slice.
    """
    if jax.process_count() == 1:
        return jax.device_put(host_batch, sharding)
    count, index = jax.process_count(), jax.process_index()

    def local(x):
        per = len(x) // count
        return jax.make_array_from_process_local_data(sharding, x[index * per : (index + 1) * per])

    return jax.tree.map(local, host_batch)


def to_host(array) -> np.ndarray:
    """A (possibly multi-process) global array as one NumPy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class Batches:
    """Batches of one epoch, gathered on the device or prefetched from the host.

    When the images fit in device memory they are put there once and each batch is a device-side
    gather; otherwise a background thread gathers and transfers the next batches while the current
    one trains, so the input pipeline does not starve the accelerator.
    """

    def __init__(self, images, labels, sharding, replicated, *, rotations=None, prefetch=2):
        self.sharding, self.prefetch = sharding, prefetch
        # Rotation index (0-26) of each sample, for drawing rotations per epoch.
        self.rotations = np.zeros(len(labels), int) if rotations is None else rotations
        # Across processes every host feeds its own slice, so the data stays on the hosts.
        self.device_resident = jax.process_count() == 1 and fits_on_device(images.nbytes)
        if self.device_resident:
            self.images = jax.device_put(images, replicated)
            self.labels = jax.device_put(labels, replicated)
            self._gather = jax.jit(lambda x, i: x[i], out_shardings=sharding)
        else:
            self.images, self.labels = images, labels

    def iterate(self, order: np.ndarray, batch_size: int):
        """Yield device (images, labels) for consecutive ``batch_size`` chunks of ``order``."""
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        chunks = [c for c in chunks if len(c) == batch_size]  # equal shapes: one compilation
        if self.device_resident:
            for idx in chunks:
                yield self._gather(self.images, idx), self._gather(self.labels, idx)
        else:
            yield from self._prefetched(chunks)

    def _prefetched(self, chunks):
        """Batches from a producer thread. Its error is raised here, in the training loop (a
        thread that died silently left the loop waiting forever), and a consumer that stops early
        (an exception, Ctrl-C, a closed generator) stops the producer too."""
        queue: Queue = Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    queue.put(item, timeout=0.1)
                    return True
                except Full:
                    continue
            return False

        def produce():
            try:
                for idx in chunks:
                    batch = (np.take(self.images, idx, axis=0), np.take(self.labels, idx, axis=0))
                    if not put(to_global(batch, self.sharding)):
                        return
                put(_END)
            except BaseException as err:  # handed to the consumer, which re-raises it
                put(_ProducerError(err))

        thread = threading.Thread(target=produce, daemon=True, name="batch-prefetch")
        thread.start()
        try:
            while (item := queue.get()) is not _END:
                if isinstance(item, _ProducerError):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join(timeout=5.0)


_END = object()  # the producer's last item


class _ProducerError:
    def __init__(self, error: BaseException):
        self.error = error

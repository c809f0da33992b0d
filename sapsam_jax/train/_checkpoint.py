"""Orbax checkpoints of a training run: the latest epoch (to resume) and the best on validation.

A run whose workdir already holds a checkpoint resumes from it (flax examples/gemma/train.py).
Orbax writes each step to a temporary folder and renames it when complete, so a `kill -9` mid-save
leaves the previous checkpoint intact; at most the interrupted epoch is lost.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

MODEL_STATE = nnx.Any(nnx.Param, nnx.BatchStat)


def saved_epochs(workdir, kind: str = "latest") -> list[int]:
    """Epochs with a complete ``kind`` ("latest" or "best") checkpoint in ``workdir``, read
    from the folder names only (no Orbax manager): Orbax saves into a temporary folder
    (``<step>.orbax-checkpoint-tmp-...``) and renames it to the bare step when complete."""
    folder = Path(workdir) / "checkpoints" / kind
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())


class RunCheckpoints:
    """Two Orbax managers under ``WORKDIR/checkpoints``: ``latest`` (resume) and ``best``."""

    def __init__(self, workdir: Path):
        root = Path(workdir).absolute() / "checkpoints"
        self.latest = _manager(root / "latest", max_to_keep=2)
        self.best = _manager(root / "best", max_to_keep=1)

    def save(self, model, optimizer, meta: dict, *, best: bool) -> None:
        """Save epoch ``meta["epoch"]`` (1-based) as best when it improved, then as latest.

        Best commits first: a kill between the two leaves `latest` an epoch behind, so the rerun
        repeats that epoch (deterministically) and finds it already saved as best. The other
        order lost it: the rerun resumed after the epoch and never saved its weights as best.
        """
        step = int(meta["epoch"])
        model_state = nnx.to_pure_dict(nnx.state(model, MODEL_STATE))
        if best:
            self._save_best(step, model_state, meta)
        self._save_latest(step, model_state, optimizer, meta)

    def _save_best(self, step: int, model_state: dict, meta: dict) -> None:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model_state), meta=ocp.args.JsonSave(meta)
        )
        self.best.save(step, args=args)
        self.best.wait_until_finished()

    def _save_latest(self, step: int, model_state: dict, optimizer, meta: dict) -> None:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model_state),
            optimizer=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState))),
            meta=ocp.args.JsonSave(meta),
        )
        self.latest.save(step, args=args)
        self.latest.wait_until_finished()

    def restore_latest(self, model, optimizer) -> dict | None:
        """Restore model and optimizer from the latest epoch; returns its meta, None if none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        model_state = nnx.state(model, MODEL_STATE)
        opt_state = nnx.state(optimizer, nnx.OptState)
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(nnx.to_pure_dict(model_state)),
                optimizer=ocp.args.StandardRestore(nnx.to_pure_dict(opt_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        _assign(model, model_state, restored["model"])
        _assign(optimizer, opt_state, restored["optimizer"])
        # The two managers commit apart (best first, see save): a kill between them leaves
        # `best` an epoch ahead of `latest`. The best weights on disk are what the run must beat.
        best = self._best_meta()
        return dict(restored["meta"]) | {
            # best_val_loss: checkpoints written before select_by (always the validation loss)
            "best_score": best.get("best_score", best.get("best_val_loss")) if best else None,
            "best_epoch": best["best_epoch"] if best else 0,
        }

    def _best_meta(self) -> dict | None:
        step = self.best.latest_step()
        if step is None:
            return None
        restored = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_best(self, model) -> dict | None:
        """Load the best-on-validation weights into ``model``; falls back to the latest."""
        manager = self.best if self.best.latest_step() is not None else self.latest
        step = manager.latest_step()
        if step is None:
            return None
        model_state = nnx.state(model, MODEL_STATE)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(nnx.to_pure_dict(model_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        _assign(model, model_state, restored["model"])
        return dict(restored["meta"])

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _manager(directory: Path, max_to_keep: int) -> ocp.CheckpointManager:
    """One Orbax manager whose cross-process barriers are named after its folder.

    Both managers save the same epoch at once, and Orbax names its barriers by step: without a
    prefix the second manager's barrier collides with the first's ("Barrier
    _async_write_complete.1 is already ongoing") whenever one process lags, and the job aborts.
    """
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=directory.name
            ),
        ),
    )


def _assign(node, state, pure: dict) -> None:
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(node, state)

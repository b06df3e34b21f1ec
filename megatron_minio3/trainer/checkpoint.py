"""Atomic, resumable training checkpoints under `<trainer.output_dir>/checkpoints`.

    checkpoints/step_00000002/          a complete checkpoint (its name appears only once it is complete)
        model/                          Megatron distributed checkpoint of the policy, as the HF converter
                                        writes it: `actor.load=.../model`, tools/convert_megatron_to_hf.py
        optimizer/                      optimizer and lr scheduler state (workers/actor_worker.py)
        trainer_state.json              step, prompt position, counters, the actor's state fingerprint
        config.yaml                     the run's configuration
    checkpoints/.step_00000003.tmp-*    a checkpoint being written (removed at the next start)

A checkpoint is written into a hidden temporary sibling and renamed (one atomic `rename`) when every rank
has written its shards and the trainer state is on disk; older checkpoints are pruned only afterwards. An
interrupted save (Ctrl-C, a crash) therefore leaves the previous complete checkpoint as the latest one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from megatron_minio3.config import Config, dump_yaml

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_COMPLETE = re.compile(r"^step_(\d{8})$")
_INCOMPLETE = re.compile(r"^\.step_\d{8}\.tmp-")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last  # 0 keeps every checkpoint

    def complete(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _COMPLETE.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def remove_incomplete(self) -> list[Path]:
        """Delete the temporary directories of saves that never finished; returns them."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if _INCOMPLETE.match(path.name):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def save(self, step: int, state: dict, cfg: Config, write_shards: Callable[[str], dict]) -> Path:
        """`write_shards(tmp_dir)` makes every rank write its shards (returns the actor's state fingerprint);
        then the trainer state and config are written and the directory is renamed into place."""
        final = self.root / step_dir_name(step)
        if final.exists():
            raise ValueError(f"checkpoint {final} already exists; refusing to overwrite a finished checkpoint")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.root))
        try:
            fingerprint = write_shards(str(tmp))
            dump_yaml(cfg, tmp / "config.yaml")
            _write_durably(tmp / STATE_FILE, json.dumps({**state, "actor_fingerprint": fingerprint}, indent=2))
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in self.complete()[: -self.keep_last]:
            logger.info("removing old checkpoint %s (trainer.keep_last_checkpoints=%d)", path, self.keep_last)
            doomed = path.with_name(f".{path.name}.tmp-removing")  # never half-deleted under its real name
            os.replace(path, doomed)
            shutil.rmtree(doomed)

    @staticmethod
    def read_state(path: str | Path) -> dict:
        return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))

"""Atomic, resumable training checkpoints under `<trainer.output_dir>/checkpoints`.

    checkpoints/step_00000002/          a complete checkpoint (its name appears only once it is complete)
        model/                          Megatron distributed checkpoint of the policy, as the HF converter
                                        writes it: `actor.load=.../model`, tools/convert_megatron_to_hf.py
        optimizer/                      optimizer and lr scheduler state (workers/actor_worker.py)
        trainer_state.json              step, prompt position, counters, the actor's state fingerprint, and
                                        the size and SHA-256 of every other file of the checkpoint
        config.yaml                     the run's configuration
    checkpoints/.step_00000003.tmp-*    a checkpoint being written (removed at the next start)
    checkpoints/step_00000004.superseded-*  a later checkpoint set aside by a resume from an earlier step

A checkpoint is written into a hidden temporary sibling and renamed (one atomic `rename`) when every rank
has written its shards and the trainer state is on disk; older checkpoints are pruned only afterwards. An
interrupted save (Ctrl-C, a crash) therefore leaves the previous complete checkpoint as the latest one.
Before a resume, `verify` reads every file back against the sizes and checksums recorded at save, so a
truncated or corrupted shard is named (with the previous complete checkpoint) before any worker starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_minio3.config import Config, dump_yaml
from megatron_minio3.progress import Progress
from megatron_minio3.config.schema import resume_target

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
FILES_KEY = "files"  # in the trainer state: {relative path: {"bytes": size, "sha256": hex digest}}
_COMPLETE = re.compile(r"^step_(\d{8})$")
_INCOMPLETE = re.compile(r"^\.step_\d{8}\.tmp-")
_HASH_THREADS = 8  # hashlib releases the GIL: files are hashed in parallel (about 1 s per GB per core)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, truncated, corrupted); the message names the file and
    the previous complete checkpoint."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _hash_all(paths: list[Path], description: str) -> list[str]:
    """SHA-256 of each file, in order, on a few threads, with progress in bytes."""
    total = sum(p.stat().st_size for p in paths)
    with Progress(total, description, unit="B", scale=1e6, scale_unit="MB") as progress, \
            ThreadPoolExecutor(min(_HASH_THREADS, len(paths) or 1)) as pool:
        def digest(path: Path) -> str:
            value = _sha256(path)
            progress.update(path.stat().st_size)
            return value

        return list(pool.map(digest, paths))


def file_manifest(directory: Path, exclude: tuple[str, ...] = (STATE_FILE,)) -> dict[str, dict]:
    """Size and SHA-256 of every file under `directory` (relative POSIX paths, sorted)."""
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() not in exclude)
    digests = _hash_all(paths, f"checksums of {directory.name}")
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(paths, digests)}


def manifest_problem(directory: Path, files: dict[str, dict]) -> str | None:
    """The first file of `directory` that does not match `files` (missing, other size, other checksum), as
    "<path>: <what is wrong>", or None. Sizes are checked for every file before any byte is hashed."""
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: {size} bytes, {expected['bytes']} were written (truncated or replaced)"
    names = list(files)
    digests = _hash_all([directory / name for name in names], f"verifying {directory.name}")
    for name, digest in zip(names, digests):
        if digest != files[name]["sha256"]:
            return f"{directory / name}: its SHA-256 differs from the one recorded at save (corrupted)"
    return None


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
            started = time.perf_counter()
            files = file_manifest(tmp)
            logger.info("checksums of %d files (%.1f MB) in %.2f s", len(files),
                        sum(f["bytes"] for f in files.values()) / 1e6, time.perf_counter() - started)
            state = {**state, "actor_fingerprint": fingerprint, FILES_KEY: files}
            _write_durably(tmp / STATE_FILE, json.dumps(state, indent=2))
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
        """The trainer state of a checkpoint; CheckpointError when it cannot be read."""
        state_path = Path(path) / STATE_FILE
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{state_path}: cannot be read ({err})") from None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{state_path}: not a trainer state (no step)")
        return state

    def problem(self, path: Path) -> str | None:
        """What is wrong with the checkpoint at `path` ("<file>: <reason>"), or None when every file matches its
        recorded size and checksum. Checkpoints written before checksums were recorded are only read."""
        try:
            state = self.read_state(path)
        except CheckpointError as err:
            return str(err)
        files = state.get(FILES_KEY)
        if files is None:
            logger.warning("%s records no checksums (written by an older version): not verified", path)
            return None
        return manifest_problem(Path(path), files)

    def verify(self, path: Path) -> None:
        """CheckpointError naming the bad file of the checkpoint at `path` and the newest earlier checkpoint that
        verifies (the one to resume from instead)."""
        problem = self.problem(path)
        if problem is None:
            return
        earlier = [(step, p) for step, p in self.complete() if p.name < path.name]
        previous = next(((step, p) for step, p in reversed(earlier) if self.problem(p) is None), None)
        advice = (f"the previous complete checkpoint is {previous[1]}: resume from it with "
                  f"trainer.resume={previous[0]}" if previous else
                  "there is no earlier complete checkpoint: start over with trainer.resume=false in another "
                  "trainer.output_dir")
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {advice}")

    def select(self, resume: bool | int | str) -> Path | None:
        """The checkpoint `trainer.resume` asks for (see resume_target), verified; None to start from scratch.
        ValueError when it names a checkpoint that is not there, or (false) when checkpoints exist."""
        target = resume_target(resume)
        found = dict(self.complete())
        if target == -1:
            if found:
                raise ValueError(
                    f"trainer.resume is false but {self.root} holds checkpoints (latest {found[max(found)].name}); "
                    "resume, or choose another trainer.output_dir (finished checkpoints are never overwritten)"
                )
            return None
        if target is None:
            if not found:
                return None
            target = max(found)
        if target not in found:
            have = ", ".join(str(step) for step in sorted(found)) or "none"
            raise ValueError(f"trainer.resume={resume}: {self.root} holds no complete checkpoint of step {target} "
                             f"(steps with one: {have})")
        self.verify(found[target])
        return found[target]

    def space_note(self) -> str:
        """" (N MB free on the file system of <root>[, less than the M MB of the latest checkpoint: ...])": what a
        failed save reports, since a full disk often shows only as a writer's internal error."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return ""
        note = f" ({free / 1e6:.1f} MB free on the file system of {self.root}"
        latest = self.latest()
        if latest is not None:
            try:
                size = sum(f["bytes"] for f in self.read_state(latest).get(FILES_KEY, {}).values())
            except CheckpointError:
                size = 0
            if free < size:
                note += (f", less than the {size / 1e6:.1f} MB of the latest checkpoint: the disk is full; free "
                         "space, or resume with another trainer.output_dir after copying the checkpoints there")
        return note + ")"

    def set_aside_after(self, step: int) -> list[Path]:
        """Rename the complete checkpoints after `step` (a resume from an earlier step) to
        `step_N.superseded-<time>`: no longer checkpoints of this run, never deleted. Returns the new paths."""
        moved = []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for later_step, path in self.complete():
            if later_step > step:
                target = path.with_name(f"{path.name}.superseded-{stamp}")
                os.replace(path, target)
                moved.append(target)
        if moved:
            _fsync_dir(self.root)
        return moved

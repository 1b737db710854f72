"""Several tune processes on one study: exactly ``trials`` finished trials, each step after a search done once.

Trials are shared through the Optuna storage (a PostgreSQL URL for processes on several machines; SQLite serves
processes on one machine). Each trial is tagged with its worker (``host:pid``). A trial counts once it is
COMPLETE, PRUNED or RUNNING; a new trial that finds ``trials`` counted trials numbered below it is a surplus
(two workers asked at the same moment): it ends as FAIL before training anything, and its worker stops; so
does the second copy of an enqueued recipe (``Duplicate``), but its worker goes on. A
RUNNING trial whose worker is gone (a killed process on this host, or one whose heartbeat stopped elsewhere)
is failed, so a resumed tune runs it again.

The steps after a search (refitting an outer fold's best recipe, the final run) are claimed through a lock file
created atomically in the tune folder: the worker holding it does the step, the others go on with the next
search and wait for its result where they need it. A lock whose process died on this host is taken over.
Workers on several machines share those steps only when their tune folder is shared; otherwise each machine
refits and trains the final run in its own folder (the same work, done twice)."""
from __future__ import annotations

import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

WORKER = f"{socket.gethostname()}:{os.getpid()}"
HEARTBEAT_S, GRACE_S = 30, 120


class Surplus(Exception):
    """This trial would exceed the study's trial count: other workers already run or ran them all."""


class Duplicate(Surplus):
    """This trial repeats a recipe another worker enqueued too (the base recipe, enqueued by every worker that
    found the study empty: Optuna's ``skip_if_exists`` is not atomic): it ends as FAIL, and its worker goes on."""


def storage_for(url: str, optuna, tries: int = 5):
    """An RDB storage with heartbeats, so a trial of a worker that died on another machine is failed in time."""
    for attempt in range(tries):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; a user can do nothing
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's, when workers create the tables at the same moment
            if attempt == tries - 1 or type(e).__name__ != "IntegrityError":
                raise
            time.sleep(1 + attempt)


def counted_states(optuna) -> tuple:
    s = optuna.trial.TrialState
    return s.COMPLETE, s.PRUNED, s.RUNNING


def _alive_here(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine: its heartbeat tells (storage_for)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def reap_dead_trials(study, optuna) -> int:
    """Fail the RUNNING trials of workers that died on this host (a killed tune); return how many."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker and worker != WORKER and not _alive_here(worker):
            try:
                study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                n += 1
            except Exception:  # noqa: BLE001 - another worker failed it first
                pass
    return n


def claim_trial(trial, trials: int, optuna) -> None:
    """Tag ``trial`` with this worker; raise Surplus when ``trials`` counted trials are numbered below it, and
    Duplicate when it is an enqueued recipe that a trial numbered below it (not failed) was enqueued with."""
    trial.set_user_attr("worker", WORKER)
    every = trial.study.get_trials(deepcopy=False)
    fixed = next((t.system_attrs.get("fixed_params") for t in every if t.number == trial.number), None)
    if fixed is not None and any(t.number < trial.number and t.state != optuna.trial.TrialState.FAIL
                                 and t.system_attrs.get("fixed_params") == fixed for t in every):
        trial.set_user_attr("duplicate", True)
        raise Duplicate(f"trial {trial.number}: its recipe was enqueued twice (by two workers); not trained")
    below = [t for t in every if t.state in counted_states(optuna) and t.number < trial.number]
    if len(below) >= trials:
        trial.set_user_attr("surplus", True)
        trial.study.stop()
        raise Surplus(f"surplus trial: the study has its {trials} trials (run by other workers); not trained")


def _lock_owner(lock: Path) -> str | None:
    try:
        return lock.read_text().strip() or None
    except FileNotFoundError:
        return None


def try_claim(lock: Path) -> bool:
    """Create ``lock`` atomically for this worker; take it over when its owner died on this host."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner == WORKER:
                return True
            if owner is None or _alive_here(owner):  # None: its owner is writing it right now
                return False
            try:  # a rename succeeds for one worker only, so only one takes a dead worker's lock over
                os.rename(lock, lock.with_name(f"{lock.name}.dead-{WORKER.replace(':', '-')}"))
                os.unlink(lock.with_name(f"{lock.name}.dead-{WORKER.replace(':', '-')}"))
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(WORKER)
        return True
    return False


@contextmanager
def claimed(lock: Path) -> Iterator[bool]:
    """``with claimed(lock) as mine:`` -- ``mine`` when this worker does the step; the lock goes with the step."""
    mine = try_claim(lock)
    try:
        yield mine
    finally:
        if mine:
            lock.unlink(missing_ok=True)


def wait_for(done: Callable[[], bool], lock: Path, do: Callable[[], None], what: str,
             say: Callable[[str], None], poll_s: float = 2.0) -> None:
    """Until ``done()``: do the step when its lock is free (or its owner died), else wait for its owner."""
    told = False
    while not done():
        with claimed(lock) as mine:
            if mine:
                if not done():
                    do()
                return
        if not told:
            say(f"waiting for worker {_lock_owner(lock) or '?'} to finish {what}")
            told = True
        time.sleep(poll_s)


def worker_sampler(seed: int, optuna):
    """A TPE sampler seeded with ``seed`` that reseeds from the trial number whenever the trial is not the next
    of its own sequence from trial 0 (another worker, or an earlier process before a resume, took numbers).

    Workers sharing a study with one seed, or a resumed tune, would otherwise draw the recipes already drawn.
    One process on a fresh study keeps the plain seeded TPE sequence."""

    class WorkerSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.inner = optuna.samplers.TPESampler(seed=seed)
            self.expected = 0  # the next trial number of the plain sequence

        def before_trial(self, study, trial) -> None:
            if trial.number != self.expected:
                self.inner = optuna.samplers.TPESampler(seed=(seed + 7919 * (trial.number + 1)) % 2**32)
            self.expected = trial.number + 1
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

    return WorkerSampler()

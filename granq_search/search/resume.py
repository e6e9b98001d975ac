"""What ``--resume`` does: the protocol that continues a stopped search where it stopped.

A search keeps five records, each written as it goes: ``search.json`` (what the search is),
the Optuna journal ``optuna.journal`` (every ask and tell at once; the last result of every
trial that ended), Ray's experiment (``DIR/NAME/ray``: a snapshot of the trials and of the
searcher's Ray-trial <-> Optuna-number map every ``SNAPSHOT_PERIOD_S`` = 1 s, one checkpoint per
trial epoch), the ASHA rungs ``scheduler_state.json``, and MLflow (parent and child runs,
retried when the store is down). A search that ends, even interrupted (Ctrl-C), closes them:
:func:`close_running_trials` tells FAIL (:data:`INTERRUPTED_REASON`) to every Optuna trial still
RUNNING and the recorder closes the children. A *killed* driver closes nothing, and Ray's last
snapshot may be up to a second older than the journal and MLflow. ``--resume``
(``run_search(resume=True)``: :mod:`granq_search.search.plan` checks it,
:mod:`granq_search.search.launch` runs it) reconciles them in this order:

1. **search.json.** The search (``--name``, by default the latest in ``--output-dir``) keeps its
   space, overrides, ``num_samples``, ``max_concurrent``, Ray storage, MLflow store and
   experiment, and the teacher's metrics; a flag asking for other values is an error, and so
   is a search without Ray experiment state (``Tuner.can_restore``). ``resumes`` is counted up.
2. **The Optuna journal: replay.** :func:`replayable_results` reads the last result of every
   trial the study holds as ended for good (COMPLETE, PRUNED, or FAIL for a reason of its own:
   not :func:`error_state`) and hands them to the trainable (``make_trainable(replay=...)``).
3. **Ray's experiment.** ``Tuner.restore(ray_path, trainable, resume_unfinished=True,
   resume_errored=True)``: Ray brings back its trials (an unfinished or errored trial continues
   from its last epoch checkpoint: ``run_training(resume=True)``) and unpickles the searcher,
   the scheduler and the callbacks from ``tuner.pkl``. The driver keeps the recorder Ray
   restored (:func:`restored_recorder`: marked ``resumed``; its ``finish`` retries what it could
   not write) and swaps in this run's status table (``launch._replace_status_table``).
4. **The searcher: orphans, adoption, twins.** Ray calls ``OptunaSearcher.restore`` with its
   saved map (live, done, deferred twins, orphans); :meth:`OrphanAdoption.reconcile` then
   compares it with the journal. An Optuna trial still RUNNING that no restored Ray trial will
   finish was asked after the last snapshot: a deferred duplicate (twin) waits again for its
   original, or is told the original's outcome when that ended; one never given to Ray (no
   ``ray_trial_id``) is told FAIL (:data:`LOST_REASON`); any other is an *orphan*, adopted by
   the next new Ray trial (:meth:`OrphanAdoption._adopt`: the same parameters and Optuna trial,
   the old id kept in ``lost_ray_trial_ids``). The study is reopened lazily, its sampler
   reseeded (:func:`~granq_search.search.study.open_study`). A Ray
   trial that finishes after its Optuna trial was closed (interrupted, then resumed) is
   recorded as a new Optuna trial with ``resumed_from``; FAILs that another try may cure
   (:func:`error_state`) are proposed and trained again, not copied to duplicates.
5. **The ASHA state.** The scheduler Ray unpickles is the one built before the first trial,
   with empty rungs; :class:`~granq_search.search.scheduler.PersistentASHA` reloads the rung
   records from ``scheduler_state.json`` on its first call, so resumed and new trials meet the
   same rungs as before.
6. **The trials: replay.** A trial Ray starts again only because its last snapshot predates its
   end finds its id in the replay table (step 2): :func:`replay_finished` reports that result
   again with ``replayed: 1.0`` instead of training; the searcher sees an Optuna trial already
   told and records nothing new.
7. **The MLflow children.** The restored recorder finds the parent run by ``granq.search`` and
   each child by ``granq.trial_id`` (set back to RUNNING when its trial runs again). On its
   first step it reconciles (``SearchRecorder._reconcile`` in
   :mod:`granq_search.tracking.callback`): a trial Ray holds as TERMINATED or ERROR whose child
   is missing, still open or lacks the final metrics is replayed from Ray's stored results
   (``_replay_ops``) and closed; a child still RUNNING for a Ray trial the restored experiment
   does not know (its configuration now runs as an adopted orphan, step 4) is tagged ``lost``,
   closed and deleted (``_lost_ops``), so every trial keeps exactly one active child.
8. **The end**, as for every search: :func:`close_running_trials`, ``search.json`` status,
   ``recorder.finish`` on the restored recorder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from granq_search.search.study import journal_storage, open_study

if TYPE_CHECKING:
    from granq_search.search.space import SearchSpace

__all__ = ["close_running_trials", "replayable_results", "replay_finished", "restored_recorder",
           "restored_callbacks", "error_state", "OrphanAdoption", "LOST_REASON", "INTERRUPTED_REASON"]

log = logging.getLogger("granq_search.search.searcher")  # the searcher's messages, as before the move

LOST_REASON = "lost when the driver stopped"
INTERRUPTED_REASON = "the search stopped before this trial finished (rerun with --resume to continue it)"


def error_state(state, reason: str | None) -> bool:
    """A FAIL that another try may cure (a Ray error, lost, interrupted), as opposed to one of
    the trial's own (divergence, out of memory, NaN objective, invalid config)."""
    from optuna.trial import TrialState

    return state == TrialState.FAIL and (not reason or reason in (LOST_REASON, INTERRUPTED_REASON)
                                         or str(reason).startswith("the trial raised an error"))


# --------------------------------------------------------------------------- the journal


def close_running_trials(journal_path: str, study_name: str, reason: str = INTERRUPTED_REASON) -> int:
    """Tell FAIL to every Optuna trial still RUNNING (the end of every search); return how many."""
    import optuna
    from optuna.trial import TrialState

    if not os.path.isfile(journal_path):
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = journal_storage(journal_path)
    if study_name not in [s.study_name for s in storage.get_all_studies()]:
        return 0
    study = optuna.load_study(study_name=study_name, storage=storage)
    study_id = storage.get_study_id_from_name(study_name)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                    "failure_reason", reason)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(running)


def replayable_results(space: SearchSpace, journal_path: str, study_name: str) -> dict[str, dict[str, Any]]:
    """``{Ray trial id: last result}`` of every trial the study holds as ended for good (COMPLETE,
    PRUNED, or FAIL for a reason of its own). A resumed search hands them to the trainable: a
    trial Ray restarts only because its last snapshot predates the trial's end is replayed, not
    trained again (:func:`replay_finished`)."""
    from optuna.trial import TrialState

    if not os.path.isfile(journal_path):
        return {}
    study, _ = open_study(space, journal_path, study_name)
    out: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        rid, last = t.user_attrs.get("ray_trial_id"), t.user_attrs.get("last_result")
        if rid and isinstance(last, dict) and not error_state(t.state, t.user_attrs.get("failure_reason")):
            out[str(rid)] = dict(last)
    return out


# --------------------------------------------------------------------------- the trials


def replay_finished(replay: Mapping[str, Mapping[str, Any]] | None) -> bool:
    """Inside a trial: a trial that already ended but that Ray restarts because its last
    experiment snapshot predates the end (the driver was killed) reports the last result the
    Optuna study recorded for it again, marked ``replayed``, instead of training again. True when
    replayed. (``replay``: see :func:`replayable_results`.)"""
    if not replay:
        return False
    from ray import tune

    final = replay.get(tune.get_context().get_trial_id())
    if final is None:
        return False
    tune.report({**final, "replayed": 1.0})
    return True


# --------------------------------------------------------------------------- the MLflow recorder


def restored_callbacks(tuner) -> list | None:
    """The list of callbacks a restored Tuner unpickled from ``tuner.pkl`` (the very list its run
    calls, so it can be edited in place), or None where it cannot be reached (Ray Client, or
    Ray's internals moved)."""
    try:
        return tuner._local_tuner.get_run_config().callbacks
    except Exception:  # noqa: BLE001 - Ray Client, or Ray's internals moved
        return None


def restored_recorder(tuner, fallback):
    """The :class:`~granq_search.tracking.SearchRecorder` Ray unpickled from ``tuner.pkl`` (the one
    its callbacks call), or ``fallback`` where it cannot be reached (Ray Client)."""
    if fallback is None:
        return None
    for cb in restored_callbacks(tuner) or []:
        if type(cb) is type(fallback) and getattr(cb, "search_name", None) == fallback.search_name:
            cb.finish_wait_s = fallback.finish_wait_s
            cb.resumed = True  # even when Ray's snapshot held no trial yet
            return cb
    return fallback


# --------------------------------------------------------------------------- the searcher


class OrphanAdoption:
    """The searcher's side of ``--resume`` (step 4 of the module docstring), mixed into
    :class:`~granq_search.search.searcher.OptunaSearcher`: it uses the searcher's map (``_live``,
    ``_twins``, ``_orphans``, ``events``), its study and its journal helpers (``_frozen``,
    ``_set_attr``, ``_copy_outcome``). Holds no state of its own (the pickled searcher is
    unchanged)."""

    def reconcile(self) -> list[int]:
        """After a restore: find the Optuna trials still RUNNING that no restored Ray trial will
        finish, and return their numbers (oldest first).

        They were handed to Ray after its last experiment snapshot, so the restored experiment
        does not know them (the driver was killed; the runner keeps the snapshot period at about
        a second). One still being checked (no ``ray_trial_id`` yet) never reached Ray: it is told
        FAIL ('lost when the driver stopped'). Rather than failing the others and asking the
        sampler for replacements (the study would then hold more trials than the search ran),
        they become *orphans*: ``suggest`` gives each one, with its parameters unchanged, to
        the next new Ray trial (:meth:`_adopt`). A deferred duplicate waits for its original, live
        or orphan, as before; one whose original ended is told its outcome.
        """
        from optuna.trial import TrialState

        live = set(self._live.values())
        running = sorted(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                         key=lambda t: t.number)
        running_numbers = {t.number for t in running}
        orphans: list[int] = [n for n in self._orphans if n in running_numbers and n not in live]
        for t in running:
            if t.number in live or t.number in orphans:
                continue  # Ray resumes it from its last checkpoint / adopted later
            original = next((o for o, twins in self._twins.items() if t.number in twins), None)
            if original is None and t.user_attrs.get("duplicate_of") is not None:
                original = int(t.user_attrs["duplicate_of"])  # deferred after the snapshot
            if original is not None:
                if original in running_numbers:  # live, or an orphan adopted later: told when it ends
                    if t.number not in self._twins.setdefault(original, []):
                        self._twins[original].append(t.number)
                else:
                    self._copy_outcome(t.number, original)
                continue
            if not t.user_attrs.get("ray_trial_id"):  # stopped while being checked: never reached Ray
                self._set_attr(t.number, "failure_reason", LOST_REASON)
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                continue
            orphans.append(t.number)
        self._orphans = orphans
        self._twins = {o: v for o, v in self._twins.items() if o in live or o in orphans}
        if orphans:
            log.warning("%d Optuna trial(s) (%s) started after Ray's last snapshot before the driver stopped; "
                        "their parameters are proposed again to the next Ray trials", len(orphans),
                        ", ".join(map(str, orphans)))
        return list(orphans)

    def _adopt(self, trial_id: str) -> dict[str, Any] | None:
        """Hand the next orphan (see :meth:`reconcile`) to the new Ray trial ``trial_id``: its
        parameters, unchanged, and its Optuna trial. None when there is none to adopt."""
        from optuna.trial import TrialState

        dists = self.space.distributions()
        while self._orphans:
            number = self._orphans.pop(0)
            frozen = self._frozen(number)
            if frozen.state != TrialState.RUNNING:
                continue
            if set(frozen.params) != set(dists):  # asked but never given its parameters
                self._set_attr(number, "failure_reason", LOST_REASON)
                self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
                continue
            old = frozen.user_attrs.get("ray_trial_id")
            if old:
                lost = [str(x) for x in frozen.user_attrs.get("lost_ray_trial_ids", [])]
                self._set_attr(number, "lost_ray_trial_ids", [*lost, str(old)])
            self._set_attr(number, "ray_trial_id", trial_id)
            self._live[trial_id] = number
            self.events["adopted"] = self.events.get("adopted", 0) + 1
            log.info("Optuna trial %d (Ray trial %s, started after Ray's last snapshot before the driver "
                     "stopped) continues as Ray trial %s with the same parameters", number, old, trial_id)
            return dict(frozen.params)
        return None

"""Opening a study: create or load it, give it its sampler reseeded from what it already holds, and
queue again the trials a dead driver left behind."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from ditplan.plansearch.storage import (
    is_shared,
    recover_interrupted,
    refuse_existing_study,
    sampler_seed,
)
from ditplan.rundir import SearchDir
from ditplan.spec import ExperimentSpec, SearchSpec


class NSGAIIWithEnqueued(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, whose generations hold the enqueued trials too. NSGA-II puts a trial into a generation
    only when it samples one of its parameters, which an enqueued trial (a proposal, a warm start: every
    parameter given) never does, so it would never breed from the plans proposed to it."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        self.get_trial_generation(study, trial)


# search.sampler → the Optuna sampler, seeded
SAMPLERS: dict[str, Callable[[SearchSpec, int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda search, seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "nsga2": lambda search, seed: NSGAIIWithEnqueued(seed=seed, population_size=search.population_size),
    "gp": lambda search, seed: optuna.samplers.GPSampler(seed=seed),
    "random": lambda search, seed: optuna.samplers.RandomSampler(seed=seed),
}


def driver_id() -> str:
    """This driver's name in the study's records: host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


def open_study(spec: ExperimentSpec, search_dir: SearchDir, storage: BaseStorage, resume: bool, driver: str) -> optuna.Study:
    """Create the study of ``spec`` in ``storage`` (the one of ``search_dir``), or load it with ``resume``; reseed
    its sampler from what the study already holds (and, when several drivers share it, this ``driver``'s id)
    so no driver replays another's proposals; queue again the trials a dead driver left behind."""
    search = spec.search
    if not resume:
        refuse_existing_study(spec, search_dir)
    directions = [o.resolved_direction() for o in search.objectives]
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions, load_if_exists=True)
    seed = sampler_seed(search.seed, len(study.get_trials(deepcopy=False)), driver if is_shared(storage) else "")
    study.sampler = SAMPLERS[search.sampler](search, seed)
    recover_interrupted(study, storage, search, at_start=True)
    return study

"""Every trial takes at least ``SECONDS`` in its worker, so two drivers started together overlap."""

import time

import ditplan.plansearch.trial_task as trial_task

SECONDS = 2.0
_measure = trial_task.trial_metrics


def _slow_trial_metrics(*args, **kwargs):
    start = time.perf_counter()
    values = _measure(*args, **kwargs)
    time.sleep(max(0.0, SECONDS - (time.perf_counter() - start)))
    return values


if trial_task.trial_metrics is _measure:
    trial_task.trial_metrics = _slow_trial_metrics

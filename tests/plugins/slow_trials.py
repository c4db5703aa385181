"""Every trial takes at least ``SECONDS`` in its worker, so two drivers started together overlap."""

import time

import ditplan.search.driver as driver

SECONDS = 2.0
_evaluate = driver.evaluate_in_worker


def _slow_evaluate(*args, **kwargs):
    start = time.perf_counter()
    values = _evaluate(*args, **kwargs)
    time.sleep(max(0.0, SECONDS - (time.perf_counter() - start)))
    return values


if driver.evaluate_in_worker is _evaluate:
    driver.evaluate_in_worker = _slow_evaluate

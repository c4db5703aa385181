"""The user attributes ditplan sets on a study's trials: the names every part of the driver, and every
reader of a study, agree on."""

NAME = "name"  # a trial's name in tables and exports (default trial-N)
ERROR = "error"  # its evaluation failed: the one-line reason
WARM = "source"  # a warm-start trial (greedy D1 … D6, or plans given to ``ditplan search --warm-start``): where it came from
PROMOTED = "promoted_from"  # a screened trial scored again on every search sample: the number of the screened one
METRICS_ATTR = "metrics"  # every search-seed metric of a complete trial (its plan file's provenance)
DRIVER = "driver"  # the driver (host-pid) that ran it
GIVEN = "plan_given"  # a warm-start plan the space cannot express: run whole
REPEAT = "repeat_of"  # the earlier trial with the same parameters whose values this one took
PROJECTED = "projected"  # ... such a trial whose parameters are its plan projected onto the space
PROPOSAL = "proposal"  # a proposed trial (a learned trial, enqueued first): where it came from
INTERVAL_PROPOSAL = "interval"  # ... a cache interval of the space alone (search.proposals.intervals)

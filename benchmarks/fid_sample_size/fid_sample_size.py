"""How many held-out samples domain FID needs: FID, KID and low-level KID of N real held-out digits
against the other held-out digits (a perfect generator), for several N and disjoint draws.

FID fits a Gaussian to the 128-d class features of the digit extractor; below 128 samples its
covariance is rank-deficient and the real-vs-real floor climbs. KID is unbiased at any N.

    python benchmarks/fid_sample_size/fid_sample_size.py > benchmarks/fid_sample_size/results/fid-sample-size.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import print_provenance  # noqa: E402

from ditplan.evaluators.distribution import distribution_metrics  # noqa: E402
from ditplan.models.digits import load_digits  # noqa: E402

SIZES = (50, 80, 100, 150, 200, 300)
DRAWS = 3  # at most; fewer where three disjoint draws do not fit in 600


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print_provenance()
    torch.set_num_threads(2)
    images = load_digits("held_out")[0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    reference = images[order[600:]]  # 400 digits, never drawn as samples
    print(f"reference: {len(reference)} held-out digits; samples: disjoint draws from the other {600}")
    print("| N | draw | FID (128-d class features) | KID | KID, low-level features |")
    print("|---|---|---|---|---|")
    for n in SIZES:
        for draw in range(min(DRAWS, 600 // n)):  # disjoint draws only
            sample = images[order[draw * n : (draw + 1) * n]]
            values = {m.name: m.value for m in distribution_metrics(sample, reference, metrics=("fid", "kid", "kid_low"))}
            print(f"| {n} | {draw} | {values['fid']:.3f} | {values['kid']:.4f} | {values['kid_low']:.4f} |", flush=True)


if __name__ == "__main__":
    main()

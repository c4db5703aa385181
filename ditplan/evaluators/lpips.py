"""Fidelity to dense as LPIPS: torch-fidelity's VGG16 LPIPS (the one its PPL uses), from local weights.

torch-fidelity's ``SampleSimilarityLPIPS`` takes no path: it reads two checkpoints through torch.hub's
cache, its own linear heads (``weights-vgg16-lpips.pth``, from torch-fidelity's release) and torchvision's
ImageNet VGG16 (``vgg16-397923af.pth``), and downloads whichever ``<hub dir>/checkpoints`` lacks. The
metric reads them from a local folder in that layout (``evaluation.lpips_weights_path``): torch.hub points
there while the module is built, and a folder that lacks either file is refused first, so nothing is
downloaded. The module is built once per process (per folder and device).

lpips = the mean over samples of the library's value for each (plan sample, dense sample) pair of one
seed, both given as it takes them: uint8 RGB, 0–255 (quantised as a saved image is), at their own
resolution (no resize). Identical samples give exactly 0; lower is closer to dense. Without configured
weights the metric is skipped with a note (``ditplan evaluate``); an experiment whose objectives,
constraints or refine metrics name ``lpips`` is refused without them.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import torch
from torch_fidelity.sample_similarity_lpips import (
    URL_VGG16_LPIPS,
    SampleSimilarityLPIPS,
)
from torchvision.models import VGG16_Weights

from ditplan.errors import UserError
from ditplan.files import check_folder
from ditplan.models.digits import to_uint8_rgb

FIELD = "evaluation.lpips_weights_path"
# The checkpoints torch-fidelity's LPIPS reads from <hub dir>/checkpoints, by file name (torch.hub names a
# cached download after the URL's last part), and where each is downloaded once on a machine with internet.
CHECKPOINTS = {url.rsplit("/", 1)[-1]: url for url in (URL_VGG16_LPIPS, VGG16_Weights.IMAGENET1K_V1.url)}
BATCH = 4  # sample pairs per VGG16 pass: bounds the memory its features take on 1024×1024 samples and larger


def check_lpips_weights(folder: str | Path) -> Path:
    """``folder`` once it holds every checkpoint in ``checkpoints/`` (:data:`CHECKPOINTS`); one line naming
    the first missing one and its download URL if not."""
    path = check_folder(folder, f"{FIELD} folder")
    for name, url in CHECKPOINTS.items():
        if not (path / "checkpoints" / name).is_file():
            raise UserError(f"{FIELD} folder {path} has no checkpoints/{name}; download {url} "
                            f"into {path / 'checkpoints'} on a machine with internet")
    return path


@functools.lru_cache(maxsize=1)
def lpips_model(folder: str, device: str) -> SampleSimilarityLPIPS:
    """torch-fidelity's LPIPS built from the checkpoints in ``folder`` (torch.hub's directory pointed there
    meanwhile, then set back), on ``device``."""
    path = check_lpips_weights(folder)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        model = SampleSimilarityLPIPS("lpips-vgg16", sample_similarity_dtype="uint8")
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{FIELD} folder {path}: its checkpoints are not torch-fidelity's LPIPS weights "
                        f"({type(err).__name__}); download them again: {', '.join(CHECKPOINTS.values())}") from None
    finally:
        torch.hub.set_dir(previous)
    return model.to(device)


@torch.no_grad()
def lpips(samples: torch.Tensor, dense: torch.Tensor, folder: str | Path, device: str | torch.device = "cpu") -> float:
    """Mean LPIPS of ``samples`` to ``dense`` (both (N, C, H, W) in [-1, 1], sample i of one seed with
    dense sample i; C = 1 is repeated to RGB) with the weights in ``folder``."""
    model = lpips_model(str(folder), str(torch.device(device)))
    values = [model(to_uint8_rgb(samples[i : i + BATCH]).to(device), to_uint8_rgb(dense[i : i + BATCH]).to(device))
              for i in range(0, len(samples), BATCH)]
    return torch.cat(values).mean().item()

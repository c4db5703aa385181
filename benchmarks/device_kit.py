"""Take the GPU run of ``ditplan/experiments/digits-1024.yaml`` to a lent GPU machine (the ``device`` tool) in calls that fit.

A device call sends the working tree (tracked files, untracked files git does not ignore, the ignored
paths it carries) up to 64 MiB, to a bare image that holds PyTorch but not Ray, Optuna, diffusers, MLflow,
torch-fidelity, pydantic … This tree's tracked files are 80 MB, 76.7 of them the two embedded models' weights,
and Ray's wheel alone is 79 MB: nothing fits as it is. So:

    python benchmarks/device_kit.py build     # .gpu/call-1 … call-N (N is printed): one xz stream, split in parts,
                                              # of the packages the image lacks and embedded-1024's weights
    python benchmarks/device_kit.py leave     # the weight files out of git's index (they stay on disk): commit
                                              # nothing until `restore`
    # device run, carry [".gpu/call-1"], command "bash benchmarks/device_run.sh 1 N"
    # … each call at once after the one before (a machine stays warm 30 s after a call)
    # device run, carry [".gpu/call-N"], command "bash benchmarks/device_run.sh N N", timeout_s 590
    python benchmarks/device_kit.py restore   # the weight files back into git's index

``build --python-version 3.11`` builds the same bundle for this machine's Python, to rehearse the calls
here (README: "Taking the GPU run to a lent machine"). The packages the image holds are
``benchmarks/device-image.txt`` (the device tool's KINDS.md, read 2026-11-17).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ditplan.atomic import atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
KIT = Path(".gpu")  # under the repository root, ignored by .gitignore: the parts, and what `leave` took out
LEFT = KIT / "left.json"  # HEAD, the files and .git/info/exclude as they were before `leave`
IMAGE_FILE = Path(__file__).with_name("device-image.txt")
CALL_LIMIT = 64 * 2**20  # what one device call sends: the working tree and the carried paths
MARGIN = 2**20  # for files the tree gains between the build and the calls
WEIGHTS = re.compile(r"ditplan/models/.+\.safetensors")  # what leaves the index for the calls, if ≥ LEAVE_MIN
LEAVE_MIN = 2**20
DEVICE_MODEL = "ditplan/models/embedded_1024/"  # the only model the GPU run loads: its weights travel in the bundle
PROVIDED = {"torch", "torchvision"}  # the image's own CUDA builds; pyproject's pins are for this machine
NO_DEPS = {"torch-fidelity"}  # needs nothing the image lacks but torch, which the resolver would fetch
# parts of the packages the run never imports (Ray's Java workers and libraries, the web front-ends): without
# them the packages take 45 MB of xz, not 63
STRIP = ("ray/jars", "ray/rllib", "ray/serve", "ray/data", "ray/llm", "ray/dashboard/client", "mlflow/server/js")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def requirement_name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def image_packages(path: Path = IMAGE_FILE) -> set[str]:
    names = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(name) for name in names if name}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def file_sizes(root: Path, *listing: str) -> dict[str, int]:
    """The files ``git ls-files <listing>`` names and their sizes on disk."""
    names = _git(root, "ls-files", "-z", *listing).split("\0")
    return {name: (root / name).stat().st_size for name in names if name and (root / name).is_file()}


def tree_bytes(root: Path, weights: dict[str, int]) -> int:
    """What a device call sends of the working tree (tracked files and those git does not ignore) once the
    ``weights`` have left the index."""
    return sum(file_sizes(root, "--cached", "--others", "--exclude-standard").values()) - sum(weights.values())


def leaving(root: Path) -> dict[str, int]:
    """The tracked weight files that leave the index for the calls, with their sizes."""
    return {name: size for name, size in file_sizes(root, "--cached").items()
            if size >= LEAVE_MIN and WEIGHTS.fullmatch(name)}


def plan_parts(tree: int, bundle_bytes: int) -> list[int]:
    """Sizes of the bundle's parts, one per call, each fitting beside the tree (``tree`` bytes) in one call."""
    room = CALL_LIMIT - MARGIN - tree
    if room <= 0:
        raise SystemExit(f"the working tree without its weights is {tree / 2**20:.1f} MiB, no room for the "
                         f"bundle in a {CALL_LIMIT / 2**20:.0f} MiB call; ignore or remove what makes it so large")
    count = math.ceil(bundle_bytes / room)
    part = math.ceil(bundle_bytes / count)
    return [min(part, bundle_bytes - i * part) for i in range(count)]


def pip_options(python_version: str) -> list[str]:
    return (["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
            + [f"--platform={p}" for p in PLATFORMS])


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    import tomllib  # NOTE: here, not at the top: Python 3.10 has none, and only `build` reads pyproject

    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def missing_packages(python_version: str, image: set[str]) -> list[str]:
    """``name==version`` of every package ditplan needs at run time that the image does not hold (pip's
    resolver, for the image's Python on Linux x86-64; nothing is installed)."""
    wanted = [r for r in requirements() if requirement_name(r) not in PROVIDED | NO_DEPS]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--target",
                        str(Path(tmp) / "t"), "--report", str(report), *pip_options(python_version), *wanted], check=True)
        resolved = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    pinned = [f"{name}=={version}" for name, version in resolved if canonicalize_name(name) not in image]
    return pinned + [r for r in requirements() if requirement_name(r) in NO_DEPS]


def install_site(site: Path, packages: list[str], python_version: str) -> None:
    """The packages into ``site`` for the image's Python, less :data:`STRIP`."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    *pip_options(python_version), *packages], check=True)
    for part in STRIP:
        if not (site / part).is_dir():
            raise SystemExit(f"{part} is not in the installed packages: this Ray or MLflow lays itself out otherwise; "
                             "update device_kit.STRIP")
        shutil.rmtree(site / part)


def write_parts(root: Path, bundle: Path, parts: list[int], python_version: str) -> None:
    """``bundle`` cut into ``parts`` under ``.gpu/call-K/``, each with the Python it was built for."""
    for old in (root / KIT).glob("call-*"):
        shutil.rmtree(old)
    with bundle.open("rb") as stream:
        for k, size in enumerate(parts, 1):
            folder = root / KIT / f"call-{k}"
            chunk = stream.read(size)
            atomic_write(folder / f"bundle.part{k}", lambda tmp: tmp.write_bytes(chunk))
            atomic_write_text(folder / "python-version", python_version + "\n")


def build(python_version: str, root: Path = ROOT) -> None:
    if (root / LEFT).exists():
        raise SystemExit("`leave` is in effect (the weights are not in git's index): run `restore`, then `build`")
    packages = missing_packages(python_version, image_packages())
    print(f"{len(packages)} packages the image lacks: {' '.join(packages)}")
    weights = leaving(root)
    travelling = [name for name in weights if name.startswith(DEVICE_MODEL)]
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        install_site(site, packages, python_version)
        bundle = Path(tmp) / "bundle.tar.xz"
        print(f"packing {sum(f.stat().st_size for f in site.rglob('*') if f.is_file()) / 1e6:.0f} MB of packages and "
              f"{sum(weights[w] for w in travelling) / 1e6:.1f} MB of weights with xz (3–4 minutes) …")
        with tarfile.open(bundle, "w:xz", preset=9) as tar:
            tar.add(site, "site")
            for name in travelling:
                tar.add(root / name, f"tree/{name}")
        tree = tree_bytes(root, weights)
        parts = plan_parts(tree, bundle.stat().st_size)
        write_parts(root, bundle, parts, python_version)
    n = len(parts)
    print(f"bundle {sum(parts) / 2**20:.1f} MiB in {n} parts; each call sends {tree / 2**20:.1f} MiB of tree "
          f"(after `leave`) + ≤ {max(parts) / 2**20:.1f} MiB of bundle ≤ {CALL_LIMIT / 2**20:.0f} MiB")
    for k in range(1, n + 1):
        print(f'  call {k}: carry [".gpu/call-{k}"], command "bash benchmarks/device_run.sh {k} {n}"')


def _exclude_file(root: Path) -> Path:
    return root / _git(root, "rev-parse", "--git-path", "info/exclude").strip()


def leave(root: Path = ROOT) -> None:
    """Take the weight files out of git's index and ignore them, so that a device call leaves them behind;
    refused where the calls would not fit or the weights have staged changes :func:`restore` would lose."""
    if (root / LEFT).exists():
        raise SystemExit("`leave` ran already: the weights are out of git's index until `restore`")
    weights = leaving(root)
    if not weights:
        raise SystemExit("no weight files in git's index: nothing to leave")
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *weights], cwd=root).returncode:
        raise SystemExit("the weight files have staged changes: commit or unstage them first")
    largest = max((p.stat().st_size for p in (root / KIT).glob("call-*/bundle.part*")), default=0)
    if tree_bytes(root, weights) + largest > CALL_LIMIT:
        raise SystemExit("the tree has grown since `build`: a call would pass 64 MiB; run `build` again")
    exclude = _exclude_file(root)
    before = exclude.read_text() if exclude.exists() else ""
    atomic_write_text(root / LEFT, json.dumps({"head": _git(root, "rev-parse", "HEAD").strip(), "names": sorted(weights),
                                         "exclude": before}, indent=1))
    atomic_write_text(exclude, before + ("\n" if before and not before.endswith("\n") else "")
                       + "".join(f"/{name}\n" for name in sorted(weights)))
    _git(root, "rm", "-q", "--cached", "--", *weights)
    print(f"{len(weights)} weight files left git's index ({sum(weights.values()) / 1e6:.1f} MB); commit nothing "
          "until `python benchmarks/device_kit.py restore`")


def restore(root: Path = ROOT) -> None:
    """Undo :func:`leave`: the weight files back into the index as HEAD has them, .git/info/exclude as it was;
    refused where HEAD moved since (a commit in between may hold the weights' deletion)."""
    if not (root / LEFT).exists():
        raise SystemExit("nothing to restore: `leave` has not run")
    left = json.loads((root / LEFT).read_text())
    if _git(root, "rev-parse", "HEAD").strip() != left["head"]:
        raise SystemExit(f"HEAD moved since `leave` (it was {left['head'][:12]}): a commit in between may delete the "
                         f"weights (`git show --stat HEAD`); put them back by hand, then remove {LEFT}")
    _git(root, "reset", "-q", "--", *left["names"])
    atomic_write_text(_exclude_file(root), left["exclude"])
    (root / LEFT).unlink()
    print(f"{len(left['names'])} weight files back in git's index")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the bundle's parts under .gpu/call-*")
    b.add_argument("--python-version", default="3.12", help="the device image's Python (3.12); 3.11 to rehearse here")
    sub.add_parser("leave", help="the weight files out of git's index for the calls")
    sub.add_parser("restore", help="the weight files back into git's index")
    args = parser.parse_args()
    {"build": lambda: build(args.python_version), "leave": leave, "restore": restore}[args.command]()


if __name__ == "__main__":
    main()

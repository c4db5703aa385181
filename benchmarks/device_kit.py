"""Take the GPU run of ``experiments/digits-1024.yaml`` to a lent GPU machine (the ``device`` tool) in calls that fit.

A device call sends the working tree (tracked files, untracked files git does not ignore, the ignored
paths it carries) up to 64 MiB, to a bare image that holds PyTorch but not Ray, Optuna, diffusers, MLflow,
torch-fidelity, pydantic … This tree's tracked files are 80 MB, 78 of them the two embedded models' weights,
and Ray's wheel alone is 79 MB: nothing fits as it is. So:

    python benchmarks/device_kit.py build     # .gpu/call-1 … call-N (N is printed): one xz stream, split in parts,
                                              # of the packages the image lacks and embedded-1024's weights
    python benchmarks/device_kit.py leave     # the weight files out of git's index (they stay on disk)
    # device run, carry [".gpu/call-1"], command "bash benchmarks/device_run.sh 1 N"
    # … each call at once after the one before (a machine stays warm 30 s after a call)
    # device run, carry [".gpu/call-N"], command "bash benchmarks/device_run.sh N N"
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
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT_DIR = ROOT / ".gpu"  # ignored by .gitignore
IMAGE_FILE = Path(__file__).with_name("device-image.txt")
CALL_LIMIT = 64 * 2**20  # what one device call sends: the working tree and the carried paths
MARGIN = 2**20  # for files the tree gains between the build and the calls
LEAVE_MIN = 2**20  # tracked files this large leave the index during the calls: the models' weights
DEVICE_MODEL = "ditplan/models/embedded_1024/"  # the only model the GPU run loads: its weights travel in the bundle
PROVIDED = {"torch", "torchvision"}  # the image's own builds (CUDA); ours are pinned to this machine's CPU builds
NO_DEPS = {"torch-fidelity"}  # needs nothing the image lacks but torch, which the resolver would fetch
EXCLUDE_MARK = "# device_kit leave"  # marks the lines `leave` adds to .git/info/exclude
# parts of the packages the run never imports (Ray's Java workers and libraries, the web front-ends): without
# them the bundle is 45 MB of xz, not 63
STRIP = ("ray/jars", "ray/rllib", "ray/serve", "ray/data", "ray/llm", "ray/dashboard/client", "mlflow/server/js")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def image_packages(path: Path = IMAGE_FILE) -> set[str]:
    return {canonical(line.split("#")[0].strip()) for line in path.read_text().splitlines() if line.split("#")[0].strip()}


def tracked_sizes(root: Path = ROOT, untracked: bool = False) -> dict[str, int]:
    """Every file in git's index (and with ``untracked`` every file git does not ignore: what a call sends) and
    its size on disk."""
    listing = ["git", "ls-files", "-z", "--cached"] + (["--others", "--exclude-standard"] if untracked else [])
    names = subprocess.run(listing, cwd=root, check=True, capture_output=True).stdout.split(b"\0")
    return {n.decode(): (root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file()}


def leaving(sizes: dict[str, int]) -> list[str]:
    """The tracked files that leave the index during the calls (the models' weights)."""
    return sorted(name for name, size in sizes.items() if size >= LEAVE_MIN)


def plan_parts(tree_bytes: int, bundle_bytes: int) -> list[int]:
    """Sizes of the bundle's parts, one per call, each fitting beside the tree in one call."""
    room = CALL_LIMIT - MARGIN - tree_bytes
    if room <= 0:
        raise SystemExit(f"the working tree without its weights is {tree_bytes / 2**20:.1f} MiB, no room for the "
                         f"bundle in a {CALL_LIMIT / 2**20:.0f} MiB call; ignore or remove what makes it so large")
    count = math.ceil(bundle_bytes / room)
    part = math.ceil(bundle_bytes / count)
    return [min(part, bundle_bytes - i * part) for i in range(count)]


def pip_options(python_version: str) -> list[str]:
    return (["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
            + [f"--platform={p}" for p in PLATFORMS])


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
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
    pinned = [f"{name}=={version}" for name, version in resolved if canonical(name) not in image]
    return pinned + [r for r in requirements() if requirement_name(r) in NO_DEPS]


def build(python_version: str) -> None:
    packages = missing_packages(python_version, image_packages())
    print(f"{len(packages)} packages the image lacks: {' '.join(packages)}")
    sizes = tracked_sizes()
    weights = [name for name in leaving(sizes) if name.startswith(DEVICE_MODEL)]
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                        *pip_options(python_version), *packages], check=True)
        for part in STRIP:
            shutil.rmtree(site / part)
        bundle = Path(tmp) / "bundle.tar.xz"
        print(f"packing {sum(f.stat().st_size for f in site.rglob('*') if f.is_file()) / 1e6:.0f} MB of packages and "
              f"{sum(sizes[w] for w in weights) / 1e6:.0f} MB of weights with xz (3–4 minutes) …")
        with tarfile.open(bundle, "w:xz", preset=9) as tar:
            tar.add(site, "site")
            for name in weights:
                tar.add(ROOT / name, f"tree/{name}")
        tree_bytes = sum(tracked_sizes(untracked=True).values()) - sum(sizes[n] for n in leaving(sizes))
        parts = plan_parts(tree_bytes, bundle.stat().st_size)
        shutil.rmtree(KIT_DIR, ignore_errors=True)
        with bundle.open("rb") as stream:
            for k, size in enumerate(parts, 1):
                (KIT_DIR / f"call-{k}").mkdir(parents=True)
                (KIT_DIR / f"call-{k}" / f"bundle.part{k}").write_bytes(stream.read(size))
                (KIT_DIR / f"call-{k}" / "python-version").write_text(python_version + "\n")
    n = len(parts)
    print(f"bundle {sum(parts) / 2**20:.1f} MiB in {n} parts; each call sends {tree_bytes / 2**20:.1f} MiB of tree "
          f"(after `leave`) + ≤ {max(parts) / 2**20:.1f} MiB of bundle ≤ {CALL_LIMIT / 2**20:.0f} MiB")
    for k in range(1, n + 1):
        print(f'  call {k}: carry [".gpu/call-{k}"], command "bash benchmarks/device_run.sh {k} {n}"')


def leave(root: Path = ROOT) -> None:
    """Take the weight files out of git's index and ignore them, so that a device call leaves them behind."""
    names = leaving(tracked_sizes(root))
    if not names:
        raise SystemExit("no weight files in git's index: `leave` ran already (`restore` puts them back)")
    subprocess.run(["git", "rm", "-q", "--cached", "--", *names], cwd=root, check=True)
    exclude = root / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a") as f:
        f.writelines(f"{EXCLUDE_MARK}\n/{name}\n" for name in names)
    print(f"{len(names)} weight files left git's index ({sum((root / n).stat().st_size for n in names) / 1e6:.0f} MB); "
          "run `python benchmarks/device_kit.py restore` after the calls")


def restore(root: Path = ROOT) -> None:
    """Undo :func:`leave`: the weight files back into the index as HEAD has them, the ignore lines gone."""
    exclude = root / ".git" / "info" / "exclude"
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    names = [lines[i + 1].lstrip("/") for i, line in enumerate(lines[:-1]) if line == EXCLUDE_MARK]
    if not names:
        raise SystemExit("nothing to restore: `leave` has not run")
    subprocess.run(["git", "reset", "-q", "--", *names], cwd=root, check=True)
    marked = {i for i, line in enumerate(lines) if line == EXCLUDE_MARK}
    exclude.write_text("".join(f"{line}\n" for i, line in enumerate(lines) if i not in marked and i - 1 not in marked))
    print(f"{len(names)} weight files back in git's index")


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

"""Reading the files a user hands ditplan: any path and any content either yields the expected data or a
:class:`UserError` whose one line names the file and the problem (never a traceback).

``read_yaml`` reads experiment and plan files; ``read_tensors`` reads safetensors files (prompt
embeddings); ``check_folder`` checks a folder a file names (model, reference).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ditplan.errors import UserError
from ditplan.registry import did_you_mean

MAX_YAML_BYTES = 1 << 20  # an experiment or plan file is a few KiB; anything beyond 1 MiB is not one
MAX_TENSOR_BYTES = 1 << 34  # 16 GiB: no prompt-embedding file comes near it


def readable_file(path: str | Path, what: str, max_bytes: int) -> Path:
    """``path`` as a Path once it is known to be a readable file of at most ``max_bytes`` bytes."""
    path = Path(path)
    with _existing(path, what):
        if not path.is_file():
            raise UserError(f"{what} {path} is not a file ({'a folder' if path.is_dir() else 'not a regular file'})")
        size = path.stat().st_size
        with path.open("rb"):
            pass
    if size > max_bytes:
        raise UserError(f"{what} {path} is {size:,} bytes; a {what} is at most {max_bytes:,} bytes")
    return path


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _SafeLoader12(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's booleans, ``true`` and ``false`` only: YAML 1.1 also reads ``yes``, ``no``,
    ``on`` and ``off`` as booleans, which turns a name such as the guidance fill ``off`` into false (a boolean field
    still takes them: the experiment schema reads ``"yes"`` / ``"off"`` as true / false)."""


_BOOL = "tag:yaml.org,2002:bool"
_SafeLoader12.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
                                         for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SafeLoader12.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in ``path`` (safe loading, YAML 1.2's booleans: :class:`_SafeLoader12`); ``what`` names the
    kind of file in errors."""
    path = readable_file(path, what, MAX_YAML_BYTES)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start}); is it a YAML file?") from None
    except OSError as err:
        raise UserError(f"{what} {path} cannot be read: {err.strerror or err}") from None
    try:
        return yaml.load(text, Loader=_SafeLoader12)  # noqa: S506 (a yaml.SafeLoader subclass)
    except yaml.YAMLError as err:
        raise UserError(f"{what} {path} is not valid YAML: {_one_line(err)}") from None
    except RecursionError:
        raise UserError(f"{what} {path} nests too deeply to be one") from None


def read_tensors(path: str | Path, what: str) -> dict[str, Any]:
    """The tensors of the safetensors file ``path`` (on the CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = readable_file(path, what, MAX_TENSOR_BYTES)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{what} {path} is not a readable safetensors file: {_one_line(err)}") from None


def check_folder(path: str | Path, what: str, names: Sequence[str] = ()) -> Path:
    """``path`` as a Path once it is known to be a folder that can be listed; a missing one is named with the
    closest of its sibling folders and ``names`` (other things the value may name, e.g. embedded models)."""
    path = Path(path)
    with _existing(path, what, names):
        if not path.is_dir():
            raise UserError(f"{what} {path} is not a folder")
        next(path.iterdir(), None)
    return path


def _siblings(path: Path) -> list[str]:
    """The names beside ``path`` in its folder (none when that folder cannot be listed)."""
    try:
        return sorted(p.name for p in (path.parent if str(path.parent) else Path(".")).iterdir())
    except OSError:
        return []


@contextmanager
def _existing(path: Path, what: str, names: Sequence[str] = ()) -> Iterator[None]:
    """Run the checks inside once ``path`` is known to exist; a missing path (named with the closest of its
    siblings and ``names``), or an OSError on the way, becomes a :class:`UserError` naming it."""
    try:
        if not path.exists():
            raise UserError(f"{what} {path} does not exist{did_you_mean(path.name, [*names, *_siblings(path)])}")
        yield
    except OSError as err:
        raise UserError(f"{what} {path} cannot be read: {err.strerror or err}") from None


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Prefix ``path: `` to a :class:`UserError` raised inside that does not name it already (a bad model
    or evaluation section found while loading what the experiment file ``path`` describes)."""
    try:
        yield
    except UserError as err:
        if str(path) in str(err):
            raise
        raise type(err)(f"{path}: {err}") from None

"""The Strategy contract: one way to compute a self-attention layer at a denoising step.

A strategy is registered by name (:func:`register`); plans name strategies per (step, layer), search
spaces are built from their ``search_space`` and the CLI lists the registry. Adding a strategy means
adding one module under ``ditplan/strategies/`` that subclasses :class:`Strategy` and registers it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.models.attention_processor import Attention

from ditplan.models.context import StepContext
from ditplan.registry import Registry
from ditplan.strategies.joint import JointTokens


@dataclass(frozen=True)
class NoConfig:
    """A strategy without parameters."""


@dataclass(frozen=True)
class AttentionShape:
    """The sizes the cost model needs: batch (incl. CFG doubling), tokens, width, heads; ``window_count``:
    which (query, key) pairs a window counts, ``executed`` (what its kernel computes) or ``ideal``
    (see :meth:`ditplan.strategies.attention.WindowLayout.pairs`)."""

    batch: int
    tokens: int
    dim: int
    heads: int
    window_count: str = "executed"


class AttentionCall:
    """Everything a strategy sees for one call of one self-attention layer.

    ``cache`` persists across the steps of one sampling run (it is cleared before every run);
    ``wants`` names the cache entries a later step of this layer will read, so nothing else is kept.
    ``between``: when guidance runs as two calls per step, what the step's conditional call leaves for its
    unconditional one (ASC); else None. ``joint``: where the image tokens lie in a joint attention's sequence
    (FLUX, SD3, Qwen-Image: strategies work on its kernel, :mod:`ditplan.strategies.joint`), else None.
    """

    def __init__(
        self,
        attn: Attention,
        original: Callable[..., torch.Tensor],
        hidden_states: torch.Tensor,
        kwargs: dict[str, Any],
        context: StepContext,
        cache: dict[str, torch.Tensor],
        wants: frozenset[str],
        reader: Callable[[str], Strategy | None],
        between: dict[str, Any] | None = None,
        joint: JointTokens | None = None,
    ) -> None:
        self.attn = attn
        self.between = between
        self.joint = joint
        self.hidden_states = hidden_states  # (B, N, C)
        self.context = context
        self.cache = cache
        self.wants = wants
        self._original = original
        self._kwargs = kwargs
        self._reader = reader

    def reader(self, entry: str) -> Strategy | None:
        """The strategy of the next step that reads cache ``entry`` (it defines how the entry is made)."""
        return self._reader(entry)

    def original(self, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's own (unmodified diffusers) attention on ``hidden_states`` (default: the input)."""
        x = self.hidden_states if hidden_states is None else hidden_states
        return self._original(self.attn, x, **self._kwargs)

    def token_counts(self) -> tuple[int, ...]:
        """The tokens of the input and of a joint attention's text stream (``encoder_hidden_states``), if any."""
        text = self._kwargs.get("encoder_hidden_states")
        return (self.hidden_states.shape[1], *((text.shape[1],) if isinstance(text, torch.Tensor) else ()))

    def original_on_rows(self, rows: slice) -> Any:
        """The layer's own attention on the batch rows ``rows`` of its input and of every argument with the
        input's batch (joint attention's text stream): what the module returns, a tensor or a tuple."""
        batch = self.hidden_states.shape[0]
        return self._original(self.attn, self.hidden_states[rows], **rows_of(self._kwargs, rows, batch))


def rows_of(value: Any, rows: slice, batch: int) -> Any:
    """``value`` with every tensor of ``batch`` rows (in tuples, lists and dicts too) cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(rows_of(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: rows_of(v, rows, batch) for k, v in value.items()}
    return value


class Strategy(abc.ABC):
    """Base class of attention strategies.

    Subclasses set ``name``, optionally ``config_class`` (a frozen dataclass whose fields document
    their trade-offs), ``reads`` (cache entries taken from an earlier step) and ``writes`` (cache
    entries this strategy refreshes, which ends the need for older ones).
    """

    name: ClassVar[str]
    config_class: ClassVar[type] = NoConfig
    reads: ClassVar[frozenset[str]] = frozenset()
    writes: ClassVar[frozenset[str]] = frozenset()
    shares_params_with: ClassVar[str | None] = None  # a search draws this strategy's parameters with that one's
    # "attention": the cell changes the layer's self-attention, and the rest of the block runs;
    # "block": the cell replaces the whole block (see BlockStrategy)
    level: ClassVar[str] = "attention"

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    # runs inside joint attention (FLUX, SD3, Qwen-Image) through its attention kernel (see joint_pairs)
    joint_kernel: ClassVar[bool] = False

    def joint_pairs(self, tokens: int, text_tokens: int, count: str) -> int:
        """A ``joint_kernel`` strategy: the (query, key) pairs its kernel computes on a joint sequence of ``tokens``
        image and ``text_tokens`` text tokens (``count``: as for windows, ``executed`` or ``ideal``)."""
        raise NotImplementedError(f"{self.name!r} does not run inside joint attention")

    def joint_production_pairs(self, entry: str, tokens: int, text_tokens: int, count: str) -> int:
        """The pairs an earlier dense step's kernel adds to make cache ``entry`` for this strategy on joint
        attention (charged to that step)."""
        return 0

    @classmethod
    def module_share(cls, cfg: bool) -> float | None:
        """For a strategy that takes the attention module as a whole (runs it on all or some rows, or reuses
        its output), and so runs on any family's attention, joint attention included: the share of the module's
        FLOPs it spends (``cfg``: the batch holds CFG halves). None for one that works inside the attention
        (queries, keys, values), which runs only where a family exposes them."""
        return None

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> Strategy:
        """Build from a plan's ``params[name]`` mapping; unknown keys are refused by name."""
        params = dict(params or {})
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(
                f"strategy {cls.name!r} has no parameter {unknown[0]!r}; its parameters are {sorted(fields) or 'none'}"
            )
        return cls(cls.config_class(**params))

    @abc.abstractmethod
    def attention(self, call: AttentionCall) -> torch.Tensor:
        """Called at every attention call of a layer whose plan cell names this strategy at this step;
        returns the attention output (B, N, C). Stores what ``call.wants`` in ``call.cache``."""

    @abc.abstractmethod
    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        """Analytic FLOPs (projections + scores + weighted sum) of one call, given the cache entries it
        writes at this cell (e.g. a dense step that also makes a residual for later steps)."""

    def production_flops(self, entry: str, shape: AttentionShape) -> float:
        """FLOPs an earlier step spends making cache ``entry`` for this strategy (charged to that step)."""
        return 0.0

    def cache_format(self, entry: str) -> Any:
        """Called once when a plan is applied: how this strategy needs cache ``entry`` made (e.g. WA-RS:
        its window). All readers of one made entry must agree; None means any way does."""
        return None

    def validate(self, num_tokens: int) -> None:
        """Called once when a plan is applied; raise ``ValueError`` naming a bad parameter."""

    @classmethod
    def search_space(cls, num_tokens: int) -> dict[str, list[Any]]:
        """The parameters a search may tune for a model of ``num_tokens``, as ``{param: [choices]}``."""
        return {}

    @classmethod
    def resolved_params(cls, params: Mapping[str, Any] | None, num_tokens: int) -> dict[str, Any]:
        """Every config field of a plan's ``params[name]`` with the value it runs with (defaults filled in,
        for a model of ``num_tokens``): what a search space compares with its choices."""
        return {**{f.name: getattr(cls.config_class(), f.name) for f in dataclasses.fields(cls.config_class)},
                **dict(params or {})}


BLOCK_ENTRY = "block"  # a block's residual (output − input), cached for the block strategies of later steps


class BlockStrategy(Strategy):
    """Base class of strategies that replace a whole transformer block at a step (block caching).

    A block that computes at a step (any attention-level cell) keeps its residual ``output − input``
    while a later block-level cell reads it; ``history`` is how many of the last computed residuals the
    strategy uses. Installed as a diffusers hook on the block (:mod:`ditplan.strategies.apply`).
    """

    level = "block"
    reads = frozenset({BLOCK_ENTRY})

    @property
    def history(self) -> int:
        """How many computed residuals (the latest last) :meth:`block_output` uses."""
        return 1

    @abc.abstractmethod
    def block_output(self, hidden_states: torch.Tensor, residuals: Sequence[tuple[int, torch.Tensor]],
                     step: int) -> torch.Tensor:
        """Called instead of the block's forward at a step whose cell names this strategy: the block's
        output (B, N, C) from its input and the residuals ``(step, output − input)`` of its last computed
        steps (oldest first, at least one)."""

    def attention(self, call: AttentionCall) -> torch.Tensor:
        raise RuntimeError(f"{self.name!r} replaces whole blocks; its block hook runs instead of the attention")

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return 0.0


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available to plans, search spaces and the CLI by its name."""
    return STRATEGIES.register(cls.name, cls)


def get_strategy_class(name: str, where: str = "") -> type[Strategy]:
    """The strategy registered as ``name``; an unknown name is a one-line error naming ``where`` it was
    found and the registered ones."""
    return STRATEGIES.get_entry(name, where)


def config_fields(name: str) -> list[str]:
    """The parameters of strategy ``name`` (its config's fields)."""
    return [f.name for f in dataclasses.fields(get_strategy_class(name).config_class)]


def is_block_strategy(name: str) -> bool:
    """Whether ``name`` is a registered strategy that replaces whole blocks (block caching)."""
    strategy = STRATEGIES.get(name)
    return strategy is not None and strategy.level == "block"


def dense_attention_flops(shape: AttentionShape, batch: int | None = None, window: int | None = None) -> float:
    """Projections (Q, K, V, out: 4·2·N·C²) plus the core (QKᵀ and AV: 2·2·N·K·C), K = keys per query."""
    b = shape.batch if batch is None else batch
    keys = shape.tokens if window is None else window
    projections = 4 * 2 * shape.tokens * shape.dim * shape.dim
    core = 2 * 2 * shape.tokens * keys * shape.dim
    return float(b * (projections + core))


def cross_attention_flops(batch: int, queries: int, keys: int, dim: int) -> float:
    """Attention from ``queries`` tokens to ``keys`` other tokens (SDTM's sparse ↔ dense attention):
    Q and out projections on the queries, K and V on the keys, and the full core."""
    projections = 2 * 2 * queries * dim * dim + 2 * 2 * keys * dim * dim
    return float(batch * (projections + 2 * 2 * queries * keys * dim))

"""The registry of merge methods: name -> leaf function with declared parameters.

Every method is a pure *leaf function*

    leaf(stacked[N, ...], weights[N], base[...] | None, *, key, **params) -> array[...]

that merges one tensor stacked along axis 0 (one slice per source model): `stacked`, `weights`
and `base` are `jax.Array`s (leaf functions annotate only their own parameters), `key` a
`jax.random` key or None (in a merge, a random method that can merge in blocks of rows,
`MergeMethod.blocked`, gets a `jkarcher.methods.sparsify.RowKey`: the tensor's key and the row
where the leaf's rows begin). It computes in, and returns, `jkarcher.numerics.compute_dtype()`
(float32; float64 under x64), whatever the sources' dtype: the caller rounds once to the output
dtype. It does no I/O, reads no globals and draws randomness only from the explicit key. The
registry records, for each method, its parameters with defaults and checks, whether it needs a
base model and whether it is random, so that the Python API, the config validation, the CLI and
the README's table of methods all read one source of truth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from jkarcher.errors import JkarcherError
from jkarcher.numerics import NegativeWeightError, check_weights

BASE_NONE = "none"
BASE_OPTIONAL = "optional"
BASE_REQUIRED = "required"


class Round(NamedTuple):
    """One pass of statistics over a tensor's blocks of rows (`Passes`).

    statistics(sources, weights, base, previous, *, key, first_row, **params) -> one block's
      partials, an integer or compute-dtype array: `previous` is what the round before found
      (its `finish`; None in the first round), `first_row` the row of the whole tensor where
      the block begins;
    finish(sums, weights, previous, *, shape, **params) -> what the next round (or the second
      pass) takes, from the whole tensor's sums: the blocks' partials concatenated along their
      last axis in row order (bit for bit the whole tensor's), or added where `added` (counts);
      `shape` is the whole tensor's;
    sums(shape, n) -> the whole tensor's sums (a `jax.ShapeDtypeStruct`) for n sources of
      `shape`.
    """

    statistics: Callable[..., Any]
    finish: Callable[..., Any]
    sums: Callable[[tuple[int, ...], int], jax.ShapeDtypeStruct]
    added: bool = False


@dataclasses.dataclass(frozen=True)
class Passes:
    """How a method whose merge needs whole-tensor statistics (norms, inner products, order
    statistics) merges a tensor in blocks of rows (docs/design.md, "Memory"): each of `rounds`
    passes over the blocks gathers statistics from what the rounds before it found, and a last
    pass, `apply`, merges each block's rows from the last round's `finish`. It takes no tensor
    inputs.

    apply(sources, weights, base, coefficients, *, key, first_row, **params) -> the block's merged
      rows, in the compute dtype (`first_row`: the row of the whole tensor where they begin).

    `own_leaf_when_whole`: the method's own leaf gives a whole tensor the bytes of these passes
    (their statistics are exact, e.g. counts), so a tensor that fits merges in that one leaf.
    `ieee`: every program of the method, its own leaf included, compiles without fast math
    (`numerics.IEEE_COMPILER_OPTIONS`), where a statistic or a sum that is computed in several
    programs (the passes, and the own leaf of a whole tensor) must round alike in all of them.
    """

    rounds: tuple[Round, ...]
    apply: Callable[..., Any]
    own_leaf_when_whole: bool = False
    ieee: bool = False

    def in_one_program(self, stacked, weights, base, *, key=None, **params):
        """Every pass on a whole tensor, traced into one program: a method's own leaf."""
        shape = stacked.shape[1:]
        previous = None
        for step in self.rounds:
            sums = step.statistics(stacked, weights, base, previous, key=key, first_row=0, **params)
            previous = step.finish(sums, weights, previous, shape=shape, **params)
        # The last pass forms the task vectors anew from a base XLA cannot tell is the same:
        # it would otherwise form each once for both passes and hold all N in float32.
        base = None if base is None else jax.lax.optimization_barrier(base)
        return self.apply(stacked, weights, base, previous, key=key, first_row=0, **params)


# A method's `blocked(params)` for merges whose rows depend only on the same rows of the inputs:
# each block of rows is merged by the leaf itself.
ROWS = "rows"


def always_rows(params: Mapping[str, Any]) -> str:
    """The `blocked` of a method whose rows depend only on the same rows of the inputs."""
    del params
    return ROWS


def never_blocked(params: Mapping[str, Any]) -> None:
    """The `blocked` of a method that merges every tensor whole."""
    del params


class MethodError(JkarcherError):
    """A method was asked for that does not exist, or with parameters it cannot take."""


class _Required:
    """The default of a parameter that has none: the caller must give a value."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclasses.dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method.

    `per_model` parameters may be given once for all models or as one value per source model
    (mergekit's per-model `parameters:`); the leaf then receives a tuple of N values.
    `check(value)` returns an error text for a bad value, or None when the value is fine.
    A `default` of `REQUIRED` means the parameter has no default and must be given.
    A `traced` parameter is a number that the leaf uses only in arithmetic, never in Python
    control flow or shapes: it reaches the leaf as a traced scalar in the compute dtype (a tuple
    of N scalars when given per model), so that tensors merged with different values of it (a
    gradient over layers) share one compiled leaf.
    """

    name: str
    default: Any
    doc: str = ""
    per_model: bool = False
    check: Callable[[Any], str | None] | None = None
    traced: bool = False


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its leaf function and what it declares about itself."""

    name: str
    leaf: Callable[..., Any]
    params: tuple[Param, ...] = ()
    base: str = BASE_NONE
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    summary: str = ""
    citation: str = ""
    # Whether the per-model weights enter the result (some methods define their own mixing).
    weighted: bool = True
    # A check across the resolved parameters: returns an error text naming the parameters, or None.
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    # Per-model arrays the leaf takes besides the sources, e.g. ("fisher",): each is given as N
    # pytrees shaped like the models, and reaches the leaf stacked like them, [N, ...].
    tensor_inputs: tuple[str, ...] = ()
    # Whether the leaf needs every tensor input (else they are optional).
    tensor_inputs_required: bool = False
    # Whether a leaf may do without the tensor inputs that the merge needs (its inputs None for
    # all N models), as regmean merges tensors that are no linear layer's weight without Grams;
    # optional inputs may always be None.
    inputs_per_leaf_optional: bool = False
    # The shape of a tensor input's leaf for a model leaf of a given shape, for the inputs not
    # shaped like the models (e.g. regmean's Gram [in, in] of a weight [out, in]); such a function
    # returns None for leaves that take no such input, which are then given none.
    tensor_input_shapes: Mapping[str, Callable[[tuple[int, ...]], tuple[int, ...] | None]] = (
        dataclasses.field(default_factory=dict)
    )
    # Whether the weights may be negative, as mergekit lets them be (task negation: a negative
    # weight subtracts a model's task vector); else they must be >= 0, for the reason given.
    signed_weights: bool = False
    unsigned_because: str = "its weights are the proportions of a mean"
    # For signed weights: whether the resolved parameters divide by the weights' sum, which must
    # then not be 0 (methods that guard a zero sum, as mergekit's do, leave this None).
    divides_by_weight_sum: Callable[[Mapping[str, Any]], bool] | None = None
    # How a tensor that does not fit the memory budget is merged in blocks of rows, for the
    # resolved parameters: ROWS, a Passes, or None (every tensor is merged whole).
    blocked: Callable[[Mapping[str, Any]], Passes | str | None] = never_blocked
    # The float32 copies of one source that the leaf holds at its peak, beside its inputs and
    # output: (per model, fixed), or a function of (the resolved parameters, whether the leaf is
    # given its tensor inputs, the source's shape) that returns them. XLA's memory analysis of
    # each leaf bounds it (a test).
    scratch: tuple[float, float] | Callable[..., tuple[float, float]] = (1.0, 1.0)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise MethodError(
            f"method {self.name!r} has no parameter {name!r} (its parameters: {known})"
        )

    def scratch_copies(
        self, params: Mapping[str, Any], n_models: int, inputs: bool, shape: tuple[int, ...]
    ) -> float:
        """The float32 copies of one source of `shape` that the leaf holds for `n_models` models,
        given its tensor inputs or not (`scratch`)."""
        scratch = self.scratch
        per_model, fixed = scratch(params, inputs, shape) if callable(scratch) else scratch
        return per_model * n_models + fixed

    def tensor_input_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape tensor input `name` has for a model leaf of `shape` (None: it has none)."""
        shape_of = self.tensor_input_shapes.get(name)
        return tuple(shape) if shape_of is None else shape_of(tuple(shape))

    def inputs_problem(self, n_models: int, has_base: bool) -> tuple[str, str] | None:
        """What is wrong with merging `n_models` models, with or without a base, as (the input
        at fault, "base_model" or "models"; the error text), or None when nothing is."""
        if self.base == BASE_REQUIRED and not has_base:
            return "base_model", f"method {self.name!r} needs a base model, and none was given"
        if self.base == BASE_NONE and has_base:
            return "base_model", f"method {self.name!r} takes no base model, but one was given"
        if n_models < self.min_models or (
            self.max_models is not None and n_models > self.max_models
        ):
            span = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}"
                + (f" and at most {self.max_models}" if self.max_models else "")
            )
            noun = "model" if self.max_models == 1 else "models"
            return "models", f"method {self.name!r} merges {span} {noun}, got {n_models}"
        return None

    def checked_weights(
        self, weights: Any, n_models: int, params: Mapping[str, Any] | None = None
    ) -> Any:
        """`jkarcher.numerics.check_weights` of N weights as this method takes them: signed or
        >= 0, the sum of signed ones checked for 0 where the resolved `params` divide by it
        (params None: not known yet, the sum is not checked)."""
        divides = (
            params is not None
            and self.divides_by_weight_sum is not None
            and self.divides_by_weight_sum(params)
        )
        try:
            return check_weights(weights, n_models, signed=self.signed_weights, nonzero_sum=divides)
        except NegativeWeightError as err:
            raise NegativeWeightError(
                f"{err} for method {self.name!r}, since {self.unsigned_because}"
            ) from None

    def weight_sign_problem(self, weight: float) -> str | None:
        """Why this method cannot take `weight` (a number), or None: a negative weight, for a
        method whose weights must be >= 0."""
        if weight >= 0 or self.signed_weights:
            return None
        why = self.unsigned_because
        return f"method {self.name!r} takes weights >= 0, since {why}; got {weight!r}"

    def resolve(self, params: Mapping[str, Any], n_models: int, has_base: bool) -> dict[str, Any]:
        """Fill defaults and check every value; per-model values become tuples of length N."""
        problem = self.inputs_problem(n_models, has_base)
        if problem:
            raise MethodError(problem[1])
        for name in params:
            self.param(name)
        resolved = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if value is REQUIRED:
                raise MethodError(
                    f"method {self.name!r} needs parameter {p.name!r} ({p.doc}); it has no default"
                )
            values = _per_model_values(self.name, p, value, n_models)
            for v in values if isinstance(values, tuple) else (values,):
                problem = p.check(v) if p.check is not None else None
                if problem:
                    raise MethodError(
                        f"method {self.name!r}, parameter {p.name!r}={v!r}: {problem}"
                    )
            resolved[p.name] = values
        problem = self.check(resolved) if self.check is not None else None
        if problem:
            raise MethodError(f"method {self.name!r}: {problem}")
        return resolved


def _per_model_values(method: str, p: Param, value: Any, n_models: int) -> Any:
    if not isinstance(value, list | tuple):
        return value
    if not p.per_model:
        raise MethodError(
            f"method {method!r}, parameter {p.name!r}: takes one value, not a list {value!r}"
        )
    if len(value) != n_models:
        raise MethodError(
            f"method {method!r}, parameter {p.name!r}: {len(value)} values given for "
            f"{n_models} models"
        )
    return tuple(value)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry; names are unique."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (one added with `register`, e.g. for the length of a test)."""
    get(name)
    del _REGISTRY[name]


def get(name: str) -> MergeMethod:
    """The registered method called `name`; an error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(
            f"unknown merge method {name!r}; known methods: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    """All registered method names, sorted."""
    return sorted(_REGISTRY)


# Checks shared by many methods' parameter declarations.
def positive(value: Any) -> str | None:
    return None if is_number(value) and value > 0 else "must be a number > 0"


def non_negative(value: Any) -> str | None:
    return None if is_number(value) and value >= 0 else "must be a number >= 0"


def positive_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else "must be an integer > 0"


def unit_interval(value: Any) -> str | None:
    return None if is_number(value) and 0 <= value <= 1 else "must be in [0, 1]"


def fraction(value: Any) -> str | None:
    """A proportion of elements to keep, such as a density: in (0, 1]."""
    return None if is_number(value) and 0 < value <= 1 else "must be in (0, 1]"


def number(value: Any) -> str | None:
    return None if is_number(value) and math.isfinite(value) else "must be a finite number"


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """`check`, or no value at all (None)."""

    def check_optional(value: Any) -> str | None:
        return None if value is None else check(value)

    return check_optional


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def is_number(value: Any) -> bool:
    """Whether `value` is an int or a float (a bool is neither here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)

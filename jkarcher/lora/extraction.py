"""A LoRA adapter extracted from a fine-tuned model and its base, as `mergekit-extract-lora`
extracts one, written as a PEFT adapter directory (`jkarcher.lora.adapter`).

Each module of the fine-tuned model (the tensors `M.weight` and `M.bias`) is, in mergekit's
order of rules:
- saved whole (PEFT's modules_to_save), when M or its last name part is in `modules_to_save`.
  Without `embed_lora`, the embeddings (`*embed_tokens`) and the output embedding (`lm_head`)
  are added there, unless an exclude regex matches them;
- skipped, when an include regex is given and none matches M, or an exclude regex matches it;
- decomposed (`jkarcher.lora.extract`), when its weight is 2-D: a linear module, or an
  embedding (then transposed, as PEFT's lora_embedding_A/B) with `embed_lora`. Where M's bias
  differs from the base's, the difference is written as `lora_B.bias`, as mergekit writes it;
  PEFT applies that tensor only with lora_bias, which extraction leaves off (a linear module
  without a bias cannot merge one), so the summary names each such bias;
- otherwise (a norm's 1-D weight) saved whole and its last name part added to modules_to_save,
  as mergekit saves a module it cannot decompose, or skipped with `skip_undecomposable`.
A model that ties lm_head to its embeddings has lm_head treated as a module whose weight is the
embedding, as mergekit does, so that PEFT's copy of lm_head follows a changed embedding.

Everything is checked from headers before any tensor is read: the models exist, every
decomposed or saved tensor is in the base in the same shape, floating point, the output may be
written (`jkarcher.io.output_dir`), and each module fits the memory budget (`memory`, by default
the share of the available memory that merges take, `jkarcher.memory`) with the factors
kept before it (`module_bytes`); a module that does not is refused, naming the budget that would
extract the adapter. Tensors are then read one pair at a time; the factors,
of max_rank x (in + out) values per module, are kept until all are known (their ranks fix the
file's layout), and the saved modules are copied from the fine-tuned model as they are written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jkarcher.config.fields import size_text
from jkarcher.errors import JkarcherError
from jkarcher.io import CheckpointReader, StoredTensor
from jkarcher.io.orbax_io import open_checkpoint
from jkarcher.io.output_dir import check_output_dir, staged_directory
from jkarcher.io.writer import OutputTensor, Shard, ShardWriter, natural_key, write_json
from jkarcher.lora.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_config,
    lora_bias_name,
    lora_names,
    saved_name,
)
from jkarcher.lora.extract import lora_factors
from jkarcher.memory import default_budget
from jkarcher.numerics import compute_dtype

EMBED_SUFFIX = "embed_tokens"
LM_HEAD = "lm_head"
PARTS = ("weight", "bias")


class ExtractionError(JkarcherError):
    """The models cannot give an adapter as asked; the message names the tensor or the flag."""


@dataclasses.dataclass(frozen=True)
class ExtractionOptions:
    """mergekit-extract-lora's options, with its defaults."""

    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()
    exclude_regexes: tuple[str, ...] = ()
    include_regexes: tuple[str, ...] = ()
    sv_epsilon: float = 0.0
    skip_undecomposable: bool = False
    # The factors' dtype; None: the fine-tuned weight's.
    dtype: np.dtype | None = None
    # The bytes the extraction may hold; None: the default budget of a merge.
    memory: int | None = None


@dataclasses.dataclass(frozen=True)
class Module:
    """One module of the fine-tuned model: its tensors there and in the base ({part: tensor})."""

    name: str
    tuned: dict[str, StoredTensor]
    base: dict[str, StoredTensor]

    @property
    def key(self) -> str:
        return self.name.rpartition(".")[2]


@dataclasses.dataclass(frozen=True)
class ExtractionPlan:
    """What an extraction decomposes (`lora`), saves whole (`saved`) and where it writes."""

    model: CheckpointReader
    base: CheckpointReader
    output: Path
    overwrite: bool
    options: ExtractionOptions
    lora: tuple[Module, ...]
    saved: tuple[Module, ...]
    modules_to_save: tuple[str, ...]
    skipped: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ExtractionSummary:
    """What was written: each decomposed module's rank and relative error ||D - B A|| / ||D||
    (0 where D = 0), and the biases whose change PEFT will not apply (module docstring)."""

    output: Path
    ranks: dict[str, int]
    relative_errors: dict[str, float]
    saved: int
    unapplied_biases: tuple[str, ...]

    def __str__(self) -> str:
        worst = max(self.relative_errors.items(), key=lambda item: item[1])
        return (
            f"wrote {self.output}: {len(self.ranks)} LoRA modules of rank <= "
            f"{max(self.ranks.values())}, {self.saved} modules saved whole; largest relative "
            f"error {worst[1]:.3g} ({worst[0]})"
        )

    def warnings(self) -> list[str]:
        return [
            f"tensor {name!r} differs from the base; its change is written as lora_B.bias, "
            "which PEFT applies only with lora_bias=true (left false: linear modules without a "
            "bias cannot merge one)"
            for name in self.unapplied_biases
        ]


def plan_extraction(
    model: str, base: str, output: str | Path, options: ExtractionOptions, overwrite: bool = False
) -> ExtractionPlan:
    """Open both models' headers, sort the modules by the rules above and check everything."""
    if options.max_rank < 1:
        raise ExtractionError(f"--max-rank: must be >= 1, got {options.max_rank}")
    excludes = _regexes(options.exclude_regexes, "--exclude-regex")
    includes = _regexes(options.include_regexes, "--include-regex")
    tuned, base_model = _open(model, "--model"), _open(base, "--base-model")
    check_output_dir(output, [tuned.path, base_model.path], overwrite)
    to_save = list(options.modules_to_save)
    lora, saved, skipped = [], [], []
    for module in _modules(tuned, base_model):
        excluded = any(r.search(module.name) for r in excludes)
        if _is_embedding(module) and not options.embed_lora and not excluded:
            to_save += [] if module.key in to_save else [module.key]
        extract = not excluded and (not includes or any(r.search(module.name) for r in includes))
        if module.name in to_save or module.key in to_save:
            saved.append(module)
        elif not extract:
            skipped.append(module.name)
        elif len(module.tuned["weight"].shape) == 2:
            lora.append(module)
        elif options.skip_undecomposable:
            skipped.append(module.name)
        else:
            to_save += [] if module.key in to_save else [module.key]
            saved.append(module)
    if not lora:
        raise ExtractionError(f"{tuned.path}: no module to decompose (all saved or skipped)")
    for module in (*lora, *saved):
        _check_pair(module, tuned, base_model)
    _check_budget(lora, saved, options)
    return ExtractionPlan(
        model=tuned,
        base=base_model,
        output=Path(output),
        overwrite=overwrite,
        options=options,
        lora=tuple(lora),
        saved=tuple(saved),
        modules_to_save=tuple(to_save),
        skipped=tuple(skipped),
    )


def extract_adapter(
    plan: ExtractionPlan, on_module: Callable[[str], None] = lambda name: None
) -> ExtractionSummary:
    """Decompose every planned module, then write the adapter directory (staged, then renamed
    into place); `on_module(name)` after each module."""
    options = plan.options
    arrays: dict[str, np.ndarray] = {}
    ranks, errors, biases = {}, {}, []
    for module in plan.lora:
        embedding = module.name.endswith(EMBED_SUFFIX)
        delta = _delta(module, "weight")
        factors = lora_factors(
            delta.T if embedding else delta,
            options.max_rank,
            distribute_scale=options.distribute_scale,
            sv_epsilon=options.sv_epsilon,
        )
        dtype = options.dtype or module.tuned["weight"].dtype
        for name, factor in zip(lora_names(module.name, embedding), factors[:2], strict=True):
            arrays[name] = np.asarray(factor).astype(dtype)
        ranks[module.name] = factors.a.shape[0]
        errors[module.name] = float(factors.residual / factors.norm) if factors.norm else 0.0
        if "bias" in module.tuned:
            bias = _delta(module, "bias")
            if np.any(bias):
                arrays[lora_bias_name(module.name)] = bias.astype(module.tuned["bias"].dtype)
                biases.append(module.tuned["bias"].name)
        on_module(module.name)
    layout = [OutputTensor(n, a.dtype, a.shape) for n, a in arrays.items()]
    layout += [
        OutputTensor(saved_name(f"{m.name}.{part}"), t.dtype, t.shape)
        for m in plan.saved
        for part, t in m.tuned.items()
    ]
    shard = Shard(WEIGHTS_NAME, tuple(sorted(layout, key=lambda t: natural_key(t.name))))
    config = adapter_config(
        plan.base.source,
        ranks,
        sorted({m.key for m in plan.lora}),
        list(plan.modules_to_save),
    )
    with staged_directory(plan.output, plan.overwrite) as staging:
        with ShardWriter(staging, [shard]) as writer:
            for name, array in arrays.items():
                writer.write(name, array)
            for module in plan.saved:
                for part, tensor in module.tuned.items():
                    writer.write(saved_name(f"{module.name}.{part}"), tensor.read())
                on_module(module.name)
        write_json(staging / CONFIG_NAME, config)
    return ExtractionSummary(plan.output, ranks, errors, len(plan.saved), tuple(biases))


def module_bytes(shape: tuple[int, int], itemsize: int) -> int:
    """The most bytes decomposing one [m, n] module holds: reading W' and W (of `itemsize`) and
    forming D = W' - W (three arrays in the compute dtype), or the thin SVD of D (D and three
    copies: on the device, transposed where m < n, LAPACK's; U [m, k], V^T [k, n] and the
    divide-and-conquer workspace, 7 k^2 + max(m, n) values, k = min(m, n)), whichever is
    more."""
    m, n = shape
    k = min(m, n)
    compute = np.dtype(compute_dtype()).itemsize
    reading = 2 * m * n * itemsize + 3 * m * n * compute
    decomposing = compute * (4 * m * n + m * k + k * n + 7 * k * k + max(m, n))
    return max(reading, decomposing)


def _check_budget(
    lora: Sequence[Module], saved: Sequence[Module], options: ExtractionOptions
) -> None:
    """Each module fits the memory budget with the factors kept before it (at most max_rank x
    (m + n) values per module), the saved ones read after all; else the first that does not is
    refused, with the budget that would extract them all."""
    budget = options.memory or default_budget()
    kept, needs = 0, []
    for module in lora:
        weight = module.tuned["weight"]
        needs.append((weight.name, kept, module_bytes(weight.shape, weight.dtype.itemsize)))
        factor_size = np.dtype(options.dtype or weight.dtype).itemsize
        kept += min(options.max_rank, *weight.shape) * sum(weight.shape) * factor_size
    needs += [(t.name, kept, t.nbytes) for m in saved for t in m.tuned.values()]
    most = max(before + own for _, before, own in needs)
    for name, before, own in needs:
        if before + own > budget:
            raise ExtractionError(
                f"tensor {name!r}: extracting it needs {size_text(before + own)} (with the "
                f"factors kept so far, {size_text(before)}) within the memory budget of "
                f"{size_text(budget)}; --memory {size_text(most)} or more would extract the "
                "adapter"
            )


def _open(path: str, flag: str) -> CheckpointReader:
    try:
        return open_checkpoint(path)
    except JkarcherError as err:
        raise ExtractionError(f"{flag}: {err}") from None


def _regexes(texts: Sequence[str], flag: str) -> list[re.Pattern]:
    try:
        return [re.compile(text) for text in texts]
    except re.error as err:
        raise ExtractionError(f"{flag} {err.pattern!r}: not a regular expression ({err})") from None


def _modules(tuned: CheckpointReader, base: CheckpointReader) -> list[Module]:
    """The fine-tuned model's modules in name order, each with its weight (and bias), and the
    same tensors of the base where it has them; a tied lm_head is the embedding's weight."""
    found: dict[str, Module] = {}
    for name in sorted(tuned.names(), key=natural_key):
        module, _, part = name.rpartition(".")
        if part in PARTS:
            found.setdefault(module, Module(module, {}, {}))
            found[module].tuned[part] = tuned.info(name)
            if name in base:
                found[module].base[part] = base.info(name)
    embedding = next((m for m in found if m.endswith(EMBED_SUFFIX)), None)
    if embedding is not None and LM_HEAD not in found:
        head = found[embedding]
        base_head = base.info(f"{LM_HEAD}.weight") if f"{LM_HEAD}.weight" in base else None
        base_head = base_head or head.base.get("weight")
        found[LM_HEAD] = Module(
            LM_HEAD, {"weight": head.tuned["weight"]}, {"weight": base_head} if base_head else {}
        )
    return [m for m in found.values() if "weight" in m.tuned]


def _delta(module: Module, part: str) -> np.ndarray:
    """The task tensor W' - W of one part of a module, in the compute dtype."""
    dtype = np.dtype(compute_dtype())
    return module.tuned[part].read().astype(dtype) - module.base[part].read().astype(dtype)


def _is_embedding(module: Module) -> bool:
    return module.name.endswith(EMBED_SUFFIX) or module.name == LM_HEAD


def _check_pair(module: Module, tuned: CheckpointReader, base: CheckpointReader) -> None:
    for part, tensor in module.tuned.items():
        other = module.base.get(part)
        if other is None:
            raise ExtractionError(
                f"tensor {tensor.name!r} of {tuned.path} is missing from the base model "
                f"({base.path})"
            )
        if other.shape != tensor.shape:
            raise ExtractionError(
                f"tensor {tensor.name!r} has shape {list(tensor.shape)} in {tensor.file} but "
                f"{list(other.shape)} in the base model ({other.file})"
            )
        if not all(jnp.issubdtype(t.dtype, jnp.floating) for t in (tensor, other)):
            raise ExtractionError(f"tensor {tensor.name!r} is not floating point ({tensor.file})")

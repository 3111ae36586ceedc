"""A checkpoint with a LoRA adapter applied as its tensors are read: mergekit's `model+lora`.

`AdaptedCheckpoint(base, adapter)` is a checkpoint reader (`jkarcher.io.checkpoint`) with the
base's names, shapes, dtypes and config. Its tensors are the base's, except where the adapter
changes them (`jkarcher.lora.adapter` has the names), as PEFT's merge_and_unload changes them:

    M.weight = W + s B A           (a linear module with lora_A, lora_B)
    M.weight = W + s (B A)^T       (an embedding with lora_embedding_A, lora_embedding_B)
    M.bias   = b + s bias_B        (lora_B.bias, where the config sets lora_bias)
    M.weight, M.bias = the adapter's own   (M matched by modules_to_save, as a name suffix)

with s the module's scale (`LoraAdapter.scale`). A base that stores no lm_head (it ties lm_head
to its embeddings) keeps it tied: the adapter's lm_head tensors, which extraction writes from
the embedding, are not used. Each sum is computed in float32 from the stored
values and rounded once to the base tensor's dtype when the tensor (or rows of it) is read, so a
merge never holds the adapted model, and never writes it. Opening one checks, from headers
alone, that every tensor of the adapter belongs to a tensor of the base, in a fitting shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jkarcher.io import CheckpointReader, StoredTensor
from jkarcher.lora.adapter import (
    AdapterError,
    LoraAdapter,
    lora_bias_name,
    lora_names,
    read_adapter,
    saved_name,
)

COMPUTE = np.dtype(np.float32)
TIED_HEAD = "lm_head.weight"


def with_adapter(checkpoint: CheckpointReader, lora: str) -> AdaptedCheckpoint:
    """`checkpoint` with the PEFT LoRA adapter in directory (or hub id) `lora` applied."""
    return AdaptedCheckpoint(checkpoint, read_adapter(lora), lora)


def adapted_weight(
    weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, transpose: bool = False
) -> np.ndarray:
    """W + s B A (with `transpose`: W + s (B A)^T), in float32 (module docstring)."""
    delta = b.astype(COMPUTE) @ a.astype(COMPUTE)
    return weight.astype(COMPUTE) + np.float32(scale) * (delta.T if transpose else delta)


@dataclasses.dataclass(frozen=True)
class AdaptedTensor(StoredTensor):
    """Rows [first, first + shape[0]) of a base tensor with an adapter's change to it: factors
    `a`, `b` (and `transpose` for an embedding's), or an added `bias`, or a `replacement`."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    base: StoredTensor
    scale: float = 1.0
    a: StoredTensor | None = None
    b: StoredTensor | None = None
    transpose: bool = False
    bias: StoredTensor | None = None
    replacement: StoredTensor | None = None
    first: int = 0

    def rows(self, first: int, stop: int) -> AdaptedTensor:
        self._check_rows(first, stop)
        return dataclasses.replace(
            self, shape=(stop - first, *self.shape[1:]), first=self.first + first
        )

    def read(self) -> np.ndarray:
        first, stop = self.first, self.first + self.shape[0]
        if self.replacement is not None:
            return self.replacement.rows(first, stop).read().astype(self.dtype)
        weight = self.base.rows(first, stop).read()
        if self.bias is not None:
            bias = self.bias.rows(first, stop).read().astype(COMPUTE)
            return (weight.astype(COMPUTE) + np.float32(self.scale) * bias).astype(self.dtype)
        if self.transpose:  # rows of W are columns of A
            a, b = self.a.read()[:, first:stop], self.b.read()
        else:
            a, b = self.a.read(), self.b.rows(first, stop).read()
        return adapted_weight(weight, a, b, self.scale, self.transpose).astype(self.dtype)


class AdaptedCheckpoint(CheckpointReader):
    """The checkpoint `base` with `adapter` applied to its tensors as they are read."""

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter, adapter_source: str):
        self.source = f"{base.source}+{adapter_source}"
        self.path = base.path
        self.config = base.config
        self.base = base
        self.adapter = adapter
        used: set[str] = set()
        self.tensors = {name: self._adapted(base.info(name), used) for name in base.names()}
        ignored = {lora_bias_name(m) for m in _modules(base)} if not adapter.applies_bias else set()
        if TIED_HEAD not in base:  # a tied lm_head is the embedding, which the adapter changes
            ignored |= {n for n in adapter.tensors if n.startswith(saved_name("lm_head."))}
        unused = sorted(set(adapter.tensors) - used - ignored)
        if unused:
            raise AdapterError(
                f"{adapter.path}: tensor {unused[0]!r} changes no tensor of {base.weights_dir} "
                f"({len(unused)} such tensors); is the adapter for another model?"
            )

    @property
    def weights_dir(self) -> Path:
        return self.base.weights_dir

    def _adapted(self, tensor: StoredTensor, used: set[str]) -> StoredTensor:
        module, _, part = tensor.name.rpartition(".")
        stored = self.adapter.tensors
        fields = dict(name=tensor.name, file=tensor.file, dtype=tensor.dtype, shape=tensor.shape)
        saved = saved_name(tensor.name)
        if saved in stored and any(module.endswith(k) for k in self.adapter.saved_modules()):
            self._check_shape(stored[saved], tensor.shape, tensor)
            used.add(saved)
            return AdaptedTensor(**fields, base=tensor, replacement=stored[saved])
        scale = self.adapter.scale(module)
        if part == "bias" and self.adapter.applies_bias and lora_bias_name(module) in stored:
            used.add(lora_bias_name(module))
            self._check_shape(stored[lora_bias_name(module)], tensor.shape, tensor)
            return AdaptedTensor(
                **fields, base=tensor, scale=scale, bias=stored[lora_bias_name(module)]
            )
        for transpose in (False, True):
            a_name, b_name = lora_names(module, embedding=transpose)
            if part == "weight" and len(tensor.shape) == 2 and {a_name, b_name} <= set(stored):
                a, b = stored[a_name], stored[b_name]
                out, inner = tensor.shape[::-1] if transpose else tensor.shape
                self._check_shape(a, (a.shape[0], inner), tensor)
                self._check_shape(b, (out, a.shape[0]), tensor)
                used.update((a_name, b_name))
                return AdaptedTensor(
                    **fields, base=tensor, scale=scale, a=a, b=b, transpose=transpose
                )
        return tensor

    def _check_shape(self, stored: StoredTensor, shape: tuple[int, ...], tensor: StoredTensor):
        if tuple(stored.shape) != tuple(shape):
            raise AdapterError(
                f"{self.adapter.path}: tensor {stored.name!r} has shape {list(stored.shape)}, "
                f"which does not fit {tensor.name!r} of shape {list(tensor.shape)} in "
                f"{tensor.file}"
            )


def _modules(checkpoint: CheckpointReader) -> set[str]:
    return {name.rpartition(".")[0] for name in checkpoint.names()}

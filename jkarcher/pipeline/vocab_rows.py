"""One model's vocabulary tensor read in the output's token order (`jkarcher.pipeline.tokenizer`
decides the order and what fills the rows of tokens the model lacks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from jkarcher.io import StoredTensor


class VocabularyRows(StoredTensor):
    """Input `index`'s vocabulary tensor, of `shape` (output rows, hidden), in float32: row
    t < `tokens` is its own row `own[t]`, or where that is -1, the mean of the rows `fills[t]`
    lists as (input, row) pairs of `tensors` (every input's tensor), zeros where it lists none;
    each further (padding) row is the mean of those rows (as suggested by Hewitt, "Initializing
    new word embeddings for pretrained language models", 2021).

    The tensors it needs are read whole (vocabulary tensors only), and the rows gathered in
    memory; placed on a mesh (`read_placed`), it is gathered once and split.
    """

    def __init__(
        self,
        tensors: Sequence[StoredTensor],
        index: int,
        own: np.ndarray,
        fills: Mapping[int, tuple[tuple[int, int], ...]],
        tokens: int,
        shape: tuple[int, int],
    ):
        self.tensors, self.index, self.own, self.fills = tuple(tensors), index, own, fills
        self.tokens = tokens
        self.name, self.file = tensors[index].name, tensors[index].file
        self.dtype, self.shape = np.dtype(np.float32), shape

    def read(self) -> np.ndarray:
        missing = np.flatnonzero(self.own < 0)
        needed = {self.index} | {i for t in missing for i, _ in self.fills.get(int(t), ())}
        arrays = {i: self.tensors[i].read().astype(np.float32) for i in sorted(needed)}
        gathered = np.zeros(self.shape, np.float32)
        have = np.flatnonzero(self.own >= 0)
        gathered[have] = arrays[self.index][self.own[have]]
        for token in missing:
            pairs = self.fills.get(int(token), ())
            if pairs:
                gathered[token] = sum(arrays[i][row] for i, row in pairs) / np.float32(len(pairs))
        gathered[self.tokens :] = gathered[: self.tokens].mean(axis=0)
        return gathered

    def rows(self, first: int, stop: int) -> StoredTensor:
        self._check_rows(first, stop)
        return _RowRange(self, first, stop)

    def read_placed(
        self, shape: tuple[int, ...], sharding: NamedSharding, dtype: np.dtype
    ) -> jax.Array:
        gathered = self.read()
        padded = np.zeros(shape, dtype)
        padded[: gathered.shape[0]] = gathered
        arrays = [
            jax.device_put(padded[index], device)
            for device, index in sharding.addressable_devices_indices_map(shape).items()
        ]
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


class _RowRange(StoredTensor):
    """Rows [first, stop) of a `VocabularyRows`."""

    def __init__(self, whole: VocabularyRows, first: int, stop: int):
        self.whole, self.first, self.stop = whole, first, stop
        self.name, self.file, self.dtype = whole.name, whole.file, whole.dtype
        self.shape = (stop - first, *whole.shape[1:])

    def read(self) -> np.ndarray:
        return self.whole.read()[self.first : self.stop]

    def rows(self, first: int, stop: int) -> StoredTensor:
        self._check_rows(first, stop)
        return _RowRange(self.whole, self.first + first, self.first + stop)

"""One model's vocabulary tensor read in the output's token order (`jkarcher.pipeline.tokenizer`
decides the order and what fills the rows of tokens the model lacks)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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

    Its own tensor is read whole; of the other inputs' tensors, only the rows that fill it, in
    runs of consecutive rows (added tokens mostly sit together at the end of a vocabulary), so a
    merge of N models reads each embedding about once, not N times. Placed on a mesh
    (`read_placed`), it is gathered once and split.
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
        own_tensor = self.tensors[self.index].read().astype(np.float32)
        missing = np.flatnonzero(self.own < 0)
        wanted: dict[int, set[int]] = {}
        for token in missing:
            for i, row in self.fills.get(int(token), ()):
                wanted.setdefault(i, set()).add(row)
        filling = {
            (i, row): values
            for i, rows in wanted.items()
            for row, values in _read_rows(self.tensors[i], own_tensor, i == self.index, rows)
        }
        gathered = np.zeros(self.shape, np.float32)
        have = np.flatnonzero(self.own >= 0)
        gathered[have] = own_tensor[self.own[have]]
        for token in missing:
            pairs = self.fills.get(int(token), ())
            if pairs:
                gathered[token] = sum(filling[pair] for pair in pairs) / np.float32(len(pairs))
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


def _read_rows(
    tensor: StoredTensor, own_tensor: np.ndarray, is_own: bool, rows: set[int]
) -> Iterator[tuple[int, np.ndarray]]:
    """(row, its values in float32) for each of `rows` of `tensor`, each run of consecutive rows
    read at once (taken from `own_tensor`, already read, where `tensor` is the own one)."""
    ordered = sorted(rows)
    breaks = [k + 1 for k in range(len(ordered) - 1) if ordered[k + 1] != ordered[k] + 1]
    for run in np.split(np.asarray(ordered), breaks):
        first, stop = int(run[0]), int(run[-1]) + 1
        block = own_tensor[first:stop] if is_own else tensor.rows(first, stop).read()
        for k, row in enumerate(range(first, stop)):
            yield row, block[k].astype(np.float32)

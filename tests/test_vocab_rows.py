"""A model's vocabulary tensor in the output's token order: its rows, the fills of tokens it
lacks, the padding rows, and what it reads of the other models' tensors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_dtypes
import numpy as np

from jkarcher.io import StoredTensor
from jkarcher.pipeline.vocab_rows import VocabularyRows

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(eq=False)
class CountingTensor(StoredTensor):
    """Rows [first, stop) of an array in memory, counting the rows every read takes."""

    values: np.ndarray
    log: list[int]
    first: int = 0
    stop: int | None = None

    def __post_init__(self):
        self.stop = self.values.shape[0] if self.stop is None else self.stop
        self.name, self.file = "model.embed_tokens.weight", Path("memory")
        self.dtype = self.values.dtype
        self.shape = (self.stop - self.first, *self.values.shape[1:])

    def rows(self, first, stop):
        self._check_rows(first, stop)
        return CountingTensor(self.values, self.log, self.first + first, self.first + stop)

    def read(self):
        self.log.append(self.stop - self.first)
        return self.values[self.first : self.stop].copy()


def test_rows_fills_and_padding_follow_the_token_maps():
    rng = np.random.default_rng(0)
    hidden, vocab, tokens, rows = 8, 50, 60, 64
    logs = [[], [], []]
    values = [rng.standard_normal((vocab, hidden)).astype(BF16) for _ in logs]
    tensors = [CountingTensor(v, log) for v, log in zip(values, logs, strict=True)]
    own = np.arange(tokens)
    own[vocab:] = -1  # tokens 50 .. 59 the model lacks
    # Tokens 50 .. 57 sit together at the end of model 1's vocabulary; 58 is in models 1 and 2;
    # 59 in no model.
    fills = {50 + k: ((1, 40 + k),) for k in range(8)} | {58: ((1, 3), (2, 17))}
    got = VocabularyRows(tensors, 0, own, fills, tokens, (rows, hidden)).read()

    wide = [v.astype(np.float64) for v in values]
    want = np.zeros((rows, hidden))
    want[:vocab] = wide[0]
    for token, pairs in fills.items():
        want[token] = np.mean([wide[i][row] for i, row in pairs], axis=0)
    want[tokens:] = want[:tokens].mean(axis=0)
    assert got.dtype == np.float32 and got.shape == (rows, hidden)
    # Exact rows; means of two bf16 values in float32 exact but for one rounding; the padding,
    # a float32 mean of 60 rows of size ~1: a few float32 units times 60.
    np.testing.assert_array_equal(got[:vocab], want[:vocab].astype(np.float32))
    np.testing.assert_allclose(got[vocab:tokens], want[vocab:tokens], rtol=2**-23, atol=0)
    bound = 4 * tokens * float(np.finfo(np.float32).eps) * np.abs(wide[0]).max()
    np.testing.assert_allclose(got[tokens:], want[tokens:], rtol=0, atol=bound)
    # Its own tensor whole, once; of the others only the rows that fill, in runs.
    assert logs[0] == [vocab]
    assert sorted(logs[1]) == [1, 8] and logs[2] == [1]

"""Where each output tensor comes from (docs/design.md, "Data flow"): its piece, its position
along the piece's layers, and its sources, a tensor of each of the piece's inputs.

A tensor is in layer i when the first number among the dotted parts of its name is i and i is
below its model's layer count (`model.layers.3.mlp.up_proj.weight` is in layer 3); every other
tensor is outside the layers (the embeddings, the final norm, lm_head, and any numbered past the
layers). Output layer `first + k`
of a piece (`first`: the layers of the pieces before it) has the tensors that the piece's
template input (its base, else its first model) has in its layer `start + k`, each read from
layer `starts[j] + k` of the piece's input j, at position k / (N - 1) along the piece's N layers
(1 when N = 1), as mergekit numbers and places them. A tensor outside the layers comes, at
position 0, from the first piece's inputs when it precedes the layers (the input embeddings) and
from the last piece's otherwise (the final norm, lm_head), as mergekit's pre- and post-layer
weights do. A plain merge's one piece reads every tensor from the same tensor of each input.

Where the template ties lm_head to the embeddings, the output has no lm_head; where it does not,
an input that ties gives its embedding matrix as lm_head (`jkarcher.pipeline.vocab.source_info`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from jkarcher.architecture import layer_count
from jkarcher.errors import MergeError
from jkarcher.io import CheckpointReader
from jkarcher.io.writer import natural_key
from jkarcher.pipeline.inputs import Inputs, Piece, valid_count
from jkarcher.pipeline.vocab import LM_HEAD_NAME, ties_embeddings

# Dotted parts of the names of the tensors before the first layer (mergekit's pre-layer weights).
INPUT_SIDE = frozenset({"embed_tokens", "embed_in", "embeddings", "embedding_norm", "wte", "wpe"})


@dataclasses.dataclass(frozen=True)
class Route:
    """One output tensor: its name, its piece (an index into `Inputs.pieces`), its position
    along the piece's layers, and its sources, (input, tensor name there) for each of the
    piece's inputs (its models, then its base)."""

    name: str
    piece: int
    position: float
    sources: tuple[tuple[int, str], ...]


def plan_routes(inputs: Inputs, tie: bool) -> tuple[list[Route], list[str]]:
    """Every output tensor's route, lm_head left out where the output ties it (`tie`), once
    each input is checked to hold what is read from it (`_check`); and the warnings of that
    check."""
    layers = [_by_layer(reader) for reader in inputs.readers]
    pieces = inputs.pieces
    routes = []
    for name in layers[inputs.template_index].get(None, ()):
        if tie and name == LM_HEAD_NAME:
            continue
        index = _side(pieces, name)
        routes.append(Route(name, index, 0.0, tuple((i, name) for i in pieces[index].inputs)))
    first = 0
    for index, piece in enumerate(pieces):
        n = piece.num_layers
        template_layers = layers[piece.inputs[piece.template_at]]
        for k in range(n):
            position = k / (n - 1) if n > 1 else 1.0
            for name in template_layers.get(piece.starts[piece.template_at] + k, ()):
                in_layer = _renumbered(name)
                sources = tuple(
                    (i, in_layer(start + k))
                    for i, start in zip(piece.inputs, piece.starts, strict=True)
                )
                routes.append(Route(in_layer(first + k), index, position, sources))
        first += n
    return routes, _check(inputs, routes, tie, layers)


def _check(
    inputs: Inputs,
    routes: Sequence[Route],
    tie: bool,
    layers: Sequence[Mapping[int | None, list[str]]],
) -> list[str]:
    """Every input holds the tensors its routes read, and none besides within what it gives
    (the layers read from it; the tensors outside the layers, where it gives them); a
    MergeError names the tensor, the input and its directory. Returns a warning for each input
    whose lm_head the output does not use, or whose embedding it merges as lm_head. `layers`:
    each input's tensor names by layer (`_by_layer`)."""
    warnings = []
    template_label = inputs.labels[inputs.template_index]
    read_from: list[dict[str, str]] = [{} for _ in inputs.readers]  # source name -> output name
    for route in routes:
        for i, source in route.sources:
            read_from[i][source] = route.name
    for i, (reader, label) in enumerate(zip(inputs.readers, inputs.labels, strict=True)):
        wanted = read_from[i]
        present = set(reader.names())
        own_head = LM_HEAD_NAME in present and not ties_embeddings(reader)
        gives_head = LM_HEAD_NAME in wanted
        if tie and own_head and _gives_outside(inputs, i, LM_HEAD_NAME):
            warnings.append(
                f"{label} has its own lm_head, but the output ties lm_head to the embeddings as "
                f"{template_label} does; that lm_head is not used"
            )
        if tie:
            present.discard(LM_HEAD_NAME)
        elif gives_head and not own_head and ties_embeddings(reader):
            present.add(LM_HEAD_NAME)
            warnings.append(
                f"{label} ties lm_head to its embeddings; its embedding matrix is merged into "
                "the output's lm_head"
            )
        missing = sorted(wanted.keys() - present, key=natural_key)
        if missing:
            raise MergeError(
                f"tensor {missing[0]!r} is missing from {label}: no file of {reader.path} holds "
                f"it (output tensor {wanted[missing[0]]!r} comes from it; {len(missing)} "
                "tensors missing in all)"
            )
        given = _given(inputs, i, layers[i])
        extra = sorted((present & given) - wanted.keys(), key=natural_key)
        if extra:
            raise MergeError(
                f"tensor {extra[0]!r} of {label} (in {reader.info(extra[0]).file}) is not in "
                f"{template_label}; the models must have the same tensors"
            )
    return warnings


def _given(inputs: Inputs, i: int, layers: Mapping[int | None, list[str]]) -> set[str]:
    """The tensors of input i (`layers`: its names by layer) within what it gives: those of the
    layers read from it, and those outside the layers on the side (before or after the layers)
    that it gives."""
    given = {n for n in layers.get(None, ()) if _gives_outside(inputs, i, n)}
    for piece in inputs.pieces:
        for j, start in zip(piece.inputs, piece.starts, strict=True):
            if j == i:
                for layer in range(start, start + piece.num_layers):
                    given.update(layers.get(layer, ()))
    return given


def _gives_outside(inputs: Inputs, i: int, name: str) -> bool:
    """Whether input i gives the tensor `name`, outside the layers (by its side)."""
    return i in inputs.pieces[_side(inputs.pieces, name)].inputs


def _side(pieces: Sequence[Piece], name: str) -> int:
    """The piece a tensor outside the layers comes from: the first when it precedes the
    layers (the input embeddings), else the last."""
    return 0 if INPUT_SIDE.intersection(name.split(".")) else len(pieces) - 1


def _by_layer(reader: CheckpointReader) -> dict[int | None, list[str]]:
    """A checkpoint's tensor names by layer (None: outside the layers)."""
    count = valid_count(layer_count(reader.config)) or 0
    layers: dict[int | None, list[str]] = {}
    for name in reader.names():
        layer = _layer(name)
        layers.setdefault(layer if layer is not None and layer < count else None, []).append(name)
    return layers


def _layer(name: str) -> int | None:
    """The first number among the dotted parts of `name`, or None."""
    parts = name.split(".")
    at = _number_at(parts)
    return None if at is None else int(parts[at])


def _renumbered(name: str) -> Callable[[int], str]:
    """layer -> `name` with its layer number (its first number) replaced by that layer."""
    parts = name.split(".")
    at = _number_at(parts)
    head, tail = parts[:at], parts[at + 1 :]
    return lambda layer: ".".join([*head, str(layer), *tail])


def _number_at(parts: Sequence[str]) -> int | None:
    """The index of the first part written in ASCII digits, or None."""
    return next((i for i, part in enumerate(parts) if part.isascii() and part.isdigit()), None)

"""Convert a model between a Hugging Face checkpoint (safetensors) and an Orbax one, losslessly.

    python scripts/convert.py --source /models/qwen --output /models/qwen-orbax --to=orbax
    python scripts/convert.py --source /models/qwen-orbax --output /models/qwen-hf --to=safetensors

An Orbax model directory holds the weights as an Orbax PyTree checkpoint in `params/` (nested
dicts in the layout of jkarcher's Flax models) and every other file of the source (config,
tokenizer, model card) beside it; see `jkarcher/io/orbax_io.py`. Tensors keep their dtypes and
bits. The output appears only once complete.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jkarcher.config import parse_size
from jkarcher.errors import JkarcherError
from jkarcher.io.orbax_io import hf_to_orbax, orbax_to_hf

_SOURCE = flags.DEFINE_string("source", None, "The model directory (or hub id) to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "The directory to write.")
_TO = flags.DEFINE_enum("to", None, ["orbax", "safetensors"], "The format to write.")
_MAX_SHARD_SIZE = flags.DEFINE_string(
    "max_shard_size", "5GB", "Most bytes per safetensors file (for --to=safetensors)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
flags.mark_flags_as_required(["source", "output", "to"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        if _TO.value == "orbax":
            output = hf_to_orbax(_SOURCE.value, _OUTPUT.value, _OVERWRITE.value)
        else:
            max_bytes = parse_size(_MAX_SHARD_SIZE.value, "--max_shard_size")
            output = orbax_to_hf(_SOURCE.value, _OUTPUT.value, max_bytes, _OVERWRITE.value)
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)

"""Extract a LoRA adapter from a fine-tuned model and its base, as `mergekit-extract-lora` does.

    python scripts/extract_lora.py --model FINE_TUNED --base-model BASE --out-path ADAPTER
    python scripts/extract_lora.py --model FT --base-model BASE --out-path A --max-rank 16 -e mlp

Each linear weight's change W' - W becomes its rank-r truncated SVD as PEFT's lora_A and lora_B
(`jkarcher/lora/extract.py`); embeddings and norms are saved whole in modules_to_save, as
mergekit saves them (`jkarcher/lora/extraction.py` has the rules). The output is a PEFT adapter
directory (adapter_config.json, adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
loads on the base model. The flags are mergekit's, plus --dtype (the factors' dtype) and
--overwrite (which replaces only an earlier jkarcher output or an empty directory). Inputs are
read one tensor at a time from disk or the local HF cache, never the network; the output appears
only once it is complete.
"""

import argparse
import sys

from tqdm import tqdm

from jkarcher.config.fields import OUTPUT_DTYPES, parse_size
from jkarcher.errors import JkarcherError
from jkarcher.lora.extraction import ExtractionOptions, extract_adapter, plan_extraction


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the fine-tuned model (directory or hub id)")
    parser.add_argument("--base-model", required=True, help="the base model it was tuned from")
    parser.add_argument("--out-path", required=True, help="the adapter directory to write")
    parser.add_argument("--max-rank", type=int, default=128, help="largest rank of a module")
    parser.add_argument(
        "--distribute-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split the singular values evenly between A and B (else all in A)",
    )
    parser.add_argument(
        "--embed-lora",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decompose the embeddings too (else save them whole in modules_to_save)",
    )
    parser.add_argument(
        "--save-module",
        dest="modules_to_save",
        action="append",
        default=[],
        help="save this module (a name or its last part) whole; repeatable",
    )
    parser.add_argument(
        "-e",
        "--exclude-regex",
        dest="exclude_regexes",
        action="append",
        default=[],
        help="skip modules whose name this regex matches; repeatable",
    )
    parser.add_argument(
        "-i",
        "--include-regex",
        dest="include_regexes",
        action="append",
        default=[],
        help="decompose only modules whose name one of these regexes matches; repeatable",
    )
    parser.add_argument(
        "--sv-epsilon", type=float, default=0.0, help="discard singular values at or below this"
    )
    parser.add_argument(
        "--skip-undecomposable",
        action="store_true",
        help="skip modules that cannot be decomposed (norms) instead of saving them whole",
    )
    parser.add_argument(
        "--dtype", choices=list(OUTPUT_DTYPES), help="the factors' dtype (default: the model's)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier jkarcher output there"
    )
    parser.add_argument(
        "--memory",
        help="the most memory the extraction may hold, e.g. 8GB (default: half the available)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    try:
        memory = None if args.memory is None else parse_size(args.memory, "--memory")
    except JkarcherError as err:
        sys.exit(f"error: {err}")
    options = ExtractionOptions(
        max_rank=args.max_rank,
        distribute_scale=args.distribute_scale,
        embed_lora=args.embed_lora,
        modules_to_save=tuple(args.modules_to_save),
        exclude_regexes=tuple(args.exclude_regexes),
        include_regexes=tuple(args.include_regexes),
        sv_epsilon=args.sv_epsilon,
        skip_undecomposable=args.skip_undecomposable,
        dtype=None if args.dtype is None else OUTPUT_DTYPES[args.dtype],
        memory=memory,
    )
    try:
        plan = plan_extraction(
            args.model, args.base_model, args.out_path, options, overwrite=args.overwrite
        )
        print(
            f"extracting {len(plan.lora)} LoRA modules (rank <= {options.max_rank}), saving "
            f"{len(plan.saved)} whole, skipping {len(plan.skipped)} -> {plan.output}"
        )
        with tqdm(total=len(plan.lora) + len(plan.saved), unit="module") as progress:
            summary = extract_adapter(plan, on_module=lambda name: progress.update())
    except (JkarcherError, OSError) as err:
        sys.exit(f"error: {err}")
    for warning in summary.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    print(summary)


if __name__ == "__main__":
    main(sys.argv[1:])

"""`tokenizer_source`: the output's vocabulary ("base", "union" or a model's) and every model's
embedding and lm_head rows in its order, on tiny models whose tokenizers differ in their tokens.

Merges of mergekit YAMLs are compared with `mergekit-yaml` (where mergekit is installed, always
in CI): the same tokens, the same ids (but for the tokens "union" appends from the other models,
whose order in mergekit varies from run to run), each token's row equal, every other tensor
equal; bf16 models against a float64 NumPy reference written from the rules.
"""

import json
import textwrap

import ml_dtypes
import numpy as np
import pytest
import tokenizers
from helpers_checkpoints import BF16, read_all, tiny_config, tiny_weights
from helpers_mergekit import run_mergekit_yaml

from jkarcher import demo, mergekit_yaml, pipeline
from jkarcher.config import ConfigError, validate

transformers = pytest.importorskip("transformers")

EOS = demo.SPECIAL_TOKENS[0]
# Each model's words (ids in this order, then the special tokens) and its embedding rows.
WORDS = {
    "m0": (["[UNK]", "a", "b", "c", "d"], ["<tool>"], 0),
    "m1": (["[UNK]", "b", "a", "e", "f", "c"], [], 2),
    "m2": (["[UNK]", "a", "c", "e", "g", "h"], ["<tool>", "<call>"], 0),
}
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
FLOAT32_TOLERANCE = 4 * np.finfo(np.float32).eps


def write_model(directory, name, seed, dtype, tie=False):
    """A tiny two-layer Qwen2 with a WordLevel tokenizer of WORDS[name], EOS and its special
    tokens."""
    words, specials, padding = WORDS[name]
    tokenizer = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in (EOS, *specials)])
    config = tiny_config(tokenizer.get_vocab_size() + padding, tie, num_layers=2)
    demo.write_model(directory, tiny_weights(config, seed, dtype), config, tokenizer)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabularies")
    return {n: write_model(root / n, n, i, np.float32) for i, n in enumerate(WORDS)}


def _vocab(directory):
    return transformers.AutoTokenizer.from_pretrained(directory).get_vocab()


def _added(directory):
    """The added tokens of a tokenizer, with whether each is special, by content."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}


def _ours(fields, output):
    pipeline.run(pipeline.plan_merge(validate(fields | {"output": str(output)})))
    return output


# The rules, on the planned rows.


def test_union_appends_the_other_models_tokens_then_their_added_ones(models, tmp_path):
    fields = {
        "method": "task_arithmetic",
        "models": [{"path": str(models["m1"])}, {"path": str(models["m2"])}],
        "base_model": str(models["m0"]),
        "tokenizer_source": "union",
        "output": str(tmp_path / "out"),
    }
    plan = pipeline.plan_merge(validate(fields))
    tokens = sorted(plan.vocabulary.vocab, key=plan.vocabulary.vocab.__getitem__)
    assert tokens == ["[UNK]", "a", "b", "c", "d", EOS, "<tool>", "e", "f", "g", "h", "<call>"]
    assert [e["special"] for e in plan.vocabulary.added] == [False] * 4 + [True]
    embed = next(t for t in plan.tasks if t.name == EMBED)
    assert embed.shape == (12, 16) and plan.config_updates == {"vocab_size": 12}
    rows = {n: read_all(p)[EMBED] for n, p in models.items()}
    m1 = embed.sources[0].read()
    vocab = plan.vocabulary.vocab
    assert np.array_equal(m1[vocab["e"]], rows["m1"][3])  # its own row
    assert np.array_equal(m1[vocab["d"]], rows["m0"][4])  # only the base has it
    assert np.array_equal(m1[vocab["<tool>"]], rows["m0"][6])  # the base's, of two
    assert np.array_equal(m1[vocab["g"]], rows["m2"][4])  # only m2 has it
    base = embed.base.read()
    mean = (rows["m1"][3] + rows["m2"][3]) / np.float32(2)
    np.testing.assert_allclose(base[vocab["e"]], mean, rtol=FLOAT32_TOLERANCE)  # m1's and m2's


def test_an_output_token_no_model_has_is_zeros(models, tmp_path):
    fields = {
        "method": "linear",
        "models": [{"path": str(models["m0"])}, {"path": str(models["m1"])}],
        "tokenizer_source": str(models["m2"]),
        "output": str(tmp_path / "out"),
    }
    plan = pipeline.plan_merge(validate(fields))
    embed = next(t for t in plan.tasks if t.name == EMBED)
    assert not embed.sources[0].read()[plan.vocabulary.vocab["h"]].any()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"copy_tokenizer": False}, "tokenizer_source: set, but copy_tokenizer is False"),
        ({"tokenizer_source": ""}, "tokenizer_source: must be a path"),
    ],
)
def test_bad_settings_are_errors_naming_the_field(change, message, tmp_path):
    fields = {"method": "linear", "models": [{"path": "a"}], "tokenizer_source": "union"}
    with pytest.raises(ConfigError, match=message):
        validate(fields | {"output": str(tmp_path)} | change)


@pytest.mark.parametrize(
    "tokens, message",
    [
        ({"x": {"force": True}}, r"tokens\['x'\].force: needs a source"),
        ({"x": {"source": {"kind": "one"}}}, r"tokens\['x'\].source: must be a model's path"),
        (
            {"x": {"source": {"kind": "model_token", "model": "m", "token_id": 1, "token": "a"}}},
            r"tokens\['x'\].source: give one of token_id and token",
        ),
        ({"x": {"sauce": None}}, r"tokens\['x'\]: unknown field 'sauce'"),
    ],
)
def test_bad_token_settings_are_errors_naming_the_token(tokens, message, tmp_path):
    fields = {"method": "linear", "models": [{"path": "a"}], "tokenizer_source": "union"}
    with pytest.raises(ConfigError, match=message):
        validate(fields | {"output": str(tmp_path), "tokens": tokens})


def test_token_settings_need_a_tokenizer_source(tmp_path):
    fields = {"method": "linear", "models": [{"path": "a"}], "output": str(tmp_path)}
    with pytest.raises(ConfigError, match="pad_to_multiple_of: needs tokenizer_source"):
        validate(fields | {"pad_to_multiple_of": 8})


@pytest.mark.parametrize(
    "entry, message",
    [
        ({}, r"tokens\['g'\].source: needed, as .*m0 lacks the token"),
        ({"source": "elsewhere"}, r"tokens\['g'\].source: elsewhere is not one of the merged"),
        (
            {"source": {"kind": "model_token", "model": "{m0}", "token_id": 7}},
            r"tokens\['g'\].source: .*m0 has no such token among its 7 rows",
        ),
        ({"source": "{m0}"}, r"tokens\['g'\].source: .*m0 has no such token"),
    ],
)
def test_token_sources_that_give_no_row_are_errors(entry, message, models, tmp_path):
    entry = json.loads(json.dumps(entry).replace("{m0}", str(models["m0"])))
    fields = {
        "method": "linear",
        "models": [{"path": str(models["m0"])}, {"path": str(models["m2"])}],
        "tokenizer_source": "union",
        "tokens": {"g": entry},
        "output": str(tmp_path / "out"),
    }
    with pytest.raises(ConfigError, match=message):
        pipeline.plan_merge(validate(fields))


def test_the_tokenizer_field_translates_to_jkarchers_fields():
    document = {
        "models": [{"model": "a"}],
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "tokenizer": {
            "tokens": {
                "<x>": {"source": "a"},
                "<y>": {"source": {"kind": "model_token", "model": "base", "token": "z"}},
            },
            "pad_to_multiple_of": 64,
        },
    }
    fields = mergekit_yaml.translate(document, layer_count=lambda model: 1).fields
    assert fields["tokenizer_source"] == "union"
    assert fields["tokens"] == {
        "<x>": {"source": "a"},
        "<y>": {"source": {"kind": "model_token", "model": "base", "token": "z"}},
    }
    assert fields["pad_to_multiple_of"] == 64


def test_tied_embeddings_stay_tied_in_the_new_vocabulary(tmp_path):
    paths = [write_model(tmp_path / n, n, i, BF16, tie=True) for i, n in enumerate(("m0", "m1"))]
    fields = {
        "method": "linear",
        "models": [{"path": str(p)} for p in paths],
        "tokenizer_source": "union",
    }
    output = _ours(fields, tmp_path / "out")
    merged = read_all(output)
    assert LM_HEAD not in merged and merged[EMBED].shape == (len(_vocab(output)), 16)
    model = transformers.AutoModelForCausalLM.from_pretrained(output)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", ["models", "slices"])
def test_bf16_models_equal_a_float64_reference(tmp_path, form, dtype):
    """linear, weights 0.25 and 0.75, union, as whole models or as two slices of one layer
    each: each model's row of each token from the rules, in float64, then their weighted mean,
    rounded once to the output dtype."""
    paths = [write_model(tmp_path / n, n, i, BF16) for i, n in enumerate(("m0", "m2"))]
    models = [{"path": str(p), "weight": w} for p, w in zip(paths, (0.25, 0.75), strict=True)]
    fields = {"method": "linear", "tokenizer_source": "union", "dtype": dtype}
    if form == "models":
        fields["models"] = models
    else:
        layers = ([0, 1], [1, 2])
        fields["slices"] = [{"models": [m | {"layer_range": r} for m in models]} for r in layers]
    output = _ours(fields, tmp_path / "out")
    vocab = _vocab(output)
    tokens = [_vocab(p) for p in paths]
    sources = [read_all(p) for p in paths]
    merged = read_all(output)
    for name in (EMBED, LM_HEAD):
        expected = np.zeros((len(vocab), 16))
        for token, out_id in vocab.items():
            held = [
                s[name][t[token]].astype(np.float64)
                for s, t in zip(sources, tokens, strict=True)
                if token in t
            ]
            rows = [
                s[name][t[token]].astype(np.float64) if token in t else held[0]
                for s, t in zip(sources, tokens, strict=True)
            ]
            expected[out_id] = 0.25 * rows[0] + 0.75 * rows[1]
        # The float32 sum of two terms (a few float32 units of the largest), then one rounding
        # to the output dtype: half a unit in its last place of the value.
        bound = 4 * np.finfo(np.float32).eps * np.abs(expected).max()
        half_ulp = float(ml_dtypes.finfo(merged[name].dtype).eps) / 2
        error = np.abs(merged[name].astype(np.float64) - expected)
        assert np.all(error <= half_ulp * np.abs(expected) + bound), name
    assert json.loads((output / "config.json").read_text())["vocab_size"] == len(vocab)


# Against mergekit-yaml.

# The tokenizer field: a token no model has (zeros), one only m2 has (from m1's row of "e"),
# one only m0 has (forced: m2's row 2 everywhere), one of m1 and m2 (m2's row), one all have
# (forced: zeros), and the rows padded to a multiple of 8.
TOKENS = """
    tokenizer:
      source: union
      tokens:
        <new>:
          source: {{kind: zero}}
        <call>:
          source: {{kind: model_token, model: {m1}, token: e}}
        d:
          source: {{kind: model_token, model: {m2}, token_id: 2}}
          force: true
        e:
          source: {m2}
        a:
          source: {{kind: zero}}
          force: true
      pad_to_multiple_of: 8
"""
CONFIGS = {
    "union": ("task_arithmetic", "tokenizer_source: union"),
    "base": ("task_arithmetic", "tokenizer_source: base"),
    "model": ("task_arithmetic", "tokenizer_source: {m2}"),
    "slerp_union": ("slerp", "tokenizer_source: union"),
    "tokens": ("task_arithmetic", TOKENS),
    "slices_union": ("slices", "tokenizer_source: union"),
}
CONFIG = """
    models:
      - model: {m1}
        parameters:
          weight: 0.6
      - model: {m2}
        parameters:
          weight: 0.4
    merge_method: task_arithmetic
    base_model: {m0}
    dtype: float32
"""
SLERP = """
    models:
      - model: {m1}
    merge_method: slerp
    base_model: {m0}
    parameters:
      t: 0.3
    dtype: float32
"""


# A merge by slices: m0's and m2's first layers merged, then m1's and m2's second; the
# embeddings merged from m0's and m2's, lm_head from m1's and m2's, each in the union's token
# order. (mergekit merges the tensors after the layers from as many of the last slice's models
# as the first slice has: here, both.)
SLICES = """
    slices:
      - sources:
          - model: {m0}
            layer_range: [0, 1]
            parameters:
              weight: 0.5
          - model: {m2}
            layer_range: [0, 1]
            parameters:
              weight: 0.5
      - sources:
          - model: {m1}
            layer_range: [1, 2]
            parameters:
              weight: 0.6
          - model: {m2}
            layer_range: [1, 2]
            parameters:
              weight: 0.4
    merge_method: linear
    base_model: {m0}
    dtype: float32
"""
TEMPLATES = {"slerp": SLERP, "slices": SLICES}


@pytest.fixture(scope="module")
def case_files(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_source")
    paths = {n: str(p) for n, p in models.items()}
    files = {}
    for case, (method, vocabulary) in CONFIGS.items():
        text = textwrap.dedent(TEMPLATES.get(method, CONFIG))
        text += textwrap.dedent(vocabulary).strip() + "\n"
        files[case] = root / f"{case}.yml"
        files[case].write_text(text.format(**paths))
    return files


@pytest.fixture(scope="module")
def mergekit_outputs(case_files, tmp_path_factory):
    return run_mergekit_yaml(case_files, tmp_path_factory.mktemp("tokenizer_source_mergekit"))


@pytest.mark.parametrize("case", list(CONFIGS))
def test_merges_equal_mergekit_yaml(case, models, case_files, mergekit_outputs, tmp_path):
    translation = mergekit_yaml.load(case_files[case])
    output = _ours(translation.fields, tmp_path / "ours")
    theirs_dir = mergekit_outputs[case]
    ours_vocab, theirs_vocab = _vocab(output), _vocab(theirs_dir)
    assert set(ours_vocab) == set(theirs_vocab)
    assert _added(output) == _added(theirs_dir)
    base_vocab = _vocab(models["m0"])
    appended = case.endswith("union") or case == "tokens"
    for token, out_id in theirs_vocab.items():
        if not appended or token in base_vocab:
            assert ours_vocab[token] == out_id, token
    ours, theirs = read_all(output), read_all(theirs_dir)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        mine = ours[name]
        if name in (EMBED, LM_HEAD):
            order = sorted(theirs_vocab, key=theirs_vocab.__getitem__)
            rows = [ours_vocab[t] for t in order] + list(range(len(order), len(mine)))
            mine = mine[rows]
        assert mine.shape == tensor.shape, name
        bound = 2 * np.finfo(np.float32).eps * max(np.abs(tensor).max(), 1.0)
        np.testing.assert_allclose(mine, tensor, rtol=0, atol=bound, err_msg=name)
    ours_config = json.loads((output / "config.json").read_text())
    theirs_config = json.loads((theirs_dir / "config.json").read_text())
    rows = -(-len(ours_vocab) // 8) * 8 if case == "tokens" else len(ours_vocab)
    assert ours_config["vocab_size"] == theirs_config["vocab_size"] == rows
    model = transformers.AutoModelForCausalLM.from_pretrained(output)
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_the_command_line_merges_a_tokenizer_field(case_files, tmp_path):
    from jkarcher.commands import mergekit as command

    command.main([str(case_files["tokens"]), str(tmp_path / "out")])
    vocab = _vocab(tmp_path / "out")
    assert {"<new>", "<call>", "g"} <= set(vocab)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pad_to_multiple_of" in card

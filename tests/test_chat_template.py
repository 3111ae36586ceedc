"""The output's chat template (`chat_template`): the setting checked, the named templates
rendering the prompts of mergekit's templates of the same names, "auto" choosing the template
most models have, and merges from mergekit YAMLs whose output's template is that of
`mergekit-yaml`.

The comparisons with mergekit run where it is installed, and always in CI (CI=true).
"""

import importlib.resources
import importlib.util
import json
import textwrap

import jinja2
import numpy as np
import pytest
from helpers_checkpoints import make_models, read_all, tiny_config, tiny_weights, write_tiny
from helpers_mergekit import require_oracle, run_mergekit_yaml

from jkarcher import mergekit_yaml, pipeline
from jkarcher.config import ConfigError, validate
from jkarcher.io import CheckpointError
from jkarcher.io.chat_template import (
    NAMED_TEMPLATES,
    chosen_chat_template,
    model_chat_template,
)

transformers = pytest.importorskip("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "What is 2+2?\n"},
        {"role": "assistant", "content": " 4 "},
        {"role": "user", "content": "And 3+3?"},
    ],
    [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Sure."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": " x "}],
    [
        {"role": "system", "content": "first"},
        {"role": "user_context", "content": "context "},
        {"role": "user", "content": "question"},
        {"role": "system", "content": " last "},
    ],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "a"}],
]
LITERAL = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
TEMPLATE_A = "{% for m in messages %}A {{ m['content'] }}\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}B {{ m['content'] }}\n{% endfor %}"


def _render(template, conversation, generation_prompt):
    """The prompt transformers renders, or the error the template raises."""
    try:
        prompts, _ = render_jinja_template(
            conversations=[conversation],
            chat_template=template,
            add_generation_prompt=generation_prompt,
            bos_token="<s>",
            eos_token="</s>",
        )
    except jinja2.TemplateError:
        return jinja2.TemplateError
    return prompts[0]


@pytest.mark.parametrize("name", list(NAMED_TEMPLATES))
def test_named_templates_render_mergekits_prompts(name):
    require_oracle()
    from mergekit._data import chat_templates

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    for conversation in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = _render(theirs, conversation, generation_prompt)
            assert _render(NAMED_TEMPLATES[name], conversation, generation_prompt) == expected, (
                conversation,
                generation_prompt,
            )


def test_the_named_templates_are_tried_on_prompts_and_errors():
    """The conversations give each template prompts, and mistral's role checks an error."""
    rendered = {_render(NAMED_TEMPLATES["mistral"], c, False) for c in CONVERSATIONS}
    assert jinja2.TemplateError in rendered and len(rendered) > 3


def _raw(tmp_path, **fields):
    return {"method": "linear", "models": [{"path": "a"}], "output": str(tmp_path)} | fields


@pytest.mark.parametrize(
    "value, message",
    [
        ("exaone", "chat_template: 'exaone' is none of 'auto', 'alpaca', 'chatml', 'llama3'"),
        ("{{ short }}", "chat_template: '{{ short }}' is none of"),
        ("no braces in this long text at all", "give any other template's Jinja text literally"),
        (3, "chat_template: 3 is none of"),
    ],
)
def test_bad_settings_are_errors_naming_the_field(value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate(_raw(tmp_path, chat_template=value))


def test_a_template_needs_the_tokenizer_copied(tmp_path):
    with pytest.raises(ConfigError, match="chat_template: set, but copy_tokenizer is False"):
        validate(_raw(tmp_path, chat_template="chatml", copy_tokenizer=False))


@pytest.mark.parametrize("value", ["auto", "chatml", LITERAL, None])
def test_good_settings_are_kept(value, tmp_path):
    assert validate(_raw(tmp_path, chat_template=value)).chat_template == value


def _with_template(directory, template, as_file=False):
    """Give a model directory `template`: as chat_template.jinja, or in tokenizer_config.json
    (a list of named templates where `template` is a dict)."""
    if as_file:
        (directory / "chat_template.jinja").write_text(template)
        return directory
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return directory


def test_a_models_template_is_its_file_else_its_tokenizer_config(tmp_path):
    a, b, c, d = make_models(tmp_path, n=4, dtype=np.float32)
    _with_template(a, f"  {TEMPLATE_A}\n")
    _with_template(b, TEMPLATE_A)
    _with_template(b, TEMPLATE_B, as_file=True)
    _with_template(c, {"default": TEMPLATE_B, "tool_use": TEMPLATE_A})
    assert [model_chat_template(p) for p in (a, b, c, d)] == [
        TEMPLATE_A.strip(),
        TEMPLATE_B.strip(),
        TEMPLATE_B.strip(),
        None,
    ]


def test_auto_takes_the_template_most_models_have_the_first_on_a_tie(tmp_path):
    a, b, c, d = make_models(tmp_path, n=4, dtype=np.float32)
    _with_template(a, TEMPLATE_A)
    _with_template(b, TEMPLATE_B)
    _with_template(c, TEMPLATE_B + "\n")
    assert chosen_chat_template("auto", [a, b, c, d]) == TEMPLATE_B.strip()
    assert chosen_chat_template("auto", [d, a, b]) == TEMPLATE_A.strip()
    assert chosen_chat_template("auto", [d]) is None
    assert chosen_chat_template("chatml", [d]) == NAMED_TEMPLATES["chatml"]
    assert chosen_chat_template(LITERAL, [d]) == LITERAL
    assert chosen_chat_template(None, [a]) is None


def test_a_bad_tokenizer_config_is_an_error_naming_the_file(tmp_path):
    (a,) = make_models(tmp_path, n=1, dtype=np.float32)
    (a / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: not valid JSON"):
        chosen_chat_template("auto", [a])


# Merges from mergekit YAMLs against `mergekit-yaml`: three tiny models, two sharing a template.

CASES = {
    "auto": "auto",
    "literal": LITERAL,
    **{name: name for name in NAMED_TEMPLATES},
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


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """Each case as a YAML file on three tiny float32 models: the base with TEMPLATE_A in a
    chat_template.jinja, the others with TEMPLATE_B in their tokenizer_config.json."""
    root = tmp_path_factory.mktemp("chat_template")
    models = []
    for i in range(3):
        config = tiny_config(64, False, 2)
        models.append(write_tiny(root / f"m{i}", tiny_weights(config, i, np.float32), config))
    _with_template(models[0], TEMPLATE_A, as_file=True)
    for model in models[1:]:
        _with_template(model, TEMPLATE_B)
    text = textwrap.dedent(CONFIG).format(**{f"m{i}": p for i, p in enumerate(models)})
    files = {}
    for case, setting in CASES.items():
        files[case] = root / f"{case}.yml"
        files[case].write_text(text + _yaml_line("chat_template", setting))
    return files


def _yaml_line(field, value):
    return f"{field}: {json.dumps(value)}\n"


@pytest.fixture(scope="module")
def mergekit_outputs(case_files, tmp_path_factory):
    return run_mergekit_yaml(case_files, tmp_path_factory.mktemp("chat_template_mergekit"))


def _template(directory):
    return transformers.AutoTokenizer.from_pretrained(directory).chat_template


@pytest.mark.parametrize("case", list(CASES))
def test_the_outputs_template_is_mergekit_yamls(case, case_files, mergekit_outputs, tmp_path):
    output = tmp_path / "ours"
    translation = mergekit_yaml.load(case_files[case])
    pipeline.run(pipeline.plan_merge(validate(translation.fields | {"output": str(output)})))
    written = json.loads((output / "tokenizer_config.json").read_text())["chat_template"]
    assert not (output / "chat_template.jinja").exists()
    assert _template(output) == written
    theirs = _template(mergekit_outputs[case])
    if case in NAMED_TEMPLATES:
        for conversation in CONVERSATIONS:
            for generation_prompt in (False, True):
                expected = _render(theirs, conversation, generation_prompt)
                assert _render(written, conversation, generation_prompt) == expected
    else:
        assert written == theirs
    ours, reference = read_all(output), read_all(mergekit_outputs[case])
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        np.testing.assert_allclose(ours[name], tensor, rtol=0, atol=1e-6, err_msg=name)

"""The output's chat template: chosen, for the `chat_template` setting, from the models'
templates or named templates, and written into the output's `tokenizer_config.json`.

A setting is one of: "auto", the template most of the input models have (their
`chat_template.jinja`, else their `tokenizer_config.json`'s `chat_template`, compared with outer
whitespace stripped; on a tie the first of base, then models, in order); a name of
`NAMED_TEMPLATES`; or the Jinja text of a template, which is told from a name, as mergekit 0.1.5
tells it, by a "{" and at least 20 characters.

The named templates are jkarcher's own Jinja text for four common prompt formats; rendered by
`transformers` (trim_blocks, lstrip_blocks) they give the prompts of mergekit's templates of the
same names.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from jkarcher.io.checkpoint import CheckpointError, reading

AUTO = "auto"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
LITERAL_MIN_LENGTH = 20

# ChatML: each message as <|im_start|>ROLE\nCONTENT<|im_end|>\n.
_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Llama 3: bos, then each message as a role header and its trimmed content ending in <|eot_id|>.
_LLAMA3 = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)
# Mistral: bos, then [INST] user turns [/INST] and assistant replies ending in eos, the optional
# first system message put before the first user turn.
_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{ bos_token }}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) -%}"
    "{{ raise_exception('the roles must alternate user, assistant, user, ... after an "
    "optional first system message') }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set prefix = system + '\\n\\n' if loop.first and system is not none else '' -%}"
    "{{ ' [INST] ' + prefix + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('only user and assistant messages follow the optional first system "
    "message') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# Alpaca: the last system message, a blank line, then "### Instruction:", "### Response:" or
# "### Input:" sections (user, assistant, user_context) of trimmed content, blank-line separated.
_ALPACA = (
    "{%- set sections = {'user': 'Instruction', 'assistant': 'Response', "
    "'user_context': 'Input'} -%}"
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{{ (systems | last)['content'] | trim if systems else '' }}{{ '\\n\\n' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in sections -%}"
    "{{ '### ' + sections[message['role']] + ':\\n' + message['content'] | trim }}"
    "{{ '' if loop.last else '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
    "{{ '### Response:\\n' }}"
    "{%- endif -%}"
)
NAMED_TEMPLATES = {"alpaca": _ALPACA, "chatml": _CHATML, "llama3": _LLAMA3, "mistral": _MISTRAL}


def chosen_chat_template(setting: str | None, model_dirs: Sequence[Path]) -> str | None:
    """The template the output is given for `setting` (see the module docstring), or None to
    keep the template model's own: no setting, or "auto" where no model has a template."""
    if setting == AUTO:
        found = [t for t in map(model_chat_template, model_dirs) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED_TEMPLATES.get(setting, setting)


def model_chat_template(directory: Path) -> str | None:
    """A model's chat template, outer whitespace stripped: its `chat_template.jinja`, else its
    `tokenizer_config.json`'s `chat_template` (of a list of named ones, that named "default");
    None when it has none."""
    with reading(directory):
        if (directory / TEMPLATE_FILE).is_file():
            template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        else:
            template = _tokenizer_config(directory).get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        return None
    return template.strip()


def write_chat_template(directory: Path, template: str) -> None:
    """Set `template` as the `chat_template` of `directory`'s `tokenizer_config.json` (created
    if it is missing), and remove a `chat_template.jinja` there, which would take precedence."""
    config = _tokenizer_config(directory) | {"chat_template": template}
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (directory / TOKENIZER_CONFIG).write_text(text, encoding="utf-8")
    (directory / TEMPLATE_FILE).unlink(missing_ok=True)


def _tokenizer_config(directory: Path) -> dict:
    path = directory / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return config

"""Chat templates: a model's ``chat_template`` rendered the way transformers renders it.

Templates come from model files and are untrusted code, so they run in jinja2's immutable sandbox.
The environment is the one Hugging Face templates are written against: ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML
and keeps non-ASCII text, and the globals ``raise_exception`` and ``strftime_now``.  The special
tokens (``bos_token``, ``eos_token``, ...) are passed in by name as transformers does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from quantbench.errors import QuantbenchError


class ChatTemplateError(QuantbenchError):
    """A model without a chat template, a template that fails to compile, or one that rejects
    the conversation (``raise_exception`` in the template)."""


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(template: str) -> Any:
    """The compiled jinja2 template (cached: generation renders the same one every turn)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"message {k} is not a dict with a 'role' key: {m!r}")
    return [dict(m) for m in messages]


def render_template(template: str | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    source: str = "model", **variables: Any) -> str:
    """Render ``template`` for ``messages``; ``variables`` (bos_token, eos_token, tools, ...)
    become template variables."""
    if not template:
        raise ChatTemplateError(f"{source} has no chat template (tokenizer.chat_template / tokenizer_config.json); "
                                "pass a raw prompt instead")
    import jinja2

    compiled = compile_template(template)
    try:
        return compiled.render(messages=_check_messages(messages), add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"{source}: chat template rejected the conversation: {e}") from e


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """Render ``tokenizer.chat_template`` (a ``quantbench.engine.tokenizer.Tokenizer``) for ``messages``."""
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    special = {k: v for k, v in special.items() if v is not None}
    return render_template(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           source=getattr(tokenizer, "source", "model") or "model", **{**special, **variables})


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    **variables: Any) -> list[int]:
    """Token ids of the rendered chat.

    The template writes BOS itself where the model wants it, so BOS/EOS are not added again
    (as transformers' ``apply_chat_template(tokenize=True)`` does); control tokens in the rendered
    text are parsed as tokens.
    """
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, **variables)
    return tokenizer.encode(text, add_special=False, parse_special=True)

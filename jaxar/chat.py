"""Chat templates: a conversation rendered as transformers' `apply_chat_template` renders it.

A model's chat template is a Jinja program (from the Hugging Face Hub, so
untrusted code) that turns `messages = [{"role": ..., "content": ...}, ...]`
into the prompt text the model was trained on. `ChatTemplate.render` runs it
the way transformers' `tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=...)` does:

* an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
  with the `loopcontrols` extension (`{% break %}`, `{% continue %}`);
* globals `raise_exception(message)` (a `TemplateError`), `strftime_now(fmt)`,
  a `tojson` filter that keeps non-ASCII text (`ensure_ascii=False`) and takes
  `indent`, `separators` and `sort_keys`, a `dict` and a `namespace` that cannot
  reach Python internals;
* variables `messages`, `tools` (None), `documents` (None),
  `add_generation_prompt`, and the tokenizer's special tokens (`bos_token`,
  `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`,
  `mask_token`, those that are set);
* messages normalised first: keys whose value is None are dropped, and a
  message's reasoning given as `reasoning_content`, `thinking` or `reasoning`
  is visible under `reasoning_content` and `thinking`.

`ChatTemplate.encode` tokenizes the rendered text without adding special
tokens (transformers' `apply_chat_template(tokenize=True)` encodes with
`add_special_tokens=False`): a template that writes `bos_token` itself gets
exactly one BOS.

`load_chat_template(model_dir, tokenizer)` finds a model's template:
`chat_template.jinja`, then `additional_chat_templates/*.jinja`, then
`tokenizer_config.json`'s `chat_template` (a string, or a list of
`{"name", "template"}` of which "default" is used), then the tokenizer's own
`chat_template` attribute (a tokenizer read from a GGUF file). None when the
model has none.

`end_of_turn_ids(tokenizer)`: the tokens that end an assistant turn, so
generation stops there.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from jaxar.tokenizer import _token_content  # "</s>" or an AddedToken dict -> "</s>"

__all__ = [
    "SPECIAL_TOKEN_NAMES",
    "END_OF_TURN_TOKENS",
    "ChatTemplate",
    "ChatTemplateError",
    "compile_template",
    "find_chat_template",
    "template_special_tokens",
    "load_chat_template",
    "end_of_turn_ids",
    "normalize_messages",
]

# The named special tokens transformers passes to a template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokens that end an assistant turn in common chat formats: ChatML (Qwen, SmolLM), Llama 3, Phi-3, Gemma.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A conversation the template cannot render, or a malformed template (one-line message)."""


# --------------------------------------------------------------------------- the Jinja environment

def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which no chat format wants.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type's other attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _namespace_class():
    import jinja2

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore-prefixed namespace attributes, got {name!r}")

    return TemplateNamespace


@functools.lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled `jinja2.Template` of a chat template (cached by source text).

    Raises `ChatTemplateError` for a template that does not parse.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class()
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


# --------------------------------------------------------------------------- messages

def _plain(value: Any) -> Any:
    """Plain JSON-like data only (the template is untrusted code): str/int/float/bool/None,
    dicts, lists, tuples; anything else becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping]) -> list:
    """Messages as the template sees them: plain dicts, None-valued keys dropped,
    reasoning under `reasoning_content` and `thinking` (as transformers does)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"a conversation is a list of messages, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("the conversation is empty; give at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} is a {type(message).__name__}, not a dict with \"role\" and "
                                    f"\"content\"")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --------------------------------------------------------------------------- the template

class ChatTemplate:
    """A chat template and the special tokens its globals name.

    Args:
      source: the Jinja template text.
      special_tokens: `{"bos_token": "<s>", ...}` (see `SPECIAL_TOKEN_NAMES`).
    """

    def __init__(self, source: str, special_tokens: Optional[Mapping[str, str]] = None):
        if not isinstance(source, str) or not source:
            raise ChatTemplateError("a chat template must be a non-empty string")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = compile_template(source)

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True, tools=None,
               documents=None, **kwargs) -> str:
        """The prompt text of `messages` (transformers' `apply_chat_template(..., tokenize=False)`).

        `kwargs` are extra template variables; they override the special tokens of the same name.
        Raises `ChatTemplateError` (one line) when the template refuses the conversation
        (`raise_exception`) or fails.
        """
        import jinja2

        if tools is not None:
            if not all(isinstance(t, Mapping) for t in tools):
                raise ChatTemplateError("tools must be JSON schemas (dicts)")
        if documents is not None:
            if not all(isinstance(d, Mapping) for d in documents):
                raise ChatTemplateError("documents must be dicts with \"title\" and \"text\"")
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._template.render(messages=normalize_messages(messages), tools=_plain(tools),
                                         documents=_plain(documents), add_generation_prompt=bool(add_generation_prompt),
                                         **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise ChatTemplateError(f"the chat template failed on the conversation ({type(e).__name__}: {e})") from None

    def encode(self, tokenizer, messages: Sequence[Mapping], *, add_generation_prompt: bool = True, **kwargs) -> list:
        """Token ids of the rendered conversation, encoded without adding special tokens
        (as `apply_chat_template(tokenize=True)`): the template writes BOS itself when the model wants one."""
        return list(tokenizer.encode(self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)))

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars, special_tokens={sorted(self.special_tokens)})"


# --------------------------------------------------------------------------- finding a model's template

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"cannot read {path} ({e})") from None
    return data if isinstance(data, dict) else {}


def _pick_default(templates: Mapping[str, str], where: str) -> str:
    if "default" in templates:
        return templates["default"]
    if len(templates) == 1:
        return next(iter(templates.values()))
    raise ChatTemplateError(f"{where} has several chat templates ({', '.join(sorted(templates))}) and none is "
                            f"named \"default\"")


def find_chat_template(model_dir: Optional[os.PathLike] = None, tokenizer=None) -> Optional[str]:
    """The text of a model's chat template, or None when it has none.

    Looks in order at `model_dir/chat_template.jinja`,
    `model_dir/additional_chat_templates/*.jinja` ("default" among them),
    `tokenizer_config.json`'s `chat_template` (a string, or a list of
    `{"name", "template"}` whose "default" is taken), then
    `tokenizer.chat_template` (a GGUF file's template).
    """
    if model_dir is not None and os.path.isdir(model_dir):
        d = Path(model_dir)
        main = d / "chat_template.jinja"
        if main.is_file():
            return main.read_text(encoding="utf-8")
        extra_dir = d / "additional_chat_templates"
        if extra_dir.is_dir():
            extra = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))}
            if extra:
                return _pick_default(extra, str(extra_dir))
        value = _read_json(d / "tokenizer_config.json").get("chat_template")
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value:
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
            named = {k: v for k, v in named.items() if isinstance(k, str) and isinstance(v, str)}
            if named:
                return _pick_default(named, str(d / "tokenizer_config.json"))
    value = getattr(tokenizer, "chat_template", None)
    return value if isinstance(value, str) and value else None


def template_special_tokens(model_dir: Optional[os.PathLike] = None, tokenizer=None) -> dict:
    """The special tokens a template sees as globals (`bos_token`, `eos_token`, ...).

    From `tokenizer_config.json`, then `special_tokens_map.json`, as
    transformers reads them. With neither file (a tokenizer built from a GGUF
    file), the tokenizer's `bos_id` / `eos_id` / `pad_id` as token strings.
    """
    found: dict = {}
    have_files = False
    if model_dir is not None and os.path.isdir(model_dir):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            cfg = _read_json(Path(model_dir) / name)
            have_files = have_files or bool(cfg)
            for key in SPECIAL_TOKEN_NAMES:
                text = _token_content(cfg.get(key))
                if text is not None and key not in found:
                    found[key] = text
    if not have_files and tokenizer is not None:
        own = getattr(tokenizer, "special_tokens_map", None)
        if isinstance(own, Mapping):
            for key in SPECIAL_TOKEN_NAMES:
                text = _token_content(own.get(key))
                if text is not None:
                    found.setdefault(key, text)
        id_to_token = getattr(tokenizer, "id_to_token", None)
        if callable(id_to_token):
            for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id"),
                              ("unk_token", "unk_id")):
                tid = getattr(tokenizer, attr, None)
                if key not in found and isinstance(tid, int):
                    text = id_to_token(tid)
                    if isinstance(text, str):
                        found[key] = text
    return found


def load_chat_template(model_dir: Optional[os.PathLike] = None, tokenizer=None) -> Optional[ChatTemplate]:
    """The model's `ChatTemplate` (template + special tokens), or None when it has no template."""
    source = find_chat_template(model_dir, tokenizer)
    if source is None:
        return None
    return ChatTemplate(source, template_special_tokens(model_dir, tokenizer))


def end_of_turn_ids(tokenizer, extra: Iterable[int] = ()) -> tuple:
    """Token ids that end an assistant turn: `extra` (e.g. the model's EOS ids), the
    tokenizer's `eos_ids`, and those of `END_OF_TURN_TOKENS` in its vocabulary."""
    ids = [int(i) for i in extra]
    ids += [int(i) for i in (getattr(tokenizer, "eos_ids", None) or ())]
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if callable(token_to_id):
        for text in END_OF_TURN_TOKENS:
            tid = token_to_id(text)
            if tid is not None:
                ids.append(int(tid))
    return tuple(dict.fromkeys(ids))

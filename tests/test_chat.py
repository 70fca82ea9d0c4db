"""jaxar.chat: chat templates rendered and tokenized exactly as transformers' apply_chat_template."""

import json

import pytest

from jaxar.chat import (ChatTemplate, ChatTemplateError, end_of_turn_ids, find_chat_template, load_chat_template,
                        template_special_tokens)
from jaxar.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there, what's 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Bonjour, ça va ?"},
     {"role": "assistant", "content": "Oui, très bien !"}, {"role": "user", "content": "  And you? \n"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}],
]

# Llama 3 Instruct's template, with the role-alternation check of Llama 2 / Mistral templates.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if message['role'] != 'system' and (message['role'] == 'user') != (loop.index0 % 2 == "
    "(1 if messages[0]['role'] == 'system' else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5 Instruct's template (tool branches, tojson, whitespace control).
QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# The environment's extras: loop controls, namespace, tojson options, strftime_now, dict.
EXTRAS = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}"
          "{% set ns.n = ns.n + 1 %}{{ m | tojson(indent=2, sort_keys=true) }}\n"
          "{{ dict(a=m.role) | tojson(separators=(',', ':')) }}{% endfor %}[{{ ns.n }}]{{ strftime_now('%Y') }}"
          "{% if add_generation_prompt %}>>{% endif %}")

TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "12°C <rain>"},
    {"role": "tool", "content": "wind & fog"},
]


def _hf_ids(tok, messages, **kw):
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with the chat formats' special tokens, no chat template yet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = tmp_path_factory.mktemp("chat_tok")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for merge in ("he", "ll", "llo"):
        vocab[merge] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("ll", "o")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>",
        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True}}))
    return path


def _hf_tokenizer(path, template):
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = template
    return tok


def test_smollm2_template_renders_and_tokenizes_as_transformers(smollm2_hf_dir):
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tok = load_tokenizer(smollm2_hf_dir)
    template = load_chat_template(smollm2_hf_dir, tok)
    assert template.source == hf.chat_template
    for messages in CONVERSATIONS:
        for agp in (True, False):
            text = template.render(messages, add_generation_prompt=agp)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            assert template.encode(tok, messages, add_generation_prompt=agp) == _hf_ids(
                hf, messages, add_generation_prompt=agp)
    assert end_of_turn_ids(tok) == (hf.convert_tokens_to_ids("<|im_end|>"),)


@pytest.mark.parametrize("source", [LLAMA3, QWEN2, EXTRAS], ids=["llama3", "qwen2", "extras"])
def test_inline_templates_render_and_tokenize_as_transformers(tiny_dir, source):
    hf = _hf_tokenizer(tiny_dir, source)
    tok = load_tokenizer(str(tiny_dir))
    template = ChatTemplate(source, template_special_tokens(str(tiny_dir), tok))
    chats = CONVERSATIONS + ([TOOL_CHAT] if source is QWEN2 else [])
    for messages in chats:
        for agp in (True, False):
            text = template.render(messages, add_generation_prompt=agp)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            assert template.encode(tok, messages, add_generation_prompt=agp) == _hf_ids(
                hf, messages, add_generation_prompt=agp)
    if source is LLAMA3:  # BOS comes from the template, once
        ids = template.encode(tok, CONVERSATIONS[0])
        assert ids.count(tok.token_to_id("<|begin_of_text|>")) == 1 and ids[0] == tok.token_to_id("<|begin_of_text|>")
    if source is QWEN2:  # the tools branch
        tools = [{"type": "function", "function": {"name": "weather", "description": "Météo",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        assert template.render(TOOL_CHAT, tools=tools) == hf.apply_chat_template(
            TOOL_CHAT, tools=tools, tokenize=False, add_generation_prompt=True)


def test_raise_exception_and_bad_conversations_are_one_line_errors(tiny_dir):
    template = ChatTemplate(LLAMA3, {"bos_token": "<s>"})
    hf = _hf_tokenizer(tiny_dir, LLAMA3)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="must alternate") as e:
        template.render(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ChatTemplateError, match="empty"):
        template.render([])
    with pytest.raises(ChatTemplateError, match="message 0"):
        template.render(["hello"])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(Exception, match="underscore"):  # the sandbox's namespace guard
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(CONVERSATIONS[0])


def test_template_lookup_order_and_named_templates(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    tok = load_tokenizer(str(d))
    assert find_chat_template(str(d), tok) is None and load_chat_template(str(d), tok) is None

    class GGUFLike:
        chat_template = "{{ bos_token }}gguf"

    assert find_chat_template(str(d), GGUFLike()) == "{{ bos_token }}gguf"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": QWEN2}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert find_chat_template(str(d), GGUFLike()) == QWEN2
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert load_chat_template(str(d), tok).render(CONVERSATIONS[1]) == hf.apply_chat_template(
        CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    (d / "chat_template.jinja").write_text(LLAMA3)  # the file wins over tokenizer_config.json
    assert find_chat_template(str(d), tok) == LLAMA3
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert hf.chat_template == LLAMA3
    assert template_special_tokens(str(d)) == {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>",
                                               "pad_token": "<|endoftext|>"}
    # end of turn: the tokenizer's eos plus the turn-ending tokens its vocabulary has
    assert end_of_turn_ids(tok) == tuple(tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>"))


def test_gguf_tokenizer_carries_the_chat_template(smollm2_gguf, smollm2_hf_dir):
    """A .gguf file's template (tokenizer.chat_template metadata) and special tokens, with no
    tokenizer files around: the same prompt ids as transformers' reading of that GGUF."""
    from jaxar.tokenizer import gguf_tokenizer

    tok = gguf_tokenizer(smollm2_gguf)
    template = load_chat_template(smollm2_gguf, tok)
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert template is not None and template.source == hf.chat_template
    assert template.special_tokens["eos_token"] == hf.eos_token and template.special_tokens["bos_token"] == hf.bos_token
    for messages in CONVERSATIONS[1:3]:
        assert template.encode(tok, messages) == _hf_ids(hf, messages, add_generation_prompt=True)
    assert hf.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tok)

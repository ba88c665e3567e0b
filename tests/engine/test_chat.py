"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them."""

from __future__ import annotations

import datetime

import pytest

from quantbench.engine.chat import ChatTemplateError, chat_prompt_ids, render_chat, render_template
from quantbench.engine.tokenizer import Tokenizer
from quantbench.errors import QuantbenchError
from tests.engine.test_tokenizer import smollm2_path, smollm2_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, with ünïcödé and \"quotes\"\n on two lines"},
    ],
]

# A template that leans on every HF-specific piece of the environment: namespace, loop controls,
# trim_blocks/lstrip_blocks whitespace handling, the non-escaping tojson, bos/eos tokens,
# strftime_now and raise_exception.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ m['role'] }} n={{ ns.n }}>{{ m['content'] | tojson }}{{ eos_token }}
    {% if ns.n >= 5 %}{% break %}{% endif %}
{% endfor %}
year={{ strftime_now('%Y') }}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("smollm2-hf")
    smollm2_tokenizer().to_hf_files(d)
    return transformers.AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_template_matches_transformers(hf_tokenizer, conv, gen):
    msgs = CONVERSATIONS[conv]
    ours = render_chat(smollm2_tokenizer(), msgs, add_generation_prompt=gen)
    ref = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours == ref
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") is gen


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_rich_template_matches_transformers(hf_tokenizer, conv):
    msgs = CONVERSATIONS[conv]
    tok = smollm2_tokenizer()
    year = datetime.datetime.now().year
    ours = render_template(RICH_TEMPLATE, msgs, add_generation_prompt=True, bos_token=tok.bos_token,
                           eos_token=tok.eos_token)
    ref = hf_tokenizer.apply_chat_template(msgs, chat_template=RICH_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
    if str(year) not in ours:  # the year turned between the two renders
        pytest.skip("clock crossed a year boundary")
    assert ours == ref
    assert "ünïcödé" in ours or conv != 2  # tojson keeps non-ASCII


def test_chat_prompt_ids_match_llama_cpp():
    from tests.oracles import llama_cpp_py as oracle

    tok = smollm2_tokenizer()
    for msgs in CONVERSATIONS:
        text = render_chat(tok, msgs)
        ids = chat_prompt_ids(tok, msgs)
        assert ids == oracle.llama_tokenize(smollm2_path(), text, add_bos=True, special=True)
        assert ids[0] == tok.bos_id  # the template writes <|im_start|> itself
        assert tok.apply_chat_template(msgs) == text


def test_model_without_template_is_a_clear_error():
    tok = Tokenizer.from_gguf({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
    })
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render_chat(tok, CONVERSATIONS[0])
    assert issubclass(ChatTemplateError, QuantbenchError)


def test_template_errors_are_typed():
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        render_template(RICH_TEMPLATE, [{"role": "tool", "content": "x"}], bos_token="", eos_token="")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_template("{% for m in messages %}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        render_template(RICH_TEMPLATE, [])
    with pytest.raises(ChatTemplateError, match="'role'"):
        render_template(RICH_TEMPLATE, [{"content": "no role"}])


def test_sandbox_blocks_python_internals():
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_template(escape, CONVERSATIONS[0])
    mutate = "{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_template(mutate, CONVERSATIONS[0])

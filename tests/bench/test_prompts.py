"""Prompt templates: exact texts, delimiters, errors, and what HFBackend renders with them."""

from __future__ import annotations

import pytest

from bench.prompts import PROMPT_TEMPLATES, QWEN_MATH_COT_SYSTEM, PromptTemplate, get_template
from cascade import EMBEDDED_DELIMITER, ConfigError
from decoding import HFBackend


def test_qwen_math_cot_is_chatml_with_the_model_card_system_prompt() -> None:
    template = get_template("qwen25-math-cot")
    assert QWEN_MATH_COT_SYSTEM == "Please reason step by step, and put your final answer within \\boxed{}."
    assert template.render("What is 1+1?") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
        "<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert template.delimiter == "\n\n"


def test_problem_text_with_braces_is_inserted_verbatim() -> None:
    problem = "Find $\\frac{1}{2} + x$ where {x} = 3 and {problem}."
    for name in ("qwen25-math-cot", "plain"):
        assert problem in get_template(name).render(problem)


def test_delimiters_per_family() -> None:
    assert {name: t.delimiter for name, t in PROMPT_TEMPLATES.items()} == {
        "qwen25-math-cot": "\n\n", "plain": "\n\n", "chat": "\n\n", "embedded": EMBEDDED_DELIMITER}
    assert get_template("plain").render("2+2?") == "Question: 2+2?\nAnswer: Let's think step by step.\n"


def test_tokenizer_templates_cannot_be_rendered_here() -> None:
    for name in ("chat", "embedded"):
        assert get_template(name).format is None
        with pytest.raises(ConfigError, match="tokenizer's chat template"):
            get_template(name).render("x")


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown prompt template 'qwen'.*qwen25-math-cot, plain, chat"):
        get_template("qwen")
    with pytest.raises(ConfigError, match="delimiter must be non-empty"):
        PromptTemplate("x", "{problem}", "", "")
    with pytest.raises(ConfigError, match="no \\{problem\\} field"):
        PromptTemplate("x", "Q:\n", "\n", "")
    with pytest.raises(ConfigError, match="double literal braces"):
        PromptTemplate("x", "\\boxed{} {problem}", "\n", "")  # an undoubled literal brace


def test_hf_backend_sends_the_template_text(tiny_dirs) -> None:
    template = get_template("plain")
    backend = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter=template.delimiter,
                                        prompt_template=template.format)
    text, _ = backend.render_prompt("a=1;?a")
    assert text == template.render("a=1;?a")
    assert backend.info.step_delimiter == "\n\n"
    # the embedded template is the tokenizer's own: the backend renders it, "<s>" + problem + "\n"
    embedded = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter=EMBEDDED_DELIMITER,
                                         prompt_template=get_template("embedded").format)
    assert embedded.render_prompt("a=1;?a")[0] == "<s>a=1;?a\n"

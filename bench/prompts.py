"""Prompt templates per model family, each with the step delimiter its models write.

A template turns a problem into the text a model continues; its delimiter splits that
continuation into steps. Both must match how the model was trained, or steps come out
as one long paragraph (wrong delimiter) or the model never states a final answer
(wrong prompt). This module only knows strings: it loads no model and no tokenizer.

=====================  =====================================================  ==========
name                   for                                                    delimiter
=====================  =====================================================  ==========
``qwen25-math-cot``    Qwen2.5-Math-*-Instruct (ChatML, the model card's CoT   ``"\\n\\n"``
                       system prompt: "Please reason step by step, and put
                       your final answer within \\boxed{}.")
``plain``              base (non-chat) models: "Question: ... Answer: Let's     ``"\\n\\n"``
                       think step by step."
``chat``               any chat model: the tokenizer's own chat template, one   ``"\\n\\n"``
                       user message (what `HFBackend` does without a template)
``embedded``           the shipped embedded pair: its tokenizer's template      ``"\\n"``
                       (``<s>{problem}\\n``), one step per line
=====================  =====================================================  ==========

`PromptTemplate.format` is a `str.format` string with one field, ``{problem}`` (literal
braces doubled), which is what `HFBackend(prompt_template=...)` takes; ``None`` means
"the tokenizer's chat template".
"""

from __future__ import annotations

from dataclasses import dataclass

from cascade import EMBEDDED_DELIMITER, ConfigError

__all__ = ["DEFAULT_TEMPLATE", "PROMPT_TEMPLATES", "QWEN_MATH_COT_SYSTEM", "PromptTemplate", "get_template"]

# The system prompt of the Qwen2.5-Math model card's chain-of-thought example.
QWEN_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt for a model family.

    format: a `str.format` string with the field ``{problem}``, or None for the
    tokenizer's own chat template. delimiter: the text that ends a step in what the
    model writes after this prompt. description: one line for help texts.
    """

    name: str
    format: str | None
    delimiter: str
    description: str

    def __post_init__(self) -> None:
        if not self.delimiter:
            raise ConfigError(f"template {self.name!r}: delimiter must be non-empty")
        if self.format is not None:
            try:
                self.format.format(problem="")
            except (IndexError, KeyError, ValueError) as error:
                raise ConfigError(f"template {self.name!r}: format must be a str.format string whose "
                                  f"only field is {{problem}} (double literal braces): {error!r}") from None
            if "{problem}" not in self.format:
                raise ConfigError(f"template {self.name!r}: format has no {{problem}} field")

    def render(self, problem: str) -> str:
        """The prompt text for `problem` (only for templates with a format string)."""
        if self.format is None:
            raise ConfigError(f"template {self.name!r} is the tokenizer's chat template; "
                              "only the model's tokenizer can render it")
        return self.format.format(problem=problem)


def _braces_doubled(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    template.name: template for template in (
        PromptTemplate(
            name="qwen25-math-cot",
            # Qwen2.5's ChatML with the CoT system prompt, spelled out so that every backend
            # (transformers, vLLM, an OpenAI-compatible completions endpoint) sends the same text.
            format=("<|im_start|>system\n" + _braces_doubled(QWEN_MATH_COT_SYSTEM) + "<|im_end|>\n"
                    "<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"),
            delimiter="\n\n",
            description="Qwen2.5-Math-Instruct chain of thought, answer in \\boxed{}",
        ),
        PromptTemplate(
            name="plain",
            format="Question: {problem}\nAnswer: Let's think step by step.\n",
            delimiter="\n\n",
            description="base models without a chat template",
        ),
        PromptTemplate(
            name="chat",
            format=None,
            delimiter="\n\n",
            description="the tokenizer's own chat template, one user message",
        ),
        PromptTemplate(
            name="embedded",
            format=None,  # the embedded tokenizer's chat template is the task's prompt
            delimiter=EMBEDDED_DELIMITER,
            description="the shipped embedded pair (one step per line)",
        ),
    )
}
DEFAULT_TEMPLATE = "chat"


def get_template(name: str) -> PromptTemplate:
    """The template called `name`; a `ConfigError` lists the valid names."""
    try:
        return PROMPT_TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown prompt template {name!r}; valid templates: "
                          f"{', '.join(PROMPT_TEMPLATES)}") from None

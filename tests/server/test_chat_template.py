"""Chat prompts: a conversation rendered by the model's template and generated as text.

The runtime takes a conversation (``Sequence[ChatMessage]``) wherever it takes a
text prompt; these tests drive it directly with the real bytelm, as
``test_batching.py`` does, and read model folders as the repository does.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from protoserve.server.models.builtin import ByteLMModel
from protoserve.server.runtime import FinishReason
from protoserve.server.runtime.errors import InvalidArgument
from protoserve.server.runtime.model import (
    DEFAULT_CHAT_TEMPLATE,
    ChatMessage,
    ChatTemplate,
)
from protoserve.server.runtime.repository import RepositoryError, read_config
from tests.server._runtime import run, started

MODELS = "tests.server.models_for_tests"

CONVERSATION = [
    ChatMessage("system", "You write Python."),
    ChatMessage("user", "Sort a list."),
    ChatMessage("assistant", "sorted(items)"),
    ChatMessage("developer", "Be brief."),
    ChatMessage("user", "Now reversed."),
]


def folder(root: Path, toml: str) -> Path:
    path = root / "chat"
    path.mkdir()
    (path / "model.toml").write_text(toml)
    (path / "1").mkdir()
    return path


# The template.
def test_the_default_template_renders_as_documented() -> None:
    # docs/model-repository.md, "Chat template"; "developer" is written as "system".
    assert DEFAULT_CHAT_TEMPLATE.render(CONVERSATION) == (
        "### System\nYou write Python.\n\n"
        "### User\nSort a list.\n\n"
        "### Assistant\nsorted(items)\n\n"
        "### System\nBe brief.\n\n"
        "### User\nNow reversed.\n\n"
        "### Assistant\n"
    )
    assert DEFAULT_CHAT_TEMPLATE.stop == ("\n### ",)


def test_only_content_and_name_are_placeholders() -> None:
    template = ChatTemplate(user="<{name}> {content} {x}\n", generation_prompt=">")
    messages = [ChatMessage("user", "a {name} {content}", name="ann")]
    # A message's text is written as it is, braces and all.
    assert template.render(messages) == "<ann> a {name} {content} {x}\n>"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user": "no placeholder"}, "user: must contain {content}"),
        ({"stop": ("",)}, "stop: item 0 must be 1 to 256 characters"),
        ({"stop": ("\n", "x" * 257)}, "stop: item 1 must be 1 to 256 characters"),
    ],
)
def test_a_template_that_cannot_work_is_refused_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ChatTemplate(**fields)


# Chat through the runtime.
def test_a_chat_generates_what_its_rendered_prompt_generates_with_the_template_stops() -> None:
    async def main() -> None:
        model = ByteLMModel()
        async with started(("bytelm", model)) as runtime:
            prompt = model.chat_prompt(CONVERSATION)
            sampled = {"max_new_tokens": 40, "seed": 7, "temperature": 0.8}
            plain = await runtime.generate("bytelm", prompt, sampled)
            # A stop the model will write: a piece of what it wrote without one.
            stop = plain.text[12:15]
            model.chat_template = replace(DEFAULT_CHAT_TEMPLATE, stop=(stop, "\n### "))
            chat = await runtime.generate("bytelm", CONVERSATION, sampled)
            alike = await runtime.generate(
                "bytelm", prompt, {**sampled, "stop_sequences": [stop, "\n### "]}
            )
            # The request's own stops come with the template's.
            both = await runtime.generate(
                "bytelm", CONVERSATION, {**sampled, "stop_sequences": [plain.text[5:7]]}
            )
        assert chat.finish_reason is FinishReason.STOP_SEQUENCE
        assert chat.text == plain.text[: plain.text.index(stop)]
        assert (chat.text, chat.token_ids, chat.usage) == (
            alike.text,
            alike.token_ids,
            alike.usage,
        )
        assert chat.usage.prompt_tokens == len(prompt.encode())
        assert both.text == plain.text[: plain.text.index(plain.text[5:7])]

    run(main())


class OwnPrompt(ByteLMModel):
    """A model that renders its own prompt (as one calling its tokenizer's template)."""

    def chat_prompt(self, messages: Any) -> str:
        return "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"


def test_a_model_that_renders_its_own_prompt_gets_no_template_stops() -> None:
    # The default template's "\n### " would cut an answer with a Markdown heading.
    assert ByteLMModel().chat_stops() == ("\n### ",)
    assert OwnPrompt().chat_stops() == ()

    async def main() -> None:
        model = OwnPrompt()
        async with started(("own", model)) as runtime:
            conversation = [ChatMessage("user", "def ")]
            prompt = model.chat_prompt(conversation)
            sampled = {"max_new_tokens": 48, "seed": 3, "temperature": 0.9}
            chat = await runtime.generate("own", conversation, sampled)
            plain = await runtime.generate("own", prompt, sampled)
        assert (chat.text, chat.finish_reason) == (plain.text, plain.finish_reason)

    run(main())


def test_a_bad_conversation_names_its_field() -> None:
    async def main() -> None:
        async with started(("bytelm", ByteLMModel())) as runtime:
            errors = []
            for messages in (
                [],
                [ChatMessage("user", "hi"), ChatMessage("robot", "beep")],
                [ChatMessage("user", "x" * 9000)],
            ):
                with pytest.raises(InvalidArgument) as caught:
                    await runtime.generate("bytelm", messages, {})
                errors.append(caught.value.violations)
            # The same text as a prompt names inputs.
            with pytest.raises(InvalidArgument) as caught:
                await runtime.generate("bytelm", "x" * 9000, {})
            errors.append(caught.value.violations)
        assert errors == [
            [("messages", "must hold at least one message")],
            [
                (
                    "messages[1].role",
                    "must be one of system, developer, user, assistant, not 'robot'",
                )
            ],
            # 9000 bytes, and 25 of the template: "### User\n", "\n\n", "### Assistant\n".
            [("messages", "is 9025 tokens; the model takes at most 8192")],
            [("inputs", "is 9000 tokens; the model takes at most 8192")],
        ]

    run(main())


# model.toml.
def test_a_model_folder_sets_its_chat_template(tmp_path: Path) -> None:
    folder(
        tmp_path,
        'source = "bytelm"\n'
        "[chat_template]\n"
        'user = "Q: {content}\\n"\n'
        'generation_prompt = "A:"\n'
        'stop = ["\\nQ:", "\\n\\n"]\n',
    )

    async def main() -> None:
        async with started(repository=tmp_path) as runtime:
            model = runtime.get_model("chat").model
            messages = [ChatMessage("system", "S"), ChatMessage("user", "def f")]
            result = await runtime.generate("chat", messages, {"max_new_tokens": 1})
        # Keys left out keep the model's own: here the default's.
        assert model.chat_template == ChatTemplate(
            system=DEFAULT_CHAT_TEMPLATE.system,
            user="Q: {content}\n",
            assistant=DEFAULT_CHAT_TEMPLATE.assistant,
            generation_prompt="A:",
            stop=("\nQ:", "\n\n"),
        )
        assert model.chat_prompt(messages) == "### System\nS\n\nQ: def f\nA:"
        assert result.usage.prompt_tokens == len("### System\nS\n\nQ: def f\nA:")

    run(main())


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('users = "{content}"', "unknown key chat_template.users; known keys: "),
        ("user = 3", "chat_template.user: must be a string"),
        ('stop = "\\n"', "chat_template.stop: must be a list of strings"),
        ("stop = [1]", "chat_template.stop: must be a list of strings"),
        ('stop = [""]', "chat_template.stop: item 0 must be 1 to 256 characters"),
        ('assistant = "A: "', "chat_template.assistant: must contain {content}"),
    ],
)
def test_chat_template_mistakes_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = folder(tmp_path, f'source = "bytelm"\n[chat_template]\n{table}\n')
    with pytest.raises(RepositoryError, match=re.escape(message)):
        read_config(path)


def test_a_chat_template_for_a_model_that_does_not_generate_is_refused(tmp_path: Path) -> None:
    path = folder(tmp_path, f'source = "{MODELS}:Doubler"\n[chat_template]\nstop = ["x"]\n')
    with pytest.raises(RepositoryError, match="chat_template: Doubler does not generate text"):
        read_config(path).build(1)

"""Tokenize conversations with the target's own chat template and mark assistant tokens.

``loss_mask`` is 1 exactly on the tokens of each assistant message's content and on the
assistant's end-of-turn token (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3,
``<end_of_turn>`` for Gemma …), and 0 on system / user text and on template tokens such as
``<|im_start|>assistant\\n`` or the newline after the end-of-turn token.

How the assistant spans are found, for any template: the full conversation is rendered
once; for assistant message ``i`` the render of ``messages[:i]`` with the generation prompt
and the render of ``messages[:i+1]`` are both prefixes of it, and the text between them is
the assistant's turn. Templates that rewrite earlier turns (e.g. dropping reasoning) break
the prefix property; then the message content is located in the render directly and the
special token right after it is taken as the end-of-turn token.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from deepspec.errors import DataError

PROMPT_TOO_LONG = "prompt longer than max_length"
NO_ANSWER = "with no assistant answer"  # no assistant turn, or only empty ones


@dataclass
class TokenizedChat:
    input_ids: list[int]
    attention_mask: list[int]
    loss_mask: list[int]  # 1 on assistant content + end-of-turn tokens
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class TokenizeStats:
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        text = f"{self.kept} kept ({self.truncated} truncated)"
        if self.dropped:
            text += ", dropped: " + ", ".join(f"{n} {r}" for r, n in self.dropped.items())
        return text


def load_chat_template(spec: str | None) -> str | None:
    """``None``/``"auto"`` → the tokenizer's own template; otherwise read a Jinja file."""
    if spec in (None, "", "auto"):
        return None
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise DataError(f"chat template file not found: {spec} (use 'auto' or a Jinja file path)")
    with open(path, encoding="utf-8") as fh:
        return fh.read()


class ChatTokenizer:
    """Render + tokenize conversations; see the module docstring for the mask rule."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        max_length: int = 4096,
        min_loss_tokens: int = 0,
        system_prompt: str | None = None,
        enable_thinking: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = load_chat_template(chat_template)
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the target tokenizer has no chat template; set data.chat_template to a Jinja file"
            )
        self.max_length = max_length
        self.min_loss_tokens = min_loss_tokens
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.special_ids = set(tokenizer.all_special_ids)
        for token_id in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
            if tokenizer.added_tokens_decoder[token_id].special:
                self.special_ids.add(int(token_id))
        self.stats = TokenizeStats()

    # -- rendering ---------------------------------------------------------------------
    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (the system prompt option applied)."""
        messages = self._with_system(list(messages))
        return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self.chat_template,
            enable_thinking=self.enable_thinking,
        )

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` followed by the generation prompt (for evaluation)."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- spans -------------------------------------------------------------------------
    def _assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int, bool]]:
        """Character spans ``(start, end, exact)`` of assistant turns in ``full``.

        ``exact`` spans run from the end of the generation prompt to the end of the turn
        (end-of-turn token and trailing separator included); the others cover the content
        only and the caller adds the following end-of-turn token.
        """
        spans: list[tuple[int, int, bool]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True) if i else ""
            after = self._render(messages[: i + 1], False)
            if (
                len(before) >= cursor
                and full.startswith(before)
                and full.startswith(after)
                and len(after) > len(before)
            ):
                spans.append((len(before), len(after), True))
                cursor = len(after)
                continue
            content = message["content"].strip()
            start = full.find(content, cursor) if content else -1
            if start < 0:
                raise DataError(
                    f"cannot locate assistant turn {i} in the rendered chat; the chat template "
                    f"rewrites the message content (set data.chat_template to a template that does not)"
                )
            spans.append((start, start + len(content), False))
            cursor = start + len(content)
        return spans

    # -- tokenization ------------------------------------------------------------------
    def encode(self, messages: list[dict[str, str]]) -> TokenizedChat:
        """Tokenize a conversation; no length or min-loss filtering (see :meth:`__call__`)."""
        messages = self._with_system(list(messages))
        full = self._render(messages, False)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        loss = [0] * len(ids)
        token = 0
        for start, end, exact in self._assistant_spans(messages, full):
            while token < len(ids) and offsets[token][0] < start:
                token += 1
            first = token
            while token < len(ids) and offsets[token][1] <= end:
                token += 1
            inside = list(range(first, token))
            if exact:
                # keep content + end-of-turn; drop the template's separator after it
                specials = [j for j in inside if ids[j] in self.special_ids]
                if specials:
                    inside = [j for j in inside if j <= specials[-1]]
            elif token < len(ids) and ids[token] in self.special_ids:
                inside.append(token)
            for j in inside:
                loss[j] = 1
        return TokenizedChat(input_ids=ids, attention_mask=[1] * len(ids), loss_mask=loss)

    def __call__(self, messages: list[dict[str, str]]) -> TokenizedChat | None:
        """Tokenize, truncate to ``max_length`` and drop (return None) samples with fewer
        than ``min_loss_tokens`` supervised tokens; counts go to :attr:`stats`.

        Drop reasons (keys of ``stats.dropped``): :data:`NO_ANSWER` when the conversation
        has no assistant turn with text (nothing to learn from: it needs regenerating),
        :data:`PROMPT_TOO_LONG` when it has supervised tokens but none of them lies within
        ``max_length`` (the text before the first answer fills the window), otherwise
        ``"with < k loss tokens"``."""
        sample = self.encode(messages)
        had_loss = sample.num_loss_tokens > 0
        if len(sample.input_ids) > self.max_length:
            n = self.max_length
            sample = TokenizedChat(
                sample.input_ids[:n], sample.attention_mask[:n], sample.loss_mask[:n], truncated=True
            )
        if sample.num_loss_tokens < max(self.min_loss_tokens, 1):
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                self.stats.dropped[NO_ANSWER] += 1
            elif had_loss and sample.num_loss_tokens == 0:
                self.stats.dropped[PROMPT_TOO_LONG] += 1
            else:
                self.stats.dropped[f"with < {max(self.min_loss_tokens, 1)} loss tokens"] += 1
            return None
        self.stats.kept += 1
        self.stats.truncated += int(sample.truncated)
        return sample

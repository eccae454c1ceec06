"""Log probabilities in each API's shape: /generate's, OpenAI completions' (legacy, with `echo`) and chat's.

The engine gives `TokenLogprob`s (xlora_core.sampling): a token id, its log probability and the top
alternatives at its position as ids. Here they get their text: each token decoded alone (a piece of a
character decodes as U+FFFD), so the same token always has the same text.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerBase

from xlora_core.sampling import TokenLogprob


class TokenAlternative(BaseModel):
    token_id: int
    token: str = Field(description="the token alone, decoded")
    logprob: float = Field(description="-9999.0 where the distribution rules the token out")


class TokenLogprobInfo(TokenAlternative):
    """/generate: a token's log probability and the most likely tokens at its position, best first."""

    top: list[TokenAlternative]


class CompletionLogprobs(BaseModel):
    """OpenAI completions' `logprobs`: parallel lists, one entry per token (with `echo`, the prompt's first,
    whose log probability and alternatives are null: nothing comes before it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI chat's `logprobs`."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class TokenTexts:
    """Each token's text, decoded once per request."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def generate_logprobs(
    items: list[TokenLogprob | None] | None, texts: TokenTexts
) -> list[TokenLogprobInfo | None] | None:
    if items is None:
        return None
    return [None if lp is None else generate_logprob(lp, texts) for lp in items]


def generate_logprob(lp: TokenLogprob, texts: TokenTexts) -> TokenLogprobInfo:
    top = [TokenAlternative(token_id=t, token=texts(t), logprob=v) for t, v in lp.top]
    return TokenLogprobInfo(token_id=lp.token_id, token=texts(lp.token_id), logprob=lp.logprob, top=top)


def completion_logprobs(
    token_ids: list[int], items: list[TokenLogprob | None], texts: TokenTexts, offset: int = 0
) -> CompletionLogprobs:
    """The tokens and their log probabilities (None for the prompt's first) in text order; `offset`: where
    the first token's text starts in the choice's text."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, lp in zip(token_ids, items, strict=True):
        text = texts(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(None if lp is None else {texts(t): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(items: list[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = texts(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = [
        ChatTokenLogprob(**top(lp.token_id, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
        for lp in items
    ]
    return ChatLogprobs(content=content)


"""Pydantic models of the HTTP edge (OpenAI-compatible shapes). Nothing here reaches the engine: routes turn
requests into ``GenerateParams`` and engine results into these responses.

Fields OpenAI defines but rankserve does not implement (logprobs, echo, penalties, best_of > 1) are
refused with 422 naming the field rather than silently ignored; other unknown fields are ignored, as
OpenAI clients send many optional ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="an adapter id, or the base model's served name for no adapter")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0.0, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="choices per request (capped by --max-n)")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # extensions that benchmark tools send to vLLM
    top_k: int | None = Field(None, ge=-1, description="0 or -1 = off")
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # OpenAI fields accepted only at their no-op value
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self):
        unsupported = []
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                unsupported.append(name)
        if self.logprobs not in (None, False, 0):
            unsupported.append("logprobs")
        if self.top_logprobs not in (None, 0):
            unsupported.append("top_logprobs")
        if self.echo:
            unsupported.append("echo")
        if self.best_of not in (None, 1):
            unsupported.append("best_of")
        if unsupported:
            raise ValueError(f"not supported by this server: {', '.join(unsupported)}")
        stops = self.stop_list
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] = Field(description="a string, a list of one string, or token ids")
    max_tokens: int | None = Field(16, ge=1, description="tokens to generate at most (OpenAI default 16)")

    @model_validator(mode="after")
    def _one_prompt(self):
        p = self.prompt
        if isinstance(p, list):
            if not p:
                raise ValueError("prompt: must not be empty")
            if isinstance(p[0], str) and len(p) != 1:
                raise ValueError("prompt: a list must hold exactly one string (batched prompts are not supported)")
        if (isinstance(p, str) and not p) or (isinstance(p, list) and isinstance(p[0], str) and not p[0]):
            raise ValueError("prompt: must not be empty")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    @model_validator(mode="after")
    def _some_text(self):
        if not any(m.text() for m in self.messages):
            raise ValueError("messages: at least one message needs non-empty content")
        return self


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, description="a classify adapter id")
    input: str | list[str] = Field(description="texts to classify")

    @model_validator(mode="after")
    def _texts(self):
        texts = self.texts
        if not texts or any(not t for t in texts):
            raise ValueError("input: a non-empty list of non-empty strings")
        if len(texts) > 2048:
            raise ValueError("input: at most 2048 texts per request")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---- responses ------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Classification(BaseModel):
    index: int
    label: str
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    task: str | None = None
    method: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

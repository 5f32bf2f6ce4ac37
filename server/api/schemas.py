"""Pydantic models of the HTTP edge (OpenAI-compatible shapes). Nothing here reaches the engine: routes turn
requests into ``GenerateParams`` and engine results into these responses.

Every field has a documented range, checked here (400 naming the field) so that nothing reaching the
engine thread can overflow there: integers are bounded (``top_k``, ``seed``, ``max_tokens``...), floats
must be finite, and text must be valid Unicode without NUL (a lone surrogate or a NUL is refused, not
passed to the tokenizer). Fields the server does not implement are refused naming them: OpenAI fields
with a no-op value are accepted (``logprobs: false``, ``n: 1``), everything else unknown is refused
(``extra="forbid"``), as a client must never get an answer that silently ignored what it asked for.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from server.api.structured import GuidedFields
from server.engine.sampler import SEED_MAX, SEED_MIN

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_TEXTS = 2048  # classify inputs per request
INT32 = 2**31 - 1
MAX_TEMPERATURE = 100.0


def clean_text(value: str) -> str:
    """Valid Unicode without NUL: a lone surrogate (JSON ``\\ud800``) cannot be encoded for the tokenizer."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


Text = Annotated[str, AfterValidator(clean_text)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(GuidedFields):  # GuidedFields: response_format, guided_* (structured output); extra="forbid"
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Text = Field(min_length=1, max_length=256,
                        description="an adapter id, or the base model's served name for no adapter")
    max_tokens: int | None = Field(None, ge=1, le=INT32, description="tokens to generate at most")
    temperature: Finite | None = Field(None, ge=0.0, le=MAX_TEMPERATURE,
                                       description="0 = greedy (below 1e-5 counts as 0); default 1")
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="choices per request: only 1 is served")
    stop: Text | list[Text] | None = Field(None, description=f"at most {MAX_STOP} non-empty strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: Text | None = Field(None, max_length=256, description="an end-user id, recorded in the access log")
    # extensions that benchmark tools send to vLLM
    top_k: int | None = Field(None, ge=-1, le=INT32, description="0 or -1 = off; above the vocabulary = off")
    min_tokens: int = Field(0, ge=0, le=INT32)
    ignore_eos: bool = False
    # OpenAI fields accepted only at their no-op value
    frequency_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=INT32)

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
            raise ValueError(f"{unsupported[0]}: not supported by this server ({', '.join(unsupported)})")
        stops = self.stop_list
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} exceeds max_tokens ({self.max_tokens})")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[int] = Field(description="a string, a list of one string, or token ids")
    max_tokens: int | None = Field(16, ge=1, le=INT32, description="tokens to generate at most (OpenAI default 16)")

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


class ContentPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32, description="OpenAI's newer name for max_tokens")

    @model_validator(mode="after")
    def _some_text(self):
        if not any(m.text() for m in self.messages):
            raise ValueError("messages: at least one message needs non-empty content")
        if self.max_completion_tokens is not None and self.min_tokens > self.max_completion_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} exceeds max_completion_tokens "
                             f"({self.max_completion_tokens})")
        return self


class ClassifyRequest(Strict):
    model: Text = Field(min_length=1, max_length=256, description="a classify adapter id")
    input: Text | list[Text] = Field(description=f"texts to classify (1 to {MAX_TEXTS})")
    user: Text | None = Field(None, max_length=256, description="an end-user id, recorded in the access log")

    @model_validator(mode="after")
    def _texts(self):
        texts = self.texts
        if not texts or any(not t for t in texts):
            raise ValueError("input: a non-empty list of non-empty strings")
        if len(texts) > MAX_TEXTS:
            raise ValueError(f"input: at most {MAX_TEXTS} texts per request")
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

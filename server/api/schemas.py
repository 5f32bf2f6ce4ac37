"""Pydantic models of the HTTP edge (OpenAI-compatible shapes). Nothing here reaches the engine: routes turn
requests into ``GenerateParams`` and engine results into these responses.

Every field has a documented range, checked here (400 naming the field) so that nothing reaching the
engine thread can overflow there: integers are bounded (``top_k``, ``seed``, ``max_tokens``...), floats
must be finite, and text must be valid Unicode without NUL (a lone surrogate or a NUL is refused, not
passed to the tokenizer). Fields the server does not implement are refused naming them (``extra="forbid"``),
as a client must never get an answer that silently ignored what it asked for.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from server.api.structured import GuidedFields
from server.engine.logprobs import MAX_LOGPROBS
from server.engine.sampler import SEED_MAX, SEED_MIN

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_TEXTS = 2048  # classify inputs per request
MAX_PROMPTS = 256  # prompts per completions request
MAX_N = 16  # choices per prompt (n, best_of)
MAX_SEQUENCES = 256  # prompts x max(n, best_of) per request
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_STOP_TOKEN_IDS = 64
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
TokenId = Annotated[int, Field(ge=0, le=INT32)]


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
    n: int = Field(1, ge=1, le=MAX_N, description=f"choices per prompt (at most {MAX_N})")
    stop: Text | list[Text] | None = Field(None, description=f"at most {MAX_STOP} non-empty strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    user: Text | None = Field(None, max_length=256, description="an end-user id, recorded in the access log")
    frequency_penalty: Finite | None = Field(None, ge=-2.0, le=2.0, description="OpenAI's, over the output")
    presence_penalty: Finite | None = Field(None, ge=-2.0, le=2.0, description="OpenAI's, over the output")
    logit_bias: dict[str, Finite] | None = Field(
        None, description=f"token id (as a string) -> bias in [-100, 100]; at most {MAX_LOGIT_BIAS} entries")
    # extensions that vLLM's server takes
    top_k: int | None = Field(None, ge=-1, le=INT32, description="0 or -1 = off; above the vocabulary = off")
    min_p: Finite | None = Field(None, ge=0.0, le=1.0, description="drop tokens under min_p x the top one's probability")
    repetition_penalty: Finite | None = Field(None, gt=0.0, le=10.0, description="1 = off; over prompt + output")
    min_tokens: int = Field(0, ge=0, le=INT32)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                                 description="token ids that end the choice (finish_reason stop)")
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = Field(False, description='logprob tokens as "token_id:<id>" (vLLM\'s)')

    @model_validator(mode="after")
    def _checks(self):
        stops = self.stop_list
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} exceeds max_tokens ({self.max_tokens})")
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias: keys must be token ids written as decimal strings, got {key[:20]!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias: values must be in [-100, 100], got {value} for {key}")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def bias_ids(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        description=f"a string, a list of strings, token ids, or a list of token-id lists (at most {MAX_PROMPTS} prompts)")
    max_tokens: int | None = Field(16, ge=0, le=INT32,
                                   description="tokens to generate at most (OpenAI default 16; 0 only with echo)")
    logprobs: bool | int | None = Field(None, description="k in [0, 20]: each token's logprob and the k most likely")
    echo: bool = Field(False, description="return the prompt before the completion (with its logprobs when asked)")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="sequences per prompt, the n most likely returned")

    @model_validator(mode="after")
    def _prompts(self):
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ValueError("prompt: must not be empty")
        prompts = self.prompts
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        if any(len(q) == 0 for q in prompts):
            raise ValueError("prompt: must not be empty (nor any prompt in the list)")
        if self.logprobs is True or (not isinstance(self.logprobs, bool) and self.logprobs is not None
                                     and not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs: an integer in [0, {MAX_LOGPROBS}] (the alternatives per token)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 (scoring the prompt only) needs echo: true")
        best_of = self.best_of or self.n
        if best_of < self.n:
            raise ValueError(f"best_of: {best_of} is less than n ({self.n})")
        if self.stream and best_of > self.n:
            raise ValueError("best_of: cannot be used with stream (the best choices are known only at the end)")
        if len(prompts) * best_of > MAX_SEQUENCES:
            raise ValueError(f"n: {len(prompts)} prompts x {best_of} choices is over {MAX_SEQUENCES} sequences")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text or its token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @property
    def num_logprobs(self) -> int | None:
        return None if self.logprobs is None or self.logprobs is False else int(self.logprobs)


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
    logprobs: bool | None = Field(None, description="each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token (needs logprobs)")
    echo: bool = Field(False, description="not supported on chat (false only)")

    @model_validator(mode="after")
    def _some_text(self):
        if not any(m.text() for m in self.messages):
            raise ValueError("messages: at least one message needs non-empty content")
        if self.max_completion_tokens is not None and self.min_tokens > self.max_completion_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} exceeds max_completion_tokens "
                             f"({self.max_completion_tokens})")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.echo:
            raise ValueError("echo: not supported on /v1/chat/completions")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, logprob (None for the first prompt token), the top
    alternatives (text -> logprob, the chosen token included), and its character offset in the choice's text."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


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


# ---- /tokenize, /detokenize (vLLM's shapes) ---------------------------------------------------------------
class TokenizeRequest(Strict):
    """vLLM's: a ``prompt`` (special tokens added by default), or chat ``messages`` rendered by the chat template
    (with the generation prompt by default, no special tokens added)."""

    model: Text | None = Field(None, max_length=256, description="the base model's name or an adapter id (optional)")
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Strict):
    model: Text | None = Field(None, max_length=256, description="the base model's name or an adapter id (optional)")
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str

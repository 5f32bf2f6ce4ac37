"""Structured output at the HTTP edge: OpenAI's ``response_format`` and vLLM's ``guided_json``,
``guided_regex`` and ``guided_choice``, on /v1/completions and /v1/chat/completions.

The fields become one ``GuideSpec`` (at most one constraint per request, else 400 naming both), compiled
in a threadpool under a wall-clock bound before the request is submitted (an invalid schema or regex is a
400 naming its field), so the engine thread only copies a cached matcher.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from server.common.errors import InvalidParameter
from server.engine.guided import COMPILE_TIMEOUT_S, MAX_CHOICES, GuideSpec


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema (absent: any JSON object)")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GuidedFields(BaseModel):
    """The structured-output fields of a sampling request."""

    model_config = ConfigDict(extra="forbid")

    response_format: ResponseFormat | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}')
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="vLLM: a regex the whole output matches")
    guided_choice: list[str] | None = Field(None, max_length=MAX_CHOICES,
                                            description="vLLM: the output is exactly one of these strings")

    @model_validator(mode="after")
    def _one_constraint(self):
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            raise ValueError('response_format: type "json_schema" needs a "json_schema" object')
        if rf is not None and rf.type != "json_schema" and rf.json_schema is not None:
            raise ValueError(f'response_format: "json_schema" is only allowed with type "json_schema", not {rf.type!r}')
        given = [name for name in ("guided_json", "guided_regex", "guided_choice") if getattr(self, name) is not None]
        if rf is not None and rf.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise ValueError(f"{given[1]}: only one output constraint per request ({', '.join(given)} given)")
        return self

    def guide_spec(self) -> GuideSpec | None:
        """The request's output constraint, or None."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return GuideSpec.json_object("response_format")
        if rf is not None and rf.json_schema is not None:
            schema = rf.json_schema.schema_
            field = "response_format.json_schema.schema"
            return GuideSpec.json_schema(schema, field) if schema is not None else GuideSpec.json_object(field)
        if self.guided_json is not None:
            return GuideSpec.json_schema(self.guided_json, "guided_json")
        if self.guided_regex is not None:
            return GuideSpec.regex(self.guided_regex, "guided_regex")
        if self.guided_choice is not None:
            return GuideSpec.choice(self.guided_choice, "guided_choice")
        return None


async def compile_guide(engine, spec: GuideSpec | None) -> GuideSpec | None:
    """A request's constraint, compiled into the engine's cache off the event loop and the engine thread."""
    if spec is None:
        return None
    try:
        await asyncio.wait_for(run_in_threadpool(engine.guides.compile, spec), COMPILE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise InvalidParameter(f"{spec.field}: the grammar did not compile within {COMPILE_TIMEOUT_S:g} s",
                               param=spec.field) from None
    return spec

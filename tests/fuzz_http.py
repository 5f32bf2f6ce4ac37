"""The HTTP fuzzer's requests: hypothesis strategies for every JSON and path route, drawing mostly valid
requests with hostile values mixed in field by field (huge and negative integers, non-finite and denormal
floats, wrong types, lone surrogates, NUL, very long text, deep nesting, unknown fields, broken bodies,
odd paths and bad keys). Uploads are in tests/fuzz_uploads.py; the properties every answer must have, and
the server, in tests/test_fuzz_api.py.

Only what a real client could put on the wire is sent: any body bytes, header values of latin-1, paths of
percent-encoded bytes. Nothing can delete the store's real adapters: a key able to delete one is never sent
with a path and ``?owner=`` that could name it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from urllib.parse import quote

from hypothesis import strategies as st

BASE, VOCAB = "tiny-llama", 512
INFER_A, INFER_B, INFER_PLAIN = "sk-fuzz-infer-a", "sk-fuzz-infer-b", "sk-fuzz-infer"
ADMIN, ADMIN_A, ADMIN_B = "sk-fuzz-admin", "sk-fuzz-admin-a", "sk-fuzz-admin-b"
API_KEYS = (f"{INFER_A}:tenantA", f"{INFER_B}:tenantB", INFER_PLAIN)
ADMIN_KEYS = (ADMIN, f"{ADMIN_A}:tenantA", f"{ADMIN_B}:tenantB")
ALL_KEYS = [INFER_A, INFER_B, INFER_PLAIN, ADMIN, ADMIN_A, ADMIN_B]
TENANT = {INFER_A: "tenantA", INFER_B: "tenantB", ADMIN_A: "tenantA", ADMIN_B: "tenantB"}
# the real adapters in the store under fuzz: id -> (task, owning tenant or None for public)
ADAPTERS = {"gen-pub": ("generate", None), "cls-pub": ("classify", None),
            "gen-a": ("generate", "tenantA"), "cls-b": ("classify", "tenantB")}
GENERATE_IDS = [BASE] + [i for i, (task, _) in ADAPTERS.items() if task == "generate"]
CLASSIFY_IDS = [i for i, (task, _) in ADAPTERS.items() if task == "classify"]
UPLOAD_PREFIX = "fuzzup-"  # the only ids the fuzzer's uploads may create (and delete)
UPLOAD_POOL = [f"{UPLOAD_PREFIX}{i}" for i in range(4)]
UNKNOWN_FIELDS = ["tools", "guided_grammar", "suffix", "guided_decoding_backend", "foo", "Model",
                  "__proto__", "model ", "\ud800", "", "x" * 300]

INFERENCE = frozenset({200, 400, 401, 404, 413, 429})  # invalid parameters are 400 (DESIGN section 4)
STATUSES = {"completions": INFERENCE, "classify": INFERENCE, "list": frozenset({200, 400, 401, 403, 429}),
            "get": frozenset({200, 307, 400, 401, 403, 404, 429}),  # 307: an empty id leaves /v1/adapters/
            "delete": frozenset({200, 307, 400, 401, 403, 404, 429}),
            "upload": frozenset({201, 400, 401, 403, 409, 413, 415, 422, 429}), "probe": frozenset({200})}


def can_delete(key: str, adapter_id: str, owner_param: str | None) -> bool:
    """Whether DELETE /v1/adapters/{adapter_id}?owner={owner_param} with ``key`` would delete that real
    adapter: a global admin names a public one plainly and a tenant's with ?owner=; a tenant's admin names
    its own plainly."""
    owner = ADAPTERS[adapter_id][1]
    if key == ADMIN:
        return owner_param == owner
    return key in (ADMIN_A, ADMIN_B) and owner_param is None and owner is not None and TENANT[key] == owner


# ---- requests ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """JSON text written as is: what json.dumps will not write (1e400, 5000 digits, 40,000 levels deep)."""

    text: str


def to_json(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(to_json, value)) + "]"
    return json.dumps(value)  # lone surrogates as \ud800 escapes; nan and inf as NaN and Infinity


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    statuses: frozenset | None = None  # what the route documents; None: anything below 500
    expect: str | None = None  # the `object` of a 2xx JSON answer
    refuse: tuple = ()  # why the body must be refused: unknown or non-finite fields (never ignored, row 37)
    summary: str | None = None  # how to print a body too long or too binary to read
    route: str = "other"  # for the run's tally

    def __repr__(self) -> str:
        body = self.summary or _short(self.body, 1500)
        headers = ", ".join(f"{k}: {_short(v, 120)}" for k, v in self.headers.items())
        return f"Req({self.method} {_short(self.path, 300)} headers {{{headers}}} body={body})"


def _short(value, n: int) -> str:
    return repr(value) if len(value) <= n else f"{value[:n]!r}...({len(value)} long)"


# ---- values ------------------------------------------------------------------------------------------------
def mostly(valid, hostile, odds: int = 5):
    """``valid`` about odds times in odds + 1, else ``hostile``; shrinks toward valid."""
    return st.integers(0, odds).flatmap(lambda i: hostile if i == odds else valid)


ODD = ["\ud800", "\udfff", "\udc00\ud800", "\ud83d", "a\udc00", "\x00", "\ufffd", "\ufeff", "\u202e",
       "\U0010ffff", "😀", "\r\n", "\\", '"', "</s>", "<s>", "<|endoftext|>", "<unk>", "\x7f", "\x1b[31m",
       "%00", "../"]  # lone surrogates (sent as JSON escapes: \ud800), NUL, BOM, bidi, special tokens
plain_text = st.sampled_from(["Hello", "The cat", "Once upon a time", "good film", "bad film", "x"]) | (
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=24))
odd_text = st.tuples(st.text(max_size=6), st.lists(st.sampled_from(ODD), min_size=1, max_size=3),
                     st.text(max_size=6)).map(lambda t: t[0] + "".join(t[1]) + t[2])
long_text = st.builds(lambda s, n: s * n, st.sampled_from(["a", "the cat ", "é", "😀", "\ud800", "\x00"]),
                      st.integers(200, 40_000))
hostile_text = st.one_of(odd_text, long_text, st.just(""), st.just(" "))
small_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=2), max_leaves=4)
RAW_NUMBERS = ["1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "-0", "-0.0", "4.9e-324",
               "2.2250738585072014e-308", "1" + "0" * 5000, "1E+20", "0.5", "1.0", "1e2", "0x10", "+1", ".5",
               "01"]
BIG_INTS = [2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 2**70, 10**9, 10**20,
            -(2**31), -(2**63), -(2**63) - 1, -(2**64), -(10**20), -1, 0]
EDGE_FLOATS = [5e-324, -0.0, 1e-308, 1e-45, 1e-7, 1e308, 1.7976931348623157e308, -1e-300, float("nan"),
               float("inf"), -float("inf")]
deep = st.integers(2, 40_000).map(lambda n: Raw("[" * n + "]" * n))
hostile = st.one_of(st.sampled_from(BIG_INTS), st.integers(), st.floats(allow_subnormal=True),
                    st.sampled_from(RAW_NUMBERS).map(Raw), hostile_text, small_json, deep)
# a field's hostile values: mostly of its own type, as those pass the type check and go deepest (the edge
# values listed twice: they are what overflows), then anything
bad_int = st.one_of(st.sampled_from(BIG_INTS), st.sampled_from(BIG_INTS), st.integers(), hostile)
bad_float = st.one_of(st.sampled_from(EDGE_FLOATS), st.sampled_from(EDGE_FLOATS), st.floats(),
                      st.sampled_from(RAW_NUMBERS).map(Raw), hostile)
bad_text = st.one_of(odd_text, odd_text, long_text, hostile_text, hostile)


# ---- JSON routes -------------------------------------------------------------------------------------------
def model_ids(ids: list[str], wrong_task: list[str]):
    """(valid, hostile): a real id; or the other task's, an odd one, one of the fuzzer's uploads, anything."""
    odd = ["", " ", "nope", "../gen-pub", "gen-pub/../cls-pub", "/etc/passwd", "gen-pub\x00", "GEN-PUB",
           "gen-pub ", "gén", "\ud800", "a" * 129, BASE + "/x", BASE.upper(), ".", "..", "-x", "gen-pub\n"]
    return st.sampled_from(ids), st.sampled_from(odd + UPLOAD_POOL + wrong_task) | hostile


def json_object(fields: dict, required: tuple):
    """A JSON object of ``fields`` (name -> (valid, hostile) strategies): all valid, one field hostile (the
    commonest: it gets past every other check to where that field is used), or a few hostile; sometimes a
    required field dropped, sometimes unknown fields added."""

    @st.composite
    def draw_object(draw) -> dict:
        optional = {k: valid for k, (valid, _) in fields.items() if k not in required}
        obj = draw(st.fixed_dictionaries({k: fields[k][0] for k in required}, optional=optional))
        mode = draw(st.sampled_from(["valid", "one", "one", "some"]))
        names = sorted(fields)
        bad = {"valid": st.just([]), "one": st.sampled_from(names).map(lambda n: [n]),
               "some": st.lists(st.sampled_from(names), min_size=2, max_size=4, unique=True)}[mode]
        for name in draw(bad):
            obj[name] = draw(fields[name][1])
        for name in draw(mostly(st.just([]), st.lists(st.sampled_from(required), min_size=1), odds=10)):
            obj.pop(name, None)
        unknown = st.dictionaries(st.sampled_from(UNKNOWN_FIELDS), small_json | hostile, min_size=1,
                                  max_size=2)
        return {**obj, **draw(mostly(st.just({}), unknown, odds=8))}

    return draw_object()


token_id_strs = st.integers(0, VOCAB - 1).map(str)
bad_bias = st.one_of(
    st.dictionaries(st.sampled_from(["-1", str(VOCAB), "1.5", "x", "", " 1", "01", "1" * 30, "\ud800", "\uff11"]),
                    st.floats(-100, 100), min_size=1, max_size=3),
    st.dictionaries(token_id_strs, bad_float, min_size=1, max_size=3),
    st.integers(1025, 1200).map(lambda n: {str(i % VOCAB) + "0" * (i // VOCAB): 1.0 for i in range(n)}),
    hostile)
SAMPLING = {  # name -> (valid, hostile), the fields both routes take
    "max_tokens": (st.integers(1, 4), bad_int), "top_k": (st.integers(-1, 300), bad_int),
    "temperature": (st.sampled_from([0, 0.0, 0.7, 1, 2]) | st.floats(0, 5), bad_float),
    "top_p": (st.floats(5e-324, 1.0) | st.just(1), bad_float), "min_tokens": (st.integers(0, 2), bad_int),
    "seed": (st.integers(-(2**63), 2**63 - 1), bad_int), "n": (st.sampled_from([1, 1, 2, 3]), bad_int),
    "stop": (st.none() | plain_text | st.lists(plain_text, max_size=4),
             bad_text | st.lists(bad_text, max_size=40)),
    "ignore_eos": (st.booleans(), hostile), "user": (plain_text, bad_text),
    "stream": (st.booleans(), hostile),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), hostile),
    "frequency_penalty": (st.sampled_from([0, 0.0, None]) | st.floats(-2, 2), bad_float),
    "presence_penalty": (st.sampled_from([0, None]) | st.floats(-2, 2), bad_float),
    "repetition_penalty": (st.none() | st.floats(0.01, 10), bad_float),
    "logit_bias": (st.none() | st.dictionaries(token_id_strs, st.floats(-100, 100), max_size=5), bad_bias),
    "stop_token_ids": (st.none() | st.lists(st.integers(0, VOCAB - 1), max_size=4),
                       st.lists(bad_int, min_size=1, max_size=4) | st.lists(st.just(1), min_size=65, max_size=70)
                       | hostile),
    "min_p": (st.none() | st.floats(0, 1), bad_float),
    "include_stop_str_in_output": (st.booleans(), hostile),
    "return_tokens_as_token_ids": (st.booleans(), hostile)}
COMPLETION_ONLY = {
    "max_tokens": (st.integers(0, 4), bad_int), "logprobs": (st.sampled_from([None, False, 0, 1, 5, 20]), bad_int),
    "echo": (st.booleans(), hostile), "best_of": (st.sampled_from([None, 1, 2, 3]), bad_int)}
CHAT_ONLY = {
    "logprobs": (st.sampled_from([None, False, True]), hostile), "top_logprobs": (st.sampled_from([None, 0, 2, 20]), bad_int),
    "echo": (st.just(False), hostile), "max_completion_tokens": (st.integers(1, 4), bad_int)}
ROLES = ["system", "developer", "user", "assistant", "tool"]
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
bad_token_ids = st.lists(st.sampled_from([-1, VOCAB, 2**31, 2**63, 2**64, 10**20, True, 1.5]) | st.integers(),
                         min_size=1, max_size=4)
prompts = (plain_text | st.lists(plain_text, min_size=1, max_size=3) | token_ids
           | st.lists(token_ids, min_size=1, max_size=3), st.one_of(
    bad_text, bad_text, st.lists(bad_text, min_size=1, max_size=3), bad_token_ids, st.just([]), st.just([""]),
    st.lists(bad_token_ids, min_size=1, max_size=3), st.just([[]]), st.just([[1], []]), st.just([[1], "x"]),
    st.lists(plain_text, min_size=257, max_size=300),
    st.lists(st.integers(0, VOCAB - 1), min_size=300, max_size=600)))
content = plain_text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": plain_text}),
                                min_size=1, max_size=2)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content},
                                optional={"name": plain_text})
bad_message = json_object({"role": (st.sampled_from(ROLES), bad_text), "name": (plain_text, bad_text),
                           "content": (content, bad_text | st.none())}, ("role", "content"))
messages = (st.lists(message, min_size=1, max_size=3), st.one_of(
    st.lists(bad_message, min_size=1, max_size=3), hostile, st.just([]),
    st.lists(message, min_size=200, max_size=400),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.just("")}), max_size=2)))
classify_input = (plain_text | st.lists(plain_text, min_size=1, max_size=4), st.one_of(
    bad_text, st.just([]), st.just([""]), st.lists(bad_text | small_json, min_size=1, max_size=3),
    st.integers(2000, 2100).map(lambda n: ["x"] * n)))


def auth(valid_keys: list[str]):
    """An Authorization or X-API-Key header, mostly one of ``valid_keys``, else malformed or unknown."""
    wrong = st.sampled_from(["", "sk-wrong", INFER_A.upper(), INFER_A[:-1], INFER_A + "x", " " + INFER_A,
                             "k" * 5000, "\xff\xfe", "Bearer", "null"])
    key = mostly(st.sampled_from(valid_keys), wrong, odds=6)
    form = mostly(st.just("Bearer {}"), st.sampled_from(
        ["bearer {}", "{}", "Bearer  {} ", "Basic {}", "Token {}", "x-api-key", "none"]), odds=6)

    def header(pair) -> dict:
        k, f = pair
        if f == "none":
            return {}
        if f == "x-api-key":
            return {"X-API-Key": k.encode("latin-1")}
        return {"Authorization": f.format(k).encode("latin-1")}

    return st.tuples(key, form).map(header)


CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz",
                 "application/json; charset=utf-16", "application/json; charset=latin-1",
                 "application/merge-patch+json", "application/jsonx", "", "*/*"]
body_faults = mostly(st.none(), st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 200)),
    st.tuples(st.just("insert"), st.integers(0, 200), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("replace"), st.binary(max_size=64)), st.just(("utf-16",))), odds=10)


def with_fault(text: str, fault) -> bytes:
    if fault == ("utf-16",):  # JSON parsers must take it (RFC 8259 allows the detection) or refuse it
        return text.encode("utf-16", "surrogatepass")
    body = text.encode("utf-8")  # to_json escapes everything past ASCII
    if fault is None:
        return body
    if fault[0] == "truncate":
        return body[:fault[1]]
    if fault[0] == "insert":
        return body[:fault[1]] + fault[2] + body[fault[1]:]
    return fault[1]


NON_FINITE = {"1e400", "-1e400", "NaN", "Infinity", "-Infinity"}


def must_refuse(name: str, value) -> str | None:
    """Why a top-level field makes any body refused: no route implements it, or no field takes its value."""
    if name in UNKNOWN_FIELDS and value is not None:
        return "not implemented by any route"
    if isinstance(value, Raw):
        value = json.loads(value.text) if value.text in NON_FINITE else 0.0
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    return None


def json_request(path: str, route: str, expect: str, obj, keys: list[str]):
    ctype = mostly(st.just("application/json"), st.sampled_from(CONTENT_TYPES), odds=10)
    request_id = mostly(st.none(), st.sampled_from(["abc", "x" * 65, "a b", "../x", "\xe9", "", "ok-1.2_3"]))

    def build(t) -> Req:
        obj, headers, ctype, fault, rid = t
        if ctype is not None:
            headers = {**headers, "Content-Type": ctype.encode("latin-1")}
        if rid is not None:
            headers = {**headers, "X-Request-Id": rid.encode("latin-1")}
        intact = fault is None and ctype == "application/json" and isinstance(obj, dict)
        refuse = tuple(f"{k}: {why}" for k, v in obj.items() if (why := must_refuse(k, v))) if intact else ()
        return Req("POST", path, headers, with_fault(to_json(obj), fault), STATUSES[route], expect, refuse,
                   route=f"POST {path}")

    return st.tuples(mostly(obj, hostile, odds=12), auth(keys), ctype, body_faults, request_id).map(build)


def completions():
    fields = {"model": model_ids(GENERATE_IDS, CLASSIFY_IDS), "prompt": prompts, **SAMPLING, **COMPLETION_ONLY}
    body = json_object(fields, ("model", "prompt"))
    return json_request("/v1/completions", "completions", "text_completion", body, ALL_KEYS)


def chat_completions():
    # max_tokens is required here: by default chat fills the context (~240 tokens, ~0.6 s on tiny-llama)
    fields = {"model": model_ids(GENERATE_IDS, CLASSIFY_IDS), "messages": messages, **SAMPLING, **CHAT_ONLY}
    body = json_object(fields, ("model", "messages", "max_tokens"))
    return json_request("/v1/chat/completions", "completions", "chat.completion", body, ALL_KEYS)


def classify():
    fields = {"model": model_ids(CLASSIFY_IDS, GENERATE_IDS), "input": classify_input,
              "user": (plain_text, bad_text)}
    return json_request("/v1/classify", "classify", "list", json_object(fields, ("model", "input")), ALL_KEYS)


# ---- routes without a body ---------------------------------------------------------------------------------
ODD_IDS = ["", ".", "..", "../..", "a/b", "%2e%2e", "%00", "\x00", "\ud800", "é", "a" * 200, "x.safetensors",
           "-x"]
path_ids = mostly(st.sampled_from(list(ADAPTERS) + UPLOAD_POOL + ["nope"]),
                  st.sampled_from(ODD_IDS) | hostile_text)


def id_path(adapter_id: str, how: str) -> str:
    """The adapter routes' path for an id, percent-encoded ("raw" keeps its slashes). Dot segments are always
    escaped: a client would resolve them (RFC 3986), sending the request to another route."""
    raw = adapter_id.encode("utf-8", "surrogatepass")[:2000]  # URLs stay under what clients and servers take
    if how == "all":  # every byte escaped: %67en-pub is gen-pub
        return "/v1/adapters/" + "".join(f"%{b:02X}" for b in raw)
    segments = raw.split(b"/") if how == "raw" else [raw]
    escaped = [s.decode().replace(".", "%2E") if s in (b".", b"..") else quote(s, safe=":") for s in segments]
    return "/v1/adapters/" + "/".join(escaped)


# ?owner=TENANT: a global admin's way to a tenant's adapter (403 from any other key, 400 when empty)
owner_params = mostly(st.sampled_from([None, None, None, "tenantA", "tenantB"]),
                      st.sampled_from(["", "nope", "tenantA ", "TENANTA", "t/../tenantA"]) | hostile_text)


def owner_query(owner: str | None) -> str:
    return "" if owner is None else "?owner=" + quote(owner.encode("utf-8", "surrogatepass")[:2000], safe="")


def adapter_request(method: str, route: str, ids, keys: list[str], owners=owner_params):
    how = mostly(st.just("quote"), st.sampled_from(["raw", "all"]))
    return st.tuples(ids, how, owners, auth(keys)).map(lambda t: Req(
        method, id_path(t[0], t[1]) + owner_query(t[2]), t[3], b"", STATUSES[route], "adapter",
        route=f"{method} /v1/adapters/{{id}}"))


def get_adapter():
    return adapter_request("GET", "get", path_ids, ALL_KEYS)


def delete_adapter():
    """A real id only with a key and owner that cannot delete it (403/404); anything else only for ids that
    name no real adapter."""
    def safe(adapter_id: str):
        pairs = st.tuples(st.sampled_from(ALL_KEYS), owner_params).filter(
            lambda t: not can_delete(t[0], adapter_id, t[1]))
        return pairs.flatmap(lambda t: adapter_request("DELETE", "delete", st.just(adapter_id), [t[0]],
                                                       st.just(t[1])))

    not_real = path_ids.filter(lambda i: not any(real in i for real in ADAPTERS))
    real = st.sampled_from(list(ADAPTERS)).flatmap(safe)
    return mostly(adapter_request("DELETE", "delete", not_real, ALL_KEYS), real, odds=2)


def listings():
    path = st.sampled_from(["/v1/models", "/v1/adapters"])
    query = mostly(st.just(""), st.sampled_from(["?limit=-1", "?x=%00", "?owner=tenantB", "?%ff",
                                                  "?" + "a" * 3000]))
    return st.tuples(path, query, auth(ALL_KEYS)).map(
        lambda t: Req("GET", t[0] + t[1], t[2], b"", STATUSES["list"], "list", route=f"GET {t[0]}"))


def probes():
    path = st.sampled_from(["/health", "/ready", "/metrics", "/openapi.json", "/docs", "/redoc"])
    return st.tuples(path, mostly(st.just({}), auth(ALL_KEYS))).map(
        lambda t: Req("GET", t[0], t[1], b"", STATUSES["probe"], route=f"GET {t[0]}"))


def misc():
    """Wrong methods (never DELETE), unknown and odd paths, any body: only < 500 and the envelope asked."""
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models",
                             "/v1/adapters", "/v1/adapters/gen-pub", "/health", "/metrics", "/", "/v1",
                             "/v1/", "//v1/models", "/v1/models/", "/v1/completions/", "/v1/adapters/a/b",
                             "/%00", "/..%2f..%2fetc", "/v1/%ED%A0%80", "/v2/completions", "/generate",
                             "/" + "a" * 3000])
    methods = st.sampled_from(["GET", "POST", "PUT", "PATCH", "OPTIONS", "HEAD"])
    body = st.binary(max_size=64) | small_json.map(lambda v: to_json(v).encode())
    return st.tuples(methods, paths, auth(ALL_KEYS), body).map(lambda t: Req(t[0], t[1], t[2], t[3]))

"""The HTTP fuzzer's uploads (POST /v1/adapters): multipart bodies, well formed or not, carrying a compiled
adapter, a PEFT pair or junk, each damaged or not (flipped bytes, truncation, a header length past the file,
JSON nested thousands deep in the header or in a metadata value, NaN weights, ranks over the cap, MoR's compact
form (whose damaged shapes must be refused before it expands), hostile
adapter_config.json values, pickle and zip bytes, odd file names and field names), with keys of every kind.

An upload can only create an ``UPLOAD_PREFIX`` id: the id of any upload that could be valid is the
fuzzer's own, one already taken in the uploading key's namespace (409), the base model's name, or invalid.
"""

from __future__ import annotations

import json
import struct

from hypothesis import strategies as st

from adapters_store.store import ID_RE
from tests.fuzz_http import (
    ADAPTERS,
    ADMIN,
    ADMIN_A,
    ADMIN_B,
    BASE,
    INFER_A,
    ODD_IDS,
    STATUSES,
    TENANT,
    UPLOAD_POOL,
    UPLOAD_PREFIX,
    Req,
    auth,
    deep,
    hostile,
    hostile_text,
    mostly,
    to_json,
)

# the pool's ids come and go (uploads, deletes, inference on them); a fresh id has an upload's files validated
fresh_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8).map(UPLOAD_PREFIX.__add__)


def upload_ids(key: str):
    """Ids a possibly valid upload with ``key`` may carry: the fuzzer's own, one taken in the key's namespace
    (409), the base's name, or invalid ones; never a new real-looking id."""
    taken = [i for i, (_, owner) in ADAPTERS.items() if owner == TENANT.get(key)]

    def ok(value: str) -> bool:
        seen = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace").strip()  # as the server does
        return seen.startswith(UPLOAD_PREFIX) or seen in taken or seen == BASE or not ID_RE.fullmatch(seen)

    odd = st.sampled_from(list(ADAPTERS) + [BASE] + ODD_IDS) | hostile_text
    return mostly(st.sampled_from(UPLOAD_POOL) | fresh_ids, odd, odds=3).filter(ok)


blob_faults = mostly(st.none(), st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("append"), st.binary(min_size=1)), st.just(("pad", 300 << 10)),  # over the upload cap
    st.tuples(st.just("header_len"), st.sampled_from([0, 1, 7, 100, 10**6, 2**32, 2**63, 2**64 - 1])),
    st.tuples(st.sampled_from(["deep_header", "deep_metadata"]), st.integers(2, 20_000))), odds=2)


def broken_blob(blob: bytes, fault) -> bytes:
    if fault is None:
        return blob
    kind = fault[0]
    if kind == "flip":
        i = fault[1] % len(blob)
        return blob[:i] + bytes([fault[2]]) + blob[i + 1:]
    if kind == "truncate":
        return blob[:fault[1] % len(blob)]
    if kind == "append":
        return blob + fault[1]
    if kind == "pad":
        return blob + b"\0" * fault[1]
    if kind == "header_len":
        return struct.pack("<Q", fault[1]) + blob[8:]  # the safetensors header length
    n = struct.unpack("<Q", blob[:8])[0]
    header, nested = json.loads(blob[8:8 + n]), "[" * fault[1] + "]" * fault[1]
    if kind == "deep_header":
        text = json.dumps(header)[:-1] + f', "deep": {nested}}}'
    else:  # metadata values are JSON inside strings
        header["__metadata__"] = {**header.get("__metadata__", {}), "labels": nested}
        text = json.dumps(header)
    return struct.pack("<Q", len(text)) + text.encode() + blob[8 + n:]


PEFT_KEYS = ["r", "lora_alpha", "target_modules", "use_dora", "bias", "modules_to_save", "peft_type",
             "task_type", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
             "fan_in_fan_out"]
PEFT_VALUES = [1000, 0, -4, True, "all", ["lm_head"], ["nope"], "ADALORA", "SEQ_CLS", {"q_proj": 999}, [99],
               None]


def peft_config(config: dict):
    edit = st.tuples(st.sampled_from(PEFT_KEYS), st.sampled_from(PEFT_VALUES) | hostile | st.just("<delete>"))

    def apply(edits) -> bytes:
        out = dict(config)
        for k, v in edits:
            if v == "<delete>":
                out.pop(k, None)
            else:
                out[k] = v
        return to_json(out).encode()

    whole = st.one_of(hostile.map(lambda v: to_json(v).encode()), st.binary(max_size=32),
                      deep.map(lambda v: f'{{"r": {v.text}}}'.encode()))
    return mostly(st.lists(edit, max_size=2).map(apply), whole, odds=4)


filenames = mostly(st.none(), st.one_of(
    st.sampled_from(["../../x.safetensors", "/etc/x.safetensors", "C:\\a\\x.safetensors", ".safetensors",
                     "x.safetensors\x00.bin", "x" * 300 + ".safetensors", "é.safetensors"]),
    st.sampled_from([".bin", ".pt", ".pth", ".pkl", ".zip", ".ckpt", ".safetensors.bin", ""]).map(
        "x".__add__),
    hostile_text), odds=3)
JUNK = [b"", b"\x80\x04\x95" + b"\0" * 16, b"PK\x03\x04" + b"\0" * 26, b"\x1f\x8b\x08" + b"\0" * 8, b"{}",
        b"\0" * 8]  # empty, pickle, zip, gzip, JSON, zeros


def file_parts(blobs: dict[str, bytes]):
    """[(field name, filename, bytes)]: a compiled adapter, a PEFT pair, or junk; damaged or not."""
    def named(default: str):
        return filenames.map(lambda f: default if f is None else f)

    compiled = st.tuples(st.sampled_from(["gen", "cls", "nan", "rank", "mor"]), blob_faults, named("a.safetensors"))
    compiled = compiled.map(lambda t: [("files", t[2], broken_blob(blobs[t[0]], t[1]))])
    pair = st.tuples(peft_config(json.loads(blobs["peft_config"])), blob_faults, st.booleans()).map(
        lambda t: [("files", "adapter_config.json", t[0]),
                   ("files", "adapter_model.safetensors", broken_blob(blobs["peft_weights"], t[1]))
                   ][::1 if t[2] else -1])
    names = mostly(st.just("files"), st.sampled_from(["file", "adapter_id", "labels", "", 'fi"les', "fïles"]))
    junk = st.lists(st.tuples(names, named("j.safetensors"), st.sampled_from(JUNK) | st.binary(max_size=64)),
                    max_size=9)
    return st.one_of(compiled, pair, junk)


labels = mostly(st.none(), st.sampled_from(['["neg", "pos"]', "neg,pos", "[]", "[1, 2]", '{"a": 1}', "[", ",",
                                            '["", "x"]', "x" * 70_000]) | hostile_text)
multipart_faults = mostly(st.none(), st.sampled_from(["wrong", "none", "unclosed", "json", "quoted", "long",
                                                      "empty"]))


def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: bytes, closed: bool) -> bytes:
    out = []
    for name, filename, data in parts:
        disposition = b'form-data; name="' + name.encode("utf-8", "surrogatepass") + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename.encode("utf-8", "surrogatepass") + b'"'
        out += [b"--" + boundary, b"Content-Disposition: " + disposition, b"", data]
    return b"\r\n".join(out + ([b"--" + boundary + b"--", b""] if closed else []))


def uploads(blobs: dict[str, bytes]):
    def build(t) -> Req:
        headers, adapter_id, files, label, id_last, fault = t
        fields = []
        if adapter_id is not None:
            fields.append(("adapter_id", None, adapter_id.encode("utf-8", "surrogatepass")))
        if label is not None:
            fields.append(("labels", None, label.encode("utf-8", "surrogatepass")))
        parts = files + fields if id_last else fields + files
        boundary = b"fuzz" + b"b" * (80 if fault == "long" else 8)
        body = multipart_body(parts, b"" if fault == "empty" else boundary, closed=fault != "unclosed")
        ctype = {"wrong": b"multipart/form-data; boundary=other", "none": b"multipart/form-data",
                 "json": b"application/json", "quoted": b'multipart/form-data; boundary="' + boundary + b'"',
                 "empty": b"multipart/form-data; boundary="}.get(fault,
                                                                 b"multipart/form-data; boundary=" + boundary)
        summary = f"multipart({[(n, f, len(d), d[:24]) for n, f, d in parts]}, fault={fault})"
        return Req("POST", "/v1/adapters", {**headers, "Content-Type": ctype}, body, STATUSES["upload"],
                   "adapter", summary=summary, route="POST /v1/adapters")

    def with_key(key: str):  # the key decides the namespace the upload lands in, hence which ids are safe
        return st.tuples(auth([key]), mostly(upload_ids(key), st.none(), odds=8), file_parts(blobs), labels,
                         st.booleans(), multipart_faults).map(build)

    return st.sampled_from([ADMIN, ADMIN, ADMIN_A, ADMIN_B, INFER_A]).flatmap(with_key)

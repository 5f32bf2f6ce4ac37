"""``rankserve adapters {push,list,rm,import-peft,inspect,export-peft}`` against a local store or a running server.

    rankserve adapters push ID FILE.safetensors    --store DIR [--base NAME]  |  --server URL [--api-key K]
    rankserve adapters import-peft ID PEFT_DIR     --store DIR --model NAME   |  --server URL (the server converts)
    rankserve adapters list [--owner O] [--json]
    rankserve adapters rm ID [--owner O]
    rankserve adapters inspect ID|FILE [--base NAME] [--owner O]
    rankserve adapters export-peft FILE.safetensors DIR --model NAME   (PEFT's format; not MoR)

``--store`` (a directory, or ``s3://BUCKET/PREFIX`` with the standard AWS variables) defaults to $RANKSERVE_STORE and ``--api-key`` to $RANKSERVE_API_KEY. Records and inspections
print as JSON on stdout; errors print on stderr with exit status 1 (2 for usage errors). Ids are namespaced
per tenant: ``--owner O`` on push/import-peft stores into tenant O's namespace, and on rm/inspect addresses
O's adapter (against a server: ``?owner=O``, for a global admin key); without it, the public adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

from adapters_store.format import AdapterFormatError, AdapterMeta, read_header
from adapters_store.peft_import import CONFIG, WEIGHTS
from adapters_store.store import AdapterStore, StoreError
from adapters_store.validate import Limits, validate_bytes

PEFT_FILES = (CONFIG, WEIGHTS)


class CliError(Exception):
    pass


def _client(args: argparse.Namespace):
    """An httpx client for --server (a seam the tests replace with an in-process app)."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.server.rstrip("/"), headers=headers, timeout=args.timeout)


def _http(args: argparse.Namespace, method: str, path: str, **kwargs) -> dict:
    with _client(args) as client:
        resp = client.request(method, path, **kwargs)
    try:
        body = resp.json()
    except ValueError:
        body = {"error": {"message": resp.text[:500]}}
    if resp.status_code // 100 != 2:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise CliError(f"HTTP {resp.status_code} from {args.server}{path}: {message or body}")
    return body


def _store(args: argparse.Namespace) -> AdapterStore:
    if not args.store:
        raise CliError("say where the adapters live: --store DIR (or $RANKSERVE_STORE) or --server URL")
    from adapters_store.locations import open_store

    return open_store(args.store)


def _base(name: str | None):
    if name is None:
        return None
    from adapters_store.basemodels import load_base

    return load_base(name)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def cmd_push(args: argparse.Namespace) -> None:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    if args.server:
        with path.open("rb") as f:
            _print(_http(args, "POST", "/v1/adapters", data={"adapter_id": args.id},
                         files=[("files", (path.name, f, "application/octet-stream"))]))
        return
    store = _store(args)
    with path.open("rb") as f:
        record = store.put_stream(args.id, iter(lambda: f.read(1 << 20), b""), owner=args.owner,
                                  base=_base(args.base))
    _print(record.to_dict())


def cmd_import_peft(args: argparse.Namespace) -> None:
    d = Path(args.dir)
    if args.server:
        missing = [n for n in PEFT_FILES if not (d / n).is_file()]
        if missing:
            raise CliError(f"{d} lacks {', '.join(missing)} (pickle .bin checkpoints are not uploaded)")
        handles = [(d / n).open("rb") for n in PEFT_FILES]
        try:
            data = {"adapter_id": args.id} | ({"labels": json.dumps(args.labels)} if args.labels else {})
            files = [("files", (n, h, "application/octet-stream")) for n, h in zip(PEFT_FILES, handles, strict=True)]
            _print(_http(args, "POST", "/v1/adapters", data=data, files=files))
        finally:
            for h in handles:
                h.close()
        return
    if not args.model:
        raise CliError("import-peft into a local store needs --model NAME (the base the adapter was trained on)")
    record = _store(args).put_peft(args.id, d, _base(args.model), owner=args.owner, labels=args.labels)
    _print(record.to_dict())


def cmd_list(args: argparse.Namespace) -> None:
    if args.server:
        records = _http(args, "GET", "/v1/adapters").get("data", [])
    else:
        records = [r.to_dict() for r in _store(args).list(owner=args.owner)]
    if args.json:
        _print(records)
        return
    print(f"{'ID':32} {'METHOD':8} {'TASK':9} {'RANKS':>9} {'BYTES':>11} OWNER")
    for r in records:
        ranks = list((r.get("ranks") or {}).values())
        span = f"{min(ranks)}-{max(ranks)}" if ranks and min(ranks) != max(ranks) else str(ranks[0] if ranks else 0)
        print(f"{r['id']:32} {r['method']:8} {r['task']:9} {span:>9} {r['size']:>11} {r.get('owner') or '-'}")


def _adapter_path(adapter_id: str, owner: str | None) -> str:
    return f"/v1/adapters/{quote(adapter_id, safe='')}" + (f"?owner={quote(owner, safe='')}" if owner else "")


def cmd_rm(args: argparse.Namespace) -> None:
    if args.server:
        _print(_http(args, "DELETE", _adapter_path(args.id, args.owner)))
        return
    _store(args).delete(args.id, owner=args.owner)
    _print({"id": args.id, "owner": args.owner, "deleted": True})


def inspect_file(path: Path, base_name: str | None) -> dict:
    """Header metadata, per-module ranks and tensor shapes, without loading tensors (unless --base)."""
    data = path.read_bytes()
    entries, header_meta = read_header(data, Limits().max_header_bytes)
    modules: dict[str, dict] = {}
    for name, entry in sorted(entries.items()):
        module, _, key = name.rpartition(".")
        modules.setdefault(module or name, {})[key] = {"shape": entry.get("shape"), "dtype": entry.get("dtype")}
    out: dict = {"file": str(path), "size": len(data), "digest": hashlib.sha256(data).hexdigest()}
    try:
        out["metadata"] = asdict(AdapterMeta.from_header(header_meta))
    except AdapterFormatError as e:
        out["metadata"], out["metadata_problems"] = header_meta, e.problems
    out["ranks"] = {m: t["lora_a"]["shape"][0] for m, t in modules.items() if "lora_a" in t}
    out["tensors"] = modules
    if base_name:
        validate_bytes(data, _base(base_name))  # raises, naming every problem
        out["valid_for"] = base_name
    return out


def cmd_inspect(args: argparse.Namespace) -> None:
    path = Path(args.target)
    if path.is_file():
        _print(inspect_file(path, args.base))
    elif args.server:
        _print(_http(args, "GET", _adapter_path(args.target, args.owner)))
    else:
        store = _store(args)
        out = store.get(args.target, owner=args.owner).to_dict()
        if args.base:
            store.load(args.target, base=_base(args.base), owner=args.owner)
            out["valid_for"] = args.base
        _print(out)


def cmd_export_peft(args: argparse.Namespace) -> None:
    from adapters_store.format import load_file
    from adapters_store.peft_export import export_peft

    config = export_peft(load_file(args.file), _base(args.model), args.dir)
    _print({"dir": args.dir, "use_dora": config["use_dora"], "r": config["r"],
            "modules": len(config["target_modules"]), "rank_pattern": len(config["rank_pattern"])})


def build_parser() -> argparse.ArgumentParser:
    where = argparse.ArgumentParser(add_help=False)
    g = where.add_argument_group("where the adapters live")
    g.add_argument("--store", help="local store directory (default $RANKSERVE_STORE)")
    g.add_argument("--server", help="URL of a running rankserve server")
    g.add_argument("--api-key", default=os.environ.get("RANKSERVE_API_KEY"), help="bearer key for --server")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds, for --server")
    parser = argparse.ArgumentParser(prog="rankserve adapters", description="manage stored adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", parents=[where], help="store a compiled .safetensors adapter")
    p.add_argument("id")
    p.add_argument("file")
    p.add_argument("--base", help="validate against this base model first (local store)")
    p.add_argument("--owner", help="tenant owning the adapter (local store)")
    p.set_defaults(fn=cmd_push)
    p = sub.add_parser("import-peft", parents=[where], help="convert and store a PEFT adapter directory")
    p.add_argument("id")
    p.add_argument("dir")
    p.add_argument("--model", help="the base model name or directory (local store)")
    p.add_argument("--labels", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="comma-separated class names of a mapped classification head")
    p.add_argument("--owner", help="tenant owning the adapter (local store)")
    p.set_defaults(fn=cmd_import_peft)
    p = sub.add_parser("list", parents=[where], help="list adapters")
    p.add_argument("--owner", help="only adapters visible to this tenant (local store)")
    p.add_argument("--json", action="store_true", help="print records as JSON")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("rm", parents=[where], help="delete an adapter")
    p.add_argument("id")
    p.add_argument("--owner", help="the tenant whose adapter it is (default: the public one)")
    p.set_defaults(fn=cmd_rm)
    p = sub.add_parser("inspect", parents=[where], help="print a record, or a file's metadata and ranks")
    p.add_argument("target", help="an adapter id, or a .safetensors file")
    p.add_argument("--base", help="also validate against this base model")
    p.add_argument("--owner", help="the tenant whose adapter it is (default: the public one)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("export-peft", help="write a compiled adapter as a PEFT directory (LoRA or DoRA; not MoR)")
    p.add_argument("file", help="a compiled .safetensors adapter")
    p.add_argument("dir", help="the PEFT directory to write (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on (name or directory)")
    p.set_defaults(fn=cmd_export_peft, store=None, server=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.server and args.store:
        print("error: give --store or --server, not both", file=sys.stderr)
        return 2
    if not args.server:
        args.store = args.store or os.environ.get("RANKSERVE_STORE")
    try:
        args.fn(args)
    except (CliError, StoreError, AdapterFormatError, OSError) as e:
        problems = getattr(e, "problems", None)
        print(f"error: {len(problems)} problem(s):" if problems else f"error: {e}", file=sys.stderr)
        for p in problems or []:
            print(f"  - {p}", file=sys.stderr)
        return 1
    except Exception as e:
        if type(e).__module__.startswith("httpx"):
            print(f"error: cannot reach {args.server}: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""rdcd serve: the lookup service over a reference store (rdcd.server)."""
from __future__ import annotations

import ipaddress
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a reference store over HTTP (match, add, remove; OpenAPI at /docs)",
                              description="API keys come from RDCD_API_KEYS or --api-keys-file: entries 'read:KEY' "
                                          "or 'write:KEY', one a line (the variable may also separate them by commas).")
    p.add_argument("--index", required=True, help="the store (rdcd index create)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-file", default=None)
    p.add_argument("--insecure-no-auth", action="store_true", help="no API keys (loopback addresses only)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (default: %(default)s MB)")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel-count limit per image (default: 50 million)")
    p.add_argument("--max-images", type=int, default=64, help="images or descriptors per request (default: %(default)s)")
    p.add_argument("--queue-size", type=int, default=64,
                   help="images waiting to be embedded before 503; at least --max-images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="most images embedded together")
    p.set_defaults(func=run)


def read_keys(text: str, where: str) -> tuple[list[str], list[str]]:
    """(read keys, write keys) from 'read:KEY' / 'write:KEY' entries; the keys themselves never appear in errors."""
    read, write = [], []
    for n, entry in enumerate(text.replace(",", "\n").splitlines(), 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        role, _, key = entry.partition(":")
        if role not in ("read", "write") or len(key) < 16:
            raise ValueError(f"{where}: entry {n} is not 'read:KEY' or 'write:KEY' with a key of 16+ characters")
        (read if role == "read" else write).append(key)
    return read, write


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    import uvicorn

    from ..server import SERVICE_MAX_PIXELS, ServiceConfig, create_app
    from ..store import ReferenceStore

    config = ServiceConfig(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                           max_pixels=args.max_pixels or SERVICE_MAX_PIXELS, queue_size=args.queue_size,
                           batch_size=args.batch_size, max_images=args.max_images)
    if args.api_keys_file:
        with open(args.api_keys_file, encoding="utf-8") as fh:
            config.read_keys, config.write_keys = read_keys(fh.read(), args.api_keys_file)
    elif os.environ.get("RDCD_API_KEYS"):
        config.read_keys, config.write_keys = read_keys(os.environ["RDCD_API_KEYS"], "RDCD_API_KEYS")
    if args.insecure_no_auth:
        if not is_loopback(args.host):
            raise ValueError(f"--insecure-no-auth is allowed on a loopback address only, not {args.host}")
        config.auth = False
    config.check()  # before the store and its model are loaded
    store = ReferenceStore.open(args.index)
    app = create_app(store, config)
    print(f"rdcd: serving {args.index} ({len(store)} references, {store.record['rdcd.model']}) on "
          f"http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

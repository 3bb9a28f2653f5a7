"""The `convoy` command: run the embedded service, the API or a worker, migrate, manage
tokens."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from convoy.settings import Settings


def _settings() -> Settings:
    return Settings()


def cmd_run(args: argparse.Namespace) -> int:
    from cli.embedded import run

    return run(_settings())


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    # Flags against slow clients override the settings; they go into the
    # environment too, which the processes of `--workers N` read.
    for flag, env in (("header_timeout", "CONVOY_HEADER_TIMEOUT_SECONDS"),
                      ("keep_alive", "CONVOY_KEEP_ALIVE_SECONDS"),
                      ("max_connections", "CONVOY_MAX_CONNECTIONS")):
        if getattr(args, flag) is not None:
            os.environ[env] = str(getattr(args, flag))
    settings = _settings()
    if args.migrate:
        from db.migrate import upgrade

        upgrade(settings.database_url)
    from api.server import raise_nofile_limit, serve_options

    raise_nofile_limit()
    uvicorn.run("api.app:app_factory", factory=True, host=args.host or settings.host,
                port=args.port or settings.port, workers=args.workers, log_level="info",
                **serve_options(settings))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from cli.embedded import worker_command

    settings = _settings()
    gpu = settings.worker_gpu_queue
    if gpu is None:  # a GPU worker also takes the jobs that ask for CUDA
        import torch

        gpu = torch.cuda.is_available()
    cmd = worker_command(settings, name=args.name, gpu=gpu)
    os.execv(cmd[0], cmd)


def cmd_db(args: argparse.Namespace) -> int:
    from db.migrate import downgrade, upgrade

    settings = _settings()
    if args.action == "upgrade":
        upgrade(settings.database_url)
    else:
        downgrade(settings.database_url, args.revision)
    print(f"database {args.action} done")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from api.auth import check_tenant, create_token
    from db import tokens
    from db.session import session_scope

    settings = _settings()
    if args.action == "create":
        try:
            check_tenant(args.tenant)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    if args.action == "revoke" and not args.id:
        print("usage: convoy token revoke ID (see `convoy token list`)", file=sys.stderr)
        return 2
    with session_scope(settings.database_url) as session:
        if args.action == "create":
            token, secret = create_token(session, tenant=args.tenant,
                                         name=(args.name or "")[:128], is_admin=args.admin,
                                         scopes=tuple(args.scope or ()))
            # The secret goes to stdout alone on its line (scripts read it); it is not stored.
            print(f"id {token.id} tenant {token.tenant}\n{secret}")
        elif args.action == "revoke":
            try:
                revoked = tokens.revoke(session, token_id=args.id)
            except tokens.LastAdmin as exc:
                print(exc, file=sys.stderr)
                return 1
            if revoked is None:
                print(f"no token {args.id}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
        else:
            for t in tokens.oldest_first(session):
                state = "revoked" if t.revoked_at else "active"
                print(f"{t.id}  {t.tenant:<16} {'admin' if t.is_admin else 'user ':<5} {state}"
                      f"  {t.name}")
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    from cli.artifacts import copy_root
    from convoy.artifacts import LocalStore, StoreUnavailable, open_store

    settings = _settings()
    source = args.source or settings.artifact_root
    if source.startswith("s3://") or not args.to.startswith("s3://"):
        print("usage: convoy artifacts copy --to s3://BUCKET/PREFIX [--from LOCAL_ROOT] "
              "(copies a local artifact root into a bucket)", file=sys.stderr)
        return 2
    if not os.path.isdir(source):
        print(f"no artifact folder at {source}", file=sys.stderr)
        return 1
    try:
        dst = open_store(args.to, settings)
    except ValueError as exc:  # no bucket, a `..` in the prefix: a usage error, no traceback
        print(f"--to {args.to}: {exc}", file=sys.stderr)
        return 2
    try:
        dst.check()
        report = copy_root(LocalStore(Path(source)), dst)
    except StoreUnavailable as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 1
    print(f"{report.copied} copied ({report.bytes_copied} bytes), {report.skipped} already "
          f"there, {report.ignored} other files left alone; {source} -> {dst.name}. Point "
          f"CONVOY_ARTIFACT_ROOT at {dst.name} on the API and every worker.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # submit, jobs, status, cancel, logs, fetch, ...; numbers in ASCII digits only
    from client.commands import add_commands, ascii_float, ascii_int

    parser = argparse.ArgumentParser(prog="convoy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="embedded mode: API + worker, no servers").set_defaults(
        func=cmd_run)
    api = sub.add_parser("api", help="serve the API")
    api.add_argument("--host")
    api.add_argument("--port", type=ascii_int)
    api.add_argument("--workers", type=ascii_int, default=1)
    api.add_argument("--migrate", action="store_true", help="run migrations first")
    api.add_argument("--header-timeout", type=ascii_float, metavar="SECONDS",
                     help="close a connection that has not sent a request's headers this long "
                          "after opening or after its last response (default: "
                          "CONVOY_HEADER_TIMEOUT_SECONDS, 10)")
    api.add_argument("--keep-alive", type=ascii_int, metavar="SECONDS",
                     help="close idle keep-alive connections after this long (default: "
                          "CONVOY_KEEP_ALIVE_SECONDS, 5)")
    api.add_argument("--max-connections", type=ascii_int, metavar="N",
                     help="close new connections past N open ones (default: "
                          "CONVOY_MAX_CONNECTIONS, 2048)")
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run a Celery worker (solo pool, one job at a time)")
    worker.add_argument("--name", default="worker")
    worker.set_defaults(func=cmd_worker)
    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("revision", nargs="?", default="base")
    db.set_defaults(func=cmd_db)
    token = sub.add_parser("token", help="API tokens")
    token.add_argument("action", choices=["create", "revoke", "list"])
    token.add_argument("id", nargs="?")
    token.add_argument("--tenant", default="default")
    token.add_argument("--name")
    token.add_argument("--admin", action="store_true")
    token.add_argument("--scope", action="append", choices=["metrics"],
                       help="an extra right of a non-admin token: `metrics` may scrape /metrics")
    token.set_defaults(func=cmd_token)
    arts = sub.add_parser("artifacts", help="the artifact store")
    arts.add_argument("action", choices=["copy"])
    arts.add_argument("--to", required=True, metavar="s3://BUCKET/PREFIX",
                      help="the bucket to copy the local artifact root into (same keys)")
    arts.add_argument("--from", dest="source", metavar="DIR",
                      help="the local artifact root (default: CONVOY_ARTIFACT_ROOT)")
    arts.set_defaults(func=cmd_artifacts)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

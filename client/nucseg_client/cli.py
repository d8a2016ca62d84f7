"""The ``nucseg`` subcommands that talk to a server: ``submit``, ``status``, ``list``, ``cancel``, ``download``.

The server and key come from ``--url``/``--api-key`` or ``NUCSEG_URL``/``NUCSEG_API_KEY``
(default ``http://127.0.0.1:8000``). Output is a readable table, or JSON with ``--json``.

Exit codes:

- 0 success (``status`` and ``list`` report any job state with 0)
- 1 the job failed or was cancelled (``submit --wait``, ``download``)
- 2 bad usage: bad flags, a missing file, a request the server refused as invalid (4xx), or
  ``download`` of an unfinished job without ``--wait``
- 3 the server failed or could not be reached (5xx, 429, connection error, timeout)

Run it as ``nucseg-client``, ``python -m nucseg_client``, or hook it into another argparse
program with ``add_client_commands(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nucseg_client._client import Client, Job
from nucseg_client._config import Timeout
from nucseg_client._errors import ApiError, ConnectError, JobFailed, NucsegError, TimeoutException

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SERVER = 0, 1, 2, 3
DEFAULT_URL = "http://127.0.0.1:8000"
Handler = Callable[[Client, argparse.Namespace], int]


class UsageError(Exception):
    """A bad flag value found after parsing (exit 2)."""


def add_client_commands(subparsers: Any) -> None:
    """Add ``submit``, ``status``, ``list``, ``cancel`` and ``download`` to an argparse subparsers object.

    Example::

        parser = argparse.ArgumentParser(prog="nucseg")
        add_client_commands(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args()
        sys.exit(args.func(args))
    """
    common = _common_parser()
    _add_submit(subparsers, common)
    p = subparsers.add_parser("status", parents=[common], help="show one job")
    p.add_argument("job", help="job id")
    p.set_defaults(func=_runner(_status))
    p = subparsers.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20, help="show at most N jobs (0: all; default 20)")
    p.set_defaults(func=_runner(_list))
    p = subparsers.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    p.add_argument("job", help="job id")
    p.set_defaults(func=_runner(_cancel))
    p = subparsers.add_parser("download", parents=[common], help="download a job's result files")
    p.add_argument("job", help="job id")
    p.add_argument("--out", type=Path, default=None, help="folder for the files (default: ./<job id>)")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish first")
    p.set_defaults(func=_runner(_download))


def build_parser(prog: str = "nucseg-client") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="talk to a nucseg server",
                                     epilog="exit codes: 0 ok, 1 job failed, 2 usage, 3 server or connection")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nucseg-client``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


# ---------------------------------------------------------------- arguments


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("server")
    g.add_argument("--url", default=None, help=f"server URL (default: $NUCSEG_URL or {DEFAULT_URL})")
    g.add_argument("--api-key", default=None, help="API key (default: $NUCSEG_API_KEY)")
    g.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables; print only job ids")
    return common


def _add_submit(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("submit", parents=[common], help="upload a slide (or name one on the server)")
    p.add_argument("slide", help="slide file to upload (or, with --path, a path under the server's slide root)")
    p.add_argument("--path", action="store_true", help="SLIDE is on the server's slide root: do not upload")
    p.add_argument("--wait", action="store_true", help="wait for the job, then download its results")
    p.add_argument("--out", type=Path, default=None, help="results folder (implies --wait; default ./<job id>)")
    p.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after S seconds")
    p.add_argument("--idempotency-key", default=None, help="resubmitting with the same key returns the same job")
    p.add_argument("--metadata", default=None, help='JSON object stored with the job, e.g. \'{"case": "S-042"}\'')
    p.add_argument("--callback-url", default=None, metavar="URL",
                   help="the server POSTs a signed webhook here when the job ends")
    o = p.add_argument_group("engine options (default: the server's)")
    o.add_argument("--options", default=None, help="JSON object of job options; the flags below override it")
    o.add_argument("--tile", type=int, dest="tile_size", help="tile size in px (multiple of 32)")
    o.add_argument("--overlap", type=int, help="tile overlap in px")
    o.add_argument("--block", type=int, dest="block_size", help="output block size in px")
    o.add_argument("--batch", type=int, dest="batch_size", help="tiles per forward pass")
    o.add_argument("--tissue", action=argparse.BooleanOptionalAction, default=None, help="skip tiles without tissue")
    o.add_argument("--mpp", type=float, help="µm/px of level 0 when the slide does not say")
    o.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each tile over its four flips (about 4x the network's time)")
    o.add_argument("--stain", help="normalise colours to the training images' first: none, reinhard, macenko")
    o.add_argument("--outputs", help="comma list of masks,overlays,nuclei")
    p.set_defaults(func=_runner(_submit))


def _json_object(flag: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _options(args: argparse.Namespace) -> dict[str, Any] | None:
    options = _json_object("--options", args.options)
    flags = {k: getattr(args, k) for k in ("tile_size", "overlap", "block_size", "batch_size", "tissue", "mpp", "tta",
                                       "stain")}
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.outputs is not None:
        flags["outputs"] = [o.strip() for o in args.outputs.split(",") if o.strip()]
    return {**(options or {}), **flags} or None


# ---------------------------------------------------------------- running


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            with _connect(args) as client:
                return handler(client, args)
        except UsageError as exc:
            return _fail(args, EXIT_USAGE, "usage", str(exc))
        except JobFailed as exc:
            return _fail(args, EXIT_FAILED, exc.code, str(exc), job=exc.job.data if exc.job else None)
        except ApiError as exc:
            code = EXIT_USAGE if 400 <= exc.status < 500 and exc.status not in (408, 429) else EXIT_SERVER
            return _fail(args, code, exc.code, str(exc))
        except ConnectError as exc:
            return _fail(args, EXIT_SERVER, "connection_error", str(exc))
        except TimeoutException as exc:
            return _fail(args, EXIT_SERVER, "timeout", str(exc))
        except NucsegError as exc:
            return _fail(args, EXIT_SERVER, "error", str(exc))
        except BrokenPipeError:  # `nucseg list | head`: the reader has gone; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        except (OSError, ValueError, TypeError) as exc:  # a missing slide, a bad URL
            return _fail(args, EXIT_USAGE, "usage", str(exc))
        except KeyboardInterrupt:
            print("nucseg: interrupted (a submitted job keeps running on the server)", file=sys.stderr)
            return 130

    return run


@contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Client]:
    url = args.url or os.environ.get("NUCSEG_URL") or DEFAULT_URL
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    with Client(url, api_key=args.api_key, timeout=Timeout(args.timeout, connect=min(args.timeout, 10.0))) as c:
        yield c


def _fail(args: argparse.Namespace, code: int, error_code: str, message: str,
          job: dict[str, Any] | None = None) -> int:
    if getattr(args, "json", False):
        body: dict[str, Any] = {"error": {"code": error_code, "message": message}}
        if job is not None:
            body["job"] = job
        print(json.dumps(body, indent=2))
    print(f"nucseg: error: {message}", file=sys.stderr)
    return code


def _bars(args: argparse.Namespace) -> bool:
    return not (args.quiet or args.json)


# ---------------------------------------------------------------- commands


def _submit(client: Client, args: argparse.Namespace) -> int:
    options, metadata = _options(args), _json_object("--metadata", args.metadata)
    if args.path:
        job = client.submit_path(args.slide, options=options, metadata=metadata,
                                 idempotency_key=args.idempotency_key, callback_url=args.callback_url)
    else:
        job = client.submit(args.slide, options=options, metadata=metadata, idempotency_key=args.idempotency_key,
                            progress=_bars(args), callback_url=args.callback_url)
    if not (args.wait or args.out):
        return _show_job(job, args)
    if args.quiet and not args.json:
        print(job.id, flush=True)
    elif not args.json:
        print(f"submitted job {job.id}; waiting for it", file=sys.stderr, flush=True)
    try:
        job.wait(timeout=args.wait_timeout, progress=_bars(args))
    except TimeoutException as exc:
        raise TimeoutException(f"{exc}; it keeps running: nucseg status {job.id}") from exc
    files = job.download_all(args.out or Path(job.id), progress=_bars(args))
    return _show_done(job, files, args)


def _status(client: Client, args: argparse.Namespace) -> int:
    return _show_job(client.job(args.job), args)


def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.job).cancel()
    if not args.json and not args.quiet:
        print(f"job {job.id} already finished ({job.status}); nothing to cancel"
              if job.done and job.status != "cancelled" else f"cancel requested for job {job.id}")
    return _show_job(job, args)


def _list(client: Client, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit must be >= 0, got {args.limit}")
    jobs: list[Job] = []
    for job in client.jobs(status=args.status, page_size=min(args.limit or 100, 100)):
        jobs.append(job)
        if args.limit and len(jobs) >= args.limit:
            break
    if args.json:
        print(json.dumps({"jobs": [j.data for j in jobs]}, indent=2))
        return EXIT_OK
    rows = [[j.id, j.status, _progress(j), _time(j.data.get("created_at")), str(j.slide.get("name", ""))]
            for j in jobs]
    print(_table(["ID", "STATUS", "PROGRESS", "CREATED", "SLIDE"], rows) if rows else "no jobs")
    return EXIT_OK


def _download(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.job)
    if args.wait:
        job.wait(progress=_bars(args))
    elif not job.done:
        raise UsageError(f"job {job.id} is {job.status}; its results exist once it has succeeded (add --wait)")
    files = job.download_all(args.out or Path(job.id), progress=_bars(args))
    return _show_done(job, files, args)


# ---------------------------------------------------------------- output


def _show_job(job: Job, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(job.data, indent=2))
    elif args.quiet:
        print(job.id)
    else:
        print(_kv(_job_rows(job)))
    return EXIT_OK


def _show_done(job: Job, files: list[Path], args: argparse.Namespace) -> int:
    sizes = {f.name: f.size_bytes for f in job.results}
    if args.json:
        listed = [{"name": p.name, "size_bytes": sizes.get(p.name), "path": str(p)} for p in files]
        print(json.dumps({"job": job.data, "files": listed}, indent=2))
    elif not args.quiet:
        print(_kv(_job_rows(job)))
        print()
        print(_table(["FILE", "SIZE", "PATH"], [[p.name, _size(sizes.get(p.name)), str(p)] for p in files]))
    return EXIT_OK


def _job_rows(job: Job) -> list[tuple[str, str]]:
    slide = job.slide
    dims = f", {slide['width']}x{slide['height']} px" if slide.get("width") else ""
    rows = [("id", job.id), ("status", job.status), ("progress", _progress(job)),
            ("slide", f"{slide.get('name', '?')} ({slide.get('source', '?')}{dims})"),
            ("created", _time(job.data.get("created_at"))), ("finished", _time(job.data.get("finished_at")))]
    if job.error is not None:
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    if job.results:
        rows.append(("results", f"{len(job.results)} files, {_size(sum(f.size_bytes for f in job.results))}"))
    if job.metadata:
        rows.append(("metadata", json.dumps(job.metadata)))
    if (hook := job.webhook) is not None:
        tries = f", {hook.attempt_count} attempt{'s' if hook.attempt_count != 1 else ''}" if hook.attempt_count else ""
        rows.append(("webhook", f"{hook.status}{tries} -> {hook.url}"))
    if job.expires_at is not None:
        rows.append(("expires", _time(job.data.get("expires_at"))))
    return rows


def _progress(job: Job) -> str:
    p = job.progress
    return f"{p.stage} {p.done}/{p.total}" if p.total else p.stage


def _time(value: Any) -> str:
    return str(value).replace("T", " ")[:19] if value else "-"


def _size(n: int | None) -> str:
    if n is None or n < 0:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _kv(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


if __name__ == "__main__":
    sys.exit(main())

"""nucseg-client: submit H&E slides to a nucseg server, wait for the jobs, download the results.

Ten lines for a LIMS::

    from nucseg_client import Client, JobFailed

    with Client("http://nucseg:8000") as client:
        job = client.submit("S-042.svs", metadata={"case": "S-042"}, idempotency_key="S-042")
        try:
            job.wait(timeout=3600)
        except JobFailed as exc:
            print("failed:", exc.code, exc.message)
        else:
            job.download_all("results/S-042")

``AsyncClient`` has the same surface with ``await`` (and ``async for job in client.jobs()``).

Errors: every error raised on purpose derives from ``NucsegError``::

    NucsegError
    ├── ApiError(status, code, message)  the server answered 4xx/5xx (or an unreadable body, code
    │                                    'invalid_response'); code and message are the server's
    ├── JobFailed(code, message)         wait() saw the job fail (the server's code) or be cancelled
    │                                    (code 'cancelled'); .job is the Job
    ├── TimeoutException                 a network timeout, or wait(timeout=...) ran out; also a
    │                                    builtin TimeoutError (so ``except TimeoutError`` catches it)
    ├── ConnectError                     the server could not be reached or the connection broke;
    │                                    also a builtin ConnectionError
    └── WebhookVerificationError         verify_webhook() refused a delivery (missing header, stale
                                         timestamp, bad signature)

Bad arguments raise ``ValueError``/``TypeError`` naming the value, and a missing slide file
``FileNotFoundError``. Requests that may be repeated are retried with back-off before an error
is raised: GET/HEAD on 429/5xx and broken connections, POST only with an ``idempotency_key``,
and any request whose connection could not be opened (see ``Retries``).

Webhooks: ``submit(..., callback_url=...)`` makes the server POST a signed event to that URL when the
job ends; a receiver checks it with ``verify_webhook(secret, headers, raw_body)``, which returns the
event (see ``nucseg_client.webhooks``). ``job.webhook`` shows the delivery, ``job.expires_at`` when
retention deletes the finished job.
"""

from nucseg_client._async_client import AsyncClient, AsyncJob
from nucseg_client._client import Client, Job
from nucseg_client._config import Retries, Timeout
from nucseg_client._errors import (
    ApiError,
    ConnectError,
    JobFailed,
    NucsegError,
    TimeoutException,
    WebhookVerificationError,
)
from nucseg_client._models import JobError, Model, Progress, ResultFile, Webhook, WebhookAttempt
from nucseg_client._version import __version__
from nucseg_client.webhooks import verify_webhook

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "ConnectError",
    "Job",
    "JobError",
    "JobFailed",
    "Model",
    "NucsegError",
    "Progress",
    "ResultFile",
    "Retries",
    "Timeout",
    "TimeoutException",
    "Webhook",
    "WebhookAttempt",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]

# The names of 0.1.0, which shadowed the builtins; kept importable, with a warning, until 0.2.
_RENAMED = {"TimeoutError": "TimeoutException", "ConnectionError": "ConnectError"}


def __getattr__(name: str) -> type[NucsegError]:
    if name in _RENAMED:
        import warnings

        warnings.warn(f"nucseg_client.{name} is now {_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

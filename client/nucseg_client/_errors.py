"""The client's error tree (see the package docstring for when each is raised)."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nucseg_client._job import JobBase


class NucsegError(Exception):
    """Base class of every error this package raises on purpose.

    Example::

        try:
            job = client.submit("slide.svs")
        except NucsegError as exc:
            print(f"nucseg: {exc}")
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ApiError(NucsegError):
    """The server answered with an error status; ``code`` and ``message`` are the server's own.

    ``status`` is the HTTP status, ``details`` any extra fields of the error body (for instance
    ``valid_names``), and ``retry_after`` the ``Retry-After`` header in seconds, if any.

    Example::

        try:
            client.job("0" * 32)
        except ApiError as exc:
            assert (exc.status, exc.code) == (404, "job_not_found")
    """

    def __init__(self, status: int, code: str, message: str, *, method: str | None = None,
                 url: str | None = None, details: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code
        self.method, self.url = method, url
        self.details = dict(details or {})
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" ({self.method} {self.url})" if self.method and self.url else ""
        hint = ("; check the API key (api_key=, --api-key or $NUCSEG_API_KEY)" if self.status == 401 else "")
        return f"{self.status} {self.code}: {self.message}{where}{hint}"

    def __repr__(self) -> str:
        return f"ApiError(status={self.status}, code={self.code!r}, message={self.message!r})"


class JobFailed(NucsegError):
    """A job ended ``failed`` (``code``/``message`` from the server) or ``cancelled`` (code ``cancelled``).

    Example::

        try:
            job.wait()
        except JobFailed as exc:
            print(exc.code, exc.message, exc.job.id)
    """

    def __init__(self, code: str, message: str, *, job: JobBase | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.job = job

    def __str__(self) -> str:
        where = f"job {self.job.id} " if self.job is not None else ""
        return f"{where}{self.code}: {self.message}"


class TimeoutException(NucsegError, builtins.TimeoutError):
    """A network operation or ``Job.wait(timeout=...)`` took too long (also a builtin ``TimeoutError``).

    Example::

        try:
            job.wait(timeout=600)
        except TimeoutException:
            job.cancel()
    """

    def __init__(self, message: str) -> None:
        NucsegError.__init__(self, message)


class ConnectError(NucsegError, builtins.ConnectionError):
    """The server could not be reached, or the connection broke (also a builtin ``ConnectionError``).

    Example::

        try:
            client.models()
        except ConnectError as exc:
            print(f"is the service up? {exc}")
    """

    def __init__(self, message: str) -> None:
        NucsegError.__init__(self, message)


class WebhookVerificationError(NucsegError):
    """``verify_webhook`` refused a delivery: a missing header, a timestamp outside the tolerance, no
    matching signature, or a body that is not a JSON object. Answer the sender with a 4xx.

    Example::

        try:
            event = verify_webhook(secret, request.headers, body)
        except WebhookVerificationError as exc:
            return Response(status_code=400, content=str(exc))
    """

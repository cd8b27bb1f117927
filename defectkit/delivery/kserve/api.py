"""Plain HTTPS calls to the Kubernetes API server, with backoff, and its refusals as errors that say what to do.

Requests retry with backoff on connection errors, 429 and 5xx, and on 409 Conflict
where the change can be re-made (merge patches; read-modify-write cycles reread).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping

import requests

from defectkit.retry import TRANSIENT_HTTP_STATUS, RetryPolicy, retry, retry_after_s

log = logging.getLogger(__name__)


class KubeApiError(RuntimeError):
    """The Kubernetes API refused a request; ``status`` and ``reason`` come from its Status object."""

    def __init__(self, status: int, reason: str, message: str, what: str, retry_after_s: float = 0.0) -> None:
        self.status = status
        self.reason = reason
        self.api_message = message
        self.retry_after_s = retry_after_s
        hint = {
            401: " Check the bearer token (or kubeconfig credentials).",
            403: " Grant the caller, in the service's namespace: get, create and patch on "
                 "inferenceservices.serving.kserve.io; get, create and update on configmaps (the rollout state); "
                 "get on httproutes.gateway.networking.k8s.io (Standard mode); and get on the configmap "
                 "inferenceservice-config in KServe's namespace and on the inferenceservices CRD.",
            404: " Check the namespace and name; a delivery creates a missing InferenceService itself when given "
                 "the serve image.",
        }.get(status, "")
        super().__init__(f"{what}: HTTP {status} {reason}: {message}.{hint}")


class KubeApi:
    """Plain HTTPS calls to a Kubernetes API server: base URL, bearer token, CA bundle."""

    def __init__(
        self,
        api_url: str,
        *,
        token: str | None = None,
        authorization: Callable[[], str | None] | None = None,
        verify: bool | str = True,
        client_cert: tuple[str, str] | None = None,
        timeout_s: float = 15.0,
        retry_policy: RetryPolicy = RetryPolicy(attempts=5, initial_delay_s=0.5),
    ) -> None:
        """``verify`` is True (system CAs), False, or the path of the cluster's CA bundle.

        ``authorization`` returns the whole Authorization header value on each request, so
        short-lived tokens (kubeconfig exec plugins, projected service account tokens) refresh.
        """
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"Kubernetes API URL {api_url!r} must start with https:// (or http:// for a local proxy)")
        if token is not None and authorization is not None:
            raise ValueError("pass either token or authorization, not both")
        self.api_url = api_url.rstrip("/")
        self._authorization = authorization or ((lambda: f"Bearer {token}") if token else (lambda: None))
        self.timeout_s = timeout_s
        self.retry_policy = retry_policy
        self._session = requests.Session()
        self._session.verify = verify
        if client_cert is not None:
            self._session.cert = client_cert

    @classmethod
    def from_kubeconfig(cls, config_file: str | None = None, context: str | None = None, **kwargs: Any) -> KubeApi:
        """Credentials from a kubeconfig (``$KUBECONFIG``, ``~/.kube/config``), or in-cluster ones inside a pod."""
        from kubernetes import config as kube_config
        from kubernetes.client import Configuration

        configuration = Configuration()
        try:
            kube_config.load_kube_config(config_file=config_file, context=context, client_configuration=configuration)
        except kube_config.ConfigException:
            if config_file or context:
                raise
            kube_config.load_incluster_config(client_configuration=configuration)
        verify: bool | str = (configuration.ssl_ca_cert or True) if configuration.verify_ssl else False
        cert = (configuration.cert_file, configuration.key_file) if configuration.cert_file else None
        return cls(
            configuration.host,
            authorization=lambda: configuration.get_api_key_with_prefix("authorization"),
            verify=verify,
            client_cert=cert,
            **kwargs,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        retry_conflict: bool = False,
    ) -> dict[str, Any]:
        """The decoded JSON answer of ``method path``; a refusal raises KubeApiError."""
        what = f"{method} {path}"
        retry_status = TRANSIENT_HTTP_STATUS | ({409} if retry_conflict else set())
        data = None if body is None else json.dumps(body).encode()

        def send() -> dict[str, Any]:
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            authorization = self._authorization()
            if authorization:
                headers["Authorization"] = authorization
            response = self._session.request(
                method, self.api_url + path, data=data, headers=headers, params=params, timeout=self.timeout_s
            )
            for warning in response.headers.get("Warning", "").split(", "):
                if warning:
                    log.warning("Kubernetes API warning on %s: %s", what, warning)
            if response.ok:
                return response.json()
            raise self._error(response, what)

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, KubeApiError):
                return exc.status in retry_status
            return isinstance(exc, (requests.ConnectionError, requests.Timeout))

        return retry(send, what, self.retry_policy, transient=transient)

    @staticmethod
    def _error(response: requests.Response, what: str) -> KubeApiError:
        try:
            status = response.json()
        except ValueError:
            status = {}
        if not isinstance(status, dict):
            status = {}
        return KubeApiError(
            response.status_code,
            status.get("reason") or response.reason or "",
            status.get("message") or response.text[:300],
            what,
            retry_after_s(response.headers),
        )

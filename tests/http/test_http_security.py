"""The HTTP API's security is gRPC's: the same bearer tokens and certificates; CORS for other origins."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import RunningServer
from tests.security.certs import PKI, make_pki

TOKEN = "http-test-token-0123456789"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"{TOKEN}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def auth_server(start_server: Callable[..., RunningServer], token_file: Path) -> RunningServer:
    return start_server(scope="module", http_port=0, auth_token_file=str(token_file))


def _openai(server: RunningServer, token: str, **kwargs: object) -> openai.OpenAI:
    base_url = f"http://127.0.0.1:{server.server.http_port}/v1"
    return openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60, **kwargs)  # type: ignore[arg-type]


def test_without_a_valid_token_the_api_answers_401(auth_server: RunningServer) -> None:
    before = auth_server.sample("textgen_requests_total", {"code": "UNAUTHENTICATED", "protocol": "http"})
    with _openai(auth_server, "wrong-token") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.completions.create(model="tiny", prompt="The ", max_tokens=3)
        assert caught.value.status_code == 401 and "not valid" in caught.value.message
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    assert auth_server.sample("textgen_requests_total", {"code": "UNAUTHENTICATED", "protocol": "http"}) == before + 2
    with _openai(auth_server, TOKEN) as client:
        assert client.completions.create(model="tiny", prompt="The ", max_tokens=3).usage.completion_tokens == 3  # type: ignore[union-attr]


def test_the_page_and_health_need_no_token(auth_server: RunningServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", auth_server.server.http_port, timeout=30)
    for path in ("/", "/health"):
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, path
    conn.request("POST", "/v1/completions", body=b"{}", headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
    assert "Authorization: Bearer" in json.loads(response.read())["error"]["message"]


@pytest.fixture
def mtls_server(start_server: Callable[..., RunningServer], pki: PKI) -> RunningServer:
    return start_server(
        scope="module",
        http_port=0,
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca.cert),
    )


def _context(pki: PKI, client: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client:
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return context


def test_the_http_port_speaks_tls_with_the_grpc_certificates(mtls_server: RunningServer, pki: PKI) -> None:
    port = mtls_server.server.http_port
    with httpx.Client(verify=_context(pki, client=True)) as http_client:
        with openai.OpenAI(
            base_url=f"https://localhost:{port}/v1", api_key="x", http_client=http_client, max_retries=0
        ) as client:
            assert client.completions.create(model="tiny", prompt="The ", max_tokens=4).usage.completion_tokens == 4  # type: ignore[union-attr]
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        plain.request("GET", "/health")
        plain.getresponse().read()
    without_cert = http.client.HTTPSConnection("localhost", port, timeout=10, context=_context(pki, client=False))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        without_cert.request("GET", "/health")
        without_cert.getresponse().read()


@pytest.fixture
def cors_server(start_server: Callable[..., RunningServer]) -> Iterator[RunningServer]:
    yield start_server(scope="module", http_port=0, cors_allow_origin="https://app.example.com")


def test_cors_allows_only_the_configured_origin(cors_server: RunningServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", cors_server.server.http_port, timeout=30)
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    conn.request("OPTIONS", "/v1/completions", headers=preflight)
    response = conn.getresponse()
    response.read()
    assert response.status == 204
    assert response.getheader("Access-Control-Allow-Origin") == "https://app.example.com"
    assert "Authorization" in (response.getheader("Access-Control-Allow-Headers") or "")
    body = json.dumps({"prompt": "The ", "max_tokens": 2}).encode()
    for origin, allowed in (("https://app.example.com", True), ("https://evil.example.com", False)):
        conn.request(
            "POST", "/v1/completions", body=body, headers={"Content-Type": "application/json", "Origin": origin}
        )
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert (response.getheader("Access-Control-Allow-Origin") == origin) is allowed

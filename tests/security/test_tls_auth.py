"""TLS, mTLS and bearer tokens against a real server on port 0 with certificates made in the test."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api import textgen_pb2, textgen_pb2_grpc
from service.client import TextGenClient, build_request
from service.client import main as generate_main
from service.tls import channel_credentials
from tests.helpers import RunningServer
from tests.security.certs import PKI, make_pki

TOKEN = "s3cret-token-for-tests"
OTHER_TOKEN = "rotated-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"# serving tokens\n\n{TOKEN}\n", encoding="utf-8")
    return path


@pytest.fixture
def mtls_server(start_server: Callable[..., RunningServer], pki: PKI, token_file: Path) -> RunningServer:
    """One mTLS + token server (plaintext health port) shared by the module's tests."""
    return start_server(
        scope="module",
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca.cert),
        auth_token_file=str(token_file),
        health_port=0,
    )


def _mtls_channel(server: RunningServer, pki: PKI, *, cert: bool = True, token: str | None = None) -> grpc.Channel:
    credentials = channel_credentials(
        str(pki.ca.cert),
        str(pki.client.cert) if cert else None,
        str(pki.client.key) if cert else None,
        token=token,
    )
    return grpc.secure_channel(server.target, credentials)


def _health(channel: grpc.Channel, timeout: float = 10.0) -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return int(response.status)


def _complete(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] | None = None
) -> textgen_pb2.GenerateResponse:
    stub = textgen_pb2_grpc.TextGenerationStub(channel)
    response: textgen_pb2.GenerateResponse = stub.Complete(
        build_request("The ", max_tokens=4, seed=1), timeout=30, metadata=metadata
    )
    return response


def test_plaintext_is_refused_on_the_tls_port(mtls_server: RunningServer) -> None:
    with grpc.insecure_channel(mtls_server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _health(channel, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_without_a_client_certificate_is_refused(mtls_server: RunningServer, pki: PKI) -> None:
    with _mtls_channel(mtls_server, pki, cert=False, token=TOKEN) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _complete(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(mtls_server: RunningServer, pki: PKI) -> None:
    credentials = channel_credentials(str(pki.ca.cert), str(pki.rogue_client.cert), str(pki.rogue_client.key), TOKEN)
    with grpc.secure_channel(mtls_server.target, credentials) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _complete(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_without_token_is_unauthenticated(mtls_server: RunningServer, pki: PKI) -> None:
    refused_before = mtls_server.sample("textgen_requests_total", {"code": "UNAUTHENTICATED"})
    with _mtls_channel(mtls_server, pki) as channel:
        for call in (
            lambda: _complete(channel),
            lambda: list(textgen_pb2_grpc.TextGenerationStub(channel).Generate(build_request("a", max_tokens=2))),
            lambda: textgen_pb2_grpc.TextGenerationStub(channel).ListModels(textgen_pb2.ListModelsRequest()),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
    # Refusals are counted (an alert can watch for token guessing), under the "unresolved" model label.
    labels = {"code": "UNAUTHENTICATED", "model": "unresolved"}
    assert mtls_server.sample("textgen_requests_total", labels) == refused_before + 3


def test_wrong_token_is_unauthenticated_and_never_echoed(mtls_server: RunningServer, pki: PKI) -> None:
    wrong = "wrong-token-value-xyz"
    with _mtls_channel(mtls_server, pki, token=wrong) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _complete(channel)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong not in info.value.details() and TOKEN not in info.value.details()
    # A token that is a prefix of the real one, or the real one with a wrong scheme, is no better.
    with _mtls_channel(mtls_server, pki) as channel:
        for metadata in ((("authorization", f"Bearer {TOKEN[:-1]}"),), (("authorization", f"Basic {TOKEN}"),)):
            with pytest.raises(grpc.RpcError) as info:
                _complete(channel, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_certificate_and_token_succeed(mtls_server: RunningServer, pki: PKI) -> None:
    with _mtls_channel(mtls_server, pki, token=TOKEN) as channel:
        response = _complete(channel)
    assert response.usage.completion_tokens == 4
    credentials = channel_credentials(str(pki.ca.cert), str(pki.client.cert), str(pki.client.key))
    with TextGenClient(mtls_server.target, credentials=credentials, token=TOKEN, timeout=30) as client:
        parts = list(client.generate("The ", max_tokens=5, seed=2))
        assert parts[-1].usage.completion_tokens == 5
        assert client.list_models().models[0].name == "tiny"


def test_health_and_reflection_need_no_token(mtls_server: RunningServer, pki: PKI) -> None:
    with _mtls_channel(mtls_server, pki) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in responses[0].list_services_response.service}
        assert "textgen.v1.TextGeneration" in names
    # The plaintext health port serves health to probes that have no certificate at all ...
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server.server.health_port}") as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        # ... and nothing else.
        with pytest.raises(grpc.RpcError) as info:
            _complete(channel, (("authorization", f"Bearer {TOKEN}"),))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_token_file_is_reloaded_when_it_changes(mtls_server: RunningServer, pki: PKI, token_file: Path) -> None:
    try:
        replacement = token_file.with_name("tokens.new")
        replacement.write_text(f"{OTHER_TOKEN}\n", encoding="utf-8")
        os.replace(replacement, token_file)  # the usual atomic rotation (new inode)
        with _mtls_channel(mtls_server, pki, token=OTHER_TOKEN) as channel:
            assert _complete(channel).usage.completion_tokens == 4
        with _mtls_channel(mtls_server, pki, token=TOKEN) as channel:
            with pytest.raises(grpc.RpcError) as info:
                _complete(channel)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # An in-place rewrite (same inode, new size) is seen too; a broken file keeps the last good tokens.
        token_file.write_text(f"{TOKEN}\n{OTHER_TOKEN}-2\n", encoding="utf-8")
        with _mtls_channel(mtls_server, pki, token=TOKEN) as channel:
            assert _complete(channel).usage.completion_tokens == 4
        token_file.write_text("# no tokens at all\n", encoding="utf-8")
        with _mtls_channel(mtls_server, pki, token=TOKEN) as channel:
            assert _complete(channel).usage.completion_tokens == 4
    finally:
        token_file.write_text(f"{TOKEN}\n", encoding="utf-8")


def test_textgen_generate_speaks_mtls_with_a_token(
    mtls_server: RunningServer, pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_token = tmp_path / "token"
    client_token.write_text(TOKEN + "\n", encoding="utf-8")
    tls = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    base = ["--target", mtls_server.target, "--max-tokens", "6", "--seed", "3", "The "]
    out, err = io.StringIO(), io.StringIO()
    assert generate_main([*base, *tls, "--token-file", str(client_token)], out, err) == 0, err.getvalue()
    assert "completion_tokens=6" in err.getvalue()
    # The token from the environment works the same; none at all is UNAUTHENTICATED (exit 1, the code printed).
    monkeypatch.setenv("TEXTGEN_TOKEN", TOKEN)
    assert generate_main([*base, *tls], io.StringIO(), io.StringIO()) == 0
    monkeypatch.delenv("TEXTGEN_TOKEN")
    err = io.StringIO()
    assert generate_main([*base, *tls], io.StringIO(), err) == 1
    assert "UNAUTHENTICATED" in err.getvalue()
    err = io.StringIO()
    assert generate_main([*base, *tls, "--token-file", str(tmp_path / "missing")], io.StringIO(), err) == 2
    assert "--token-file" in err.getvalue()


def test_tls_without_client_ca_needs_no_client_certificate(
    start_server: Callable[..., RunningServer], pki: PKI
) -> None:
    running = start_server(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    credentials = channel_credentials(str(pki.ca.cert))
    with TextGenClient(running.target, credentials=credentials, timeout=30) as client:
        assert client.complete("a", max_tokens=3, seed=1).usage.completion_tokens == 3
    with grpc.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.RpcError):
            _health(channel, timeout=5)


def test_unreadable_certificate_or_token_file_is_a_clear_startup_error(tiny_model_repo: Path, tmp_path: Path) -> None:
    from service.server import main as serve_main

    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello", encoding="utf-8")
    models = ["--models", str(tiny_model_repo), "--port", "0", "--metrics-port", "0", "--http-port", "0"]
    models += ["--host", "127.0.0.1"]
    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        code = serve_main([*models, "--tls-cert", str(bad), "--tls-key", str(bad)], {})
    assert code == 1 and "--tls-cert" in err.getvalue() and "not a PEM file" in err.getvalue()
    empty = tmp_path / "tokens"
    empty.write_text("\n", encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = serve_main([*models, "--auth-token-file", str(empty)], {})
    assert code == 1 and "holds no token" in err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = serve_main([*models, "--tls-client-ca", str(bad)], {})
    assert code == 2 and "--tls-client-ca" in err.getvalue()


def test_a_token_file_that_disappears_keeps_the_last_good_tokens(
    start_server: Callable[..., RunningServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n", encoding="utf-8")
    running = start_server(auth_token_file=str(tokens))
    try:
        caplog.set_level(logging.INFO, logger="service.auth")
        with TextGenClient(running.target, token=TOKEN, timeout=30) as client:
            assert client.complete("The ", max_tokens=3, seed=1).usage.completion_tokens == 3
            tokens.unlink()
            # The old token still passes, on every RPC, and the server does not fall over.
            for seed in range(3):
                assert client.complete("The ", max_tokens=3, seed=seed).usage.completion_tokens == 3
            assert len(list(client.generate("The ", max_tokens=4, seed=4))) >= 1
            assert client.list_models().models[0].name == "tiny"
        with TextGenClient(running.target, token=OTHER_TOKEN, timeout=30) as stranger:
            with pytest.raises(grpc.RpcError) as info:
                stranger.complete("The ", max_tokens=3)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(running.target) as channel:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        # As SECURITY.md says: an error is logged, once (not once per request), naming the file, never a token.
        missing = [r for r in caplog.records if r.name == "service.auth" and str(tokens) in r.getMessage()]
        assert len(missing) == 1, [r.getMessage() for r in missing]
        assert missing[0].levelno == logging.ERROR and "keeping" in missing[0].getMessage()
        assert TOKEN not in caplog.text
        # The file comes back (rotated): its tokens are read and the old one stops passing.
        tokens.write_text(f"{OTHER_TOKEN}\n", encoding="utf-8")
        with TextGenClient(running.target, token=OTHER_TOKEN, timeout=30) as client:
            assert client.complete("The ", max_tokens=3, seed=1).usage.completion_tokens == 3
        with TextGenClient(running.target, token=TOKEN, timeout=30) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.complete("The ", max_tokens=3)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace=0)

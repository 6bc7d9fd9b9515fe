"""The server end to end over real gRPC: streaming, Complete, sampling semantics, batching, health,
reflection, capacity, cancellation; plus the config it is built from and the command-line client."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service import client as client_cli
from service.api import textgen_pb2
from service.client import TextGenClient
from service.config import ConfigError, ServerConfig, parse_config
from service.prompt import MAX_ECHO_CHARS
from service.server import SERVICE_NAME, grpc_options
from tests.helpers import RunningServer, wait_until
from training.tokenizer import Tokenizer

LONG = 100_000  # max_tokens that outlast any test (the shared server's limit)


def _tokens(response: textgen_pb2.GenerateResponse) -> int:
    return response.usage.completion_tokens


# ---------------------------------------------------------------------- config
def test_config_flags_win_over_environment_which_wins_over_defaults() -> None:
    env = {"TEXTGEN_PORT": "7000", "TEXTGEN_MAX_QUEUE": "3", "TEXTGEN_GRACE_SECONDS": "2.5"}
    config = parse_config(["--port", "7001", "--models", "m"], env)
    assert config.port == 7001  # flag beats env
    assert config.max_queue == 3  # env beats default
    assert config.grace_seconds == 2.5
    assert config.max_concurrent == ServerConfig().max_concurrent  # default
    assert config.models == "m"


def test_every_field_has_a_flag_and_an_environment_variable() -> None:
    import dataclasses

    values = {
        "log_level": "DEBUG",
        "max_tokens_limit": "5000",
        "max_receive_message_bytes": "100000",
        "malloc_mmap_threshold": "4096",
        "cors_allow_origin": "*",
        "xla": "off",
        "event_loop": "asyncio",
        "max_steps_per_call": "64",
    }
    # Fields that are only valid together with others (given as flags in both cases).
    companions = {
        "tls_cert": ["--tls-key", "k"],
        "tls_key": ["--tls-cert", "c"],
        "tls_client_ca": ["--tls-cert", "c", "--tls-key", "k"],
    }
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        env = "TEXTGEN_" + field.name.upper()
        default = getattr(ServerConfig(), field.name)
        value = values.get(field.name, "x" if default is None or isinstance(default, str) else "2")
        extra = companions.get(field.name, [])
        from_flag = parse_config([flag, value, *extra], {})
        from_env = parse_config(extra, {env: value})
        assert getattr(from_flag, field.name) == getattr(from_env, field.name) != default, field.name


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--max-concurrent", "0"], {}, "--max-concurrent"),
        (["--max-pending-calls", "0"], {}, "--max-pending-calls must be >= 1"),
        (["--default-max-tokens", "50", "--max-tokens-limit", "10"], {}, "--default-max-tokens"),
        (["--grace-seconds", "nan"], {}, "--grace-seconds"),
        ([], {"TEXTGEN_MAX_QUEUE": "lots"}, "TEXTGEN_MAX_QUEUE"),
        ([], {"TEXTGEN_LOG_LEVEL": "loud"}, "--log-level"),
        # Values the flag's consumer cannot hold: the API's uint32, gRPC's int32 and int32 milliseconds.
        (["--max-tokens-limit", "4294967296"], {}, r"--max-tokens-limit must be <= 4294967295"),
        (["--max-receive-message-bytes", "3000000000"], {}, r"--max-receive-message-bytes must be <= 2147483647"),
        (["--max-connection-age", "1e10"], {}, r"--max-connection-age must be a number of seconds in \[0, 2147483\]"),
        (["--steps-per-call", "2147483648"], {}, r"--steps-per-call must be <= 2147483647"),
    ],
)
def test_bad_config_values_name_the_flag_or_variable(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(argv, env)


def test_unknown_flag_exits_with_usage_error() -> None:
    with pytest.raises(SystemExit) as caught:
        parse_config(["--no-such-flag"], {})
    assert caught.value.code == 2


def test_max_connection_age_becomes_a_channel_argument() -> None:
    assert "grpc.max_connection_age_ms" not in dict(grpc_options(ServerConfig()))
    options = dict(grpc_options(ServerConfig(max_connection_age=30)))
    assert options["grpc.max_connection_age_ms"] == 30000


def test_serve_rejects_bad_config_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    from service.server import main

    assert main(["--port", "-1"], environ={}) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["--max-receive-message-bytes", "3000000000"], environ={}) == 2  # gRPC's int32: no traceback
    assert "--max-receive-message-bytes must be <= 2147483647" in capsys.readouterr().err


# ---------------------------------------------------------------------- streaming and sampling
def test_streaming_arrives_in_more_than_one_message(client: TextGenClient) -> None:
    responses = list(client.generate("The ", max_tokens=300, temperature=1.0, seed=3))
    assert len(responses) > 1
    assert all(r.finish_reason == textgen_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert all(not r.HasField("usage") for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == textgen_pb2.FINISH_REASON_LENGTH
    assert _tokens(last) == 300
    assert (last.model, last.model_version) == ("tiny", 1)
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id


def test_complete_equals_the_joined_stream_for_a_fixed_seed(client: TextGenClient) -> None:
    params = dict(max_tokens=80, temperature=0.9, top_p=0.95, seed=1234)
    streamed = "".join(r.text for r in client.generate("Python ", **params))
    completed = client.complete("Python ", **params)
    assert completed.text == streamed
    assert completed.finish_reason == textgen_pb2.FINISH_REASON_LENGTH
    assert _tokens(completed) == 80


def test_greedy_is_deterministic_and_top_k_1_equals_greedy(client: TextGenClient) -> None:
    greedy = [client.complete("The class ", max_tokens=60, temperature=0).text for _ in range(2)]
    assert greedy[0] == greedy[1]
    assert len(greedy[0]) > 0
    top1 = client.complete("The class ", max_tokens=60, temperature=1.0, top_k=1, seed=99).text
    assert top1 == greedy[0]


def test_unseeded_requests_differ(client: TextGenClient) -> None:
    texts = {client.complete("A ", max_tokens=60, temperature=1.0).text for _ in range(3)}
    assert len(texts) > 1


def test_seeded_request_is_the_same_alone_and_among_eight_other_streams(client: TextGenClient) -> None:
    params = dict(max_tokens=100, temperature=1.0, top_k=20, seed=777)
    alone = client.complete("import ", **params).text

    started = threading.Barrier(9)
    stop = threading.Event()

    def other(i: int) -> int:
        count = 0
        for n, _ in enumerate(client.generate(f"other {i} ", max_tokens=LONG, temperature=1.0)):
            if n == 0:
                started.wait(timeout=60)
            count += 1
            if stop.is_set():
                break
        return count

    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(other, i) for i in range(8)]
        started.wait(timeout=60)  # all eight are streaming
        together = client.complete("import ", **params).text
        stop.set()
        assert all(f.result(timeout=60) > 0 for f in others)
    assert together == alone


def test_stop_sequence_is_excluded_with_finish_reason_stop(client: TextGenClient) -> None:
    free = client.complete("The ", max_tokens=60, temperature=0).text
    stop = free[20:23]
    cut = free.index(stop)
    response = client.complete("The ", max_tokens=60, temperature=0, stop=[stop, "\x00never"])
    assert response.finish_reason == textgen_pb2.FINISH_REASON_STOP
    assert response.text == free[:cut]
    assert stop not in response.text
    streamed = list(client.generate("The ", max_tokens=60, temperature=0, stop=[stop]))
    assert "".join(r.text for r in streamed) == free[:cut]
    assert streamed[-1].finish_reason == textgen_pb2.FINISH_REASON_STOP


def test_max_tokens_is_exact_with_finish_reason_length(client: TextGenClient) -> None:
    for n in (1, 2, 17):
        response = client.complete("x", max_tokens=n, temperature=1.0, seed=n, include_tokens=True)
        assert response.finish_reason == textgen_pb2.FINISH_REASON_LENGTH
        assert _tokens(response) == n
        assert len(response.tokens) == n
    default = client.complete("x", temperature=0)  # max_tokens 0 -> the server's default (16 here)
    assert _tokens(default) == 16


def test_usage_and_tokens_are_right(serving: RunningServer, client: TextGenClient, tiny_model_repo: Path) -> None:
    tokenizer = Tokenizer.load(str(tiny_model_repo / "tiny" / "1" / "assets" / "tokenizer.json"))
    prompt = "Return the value of x."
    responses = list(client.generate(prompt, max_tokens=25, temperature=0.7, seed=5, include_tokens=True))
    tokens = [t for r in responses for t in r.tokens]
    text = "".join(r.text for r in responses)
    usage = responses[-1].usage
    assert usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert usage.completion_tokens == len(tokens) == 25
    assert "".join(t.text for t in tokens) == text
    assert tokenizer.decode([t.id for t in tokens]) == text
    assert all(t.logprob <= 0.0 for t in tokens)
    assert 0 < usage.time_to_first_token_seconds <= usage.total_seconds


def test_sixteen_concurrent_streams_share_steps(serving: RunningServer, client: TextGenClient) -> None:
    labels = {"model": "tiny"}
    single_before = serving.sample("textgen_batch_size_bucket", {**labels, "le": "1.0"})
    count_before = serving.sample("textgen_batch_size_count", labels)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.complete(f"{i} ", max_tokens=60, temperature=1.0, seed=i), range(16)))
    assert all(_tokens(r) == 60 for r in results)
    single = serving.sample("textgen_batch_size_bucket", {**labels, "le": "1.0"}) - single_before
    steps = serving.sample("textgen_batch_size_count", labels) - count_before
    assert steps - single > 0, "no engine step advanced more than one sequence"
    assert steps < 16 * 60  # fewer steps than tokens: they were shared


# ---------------------------------------------------------------------- cancellation and deadlines
def _active(serving: RunningServer) -> float:
    return serving.sample("textgen_active_sequences")


def test_cancel_mid_stream_frees_the_row(serving: RunningServer, client: TextGenClient) -> None:
    stub_call = client._stub.Generate(textgen_pb2.GenerateRequest(prompt="The ", max_tokens=LONG, temperature=1.0))
    next(stub_call)
    assert wait_until(lambda: _active(serving) >= 1)  # the engine sets the gauge after its step
    cancelled_before = serving.sample("textgen_requests_total", {"model": "tiny", "code": "CANCELLED"})
    stub_call.cancel()
    assert wait_until(lambda: _active(serving) == 0), "textgen_active_sequences did not return to 0"
    assert serving.server.engine.active == 0
    assert wait_until(
        lambda: serving.sample("textgen_requests_total", {"model": "tiny", "code": "CANCELLED"}) == cancelled_before + 1
    )


def test_short_deadline_ends_the_stream_and_frees_the_row(serving: RunningServer, client: TextGenClient) -> None:
    expired_before = serving.sample("textgen_requests_total", {"model": "tiny", "code": "DEADLINE_EXCEEDED"})
    with pytest.raises(grpc.RpcError) as caught:
        for _ in client.generate("The ", max_tokens=LONG, temperature=1.0, timeout=0.3):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _active(serving) == 0), "textgen_active_sequences did not return to 0"
    with pytest.raises(grpc.RpcError) as caught:
        client.complete("The ", max_tokens=LONG, temperature=1.0, timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _active(serving) == 0)
    assert wait_until(
        lambda: (
            serving.sample("textgen_requests_total", {"model": "tiny", "code": "DEADLINE_EXCEEDED"})
            == expired_before + 2
        )
    )


def test_a_slow_reader_gets_the_tokens_that_piled_up_in_fewer_messages(
    serving: RunningServer, client: TextGenClient
) -> None:
    n = 2000
    fast = "".join(r.text for r in client.generate("The ", max_tokens=n, temperature=1.0, seed=21))
    # A slow reader with a small HTTP/2 receive window: the server's writes wait on flow control
    # (as they would for a client on a slow network) while the engine goes on generating.
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with TextGenClient(serving.target, channel=grpc.insecure_channel(serving.target, options=small_window)) as slow:
        messages = []
        for response in slow.generate("The ", max_tokens=n, temperature=1.0, seed=21, timeout=120):
            if not messages:
                time.sleep(1.0)
            messages.append(response)
    assert "".join(r.text for r in messages) == fast
    assert messages[-1].usage.completion_tokens == n
    assert len(messages) < n  # coalesced: not one message per token
    assert max(len(r.text) for r in messages) > 1


def test_over_capacity_is_resource_exhausted_at_once_in_three_waves(
    start_server: Callable[..., RunningServer],
) -> None:
    small = start_server(max_concurrent=2, max_queue=2, max_tokens_limit=LONG)
    engine = small.server.engine
    with small.client() as c:
        for wave in range(3):
            calls = [
                c._stub.Generate(textgen_pb2.GenerateRequest(prompt=f"{wave}{i}", max_tokens=LONG, temperature=1))
                for i in range(4)
            ]
            # Which two run first is the server's choice; wait until two run and two wait.
            assert wait_until(lambda: (engine.active, engine.waiting) == (2, 2), 10.0), (
                f"wave {wave}: {engine.active} active, {engine.waiting} waiting"
            )
            for extra in range(2):
                with pytest.raises(grpc.RpcError) as caught:
                    c.complete("over", max_tokens=1)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"wave {wave} extra {extra}"
                assert "max_concurrent" in caught.value.details() or "capacity" in caught.value.details()
            assert engine.active == 2  # the rejected ones never disturbed the running streams
            for call in calls:
                call.cancel()
            assert wait_until(lambda: engine.active + engine.waiting == 0, 5.0)
        assert _tokens(c.complete("after", max_tokens=3)) == 3
    assert small.sample("textgen_requests_total", {"code": "RESOURCE_EXHAUSTED"}) == 6


# ---------------------------------------------------------------------- health, reflection, lifecycle
def test_health_is_serving_for_both_names_and_not_found_otherwise(serving: RunningServer) -> None:
    with serving.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_serves_their_descriptors(serving: RunningServer) -> None:
    with serving.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # grpcurl describes from these bytes
    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.name == "textgen/v1/textgen.proto" for f in files)


def test_not_serving_until_a_model_is_loaded_then_serving(
    tmp_path: Path, tiny_model_repo: Path, start_server: Callable[..., RunningServer]
) -> None:
    from service.server import LIVENESS_SERVICE

    empty = tmp_path / "models"
    empty.mkdir()
    running = start_server(empty, poll_seconds=0.2, wait_ready=False)  # no model: it never gets ready by itself
    try:
        with running.channel() as channel, running.client() as c:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Not ready, but alive: a liveness probe must not restart a server that has no model yet.
            alive = health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)
            assert health.Check(alive, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as caught:
                c.complete("The ", max_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no model" in caught.value.details()
            shutil.copytree(tiny_model_repo / "tiny", empty / "tiny")  # a version appears; the poll picks it up
            assert wait_until(
                lambda: health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING, 60.0
            )
            assert _tokens(c.complete("The ", max_tokens=2)) == 2
    finally:
        running.stop(grace=0)


def test_two_servers_in_one_process_keep_their_own_metrics(
    serving: RunningServer, start_server: Callable[..., RunningServer]
) -> None:
    other = start_server()
    assert other.server.port != serving.server.port
    before = serving.sample("textgen_requests_total")
    with other.client() as c:
        assert _tokens(c.complete("The ", max_tokens=4)) == 4
    assert other.sample("textgen_requests_total", {"model": "tiny", "code": "OK"}) == 1
    assert serving.sample("textgen_requests_total") == before


# ---------------------------------------------------------------------- the command-line client
def test_generate_cli_streams_text_and_exits_0(serving: RunningServer, client: TextGenClient) -> None:
    out, err = io.StringIO(), io.StringIO()
    argv = ["--target", serving.target, "--max-tokens", "30", "--temperature", "0", "--top-k", "0"]
    code = client_cli.main([*argv, "--seed", "1", "--stop", "\x00", "The "], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    expected = client.complete("The ", max_tokens=30, temperature=0).text
    assert out.getvalue() == "The " + expected + "\n"  # the prompt, then what the server generated
    assert "finish=length" in err.getvalue() and "completion_tokens=30" in err.getvalue()


def test_generate_cli_reports_grpc_errors_in_one_line(serving: RunningServer) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = client_cli.main(["--target", serving.target, "--temperature", "-1", "hi"], stdout=out, stderr=err)
    assert code == 1
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("textgen generate: error: INVALID_ARGUMENT: temperature")

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    err = io.StringIO()
    assert client_cli.main(["--target", dead, "--timeout", "5", "hi"], stdout=io.StringIO(), stderr=err) == 1
    assert "UNAVAILABLE" in err.getvalue() or "DEADLINE_EXCEEDED" in err.getvalue()


def test_async_client_streams_and_lists(serving: RunningServer) -> None:
    import asyncio

    from service.client import AsyncTextGenClient

    async def go() -> tuple[str, str, int]:
        async with AsyncTextGenClient(serving.target, timeout=30) as c:
            streamed = "".join([r.text async for r in c.generate("The ", max_tokens=20, temperature=0)])
            completed = await c.complete("The ", max_tokens=20, temperature=0)
            listing = await c.list_models()
            return streamed, completed.text, len(listing.models)

    streamed, completed, models = asyncio.run(go())
    assert streamed == completed and models == 1


def test_textgen_generate_with_target_and_model_name_goes_to_the_server(
    serving: RunningServer, client: TextGenClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main as textgen

    argv = ["generate", "--target", serving.target, "--model", "tiny", "--max-tokens", "12", "--temperature", "0"]
    assert textgen([*argv, "--quiet", "The "]) == 0
    assert capsys.readouterr().out == "The " + client.complete("The ", max_tokens=12, temperature=0).text + "\n"


def test_a_long_unknown_model_name_is_not_found_with_the_name_cut_short(client: TextGenClient) -> None:
    name = "m" * 20_000  # echoed whole, the status trailer passed the client's metadata limit
    with pytest.raises(grpc.RpcError) as caught:
        client.complete("The ", max_tokens=2, model=name)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details()
    assert f"model {'m' * MAX_ECHO_CHARS!r}... (20000 characters) is not loaded" in details
    assert len(details) < 1000

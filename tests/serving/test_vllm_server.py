"""The vLLM launcher without vLLM: the commands it builds, the hot-load requests it sends (to a local
server that records them), a restart with a harmless stand-in process, and the missing-vllm error.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from safetensors.numpy import save_file

from tracelearn.registry import Registry, open_registry
from tracelearn.serving import vllm_server
from tracelearn.serving.http_server import BackgroundServer, free_port
from tracelearn.serving.vllm_server import (
    RUNTIME_LORA_ENV,
    VLLM_LORA_RANKS,
    VLLM_MISSING,
    VLLM_MODULE,
    VLLM_PIN,
    VLLM_PYTHON_ENV,
    LoraAdapters,
    ServedModel,
    VllmFollower,
    VllmNotInstalledError,
    VllmProcess,
    VllmServerError,
    VllmSettings,
    max_lora_rank,
    resolve_served_model,
    serve_with_vllm,
    vllm_command,
)


def write_full_model(directory: Path, marker: float = 0.0) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}), encoding="utf-8")
    save_file({"w": np.full((2, 2), marker, dtype=np.float32)}, str(directory / "model.safetensors"))
    return directory


def write_adapter(directory: Path, base: str, rank: int = 16, marker: float = 0.0) -> Path:
    directory.mkdir(parents=True)
    config = {"base_model_name_or_path": base, "r": rank, "peft_type": "LORA"}
    (directory / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({"lora_A": np.full((2, 2), marker, dtype=np.float32)}, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return open_registry(tmp_path / "registry")


def test_command_for_a_full_checkpoint(tmp_path: Path) -> None:
    model_dir = write_full_model(tmp_path / "policy")
    model, movable = resolve_served_model(str(model_dir))
    command, env = vllm_command(model, VllmSettings(host="0.0.0.0", port=8123, max_model_len=4096))
    assert not movable
    assert command == [
        sys.executable, "-m", VLLM_MODULE, "serve",  # `vllm serve`, not the deprecated api_server module
        str(model_dir.resolve()),
        "--served-model-name", "policy",
        "--host", "0.0.0.0",
        "--port", "8123",
        "--max-logprobs", "20",
        # logprobs of the distribution sampled from; requests sampled with what they say, not the model's defaults
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--max-model-len", "4096",
    ]
    assert env == {}
    raw, _ = vllm_command(model, VllmSettings(logprobs_mode="raw_logprobs", generation_config="auto"))
    assert raw[raw.index("--logprobs-mode") + 1] == "raw_logprobs"
    assert raw[raw.index("--generation-config") + 1] == "auto"


BASE_NAME = "calc-policy-base"


def test_command_for_a_lora_version_from_the_registry(tmp_path: Path, registry: Registry) -> None:
    adapter = write_adapter(tmp_path / "adapter", base="Qwen/Qwen2.5-0.5B-Instruct", rank=12)
    published = registry.publish("checkpoint", "calc-policy", adapter).version
    registry.promote("calc-policy", published.version, "production")

    model, movable = resolve_served_model("calc-policy", registry)  # name alone = name@production
    command, env = vllm_command(model, VllmSettings(port=8001))

    local = registry.local_path(published)
    assert movable and model.version_ref == "calc-policy@1"
    assert command == [
        sys.executable, "-m", VLLM_MODULE, "serve",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--served-model-name", "calc-policy-base",
        "--host", "127.0.0.1",
        "--port", "8001",
        "--max-logprobs", "20",
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--enable-lora",
        "--max-lora-rank", "16",  # rank 12 rounded up to a rank vLLM accepts
        "--max-loras", "2",
        "--lora-modules", json.dumps({"name": "calc-policy", "path": str(local), "base_model_name": BASE_NAME}),
    ]
    assert env == {RUNTIME_LORA_ENV: "True"}
    assert not resolve_served_model("calc-policy@1", registry)[1]  # a pinned version does not move


class RecordingVllm:
    """A stand-in for vLLM's HTTP API that records the adapter requests it receives."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {}

        @app.post("/v1/{path}")
        async def record(path: str, request: Request) -> dict[str, str]:
            self.requests.append((path, await request.json()))
            return {}

        self.server = BackgroundServer(app)


@pytest.fixture
def recording_vllm() -> Iterator[RecordingVllm]:
    fake = RecordingVllm()
    with fake.server:
        yield fake


def test_a_lora_move_is_hot_loaded(tmp_path: Path, registry: Registry, recording_vllm: RecordingVllm) -> None:
    base = "Qwen/Qwen2.5-0.5B-Instruct"
    first = registry.publish("checkpoint", "calc-policy", write_adapter(tmp_path / "a1", base, marker=1.0)).version
    second = registry.publish("checkpoint", "calc-policy", write_adapter(tmp_path / "a2", base, marker=2.0)).version
    registry.promote("calc-policy", first.version, "production")
    model, _ = resolve_served_model("calc-policy@production", registry)
    settings = VllmSettings(port=recording_vllm.server.port)
    process = VllmProcess(model, settings)  # not started: the recording server plays the running vLLM
    process.lora_rank = 16  # what start() would have passed as --max-lora-rank
    follower = VllmFollower(registry, "calc-policy@production", process,
                            adapters=LoraAdapters(recording_vllm.server.base_url))

    assert not follower.check()  # nothing moved yet
    registry.promote("calc-policy", second.version, "production")
    assert follower.check()

    # one in-place load: the served name never disappears (no unload, no 404 between two calls)
    assert recording_vllm.requests == [
        ("load_lora_adapter",
         {"lora_name": "calc-policy", "lora_path": str(registry.local_path(second)), "load_inplace": True}),
    ]
    assert process.model.version_ref == second.ref and follower.moves == [second.ref]
    assert process.process is None  # no restart


STAND_IN = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    args = sys.argv[1:]
    with open(args[0], "a") as log:
        log.write(json.dumps(args[1:]) + "\\n")
    port = int(args[args.index("--port") + 1])
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """
)


def test_a_full_weight_move_restarts_the_server(tmp_path: Path, registry: Registry) -> None:
    first = registry.publish("checkpoint", "calc-full", write_full_model(tmp_path / "m1", 1.0)).version
    second = registry.publish("checkpoint", "calc-full", write_full_model(tmp_path / "m2", 2.0)).version
    registry.promote("calc-full", first.version, "production")
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN, encoding="utf-8")
    launches = tmp_path / "launches.jsonl"
    settings = VllmSettings(port=free_port(), executable=(sys.executable, str(script), str(launches)),
                            ready_timeout_s=30)
    model, _ = resolve_served_model("calc-full@production", registry)
    process = VllmProcess(model, settings).start()
    try:
        old = process.process
        registry.promote("calc-full", second.version, "production")
        assert VllmFollower(registry, "calc-full@production", process).check()
        assert old is not None and old.returncode is not None  # the old server was stopped
        assert process.process is not None and process.process.returncode is None
    finally:
        process.stop()
    models = [args[0] for args in map(json.loads, launches.read_text().splitlines())]  # `vllm serve MODEL`
    assert models == [str(registry.local_path(first)), str(registry.local_path(second))]
    assert process.model.served_name == "calc-full"


def test_serve_with_vllm_runs_until_stopped(tmp_path: Path) -> None:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN, encoding="utf-8")
    launches = tmp_path / "launches.jsonl"
    stop = threading.Event()
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(serve_with_vllm(
        str(write_full_model(tmp_path / "policy")), port=free_port(), stop=stop,
        executable=[sys.executable, str(script), str(launches)])))
    runner.start()
    try:
        for _ in range(300):
            if launches.exists():
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert not runner.is_alive() and len(result) == 1
    assert "--max-logprobs" in json.loads(launches.read_text().splitlines()[0])


def test_missing_vllm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    monkeypatch.setattr(vllm_server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VllmNotInstalledError, match=rf"pip install vllm=={VLLM_PIN}`.* set TRACELEARN_VLLM_PYTHON="):
        serve_with_vllm(str(tmp_path))
    assert str(VllmNotInstalledError()) == VLLM_MISSING


def test_vllm_runs_from_its_own_environment_when_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VLLM_PYTHON_ENV, "/envs/vllm/bin/python")
    monkeypatch.setattr(vllm_server.importlib.util, "find_spec", lambda name: None)
    assert vllm_server.vllm_python() == "/envs/vllm/bin/python"


@pytest.mark.parametrize(("rank", "served"), [(1, 1), (8, 8), (12, 16), (48, 64), (300, 320), (512, 512)])
def test_lora_ranks_round_up_to_one_vllm_accepts(rank: int, served: int) -> None:
    assert max_lora_rank(rank) == served and served in VLLM_LORA_RANKS


def test_lora_ranks_vllm_cannot_serve_are_refused_naming_the_limit(tmp_path: Path) -> None:
    largest = r"rank 1024 cannot be served by vLLM, whose largest --max-lora-rank is 512"
    with pytest.raises(VllmServerError, match=largest):
        max_lora_rank(1024)
    adapter = ServedModel("base", "policy", adapter=tmp_path, lora_rank=32)
    with pytest.raises(VllmServerError, match="max_lora_rank=48 is not one of vLLM's allowed ranks"):
        vllm_command(adapter, VllmSettings(max_lora_rank=48))
    with pytest.raises(VllmServerError, match="max_lora_rank=16 is below the adapter's rank 32"):
        vllm_command(adapter, VllmSettings(max_lora_rank=16))


def test_an_adapter_path_with_a_comma_stays_one_path(tmp_path: Path) -> None:
    odd = write_adapter(tmp_path / "run 1,final", base="base-model", rank=8)
    model, _ = resolve_served_model(str(odd))
    command, _ = vllm_command(model, VllmSettings())
    module = json.loads(command[command.index("--lora-modules") + 1])
    assert module == {"name": "run 1,final", "path": str(odd.resolve()), "base_model_name": "run 1,final-base"}


def test_a_lora_move_beyond_the_servers_rank_restarts_instead_of_failing_to_load(
    tmp_path: Path, registry: Registry, recording_vllm: RecordingVllm
) -> None:
    base = "Qwen/Qwen2.5-0.5B-Instruct"
    first = registry.publish("checkpoint", "calc-policy", write_adapter(tmp_path / "a1", base, rank=8)).version
    wide = registry.publish("checkpoint", "calc-policy", write_adapter(tmp_path / "a2", base, rank=32)).version
    registry.promote("calc-policy", first.version, "production")
    model, _ = resolve_served_model("calc-policy@production", registry)
    process = VllmProcess(model, VllmSettings(port=recording_vllm.server.port))
    process.lora_rank = 8
    restarted: list[ServedModel] = []
    process.restart = restarted.append  # type: ignore[method-assign]  # record instead of launching vLLM
    follower = VllmFollower(registry, "calc-policy@production", process,
                            adapters=LoraAdapters(recording_vllm.server.base_url))
    registry.promote("calc-policy", wide.version, "production")
    assert follower.check()
    assert recording_vllm.requests == [] and [m.lora_rank for m in restarted] == [32]


def test_served_model_knows_lora() -> None:
    assert ServedModel("base", "name", adapter=Path("/a")).is_lora
    assert not ServedModel("base", "name").is_lora

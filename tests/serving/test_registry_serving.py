"""Serving a registry alias over real HTTP: promotion hot-swaps the model without failing requests,
a broken version is refused while the previous one keeps serving, and a LoRA version serves on its base.

Everything is real: a ``FilesystemRegistry`` in a temporary directory, tiny random models published as
checkpoints (different seeds give different versions with different greedy outputs), the uvicorn
server on a loopback port, and the ``openai`` client.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI
from support.tiny_model import build_tiny_model

from tracelearn.models import load_model, registry_model_version, resolve_model
from tracelearn.registry import ArtifactVersion, Registry, open_registry
from tracelearn.serving.alias_follower import AliasFollower
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer, free_port
from tracelearn.serving.openai_api import create_app
from tracelearn.serving.protocol import MODEL_VERSION_HEADER

NAME = "calc-policy"
SERVED = "calc-policy"
PROMPTS = ["What is 3 plus 4?", "the cat reads a file.", "Name a tool.", "my agent calls JSON", "Why?", "hello"]
WAIT_S = 60.0


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry-models")
    return {f"seed{seed}": build_tiny_model(root / f"seed{seed}", seed=seed) for seed in (1, 2, 3)}


@pytest.fixture
def registry(tmp_path: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Registry:
    """Versions 1 and 2 of calc-policy (seeds 1 and 2); production names version 1."""
    monkeypatch.setenv("TRACELEARN_REGISTRY", str(tmp_path / "registry"))
    opened = open_registry()
    for seed in ("seed1", "seed2"):
        opened.publish("checkpoint", NAME, model_dirs[seed])
    opened.promote(NAME, 1, "production")
    return opened


def version_of(registry: Registry, number: int, name: str = NAME) -> str:
    return registry_model_version(registry.version(name, number))


class Served:
    """A following server and the clients a test uses on it."""

    def __init__(self, follower: AliasFollower, server: BackgroundServer) -> None:
        self.follower = follower
        self.server = server
        self.client = OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=60)

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.server.base_url.removesuffix("/v1") + "/health").json()
        return body

    def wait_for(self, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            health = self.health()
            if condition(health):
                return health
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; /health says {self.health()}")

    def ask(self, prompt: str, stream: bool = False) -> tuple[str, list[int]]:
        """(model version that answered, generated token ids), greedy."""
        messages: Any = [{"role": "user", "content": prompt}]
        extra = {"return_token_ids": True}
        if not stream:
            reply = self.client.chat.completions.create(model=SERVED, messages=messages, max_tokens=12,
                                                        temperature=0, extra_body=extra)
            assert reply.system_fingerprint is not None
            return reply.system_fingerprint, list(reply.choices[0].token_ids)  # type: ignore[attr-defined]
        versions: set[str] = set()
        tokens: list[int] = []
        for chunk in self.client.chat.completions.create(model=SERVED, messages=messages, max_tokens=12,
                                                         temperature=0, stream=True, extra_body=extra):
            versions.add(str(chunk.system_fingerprint))
            for choice in chunk.choices:
                tokens.extend(getattr(choice, "token_ids", None) or [])
        assert len(versions) == 1, f"one streamed response came from several versions: {versions}"
        return versions.pop(), tokens


@pytest.fixture
def serve_alias(registry: Registry) -> Iterator[Callable[[str], Served]]:
    started: list[tuple[AliasFollower, BackgroundServer]] = []

    def start(reference: str) -> Served:
        follower = AliasFollower(reference, registry=registry, interval_s=0.1, device="cpu",
                                 make_engine=lambda loaded: GenerationEngine(loaded, max_batch_size=8))
        server = BackgroundServer(create_app(follower.slot, SERVED, aliases={reference})).start()
        follower.start()
        started.append((follower, server))
        return Served(follower, server)

    yield start
    for follower, server in started:
        follower.stop()
        server.stop()
        follower.slot.close()


def test_registry_reference_resolves_to_the_version_with_its_registry_identity(registry: Registry) -> None:
    source = resolve_model("registry:calc-policy@production")
    assert source.model_id == "calc-policy@1"
    assert source.version == version_of(registry, 1)
    assert source.version.startswith("calc-policy@1+")
    assert resolve_model("registry:calc-policy").version == version_of(registry, 1)  # production by default
    assert resolve_model("registry:calc-policy@2").version == version_of(registry, 2)
    loaded = load_model(resolve_model("registry:calc-policy@2"), device="cpu")
    assert loaded.model_version == version_of(registry, 2)


def test_promotion_swaps_the_served_version(registry: Registry, serve_alias: Callable[[str], Served]) -> None:
    served = serve_alias("registry:calc-policy@production")
    v1, v2 = version_of(registry, 1), version_of(registry, 2)
    health = served.health()
    assert (health["model_version"], health["following"], health["swaps"]) == (v1, "calc-policy@production", 0)
    raw = served.client.chat.completions.with_raw_response.create(
        model=SERVED, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0)
    assert raw.headers[MODEL_VERSION_HEADER] == v1
    before = served.ask(PROMPTS[0])
    assert before[0] == v1

    registry.promote(NAME, 2, "production")
    health = served.wait_for(lambda h: h["model_version"] == v2, "the swap to version 2")
    assert health["swaps"] == 1 and health["last_swap_error"] is None
    after = served.ask(PROMPTS[0])
    assert after[0] == v2
    assert after[1] != before[1], "two different seeds should answer differently"
    models = served.client.models.list().data
    assert [(m.id, m.model_dump()["model_version"]) for m in models] == [(SERVED, v2)]

    registry.rollback(NAME, "production")
    served.wait_for(lambda h: h["model_version"] == v1, "the rollback to version 1")
    assert served.ask(PROMPTS[0]) == before


def test_concurrent_clients_during_a_swap_all_succeed_with_consistent_versions(
    registry: Registry, serve_alias: Callable[[str], Served]
) -> None:
    served = serve_alias("registry:calc-policy@production")
    v1, v2 = version_of(registry, 1), version_of(registry, 2)
    expected: dict[str, dict[str, list[int]]] = {v1: {p: served.ask(p)[1] for p in PROMPTS}}

    answers: list[tuple[str, str, list[int], float, float]] = []  # prompt, version, tokens, started, ended
    failures: list[BaseException] = []
    seen_new = threading.Event()
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        count = 0
        # Keep asking until the new version has answered a few times, so requests straddle the swap.
        while count < 400 and not (seen_new.is_set() and count > 3):
            prompt = PROMPTS[(index + count) % len(PROMPTS)]
            started = time.monotonic()
            try:
                version, tokens = served.ask(prompt, stream=index % 2 == 1)
            except BaseException as error:
                with lock:
                    failures.append(error)
                return
            with lock:
                answers.append((prompt, version, tokens, started, time.monotonic()))
            if version == v2:
                seen_new.set()
            count += 1

    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(client_loop, index) for index in range(8)]
        time.sleep(0.5)  # every client is mid-request when the alias moves
        registry.promote(NAME, 2, "production")
        for future in running:
            future.result()

    assert failures == [], f"{len(failures)} requests failed during the swap: {failures[:3]}"
    expected[v2] = {p: served.ask(p)[1] for p in PROMPTS}
    assert {version for _, version, *_ in answers} == {v1, v2}
    for prompt, version, tokens, *_ in answers:
        assert tokens == expected[version][prompt], f"{prompt!r} answered by {version} with another model's tokens"
    # The switch is atomic: a request that started after a new-version answer had ended never gets the old one.
    first_new_end = min(ended for _, version, _, _, ended in answers if version == v2)
    late_old = [a for a in answers if a[1] == v1 and a[3] > first_new_end]
    assert late_old == [], f"{len(late_old)} requests started after the swap were answered by the old version"
    served.wait_for(lambda h: h["draining_engines"] == 0, "the old engine to drain")


def corrupt(registry: Registry, version: ArtifactVersion) -> None:
    """Flip bytes inside the stored weights without changing their size (a silent disk corruption)."""
    weights = registry.local_path(version, verify=False) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    weights.write_bytes(bytes(data))


def unloadable_copy(source: Path, destination: Path) -> Path:
    """A checkpoint the registry accepts whose config does not match its weights."""
    destination.mkdir()
    for file in source.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    config = json.loads((destination / "config.json").read_text())
    config["intermediate_size"] = 96
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_a_broken_version_is_not_swapped_in_and_the_previous_one_keeps_serving(
    registry: Registry, serve_alias: Callable[[str], Served], model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    served = serve_alias("registry:calc-policy@production")
    v1 = version_of(registry, 1)
    baseline = served.ask(PROMPTS[1])

    corrupted = registry.publish("checkpoint", NAME, model_dirs["seed3"]).version
    corrupt(registry, corrupted)
    registry.promote(NAME, corrupted.version, "production")
    health = served.wait_for(lambda h: h["last_swap_error"] is not None, "the corrupted version to be refused")
    assert "calc-policy@3" in health["last_swap_error"] and "CorruptArtifactError" in health["last_swap_error"]
    assert f"still serving {v1}" in health["last_swap_error"]
    assert health["model_version"] == v1 and health["swaps"] == 0
    assert served.ask(PROMPTS[1]) == baseline

    unloadable = registry.publish("checkpoint", NAME, unloadable_copy(model_dirs["seed3"], tmp_path / "bad")).version
    registry.promote(NAME, unloadable.version, "production")
    health = served.wait_for(lambda h: f"calc-policy@{unloadable.version}" in (h["last_swap_error"] or ""),
                             "the unloadable version to be refused")
    assert "ModelLoadError" in health["last_swap_error"]
    assert health["model_version"] == v1
    assert served.ask(PROMPTS[1]) == baseline

    registry.promote(NAME, 2, "production")  # a good version is taken again, and the error clears
    health = served.wait_for(lambda h: h["model_version"] == version_of(registry, 2), "the swap to version 2")
    assert health["last_swap_error"] is None and health["swaps"] == 1


def make_lora(base_dir: Path, destination: Path, base_reference: str) -> Path:
    """A LoRA adapter on the tiny model with random (non-zero) weights, naming ``base_reference``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    base = load_model(resolve_model(str(base_dir)), device="cpu").model
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(destination)
    adapter_config = destination / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = base_reference
    adapter_config.write_text(json.dumps(settings))
    return destination


def greedy_tokens(model: Any, tokenizer: Any, prompt: str, count: int = 12) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=count, do_sample=False)
    generated = [int(i) for i in output[0, ids.shape[1]:]]
    stop = tokenizer.eos_token_id
    return generated[: generated.index(stop) + 1] if stop in generated else generated


@pytest.mark.parametrize("base_kind", ["directory", "registry"])
def test_a_lora_version_serves_merged_onto_its_base(
    registry: Registry, serve_alias: Callable[[str], Served], model_dirs: dict[str, Path], tmp_path: Path,
    base_kind: str,
) -> None:
    base_dir = model_dirs["seed1"]
    base_reference = str(base_dir) if base_kind == "directory" else "registry:calc-policy@1"
    adapter = make_lora(base_dir, tmp_path / "adapter", base_reference)
    published = registry.publish("checkpoint", "calc-lora", adapter).version
    assert published.format == "lora" and published.lineage.base_model == base_reference
    registry.promote("calc-lora", published.version, "production")

    served = serve_alias("registry:calc-lora@production")
    version, tokens = served.ask(PROMPTS[0])
    assert version == registry_model_version(published)

    # The same adapter applied in-process by peft (unmerged) gives the same greedy tokens; the base does not.
    from peft import PeftModel

    base = load_model(resolve_model(str(base_dir)), device="cpu")
    assert tokens != greedy_tokens(base.model, base.tokenizer, PROMPTS[0])
    adapted = PeftModel.from_pretrained(base.model, adapter).eval()
    assert tokens == greedy_tokens(adapted, base.tokenizer, PROMPTS[0])


def test_serve_command_follows_the_alias(registry: Registry) -> None:
    port = free_port()
    tracelearn = Path(sys.executable).parent / "tracelearn"
    process = subprocess.Popen(
        [str(tracelearn), "serve", "--model", "registry:calc-policy@production", "--port", str(port),
         "--watch-interval", "0.2", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert process.stdout is not None
    try:
        lines: list[str] = []
        while not any(line.startswith("serving ") for line in lines):
            line = process.stdout.readline()
            if not line:
                pytest.fail("the server exited before serving:\n" + "".join(lines))
            lines.append(line)
        assert f"serving calc-policy@production on http://127.0.0.1:{port}/v1" in lines[-1]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", max_retries=0)
        messages: Any = [{"role": "user", "content": "hi"}]
        for name in ("calc-policy", "calc-policy@production", "registry:calc-policy@production"):
            reply = client.chat.completions.create(model=name, messages=messages, max_tokens=4)
            assert reply.system_fingerprint == version_of(registry, 1)
        registry.promote(NAME, 2, "production")
        deadline = time.monotonic() + WAIT_S
        while client.chat.completions.create(model=NAME, messages=messages, max_tokens=4).system_fingerprint != \
                version_of(registry, 2):
            assert time.monotonic() < deadline, "the served version never changed after the promotion"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert f"now serving {version_of(registry, 2)}" in "".join(lines) + output

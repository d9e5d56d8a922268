"""Contract tests against the pinned vLLM release, on CPU: tracelearn's ``vllm serve`` command lines parsed
by vLLM's own argument parser, and its hot-load body read by vLLM's own request model.

vLLM (``VLLM_PIN``) is installed ``--no-deps`` in an environment of its own (``contract_envs.py``);
its parser and config types import without a GPU (torch's CPU wheel, ``VLLM_TARGET_DEVICE=cpu``).
What only a GPU shows (the server starting, what it returns) is not covered here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from contracts import contract_envs
from integration.frameworks import envs

from tracelearn.serving.vllm_server import (
    VLLM_LORA_RANKS,
    VLLM_PIN,
    ServedModel,
    VllmSettings,
    vllm_command,
)

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("vllm_probe.py")
KEYS = ["model_tag", "served_model_name", "host", "port", "max_logprobs", "logprobs_mode", "generation_config",
        "enable_lora", "max_lora_rank", "max_loras", "lora_modules", "max_model_len"]
SERVE_PREFIX = 4  # python -m vllm.entrypoints.cli.main serve


def commands(tmp: Path) -> dict[str, list[str]]:
    full, _ = vllm_command(ServedModel("/models/policy", "policy"), VllmSettings(port=8123, max_model_len=4096))
    adapter = ServedModel("Qwen/Qwen2.5-0.5B-Instruct", "calc", adapter=tmp / "run 1,final", lora_rank=48)
    lora, _ = vllm_command(adapter, VllmSettings(logprobs_mode="raw_logprobs", generation_config="auto"))
    return {
        "full": full[SERVE_PREFIX:],
        "lora": lora[SERVE_PREFIX:],
        # what tracelearn never writes, so that the parser is seen refusing
        "rank_48": ["/models/policy", "--enable-lora", "--max-lora-rank", "48"],
    }


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    try:
        python = contract_envs.create("vllm")
    except envs.EnvSetupError as error:
        pytest.fail(f"the vLLM environment: {error}", pytrace=False)
    root = tmp_path_factory.mktemp("vllm-contract")
    request = {
        "commands": commands(root),
        "keys": KEYS,
        "load_bodies": [{"lora_name": "calc", "lora_path": "/registry/calc/2", "load_inplace": True}],
    }
    (root / "request.json").write_text(json.dumps({**request}), encoding="utf-8")
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VLLM_"))}
    ran = subprocess.run([str(python), "-I", str(PROBE), str(root / "request.json")], capture_output=True, text=True,
                         timeout=600, check=False, env={**environment, "VLLM_TARGET_DEVICE": "cpu"}, cwd=root)
    assert ran.returncode == 0, ran.stderr[-4000:]
    result: dict[str, Any] = json.loads(ran.stdout.strip().splitlines()[-1])
    result["root"] = str(root)
    return result


def test_the_tested_vllm_is_the_pinned_release(probe: dict[str, Any]) -> None:
    assert probe["version"] == VLLM_PIN == contract_envs.PINS["vllm"]


def test_vllm_parses_the_full_model_command_as_written(probe: dict[str, Any]) -> None:
    assert probe["parsed"]["full"] == {
        "model_tag": "/models/policy",
        "served_model_name": ["policy"],
        "host": "127.0.0.1",
        "port": 8123,
        "max_logprobs": 20,
        "logprobs_mode": "processed_logprobs",  # the distribution sampled from
        "generation_config": "vllm",  # no model defaults on requests
        "enable_lora": None,
        "max_lora_rank": 16,  # vLLM's default, unused without --enable-lora
        "max_loras": 1,
        "lora_modules": None,
        "max_model_len": 4096,
    }


def test_vllm_parses_the_lora_command_with_a_comma_in_the_adapter_path(probe: dict[str, Any]) -> None:
    parsed = probe["parsed"]["lora"]
    path = str(Path(probe["root"]) / "run 1,final")
    assert parsed["lora_modules"] == [
        {"name": "calc", "path": path, "base_model_name": "calc-base", "is_3d_lora_weight": False}
    ]
    assert (parsed["enable_lora"], parsed["max_lora_rank"], parsed["max_loras"]) == (True, 64, 2)  # rank 48 -> 64
    assert (parsed["logprobs_mode"], parsed["generation_config"]) == ("raw_logprobs", "auto")
    assert parsed["served_model_name"] == ["calc-base"] and parsed["model_tag"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_tracelearns_lora_ranks_and_logprobs_modes_are_vllms(probe: dict[str, Any]) -> None:
    assert tuple(probe["lora_ranks"]) == VLLM_LORA_RANKS
    assert "invalid choice: 48" in probe["parsed"]["rank_48"]["error"]
    assert {"processed_logprobs", "raw_logprobs"} <= set(probe["logprobs_modes"])


def test_the_in_place_hot_load_body_is_vllms_request(probe: dict[str, Any]) -> None:
    assert probe["loads"] == [
        {"lora_name": "calc", "lora_path": "/registry/calc/2", "load_inplace": True, "is_3d_lora_weight": False}
    ]

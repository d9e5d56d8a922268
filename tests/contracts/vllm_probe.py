"""Run by the vLLM environment's Python (``contract_envs.py``), never by tracelearn's: parses tracelearn's
``vllm serve`` command lines with vLLM's own argument parser and reads vLLM's own limits, printed as JSON.

    VLLM_TARGET_DEVICE=cpu python vllm_probe.py REQUEST.json

The request holds argument lists (what follows ``vllm serve``) and hot-load request bodies. The
parser is built as ``vllm``'s own ``main`` builds it (``FlexibleArgumentParser`` with the ``serve``
subcommand's ``subparser_init``); on CPU vLLM needs ``VLLM_TARGET_DEVICE=cpu`` to pick a platform.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, get_args


def plain(value: Any) -> Any:
    if isinstance(value, list):
        return [plain(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def main() -> None:
    import vllm
    from vllm.config.lora import MaxLoRARanks
    from vllm.config.model import LogprobsMode
    from vllm.entrypoints.cli import serve
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    request = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    for command in serve.cmd_init():
        command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    parsed: dict[str, Any] = {}
    for name, argv in request["commands"].items():
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                args = parser.parse_args(["serve", *argv])
        except SystemExit:
            parsed[name] = {"error": errors.getvalue().strip().splitlines()[-1]}
            continue
        parsed[name] = {key: plain(getattr(args, key)) for key in request["keys"]}
    loads = [LoadLoRAAdapterRequest.model_validate(body).model_dump() for body in request["load_bodies"]]
    print(json.dumps({
        "version": vllm.__version__,
        "lora_ranks": list(get_args(MaxLoRARanks)),
        "logprobs_modes": list(get_args(LogprobsMode)),
        "parsed": parsed,
        "loads": loads,
    }))


if __name__ == "__main__":
    main()

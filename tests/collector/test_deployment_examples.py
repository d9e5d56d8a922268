"""The deployment examples in examples/collector (systemd, Kubernetes, OpenTelemetry Collector) and the
collector command lines in their README and docs/operations.md stay valid: each file parses, every
``tracelearn collector serve`` command in them is accepted by the CLI's own parser and option types,
and the files agree with each other (ports, data paths, settings that exist)."""

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from tracelearn.cli.collector import DRAIN_SECONDS, parse_address, serve
from tracelearn.settings.variables import CAPTURE

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "collector"
UNIT = EXAMPLES / "tracelearn-collector.service"
POD = EXAMPLES / "kubernetes-pod.yaml"
OTELCOL = EXAMPLES / "otelcol-forward.yaml"

CAPTURE_NAMES = {setting.name for setting in CAPTURE}


def serve_options(command: list[str]) -> dict[str, Any]:
    """The options of a ``tracelearn collector serve`` command line, as the CLI parses and converts them.

    Files the command expects to exist (``--token-file``, ``--tls-cert``, ``--tls-key``) exist on
    the target machine only: their values must be absolute paths, and an existing file stands in for
    them here. Raises ``click.UsageError`` for anything the CLI would refuse.
    """
    position = next(
        (i for i in range(len(command) - 2) if Path(command[i]).name == "tracelearn" and command[i + 1 : i + 3]
         == ["collector", "serve"]),
        None,
    )
    assert position is not None, f"not a tracelearn collector serve command: {command}"
    args = command[position + 3 :]
    must_exist = {
        opt for param in serve.params if isinstance(param.type, click.Path) and param.type.exists for opt in param.opts
    }
    checked = list(args)
    for index, arg in enumerate(args[:-1]):
        if arg in must_exist:
            assert Path(args[index + 1]).is_absolute(), f"{arg} {args[index + 1]}: use an absolute path"
            checked[index + 1] = __file__
    context = serve.make_context("serve", checked)
    options = dict(context.params)
    for name, flag in (("http_address", "--http"), ("grpc_address", "--grpc")):
        options[name] = parse_address(options[name], flag)
    assert options["http_address"] or options["grpc_address"], "both fronts are off"
    assert (options["tls_cert"] is None) == (options["tls_key"] is None), "--tls-cert and --tls-key go together"
    return options


def test_the_check_refuses_what_the_cli_refuses() -> None:
    assert serve_options(["tracelearn", "collector", "serve", "--http", "127.0.0.1:9"])["http_address"] == (
        "127.0.0.1", 9,
    )
    with pytest.raises(click.NoSuchOption):
        serve_options(["tracelearn", "collector", "serve", "--listen", "127.0.0.1:4318"])
    with pytest.raises(click.BadParameter):
        serve_options(["tracelearn", "collector", "serve", "--queue-bytes", "lots"])
    with pytest.raises(click.BadParameter):
        serve_options(["tracelearn", "collector", "serve", "--http", "localhost"])
    with pytest.raises(AssertionError):
        serve_options(["tracelearn", "collector", "serve", "--token-file", "token.txt"])


def unit_entries(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a systemd unit (keys may repeat), comments and section headers left out."""
    entries: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key, []).append(value)
    return entries


def test_the_systemd_unit_starts_a_valid_command_and_stops_it_gracefully() -> None:
    entries = unit_entries(UNIT)
    [exec_start] = entries["ExecStart"]
    command = shlex.split(exec_start)
    assert Path(command[0]).is_absolute(), "systemd needs the absolute path of the executable"
    options = serve_options(command)
    assert options["http_address"][0] == "127.0.0.1" and options["grpc_address"][0] == "127.0.0.1"
    assert str(options["data_root"]).startswith(f"/var/lib/{entries['StateDirectory'][0]}/"), (
        "the data root is in the state directory, the one place the unit may write"
    )
    assert entries["KillSignal"] == ["SIGTERM"]
    assert int(entries["TimeoutStopSec"][0]) > DRAIN_SECONDS, "time to drain and roll before SIGKILL"
    for assignment in entries["Environment"]:
        assert assignment.split("=", 1)[0] in CAPTURE_NAMES, assignment
    assert entries["WantedBy"] == ["multi-user.target"]


def test_the_kubernetes_pod_runs_the_collector_as_a_sidecar_the_agent_exports_to() -> None:
    documents = {document["kind"]: document for document in yaml.safe_load_all(POD.read_text())}
    claim, pod = documents["PersistentVolumeClaim"], documents["Pod"]["spec"]
    [collector] = pod["initContainers"]
    [agent] = pod["containers"]
    assert collector["restartPolicy"] == "Always", "a native sidecar: up before the agent, down after it"
    options = serve_options(collector["command"])
    host, port = options["http_address"]
    assert host == "127.0.0.1"
    assert {mount["mountPath"] for mount in collector["volumeMounts"]} == {str(options["data_root"])}
    for variable in collector["env"]:
        assert variable["name"] in CAPTURE_NAMES, variable
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        code = collector[probe]["exec"]["command"][-1]
        assert f"http://127.0.0.1:{port}/" in code, probe
        compile(code, probe, "exec")
    assert pod["terminationGracePeriodSeconds"] > DRAIN_SECONDS
    assert pod["hostname"], "a fixed host name: the next pod on the claim replays this one's spool segments"

    env = {variable["name"]: variable["value"] for variable in agent["env"]}
    assert env["OTEL_TRACES_EXPORTER"] == "otlp" and env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{port}"
    assert all(mount["readOnly"] for mount in agent["volumeMounts"]), "the collector is the only writer"
    [volume] = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert {mount["name"] for mount in [*collector["volumeMounts"], *agent["volumeMounts"]]} == {volume["name"]}


def commented_serve_commands(path: Path) -> list[list[str]]:
    """``tracelearn collector serve`` commands in a file's comments or code blocks."""
    commands = []
    text = re.sub(r"\\\n\s*(#\s*)?", " ", path.read_text())  # join continued lines
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if re.match(r"(\S*/)?tracelearn collector serve\b", line):
            commands.append(shlex.split(line, comments=True))
    return commands


def test_the_opentelemetry_collector_forwards_traces_to_the_sidecar_command_beside_it() -> None:
    config = yaml.safe_load(OTELCOL.read_text())
    exporter = config["exporters"]["otlphttp/tracelearn"]
    [command] = commented_serve_commands(OTELCOL)
    options = serve_options(command)
    host, port = options["http_address"]
    assert exporter["endpoint"] == f"http://{host}:{port}"
    assert options["grpc_address"] is None and options["token_file"] is not None
    assert "Authorization" in exporter["headers"]
    assert exporter["retry_on_failure"]["max_elapsed_time"] in ("0s", 0), "a batch is never given up"
    storage = exporter["sending_queue"]["storage"]
    assert storage in config["extensions"] and storage in config["service"]["extensions"]
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["exporters"] == ["otlphttp/tracelearn"]
    assert set(pipeline["receivers"]) <= set(config["receivers"])
    assert set(pipeline["processors"]) <= set(config["processors"])
    receiver_ports = {int(protocol["endpoint"].rsplit(":", 1)[1]) for protocol in config["receivers"]["otlp"]
                      ["protocols"].values()}
    assert port not in receiver_ports, "the sidecar and the OpenTelemetry Collector on one host need two ports"


@pytest.mark.parametrize("path", [EXAMPLES / "README.md", ROOT / "docs" / "operations.md"], ids=lambda p: p.name)
def test_every_serve_command_in_the_documentation_is_accepted(path: Path) -> None:
    commands = commented_serve_commands(path)
    assert commands, f"{path} shows how to start the collector"
    for command in commands:
        serve_options(command)


def test_the_operations_page_names_every_metric_flag_and_setting(tmp_path: Path) -> None:
    from tracelearn.collector.receiver import OtlpReceiver, ReceiverConfig

    receiver = OtlpReceiver(ReceiverConfig(data_root=tmp_path))
    try:
        exported = re.findall(r"^# TYPE (\S+) ", receiver.metrics_text(), re.MULTILINE)
    finally:
        receiver.close()
    text = (ROOT / "docs" / "operations.md").read_text()
    assert len(exported) > 10
    for name in exported:
        assert f"`{name}" in text, f"docs/operations.md does not describe the metric {name}"
    for param in serve.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert f"`{param.opts[0]}" in text, f"docs/operations.md does not describe {param.opts[0]}"
    # The TRACELEARN_* variables the collector's CaptureSettings reads.
    for variable in ("TRACELEARN_DATA", "TRACELEARN_ROLL_BYTES", "TRACELEARN_ROLL_SECONDS", "TRACELEARN_COMPRESSION",
                     "TRACELEARN_MAX_ATTRIBUTE_BYTES"):
        assert f"`{variable}`" in text, variable

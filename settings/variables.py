"""Every ``TRACELEARN_*`` environment variable, declared once: name, type, default, meaning, reader.

``SETTINGS`` lists them in the order of the settings table in docs/settings.md, which ``tracelearn.settings.docs``
generates from it. Code reads a variable through its declaration (``ROLL_SECONDS.value()``), never
with ``os.environ`` directly; a test walks the tree for ``TRACELEARN_`` names and finds each here.
"""

from __future__ import annotations

from typing import Any

from tracelearn.settings.setting import (
    CRON,
    LOCATION,
    MINUTES,
    PATH,
    POSITIVE_COUNT,
    POSITIVE_NUMBER,
    TEXT,
    Setting,
    choice,
)

COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "brotli", "none")
TOKEN_ID_MODES = ("auto", "on", "off")

# --- Capture (the agent process and the collector sidecar) -----------------------------------------

DATA_ROOT = Setting("TRACELEARN_DATA", PATH, "./data", "Root of the dataset; spans land under `<root>/spans/`.",
                    "collector (exporter, sidecar); the DAGs' default `data` / `transitions`")
ROLL_BYTES = Setting("TRACELEARN_ROLL_BYTES", POSITIVE_COUNT, "67108864",
                     "Roll a spans file when its buffered rows reach this many bytes.", "collector")
ROLL_SECONDS = Setting("TRACELEARN_ROLL_SECONDS", POSITIVE_NUMBER, "60",
                       "Roll a spans file when its oldest buffered span is this old.", "collector")
COMPRESSION = Setting("TRACELEARN_COMPRESSION", choice(*COMPRESSIONS), "zstd",
                      "Parquet compression: zstd, snappy, gzip, lz4, brotli or none.", "collector")
MAX_ATTRIBUTE_BYTES = Setting("TRACELEARN_MAX_ATTRIBUTE_BYTES", POSITIVE_COUNT, "8388608",
                              "Attribute values longer than this are truncated (and counted).", "collector")
QUEUE_SIZE = Setting("TRACELEARN_QUEUE_SIZE", POSITIVE_COUNT, "65536",
                     "Span queue bound of our batch processor (never drops silently).", "instrumentation")
QUEUE_BLOCK_MS = Setting("TRACELEARN_QUEUE_BLOCK_MS", POSITIVE_COUNT, "200",
                         "How long a full queue blocks the agent before a span is dropped and counted.",
                         "instrumentation")
TOKEN_IDS = Setting("TRACELEARN_TOKEN_IDS", choice(*TOKEN_ID_MODES), "auto",
                    "Ask OpenAI-compatible servers for token ids and logprobs: on, off, "
                    "or auto (loopback and private addresses only).", "instrumentation")
# What the Parquet exporter reads (``collector.settings.CaptureSettings``); the distro checks them up front.
CAPTURE = (DATA_ROOT, ROLL_BYTES, ROLL_SECONDS, COMPRESSION, MAX_ATTRIBUTE_BYTES)
COLLECTOR_TOKEN = Setting("TRACELEARN_COLLECTOR_TOKEN", TEXT, None,
                          "Bearer token an OpenTelemetry Collector sends when it forwards to the sidecar "
                          "(the sidecar itself reads `--token-file`).", "examples/collector/otelcol-forward.yaml")

# --- Models and the registry ---------------------------------------------------------------------

MODEL_CACHE = Setting("TRACELEARN_MODEL_CACHE", PATH, "~/.cache/tracelearn/models",
                      "Where the default model is unpacked at setup.", "models")
REGISTRY = Setting("TRACELEARN_REGISTRY", LOCATION, "~/.cache/tracelearn/registry",
                   "Registry location: a directory, a pyarrow URI (`s3://...`) or `mlflow+http://host:port`.",
                   "registry (every `--registry` default)")
REGISTRY_CACHE = Setting("TRACELEARN_REGISTRY_CACHE", PATH, "~/.cache/tracelearn/registry-cache",
                         "Where versions from a remote registry are downloaded (by digest) before loading.",
                         "registry")
PROMPTS = Setting("TRACELEARN_PROMPTS", TEXT, None,
                  "Pin prompts for one run: `name=name@7,other=other@candidate`.", "registry (`tracelearn.prompt`)")

VLLM_PYTHON = Setting("TRACELEARN_VLLM_PYTHON", PATH, None,
                      "Python of an environment with vLLM (`tracelearn serve --engine vllm`; unset: this Python "
                      "when vllm imports here).", "serving (vLLM launcher)")

# --- Training --------------------------------------------------------------------------------------

VERL_PYTHON = Setting("TRACELEARN_VERL_PYTHON", PATH, None,
                      "Python of verl's own environment (`train grpo --backend verl`, the DAG's verl step).",
                      "training (verl backend), the train DAG")

# --- The Airflow DAGs (read when a DAG file is parsed) ----------------------------------------------

PIPELINE_CONFIG = Setting("TRACELEARN_PIPELINE_CONFIG", PATH, None,
                          "Default `pipeline.yaml` of the build DAG (unset: the built-in defaults).", "DAGs")
RUNS = Setting("TRACELEARN_RUNS", PATH, "./runs", "Default folder of the train and APO DAGs' runs.", "DAGs")
APO_OPTIMIZER_URL = Setting("TRACELEARN_APO_OPTIMIZER_URL", TEXT, "http://127.0.0.1:8000/v1",
                            "Default OpenAI base URL of the APO DAG's optimizer model.", "DAGs")
LOOP_CONFIG = Setting("TRACELEARN_LOOP_CONFIG", PATH, None, "Default `loop.yaml` of the loop DAG.", "DAGs")
LOOP_WORKDIR = Setting("TRACELEARN_LOOP_WORKDIR", PATH, "./runs/loop", "Default folder of the loop DAG.", "DAGs")
LOOP_ROUNDS = Setting("TRACELEARN_LOOP_ROUNDS", POSITIVE_COUNT, "3", "Default number of rounds of the loop DAG.",
                      "DAGs")
BUILD_SCHEDULE = Setting("TRACELEARN_BUILD_SCHEDULE", CRON, "@hourly",
                         "When the build DAG runs besides on new spans (a `tracelearn_spans` asset event): a cron "
                         "expression in UTC, or `off` for asset events only.", "DAGs")
BUILD_TASK_TIMEOUT = Setting("TRACELEARN_BUILD_TASK_TIMEOUT_MINUTES", MINUTES, "120",
                             "Time limit of each task of the build DAG.", "DAGs")
TRAIN_TASK_TIMEOUT = Setting("TRACELEARN_TRAIN_TASK_TIMEOUT_MINUTES", MINUTES, "1440",
                             "Time limit of each task of the train DAG.", "DAGs")
APO_TASK_TIMEOUT = Setting("TRACELEARN_APO_TASK_TIMEOUT_MINUTES", MINUTES, "720",
                           "Time limit of each task of the APO DAG.", "DAGs")
LOOP_TASK_TIMEOUT = Setting("TRACELEARN_LOOP_TASK_TIMEOUT_MINUTES", MINUTES, "1440",
                            "Time limit of each task of the loop DAG.", "DAGs")

# --- The test suite -------------------------------------------------------------------------------

FRAMEWORK_ENVS = Setting("TRACELEARN_FRAMEWORK_ENVS", PATH, None,
                         "Where the framework matrix's test environments are made (unset: `build/framework-envs/`).",
                         "tests (framework matrix)")

SETTINGS: tuple[Setting[Any], ...] = (
    DATA_ROOT, ROLL_BYTES, ROLL_SECONDS, COMPRESSION, MAX_ATTRIBUTE_BYTES, QUEUE_SIZE, QUEUE_BLOCK_MS, TOKEN_IDS,
    COLLECTOR_TOKEN, MODEL_CACHE, REGISTRY, REGISTRY_CACHE, PROMPTS, VLLM_PYTHON, VERL_PYTHON, PIPELINE_CONFIG, RUNS,
    APO_OPTIMIZER_URL, LOOP_CONFIG, LOOP_WORKDIR, LOOP_ROUNDS, BUILD_SCHEDULE, BUILD_TASK_TIMEOUT, TRAIN_TASK_TIMEOUT,
    APO_TASK_TIMEOUT, LOOP_TASK_TIMEOUT, FRAMEWORK_ENVS,
)
BY_NAME: dict[str, Setting[Any]] = {setting.name: setting for setting in SETTINGS}

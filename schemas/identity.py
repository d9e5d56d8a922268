"""Default identities derived from captured data, shared by every reader of the spans table.

Without code change a rollout is one trace and its task id is a stable hash of the first user message,
so rollouts of the same question group together (GRPO groups) across runs and processes.
"""

import hashlib
import json
from typing import Any

TASK_ID_PREFIX = "msg-"


def first_user_message(messages_json: str | None) -> str | None:
    """Text of the first ``user`` message in normalized messages JSON, or ``None``."""
    if not messages_json:
        return None
    try:
        messages: Any = json.loads(messages_json)
    except ValueError:
        return None
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    return None


def task_id_from_messages(messages_json: str | None) -> str | None:
    """``msg-<16 hex>``: sha256 of the first user message, or ``None`` when there is none."""
    text = first_user_message(messages_json)
    if text is None:
        return None
    return TASK_ID_PREFIX + hashlib.sha256(text.strip().encode("utf-8", "replace")).hexdigest()[:16]

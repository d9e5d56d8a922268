"""A small agent for the APO tests: one chat call per task, its system prompt read from the registry.

Unlike the calc example it reads its prompt with ``tracelearn.prompt("qa-system")`` and fills the
``{question}`` variable itself (what APO's ``registry`` injection is for), and it misbehaves on cue:
a reply ``CRASH`` makes it exit with an error, a reply ``HANG`` makes it hang. Each task is one
rollout whose root span carries the task id, the gold answer and the sample, as the calc agent's does.

    opentelemetry-instrument python prompt_agent.py --tasks TASKS --samples N --seed S
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import openai
from opentelemetry import trace

import tracelearn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    client = openai.OpenAI()
    tracer = trace.get_tracer("apo-test-agent")
    lines = Path(args.tasks).read_text(encoding="utf-8").splitlines()
    tasks = [json.loads(line) for line in lines if line.strip()]
    for task in tasks:
        for sample in range(args.samples):
            attributes = {"tracelearn.task.id": task["id"], "tracelearn.metadata.gold": task["answer"],
                          "tracelearn.metadata.sample": str(sample)}
            with tracer.start_as_current_span("qa.task", attributes=attributes):
                system = tracelearn.prompt("qa-system").format(question=task["question"])
                response = client.chat.completions.create(
                    model=os.environ["OPENAI_MODEL"], seed=args.seed,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": task["question"]}])
                answer = response.choices[0].message.content or ""
            if answer == "CRASH":
                sys.exit("the model told me to crash")
            if answer == "HANG":
                time.sleep(600)
            print(json.dumps({"id": task["id"], "sample": sample, "answer": answer}), flush=True)


if __name__ == "__main__":
    main()

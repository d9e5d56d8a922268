"""A tiny random chat model for tests: builds in about a second, loads like any Hugging Face model.

A byte-level BPE tokenizer trained with ``tokenizers`` on a few hundred generated sentences, wrapped
in ``PreTrainedTokenizerFast`` with a ChatML chat template that also renders ``tools``, and a
2-layer, 64-wide ``Qwen2`` model with random weights. The weights are seeded, so every build is the
same model; its outputs are gibberish, but every code path of a real model is exercised.

``memorize`` fine-tunes it until greedy decoding reproduces given replies to given prompts (for
example a tool call), so a test can rely on what the model answers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONTEXT_LENGTH = 512

# ChatML, with a system block declaring tools and assistant tool calls as <tool_call> JSON.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '</tools>\\nCall a tool with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{- call['function']['arguments'] | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def training_corpus() -> list[str]:
    """A few hundred varied local strings: prose, numbers, JSON tool calls, non-ASCII text."""
    subjects = ["the cat", "a robot", "my agent", "the server", "our model", "the user", "a trainer", "the policy"]
    verbs = ["reads", "writes", "answers", "learns", "calls", "returns", "streams", "samples"]
    objects = ["the question", "a tool", "tokens", "the reward", "a file", "the weather", "numbers", "JSON"]
    sentences = [f"{s} {v} {o}." for s, v, o in itertools.product(subjects, verbs, objects)]
    sums = [f"What is {a} plus {b}? {a} + {b} = {a + b}" for a in range(12) for b in range(12)]
    calls = [f'<tool_call>{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}</tool_call>'
             for c in ["Paris", "Nairobi", "Tokyo", "Lima", "Oslo"]]
    other = ["Grüße aus Köln — naïve café", "日本語のテキスト", "emoji 🙂 and symbols ±×÷"]
    return sentences + sums + calls + other


def build_tokenizer(vocab_size: int = 800) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: any text round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=CONTEXT_LENGTH,
    )


@dataclass(frozen=True)
class Lesson:
    """A conversation (with the tools it declares) and the assistant reply the model must learn."""

    messages: list[dict[str, Any]]
    reply: str
    tools: list[dict[str, Any]] = field(default_factory=list)


def memorize(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, lessons: Sequence[Lesson]) -> None:
    """Train ``model`` on the lessons' prompt + reply + end-of-turn tokens until greedy decoding of each
    prompt reproduces its reply (a few hundred Adam steps at most on this model size).
    """
    examples = []
    for lesson in lessons:
        prompt = tokenizer.apply_chat_template(lesson.messages, tools=lesson.tools or None, add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        answer = [*tokenizer.encode(lesson.reply, add_special_tokens=False), tokenizer.eos_token_id]
        examples.append((list(prompt), answer))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(400):
        for prompt, answer in examples:
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step % 20 == 19 and all(_greedy(model, p, len(a)) == a for p, a in examples):
            break
    else:
        raise RuntimeError("the tiny model did not learn its lessons")
    model.eval()


def _greedy(model: Qwen2ForCausalLM, prompt: list[int], length: int) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=length, do_sample=False)
    return [int(i) for i in output[0, len(prompt) :]]


def build_tiny_model(directory: Path, seed: int = 0, lessons: Sequence[Lesson] = ()) -> Path:
    """Write a tiny random Qwen2 chat model and its tokenizer to ``directory``; return ``directory``.
    With ``lessons``, the model is first taught to answer them (see ``memorize``).
    """
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=CONTEXT_LENGTH,
        # Wider than the default 0.02, whose random model emits one token forever: outputs must vary with
        # the prompt for batched-versus-single comparisons to mean anything.
        initializer_range=0.2,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if lessons:
        memorize(model, tokenizer, lessons)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory

"""Training throughput of our GRPO step against TRL's GRPO loss: same model, same batch, in one run.

One GRPO-shaped batch (``--groups`` x ``--samples`` sequences): a system prompt with tool declarations
(200 tokens) shared by every sequence, a question of 10-14 tokens per group (shared by the group's
samples), responses of 10-64 tokens; random token ids from the model's vocabulary, group-normalized
random advantages, old logprobs equal to the current ones (computed once before timing). The model has
random weights (throughput does not depend on them): the tiny test model, a small Qwen2, or a
Qwen2.5-0.5B-shaped Qwen2 (``--model-size``).

Timed, per step (forward, loss, backward, gradient clipping, AdamW step), each side on its own copy of
the same weights and its own AdamW (same learning rate), in rotating order over ``--rounds``:

* ours: ``tracelearn.training.grpo.grpo_step`` on ``TokenSequence``s with a ``Policy`` from
  ``load_policy`` (micro-batches under ``--micro-batch-tokens``), with ``runtime.share_prefix`` on
  (the default: the shared prompt prefix runs once per micro-batch) and off;
* TRL: ``GRPOTrainer.compute_loss`` on the input dict its ``_generate_and_score_completions`` builds
  (left-padded ``prompt_ids``/``prompt_mask``, right-padded ``completion_ids``/``completion_mask``,
  ``advantages``, ``old_per_token_logps``, ``num_items_in_batch``), split into micro-batches with TRL's
  ``split_tensor_dict`` (``per_device_train_batch_size`` x ``gradient_accumulation_steps`` = the batch),
  ``accelerator.backward``, the Trainer's ``_clip_grad_norm``, then the optimizer step. The trainer is
  built with a one-column dataset and a zero reward; ``train()`` (generation) is never called.

Same loss on both sides: clipped surrogate with epsilon 0.2 both ways, no KL (beta 0), token-level mean
over the whole step (ours ``token_mean``; TRL ``loss_type="dapo"``, which divides by the step's
``num_items_in_batch``, the same normalizer), max gradient norm 1.0, no gradient checkpointing. The
first step of each side runs on the same weights: its loss and gradient norm are printed side by side.

Tokens/s counts the batch's real (unpadded) prompt + response tokens per second of a full step. On CUDA
it also prints model FLOPs utilization (6 x parameters x tokens / step time / ``--peak-tflops``) and the
peak memory a step allocates above what was allocated when it started.

    PYTHONPATH=tests .venv/bin/python benchmarks/grpo_throughput.py [--model-size tiny|small|0.5b] [--groups 4]
        [--samples 8] [--rounds 5] [--precision auto|fp32|bf16] [--device auto|cpu|cuda] [--micro-batch-tokens 4096]
        [--trl-micro-batch ROWS] [--peak-tflops 989] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from tracelearn.models import select_device
from tracelearn.training.config import GrpoConfig, RuntimeConfig, TrainConfig
from tracelearn.training.grpo import fill_logprobs, grpo_step
from tracelearn.training.policy import Policy, load_policy
from tracelearn.training.sequences import TokenSequence, micro_batches

TRL_VERSION = "1.16.0"
# Every model size takes the test suite's tokenizer, and "tiny" its model: tests/ must be on the path.
TINY_MODEL_HINT = ("the models are built with the test suite's tokenizer (tests/support/tiny_model.py): put tests/ "
                   "on the path, PYTHONPATH=tests .venv/bin/python benchmarks/grpo_throughput.py")
SYSTEM_TOKENS = 200  # system prompt + tool declarations, shared by every sequence
QUESTION_TOKENS = (10, 14)  # per group
RESPONSE_TOKENS = (10, 64)  # per sample
CONTEXT_LENGTH = 4096

# Random-weight Qwen2 shapes; "tiny" is tests/support/tiny_model.py (64 wide, 2 layers, a ~500-token vocabulary).
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 8192},
    # Qwen2.5-0.5B's shape (494M parameters, embeddings tied).
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936},
}


def build_model(size: str, directory: Path, device: torch.device) -> Path:
    """A random-weight model directory (weights + the tiny model's tokenizer) for ``load_policy``."""
    try:
        from support.tiny_model import build_tiny_model, build_tokenizer
    except ModuleNotFoundError:
        sys.exit(TINY_MODEL_HINT)

    if size == "tiny":
        return build_tiny_model(directory)
    tokenizer = build_tokenizer()
    config = Qwen2Config(**MODEL_SHAPES[size], tie_word_embeddings=True, max_position_embeddings=CONTEXT_LENGTH,
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initializing 0.5B parameters on the GPU is much faster than on the CPU
        model = Qwen2ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(directory)  # bf16 on disk: half the bytes; loaded back as float32
    tokenizer.save_pretrained(directory)
    return directory


def grpo_batch(groups: int, samples: int, vocab: int, pad_id: int, seed: int) -> list[TokenSequence]:
    """``groups`` x ``samples`` sequences: shared system prompt, one question per group, varied responses."""
    rng = random.Random(seed)

    def ids(count: int) -> list[int]:
        drawn = (rng.randrange(vocab) for _ in range(count))
        return [token if token != pad_id else (token + 1) % vocab for token in drawn]

    system = ids(SYSTEM_TOKENS)
    sequences = []
    for group in range(groups):
        prompt = system + ids(rng.randint(*QUESTION_TOKENS))
        rewards = [rng.random() for _ in range(samples)]
        mean = statistics.fmean(rewards)
        std = statistics.pstdev(rewards)
        for sample, reward in enumerate(rewards):
            response = ids(rng.randint(*RESPONSE_TOKENS))
            sequences.append(TokenSequence(
                prompt_ids=list(prompt), response_ids=response, loss_mask=[1] * len(response),
                advantage=(reward - mean) / (std + 1e-4), reward=reward, old_logprobs=None, retokenized=False,
                rollout_id=f"rollout-{group}-{sample}", task_id=f"task-{group}", span_id=None))
    return sequences


def trl_inputs(sequences: list[TokenSequence], pad_id: int, device: torch.device) -> dict[str, Any]:
    """The dict ``GRPOTrainer._generate_and_score_completions`` hands to ``compute_loss``, for ``sequences``."""
    from trl.trainer.utils import pad

    def padded(rows: list[list[Any]], value: float, side: str, dtype: torch.dtype) -> torch.Tensor:
        return pad([torch.tensor(row, dtype=dtype) for row in rows], padding_value=value, padding_side=side).to(device)

    completion_mask = padded([s.loss_mask for s in sequences], 0, "right", torch.long)
    return {
        "prompt_ids": padded([s.prompt_ids for s in sequences], pad_id, "left", torch.long),
        "prompt_mask": padded([[1] * len(s.prompt_ids) for s in sequences], 0, "left", torch.long),
        "completion_ids": padded([s.response_ids for s in sequences], pad_id, "right", torch.long),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([s.advantage for s in sequences], dtype=torch.float32, device=device),
        "old_per_token_logps": padded([s.old_logprobs or [] for s in sequences], 0.0, "right", torch.float32),
        "num_items_in_batch": completion_mask.sum(),
    }


def trl_rows_per_micro_batch(batch: int, padded_length: int, token_budget: int) -> int:
    """The largest ``per_device_train_batch_size`` dividing ``batch`` whose padded tokens fit ``token_budget``."""
    fitting = [rows for rows in range(1, batch + 1) if batch % rows == 0 and rows * padded_length <= token_budget]
    return max(fitting, default=1)


def zero_reward(completions: list[Any], **_: Any) -> list[float]:
    return [0.0] * len(completions)


@dataclass
class TrlSide:
    """A ``GRPOTrainer`` ready to run its loss on prepared micro-batches."""

    trainer: Any
    micro_batches: list[dict[str, Any]]
    rows: int
    padded_length: int

    def step(self) -> tuple[float, float]:
        """One optimizer step the way ``Trainer`` runs one (``training_step`` minus its generation); returns
        (loss, gradient norm)."""
        trainer, model = self.trainer, self.trainer.model
        model.train()
        total = torch.zeros((), device=trainer.accelerator.device)
        for inputs in self.micro_batches:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
            total += loss.detach()
        grad_norm = trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
        return float(total), float(grad_norm)


def build_trl_side(policy: Policy, sequences: list[TokenSequence], args: argparse.Namespace, bf16: bool,
                   scratch: Path) -> TrlSide:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    pad_id = int(policy.tokenizer.pad_token_id)
    batch = trl_inputs(sequences, pad_id, policy.device)
    padded_length = int(batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1])
    rows = args.trl_micro_batch or trl_rows_per_micro_batch(len(sequences), padded_length, args.micro_batch_tokens)
    if len(sequences) % rows:
        sys.exit(f"--trl-micro-batch {rows} must divide the batch of {len(sequences)} sequences")
    accumulation = len(sequences) // rows
    config = GRPOConfig(
        output_dir=str(scratch / "trl"), report_to="none", save_strategy="no", use_cpu=policy.device.type == "cpu",
        bf16=bf16, fp16=False, activation_checkpointing=False,  # TRL defaults to gradient checkpointing; we don't
        per_device_train_batch_size=rows, gradient_accumulation_steps=accumulation, num_generations=args.samples,
        loss_type="dapo", beta=0.0, epsilon=0.2, learning_rate=args.lr, weight_decay=0.0, max_grad_norm=1.0,
        temperature=1.0, max_completion_length=RESPONSE_TOKENS[1], seed=args.seed,
    )
    model = copy.deepcopy(policy.model)  # the same weights, its own copy
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=zero_reward, args=config, processing_class=copy.deepcopy(
        policy.tokenizer), train_dataset=Dataset.from_dict({"prompt": ["hello"] * args.samples}),
        optimizers=(optimizer, None))
    trainer.current_gradient_accumulation_steps = accumulation  # what train() sets for every optimizer step
    if getattr(trainer.model, "is_activation_checkpointing", False):
        sys.exit("TRL enabled gradient checkpointing; the comparison needs it off on both sides")
    torch.manual_seed(args.seed)
    chunks = split_tensor_dict(shuffle_sequence_dict(batch), accumulation)  # what _prepare_inputs does
    return TrlSide(trainer, chunks, rows, padded_length)


@dataclass
class Timings:
    """One side's measurements over every round."""

    seconds: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)


def timed(run: Callable[[], Any], device: torch.device, timings: Timings) -> float:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    began = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - began
    timings.seconds.append(elapsed)
    if cuda:
        timings.peak_bytes.append(torch.cuda.max_memory_allocated(device) - start_bytes)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=["tiny", "small", "0.5b"], default="tiny",
                        help="tiny test model (default), a small Qwen2 (~5M parameters), Qwen2.5-0.5B's shape (GPU)")
    parser.add_argument("--groups", type=int, default=None, help="prompts per step (GRPO groups; default 4)")
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt (default 8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per side (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds (at least 1)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (fp32 master weights either way)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096,
                        help="our runtime.micro_batch_tokens; TRL's micro-batch is sized to the same budget")
    parser.add_argument("--trl-micro-batch", type=int, default=None,
                        help="TRL's per_device_train_batch_size (default: the largest divisor of the batch whose "
                             "padded tokens fit --micro-batch-tokens)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOP/s of the GPU for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 groups x 4 samples, 2 rounds")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compares the two sides on the same weights)")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    quick = {"groups": 2, "samples": 4, "rounds": 2} if args.quick else {}
    for name, default in {"groups": 4, "samples": 8, "rounds": 5}.items():
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, default))
    try:
        import trl
    except ImportError:
        sys.exit(f"TRL is not installed: .venv/bin/pip install trl=={TRL_VERSION} (in the dev extra)")
    if trl.__version__ != TRL_VERSION:
        print(f"warning: TRL {trl.__version__} installed; this benchmark drives TRL {TRL_VERSION}'s GRPOTrainer "
              "internals (compute_loss inputs), which change between releases")

    device = select_device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.model_size == "0.5b" and device.type == "cpu":
        print("note: the 0.5b configuration is meant for a GPU; on CPU a step takes minutes")
    config = TrainConfig(
        grpo=GrpoConfig(learning_rate=args.lr, clip_low=0.2, clip_high=0.2, kl_beta=0.0, loss_aggregation="token_mean",
                        max_grad_norm=1.0, weight_decay=0.0),
        runtime=RuntimeConfig(precision=precision, device=str(device), micro_batch_tokens=args.micro_batch_tokens,
                              seed=args.seed, share_prefix=True),
    )
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        started = time.perf_counter()
        directory = build_model(args.model_size, scratch / "model", device)
        shared = load_policy(str(directory), None, config.runtime)
        unshared = dataclasses.replace(shared, share_prefix=False)  # same model and optimizer, no prefix sharing
        parameters = sum(p.numel() for p in shared.model.parameters())
        vocab = int(shared.model.config.vocab_size)
        sequences = grpo_batch(args.groups, args.samples, vocab, int(shared.tokenizer.pad_token_id), args.seed)
        fill_logprobs(shared, sequences, args.micro_batch_tokens, old=True, reference=False, progress=False)
        optimizer = torch.optim.AdamW(shared.trainable_parameters(), lr=args.lr, weight_decay=0.0)
        normalizer = max(len(s.response_ids) for s in sequences)
        trl_side = build_trl_side(shared, sequences, args, precision == "bf16", scratch)
        print(f"model {args.model_size}: {parameters / 1e6:.1f}M parameters, vocabulary {vocab}, on {device}, "
              f"{precision}; TRL {trl.__version__}, torch {torch.__version__} (set up in "
              f"{time.perf_counter() - started:.1f} s)")

        tokens = sum(s.length for s in sequences)
        response_tokens = sum(len(s.response_ids) for s in sequences)
        print(f"batch: {args.groups} groups x {args.samples} samples = {len(sequences)} sequences, {tokens} tokens "
              f"({response_tokens} response); prompts {SYSTEM_TOKENS} shared + {QUESTION_TOKENS[0]}-"
              f"{QUESTION_TOKENS[1]} per group, responses {RESPONSE_TOKENS[0]}-{RESPONSE_TOKENS[1]}")
        for name, policy in (("ours, prefix sharing", shared), ("ours, no sharing", unshared)):
            passes = list(micro_batches(sequences, args.micro_batch_tokens, policy.prefix_to_share(sequences)))
            print(f"  {name}: {len(passes)} micro-batches (rows {[len(p) for p in passes]})")
        print(f"  TRL: {len(trl_side.micro_batches)} micro-batches of {trl_side.rows} rows x {trl_side.padded_length} "
              f"padded tokens (prompts left-padded, completions right-padded to the batch's longest)")

        sides: dict[str, Callable[[], Any]] = {
            "ours (prefix sharing)": lambda: grpo_step(shared, sequences, config, optimizer, normalizer),
            "ours (no sharing)": lambda: grpo_step(unshared, sequences, config, optimizer, normalizer),
            "TRL GRPOTrainer (dapo)": trl_side.step,
        }
        # Warm-up (allocations, Adam state, kernel compilation); the first two steps run on the same weights.
        first_trl = trl_side.step()
        first_ours = grpo_step(shared, sequences, config, optimizer, normalizer)
        for _ in range(args.warmup - 1):
            trl_side.step()
            grpo_step(shared, sequences, config, optimizer, normalizer)
        for _ in range(args.warmup):
            grpo_step(unshared, sequences, config, optimizer, normalizer)
        print(f"first step on the same weights: loss ours {first_ours['loss']:.6f} / TRL {first_trl[0]:.6f}, "
              f"gradient norm ours {first_ours['grad_norm']:.5f} / TRL {first_trl[1]:.5f}")

        timings = {name: Timings() for name in sides}
        names = list(sides)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            if round_index % 2:
                order.reverse()
            spent = {name: timed(sides[name], device, timings[name]) for name in order}
            print(f"round {round_index + 1}: " + ", ".join(f"{name} {spent[name]:.3f} s" for name in names))

    cuda = device.type == "cuda"
    print(f"\n{len(sequences)} sequences, {tokens} tokens per step, median of {args.rounds} rounds")
    header = f"{'':24} {'s/step':>8} {'tokens/s':>10}"
    if cuda:
        header += f" {'MFU':>7} {'peak MiB':>9}"
    print(header)
    rates = {}
    for name, timing in timings.items():
        seconds = statistics.median(timing.seconds)
        rates[name] = tokens / seconds
        line = f"{name:24} {seconds:8.3f} {rates[name]:10,.0f}"
        if cuda:
            mfu = 6 * parameters * tokens / seconds / (args.peak_tflops * 1e12)
            line += f" {100 * mfu:6.1f}% {max(timing.peak_bytes) / 2**20:9,.0f}"
        print(line)
    if cuda:
        print(f"MFU: 6 x {parameters / 1e6:.0f}M parameters x real tokens / step time / {args.peak_tflops:g} TFLOP/s "
              "(with prefix sharing fewer FLOPs are computed than the batch's model FLOPs counted); peak: allocated "
              "during the step above the start (both copies' weights and Adam states stay resident: "
              f"{torch.cuda.memory_allocated(device) / 2**30:.2f} GiB)")
    trl_rate = rates["TRL GRPOTrainer (dapo)"]
    for name in ("ours (prefix sharing)", "ours (no sharing)"):
        ratio = rates[name] / trl_rate
        print(f"ratio {name} / TRL: {ratio:.2f}x   target >= 1: {'PASS' if ratio >= 1 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()

"""Train the embedded model pair from scratch on the synthetic task (CPU, seeded, resumable).

    python -m bench.train_embedded --size small --out runs/train/small
    python -m bench.train_embedded --size large --out runs/train/large

Each run writes `checkpoint.pt` every `--checkpoint-every` optimizer steps (re-running
the same command resumes from it), a `train.log`, and at the end a model directory
`<out>/model` saved with `save_pretrained` (safetensors in float16, tokenizer,
generation config) that `decoding.HFBackend.from_pretrained` loads like any hub model.

Loss is on solution tokens only. Training problems are drawn on the fly from a seeded
stream, and any problem that is in the calibration or test split is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench.tasks import DEFAULT_CONFIG, RESERVED, TaskConfig, generate_problem, generate_split

__all__ = ["ModelSize", "SIZES", "TrainConfig", "build_tokenizer", "build_model", "train", "main"]

# Every character the task uses; one token each. "\n" is the step delimiter.
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz=+-*;?# \n"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# The chat template turns a problem into the prompt "<s>{problem}\n"; the solution follows.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] | trim }}"
                 "{% endfor %}{{ '\\n' }}")


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


# Heads are 32 wide: vLLM's CPU attention needs head_dim >= 32. Depth, not width, is what
# makes per-token decode time at batch 1 grow on CPU (per-layer call overhead dominates).
SIZES = {
    "small": ModelSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192),
    "medium": ModelSize(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),
    "large": ModelSize(hidden_size=256, num_layers=8, num_heads=8, intermediate_size=768),
    "tiny-test": ModelSize(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64),
}


@dataclass(frozen=True)
class TrainConfig:
    size: str = "small"
    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 200
    log_every: int = 50
    # Fraction of steps at the start drawn from short chains with small values.
    curriculum_fraction: float = 0.1
    bf16: bool = True
    # A saved model directory to start from (a second training phase) instead of random init.
    init_from: str = ""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: a BPE model with no merges over the task's characters."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters join with nothing between them
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _encode_example(tokenizer: PreTrainedTokenizerFast, problem: str, solution: str) -> tuple[list[int], int]:
    prompt = [tokenizer.bos_token_id] + tokenizer.encode(problem + "\n", add_special_tokens=False)
    target = tokenizer.encode(solution, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + target, len(prompt)


def _make_batch(tokenizer, rng: random.Random, batch_size: int, task: TaskConfig,
                excluded: set[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sequences = []
    while len(sequences) < batch_size:
        problem = generate_problem(rng, task)
        if problem.problem in excluded:
            continue
        sequences.append(_encode_example(tokenizer, problem.problem, problem.solution))
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((batch_size, length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, length), -100, dtype=torch.long)
    attention = torch.zeros((batch_size, length), dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, prompt_length: len(ids)] = torch.tensor(ids[prompt_length:])
    return input_ids, attention, labels


def _learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _log(out: Path, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with (out / "train.log").open("a") as handle:
        handle.write(line + "\n")


def train(config: TrainConfig, out: str | Path) -> Path:
    """Train (or resume) one model; returns the saved model directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    tokenizer = build_tokenizer()
    model = build_model(SIZES[config.size], tokenizer, config.seed)
    if config.init_from:
        start = LlamaForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
        model.load_state_dict(start.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(0.9, 0.98), weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    start_step = 0
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        # Fields added after a checkpoint was written count as matching at their defaults.
        # `steps` may grow: extending a run stretches its cosine schedule from here on.
        saved = {**asdict(TrainConfig()), **state["config"], "steps": config.steps}
        if saved != asdict(config):
            raise ValueError(f"{checkpoint_path} was written with another config: {state['config']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start_step = state["step"]
        _log(out, f"resumed at step {start_step}")
    else:
        (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        _log(out, f"start {config.size}: {sum(p.numel() for p in model.parameters())} parameters")

    # Never train on a problem that is held out for calibration or test.
    excluded = {p.problem for split in ("calibration", "test") for p in generate_split(split, RESERVED)}
    easy = replace(DEFAULT_CONFIG, min_steps=1, max_steps=4, max_value=30)
    full = replace(DEFAULT_CONFIG, min_steps=1)
    model.train()
    started = time.time()
    running_loss = 0.0
    for step in range(start_step, config.steps):
        task = easy if step < config.curriculum_fraction * config.steps else full
        input_ids, attention, labels = _make_batch(tokenizer, rng, config.batch_size, task, excluded)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running_loss += loss.item()
        done = step + 1
        if done % config.log_every == 0:
            rate = (done - start_step) / (time.time() - started)
            _log(out, f"step {done}/{config.steps} loss {running_loss / config.log_every:.4f} "
                      f"lr {_learning_rate(step, config):.2e} {rate:.2f} steps/s")
            running_loss = 0.0
        if done % config.checkpoint_every == 0 or done == config.steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                     "step": done, "config": asdict(config)}
            tmp = checkpoint_path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, checkpoint_path)  # atomic: a kill never leaves a torn checkpoint

    model_dir = out / "model"
    model.eval()
    model.to(torch.float16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(model_dir)
    _log(out, f"saved {model_dir}")
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", required=True, help="run directory (checkpoint, log, model/)")
    defaults = TrainConfig()
    for field in ("steps", "batch_size", "seed", "threads", "checkpoint_every", "log_every"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(defaults, field))
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--no-bf16", action="store_true", help="train in float32")
    parser.add_argument("--init-from", default="", help="saved model dir to continue from")
    parser.add_argument("--curriculum-fraction", type=float, default=defaults.curriculum_fraction)
    args = parser.parse_args(argv)
    config = TrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=args.seed, threads=args.threads,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         bf16=not args.no_bf16, init_from=args.init_from,
                         curriculum_fraction=args.curriculum_fraction)
    train(config, args.out)


if __name__ == "__main__":
    main()

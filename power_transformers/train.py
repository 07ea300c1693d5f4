"""Fine-tune a power model with the Trainer on one or several processes (DDP or FSDP2).

The same script runs under every launcher; the engines are PyTorch's and accelerate's own:

    python -m power_transformers.train --model DIR --output OUT ...                   # one process
    torchrun --nproc_per_node 8 -m power_transformers.train --model DIR --output OUT   # DDP
    torchrun --nproc_per_node 8 -m power_transformers.train --engine fsdp2 ...        # FSDP2
    accelerate launch --config_file examples/accelerate/fsdp2.yaml -m power_transformers.train ...

`--model` is a saved power model (`save_pretrained` / the converter's output); `--config` builds a
fresh one from a config.json instead. The training text (`--text`: a file, or one of the texts
shipped in the package) is tokenised by `--tokenizer` or, without one, as UTF-8 bytes (ids 0-255). The global batch is fixed:
per-device batch x processes x accumulation must equal it, which is checked before any step, as is
the FSDP wrap class. `--output` receives one consolidated safetensors checkpoint (loadable by
`from_pretrained` on one device) and `trainer_state.json` with the loss of every step.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator, set_seed

from . import PowerConfig, PowerForCausalLM
from .data import load_text
from .distributed import (
    check_launch_config,
    check_world_size,
    fsdp2_settings,
    fsdp_from_launcher,
    gradient_accumulation_steps,
    world_size,
)
from .data import TokenWindows, byte_ids


#: the TrainingArguments flag for gradient checkpointing: renamed in transformers 5.2x, the old name warns
CHECKPOINTING_ARG = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="folder of a saved power model to fine-tune")
    source.add_argument("--config", help="config.json (or its folder) of a power model to train from scratch")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: UTF-8 bytes as token ids)")
    parser.add_argument("--text", default="emma", help="a UTF-8 text file, or a text shipped in the package: emma, persuasion, cfi_en")
    parser.add_argument("--max-chars", type=int, default=None, help="use only the first characters of the text")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default 512)")
    parser.add_argument("--engine", choices=("auto", "ddp", "fsdp2"), default="auto",
                        help="auto (default): what the launcher configures (DDP under torchrun, the accelerate config's "
                             "choice); ddp: DDP, whatever the launcher; fsdp2: one fully_shard unit per decoder layer")
    parser.add_argument("--fsdp-wrap", default=None,
                        help="comma-separated layer classes FSDP2 shards (default: the model's _no_split_modules)")
    parser.add_argument("--global-batch-size", type=int, default=16, help="sequences per optimizer step, all processes")
    parser.add_argument("--per-device-batch-size", type=int, default=None,
                        help="sequences per process and micro-step (default: global batch / processes)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each decoder layer in the backward (FSDP's own checkpointing under fsdp2)")
    parser.add_argument("--data-order", choices=("random", "sequential"), default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--output", required=True, help="folder for the consolidated checkpoint and trainer_state.json")
    parser.add_argument("--final-logits", type=int, default=0, metavar="N",
                        help="also save the trained model's logits for the first N tokens of the first training window "
                             "(final_logits.pt beside the checkpoint), computed as the engine runs the model, to check a "
                             "reload of the checkpoint against")
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace) -> PowerForCausalLM:
    """The pretrained model, or a fresh one from a config (same seed, hence same weights, on every process)."""
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    set_seed(args.seed)
    config = PowerConfig.from_pretrained(args.config) if os.path.isdir(args.config) else PowerConfig.from_json_file(args.config)
    return PowerForCausalLM(config)


def load_dataset(args: argparse.Namespace, vocab_size: int) -> tuple[TokenWindows, object | None]:
    """Training windows of `--seq-len` tokens, and the tokenizer that made them (None: bytes)."""
    if os.path.isfile(args.text):
        with open(args.text, encoding="utf-8") as f:
            text = f.read()[: args.max_chars]
    else:
        text = load_text(args.text, max_chars=args.max_chars)
    if not args.tokenizer:
        if vocab_size < 256:
            raise ValueError(f"byte-level text needs a vocabulary of at least 256 ids, the model has {vocab_size}: pass --tokenizer")
        return TokenWindows(byte_ids(text), args.seq_len), None
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    return TokenWindows(torch.tensor(tokenizer(text)["input_ids"]), args.seq_len), tokenizer


def save_final_logits(trainer: Trainer, windows: TokenWindows, tokens: int, path: str) -> None:
    """The trained model's logits for the first `tokens` of the first window, as the engine holds
    the model (every process runs it: FSDP2 gathers its shards for the forward, in its compute
    dtype), saved by the main process as {"input_ids", "logits" (fp32), "dtype" (the torch.dtype
    the forward produced)}. The mixed-precision wrapper accelerate puts on forward is taken off first: under it
    an fp32 model computes in bf16 and returns fp32, which no reload reproduces."""
    ids = windows[0]["input_ids"][:tokens][None].to(trainer.args.device)
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if trainer.is_world_process_zero():
        torch.save({"input_ids": ids.cpu(), "logits": logits.float().cpu(), "dtype": logits.dtype}, path)


def engine_in_use(trainer: Trainer) -> str:
    """What actually wraps the model after training: "FSDP2", "DDP" or "single process"."""
    if any(isinstance(p, DTensor) for p in trainer.model_wrapped.parameters()):
        return "FSDP2"
    if isinstance(trainer.model_wrapped, DistributedDataParallel):
        return "DDP"
    return "single process"


def main(argv: list[str] | None = None) -> None:
    """Train, then save the consolidated checkpoint and the step losses under --output."""
    args = parse_args(argv)
    if not 0 <= args.final_logits <= args.seq_len:
        raise ValueError(f"--final-logits {args.final_logits}: the tokens must fit one training window (0 to --seq-len "
                         f"{args.seq_len})")
    processes = world_size()
    per_device = args.per_device_batch_size or max(args.global_batch_size // processes, 1)
    accumulation = gradient_accumulation_steps(args.global_batch_size, per_device, processes)  # raises before any work

    model = load_model(args)
    launcher_fsdp, launcher_checkpointing = fsdp_from_launcher()
    if args.engine == "fsdp2":
        engine = fsdp2_settings(model, args.fsdp_wrap, activation_checkpointing=args.gradient_checkpointing)
        fsdp_checkpointing = args.gradient_checkpointing
    else:
        if args.fsdp_wrap:
            raise ValueError("--fsdp-wrap goes with --engine fsdp2 (accelerate configs set fsdp_transformer_layer_cls_to_wrap)")
        if args.engine == "ddp" and launcher_fsdp:
            raise ValueError("--engine ddp, but the accelerate config asks for FSDP: use a DDP config or --engine auto")
        check_launch_config(model)
        engine, fsdp_checkpointing = {}, launcher_fsdp and launcher_checkpointing
    train, tokenizer = load_dataset(args, model.config.vocab_size)

    training = TrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # without it, CPU processes under torchrun would each train alone
        # FSDP checkpoints its own units; the Trainer refuses both at once
        **{CHECKPOINTING_ARG: args.gradient_checkpointing and not fsdp_checkpointing},
        train_sampling_strategy=args.data_order,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        **engine,
    )
    check_world_size(training)
    trainer = Trainer(
        model=model, args=training, train_dataset=train,
        data_collator=default_data_collator,  # fixed-length windows: nothing to pad
        processing_class=tokenizer,  # saved beside the model
    )
    if (engine or launcher_fsdp) and not trainer.is_fsdp_enabled:
        raise ValueError(
            "FSDP was asked for but accelerate did not enable it: it runs FSDP only on GPUs (and other accelerators), "
            "not on CPU processes, where it would train with DDP instead; use DDP there"
        )
    metrics = trainer.train().metrics
    trainer.save_model(args.output)  # one consolidated safetensors checkpoint, written by the main process
    trainer.save_state()  # trainer_state.json: the loss of every logged step
    if args.final_logits:
        save_final_logits(trainer, train, args.final_logits, os.path.join(args.output, "final_logits.pt"))
    if trainer.is_world_process_zero():
        tokens = args.steps * args.global_batch_size * args.seq_len
        print(f"engine: {engine_in_use(trainer)} on {processes} process(es), global batch {args.global_batch_size} = "
              f"{per_device} per device x {processes} x {accumulation} accumulation")
        print(f"trained {args.steps} steps of {args.global_batch_size} x {args.seq_len} tokens: "
              f"{tokens / metrics['train_runtime']:,.0f} tokens/s; saved to {args.output}")
    if torch.cuda.is_available():  # every process its own, FSDP's sharding shows here
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        print(f"process {rank}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Release the wrapped model (DDP's reducer, FSDP's state) while the process group is still
        # there, then tear the group down before the interpreter exits. In the other order the
        # wrapper was freed when main() returned, after the group was gone, and on CPU (gloo) a
        # finished process now and then hung there or aborted ("terminate called without an active
        # exception"): about one run in twenty of the two-process DDP test, with every output
        # already written.
        trainer.accelerator.free_memory()
        del trainer
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

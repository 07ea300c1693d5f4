"""Settings for fine-tuning power models on several processes with existing engines.

Nothing here trains or wraps a model: DDP, FSDP2, `accelerate` and the `Trainer` do that. What this
module adds is the settings users get wrong, each checked before any step:

- `fsdp2_settings(model)`: the `fsdp` / `fsdp_config` keyword arguments of `TrainingArguments` for
  FSDP2 with one `fully_shard` unit per decoder layer (the classes the model's `_no_split_modules`
  names), checked against the model's own module classes.
- `gradient_accumulation_steps(global_batch, per_device_batch, world_size)`: the accumulation that
  makes `per_device_batch x world_size x steps` equal the global batch, or a ValueError.
- `check_world_size(training_args)`: the Trainer sees every process the launcher started.
- `fsdp_from_launcher()` / `check_launch_config(model)`: what `accelerate launch --config_file` put
  in the environment, and the wrap check for it (accelerate reads it only inside `train()`).

Example (under `torchrun --nproc_per_node N`):

    >>> world = world_size()
    >>> args = TrainingArguments(
    ...     per_device_train_batch_size=4,
    ...     gradient_accumulation_steps=gradient_accumulation_steps(64, 4, world),
    ...     bf16=True, **fsdp2_settings(model), ...)
"""

from __future__ import annotations

import os

from torch import nn


def world_size() -> int:
    """Processes in this run, from the launcher's environment (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def layer_classes_to_wrap(model: nn.Module) -> list[str]:
    """The class names FSDP shards as one unit each: the model's `_no_split_modules` (a decoder layer)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} lists no `_no_split_modules`: name the layer classes to wrap")
    return names


def check_wrap_classes(model: nn.Module, class_names: list[str] | str) -> list[str]:
    """Return `class_names` as a list if every one names a module class inside `model`, else raise ValueError.

    accelerate finds such a name only inside `train()`, after every process has loaded the model
    and the data; this fails at once, naming the classes the model has.
    """
    if isinstance(class_names, str):
        class_names = [name.strip() for name in class_names.split(",") if name.strip()]
    if not class_names:
        raise ValueError("the FSDP wrap policy names no layer class")
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in class_names if name not in present]
    if missing:
        raise ValueError(
            f"the FSDP wrap policy names {missing}, which {type(model).__name__} does not contain; "
            f"its decoder layer classes are {layer_classes_to_wrap(model)} (every class present: {sorted(present)})"
        )
    return list(class_names)


def gradient_accumulation_steps(global_batch: int, per_device_batch: int, world: int) -> int:
    """Steps to accumulate so that one optimizer step sees exactly `global_batch` sequences.

    Raises ValueError when `per_device_batch x world` does not divide `global_batch` (the run would
    otherwise train on another batch size than the one asked for, or differ between world sizes).
    """
    for name, value in (("global batch", global_batch), ("per-device batch", per_device_batch), ("world size", world)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if global_batch % world:
        raise ValueError(f"the global batch {global_batch} is not divisible by the world size {world}")
    per_step = per_device_batch * world
    if global_batch % per_step:
        raise ValueError(
            f"the global batch {global_batch} is not divisible by per-device batch {per_device_batch} x world size "
            f"{world} = {per_step}: choose a per-device batch that divides {global_batch // world}"
        )
    return global_batch // per_step


def fsdp2_settings(
    model: nn.Module, layer_classes: list[str] | str | None = None, activation_checkpointing: bool = False
) -> dict:
    """`TrainingArguments` keywords for FSDP2: one `fully_shard` unit per decoder layer, a consolidated save.

    `layer_classes` defaults to the model's `_no_split_modules` and is checked against the model.
    `activation_checkpointing` uses FSDP's own checkpointing of those units (the Trainer refuses its
    `gradient_checkpointing` flag together with it). `FULL_STATE_DICT` makes `Trainer.save_model`
    write one safetensors checkpoint that `from_pretrained` loads on a single device.
    """
    classes = check_wrap_classes(model, layer_classes or layer_classes_to_wrap(model))
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": classes,
            "reshard_after_forward": True,
            "activation_checkpointing": activation_checkpointing,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def check_world_size(training_args) -> None:
    """Raise ValueError when the Trainer does not see the processes the launcher started.

    On a machine without GPUs, `TrainingArguments` without `use_cpu=True` leaves every process of a
    `torchrun` launch training alone on its own data (transformers 5.x warns once and goes on).
    """
    launched = world_size()
    if training_args.world_size != launched:
        raise ValueError(
            f"the launcher started {launched} processes but the Trainer sees {training_args.world_size}: "
            "on a machine without GPUs pass use_cpu=True to TrainingArguments"
        )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_from_launcher() -> tuple[bool, bool]:
    """(FSDP, FSDP activation checkpointing) as an `accelerate launch --config_file` run asks for them."""
    return _env_flag("ACCELERATE_USE_FSDP"), _env_flag("FSDP_ACTIVATION_CHECKPOINTING")


def check_launch_config(model: nn.Module) -> None:
    """Check the FSDP settings an `accelerate launch --config_file` run put in the environment.

    accelerate reads `FSDP_TRANSFORMER_CLS_TO_WRAP` only when the Trainer prepares the model; this
    raises the same ValueError as `check_wrap_classes` before any step instead.
    """
    if not fsdp_from_launcher()[0]:
        return
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if names:
        check_wrap_classes(model, names)


__all__ = [
    "check_launch_config",
    "check_world_size",
    "check_wrap_classes",
    "fsdp2_settings",
    "fsdp_from_launcher",
    "gradient_accumulation_steps",
    "layer_classes_to_wrap",
    "world_size",
]

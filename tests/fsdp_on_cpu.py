"""Run `power_transformers.train` with accelerate's FSDP2 on CPU processes (a test launcher, not for users).

accelerate turns FSDP on only for accelerator devices: on CPU processes (its MULTI_CPU mode, gloo)
it drops the FSDP plugin, and the Trainer would train with DDP (the script refuses that). PyTorch's
`fully_shard` itself runs on CPU with gloo, so after the Trainer has built its Accelerator this
puts the plugin back; everything else (accelerate's `fsdp2_prepare_model`, its activation
checkpointing, the FULL_STATE_DICT gather in `save_model`) is the code that runs on GPUs.

    torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py --engine fsdp2 ...
    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 tests/fsdp_on_cpu.py ...
"""

import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer

from power_transformers import train
from power_transformers.distributed import fsdp_from_launcher

_create_accelerator = Trainer.create_accelerator_and_postprocess


def create_accelerator_with_fsdp_on_cpu(self: Trainer) -> None:
    _create_accelerator(self)
    asked = self.args.fsdp_plugin_args is not None or fsdp_from_launcher()[0]
    if asked and not self.is_fsdp_enabled:
        plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))  # {}: from the launcher's env
        state = self.accelerator.state
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


Trainer.create_accelerator_and_postprocess = create_accelerator_with_fsdp_on_cpu

if __name__ == "__main__":
    train.main(sys.argv[1:])

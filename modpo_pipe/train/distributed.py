"""Several processes (accelerate): DDP, FSDP or DeepSpeed. With one process and no launcher none of this does
anything: the same loop runs with nothing distributed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from modpo_pipe.config import TrainSettings
from modpo_pipe.errors import ModpoError


def make_accelerator(device_setting: str, trackers: list[str] | None = None, out: Path | None = None) -> Accelerator:
    """The processes `accelerate launch` started (DDP, FSDP or DeepSpeed, from its config), or one process.
    One process needs no accelerate config; device placement stays ours ([model].device). `trackers` log to
    OUT/runs/ (those that write files locally)."""
    from accelerate.utils import ProjectConfiguration

    cpu = device_setting == "cpu" or (device_setting == "auto" and not torch.cuda.is_available())
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "runs")) if out is not None else None
    return Accelerator(cpu=cpu, device_placement=False, log_with=trackers or None, project_config=project)


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_deepspeed(accelerator: Accelerator, t: TrainSettings) -> None:
    """DeepSpeed wants its micro-batch size before it starts (there is no DataLoader to read it from), and
    must not accumulate on its own: modpo-pipe marks the last micro-batch of every step itself."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", t.batch_size), ("gradient_accumulation_steps", 1),
                       ("gradient_clipping", t.max_grad_norm)):
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key == "gradient_accumulation_steps" and config[key] != 1:
            raise ModpoError("the DeepSpeed config sets gradient_accumulation_steps; leave it at auto (or 1) and "
                             "set [train].grad_accum instead")


@contextmanager
def gradient_sync(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> Iterator[None]:
    """Gradients are reduced across processes once a step, in the backward pass of its last micro-batch."""
    accelerator.sync_gradients = last  # also DeepSpeed's accumulation boundary
    if last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def sum_over_processes(accelerator: Accelerator, loss: float, tokens: int) -> tuple[float, int]:
    if accelerator.num_processes == 1:
        return loss, tokens
    total = accelerator.reduce(torch.tensor([loss, tokens], dtype=torch.float64, device=accelerator.device), "sum")
    return total[0].item(), int(total[1].item())


def gather_over_processes(accelerator: Accelerator, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Every process's values of one step, concatenated (for the metrics line)."""
    local = torch.cat(tensors) if tensors else torch.empty(0)
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return torch.cat(gather_object([local]))


def on_main(accelerator: Accelerator, write: Callable[..., None], *args: Any) -> None:
    """Run `write(*args)` on the main process; the others wait for it, and raise the same one-line error if it
    fails (a full disk...), so no process trains on alone."""
    error = None
    if accelerator.is_main_process:
        try:
            write(*args)
        except ModpoError as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([str(error) if error else None])[0]
        if message is not None and error is None:
            raise ModpoError(message)
    if error is not None:
        raise error

"""TRL's side of the peer benchmark: GRPOTrainer with the settings both sides share, a training clock that
does not count saves, and the policies it saves (at wall-clock budgets, or at optimizer steps).

GRPO's settings (TRL 1.16.0): its defaults, except
- num_generations 4 (the issue's setting; TRL's default 8 would halve the prompts per step), with the default
  per_device_train_batch_size 8: 2 prompts x 4 replies per optimizer step;
- max_completion_length = the demo's reply cap, temperature 1.0, top_p 1.0, learning_rate = the demo's: shared
  settings (TRL's default lr 1e-6 is for full fine-tuning; LoRA wants ~1e-4, and the demo uses 1.5e-3);
- bf16 off (TRL turns it on by default): the demo runs float32, and on this CPU bf16 matmuls are slower;
- gradient_checkpointing off (TRL turns it on by default to save GPU memory, at ~20% more time): the demo does
  not checkpoint, and in a wall-clock race it would slow GRPO alone;
- lr_scheduler_type constant (TRL: linear decay to 0 over max_steps): a run cut by the clock has no known last
  step for a decay to aim at, and a run saved along the way should not train differently for where it ends;
- use_cpu, save_strategy "no" (the callback saves), report_to "none", logging every step (records only).
Everything else is TRL's default: beta 0 (no KL term, no reference model), loss_type "dapo", scale_rewards
"group", multi_objective_aggregation "sum_then_normalize", epsilon 0.2, num_iterations 1, top_k 0, warmup 0,
AdamW. Shared with the demo: LoRA r, alpha and targets (dropout 0), the training prompts with the system
message, the seed.

TRL is imported only inside the functions that train (install with `pip install -e '.[peers]'`).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NUM_GENERATIONS = 4
GRPO_BETA = 0.0  # TRL's default: no KL term, no reference model
NOT_COPIED = {"modpo_pipe_embedded.json", "modpo_pipe.json", "README.md"}  # the reference's own records
# GRPOConfig fields the frontier's report lists, as the trainer ran with them (ours and TRL's defaults alike).
REPORTED_ARGS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_generations", "generation_batch_size", "max_completion_length",
    "temperature", "top_p", "top_k", "beta", "loss_type", "scale_rewards", "multi_objective_aggregation",
    "reward_weights", "epsilon", "num_iterations", "mask_truncated_completions", "optim", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "gradient_checkpointing", "seed",
)


# --- the demo's rewards, as TRL reward functions ---------------------------------------------------------------

def _texts(items: list[Any]) -> list[str]:
    """TRL passes conversational prompts and completions as lists of messages; the rewards read the text (of the
    last message: the user's turn of a prompt, the assistant's reply of a completion)."""
    return [item[-1]["content"] if isinstance(item, list) else item for item in items]


def positivity_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    from modpo_pipe.builtin_rewards import positivity

    return positivity(_texts(prompts), _texts(completions))


def concision_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    from modpo_pipe.builtin_rewards import concision

    return concision(_texts(prompts), _texts(completions))


# --- the clock ---------------------------------------------------------------------------------------------------

def budget_due(elapsed: float, last_step_seconds: float, budget: float) -> bool:
    """Save now when this step end is the one nearest the budget: the next one (if it takes as long as the last
    step did) would land further past it than this one falls short. Over many budgets this neither favours nor
    handicaps GRPO by half a step on average, as stopping at the first step past the budget would."""
    return elapsed + last_step_seconds / 2 >= budget


def seconds_due(elapsed: float, last_step_seconds: float, steps: int, budget: float) -> bool:
    return budget_due(elapsed, last_step_seconds, budget)


def step_due(elapsed: float, last_step_seconds: float, steps: int, step: float) -> bool:
    return steps >= step


class TrainingClock:
    """Training seconds since start, saves excluded: calls on_target(index, model, seconds, steps) at the step
    end where each target falls due (`due(elapsed, last_step_seconds, steps, target)`: seconds_due for
    wall-clock budgets, step_due for step counts); step_end() says when the last target is met (training should
    stop)."""

    def __init__(self, targets: list[float], on_target: Callable[[int, Any, float, int], None],
                 due: Callable[[float, float, int, float], bool] = seconds_due) -> None:
        self.targets, self.on_target, self.due = targets, on_target, due

    def start(self) -> None:
        self.started = self.step_started = time.perf_counter()
        self.not_counted = 0.0
        self.next = 0

    def step_end(self, model: Any, steps: int) -> bool:
        now = time.perf_counter()
        elapsed, step_seconds = now - self.started - self.not_counted, now - self.step_started
        while self.next < len(self.targets) and self.due(elapsed, step_seconds, steps, self.targets[self.next]):
            self.on_target(self.next, model, elapsed, steps)
            self.next += 1
        self.step_started = time.perf_counter()
        self.not_counted += self.step_started - now  # the saves
        return self.next == len(self.targets)


def clock_callback(clock: TrainingClock) -> Any:
    """The clock as a TrainerCallback: started with training, told of every optimizer step's end."""
    from transformers import TrainerCallback

    class TrainingClockCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if clock.step_end(model, state.global_step):
                control.should_training_stop = True
            return control

    return TrainingClockCallback()


# --- saving a policy -----------------------------------------------------------------------------------------------

def _write_dir(target: Path, fill: Callable[[Path], None], info: dict[str, Any]) -> None:
    """A directory filled by `fill` plus its modpo_pipe.json (family and weights, which eval reads), written to a
    temporary sibling and renamed into place: a killed save leaves no half policy under the target's name."""
    from modpo_pipe import storage

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    (tmp / "modpo_pipe.json").write_text(json.dumps(info, indent=2) + "\n")
    storage.fsync_files(tmp)
    storage.replace_dir(tmp, target)


def save_merged(model: Any, ref_dir: Path, target: Path, info: dict[str, Any]) -> None:
    """The LoRA-merged policy as a full model directory (safetensors + the reference's tokenizer files);
    training continues on the unmerged original."""

    def fill(tmp: Path) -> None:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged
        for f in ref_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in NOT_COPIED and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)

    _write_dir(target, fill, info)


def save_adapter(model: Any, ref_dir: Path, target: Path, info: dict[str, Any]) -> None:
    """The LoRA adapter alone (tens of MB where a merged model is 517): `modpo-pipe eval` loads an adapter
    directory merged into the base its adapter_config.json names, which is set to the reference here."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(ref_dir)
        config_path.write_text(json.dumps(config, indent=2) + "\n")

    _write_dir(target, fill, info)


def chats(path: Path) -> list[list[dict[str, str]]]:
    """The chats of a prompt file demo.demo_prompts wrote: GRPO's training prompts."""
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- training ------------------------------------------------------------------------------------------------------

def grpo_trainer(w: float, beta: float, prompts: list[list[dict[str, str]]], ref_dir: Path, out: Path,
                 demo: Any, max_steps: int, clock: TrainingClock) -> Any:
    """GRPOTrainer for reward weights [w, 1 - w] with the settings above; `demo` is the demo's Settings (lr,
    reply cap, sampling, LoRA, seed)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from modpo_pipe.demo import LORA_TARGETS

    config = GRPOConfig(
        output_dir=str(out / "trainer"), seed=demo.train.seed, use_cpu=True, bf16=False,
        gradient_checkpointing=False, learning_rate=demo.train.lr, lr_scheduler_type="constant",
        max_steps=max_steps, beta=beta, num_generations=NUM_GENERATIONS,
        max_completion_length=demo.generate.max_new_tokens, temperature=demo.generate.temperature,
        top_p=demo.generate.top_p, reward_weights=[w, 1.0 - w], save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True,
    )
    lora = LoraConfig(r=demo.train.lora_r, lora_alpha=demo.train.lora_alpha, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    return GRPOTrainer(model=model, reward_funcs=[positivity_reward, concision_reward], args=config,
                       train_dataset=Dataset.from_list([{"prompt": chat} for chat in prompts]),
                       processing_class=tokenizer, peft_config=lora, callbacks=[clock_callback(clock)])


def weights_info(w: float) -> dict[str, float]:
    return {"positivity": w, "concision": 1.0 - w}


def train_grpo(w: float, factors: list[float], budgets: list[float], prompts: list[list[dict[str, str]]],
               ref_dir: Path, out: Path, seed: int, beta: float = GRPO_BETA) -> dict[str, Any]:
    """One GRPO policy with reward weights [w, 1 - w], saved merged at every wall-clock budget (the
    equal-time benchmark); returns what it did per factor."""
    from modpo_pipe.demo import DemoSize, demo_settings

    done: dict[str, Any] = {}

    def on_budget(index: int, policy: Any, seconds: float, steps: int) -> None:
        factor = factors[index]
        info = {"family": f"GRPO x{factor:g}", "weights": weights_info(w),
                "grpo": {"budget_factor": factor, "budget_seconds": budgets[index], "seconds": seconds,
                         "steps": steps}}
        save_merged(policy, ref_dir, out / f"x{factor:g}", info)
        done[f"{factor:g}"] = {"seconds": round(seconds, 1), "steps": steps, "beta": beta,
                               "replies": steps * trainer.args.per_device_train_batch_size}
        print(f"GRPO w_positivity={w:g}: saved x{factor:g} after {seconds:.0f} s, {steps} steps", flush=True)

    demo = demo_settings(str(ref_dir), DemoSize(seed=seed))
    trainer = grpo_trainer(w, beta, prompts, ref_dir, out, demo, 1_000_000, TrainingClock(budgets, on_budget))
    trainer.train()
    return done


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:04d}"


def reported_settings(args: Any, lora: dict[str, Any]) -> dict[str, Any]:
    """What the report lists of a run's settings: REPORTED_ARGS as the trainer holds them, and the LoRA."""
    out = {name: getattr(args, name, None) for name in REPORTED_ARGS}
    out = {k: v if isinstance(v, (bool, int, float, str, list, type(None))) else str(v) for k, v in out.items()}
    return out | {f"lora_{k}": v for k, v in lora.items()}


def train_grpo_steps(w: float, beta: float, steps: list[int], prompts: list[list[dict[str, str]]],
                     ref_dir: Path, run_dir: Path, demo: Any) -> dict[str, Any]:
    """One GRPO run with reward weights [w, 1 - w] to the last of `steps` (ascending), its LoRA adapter saved at
    each; returns {"checkpoints": per step (as a string) the training seconds to it (saves not counted) and the
    replies trained on, "settings": reported_settings, "trl_version"}."""
    import trl

    from modpo_pipe.demo import LORA_TARGETS

    done: dict[str, Any] = {}

    def on_step(index: int, policy: Any, seconds: float, at_step: int) -> None:
        info = {"family": f"GRPO beta {beta:g}", "weights": weights_info(w),
                "grpo": {"beta": beta, "step": at_step, "seconds": seconds}}
        save_adapter(policy, ref_dir, checkpoint_dir(run_dir, steps[index]), info)
        done[str(steps[index])] = {"seconds": round(seconds, 2),
                                   "replies": at_step * trainer.args.per_device_train_batch_size}
        print(f"GRPO beta {beta:g} w_positivity={w:g}: step {at_step} after {seconds:.0f} s", flush=True)

    clock = TrainingClock([float(s) for s in steps], on_step, due=step_due)
    trainer = grpo_trainer(w, beta, prompts, ref_dir, run_dir, demo, steps[-1], clock)
    trainer.train()
    shutil.rmtree(run_dir / "trainer", ignore_errors=True)  # TRL's own output dir: nothing in it is used
    lora = {"r": demo.train.lora_r, "alpha": demo.train.lora_alpha, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    return {"checkpoints": done, "settings": reported_settings(trainer.args, lora), "trl_version": trl.__version__}

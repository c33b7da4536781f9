"""The Hugging Face Trainer on onegpu's virtual device: ``from onegpu.integrations.transformers import Trainer``.

The Trainer sees one device. Accelerate runs in its single-process mode (:mod:`.single_process`), so the
Trainer's DataLoader yields the whole global batch on every worker (``per_device_train_batch_size`` x
``gradient_accumulation_steps`` is the global batch: the "device" is the virtual one), and onegpu cuts each
model call to this replica's rows (:mod:`onegpu.runtime.call_slicing`; the workers draw the same batches, as
the sampler's seed and every random state are the same on all). The model, the optimizer and the LR scheduler
the Trainer creates go through ``onegpu.prepare`` once the scheduler exists (``create_scheduler``, called by
every transformers version after the optimizer), with a DataLoader of the training set, so that the planner
(and Advanced Parallelization, when enabled) sees the global batch.

The logged losses are one device's: a Hugging Face token loss is normalised by ``num_items_in_batch``, the
label tokens of all the step's accumulated batches, which the Trainer counts on the global batches. onegpu
counts each call's tokens over the replicas itself (:mod:`onegpu.runtime.loss_weighting`), so the model is called
without it, returns the call's global token mean, and that is rescaled by the call's tokens over
``num_items_in_batch``: the sum over the step's tokens divided by the Trainer's count, as on one device.

Checkpoints are onegpu states (:mod:`.trainer_checkpoints`): sharded, atomic, resumable on any number of
workers and any plan. The Trainer's own data skipping and RNG restore on resume stay as they are; onegpu's
DataLoader position is that of the planning loader, which nothing iterates: batches are skipped once.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader, IterableDataset

from onegpu.api import prepare
from onegpu.errors import UsageError
from onegpu.integrations.single_process import check_model, check_training_args, single_process_accelerate
from onegpu.integrations.trainer_checkpoints import (
    TRAINER_STATE,
    check_resumable,
    checkpoint_directory,
    last_complete,
    rotate,
    state_directory_of,
)
from onegpu.launch.process_group import current_worker
from onegpu.plan import Plan
from onegpu.runtime.gather import gather
from onegpu.runtime.loss_weighting import counted_label_tokens
from onegpu.runtime.state import load_state, save_state

__all__ = ["OnegpuTrainerMixin", "Trainer", "last_checkpoint", "onegpu_trainer"]
last_checkpoint = last_complete  # resume_from_checkpoint=last_checkpoint(output_dir): None on a first start


class OnegpuTrainerMixin:
    """Makes a ``transformers.Trainer`` (or a subclass: TRL's ``SFTTrainer``...) run on onegpu's virtual device;
    put it first among the bases, or use :func:`onegpu_trainer`. Launch with ``onegpu run --workers N train.py``.

    The plan: the simple rule's, Advanced Parallelization's after ``onegpu.enable_advanced_parallelization()``,
    or ``onegpu_plan=onegpu.Plan(...)`` given here (as to ``onegpu.prepare``)."""

    def __init__(self, *args: Any, onegpu_plan: Plan | None = None, **kwargs: Any) -> None:
        training_args = kwargs["args"] if "args" in kwargs else (args[1] if len(args) > 1 else None)
        check_training_args(training_args)
        check_model(kwargs["model"] if "model" in kwargs else (args[0] if args else None))
        self.onegpu_worker, self.onegpu_given_plan = current_worker(), onegpu_plan
        single_process_accelerate(training_args, worker=self.onegpu_worker)
        super().__init__(*args, **kwargs)

    # --- the model, optimizer and scheduler on onegpu ---------------------------------------------------

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)
        if not hasattr(self.model, "onegpu_plan"):
            optimizer = optimizer if optimizer is not None else self.optimizer
            optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the user's
            loader = self._planning_loader()
            objects = (self.model, optimizer, scheduler, *([loader] if loader is not None else []))
            with _inspectable(self.model):
                prepare(*objects, plan=self.onegpu_given_plan)
        return scheduler

    def _planning_loader(self) -> DataLoader | None:
        """The training set in global batches, for the planner; onegpu keeps its position, nothing iterates it."""
        dataset = self.train_dataset
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            return None
        batch, workers = self._train_batch_size, self.onegpu_worker.world_size
        drop_last = self.args.dataloader_drop_last
        if batch < workers:
            raise UsageError(
                f"per_device_train_batch_size={batch} is the global batch under onegpu, split among {workers} "
                f"workers: make it at least {workers}"
            )
        last = len(dataset) % batch
        if 0 < last < workers and not drop_last:
            raise UsageError(
                f"the training set's last batch holds {last} of {len(dataset)} samples, fewer than the {workers} "
                "workers: set dataloader_drop_last=True in the TrainingArguments, or change the batch size"
            )
        trainer_loader = self.get_train_dataloader()  # its dataset and collator as the Trainer made them
        collate = functools.partial(_without_attention_mask, trainer_loader.collate_fn)
        return DataLoader(trainer_loader.dataset, batch_size=batch, collate_fn=collate, drop_last=drop_last)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs: Any):
        tokens = None
        if num_items_in_batch is not None and self._model_counts_its_loss(inputs):
            tokens = counted_label_tokens(self.accelerator.unwrap_model(model), inputs)
        if tokens is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
            )
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        loss = loss * (tokens / num_items_in_batch)  # the call's global mean -> its part of the step's mean
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """The Trainer's, with the logits of the whole global batch (the model returned its replica's rows)."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if logits is not None and hasattr(self.model, "onegpu_plan"):  # a model not yet prepared ran whole
            logits = gather(logits)
        return loss, logits, labels

    def _model_counts_its_loss(self, inputs: dict[str, Any]) -> bool:
        """Whether the model computes a loss from labels itself (not the user's ``compute_loss_func`` or a label
        smoother, which get the global batch's outputs and count themselves)."""
        return (
            self.model_accepts_loss_kwargs
            and self.compute_loss_func is None
            and self.label_smoother is None
            and "labels" in inputs
        )

    # --- checkpoints: onegpu states in checkpoint-<step>/ -----------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            found = last_complete(self.args.output_dir)
            if found is None:
                raise UsageError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint: train "
                    "without it, or give a checkpoint's path"
                )
            resume_from_checkpoint = str(found)
        elif resume_from_checkpoint:
            resume_from_checkpoint = str(check_resumable(resume_from_checkpoint))
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """onegpu's state, every worker's part (sharded, atomic), then the Trainer's RNG and state (rank 0)."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        folder = checkpoint_directory(run_dir, step)
        save_state(folder, step=step, keep=2)  # a resize's save (a later step) beside it pushes nothing out
        best_step = getattr(self.state, "best_global_step", None)
        if best_step and checkpoint_directory(run_dir, best_step).is_dir():
            self.state.best_model_checkpoint = str(checkpoint_directory(run_dir, best_step))
        if not self.args.save_only_model:
            self._save_rng_state(str(folder))
        if not self.args.should_save:
            return
        self._write_trainer_state(folder)
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(folder))
        best = self.state.best_model_checkpoint
        rotate(run_dir, limit=self.args.save_total_limit, keep=Path(best) if best else None)

    def _write_trainer_state(self, folder: Path) -> None:
        """trainer_state.json, last and whole (written beside, then renamed): the checkpoint is complete."""
        from transformers.trainer_callback import ExportableState

        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name, state = type(callback).__name__, callback.state()
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(state)
                else:
                    self.state.stateful_callbacks[name] = state
        written = folder / f".{TRAINER_STATE}.tmp"
        self.state.save_to_json(str(written))
        os.replace(written, folder / TRAINER_STATE)

    def _save_rng_state(self, output_dir: str) -> None:
        if self.args.should_save:  # the random states the loop draws from are the same on every worker
            super()._save_rng_state(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Nothing yet: the weights come with onegpu's state, loaded once the model is prepared."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:  # the model, optimizer, scheduler, every worker's random streams at that step
            load_state(state_directory_of(Path(checkpoint)))

    def _load_best_model(self) -> None:
        load_state(state_directory_of(Path(self.state.best_model_checkpoint)))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The whole model in ``from_pretrained`` format (gathered onto rank 0 when it is split), with the
        tokenizer or processor and the TrainingArguments, as the Trainer saves them."""
        from onegpu.runtime.checkpoint import _fix_architectures, full_state_dict, held_whole, user_class

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        whole = held_whole(self.model)
        state = full_state_dict(self.model) if not whole or self.args.should_save else None
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, state_dict=state)
        _fix_architectures(Path(output_dir) / "config.json", user_class(self.model).__name__)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


# The planner inspects the model on the meta device, where tensors have no values. transformers 5 reads some while
# it builds its attention masks: whether a given mask pads anything, and, without a mask and without a cache (the
# Trainer turns the cache off), whether position ids pack several sequences. So the planner is shown the batches
# without their attention mask, and the model with its cache on: the same costs, no values read.


def _without_attention_mask(collate, rows: list[Any]) -> Any:
    batch = collate(rows)
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return {key: value for key, value in batch.items() if key != "attention_mask"}
    return batch


@contextlib.contextmanager
def _inspectable(model) -> Iterator[None]:
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached is not None:
        config.use_cache = True
    try:
        yield
    finally:
        if cached is not None:
            config.use_cache = cached


@functools.cache
def onegpu_trainer(trainer_class: type) -> type:
    """``trainer_class`` (``transformers.Trainer`` or a subclass, e.g. TRL's ``SFTTrainer``) made onegpu-aware."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, transformers.Trainer)):
        raise UsageError(f"onegpu_trainer() takes transformers.Trainer or a subclass of it, not {trainer_class!r}")
    return type(f"Onegpu{trainer_class.__name__}", (OnegpuTrainerMixin, trainer_class), {})


Trainer = onegpu_trainer(transformers.Trainer)
Trainer.__doc__ = "``transformers.Trainer`` on onegpu's virtual device (see the module's docstring)."

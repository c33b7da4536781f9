"""Worker script: a Hugging Face Trainer run (tests/test_trainer.py).

``train_trainer.py OUT MODE MODEL [PLAN]``: MODE ``plain`` (transformers.Trainer in one plain process, the
reference), ``first`` (onegpu's Trainer, stopped once checkpoint-8 is saved) or ``resume`` (onegpu's Trainer
continuing from the last checkpoint in OUT/../first/); MODEL ``gpt2`` or ``llama``, tiny, built from a config;
PLAN, given to the Trainer: ``fsdp`` (parameters sharded over the workers, and so is the checkpoint) or ``pp``
(a pipeline of 2 stages); without it, the simple rule's.
The logged losses by step, the evaluation losses and the checkpoints left go to OUT/results.json (rank 0).
"""

import json
import os
import sys
from pathlib import Path

import numpy
import torch
import transformers
from torch.nn.utils.rnn import pad_sequence

out, mode, model_name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
plan_name = sys.argv[4] if len(sys.argv) > 4 else None
VOCAB = 101


def build_model():
    torch.manual_seed(0)
    if model_name == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def samples(count: int, seed: int) -> list[dict]:
    """Sequences of 5 to 12 tokens, some label tokens ignored: batches hold different numbers of label tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(5, 13, (1,), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[torch.rand(length, generator=generator) < 0.2] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def collate(rows: list[dict]) -> dict:
    ids = [r["input_ids"] for r in rows]
    batch = {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=0),
        "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
        "labels": pad_sequence([r["labels"] for r in rows], batch_first=True, padding_value=-100),
    }
    if os.environ.get("PAD_TO"):  # one sequence length for every batch
        pad = int(os.environ["PAD_TO"]) - batch["input_ids"].shape[1]
        values = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        batch = {k: torch.nn.functional.pad(v, (0, pad), value=values[k]) for k, v in batch.items()}
    return batch


def label_logit(prediction) -> dict:
    """The mean logit of the next label token: from the logits of every row of the evaluation set."""
    logits, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    picked = numpy.take_along_axis(logits, labels.clip(0)[..., None], axis=-1)[..., 0]
    return {"label_logit": float(picked[labels != -100].mean())}


class Recorder(transformers.TrainerCallback):
    """The logged losses by step; stops the first run once checkpoint-8 is saved (the interruption)."""

    def __init__(self) -> None:
        self.losses, self.eval_losses, self.label_logits = {}, {}, {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.losses[state.global_step] = logs["loss"]
        if "eval_loss" in logs:
            self.eval_losses[state.global_step] = logs["eval_loss"]
            self.label_logits[state.global_step] = logs["eval_label_logit"]

    def on_save(self, args, state, control, **kwargs):
        if mode == "first" and state.global_step == 8:
            control.should_training_stop = True


options = {}
if mode == "plain":
    Trainer = transformers.Trainer
else:
    import onegpu
    from onegpu.integrations.transformers import Trainer

    workers = int(os.environ.get("WORLD_SIZE", 1))
    plans = {
        "fsdp": lambda: onegpu.Plan(dp=workers, sharding="parameters"),
        "pp": lambda: onegpu.Plan(dp=workers // 2, pp=2, microbatches=1, schedule="gpipe"),
    }
    if plan_name is not None:
        options["onegpu_plan"] = plans[plan_name]()
run_dir = out.parent / "first" if mode == "resume" else out
arguments = transformers.TrainingArguments(
    output_dir=str(run_dir), max_steps=12, save_steps=4, save_total_limit=1, logging_steps=1, eval_strategy="steps",
    eval_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=5, gradient_accumulation_steps=2,
    learning_rate=1e-3, weight_decay=0.01, seed=0, report_to=[], disable_tqdm=True, remove_unused_columns=False,
)  # fmt: skip
recorder = Recorder()
trainer = Trainer(model=build_model(), args=arguments, train_dataset=samples(40, seed=1),
                  eval_dataset=samples(10, seed=2), data_collator=collate, callbacks=[recorder], compute_metrics=label_logit,
                  **options)  # fmt: skip
trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
if mode != "first":
    metrics = trainer.evaluate()
    recorder.eval_losses["end"], recorder.label_logits["end"] = metrics["eval_loss"], metrics["eval_label_logit"]
saved = {}
if mode == "first":  # the whole model in from_pretrained format, gathered from the FSDP shards
    trainer.save_model(str(out / "model"))
    batch = collate(samples(3, seed=3))
    trainer.model.eval()
    with torch.no_grad():
        saved["trained"] = trainer.model(**batch).loss.item()
    if trainer.is_world_process_zero():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
        saved["loaded"] = loaded(**batch).loss.item()
        saved["architectures"] = json.loads((out / "model" / "config.json").read_text())["architectures"]
if trainer.is_world_process_zero():
    plan = getattr(trainer.model, "onegpu_plan", None)
    results = {
        "saved_model": saved,
        "losses": recorder.losses,
        "eval_losses": recorder.eval_losses,
        "label_logits": recorder.label_logits,
        "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*")),
        "checkpoint_files": sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("checkpoint-*/**/*")),
        "plan": plan.describe() if plan is not None else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))

"""The demo with Hugging Face's Trainer: an ordinary Trainer script whose one onegpu change is the import.

onegpu run --workers 2 examples/trainer.py                 # fresh, or continues from the newest checkpoint in --out
onegpu run --workers 3 examples/trainer.py                 # the same run continued on 3 workers: the same losses
python examples/trainer.py                                 # one process
"""

import argparse
import sys
from pathlib import Path

from torch.utils.data import Subset
from transformers import TrainingArguments

from onegpu.integrations.transformers import Trainer, last_checkpoint  # was: from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import GLOBAL_BATCH, LR, SEQ_LEN, TextChunks, build_demo_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--out", default="out/demo-trainer")
args = parser.parse_args()

tokenizer = load_tokenizer()
chunks = TextChunks(seq_len=SEQ_LEN, tokenizer=tokenizer)
held_out = len(chunks) // 20
training = TrainingArguments(
    output_dir=args.out,
    max_steps=args.steps,
    per_device_train_batch_size=GLOBAL_BATCH,  # the virtual device's batch: the global batch
    per_device_eval_batch_size=GLOBAL_BATCH,
    learning_rate=LR,
    weight_decay=0.1,
    lr_scheduler_type="cosine",
    logging_steps=10,
    eval_strategy="steps",
    eval_steps=30,
    save_steps=20,  # onegpu's sharded states: they resume on any number of workers
    save_total_limit=2,
    report_to=[],
)
trainer = Trainer(
    model=build_demo_model(vocab_size=len(tokenizer)),
    args=training,
    train_dataset=Subset(chunks, range(held_out, len(chunks))),
    eval_dataset=Subset(chunks, range(200)),
)
trainer.train(resume_from_checkpoint=last_checkpoint(args.out))  # None on a first start
trainer.save_model(f"{args.out}/final")  # from_pretrained format: examples/generate.py out/demo-trainer/final

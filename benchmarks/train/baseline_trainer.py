"""The baseline: a plain transformers Trainer + PEFT LoRA script with padded batches (no packing).

What a user would write without clara: tokenise each record (cut to --max-seq-len), pad every micro-batch to
its longest record, loss on every real token. Prints one JSON line with tokens/s (real, non-padding tokens)
and the padding share, measured from the first to the last training step like clara's own loop.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--out", default="/tmp/clara-bench-baseline")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    with open(args.dataset, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    records = [
        {
            "input_ids": tokenizer(text + tokenizer.eos_token, truncation=True, max_length=args.max_seq_len)[
                "input_ids"
            ]
        }
        for text in texts
    ]
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    pad = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    counted = {"real": 0, "padded": 0}

    def collate(features):
        batch = pad(features)
        counted["real"] += int(batch["attention_mask"].sum())
        counted["padded"] += int(batch["attention_mask"].numel())
        return batch

    timing: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timing["start"] = time.perf_counter()
            timing["tokens0"] = counted["real"]

        def on_train_end(self, *a, **k):
            timing["end"] = time.perf_counter()

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        ),
        train_dataset=records,
        data_collator=collate,
        callbacks=[Clock()],
    )
    trainer.train()
    seconds = timing["end"] - timing["start"]
    tokens = counted["real"] - timing["tokens0"]
    print(
        json.dumps(
            {
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds,
                "padding_share": 1 - counted["real"] / max(1, counted["padded"]),
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The offline demo: generate data -> train a tokenizer -> initialise a small Llama -> train.py -> evaluate.py.

Everything is built here from nothing: no model, tokenizer or dataset is downloaded. On 2 CPU cores it
takes about a quarter of an hour, most of it in train.py. Each step is a command a user could type; the
script prints them as it runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "demo"), help="where data, tokenizer and models go")
    parser.add_argument("--train_minutes", type=float, default=9.0, help="training time budget (sets max steps)")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: from the budget)")
    # small batches: on 2 cores the number of updates, not the batch, limits what the model learns in time
    parser.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--learning_rate", default="1e-3")
    parser.add_argument("--max_devices", type=int, default=4, help="devices listed per system prompt")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", default="small", choices=["small", "medium"], help="generated dataset size")
    parser.add_argument(
        "--rename_devices",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fresh device names and ids in every training example, so that ids must be read from the list",
    )
    parser.add_argument(
        "--train_on_prompts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="loss on the whole conversation: a model from random weights learns the device list too",
    )
    parser.add_argument(
        "--name_first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="list devices as `'Name' entity_id = state` in both splits, so the id follows the name it is found by",
    )
    parser.add_argument("--eval_examples", type=int, default=None, help="evaluate on the first N test examples")
    return parser.parse_args()


def run(*args: str) -> None:
    print("\n$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True)


DEVICE_LINE = re.compile(r"^(\w+)\.(\w+) '([^']+)' = ", re.MULTILINE)


def rename_devices(train_file: Path, seed: int = 0) -> None:
    """Give every device a fresh name and entity id in each training example (same meaning, new words).

    A tiny model shown the same ~150 device names thousands of times memorises them and never learns to
    read the device list; the test split's held-out names then defeat it. Renaming forces it to look the
    device up in the list, which is the skill the test measures. The new names take one or two words from
    all the piles (every language; no word of a held-out test device) and keep the last word (Light, Fan,
    Blinds, ...) so requests still make sense.
    The entity id is the new name's slug, with or without that last word, or other words altogether (as in
    real homes: `media_player.home_theater 'Home Theater Receiver'`), so that no rule derives the id from
    the name: it has to be copied from the list. Devices asked for but not listed (refusals) are renamed
    the same way.
    """
    rng = random.Random(seed)
    names = sorted(pile_device_names(), key=len, reverse=True)
    words = pile_words()
    find_name = re.compile("|".join(re.escape(name) for name in names))

    def rename(turns: list[dict]) -> None:
        renames = {}
        for name in sorted({m for turn in turns for m in find_name.findall(turn["content"])}):
            renames[name] = " ".join(rng.sample(words, rng.randint(1, 2)) + name.split()[-1:])
        for domain, slug, name in DEVICE_LINE.findall(turns[0]["content"]):
            if name in renames:
                renames[f"{domain}.{slug}"] = f"{domain}.{new_entity_slug(renames[name], words, rng)}"
        if not renames:
            return
        pattern = re.compile("|".join(re.escape(old) for old in sorted(renames, key=len, reverse=True)))
        for turn in turns:
            turn["content"] = pattern.sub(lambda m: renames[m.group(0)], turn["content"])

    rewrite_conversations(train_file, rename)


def names_first(path: Path) -> None:
    """Rewrite every Devices line `entity_id 'Name' = state` as `'Name' entity_id = state`."""

    def swap(turns: list[dict]) -> None:
        turns[0]["content"] = DEVICE_LINE.sub(lambda m: f"'{m[3]}' {m[1]}.{m[2]} = ", turns[0]["content"])

    rewrite_conversations(path, swap)


def rewrite_conversations(path: Path, edit: Callable[[list[dict]], None]) -> None:
    """Apply `edit` to the turns of every row of a generated JSONL file, in place."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        edit(row["conversations"])
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def new_entity_slug(name: str, words: list[str], rng: random.Random) -> str:
    """The slug of the whole name, of the name without its last word, or of unrelated words."""
    draw = rng.random()
    if draw < 0.4:
        return slugify(name)
    if draw < 0.8 and len(name.split()) > 1:
        return slugify(" ".join(name.split()[:-1]))
    return slugify(" ".join(rng.sample(words, rng.randint(1, 2))))


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def pile_words() -> list[str]:
    """Capitalised ASCII words of 3+ letters from every pile, minus the words of the test split's device names."""
    piles = REPO / "data" / "piles"
    text = " ".join(path.read_text(encoding="utf-8") for path in sorted(piles.glob("*/*.*")))
    words = {word.capitalize() for word in re.findall(r"\b[A-Za-z]{3,}\b", text)}
    held_out = {word.capitalize() for name in pile_device_names(split="test") for word in name.split()}
    return sorted(words - held_out)


def pile_device_names(language: str = "english", split: str = "train") -> set[str]:
    """The device names of one split of the piles."""
    from chattune.datagen.piles import load_language

    pile = load_language(REPO / "data" / "piles", language)
    return {device.name for devices in pile.devices.values() for device in devices if device.split == split}


def build_tokenizer(train_file: Path, out: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on the generated conversations, saved with a ChatML chat template."""
    from chattune.build_tokenizer import train_bpe_tokenizer

    def texts():
        with train_file.open(encoding="utf-8") as rows:
            for line in rows:
                for turn in json.loads(line)["conversations"]:
                    yield turn["content"]

    tokenizer = train_bpe_tokenizer(texts(), vocab_size=vocab_size, save_to=out)
    print(f"tokenizer: {len(tokenizer)} tokens, ChatML template -> {out}")


def build_model(tokenizer_dir: Path, out: Path, hidden: int, layers: int) -> None:
    """A small Llama-architecture model with random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"model: Llama, {layers} layers x {hidden}, {model.num_parameters() / 1e6:.1f}M parameters -> {out}")


def main() -> int:
    args = parse_args()
    work = Path(args.workdir)
    data, tokenizer_dir, base = work / "data", work / "tokenizer", work / "base-model"
    start = time.time()

    run("data/generate_home_assistant_data.py", "--train", "--test", f"--{args.size}", "--language", "english",
        "--max_devices", str(args.max_devices), "--compact_prompt", "--output_dir", str(data))
    if args.rename_devices:
        rename_devices(data / "home_assistant_train.jsonl")
    if args.name_first:
        for split in ("train", "test"):
            names_first(data / f"home_assistant_{split}.jsonl")
    build_tokenizer(data / "home_assistant_train.jsonl", tokenizer_dir, args.vocab_size)
    build_model(tokenizer_dir, base, args.hidden_size, args.layers)

    steps = args.max_steps or int(args.train_minutes * 60 / SECONDS_PER_STEP)
    run(
        "train.py", "--run_name", "home-demo", "--base_model", str(base),
        "--train_dataset", str(data / "home_assistant_train.jsonl"),
        "--output_dir", str(work), "--overwrite_output_dir", "--ctx_size", "1024",
        "--batch_size", str(args.batch_size), "--micro_batch_size", str(min(16, args.batch_size)),
        "--learning_rate", args.learning_rate, "--learning_rate_warmup", "0.05", "--weight_decay", "0.01",
        "--max_steps", str(steps), "--save_steps", str(steps), "--save_total_limit", "1", "--logging_steps", "50",
        *(["--train_on_prompts"] if args.train_on_prompts else []),
    )  # fmt: skip
    model_dir = work / "models" / "home-demo"
    evaluate = ["evaluate.py", str(model_dir), "--test_dataset", str(data / "home_assistant_test.jsonl"),
                "--batch_size", "32"]
    if args.eval_examples:
        evaluate += ["--max_examples", str(args.eval_examples)]
    run(*evaluate)

    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min")
    print(f"model: {model_dir}  (TensorBoard logs: {work / 'runs' / 'home-demo'})")
    print(f"try it: python3 find_split.py {model_dir}")
    return 0


SECONDS_PER_STEP = 0.27  # measured on 2 CPU cores for the default model and batch; sets max_steps from the budget

if __name__ == "__main__":
    sys.exit(main())

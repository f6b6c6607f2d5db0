"""Shared fixtures: real tokenizers from ../shared (skipped when absent), a tokenizer the tests train
themselves, and tiny random-weight models built from a config. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
SHARED_TOKENIZERS = REPO.parent / "shared" / "tokenizers"
SHARED_NAMES = ("qwen2-instruct", "mistral-v1-instruct", "gpt2-no-template")
# The installed package's console scripts, and the checkout's entry script each one runs the same as.
CONSOLE_SCRIPTS = {
    "chattune-train": "train.py",
    "chattune-eval": "evaluate.py",
    "chattune-find-split": "find_split.py",
    "chattune-data": "data/generate_home_assistant_data.py",
    "chattune-grammar": "scripts/house_grammar.py",
    "chattune-export": "scripts/export_gguf.py",
}

# Special tokens of the chat-template families the tests write inline (see tests/templates.py).
TEST_SPECIALS = (
    "<s>",
    "</s>",
    "<|pad|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "[INST]",
    "[/INST]",
)
CORPUS = [
    "The kitchen light is on. Turn off the garage door and set the fan to 50%.",
    "user assistant system model: Hello there! How can I help you today?",
    'Here is JSON: {"service": "light.turn_on", "target_device": "light.kitchen"} and code ```python\nprint(1)\n```',
    "Grüße aus München, ça va? ¿Qué tal? Zażółć gęślą jaźń. 日本語のテキスト. Emoji 🙂 and tabs\tand\nnewlines.",
    "   leading and trailing spaces   ",
] * 30


def shared_tokenizer_path(name: str) -> Path:
    path = SHARED_TOKENIZERS / name
    if not path.is_dir():
        pytest.skip(f"real tokenizers not available: {SHARED_TOKENIZERS} is missing (fresh clone without ../shared)")
    return path


@pytest.fixture(scope="session")
def test_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer trained here, with the special tokens of every tested family."""
    from chattune.data.build_tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("test-tokenizer")
    train_bpe_tokenizer(
        CORPUS,
        vocab_size=600,
        special_tokens=TEST_SPECIALS,
        eos_token="</s>",
        pad_token="<|pad|>",
        bos_token="<s>",
        save_to=path,
    )
    return path


@pytest.fixture(scope="session")
def test_tokenizer(test_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_tokenizer_dir)


# The architectures tests build tiny models of: transformers' config class name, and what differs from the rest.
TINY_ARCHS = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "head_dim": 16}),
    # Gemma: heads wider than hidden_size / heads, as Gemma's are, and a window shorter than the test texts.
    "gemma2": (
        "Gemma2Config",
        {"num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_key_value_heads": 2,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi": ("PhiConfig", {}),  # home-llm's Phi-2 family: no grouped-query attention
    "phi3": ("Phi3Config", {}),
    "stablelm": ("StableLmConfig", {}),
    # hidden_size, num_hidden_layers, ... are GPT-2's n_embd, n_layer, ...; an architecture GGUF export refuses
    "gpt2": ("GPT2Config", {}),
}


def tiny_config(arch: str = "llama", vocab_size: int = 64, tokenizer=None, **overrides):
    """The config of a 2-layer, 64-wide random-weight model of `arch` (see TINY_ARCHS)."""
    import transformers

    class_name, extra = TINY_ARCHS[arch]
    values = dict(
        vocab_size=len(tokenizer) if tokenizer is not None else vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **extra,
    )
    if tokenizer is not None:
        values.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return getattr(transformers, class_name)(**{**values, **overrides})


def make_tiny_model(tokenizer_dir: Path, out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random-weight model of `arch` whose vocabulary fits the tokenizer, saved with it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer=tokenizer, **overrides)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_gemma_like_tokenizer(path: Path, chat_template: str) -> Path:
    """Gemma's kind of tokenizer (transformers' GemmaTokenizer: spaces spelled "▁" by a normalizer, no "▁" put
    before text) over Mistral's SentencePiece vocabulary (../shared), with Gemma's special tokens, turn markers
    and `chat_template`."""
    import json

    from transformers import GemmaTokenizer

    source = json.loads((shared_tokenizer_path("mistral-v1-instruct") / "tokenizer.json").read_text())["model"]
    vocab = dict(source["vocab"])
    vocab["<bos>"], vocab["<eos>"] = vocab.pop("<s>"), vocab.pop("</s>")
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[tuple(merge) for merge in source["merges"]])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return path


def load_llama(path: Path, **kwargs):
    """chattune's llama_cpp.Llama loader (safe from the AMX backend's crash), skipping the test when
    llama-cpp-python is not installed (it is not a dependency: installing it compiles llama.cpp)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from chattune.evaluation.llama_cpp import load_llama as load

    return load(path, **kwargs)


@pytest.fixture(scope="session")
def tiny_model_dir(test_tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_model(test_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def chat_rows(n: int = 24) -> list[dict]:
    """Small ShareGPT-style smart-home conversations, some multi-turn."""
    rows = []
    for i in range(n):
        turns = [
            {"from": "system", "value": "You control the house. Devices: light.kitchen, fan.bedroom"},
            {"from": "human", "value": f"Turn on the kitchen light number {i}"},
            {
                "from": "gpt",
                "value": f'Turning it on.\n```homeassistant\n{{"service": "light.turn_on", "n": {i}}}\n```',
            },
        ]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "And the fan?"}, {"from": "gpt", "value": "The fan is on too."}]
        rows.append({"conversations": turns})
    return rows


def train_argv(base, data, out, *extra: str, run_name: str = "run", **flags) -> list[str]:
    """train.py's arguments for a short test run: the run, base model, data and output root, then `flags` as
    `--name value` (by default micro-batches of 2 in batches of 4, and no logger), then `extra` as written
    (a flag given twice: the later one wins)."""
    argv = ["--run_name", run_name, "--base_model", str(base), "--train_dataset", str(data), "--output_dir", str(out)]
    for name, value in {"batch_size": 4, "micro_batch_size": 2, "report_to": "none", **flags}.items():
        argv += [f"--{name}", str(value)]
    return [*argv, *extra]


def generates(folder: Path) -> None:
    """The saved model folder loads with its tokenizer and greedily answers a chat prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]


def run_script(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's entry scripts in a subprocess, as a user would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def accelerate(*launch_args: str) -> list[str]:
    """`accelerate launch ...` as a module of this interpreter (torchrun underneath; gloo on CPU)."""
    accelerate_cli = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate_cli, "accelerate is not installed next to this Python"
    return [
        accelerate_cli,
        "launch",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        free_port(),
        *launch_args,
    ]


def launch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command line (one thread per process: the processes share the machine's cores)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(args), cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=600)


LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
    "<|reserved_2|>",
    "<|reserved_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_4|>",
    "<|eot_id|>",
]


def make_llama3_like_tokenizer(path: Path) -> Path:
    """A byte-level BPE whose ids for the Llama 3 chat markers are the real ones (128006 = start header,
    78191 = "assistant", 271 = "\\n\\n", 128009 = end of turn), so home-llm's Llama 3 command runs unchanged."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from templates import LLAMA3

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges, word = [], "a"
    for char in "ssistant":
        merges.append((word, char))
        word += char
        vocab[word] = 78191 if word == "assistant" else 1000 + len(merges)
    merges.append(("Ċ", "Ċ"))
    vocab["ĊĊ"] = 271
    used = set(vocab.values())
    vocab.update({f"<|unused_{i}|>": i for i in range(128000) if i not in used})  # ids up to 128000 are taken
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    for token in LLAMA3_SPECIALS:  # appended in order: 128000, 128001, ...
        core.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer.chat_template = LLAMA3
    tokenizer.save_pretrained(path)
    return path

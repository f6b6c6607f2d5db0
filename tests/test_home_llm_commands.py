"""Every command of home-llm's training guide (../shared/reference/home-llm-training-guide.md), read from the guide
itself, runs here with its flags unchanged. Only what a CPU needs changes: `--base_model` becomes a tiny
random-weight model of the same architecture family (with the same tokenizer family where ../shared/tokenizers has
one; GUIDE_RUNS names the stand-in where it has not), `--ctx_size 2048` becomes 512, `--max_steps` is appended,
and the data files are a few generated rows. Each run must leave an output folder that loads, whose loss on the
training rows is lower than the base model's (computed here in float64, so that the guide's learning rates of
2e-7 to 2e-5 still show after two steps).

The table GUIDE_RUNS holds one entry per `train.py` command of the guide: a command added to, or dropped from, the
guide fails test_every_guide_command_is_in_the_table.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (
    REPO,
    TRAIN,
    accelerate,
    launch,
    make_llama3_like_tokenizer,
    run_script,
    shared_tokenizer_path,
    tiny_config,
)

GUIDE = REPO.parent / "shared" / "reference" / "home-llm-training-guide.md"
CTX_SIZE = "512"  # every guide command says 2048
STEPS = "2"
TINY = {"hidden_size": 32, "intermediate_size": 64}  # the vocabulary matrices dominate; keep the rest small
# StableLmConfig's default of 32 key-value heads does not fit a 4-head model; StableLM Zephyr has no GQA either.
ARCH_OVERRIDES = {"stablelm": {"num_key_value_heads": 4}}


@dataclass(frozen=True)
class GuideRun:
    """How one guide command runs here: its architecture, the tokenizer standing in for its model's, and what kind
    of run it is ("sft", "dpo", "fsdp": through accelerate with 2 processes, "parse": its flags are read only)."""

    arch: str
    tokenizer: str
    kind: str = "sft"
    vocab_size: int | None = None  # the real model's embedding rows, where they exceed its tokenizer's


# run_name -> how it runs. Tokenizers (see TOKENIZERS): "qwen2" and "mistral" are the real ones in ../shared;
# "llama3" has Llama 3's real ids for its chat markers (conftest.make_llama3_like_tokenizer). ../shared has no
# Llama 2 / TinyLlama / Polka / Phi-3 SentencePiece vocabulary: Mistral v0.1's 32,000-piece SentencePiece (the
# same family) stands in, with the model's own chat template and added tokens. It has no GPT-NeoX (StableLM Zephyr
# 3B), Arcade100k (StableLM 2) or CodeGen (Phi-1.5, Phi-2) vocabulary: GPT-2's byte-level BPE stands in.
GUIDE_RUNS = {
    "home-phi3-mini-rev1": GuideRun("phi3", "sentencepiece-phi3"),
    "Home-3B-v2_ha-GGUF": GuideRun("phi", "gpt2", vocab_size=51200),  # Phi-2: --add_chatml_tokens, LoRA, merge
    "home-1b-rev6": GuideRun("phi", "gpt2", vocab_size=51200),  # Phi-1.5: --add_chatml_tokens, full
    "stablehome-1_6b-rev3": GuideRun("stablelm", "gpt2-zephyr"),
    "stablehome-3b-rev10": GuideRun("stablelm", "gpt2-zephyr", kind="fsdp"),
    "stablehome-3b-rev9-dpo": GuideRun("stablelm", "gpt2-zephyr", kind="dpo"),
    "stablehome-3b-rev8": GuideRun("stablelm", "gpt2-zephyr"),  # LoRA r64, merge
    "llamahome-8b-rev1": GuideRun("llama", "llama3"),  # LoRA, no merge
    "home-7b-rev2": GuideRun("llama", "mistral", kind="parse"),  # GPTQ: branch-independent parse only
    "mistralhome-bielik-rev1": GuideRun("mistral", "mistral"),  # QLoRA through bitsandbytes
    "tinyhome-rev4": GuideRun("llama", "sentencepiece-zephyr"),
    "tinyhome-qwen-rev3": GuideRun("qwen2", "qwen2"),
    "tinyhome-polish-rev1": GuideRun("llama", "sentencepiece-chatml"),
    "tinyhome-rev2-dpo": GuideRun("llama", "sentencepiece-zephyr", kind="dpo"),
    "Home-Llama-3.2-3B-rev1": GuideRun("llama", "llama3"),
}


# --- the guide, read --------------------------------------------------------------------------------------------


def guide_text() -> str:
    if not GUIDE.is_file():
        pytest.skip(f"home-llm's training guide is not available: {GUIDE} is missing (fresh clone without ../shared)")
    return GUIDE.read_text(encoding="utf-8")


def guide_commands(program: str) -> list[list[str]]:
    """The guide's complete commands that run `program`, as argument lists: every code block, with its
    backslash-continued lines joined; fragments that say `...` are not commands."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", guide_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if program not in line:  # the blocks also hold console output, which shlex cannot always read
                continue
            words = shlex.split(line)
            if program in words and "..." not in words:
                commands.append(words)
    return commands


def train_command(run_name: str) -> list[str]:
    matches = [words for words in guide_commands("train.py") if flag_value(words, "--run_name") == run_name]
    assert len(matches) == 1, f"the guide has {len(matches)} train.py commands with --run_name {run_name}"
    return matches[0]


def flag_value(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def train_args(words: list[str], base_model: str | None = None) -> list[str]:
    """The arguments after train.py, sized for a CPU: the tiny base model, --ctx_size 512 and --max_steps."""
    args = list(words[words.index("train.py") + 1 :])
    if base_model is not None:
        args[args.index("--base_model") + 1] = base_model
    if "--ctx_size" in args:  # all but the GPTQ command, which keeps train.py's default
        args[args.index("--ctx_size") + 1] = CTX_SIZE
    return [*args, "--max_steps", STEPS]


def test_every_guide_command_is_in_the_table():
    names = [flag_value(words, "--run_name") for words in guide_commands("train.py")]
    assert len(names) == len(set(names)) == 15
    assert set(names) == set(GUIDE_RUNS)


# --- stand-in tokenizers and tiny models --------------------------------------------------------------------------


def sentencepiece_with(template: str, specials: list[str], path: Path) -> Path:
    """Mistral v0.1's SentencePiece vocabulary with another family's chat markers and template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_tokenizer_path("mistral-v1-instruct"))
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


def gpt2_with_zephyr(path: Path) -> Path:
    """StableLM Zephyr's format on a GPT-2 vocabulary: `<|user|>` ... `<|endoftext|>`, as plain text markers."""
    from transformers import AutoTokenizer

    from templates import ZEPHYR

    tokenizer = AutoTokenizer.from_pretrained(shared_tokenizer_path("gpt2-no-template"))
    tokenizer.chat_template = ZEPHYR
    tokenizer.save_pretrained(path)
    return path


def build_tokenizer(name: str, path: Path) -> Path:
    from chattune.models.chatml import CHATML_TEMPLATE
    from templates import PHI3, ZEPHYR

    builders = {
        "qwen2": lambda: shared_tokenizer_path("qwen2-instruct"),
        "mistral": lambda: shared_tokenizer_path("mistral-v1-instruct"),
        "gpt2": lambda: shared_tokenizer_path("gpt2-no-template"),
        "gpt2-zephyr": lambda: gpt2_with_zephyr(path),
        "llama3": lambda: make_llama3_like_tokenizer(path),
        "sentencepiece-zephyr": lambda: sentencepiece_with(ZEPHYR, [], path),  # TinyLlama: markers as text
        "sentencepiece-chatml": lambda: sentencepiece_with(CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], path),
        "sentencepiece-phi3": lambda: sentencepiece_with(
            PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], path
        ),
    }
    return builders[name]()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_tokenizer(name, tmp_path_factory.mktemp(f"tokenizer-{name}"))
        return cache[name]

    return get


def make_base(run: GuideRun, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(run.arch, tokenizer=tokenizer, **TINY, **ARCH_OVERRIDES.get(run.arch, {}))
    config.vocab_size = max(run.vocab_size or 0, len(tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- data: a few rows of the generator's output -------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The generator's train, test and DPO files, small and short (4 devices, compact prompts)."""
    from chattune.domains.homeassistant.datagen.cli import main as generate

    out = tmp_path_factory.mktemp("generated")
    argv = ["--train", "--test", "--dpo", "--small", "--language", "english", "--max_devices", "4"]
    assert generate([*argv, "--compact_prompt", "--output_dir", str(out)]) == 0
    return out


@pytest.fixture
def workdir(tmp_path, generated) -> Path:
    """A folder laid out like a home-llm checkout, where the guide's relative paths resolve: data/*.jsonl."""
    (tmp_path / "data").mkdir()
    for name, rows in (("train", 8), ("test", 4), ("dpo", 8)):
        lines = (generated / f"home_assistant_{name}.jsonl").read_text(encoding="utf-8").splitlines()[:rows]
        (tmp_path / "data" / f"home_assistant_{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


# --- what a run left, measured ------------------------------------------------------------------------------------


def load_float64(folder: Path, adapter: Path | None = None, quantized: bool = False):
    """A saved model (and adapter) in float64; a 4-bit base stays as bitsandbytes loads it, computing in float32."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantized:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if not quantized:
            model = model.double()
    return model.eval()


def sft_loss(model, tokenizer_dir: Path, data: Path) -> float:
    """The mean loss on the assistant tokens of `data`, masked as train.py masks them."""
    import torch
    from transformers import AutoTokenizer

    from chattune.data.formats import load_rows
    from chattune.data.masking import ChatMasker
    from chattune.data.tokenization import tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows, _ = tokenize_dataset(load_rows(data), tokenizer, ChatMasker(tokenizer), source="auto", ctx_size=int(CTX_SIZE))
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
            labels = torch.tensor([labels])
            out = model(input_ids=torch.tensor([ids]), labels=labels)
            tokens = int((labels[:, 1:] != -100).sum())
            total, count = total + out.loss.item() * tokens, count + tokens
    return total / count


def response_log_prob(model, tokenizer, prompt: list[dict], answer: str) -> float:
    import torch

    start = len(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0, :-1]
    picked = torch.log_softmax(logits, -1).gather(1, torch.tensor(full[1:]).unsqueeze(1)).squeeze(1)
    return picked[start - 1 :].sum().item()


def dpo_loss(policy, reference, tokenizer_dir: Path, pairs: Path, beta: float) -> float:
    """The mean sigmoid DPO loss of `policy` against `reference` on the pairs: log 2 when they are the same model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    losses = []
    for line in pairs.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]
        margins = [
            response_log_prob(model, tokenizer, prompt, row["chosen"])
            - response_log_prob(model, tokenizer, prompt, row["rejected"])
            for model in (policy, reference)
        ]
        losses.append(math.log1p(math.exp(-beta * (margins[0] - margins[1]))))
    return sum(losses) / len(losses)


# --- the commands, run -------------------------------------------------------------------------------------------


def run_in_process(args: list[str], workdir: Path, monkeypatch) -> None:
    """train.py's own main, in this process (the imports are paid once per test worker, not once per command)."""
    from chattune.commands.train import main

    monkeypatch.chdir(workdir)
    assert main(args) == 0


def outputs(words: list[str], workdir: Path) -> tuple[Path | None, Path | None]:
    """The run's model folder and adapter folder, each when the command writes one."""
    name = flag_value(words, "--run_name")
    lora = "--use_lora" in words
    model = workdir / "models" / name if not lora or "--lora_merge" in words else None
    return model, (workdir / "loras" / name if lora else None)


def assert_sft_loss_fell(words: list[str], base: Path, workdir: Path) -> None:
    model_dir, adapter = outputs(words, workdir)
    data = workdir / flag_value(words, "--train_dataset")
    quantized = "--load_in_4bit" in words
    tokenizer_dir = model_dir or adapter
    before = sft_loss(load_float64(base, quantized=quantized), tokenizer_dir, data)
    if model_dir is not None:
        after = sft_loss(load_float64(model_dir), tokenizer_dir, data)
        if adapter is not None:  # the merged model is the base plus the adapter
            assert sft_loss(load_float64(base, adapter), tokenizer_dir, data) == pytest.approx(after, rel=1e-6)
    else:
        after = sft_loss(load_float64(base, adapter, quantized=quantized), tokenizer_dir, data)
    assert after < before, f"the loss on the training rows did not fall: {before} -> {after}"


def single_process_runs() -> list[str]:
    return [name for name, run in GUIDE_RUNS.items() if run.kind in ("sft", "dpo")]


@pytest.mark.slow
@pytest.mark.parametrize("run_name", single_process_runs())
def test_guide_command_trains(run_name, tokenizers, workdir, monkeypatch):
    run = GUIDE_RUNS[run_name]
    words = train_command(run_name)
    tokenizer_dir = tokenizers(run.tokenizer)
    if run.kind == "dpo":  # the guide's DPO runs start from a local folder: the SFT run before them
        base = make_base(run, tokenizer_dir, workdir / flag_value(words, "--base_model"))
        run_in_process(train_args(words), workdir, monkeypatch)
        model_dir = workdir / "models" / run_name
        beta = float(flag_value(words, "--beta"))
        pairs = workdir / flag_value(words, "--train_dataset")
        after = dpo_loss(load_float64(model_dir), load_float64(base), model_dir, pairs, beta)
        assert after < math.log(2), f"the DPO loss did not fall below log 2 = {math.log(2)}: {after}"
        return
    base = make_base(run, tokenizer_dir, workdir / "base")
    run_in_process(train_args(words, str(base)), workdir, monkeypatch)
    assert_sft_loss_fell(words, base, workdir)


@pytest.mark.slow
def test_guide_fsdp_command_full_fine_tunes_on_two_processes(tokenizers, workdir):
    """`accelerate launch --config_file fsdp_config.yaml train.py ...`, the shipped config, on 2 CPU processes."""
    run_name = next(name for name, run in GUIDE_RUNS.items() if run.kind == "fsdp")
    words = train_command(run_name)
    launcher = words[words.index("launch") + 1 : words.index("train.py")]
    launcher[launcher.index("--config_file") + 1] = str(REPO / flag_value(launcher, "--config_file"))
    base = make_base(GUIDE_RUNS[run_name], tokenizers(GUIDE_RUNS[run_name].tokenizer), workdir / "base")
    result = launch(*accelerate(*launcher, "--num_processes", "2"), TRAIN, *train_args(words, str(base)), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stderr
    assert "--eval_steps: no evaluation runs without --test_dataset; ignored" in result.stderr
    assert "--use_lora" not in words  # a full fine-tune: every weight was sharded, trained and gathered
    assert_sft_loss_fell(words, base, workdir)


def test_guide_gptq_command_is_read_as_written():
    """The Llama 2 GPTQ command's flags parse to what it asks (its run needs a GPTQ checkpoint and gptqmodel)."""
    from chattune.config.flags import parse_flags

    words = train_command("home-7b-rev2")
    flags = parse_flags(train_args(words))
    assert flags.load_as_gptq and flags.use_lora and flags.quantized and flags.add_pad_token and flags.bf16
    assert flags.base_model == "TheBloke/Llama-2-7B-GPTQ"
    assert (flags.micro_batch_size, flags.learning_rate) == (4, 2e-5)


# --- the generator and find_split, as the guide runs them ---------------------------------------------------------


@pytest.mark.slow
def test_guide_generator_command(tmp_path):
    """The Llama 3.2 section's data command: 15,000 examples per language, in four languages, ShareGPT rows."""
    (words,) = guide_commands("generate_home_assistant_data.py")
    args = words[words.index("generate_home_assistant_data.py") + 1 :]
    generator = REPO / "data" / "generate_home_assistant_data.py"
    result = run_script(str(generator), *args, "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "home_assistant_train.jsonl").read_text().splitlines()]
    languages = words[words.index("--language") + 1 :]
    assert len(rows) == 15000 * len(languages)
    assert {row["language"] for row in rows} == set(languages)
    assert all([turn["role"] for turn in row["conversations"]][-1] == "assistant" for row in rows)
    assert (tmp_path / "home_assistant_test.jsonl").stat().st_size > 0


def known_ids() -> dict[str, tuple[list[int], list[int]]]:
    """The guide's "Known prefix and suffix IDs": model name -> (prefix ids, suffix ids)."""
    section = guide_text().split("#### Known prefix and suffix IDs", 1)[1].split("\n## ", 1)[0]
    known = {}
    for name, block in re.findall(r"^([\w.-]+):\n```\w*\n(.*?)```", section, flags=re.M | re.S):
        prefix, suffix = (re.search(rf"--{kind}[-_]ids ([\d,]+)", block).group(1) for kind in ("prefix", "suffix"))
        known[name] = ([int(i) for i in prefix.split(",")], [int(i) for i in suffix.split(",")])
    return known


# The guide's four tokenizers -> the one standing in here, and whether its ids are the real model's.
FIND_SPLIT_TOKENIZERS = {
    "tinyllama": ("sentencepiece-zephyr", False),  # Llama 2's vocabulary is not in ../shared
    "qwen2": ("qwen2", True),
    "polka-1.1": ("sentencepiece-chatml", False),  # Polka's extended Llama 2 vocabulary is not in ../shared
    "Llama-3-8B-Instruct": ("llama3", True),  # a byte-level BPE with Llama 3's real ids for the chat markers
}


def test_the_guide_names_four_tokenizers_with_known_ids():
    assert set(known_ids()) == set(FIND_SPLIT_TOKENIZERS)


@pytest.mark.parametrize("name", FIND_SPLIT_TOKENIZERS)
def test_find_split_on_the_guides_tokenizers(name, tokenizers):
    """find_split's ids are the guide's where the vocabulary is the real one: the same prefix, and the suffix up to
    the end-of-turn token (the guide's suffixes run on into the next turn's first tokens, which train.py trims); with
    a stand-in vocabulary, the same marker text."""
    from transformers import AutoTokenizer

    from chattune.data.split_finder import find_split

    stand_in, real_ids = FIND_SPLIT_TOKENIZERS[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizers(stand_in))
    report = find_split(tokenizer, name)
    assert report.verified and report.auto_mode_matches, report.notes
    prefix, suffix = known_ids()[name]
    if real_ids:
        assert report.prefix_ids == prefix
        assert report.suffix_ids == suffix[: len(report.suffix_ids)]
        return
    text = tokenizer.decode(report.prefix_ids) + "|" + tokenizer.decode(report.suffix_ids)
    assert text == {"tinyllama": "<|assistant|>\n|</s>", "polka-1.1": "<|im_start|>assistant\n|<|im_end|>"}[name]


def test_guide_find_split_command(tokenizers):
    """`python3 find_split.py NousResearch/Meta-Llama-3.1-8B-Instruct`, on the Llama 3 stand-in: the ids it prints
    are the ones the guide shows."""
    (words,) = guide_commands("find_split.py")
    args = [str(tokenizers("llama3")) if arg.startswith("NousResearch/") else arg for arg in words[2:]]
    result = run_script(str(REPO / "find_split.py"), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    prefix, _ = known_ids()["Llama-3-8B-Instruct"]
    assert f"--prefix_ids {','.join(map(str, prefix))}" in result.stdout
    assert "--suffix_ids 128009" in result.stdout


@pytest.mark.parametrize("name", [name for name, (_, real) in FIND_SPLIT_TOKENIZERS.items() if real])
def test_the_guides_known_ids_label_what_automatic_masking_labels(name, tokenizers, workdir):
    """Given to train.py as --prefix_ids/--suffix_ids, the guide's ids label the tokens automatic masking labels,
    plus what their suffix adds after the end-of-turn token that the next turn does not start with (Llama 3's
    suffix runs on into the next header, which train.py trims; Qwen2's newline after <|im_end|> stays)."""
    from transformers import AutoTokenizer

    from chattune.data.formats import load_rows
    from chattune.data.masking import ChatMasker, trim_suffix_overlap
    from chattune.data.tokenization import tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizers(FIND_SPLIT_TOKENIZERS[name][0]))
    rows = load_rows(workdir / "data" / "home_assistant_train.jsonl")
    prefix, suffix = known_ids()[name]
    masker, size = ChatMasker(tokenizer), int(CTX_SIZE)
    auto, _ = tokenize_dataset(rows, tokenizer, masker, source="auto", ctx_size=size)
    explicit, _ = tokenize_dataset(
        rows,
        tokenizer,
        masker,
        source="ids",
        ctx_size=size,
        prefix_ids=prefix,
        suffix_ids=trim_suffix_overlap(prefix, suffix),
    )
    assert any(label != -100 for labels in auto["labels"] for label in labels)
    for automatic, given in zip(auto["labels"], explicit["labels"], strict=True):
        extra = [b for a, b in zip(automatic, given, strict=True) if a != b]
        assert all(a == -100 or a == b for a, b in zip(automatic, given, strict=True))
        assert set(extra) <= set(suffix[1:])  # Qwen2's suffix goes on to the newline after <|im_end|>: labelled too

"""DPO's reference log-probs computed once before training (--precompute_ref_log_probs), cached with the data.

TRL's DPOTrainer does the precompute: with `precompute_ref_log_probs` and no `ref_model` it scores every pair
with the starting model (full fine-tuning) or with the adapter switched off (LoRA) before the first step, and
reads `ref_chosen_logps`/`ref_rejected_logps` from each batch afterwards, so no reference is held and none runs
per step. What chattune adds around TRL's per-batch `compute_ref_log_probs`:

* a cache next to the tokenized data, keyed by what the log-probs depend on (the base model's files and the
  rows it grew for added tokens, quantization, dtypes, attention kernel, LoRA init; the tokenized pairs'
  fingerprint; max_length, truncation and ld_alpha), instead of TRL's key, a hash of every weight in memory
  that misses the compute dtype and costs minutes on a 7B model;
* the cache written atomically (chattune.atomic), checked on reading (columns, row count, key), and a log line
  saying whether it was reused or computed, with progress while computing;
* the held-out test set's log-probs computed before training as well: in full fine-tuning the starting model
  exists only until the first step, and train.py evaluates the whole test set at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets

from chattune.atomic import atomic_path
from chattune.cli import report_progress
from chattune.config.flags import TrainFlags

logger = logging.getLogger(__name__)

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
CACHE_PREFIX = "chattune-ref-logps-"
# Bumped when what is stored, or how it is computed, changes: older caches are then never read.
CACHE_VERSION = 1
KEY_METADATA = b"chattune_reference_key"


def reference_identity(flags: TrainFlags, model: Any, compute_dtype: torch.dtype) -> dict:
    """What the reference log-probs depend on besides the data: the base model as loaded for this run.

    `model` is the model before TRL wraps it in an adapter. The files are identified by name, size, mtime and
    sampled bytes (chattune.training.safety.resume); rows added to the embeddings for new tokens are not in any file,
    so their values are hashed (they may be drawn at random).
    """
    from chattune.training.safety.resume import base_identity, model_folder

    base = base_identity(flags.base_model)
    folder = model_folder(flags.base_model)
    return {
        "version": CACHE_VERSION,
        "base": base,
        "files": weight_file_stats(folder) if folder else None,
        "added_rows": added_rows_digest(model, base["config"].get("vocab_size")),
        "weight_dtype": str(model.dtype),
        "compute_dtype": str(compute_dtype),
        "attention": getattr(model.config, "_attn_implementation", None),
        "quantization": [flags.load_in_4bit, flags.load_in_8bit, flags.load_as_gptq],
        # LoRA's reference is the base with the adapter off; pissa and olora rewrite that base when they start
        "lora_init": flags.lora_init if flags.use_lora else None,
    }


def weight_file_stats(folder: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of each weight file: a file rewritten in place changes its mtime even
    where the sampled bytes of resume.weights_fingerprint happen to agree."""
    from chattune.training.safety.resume import WEIGHT_PATTERNS

    files = sorted({file for pattern in WEIGHT_PATTERNS for file in folder.glob(pattern)})
    return [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in files]


def added_rows_digest(model: Any, file_rows: int | None) -> str | None:
    """A hash of the embedding rows beyond the file's vocabulary (tokens added by this run), None without any."""
    matrices = [model.get_input_embeddings(), model.get_output_embeddings()]
    rows = [m.weight[file_rows:] for m in matrices if m is not None and file_rows is not None]
    rows = [r for r in rows if r.shape[0] > 0]
    if not rows:
        return None
    digest = hashlib.sha256()
    for block in rows:
        digest.update(block.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _without_trl_weight_hash() -> Iterator[None]:
    """TRL's DPOTrainer hashes every weight (copied to the CPU, bfloat16 widened) to key its own cache, which
    chattune's replaces: skipped, it would cost minutes on a 7B model for a key nobody reads."""
    from trl.trainer import dpo_trainer

    original = getattr(dpo_trainer, "hash_module", None)
    if original is None:
        yield
        return
    dpo_trainer.hash_module = lambda module: "unused: chattune keys the reference cache"
    try:
        yield
    finally:
        dpo_trainer.hash_module = original


class PrecomputedReference:
    """Mixed into TRL's DPOTrainer (built with `precompute_ref_log_probs=True`): the cache described above.

    `held_out` is a test set evaluated after training (train.py's whole --test_dataset): its log-probs are
    computed now, and `evaluate(held_out)` reads them.
    """

    def __init__(self, *args: Any, reference_identity: dict, held_out: Dataset | None = None, **kwargs: Any) -> None:
        self.reference_identity = reference_identity
        with _without_trl_weight_hash():
            super().__init__(*args, **kwargs)  # runs _precompute_ref_logps on the train and eval sets
        self.held_out_source, self.held_out = held_out, None
        if held_out is not None:
            prepared = self._prepare_dataset(held_out, self.processing_class, self.args, "test")
            batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            self.held_out = self._precompute_ref_logps(prepared, "test", batch_size)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
        if eval_dataset is not None and eval_dataset is self.held_out_source:
            # Already prepared, with its log-probs. DPOTrainer.evaluate would compute them again from the trained
            # policy (it refuses to in full fine-tuning); what it does besides is what Trainer.evaluate does.
            from transformers import Trainer

            return Trainer.evaluate(self, self.held_out, ignore_keys, metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """`dataset` (tokenized pairs) with the reference log-probs as two more columns: cached or computed."""
        if all(column in dataset.column_names for column in COLUMNS):
            return dataset
        key = self._cache_key(dataset)
        path = cache_path(dataset, key)
        cached = read_cache(path, key, len(dataset)) if path else None
        if cached is not None:
            logger.info("reference log-probs (%s, %d pairs): reused the cache %s", name, len(dataset), path)
        else:
            chosen, rejected = self._compute_reference(dataset, name, batch_size)
            if path and self.accelerator.is_main_process:
                write_cache(path, key, chosen, rejected)
            self.accelerator.wait_for_everyone()
            cached = read_cache(path, key, len(dataset)) if path else None
            if cached is None:  # nowhere to cache (data held in memory): the columns from memory
                cached = Dataset.from_dict({COLUMNS[0]: chosen.tolist(), COLUMNS[1]: rejected.tolist()})
            logger.info("reference log-probs (%s): computed%s", name, f", cached in {path}" if path else "")
        return concatenate_datasets([dataset, cached], axis=1)

    def _cache_key(self, dataset: Dataset) -> str:
        """One key for every process (rank 0's): fingerprints may differ between ranks."""
        from accelerate.utils import broadcast_object_list
        from datasets.fingerprint import Hasher

        settings = {
            "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode,
            "ld_alpha": self.args.ld_alpha,
        }
        key = [Hasher.hash({"model": self.reference_identity, "data": dataset._fingerprint, **settings})]
        broadcast_object_list(key, from_process=0)
        return key[0]

    def _compute_reference(self, dataset: Dataset, name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair's reference log-probs, by TRL's `compute_ref_log_probs`, in the order of `dataset`."""
        from torch.utils.data import DataLoader

        report_progress(f"computing the reference log-probs of the {name} pairs", "nothing was saved")
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        )
        model = self._reference_model()
        progress = Progress(name, len(dataset), len(loader))
        chosen, rejected = [], []
        for batch in loader:
            batch_chosen, batch_rejected = self.compute_ref_log_probs(model, batch)
            batch_chosen, batch_rejected = self.accelerator.gather_for_metrics((batch_chosen, batch_rejected))
            chosen.append(batch_chosen.float().cpu())
            rejected.append(batch_rejected.float().cpu())
            progress.step()
        return torch.cat(chosen), torch.cat(rejected)

    def _reference_model(self) -> Any:
        """What scores the pairs: TRL's reference where it loaded one (FSDP), else the model before training;
        under DeepSpeed the latter must first be wrapped in an inference engine, as TRL does."""
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                from trl.models import prepare_deepspeed

                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        return self.ref_model or self.model


class Progress:
    """Log lines while the reference scores the pairs: about every tenth of the batches, with the rate."""

    def __init__(self, name: str, pairs: int, batches: int) -> None:
        self.name, self.pairs, self.batches = name, pairs, batches
        self.done, self.started = 0, time.perf_counter()
        self.every = max(1, batches // 10)
        logger.info("reference log-probs (%s): computing for %d pairs in %d batches", name, pairs, batches)

    def step(self) -> None:
        self.done += 1
        if self.done % self.every and self.done != self.batches:
            return
        elapsed = time.perf_counter() - self.started
        share = self.done / max(1, self.batches)
        logger.info(
            "reference log-probs (%s): %d/%d batches (%.0f%%), %.1f pairs/s",
            self.name,
            self.done,
            self.batches,
            100 * share,
            self.pairs * share / max(elapsed, 1e-9),
        )


def cache_path(dataset: Dataset, key: str) -> Path | None:
    """Where the cache of `dataset` under `key` lives: beside the dataset's own cache files. None when the data
    has no cache files (held in memory) or `datasets` caching is off: its fingerprint is then random, so a cache
    would never be found again."""
    from datasets import is_caching_enabled

    if not dataset.cache_files or not is_caching_enabled():
        return None
    return Path(dataset.cache_files[0]["filename"]).parent / f"{CACHE_PREFIX}{key}.arrow"


def write_cache(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """An Arrow stream file of the two columns (as `datasets` reads with Dataset.from_file), its key in the
    schema's metadata, written under a temporary name and renamed: an interrupted write leaves no cache."""
    import pyarrow as pa

    table = pa.table(
        {COLUMNS[0]: pa.array(chosen.numpy(), pa.float32()), COLUMNS[1]: pa.array(rejected.numpy(), pa.float32())}
    ).replace_schema_metadata({KEY_METADATA: key.encode()})
    with atomic_path(path) as staging:
        _write_stream(staging, table)


def _write_stream(path: Path, table: Any) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def read_cache(path: Path, key: str, rows: int) -> Dataset | None:
    """The cached columns, or None when there is no cache at `path` or it does not match (logged)."""
    import pyarrow as pa

    if not path.is_file():
        return None
    try:
        with pa.memory_map(str(path)) as source:  # `datasets` drops the schema's metadata: read it first
            stored_key = (pa.ipc.open_stream(source).schema.metadata or {}).get(KEY_METADATA, b"").decode()
        cached = Dataset.from_file(str(path))
    except (OSError, pa.ArrowInvalid) as error:
        logger.warning("%s: unreadable reference cache (%s); computing it again", path, error)
        return None
    if stored_key != key or tuple(cached.column_names) != COLUMNS or len(cached) != rows:
        logger.warning("%s: the reference cache does not match the data; computing it again", path)
        return None
    return cached

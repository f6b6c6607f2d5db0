"""The GGUF storage types by name, and whether llama.cpp's quantizer is installed, without importing `gguf`.

train.py checks --export_gguf while it parses its flags, before anything heavy is imported (`gguf` brings numpy:
a third of a second); chattune.export.gguf and chattune.export.quantize map these names to gguf's types.
"""

from __future__ import annotations

from chattune.errors import ChattuneError

WRITTEN_OUTTYPES = ("f32", "f16", "q8_0")  # written by chattune itself (chattune.export.gguf)
# Storage for the token embedding and the output matrix apart from the other weights (llama-quantize's
# --token-embedding-type/--output-tensor-type). A small model spends a large share of its weights there (SmolLM2-135M:
# a fifth, tied), and rounding it to q8_0 costs more exact matches than rounding every other matrix does.
EMBEDDING_TYPES = ("f16", "f32")
# The types llama-quantize makes without an importance matrix, by the name its users know them by (gguf's
# LlamaFileType.MOSTLY_<NAME>). The IQ1/IQ2/IQ3_XXS types are left out: llama.cpp refuses them without an
# importance matrix. bf16 is left out too: it would be made from the f16 file, losing the range it exists to keep.
LLAMA_QUANT_NAMES = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q2_k",
    "q2_k_s",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq4_nl",
    "iq4_xs",
)
# Every --outtype: the ones written here, then those llama.cpp's quantizer makes from the f16 file.
ALL_OUTTYPES: tuple[str, ...] = (*WRITTEN_OUTTYPES, *LLAMA_QUANT_NAMES)

INSTALL_HINT = (
    "`pip install llama-cpp-python` (it compiles llama.cpp: about 5 minutes on 2 cores; "
    "docs/export.md has the build flags)"
)


class QuantizeError(ChattuneError, RuntimeError):
    """llama.cpp could not quantize a file, or llama-cpp-python is missing."""


def require_quantizer(outtype: str) -> None:
    """Fail now, before any training or export, when `outtype` needs llama-cpp-python and it is not installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise QuantizeError(
            f"--outtype {outtype} is made by llama.cpp's quantizer, through llama-cpp-python, which is not "
            f"installed: {INSTALL_HINT}; or export f16, q8_0 or f32, which need nothing more"
        )


def check_embedding_type(outtype: str, embedding_type: str | None) -> None:
    """Refuse an embedding type for a file made by llama.cpp's quantizer, which picks those tensors' types itself."""
    if embedding_type is not None and outtype not in WRITTEN_OUTTYPES:
        raise ChattuneError(
            f"an embedding type ({embedding_type}) applies to the types chattune writes "
            f"({', '.join(WRITTEN_OUTTYPES)}), not to {outtype}: llama.cpp's quantizer chooses the types of the "
            "token embedding and the output matrix itself"
        )

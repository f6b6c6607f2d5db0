"""Export: model folders written atomically, LoRA adapters merged into their base, GGUF files for llama.cpp."""

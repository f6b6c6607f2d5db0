"""Model access, below data, training, evaluation and export: GGUF files as base models, the device and dtype,
quantization, loading a tokenizer and a model."""

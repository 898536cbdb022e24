"""gptmini: a mini GPT training framework built around chapter 3's multi-head causal attention.

The package follows the one-way flow of a run, one sub-package per stage:

    data/        text → tokenizer → token cache → batches (the LightningDataModule)
    model/       GPTConfig and named sizes, the attention, the KV cache, the GPT (pure PyTorch)
    book/        chapter 3's attention ladder and worked example, beside the model (not used by it)
    training/    train(cfg): the LightningModule, optimizer and schedule, callbacks, configs, sweeps
    weights      where weights come from: self-contained checkpoints, Hugging Face folders, LoRA merges
    generation/  the sampling loop and the text generation behind gptmini generate
    serve/       gptmini serve: the OpenAI API over continuous batching, and the chat page
    hf/          GPT-2 to and from the Hugging Face format (gptmini export)
    eval/        gptmini eval: val loss and HellaSwag of any checkpoint
    cli          the gptmini command: one table of jobs
    common       the one error policy, the user-facing error, atomic writes, the device picker

The short imports below load lazily, so ``import gptmini.common`` stays cheap.
"""

__version__ = "0.2.0"

_PUBLIC = {
    "GPT": "gptmini.model.gpt",
    "GPTConfig": "gptmini.model.config",
    "MODEL_SIZES": "gptmini.model.config",
    "GptMiniError": "gptmini.common",
    "train": "gptmini.training.run",
    "load_checkpoint": "gptmini.weights",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gptmini' has no attribute {name!r}")

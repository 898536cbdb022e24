"""gptmini: a mini GPT training framework built around chapter 3's multi-head causal attention."""

__version__ = "0.1.0"

"""Stage 4: text from a checkpoint. ``sampling`` is the pure token loop (no I/O); ``text`` is what
``python generate.py`` runs; ``attention_plot`` draws attention maps.

May import ``model``, ``data.tokenizer``, ``checkpoint`` and ``common``; must not import ``training``.
"""

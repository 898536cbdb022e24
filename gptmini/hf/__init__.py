"""The bridge to the Hugging Face format, in both directions (needs the ``hf`` extra).

- ``hub``: what ``ckpt=gpt2`` / ``init_from=/path/to/hf_folder`` names: a GPT-2 on the Hub (through the
  standard HF cache) or a local folder, resolved to its config.json and weights file.
- ``convert``: GPT-2 state dicts and configs between the Hugging Face layout and gptmini's ``GPT``.
- ``tokenizer_export``: a ``tokenizer.json`` (and GPT-2's vocab.json/merges.txt) from a tiktoken encoding.
- ``tokenizer_import``: the other way: a folder's ``tokenizer.json`` as the tiktoken encoding it describes.

``gptmini.hf.export`` (``python -m gptmini.hf.export``) writes a whole folder with them.
"""

"""The book beside the model: chapter 3's attention ladder (``attention``) and its worked example with the
book's printed numbers (``walkthrough``; ``python -m gptmini.book.walkthrough``). The GPT imports nothing
from here: the tests check that each rung agrees with the model's attention on the same weights.
"""

"""Evaluation of any checkpoint: ``python -m gptmini.eval ckpt=<...> task=hellaswag|val``.

One concern: scoring a trained model on held-out tasks. Modules:

    config      EvalConfig (configs/eval.yaml's schema) and the training-time HellaSwagConfig
    hellaswag   HellaSwag examples (local jsonl or the Hub) and multiple-choice scoring by completion loss
    val         validation loss and bits per byte of a checkpoint on any data config
    run         ``run_eval(cfg)``: load, evaluate, print the figures and one final JSON line

May import ``gptmini.weights``, ``gptmini.data``, ``gptmini.model`` and ``gptmini.common``; must not import
``gptmini.training`` (training imports this package for its optional HellaSwag callback).
"""

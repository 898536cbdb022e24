"""Stage 3: training through Lightning, configured by Hydra.

``run.train(cfg)`` composes the stages: the data module, the LightningModule (``module``) with its optimizer
and schedule (``optim``), the callbacks (``callbacks``, ``perf``), and checkpoints. ``config`` holds the
structured-config schemas, ``sweep`` the Hydra callback that summarises ``-m`` sweeps. May import ``data``,
``model``, ``eval``, ``weights``, ``threads`` and ``common``; must not import ``generation`` except its pure
sampling loop.
"""

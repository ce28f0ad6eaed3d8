"""Evaluation on real images, below the command-line modules :mod:`fastprune.evaluate` and
:mod:`fastprune.compare`: :mod:`.data` (models, images, device labels), :mod:`.settings` (the setting
mini-language, patching, FLOP counting), :mod:`.runner` (timed runs, the table), :mod:`.matching`
(methods matched to ToMe's FLOPs)."""

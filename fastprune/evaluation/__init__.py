"""Evaluation on real images, below the command-line modules :mod:`fastprune.evaluate` and
:mod:`fastprune.compare`: :mod:`.models` (timm models and their weights), :mod:`.data` (image
folders in the flat and ImageFolder layouts, device labels), :mod:`.settings` (the setting
mini-language, patching, FLOP counting), :mod:`.runner` (timed runs, the table), :mod:`.report`
(the table as CSV/JSON, the frontier as PNG), :mod:`.distributed` (data-parallel runs under
torchrun), :mod:`.matching` (methods matched to ToMe's FLOPs)."""

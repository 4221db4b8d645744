"""Nunchaku interop: Nunchaku checkpoints ↔ SVDQuant, and SVDQuant → diffusers' ``nunchaku_lite``.

:mod:`~converters.nunchaku.names` (key dialects), :mod:`~converters.nunchaku.layout` (MMA-fragment
tilings ↔ row-major), :mod:`~converters.nunchaku.awq` (AWQ W4A16 modulation layers) and
:mod:`~converters.nunchaku.common` (model skeletons, layer construction) are the codecs;
:mod:`~converters.nunchaku.importer`, :mod:`~converters.nunchaku.exporter` and
:mod:`~converters.nunchaku.lite` the conversions; :mod:`~converters.nunchaku.model` is a deprecated
loader alias (an import loads with stock ``from_pretrained``); :mod:`~converters.nunchaku.cli` is
``svdq convert``. Importing the package imports none of them (diffusers loads lazily).
"""

from __future__ import annotations

__all__: list[str] = []

"""Random prompts: VPT's Xavier-uniform initialization (spec: VIPAMIN.md, "Random prompts").

    R[l, i, :] ~ U(-v, v) elementwise,   v = sqrt(6 / (3 * ph * pw + d))

(``3 * ph * pw`` is the fan-in of the patch-embedding convolution, ``d`` its fan-out; about
0.0625 for ViT-B/16.) The draw is made in float64 from a CPU ``torch.Generator`` seeded with
``seed`` and only then cast to ``dtype``, so the values do not depend on the requested dtype
(beyond the final rounding) and are identical on every rank and every machine.

The same ``R`` feeds both VIPAMIN modules (matching capture and the orthogonal module), so
final prompt ``i`` of layer ``l`` is a function of ``R[l, i]`` alone.

Pure tensor math: no I/O, no torch.distributed, no model objects. The draw itself lives in
``models/prompted.py``, beside the model whose default prompts it makes (``models/`` imports nothing
from ``init/``); the initializer takes it from there.
"""

from __future__ import annotations

from vipamin_scale.models.prompted import xavier_bound, xavier_prompts

__all__ = ["xavier_bound", "xavier_prompts"]

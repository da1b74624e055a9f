"""jetdet's ComfyUI front end: nodes for the modes, the deterministic sampler, the checks and the step cache.

Loading (ComfyUI 0.3.64 or newer, V3 node schema):

* a git clone into ``ComfyUI/custom_nodes/jetdet`` loads through the repository's root ``__init__.py``;
* a pip-installed jetdet loads through a one-line shim, ``ComfyUI/custom_nodes/jetdet_nodes/__init__.py``::

      from jetdet.comfy import comfy_entrypoint  # noqa: F401

Importing ``jetdet`` never imports ComfyUI, and importing this package does not either: the node classes
(:mod:`jetdet.comfy.nodes`) are imported when ComfyUI calls :func:`comfy_entrypoint`.
"""

from __future__ import annotations

__all__ = ["comfy_entrypoint", "NODE_IDS"]

#: The node ids this pack registers (fixed: workflows refer to them).
NODE_IDS = (
    "JetDetModeSwitch", "JetDetDeterministicSampler", "JetDetChecksum", "JetDetOutputMatcher", "JetDetFastOptimizer",
    "JetDetCacheManager", "JetDetBenchmark", "JetDetExpertSelector", "JetDetMultiPassRefiner",
    "JetDetClassConditioning", "JetDetShapesModelLoader", "JetDetShapesDecode", "JetDetDeterministicVAEDecode",
    "JetDetDeterministicVAEEncode", "JetDetDeterministicVAEDecodeAudio", "JetDetDeterministicSamplerAdvanced",
)


async def comfy_entrypoint():
    """ComfyUI's V3 extension entry point."""
    from .nodes import JetDetExtension

    return JetDetExtension()

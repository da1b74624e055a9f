"""Deterministic VAE decode and encode in ComfyUI: an image's pixels that do not depend on the batch around it.

The Deterministic Sampler makes each item's *latent* independent of the batch. ComfyUI's own VAE Decode then
turns the batch into pixels with torch's convolutions, group norms and attention, whose bits depend on the batch
size (on this CPU every item of a batch of 5 differed from its batch-1 decode; on a GPU cuDNN picks its
algorithm by shape). It also splits the batch into chunks sized from the *free memory*, and on running out of
memory retries with tiled decoding, whose tiles change the pixels. :func:`decode` and :func:`encode` run
ComfyUI's own ``VAE.decode`` / ``VAE.encode`` with:

* every model op inside ``jetdet.mode("deterministic")`` (batch-invariant convolutions, norms, matmuls; the
  chunking then no longer matters);
* attention through ComfyUI's ``pytorch_attention`` (SDPA, which the router sends to the batch-invariant
  attention): the VAE's attention blocks bind their attention function when they are built (``vae_attention()``:
  xformers, SDPA or the split attention, whose slices follow the free memory), so the binding of each block is
  swapped for the call and put back afterwards, as are the module-level bindings
  (:func:`jetdet.comfy.attention.sdpa_attention`);
* the tiled fallback refused: if ComfyUI runs out of memory and turns to tiled decoding or encoding, the call
  raises an error that says so instead of returning pixels that depend on the free memory.

Nothing of the VAE stays changed after the call returns or raises, and while it runs the swapped blocks and methods
are ComfyUI's own on any other thread using the same VAE outside deterministic mode.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .attention import _ABSENT, _install, _per_thread, put_back, sdpa_attention

#: The VAE methods ComfyUI falls back to when a whole decode or encode runs out of memory.
_TILED = ("decode_tiled_", "decode_tiled_1d", "decode_tiled_3d", "encode_tiled_", "encode_tiled_1d",
          "encode_tiled_3d")


class TiledFallbackError(RuntimeError):
    """ComfyUI ran out of memory in a deterministic VAE call and would have retried tiled."""


def check_vae(vae, what: str = "vae"):
    """A ComfyUI ``VAE`` (``comfy.sd.VAE``), or a clear error naming what was given."""
    if not all(hasattr(vae, a) for a in ("decode", "encode", "first_stage_model")):
        raise TypeError(f"{what}: expected a ComfyUI VAE (comfy.sd.VAE), got {type(vae).__name__}")
    return vae


_call = threading.local()  # .what: this thread's open deterministic VAE calls' (verb, tiled node), innermost last


def _refuse(name: str):
    """The stand-in of the tiled method ``name`` on a thread in a deterministic call: an error naming the call."""

    def refuse(*args, **kwargs):
        what = getattr(_call, "what", None)
        verb, tiled_node = what[-1] if what else (
            ("decoding", "VAE Decode (Tiled)") if name.startswith("decode") else ("encoding", "VAE Encode (Tiled)"))
        raise TiledFallbackError(
            f"jetdet deterministic VAE {verb}: ComfyUI ran out of memory and would retry with tiled {verb}, whose "
            f"tiles change the pixels (they would then depend on the free memory), so jetdet stops instead. Free "
            f"memory or pass fewer items at once and run it again; ComfyUI's {tiled_node} node tiles on purpose, "
            "with tile settings you choose.")

    return refuse


def vae_sdpa(q, k, v):
    """ComfyUI's ``diffusionmodules.model.pytorch_attention`` (a VAE block's ``[B, C, H, W]`` q/k/v as one head over C
    channels) without its out-of-memory retry. That retry runs ``slice_attention``, whose slices follow the free
    memory and which on a GPU rounds differently from jetdet's attention, so a decode that ran out of memory inside
    attention would have returned pixels that depend on the free memory, with only a log line. Here the error goes
    up to ComfyUI's VAE call, whose tiled retry jetdet refuses by name (:func:`_swapped`)."""
    import comfy.ops
    import torch.nn.functional as F

    sdpa = getattr(comfy.ops, "scaled_dot_product_attention", F.scaled_dot_product_attention)
    shape = q.shape
    b, c = shape[0], shape[1]
    q, k, v = (t.view(b, 1, c, -1).transpose(2, 3).contiguous() for t in (q, k, v))
    return sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False).transpose(2, 3).reshape(shape)


def _vae_sdpa_call(q, k, v, *args, **kwargs):
    """A VAE block's attention call on :func:`vae_sdpa` (the block's own takes more arguments)."""
    return vae_sdpa(q, k, v)


_swaps_lock = threading.Lock()
_swaps: dict = {}  # id(vae) -> [vae, calls now open on any thread, what to put back]: the VAEs swapped now


@contextlib.contextmanager
def _swapped(vae, verb: str, tiled_node: str):
    """For the call, on threads in deterministic calls, each attention block of the VAE built by ComfyUI's
    ``diffusionmodules.model`` (SD/SDXL/SD3/Flux-type VAEs) on :func:`vae_sdpa`, and the VAE's tiled methods refused
    (with ``verb`` and ``tiled_node`` in the error on this thread); on another thread using the same VAE meanwhile
    (no mode, fast mode) ComfyUI's own. The swap is the VAE's while any thread's deterministic call of it runs: made
    by the first, put back by the last (each call put back what it saw, so a second thread's call on the same VAE lost
    vae_sdpa and the refusal when the first returned, and left the first's stand-ins on the VAE for good), and only
    where the VAE still holds jetdet's stand-in."""
    with _swaps_lock:
        entry = _swaps.get(id(vae))
        if entry is None:
            undo = []
            try:
                _swap_vae(vae, undo)
            except BaseException:
                put_back(undo)
                raise
            entry = _swaps[id(vae)] = [vae, 0, undo]
        entry[1] += 1
    what = _call.what = getattr(_call, "what", None) or []
    what.append((verb, tiled_node))
    try:
        yield
    finally:
        what.pop()
        with _swaps_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _swaps[id(vae)]
                put_back(entry[2])


def _swap_vae(vae, undo: list) -> None:
    from comfy.ldm.modules.diffusionmodules import model as dm

    for m in vae.first_stage_model.modules():
        f = vars(m).get("optimized_attention")
        if callable(f) and getattr(f, "_jetdet_own", None) is None and getattr(f, "__module__", None) == dm.__name__:
            _install(m, "optimized_attention", f, _per_thread(f, _vae_sdpa_call), undo)
    own = vars(vae)
    for n in _TILED:
        if hasattr(vae, n):
            _install(vae, n, own.get(n, _ABSENT), _per_thread(getattr(vae, n), _refuse(n)), undo)


@contextlib.contextmanager
def _deterministic(vae, verb: str, tiled_node: str, warn_only: bool):
    import jetdet

    check_vae(vae)
    with jetdet.mode("deterministic", warn_only=warn_only), sdpa_attention(), _swapped(vae, verb, tiled_node):
        yield


def _is_audio(vae) -> bool:
    """ComfyUI's audio VAEs (Stable Audio's Oobleck, ACE-Step's) have one latent dim; image VAEs two, video three."""
    return getattr(vae, "latent_dim", 2) == 1


def _check_kind(vae, audio: bool):
    check_vae(vae)
    if _is_audio(vae) != audio:
        raise ValueError(
            "vae: an audio VAE; decode its latents with jetdet Deterministic VAE Decode (Audio) "
            "(jetdet.comfy.vae.decode_audio)" if not audio else
            "vae: an image or video VAE; decode its latents with jetdet Deterministic VAE Decode "
            "(jetdet.comfy.vae.decode)")


def decoder_channels(vae) -> tuple[int | None, set[int]]:
    """``(count, counts)``: the channel count (dim 1) of the latents the VAE decodes, and every count that may be
    right. ComfyUI's ``latent_channels`` is not always it: a VAE built from a config (``VAE(sd, config=...)``, a
    checkpoint with a yaml) keeps the default 4 whatever its ``z_channels``, the count its ``post_quant_conv`` (the
    first op of an ``AutoencodingEngineLegacy`` decode) takes; while in newer ComfyUI a Flux2 VAE's 128-channel
    latents are unpatchified to its ``post_quant_conv``'s 32 inside the decode. So ``count`` is the
    ``post_quant_conv``'s where ``latent_channels`` is the default 4 and that conv takes another count, else
    ``latent_channels``; ``counts`` holds both."""
    n = getattr(vae, "latent_channels", None)
    n = n if isinstance(n, int) and not isinstance(n, bool) else None
    pq = getattr(getattr(getattr(vae, "first_stage_model", None), "post_quant_conv", None), "in_channels", None)
    pq = pq if isinstance(pq, int) and not isinstance(pq, bool) else None
    counts = {c for c in (n, pq) if c is not None}
    return (pq if pq is not None and n in (None, 4) else n), counts


@contextlib.contextmanager
def _latent_named(vae, samples):
    """A decode that fails on a latent whose channel count (dim 1) is none of the VAE's (:func:`decoder_channels`)
    raises an error naming the node's inputs, chained from the VAE's own: a latent of another model family (a
    16-channel SD3 or Flux latent into a 4-channel SD1.5 VAE; a user trial got 'weight: expected 16 input
    channels (dim 1) to match input, got (4, 4, 1, 1)'). Nothing is refused before decoding:
    ComfyUI's ``latent_channels`` is not always the decoder's (see :func:`decoder_channels`), and a check on it
    refused a yaml checkpoint's 16-channel VAE that ComfyUI's VAE Decode decodes (review M2)."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        want, counts = decoder_channels(vae)
        oom = tuple(c for c in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                    if isinstance(c, type))
        if (isinstance(e, (TiledFallbackError, *oom)) or want is None
                or not isinstance(samples, torch.Tensor) or samples.dim() < 2 or samples.shape[1] in counts):
            raise
        got = samples.shape[1]
        raise ValueError(
            f"samples: the latent has {got} channels (shape {tuple(samples.shape)}), but the vae decodes "
            f"{want}-channel latents: the VAE belongs to another model family than the latent (SD1.5 and SDXL "
            "latents have 4 channels, SD3 and Flux 16, Stable Audio 64); connect the VAE of the model that made "
            f"the latent (the VAE's own error: {type(e).__name__}: {str(e)[:200]})") from e


def decode(vae, samples, warn_only: bool = False):
    """``vae.decode(samples)`` with batch-invariant ops (see the module docstring); the images as ComfyUI's VAE
    Decode node returns them (a video's frames as one batch of images). ``warn_only``: warn instead of raising on a
    torch op with no deterministic implementation."""
    _check_kind(vae, audio=False)
    with _latent_named(vae, samples), _deterministic(vae, "decoding", "VAE Decode (Tiled)", warn_only):
        images = vae.decode(samples)
    if images.dim() == 5:  # a video VAE: frames of all items as one image batch, as VAE Decode does
        images = images.reshape(-1, *images.shape[-3:])
    return images


def decode_audio(vae, samples, warn_only: bool = False, latent: dict | None = None) -> dict:
    """An audio VAE's ``vae.decode(samples)`` with batch-invariant ops, as ComfyUI's VAE Decode Audio node makes
    its AUDIO: ``[batch, channels, samples]``, each item divided by ``max(1, 5 * its std)`` (that std in deterministic
    mode too, so it is the item's own whatever the batch). The sample rate is ComfyUI's: the LATENT's
    ``sample_rate`` if it has one, else the VAE's output rate (newer ComfyUI gives 48 kHz and 32 kHz VAEs one), else
    44.1 kHz (a trial on a newer ComfyUI: labelled 44.1 kHz, a 48 kHz VAE's audio played 8 % slow)."""
    _check_kind(vae, audio=True)
    with _latent_named(vae, samples), _deterministic(vae, "decoding", "VAE Decode Audio (Tiled)", warn_only):
        audio = vae.decode(samples).movedim(-1, 1)
        audio = audio / (torch.std(audio, dim=[1, 2], keepdim=True) * 5.0).clamp_min(1.0)
    rate = getattr(vae, "audio_sample_rate_output", getattr(vae, "audio_sample_rate", 44100))
    if isinstance(latent, dict) and "sample_rate" in latent:
        rate = latent["sample_rate"]
    return {"waveform": audio, "sample_rate": rate}


def encode(vae, pixels, warn_only: bool = False):
    """``vae.encode(pixels[..., :3])`` with batch-invariant ops, as ComfyUI's VAE Encode node calls it: ``pixels``
    an IMAGE, ``[batch, height, width, channels >= 3]`` (a video's frames are a batch of images; ComfyUI encodes
    them as one video)."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[-1] < 3:
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels: expected an IMAGE (a [batch, height, width, channels >= 3] tensor), got {got}")
    check_vae(vae)
    if _is_audio(vae):
        raise ValueError("vae: an audio VAE; jetdet's Deterministic VAE Encode takes image and video VAEs "
                         "(Stable Audio's encoder draws noise from the global random generator for the whole batch)")
    with _deterministic(vae, "encoding", "VAE Encode (Tiled)", warn_only):
        return vae.encode(pixels[:, :, :, :3])

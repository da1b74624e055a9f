"""The shapes model ComfyUI loads natively: an SD3-architecture MMDiT trained on :mod:`jetdet.models.shapes`.

ComfyUI cannot load jetdet's bundled DiT, so fast-mode quality inside ComfyUI is measured on this second model.
``comfy/model_detection.py`` detects it as SD3 (``joint_blocks``, hidden 128 = 2 blocks of 2 heads of 64), so
ComfyUI's own ``Load Diffusion Model`` node loads it, ComfyUI's SD3 sampling settings apply (flow matching,
shift 3), and ComfyUI's own wrappers, samplers and caching nodes act on it exactly as on a real SD3 checkpoint.
Trained by ``bench/train_comfy_native.py``.

Latent: ``[B, 16, 32, 32]`` (what ComfyUI's ``EmptySD3LatentImage`` gives for 256 x 256). In the model's space
(after ComfyUI's ``process_latent_in``) channels 0-2 are the 32 x 32 RGB image in ``[-1, 1]`` and channels 3-15
are zero; :func:`latent_to_image` and :func:`image_to_latent` convert (there is no VAE).

Conditioning: a class index, not text. :func:`class_conditioning` gives ComfyUI's CONDITIONING for class ``k``:
one context token ``[1, 1, 16]`` and a pooled vector ``[1, 16]``, both one-hot at ``k``; the unconditional
branch is all zeros (what ComfyUI's ``ConditioningZeroOut`` makes of it), as the model was trained with 10 %
of its labels dropped to zeros.

Importing this module does not import ComfyUI; the functions that need it import it when called.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.shapes import NUM_CLASSES, SHAPE_CLASSES

MODEL_FILE = Path(__file__).resolve().parent.parent / "data" / "comfy_shapes_sd3.safetensors"
LATENT_CHANNELS = 16
LATENT_SIZE = 32
CONTEXT_DIM = 16
CLASSES = SHAPE_CLASSES

#: What ``comfy/model_detection.py`` reads back from the saved weights (checked by the tests).
UNET_CONFIG = {
    "depth": 2,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "patch_size": 2,
    "adm_in_channels": CONTEXT_DIM,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
    "num_patches": 256,
    "pos_embed_max_size": 16,
    "pos_embed_scaling_factor": None,
}


def check_label(label) -> int:
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_CLASSES:
        names = ", ".join(f"{i}={n}" for i, n in enumerate(CLASSES))
        raise ValueError(f"class_index: expected an int in [0, {NUM_CLASSES}) ({names}), got {label!r}")
    return label


def class_vectors(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels [B]`` (``-1`` = unconditional) -> (context ``[B, 1, 16]``, pooled ``[B, 16]``), one-hot / zeros."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    pooled = torch.zeros(labels.shape[0], CONTEXT_DIM)
    keep = labels >= 0
    pooled[keep, labels[keep]] = 1.0
    return pooled[:, None, :].clone(), pooled


def class_conditioning(label: int) -> list:
    """ComfyUI CONDITIONING for class ``label`` (see the module docstring)."""
    context, pooled = class_vectors(torch.tensor([check_label(label)]))
    return [[context, {"pooled_output": pooled}]]


def null_conditioning() -> list:
    """The unconditional CONDITIONING (zeros), equal to ``ConditioningZeroOut`` of any class conditioning."""
    context, pooled = class_vectors(torch.tensor([-1]))
    return [[context, {"pooled_output": pooled}]]


def _latent_format():
    import comfy.latent_formats

    return comfy.latent_formats.SD3()


def latent_to_image(samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's ``samples [B, 16, 32, 32]`` (ComfyUI's space) -> images ``[B, 3, 32, 32]`` in ``[-1, 1]``."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or tuple(samples.shape[1:]) != (
            LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE):
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"samples: expected a shapes-model latent [B, {LATENT_CHANNELS}, {LATENT_SIZE}, "
                         f"{LATENT_SIZE}], got {got}")
    return _latent_format().process_in(samples.float())[:, :3]


def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, 32, 32]`` in ``[-1, 1]`` -> LATENT ``samples [B, 16, 32, 32]`` in ComfyUI's space."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, LATENT_SIZE,
                                                                                                LATENT_SIZE):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected [B, 3, {LATENT_SIZE}, {LATENT_SIZE}] in [-1, 1], got {got}")
    model_space = torch.zeros(images.shape[0], LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    model_space[:, :3] = images.float()
    return _latent_format().process_out(model_space)


def to_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in ``[-1, 1]`` -> ComfyUI IMAGE ``[B, H, W, 3]`` in ``[0, 1]``."""
    return ((images.float().clamp(-1, 1) + 1) * 0.5).permute(0, 2, 3, 1).contiguous()


def from_comfy_image(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` in ``[0, 1]`` -> ``[B, C, H, W]`` in ``[-1, 1]``."""
    return image.float().permute(0, 3, 1, 2) * 2 - 1


def check_state_dict(sd: dict, where) -> None:
    """A ValueError naming ``path`` unless ``comfy/model_detection.py`` reads ``sd`` as this model
    (:data:`UNET_CONFIG`), checked from the keys and shapes before any model is built."""
    import comfy.model_detection
    import comfy.utils

    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    try:
        config = comfy.model_detection.model_config_from_unet(sd, "")
    except Exception:  # detection indexes keys it expects; a state dict of something else can break it
        config = None
    unet = getattr(config, "unet_config", None) or {}
    wrong = {k: unet.get(k) for k, v in UNET_CONFIG.items() if unet.get(k) != v}
    if config is None or wrong:
        what = ("not a diffusion model ComfyUI recognises" if config is None else
                f"ComfyUI detects it as {type(config).__name__}"
                + "".join(f", {k} {v}" for k, v in wrong.items() if v is not None and k != "context_embedder_config"))
        want = ", ".join(f"{k} {UNET_CONFIG[k]}" for k in ("depth", "in_channels", "patch_size", "adm_in_channels"))
        raise ValueError(f"path: {where} is not jetdet's shapes model: {what}; expected its SD3-architecture MMDiT "
                         f"({want}, written by bench/train_comfy_native.py)")


def load_model(path=None):
    """The shipped weights (or ``path``) as a ComfyUI ``ModelPatcher``, through ComfyUI's own detection."""
    import comfy.sd
    import comfy.utils

    p = Path(path) if path is not None else MODEL_FILE
    if p.is_dir():  # a user trial: "no shapes model at <a folder>" read as if the folder were empty
        raise IsADirectoryError(f"path: {p} is a folder, not a file; give the path of the shapes model's .safetensors "
                                "file (leave path empty for the one jetdet ships)")
    if not p.is_file():
        raise FileNotFoundError(f"path: no shapes model at {p} (train it with bench/train_comfy_native.py)")
    try:
        sd = comfy.utils.load_torch_file(str(p), safe_load=True)
    except Exception as e:  # safetensors' own error, or torch.load's (long, unpickling) error for another format
        why = (f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
               if p.suffix == ".safetensors" else f"not safetensors, nor a checkpoint torch.load reads safely: "
                                                  f"{type(e).__name__}")
        raise ValueError(f"path: {p} is not a readable weights file ({why}); expected jetdet's shapes model as "
                         "safetensors") from e
    check_state_dict(sd, p)
    return comfy.sd.load_diffusion_model_state_dict(sd)


#: :func:`as_variance_exploding`'s sigma tables.
VE_SAMPLINGS = ("eps", "edm")


def as_variance_exploding(model, sampling: str = "eps"):
    """A clone of the shapes model that ComfyUI samples as a variance-exploding model (``x = x0 + sigma * noise``,
    the sigma space of eps, v and EDM models), with the same probability-flow ODE: the flow model inside sees
    ``x / (1 + sigma)`` at flow time ``sigma / (1 + sigma)``, and its denoised output is returned as is.

    ``sampling``: ``"eps"`` (SD1.5/SDXL's discrete table, sigma 0.029-14.6) or ``"edm"`` (continuous, 0.002-80,
    log-uniform, as EDM and Cosmos models). ComfyUI's samplers and schedulers then step through those sigmas, so
    fast mode can be measured on a trained model in the sigma space most checkpoints use (jetdet ships no trained
    eps model). ``karras``, ``exponential``, ``simple``, ``ddim_uniform`` and ``beta`` give those models' own
    schedules; ``normal`` and ``sgm_uniform``, which go through the model's timestep, space the same sigma range
    evenly in flow time instead of in SD1.5's table index, as this model's timestep is its flow time (so does the
    discrete table's ``percent_to_sigma``, which ControlNet and conditioning timestep ranges use). The input model is
    not changed.
    """
    import comfy.model_sampling as cms

    from .wrappers import _flow_time

    if sampling not in VE_SAMPLINGS:
        raise ValueError(f"sampling: expected one of {VE_SAMPLINGS}, got {sampling!r}")
    base = cms.ModelSamplingDiscrete if sampling == "eps" else cms.ModelSamplingContinuousEDM

    class FlowInside(base, cms.EPS):
        def calculate_input(self, sigma, noise):
            return noise / (1.0 + cms.reshape_sigma(sigma, noise.ndim))

        def timestep(self, sigma):  # the SD3 MMDiT's timestep input: flow time x 1000
            return _flow_time(sigma) * 1000.0

        def sigma(self, timestep):  # its inverse (ComfyUI's normal and sgm_uniform schedulers)
            f = timestep / 1000.0
            return f / (1.0 - f)

        def calculate_denoised(self, sigma, model_output, model_input):
            s = cms.reshape_sigma(sigma, model_output.ndim)
            return (model_input - model_output * s) / (1.0 + s)

    ms = FlowInside(None)  # ModelSamplingDiscrete(None): SD1.5's scaled-linear betas
    if sampling == "edm":
        ms.set_parameters(0.002, 80.0, 1.0)
    m = model.clone()
    m.add_object_patch("model_sampling", ms)
    return m

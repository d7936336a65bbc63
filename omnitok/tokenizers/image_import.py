"""``omnitok image-tokenizer import``: bring published VQ-GAN checkpoints into omnitok's ``VQGAN``.

One function per format, each mapping the checkpoint's names onto ours (``vqgan.py`` uses transformers'
``JanusVQVAE`` names) and building the config from the checkpoint's own description; ``load_weights`` then
refuses any missing, unexpected or mis-shaped key. Checkpoints are read with ``torch.load(weights_only=True)`` or
safetensors, never unpickled freely.

- ``llamagen``: LlamaGen VQ-8 / VQ-16 state dicts (``vq_ds16_c2i.pt``: ``{"model": state_dict}``). Names
  ``conv_blocks.{i}.res.{j}``, ``mid.{0,1,2}``; the config is read off the tensor shapes (the file has none).
- ``janus``: a Hugging Face ``JanusVQVAE`` directory (or a full Janus model directory; its ``model.vqmodel.*``).
- ``chameleon``: Chameleon's original ``vqgan.ckpt`` with ``vqgan.yaml`` beside it (taming-transformers names;
  its decoder numbers levels from the highest resolution), or a Hugging Face ``ChameleonVQVAE`` directory, which
  holds the encoder only.

Codebooks of the l2-normalised family are stored in canonical unit-norm form (``F.normalize`` of the stored rows),
which is all the original models ever use. transformers' ``JanusVQVAE.encode`` measures distances to the raw rows
instead (the original Janus ``VectorQuantizer`` normalises both sides), so its codes equal ours, and the original
model's, when the checkpoint's rows are unit-norm, as Janus initialises them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from omnitok.config import load_config_file
from omnitok.errors import OmnitokError
from omnitok.jsonfile import read_json_object
from omnitok.tokenizers.image import ImagePreprocessConfig, ImageTokenizer
from omnitok.tokenizers.vqgan import VQGAN, VQGANConfig
from omnitok.weights import load_safetensors, load_weights, torch_load_state

FORMATS = ("llamagen", "janus", "chameleon")


def _hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        return load_safetensors(directory / "model.safetensors")
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    if shards:
        return {k: v for shard in shards for k, v in load_safetensors(shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        return torch_load_state(directory / "pytorch_model.bin")
    raise OmnitokError(f"{directory} has no model.safetensors or pytorch_model.bin")


def _hf_config(directory: Path, sub: str) -> tuple[dict, str]:
    """The VQ sub-config of a Hugging Face directory and the key prefix of its weights (a VQ model saved alone has
    none; a full Janus / Chameleon model nests it under ``model.vqmodel.``)."""
    path = directory / "config.json"
    cfg = read_json_object(path, f"{directory} is not a Hugging Face model directory (no config.json)")
    if "vq_config" in cfg:
        return cfg["vq_config"], "model.vqmodel."
    if cfg.get("model_type") != sub:
        raise OmnitokError(f"{path} has model_type {cfg.get('model_type')!r}; expected {sub!r} or a model with "
                           "a vq_config")
    return cfg, ""


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _codebook(weight: torch.Tensor, l2: bool) -> dict[str, torch.Tensor]:
    """A (K, d) embedding table -> the quantizer's vector-quantize-pytorch buffers."""
    embed = (F.normalize(weight.float(), p=2, dim=-1) if l2 else weight.float())[None]  # (1, K, d)
    prefix = "quantize.vq._codebook."
    return {prefix + "embed": embed, prefix + "embed_avg": embed.clone(),
            prefix + "cluster_size": torch.ones(1, weight.shape[0]), prefix + "initted": torch.tensor(True)}


def _with_codebook(state: dict[str, torch.Tensor], l2: bool, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if k != "quantize.embedding.weight" and not k.startswith(drop)}
    if "quantize.embedding.weight" not in state:
        raise OmnitokError("checkpoint has no quantize.embedding.weight (the codebook)")
    return {**out, **_codebook(state["quantize.embedding.weight"], l2)}


def from_janus(src: Path, image_size: int | None) -> tuple[VQGAN, dict, ImagePreprocessConfig]:
    cfg, prefix = _hf_config(src, "janus_vqgan")
    config = VQGANConfig(
        base_channels=cfg.get("base_channels", 128), channel_multipliers=tuple(cfg.get("channel_multiplier",
                                                                                        (1, 1, 2, 2, 4))),
        num_res_blocks=cfg.get("num_res_blocks", 2), level_attention=True,
        latent_channels=cfg.get("latent_channels", 256), codebook_size=cfg.get("num_embeddings", 16384),
        codebook_dim=cfg.get("embed_dim", 8), l2_normalized_codes=True, dropout=cfg.get("dropout", 0.0),
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3))
    state = _with_codebook(_strip(_hf_weights(src), prefix), l2=True)
    size = image_size or cfg.get("num_patches", 24) * config.downsample
    return VQGAN(config), state, ImagePreprocessConfig(image_size=size)


_LLAMAGEN_NAMES = [
    (r"^(encoder)\.conv_blocks\.(\d+)\.res\.", r"\1.down.\2.block."),
    (r"^(encoder)\.conv_blocks\.(\d+)\.", r"\1.down.\2."),
    (r"^(decoder)\.conv_blocks\.(\d+)\.res\.", r"\1.up.\2.block."),
    (r"^(decoder)\.conv_blocks\.(\d+)\.", r"\1.up.\2."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."),
]


def from_llamagen(src: Path, image_size: int | None) -> tuple[VQGAN, dict, ImagePreprocessConfig]:
    ckpt = torch_load_state(src)
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    if "encoder.conv_in.weight" not in state:
        raise OmnitokError(f"{src} is not a LlamaGen VQ checkpoint (no encoder.conv_in.weight)")
    renamed = {}
    for key, value in state.items():
        for pattern, repl in _LLAMAGEN_NAMES:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    # LlamaGen stores no config: read it off the shapes.
    base = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    mults = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // base for i in levels)
    blocks = len({m.group(1) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))})
    codebook = state["quantize.embedding.weight"]
    config = VQGANConfig(
        base_channels=base, channel_multipliers=mults, num_res_blocks=blocks,
        level_attention=any(k.startswith(f"encoder.conv_blocks.{levels[-1]}.attn.") for k in state),
        latent_channels=state["encoder.conv_out.weight"].shape[0], codebook_size=codebook.shape[0],
        codebook_dim=codebook.shape[1], l2_normalized_codes=True)
    state = _with_codebook(renamed, l2=True, drop=("quantize.codebook_used",))
    return VQGAN(config), state, ImagePreprocessConfig(image_size=image_size or 256)


def _chameleon_attention(attn_resolutions: list[int] | None, resolution: int, levels: int) -> bool:
    """omnitok places level attention at the lowest resolution or nowhere; Chameleon uses none."""
    attn = list(attn_resolutions or [])
    lowest = resolution // 2 ** (levels - 1)
    if attn and attn != [lowest]:
        raise OmnitokError(f"attention at resolutions {attn} is not supported (only none, or the lowest, {lowest})")
    return bool(attn)


def from_chameleon(src: Path, image_size: int | None) -> tuple[VQGAN, dict, ImagePreprocessConfig]:
    if src.is_dir():  # transformers' ChameleonVQVAE: encoder only
        cfg, prefix = _hf_config(src, "chameleon_vqgan")
        mults = tuple(cfg.get("channel_multiplier", (1, 1, 2, 2, 4)))
        resolution = cfg.get("resolution", 512)
        config = VQGANConfig(
            base_channels=cfg.get("base_channels", 128), channel_multipliers=mults,
            num_res_blocks=cfg.get("num_res_blocks", 2),
            level_attention=_chameleon_attention(cfg.get("attn_resolutions"), resolution, len(mults)),
            latent_channels=cfg.get("latent_channels", 256), codebook_size=cfg.get("num_embeddings", 8192),
            codebook_dim=cfg.get("embed_dim", 256), l2_normalized_codes=False, has_decoder=False,
            in_channels=cfg.get("in_channels", 3))
        if cfg.get("double_latent"):
            raise OmnitokError("double_latent Chameleon encoders are not supported")
        # transformers keeps post_quant_conv although it has no decoder to feed.
        state = _with_codebook(_strip(_hf_weights(src), prefix), l2=False, drop=("post_quant_conv.",))
        return VQGAN(config), state, ImagePreprocessConfig(image_size=image_size or resolution)

    yaml_path = src.with_suffix(".yaml")
    if not yaml_path.is_file():
        raise OmnitokError(f"{src}: Chameleon's vqgan.ckpt needs its vqgan.yaml beside it ({yaml_path} is missing)")
    params = load_config_file(yaml_path)["model"]["params"]
    dd = params["ddconfig"]
    if dd.get("double_z"):
        raise OmnitokError("double_z VQGAN configs are not supported")
    mults = tuple(dd["ch_mult"])
    config = VQGANConfig(
        base_channels=dd["ch"], channel_multipliers=mults, num_res_blocks=dd["num_res_blocks"],
        level_attention=_chameleon_attention(dd.get("attn_resolutions"), dd["resolution"], len(mults)),
        latent_channels=dd["z_channels"], codebook_size=params["n_embed"], codebook_dim=params["embed_dim"],
        l2_normalized_codes=False, in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3),
        dropout=dd.get("dropout", 0.0))
    ckpt = torch_load_state(src)
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    n = len(mults)
    # taming-transformers numbers decoder levels from the highest resolution; ours from the lowest.
    state = {re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.", k): v
             for k, v in state.items()}
    state = _with_codebook(state, l2=False, drop=("loss.",))  # loss.*: the training discriminator and LPIPS
    return VQGAN(config), state, ImagePreprocessConfig(image_size=image_size or dd["resolution"])


_IMPORTERS: dict[str, Callable[[Path, int | None], tuple[VQGAN, dict, ImagePreprocessConfig]]] = {
    "llamagen": from_llamagen, "janus": from_janus, "chameleon": from_chameleon}


def import_image_tokenizer(fmt: str, src: str | Path, out: str | Path | None = None,
                           image_size: int | None = None, resize: str = "crop") -> ImageTokenizer:
    """Import a checkpoint of format ``fmt`` (one of ``FORMATS``); save it to ``out`` when given."""
    if fmt not in _IMPORTERS:
        raise OmnitokError(f"unknown image checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = Path(src)
    if not src.exists():
        raise OmnitokError(f"{src} does not exist")
    try:
        model, state, preprocess = _IMPORTERS[fmt](src, image_size)
    except (KeyError, IndexError, TypeError, AttributeError) as e:  # a foreign file without the structure expected
        raise OmnitokError(f"{src} is not a {fmt} checkpoint as omnitok reads one ({type(e).__name__}: {e})") from None
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(src))
    # The original pipeline's recipe, unless the user asks for omnitok's aspect-keeping grids instead.
    recipe = fmt if resize == "crop" else "omnitok"
    tok = ImageTokenizer(model, dataclasses.replace(preprocess, resize=resize, recipe=recipe))  # re-validates
    if out is not None:
        tok.save(out)
    return tok

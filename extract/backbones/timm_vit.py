"""Image ViTs from timm (`timm:<model_name>`: MAE, DINOv2, CLIP, DeiT, ...), weights from a local file only.

Preprocessing is timm's evaluation transform for the model's pretrained configuration (resize,
centre crop, mean/std); prefix tokens (class, distillation, registers) are kept apart from patches.
"""

from __future__ import annotations

import torch

from ..checkpoints import CheckpointError, expect, expect_depth, flat_tensors, load_checkpoint, load_weights
from .base import Backbone, need_checkpoint, register


class TimmViT(Backbone):
    modality = "image"

    def __init__(self, model, transform, *, final_norm: bool = False, name: str):
        super().__init__()
        self.name, self.model, self.transform, self.final_norm = name, model, transform, final_norm
        self.dim, self.depth, self.num_prefix = model.embed_dim, len(model.blocks), model.num_prefix_tokens
        self.grid = tuple(model.patch_embed.grid_size)  # (rows, columns) of patches
        # Pooling ViTs (global_pool='avg') normalise after pooling (fc_norm): their tokens have no final norm
        self.norm = None if isinstance(model.norm, torch.nn.Identity) else model.norm

    @property
    def class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None  # registers alone (vit_*_reg4_gap_*) are no class token

    def preprocess(self, item):
        return self.transform(item.convert("RGB")), torch.ones(self.num_tokens, dtype=torch.bool)

    def block_outputs(self, inputs, mask):
        vit = self.model
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(inputs))))
        for block in vit.blocks:
            x = block(x)
            yield x


@register(
    "timm",
    help="timm:<model_name>, any timm VisionTransformer (e.g. timm:vit_base_patch16_224.mae); "
         "checkpoint: a local timm/hub state dict (.pth/.bin/.safetensors)",
    modality="image",
)
def build(name, checkpoint, *, allow_pickle=False, model_name=None, final_norm=False, img_size=0):
    """img_size: run at this resolution rather than the model's own (DINOv2 at 224 rather than 518,
    the resolution of its linear evaluations): timm resamples the checkpoint's position embedding to
    it, and the images are resized and cropped to it by the tag's transform."""
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"timm:<model> needs timm: pip install 'tokencache[models]' ({error})") from None
    from timm.data import create_transform, resolve_data_config
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    path = need_checkpoint(name, checkpoint)  # (build_backbone has made sure a model is named)
    if not timm.is_model(model_name):
        raise ValueError(f"timm {timm.__version__} has no model {model_name!r}; "
                         "python -c \"import timm; print(timm.list_models('*vit*'))\" lists its ViTs")
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **({"img_size": img_size} if img_size else {}))
    except RuntimeError as error:  # a tag timm does not know (vit_base_patch16_224.nosuchtag)
        tags = timm.list_pretrained(f"{model_name.partition('.')[0]}.*")
        raise ValueError(f"timm:{model_name}: {error}" + (f" Its tags: {', '.join(t.partition('.')[2] for t in tags)}" if tags else "")) from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{model_name} is a timm {type(model).__name__}, not a VisionTransformer")
    patch = model.patch_embed.patch_size[0]
    if img_size % patch:
        raise ValueError(f"timm:{model_name}: img_size={img_size} is not a multiple of its patch size {patch} "
                         f"(e.g. {img_size // patch * patch or patch})")
    state, sha256 = load_checkpoint(path, allow_pickle=allow_pickle)
    # MAE and DeiT release {'model': ...}, others {'state_dict': ...}, some both, one inside the other
    while (wrapper := next((key for key in ("model", "state_dict") if isinstance(state.get(key), dict)), None)):
        state = state[wrapper]
    check_geometry(path, state, model, positions_resampled=bool(img_size))
    check_activation(path, state, model, model_name)
    try:  # original MAE/DINOv2/CLIP/DeiT-III layouts -> timm's (DeiT-III's layer scales 'gamma_1' -> 'ls1.gamma')
        state = checkpoint_filter_fn(state, model, adapt_layer_scale=True)
    except (RuntimeError, KeyError, ValueError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{path}: timm cannot convert it into {model_name}'s weights ({error})") from None
    expect_depth(path, state, len(model.blocks), option=None)
    if final_norm and "norm.weight" not in state and "fc_norm.weight" in state:
        raise CheckpointError(f"{path}: it has only the norm applied after pooling (fc_norm, as fine-tuned MAE releases), "
                              "not the final norm of the tokens: leave out --final-norm")
    # the tokens are block outputs: the heads, the pooled norm, and the final norm unless asked for, are not used
    load_weights(model, state, path, unused=("head.", "fc_norm.", "attn_pool.") + (() if final_norm else ("norm.",)),
                 token_path=TOKEN_WEIGHTS + (("norm.",) if final_norm else ()))
    data = resolve_data_config(model=model)
    if img_size:  # timm's config keeps the tag's size
        data["input_size"] = (3, img_size, img_size)
    backbone = TimmViT(model, create_transform(**data), final_norm=final_norm, name=name)
    if "norm.weight" not in state:  # a fine-tuned MAE's: its tokens have no final norm to record, only timm's initial one
        backbone.norm = None
    backbone._finish(
        sha256, model_name=model_name,
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data.items()},
    )
    return backbone


# Where the checkpoint layouts timm converts keep the patch kernel, the position embedding and the
# prefix tokens: under the prefixes its filter strips (OpenCLIP's timm trunk, I-JEPA's 'encoder',
# TIPSv2's vision encoder), in this order, the image tower's before any other (a whole CLIP
# checkpoint holds a text tower's 'positional_embedding' too). Layouts timm converts otherwise
# (RADIO, whose position embedding it resamples by design) are not checked.
TIMM_PREFIXES = ("", "module.", "visual.trunk.", "module.visual.trunk.", "encoder.module.", "encoder.", "vision_encoder.")
PATCH_KERNELS = ("patch_embed.proj.weight", "visual.conv1.weight", "preprocessor.patchifier.proj.weight",  # AIMv2
                 "beit3.vision_embed.proj.weight")
POSITIONS = ("pos_embed", "visual.positional_embedding", "preprocessor.pos_embed", "beit3.encoder.embed_positions.A.weight")
POSITION_OFFSETS = {"beit3.encoder.embed_positions.A.weight": 2}  # BEiT-3's first two positions are fairseq's padding offset
CLASS_TOKENS = ("cls_token", "visual.class_embedding")
REGISTERS = ("reg_token", "register_tokens")


def _find(tensors: dict, names: tuple[str, ...], named: bool = False):
    """The tensor of the first of `names` under the first of TIMM_PREFIXES that has one, or None
    (`named`: (name, tensor), or (None, None))."""
    found = next(((name, tensors[prefix + name]) for prefix in TIMM_PREFIXES for name in names if prefix + name in tensors), (None, None))
    return found if named else found[1]


# Weights of timm's layout that shape the cached tokens (load_weights refuses those a model has no place for).
TOKEN_WEIGHTS = ("blocks.", "patch_embed.", "norm_pre.", "cls_token", "reg_token", "dist_token", "pos_embed")


def check_activation(path, state: dict, model, model_name: str):
    """Refuse OpenAI's CLIP weights in a model without QuickGELU, the activation they were trained
    with: timm's *_clip_* models use GELU (for OpenCLIP's weights), and OpenAI's run through them
    give tokens off by about 1 % without a word. Known by the entries only OpenAI's files hold, or
    by timm's own note on the tag (.openai)."""
    openai_file = {"input_resolution", "context_length", "vocab_size"} <= set(state)
    timm_says = any("QuickGELU" in note for note in model.pretrained_cfg.get("notes") or ())
    if (openai_file or timm_says) and type(model.blocks[0].mlp.act).__name__ != "QuickGELU":
        import timm

        base, dot, tag = model_name.partition(".")
        variant = base.replace("_clip_", "_clip_quickgelu_", 1)
        fix = f"timm:{variant}{dot}{tag}" if variant != base and timm.is_model(variant) else "a *_clip_quickgelu_* model"
        why = "it is OpenAI's CLIP (its input_resolution, context_length and vocab_size entries say so)" if openai_file else \
            f"timm says of {model_name}: {model.pretrained_cfg['notes'][0]!r}"
        raise CheckpointError(f"{path}: {why}, trained with QuickGELU, which {model_name} does not use: give {fix}")


def check_geometry(path, state: dict, model, positions_resampled: bool):
    """Refuse a checkpoint of another patch size, resolution or number of prefix tokens, in any
    layout: timm's filter would resample its patch kernel and position embedding to this model's
    without a word, and the tokens would come from another model. A position embedding may hold a
    slot for each prefix token (DINOv2 keeps the class token's, which timm drops) or none.
    `positions_resampled`: another resolution was asked for (img_size), so the positions' count is not checked."""
    tensors = dict(flat_tensors(state))
    kernel = _find(tensors, PATCH_KERNELS)
    if kernel is not None:
        expect(path, "the patch embedding", "patches of", tuple(model.patch_embed.proj.weight.shape[-2:]), tuple(kernel.shape[-2:]))
        if kernel.shape[0] != model.embed_dim:  # before any weight's shape is compared: the whole model is of another size
            sizes = {192: "Ti", 384: "S", 768: "B", 1024: "L", 1280: "H", 1536: "g"}
            size = f" (a ViT-{sizes[kernel.shape[0]]}'s)" if kernel.shape[0] in sizes else ""
            raise CheckpointError(f"{path}: its tokens have {kernel.shape[0]} dims{size}, this model's {model.embed_dim}: "
                                  "give the timm model of its size")
    if any(_find(tensors, names) is not None for names in (CLASS_TOKENS, REGISTERS, ("dist_token",))):  # prefix tokens known by name
        registers = _find(tensors, REGISTERS)
        theirs = (_find(tensors, CLASS_TOKENS) is not None, _find(tensors, ("dist_token",)) is not None,
                  0 if registers is None else registers.shape[-2])
        ours = (getattr(model, "cls_token", None) is not None, getattr(model, "dist_token", None) is not None,
                0 if getattr(model, "reg_token", None) is None else model.reg_token.shape[-2])
        if theirs != ours:
            def kinds(has_class, distilled, registers) -> str:
                named = ["a class token"] * has_class + ["a distillation token"] * distilled + [f"{registers} registers"] * bool(registers)
                return f"{has_class + distilled + registers} prefix tokens ({', '.join(named) or 'none'})"
            raise CheckpointError(
                f"{path}: it has {kinds(*theirs)}, this model {kinds(*ours)}: give the timm model of its kind "
                "(a distilled DeiT is *_distilled_*, a DINOv2 with 4 registers *_reg4_dinov2)")
    name, positions = _find(tensors, POSITIONS, named=True)
    if positions is not None and not positions_resampled:
        slots, patches = positions.shape[-2] - POSITION_OFFSETS.get(name, 0), model.patch_embed.num_patches
        if slots == patches and model.num_prefix_tokens and not model.no_embed_class:
            kind = ("a class token with no position of its own (as DeiT-III's): give the timm model of its kind (e.g. deit3_*)"
                    if _find(tensors, CLASS_TOKENS) is not None else
                    "no class token (as SigLIP's or a *_gap_* model's): give the timm model of its kind")
            raise CheckpointError(f"{path}: its position embedding has no slot for prefix tokens, this model's has "
                                  f"{model.num_prefix_tokens}; the checkpoint has {kind}")
        if slots - patches not in {0, 1, model.num_prefix_tokens}:
            rows, columns = model.patch_embed.grid_size
            raise CheckpointError(f"{path}: its position embedding has {slots} positions, not this model's {rows}x{columns} "
                                  f"patches (and {model.num_prefix_tokens} prefix tokens): a checkpoint of another resolution; "
                                  "give the timm model of that resolution, or -o img_size=N to run at N pixels")

"""CogVideo's own YAML layout (THUDM/CogVideo sat/configs/*.yaml), accepted as written so a user
points sat_dist at the same files CogVideo's sample_video.py reads."""
from __future__ import annotations

from typing import Optional

from ...errors import ConfigError
from .config import MODEL_CLASS


def cogvideo_layout(merged: dict) -> Optional[dict]:
    """CogVideo's `model: {network_config: {target, params}, conditioner_config, first_stage_config,
    ...}` + `args: {load, fp16/bf16, ...}` -> sat_dist's {"model", "load"}.

    Only the DiT is loaded: every other engine part (T5 conditioner, VAE, denoiser, sampler, loss)
    and every other run argument is ignored, as SAT ignores unknown `args`. `args.load` becomes the
    checkpoint and `args.bf16`/`args.fp16` the dtype, unless given explicitly."""
    model = merged.get("model")
    if not isinstance(model, dict) or "network_config" not in model:
        return None
    net = model["network_config"]
    if not isinstance(net, dict) or "params" not in net:
        raise ConfigError("model.network_config must hold {target: dit_video_concat.DiffusionTransformer, params: ...}")
    target = str(net.get("target", ""))
    if target.rsplit(".", 1)[-1] != MODEL_CLASS:
        raise ConfigError(f"model.network_config.target {target!r} is not supported; sat_dist loads "
                          f"dit_video_concat.{MODEL_CLASS}")
    out_model = {"model_class": MODEL_CLASS, **dict(net["params"] or {})}
    load: dict = {}
    args = merged.get("args") or {}
    if isinstance(args, dict):
        if args.get("load"):
            load["checkpoint"] = str(args["load"])
        if args.get("bf16"):
            load["dtype"] = "bf16"
        elif args.get("fp16"):
            load["dtype"] = "fp16"
    load.update(merged.get("load") or {})
    return {"model": out_model, "load": load}

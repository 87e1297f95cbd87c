"""A pruned transformers model's new sizes, written into its config and modules (inplace=True)."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn as nn


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (duck-typed: a config that serialises and names its head count)."""
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict") and hasattr(model, "get_input_embeddings")


def _cut_by_tensor(model: nn.Module, cuts: Mapping[tuple[str, str, int], list[int]]) -> dict[int, dict[int, int]]:
    """id of a tensor -> {dim: how many indices go}, whichever name of a tied tensor the cuts use."""
    out: dict[int, dict[int, int]] = {}
    for (layer, name, dim), gone in cuts.items():
        if name:
            out.setdefault(id(getattr(model.get_submodule(layer), name)), {})[dim] = len(gone)
    return out


def _shape_after(model: nn.Module, name: str, cut: Mapping[int, Mapping[int, int]]) -> list[int]:
    """The shape of tensor `name` once the cuts are made."""
    layer, _, tensor = name.rpartition(".")
    t = getattr(model.get_submodule(layer), tensor)
    shape = list(t.shape)
    for dim, n in cut.get(id(t), {}).items():
        shape[dim] -= n
    return shape


def _one(values: dict[str, int], key: str) -> int | None:
    found = set(values.values())
    if len(found) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in list(values.items())[:6])
        raise ValueError(f"prune: inplace=True would leave layers with different {key} ({shown}), which one "
                         f"config.{key} cannot describe; prune every layer alike (one fraction, scope='layer'), or "
                         "use the returned GraphModule, which holds any sizes")
    return found.pop() if found else None


def config_updates(model: nn.Module, cuts: Mapping[tuple[str, str, int], list[int]]) -> dict[str, int]:
    """The config values that describe `model` once `cuts` are made: num_attention_heads,
    num_key_value_heads and head_dim (from every attention's q/k projections and head_dim),
    intermediate_size (every Linear that makes the MLP's intermediate channels), hidden_size (the input embeddings). Raises
    ValueError, before anything changes, where one value cannot describe every layer or where the
    model class built from the new config (on the meta device) would not have the pruned shapes."""
    config = model.config
    cuts = _cut_by_tensor(model, cuts)
    heads, kv, dims, inter = {}, {}, {}, {}
    for name, mod in model.named_modules():
        if all(isinstance(getattr(mod, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and isinstance(getattr(mod, "head_dim", None), int):
            d = mod.head_dim
            heads[name] = _shape_after(model, f"{name}.q_proj.weight", cuts)[0] // d
            kv[name] = _shape_after(model, f"{name}.k_proj.weight", cuts)[0] // d
            dims[name] = d
        if isinstance(mod, nn.Linear) and mod.out_features == getattr(config, "intermediate_size", None) \
                and 0 in cuts.get(id(mod.weight), {}):  # an MLP's up (and gate) projection; the meta build checks the rest
            inter[name] = _shape_after(model, f"{name}.weight", cuts)[0]
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    wanted = {"num_attention_heads": _one(heads, "num_attention_heads"), "num_key_value_heads": _one(kv, "num_key_value_heads"),
              "head_dim": _one(dims, "head_dim"), "intermediate_size": _one(inter, "intermediate_size"),
              "hidden_size": _shape_after(model, f"{emb_name}.weight", cuts)[1]}
    out = {k: v for k, v in wanted.items() if v is not None and getattr(config, k, None) != v}
    if "head_dim" not in out and ("num_attention_heads" in out or "hidden_size" in out) and wanted["head_dim"] is not None:
        out["head_dim"] = wanted["head_dim"]  # hidden_size // num_attention_heads no longer gives it
    _check_reloadable(model, out, cuts)
    return out


def _check_reloadable(model: nn.Module, updates: Mapping[str, int], cuts) -> None:
    """The model class, built from the updated config (on the meta device: no memory), must have
    the pruned shapes: what from_pretrained will build."""
    config = copy.deepcopy(model.config)
    for key, value in updates.items():
        setattr(config, key, value)
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception as err:  # noqa: BLE001 - said with the values that caused it
        raise ValueError(f"prune: inplace=True: {type(model).__name__} cannot be built from its config with {dict(updates)} "
                         f"({type(err).__name__}: {err}); use the returned GraphModule, which holds any sizes") from err
    built = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        want = _shape_after(model, name, cuts)
        if name in built and list(built[name].shape) != want:
            raise ValueError(f"prune: inplace=True: {type(model.config).__name__} cannot describe the pruned model: "
                             f"'{name}' would be {tuple(want)}, but the config {dict(updates) or '(unchanged)'} builds "
                             f"{tuple(built[name].shape)} (its attention derives head sizes from hidden_size, or its "
                             "layers would differ); exclude these groups, or use the returned GraphModule")


def write_config(model: nn.Module, updates: Mapping[str, int]) -> None:
    """Set the config's new values and the modules' copies of them (an MLP's intermediate_size)."""
    old = {k: getattr(model.config, k, None) for k in updates}
    for key, value in updates.items():
        setattr(model.config, key, value)
    for mod in model.modules():
        for key in ("intermediate_size", "hidden_size"):
            if key in updates and getattr(mod, key, None) == old[key] and mod is not model:
                setattr(mod, key, updates[key])

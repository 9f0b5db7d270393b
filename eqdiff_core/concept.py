"""The concept file: one ``.safetensors`` per learned subject (DESIGN §4).

Tensors (names in the file):
    token.lf, token.hf          S*_LF and S*_HF, each (D,) with D the text encoder width (768 for SD1)
    kv.<weight key>             cross-attention K/V deltas, same shape as the UNet weight they add to;
                                keys are the UNet's own, e.g. ``diffusion_model.output_blocks.3.1.
                                transformer_blocks.0.attn2.to_k.weight``
    rra.<layer>.<param>         RRA layers keyed ``<block>.<id>.<transformer index>`` (``middle.0.0``,
                                ``output.3.0`` ...), params ``to_k_res``, ``to_v_res`` (d, d),
                                ``h_r.weight`` (d+1, 2d), ``h_r.bias`` (d+1,)
    reference_context           optional (T, D) text context for the reference pass
    train.<name>                optional optimiser state (AdamW moments), to resume training exactly
Metadata: ``eqdiff_format`` (the version) and ``eqdiff_metadata`` (JSON: token, class word, preset
and training settings, base model name and UNet hash, steps, loss history, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .files import write_atomic

FORMAT_VERSION = 1
RRA_PARAMS = ("to_k_res", "to_v_res", "h_r.weight", "h_r.bias")


class ConceptError(ValueError):
    """A concept file that cannot be read, or that does not fit the model it is applied to."""


@dataclass
class Concept:
    token_lf: torch.Tensor
    token_hf: torch.Tensor
    kv_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    rra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    reference_context: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)
    training_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def token_ori(self) -> torch.Tensor:
        """S*_ori = S*_LF + S*_HF (Eq. 5), the embedding used at inference."""
        return self.token_lf + self.token_hf

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "concept"))

    def tensors(self, with_training_state: bool = True) -> dict[str, torch.Tensor]:
        out = {"token.lf": self.token_lf, "token.hf": self.token_hf}
        out |= {f"kv.{k}": v for k, v in self.kv_deltas.items()}
        out |= {f"rra.{layer}.{p}": t for layer, params in self.rra.items() for p, t in params.items()}
        if self.reference_context is not None:
            out["reference_context"] = self.reference_context
        if with_training_state:
            out |= {f"train.{k}": v for k, v in self.training_state.items()}
        return out

    def fingerprint(self) -> str:
        """A digest of every tensor, for caches that must not mix concepts."""
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(self.tensors(with_training_state=False).items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def validate(concept: Concept, source: str = "concept") -> Concept:
    """Internal consistency: shapes of the token pair and RRA layers, finite values."""
    d = concept.token_lf.shape
    if concept.token_lf.ndim != 1 or concept.token_hf.shape != d:
        raise ConceptError(f"{source}: token.lf and token.hf must be two vectors of one width, "
                           f"got {tuple(concept.token_lf.shape)} and {tuple(concept.token_hf.shape)}")
    for layer, params in concept.rra.items():
        missing = [p for p in RRA_PARAMS if p not in params]
        if missing:
            raise ConceptError(f"{source}: RRA layer {layer} lacks {', '.join(missing)}")
        dim = params["to_k_res"].shape[0]
        want = {"to_k_res": (dim, dim), "to_v_res": (dim, dim), "h_r.weight": (dim + 1, 2 * dim), "h_r.bias": (dim + 1,)}
        for p, shape in want.items():
            if tuple(params[p].shape) != shape:
                raise ConceptError(f"{source}: RRA layer {layer} {p} has shape {tuple(params[p].shape)}, expected {shape}")
    if concept.reference_context is not None and (
        concept.reference_context.ndim != 2 or concept.reference_context.shape[-1] != d[0]
    ):
        raise ConceptError(f"{source}: reference_context must be (tokens, {d[0]}), "
                           f"got {tuple(concept.reference_context.shape)}")
    for name, t in concept.tensors().items():
        if not torch.isfinite(t).all():
            raise ConceptError(f"{source}: tensor {name} holds NaN or infinite values; the training that "
                               f"wrote it diverged. Use an earlier save or retrain with a lower learning rate.")
    return concept


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically (``files.write_atomic``)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def save(concept: Concept, path: str, with_training_state: bool = True) -> str:
    """Write the concept atomically; ``with_training_state`` keeps the optimiser state for resuming."""
    validate(concept, path)
    meta = {"eqdiff_format": str(FORMAT_VERSION), "eqdiff_metadata": json.dumps(concept.metadata)}
    return write_safetensors(concept.tensors(with_training_state), path, meta)


def load(path: str) -> Concept:
    """Read and validate a concept file; errors say what is wrong and what to do."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ConceptError(f"concept file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ConceptError(f"cannot read concept file {path}: {err}. The file is truncated or not a "
                           f"safetensors file; save the concept again.") from None
    version = meta.get("eqdiff_format")
    if version is None:
        raise ConceptError(f"{path} is a safetensors file but not an EqDiff concept (no eqdiff_format "
                           f"metadata); EqDiff Load Concept reads files written by EqDiff Save Concept.")
    if version != str(FORMAT_VERSION):
        raise ConceptError(f"{path} has concept format {version}; this version of the pack reads format "
                           f"{FORMAT_VERSION}. Update the pack to read it.")
    try:
        metadata = json.loads(meta.get("eqdiff_metadata", "{}"))
    except json.JSONDecodeError as err:
        raise ConceptError(f"{path}: its metadata is not valid JSON ({err})") from None
    if "token.lf" not in tensors or "token.hf" not in tensors:
        raise ConceptError(f"{path} lacks the token embeddings token.lf / token.hf")
    rra: dict[str, dict[str, torch.Tensor]] = {}
    kv, training_state = {}, {}
    for name, t in tensors.items():
        if name.startswith("train."):
            training_state[name[6:]] = t
        elif name.startswith("kv."):
            kv[name[3:]] = t
        elif name.startswith("rra."):
            layer, param = _split_rra_name(name[4:])
            rra.setdefault(layer, {})[param] = t
    concept = Concept(tensors["token.lf"], tensors["token.hf"], kv, rra, tensors.get("reference_context"), metadata,
                      training_state)
    return validate(concept, path)


def _split_rra_name(name: str) -> tuple[str, str]:
    for param in RRA_PARAMS:
        if name.endswith("." + param):
            return name[: -len(param) - 1], param
    raise ConceptError(f"unknown RRA tensor rra.{name}")


def check_fits(
    concept: Concept,
    token_dim: int,
    weight_shapes: dict[str, tuple[int, ...]],
    attention_dims: dict[str, int],
    model_name: str = "this model",
) -> None:
    """Shapes against the model the concept is applied to.

    ``weight_shapes``: UNet weight key -> shape; ``attention_dims``: RRA layer key -> self-attention
    width of that layer in this model.
    """
    trained_on = concept.metadata.get("base_model", "an SD1.x checkpoint")
    hint = f"Apply it to the model it was trained on ({trained_on}) or retrain it for {model_name}."
    if concept.token_lf.shape[0] != token_dim:
        raise ConceptError(f"concept '{concept.name}' has {concept.token_lf.shape[0]}-d token embeddings; "
                           f"{model_name}'s text encoder is {token_dim}-d. {hint}")
    for key, delta in concept.kv_deltas.items():
        if key not in weight_shapes:
            raise ConceptError(f"concept '{concept.name}' changes {key}, which {model_name} does not have. {hint}")
        if tuple(delta.shape) != tuple(weight_shapes[key]):
            raise ConceptError(f"concept '{concept.name}': {key} is {tuple(delta.shape)} in the concept and "
                               f"{tuple(weight_shapes[key])} in {model_name}. {hint}")
    for layer, params in concept.rra.items():
        if layer not in attention_dims:
            raise ConceptError(f"concept '{concept.name}' has an RRA layer at {layer}, which {model_name} does "
                               f"not have (its self-attention layers: {', '.join(sorted(attention_dims))}). {hint}")
        if params["to_k_res"].shape[0] != attention_dims[layer]:
            raise ConceptError(f"concept '{concept.name}': RRA layer {layer} is {params['to_k_res'].shape[0]} wide, "
                               f"{model_name}'s self-attention there is {attention_dims[layer]} wide. {hint}")

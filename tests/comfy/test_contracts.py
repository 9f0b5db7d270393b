"""Contracts: the shape of every ComfyUI interface the pack relies on, one test per boundary module.

Each test checks signatures, returned values, option keys and class names on the installed ComfyUI,
and behaviour where a signature says too little, so that a ComfyUI release that changes one of them
fails here, with a message saying what changed and which module of nodes/comfyui uses it. Public
node API behaviour is covered by the node tests; these pin the private parts.
"""

import inspect

import pytest
import torch

from comfy_env import use_comfy

use_comfy()


def require(condition: bool, what: str, where: str) -> None:
    """Fail with a message naming the ComfyUI interface and the pack code that relies on it."""
    assert condition, f"ComfyUI changed: {what}. The pack relies on it in nodes/comfyui/{where}."


def parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def accepts(fn, *names) -> bool:
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return all(n in params or var_kw for n in names)


# -- node_api --------------------------------------------------------------------------------------
def test_node_api_contract():
    import comfy_api.latest as api

    for name in ("ComfyExtension", "io", "ui"):
        require(hasattr(api, name), f"comfy_api.latest no longer exports {name}", "node_api.py")
    io = api.io
    for name in ("ComfyNode", "Schema", "NodeOutput", "Custom", "Combo", "Int", "Float", "String", "Boolean",
                 "Image", "Mask", "Latent", "Model", "Clip", "Vae", "Conditioning", "Sampler", "Sigmas", "Guider"):
        require(hasattr(io, name), f"comfy_api.latest.io.{name} is gone", "node_api.py and the node modules")
    require(hasattr(api.ui, "PreviewImage"), "comfy_api.latest.ui.PreviewImage is gone", "node_api.py (metrics)")
    combo = io.Combo.Input("x", options=["a", "b"], default="a")
    require(combo.options == ["a", "b"], "io.Combo.Input no longer keeps its options in .options",
            "node_api.py (check_choices)")
    number = io.Int.Input("n", default=1, min=1, max=5)
    require((number.min, number.max) == (1, 5), "io.Int.Input no longer keeps min / max as attributes",
            "node_api.py (check_range)")


def test_validation_reports_a_custom_error_under_each_named_input():
    """check_choices / check_range exist because ComfyUI skips its own checks for inputs that
    validate_inputs names, and reports its message under each of them."""
    import execution

    source = inspect.getsource(execution.validate_inputs)
    require("custom_validation_failed" in source and '"input_name": x' in source,
            "custom validation errors are no longer reported per named input (execution.validate_inputs)",
            "node_api.py (how nodes name inputs in validate_inputs)")
    require("validate_function_inputs" in source and "validate_has_kwargs" in source,
            "execution.validate_inputs no longer skips built-in checks for inputs validate_inputs names",
            "node_api.py (check_range, require_choices)")


# -- management ------------------------------------------------------------------------------------
def test_management_contract():
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    for name in ("get_torch_device", "intermediate_device", "unet_offload_device", "load_models_gpu",
                 "soft_empty_cache", "throw_exception_if_processing_interrupted", "InterruptProcessingException",
                 "should_use_bf16", "should_use_fp16"):
        require(hasattr(mm, name), f"comfy.model_management.{name} is gone", "management.py")
    require(parameters(comfy.model_patcher.ModelPatcher.__init__)[1:4] == ["model", "load_device", "offload_device"],
            "ModelPatcher(model, load_device, offload_device) changed", "management.py (managed)")
    bar = comfy.utils.ProgressBar
    require(accepts(bar.update_absolute, "value", "total", "preview") and accepts(bar.update, "value"),
            "ProgressBar.update_absolute(value, total, preview) / update(value) changed", "management.py (Progress)")


def test_a_managed_module_loads_and_offloads(registered_nodes):
    from comfy_env import pack_module

    import comfy.model_management

    management = pack_module("nodes.comfyui.management")
    module = torch.nn.Linear(4, 4)
    patcher = management.managed(module, "cpu")
    assert (patcher.load_device, patcher.offload_device) == (torch.device("cpu"), torch.device("cpu"))
    management.load(patcher)
    require(patcher.model[0] is module, "ModelPatcher no longer holds the module it was given", "management.py")
    auto = management.managed(torch.nn.Linear(4, 4), "auto")
    assert (auto.load_device, auto.offload_device) == (comfy.model_management.get_torch_device(),
                                                       comfy.model_management.unet_offload_device())


def test_half_precision_and_bf16_by_device(registered_nodes):
    from comfy_env import pack_module

    management = pack_module("nodes.comfyui.management")
    assert management.half_dtype(torch.device("cpu")) == torch.float32  # ComfyUI computes in float32 on a CPU
    assert management.supports_bf16(torch.device("cpu")) is True
    # torch answers for CUDA devices, also where there is none (False)
    assert management.supports_bf16(torch.device("cuda")) == torch.cuda.is_bf16_supported()


def test_images_and_tensors_convert_both_ways(registered_nodes):
    from comfy_env import pack_module

    management = pack_module("nodes.comfyui.management")
    bchw = torch.arange(24, dtype=torch.float16).reshape(1, 3, 2, 4)
    image = management.bchw_to_image(bchw)
    assert image.dtype == torch.float32 and image.shape == (1, 2, 4, 3) and image.is_contiguous()
    assert image.device == management.intermediate_device() and torch.equal(image, bchw.float().permute(0, 2, 3, 1))
    assert torch.equal(management.image_to_bchw(image), bchw.float())


@pytest.mark.cuda
def test_device_auto_is_the_gpu_and_cpu_stays_on_the_cpu(registered_nodes):
    from comfy_env import pack_module

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

    management = pack_module("nodes.comfyui.management")
    assert management.devices("auto")[0].type == "cuda"
    on_gpu = torch.zeros(1, 3, 2, 2, device="cuda")
    assert management.bchw_to_image(on_gpu).device == management.intermediate_device()
    assert management.managed(torch.nn.Linear(4, 4), "cpu").load_device == torch.device("cpu")
    assert management.managed(torch.nn.Linear(4, 4), "auto").load_device.type == "cuda"
    # the CPU computes in float32 also beside a GPU: half_dtype asks about the device it is given
    assert management.half_dtype(torch.device("cpu")) == torch.float32
    gpu = management.devices("auto")[0]
    assert management.half_dtype(gpu) in (torch.bfloat16, torch.float16)
    if torch.cuda.get_device_capability(gpu)[0] >= 8:  # Ampere and later have bf16
        assert management.half_dtype(gpu) == torch.bfloat16


# -- folders ---------------------------------------------------------------------------------------
def test_folders_contract(registered_nodes):
    import folder_paths

    for name in ("add_model_folder_path", "get_folder_paths", "get_filename_list", "get_full_path",
                 "get_input_directory", "get_temp_directory", "get_output_directory", "get_save_image_path"):
        require(hasattr(folder_paths, name), f"folder_paths.{name} is gone", "folders.py")
    require(isinstance(folder_paths.models_dir, str), "folder_paths.models_dir is gone", "folders.py")
    paths, extensions = folder_paths.folder_names_and_paths["eqdiff"]
    require(isinstance(paths, list) and isinstance(extensions, set),
            "folder_names_and_paths values are no longer (paths, extensions)", "folders.py (register)")
    found = folder_paths.get_save_image_path("eqdiff/contract", folder_paths.get_output_directory())
    require(len(found) == 5 and isinstance(found[2], int),
            "get_save_image_path no longer returns (folder, name, counter, subfolder, prefix)",
            "folders.py (output_file_stem)")


# -- latents ---------------------------------------------------------------------------------------
def test_latents_contract(tiny):
    model, _, vae = tiny
    latent_format = model.get_model_object("latent_format")
    require(hasattr(latent_format, "process_in"),
            "MODEL.get_model_object('latent_format') no longer has process_in", "latents.py (to_unet_space)")
    with torch.inference_mode():
        raw = vae.encode(torch.rand(1, 64, 64, 3))
    require(tuple(raw.shape) == (1, 4, 8, 8), f"VAE.encode(IMAGE) returned {tuple(raw.shape)}", "latents.py (encode)")


# -- tokens ----------------------------------------------------------------------------------------
def test_real_tokens_are_the_text_between_start_and_end(tiny):
    """What the DCI guider reads a prompt's words from: the ids the CLIP tokenizer gives the text."""
    from comfy_env import pack_module

    _, clip, _ = tiny
    vocabulary = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer.get_vocab()
    real = pack_module("nodes.comfyui.tokens").real_tokens
    assert real(clip, "a photo of a dog") == [vocabulary[w + "</w>"] for w in ("a", "photo", "of", "a", "dog")]
    assert real(clip, "") == []
    with pytest.raises(ValueError, match="longer than one CLIP row"):
        real(clip, "dog " * 80)


@pytest.mark.cuda
def test_token_rows_come_to_the_cpu_from_a_clip_on_the_gpu(tiny):
    import comfy.model_management

    from comfy_env import pack_module

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, clip, _ = tiny
    tokens = pack_module("nodes.comfyui.tokens")
    clip.load_model()
    try:
        table = tokens.token_table(clip)
        assert table.device.type == "cuda"  # ComfyUI loads the text encoder on the GPU
        vocabulary = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer.get_vocab()
        ids = [vocabulary["a</w>"], vocabulary["dog</w>"]]
        rows = tokens.text_rows(clip, "a dog")
        assert rows.device.type == "cpu" and torch.equal(rows, table[ids].float().cpu())
        assert tokens.vocabulary_row(clip, "dog").device.type == "cpu"
    finally:
        comfy.model_management.unload_all_models()


def test_tokens_contract(tiny, tmp_path):
    """The concept token rides on the public ``embedding:`` syntax: a file in a folder of the tokenizer's
    embedding search path becomes a tensor token with the prompt's weight. The tokenizer's private
    ``_try_get_embedding`` (whose return arity changed in 0.4) is not used."""
    from safetensors.torch import save_file

    _, clip, _ = tiny
    tokenizer = clip.tokenizer
    require(isinstance(tokenizer.clip, str) and hasattr(tokenizer, tokenizer.clip) and tokenizer.clip_name == "l",
            "the SD1 tokenizer's inner tokenizer is no longer at getattr(tokenizer, tokenizer.clip) with clip_name 'l'",
            "tokens.py")
    inner = getattr(tokenizer, tokenizer.clip)
    for name in ("embedding_directory", "embedding_key", "embedding_identifier", "tokenizer", "tokens_start"):
        require(hasattr(inner, name), f"SDTokenizer.{name} is gone", "tokens.py")
    require(inner.embedding_identifier == "embedding:", "the embedding prefix is no longer 'embedding:'", "tokens.py")
    require("ktn" in inner.tokenizer.get_vocab(), "the CLIP vocabulary (tokenizer.get_vocab()) lacks 'ktn'",
            "tokens.py (vocabulary_id)")
    ids = inner.tokenizer("a photo of a")["input_ids"]
    require(ids[inner.tokens_start:-1] == [inner.tokenizer.get_vocab()[w + "</w>"] for w in ("a", "photo", "of", "a")],
            f"tokenizer(text)['input_ids'] is no longer start, the text's tokens, end (got {ids})", "tokens.py (text_rows)")
    vector = torch.randn(1, 768)
    save_file({inner.embedding_key: vector}, str(tmp_path / "contract.safetensors"))
    copied = __import__("copy").copy(inner)
    copied.embedding_directory = [str(tmp_path)]
    rows = copied.tokenize_with_weights("a photo of (embedding:contract :1.2) dog")
    found = [(t, w) for row in rows for t, w, *_ in row if torch.is_tensor(t)]
    require(len(found) == 1 and torch.equal(found[0][0], vector[0]) and found[0][1] == 1.2,
            f"an embedding file no longer becomes one weighted tensor token (got {found})", "tokens.py")
    text_model = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
    require(text_model.transformer.get_input_embeddings().weight.shape[1] == 768,
            "the text model's token table is no longer at transformer.get_input_embeddings()", "tokens.py")


# -- unet ------------------------------------------------------------------------------------------
def test_unet_contract(tiny):
    from comfy.ldm.modules.diffusionmodules import openaimodel

    from comfy_env import pack_module

    require(hasattr(openaimodel, "Downsample") and hasattr(openaimodel, "Upsample"),
            "openaimodel.Downsample / Upsample are gone", "unet.py (levels)")
    dm = tiny[0].get_model_object("diffusion_model")
    for name in ("input_blocks", "middle_block", "output_blocks"):
        require(hasattr(dm, name), f"UNetModel.{name} is gone", "unet.py")
    layers = pack_module("nodes.comfyui.unet").attention_layers(dm)
    state = dm.state_dict()
    require(layers and all(f"{layer.prefix}.attn1.to_k.weight" in state for layer in layers),
            "the transformer blocks' state-dict prefixes changed", "unet.py (AttentionLayer.prefix)")


# -- weights ---------------------------------------------------------------------------------------
def test_weights_contract(tiny):
    import comfy.lora
    import comfy.model_management

    model = tiny[0]
    require(accepts(comfy.lora.calculate_weight, "patches", "weight", "key"),
            "comfy.lora.calculate_weight(patches, weight, key) changed", "weights.py (patched_weights)")
    for name in ("get_key_patches", "model_state_dict", "add_patches", "weight_wrapper_patches", "patches"):
        require(hasattr(model, name), f"ModelPatcher.{name} is gone", "weights.py")
    key = next(k for k in model.model_state_dict("diffusion_model.") if k.endswith("attn2.to_k.weight"))
    delta = torch.full_like(model.model_state_dict()[key], 0.25, dtype=torch.float32)
    patched = model.clone()
    patched.add_patches({key: (delta,)}, 2.0)
    entry = patched.get_key_patches("diffusion_model.")[key]
    require(isinstance(entry[0], tuple) and len(entry[0]) == 2 and callable(entry[0][1]) and len(entry) == 2,
            "get_key_patches no longer returns [(base weight, convert function), *patches]", "weights.py")
    base = entry[0][0].float()
    computed = comfy.lora.calculate_weight(entry[1:], base.clone(), key)
    require(torch.allclose(computed, base + 0.5), "a 1-tuple patch at strength 2 is no longer a 'diff' added x2",
            "weights.py (add_deltas)")
    comfy.model_management.load_models_gpu([patched])  # the module now holds merged weights on this release
    again = patched.get_key_patches("diffusion_model.")[key][0][0]
    require(torch.equal(again.float(), base), "get_key_patches no longer gives the unpatched base weight of a "
            "loaded MODEL", "weights.py (patched_weights)")
    comfy.model_management.load_models_gpu([model])


# -- attention -------------------------------------------------------------------------------------
def test_attention_contract(tiny):
    """The patch call sites: attn1_patch (n, context, value, extra_options) -> 3 values, attn1 replace
    (q, k, v, extra_options) -> out, attn1_output_patch (n, extra_options) -> n, and the keys of
    extra_options the pack reads; the APPLY_MODEL and OUTER_SAMPLE wrappers and their executors."""
    import comfy.model_patcher
    import comfy.patcher_extension
    from comfy.ldm.modules import attention as comfy_attention

    import nodes

    require(accepts(comfy_attention.optimized_attention, "attn_precision", "transformer_options"),
            "optimized_attention(q, k, v, heads, attn_precision=, transformer_options=) changed",
            "attention.py (RRAAttention)")
    require(hasattr(comfy.model_patcher, "create_model_options_clone"),
            "comfy.model_patcher.create_model_options_clone is gone", "attention.py (outer_sample)")
    wrappers = comfy.patcher_extension.WrappersMP
    require(hasattr(wrappers, "APPLY_MODEL") and hasattr(wrappers, "OUTER_SAMPLE"),
            "WrappersMP.APPLY_MODEL / OUTER_SAMPLE are gone", "attention.py")

    model, clip, _ = tiny
    require(hasattr(model.model, "current_weight_patches_uuid"),
            "a ModelPatcher's model no longer has current_weight_patches_uuid", "attention.py (ReferenceFeatureCache)")
    seen = {"patch": [], "replace": [], "output": [], "apply": [], "outer": []}

    def attn1_patch(n, context, value, extra_options):
        seen["patch"].append(dict(extra_options))
        return n, context, value

    def attn1_replace(q, k, v, extra_options):
        seen["replace"].append(dict(extra_options))
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])

    def attn1_output(n, extra_options):
        seen["output"].append(n.shape)
        return n

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        seen["apply"].append((executor.class_obj, x.shape, c_crossattn.shape, dict(transformer_options)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    def outer(executor, *args, **kwargs):
        seen["outer"].append(executor.class_obj)
        return executor(*args, **kwargs)

    patched = model.clone()
    patched.set_model_attn1_patch(attn1_patch)
    patched.set_model_attn1_output_patch(attn1_output)
    patched.set_model_attn1_replace(attn1_replace, "output", 3, 0)
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, "contract", apply_model)
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, "contract", outer)
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, "a dog")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        nodes.common_ksampler(patched, 0, 1, 2.0, "euler", "normal", cond, cond, latent)
    require(len(seen["outer"]) == 1 and hasattr(seen["outer"][0], "model_options"),
            "the OUTER_SAMPLE wrapper's executor.class_obj is no longer the guider (with model_options)",
            "attention.py (outer_sample)")
    base, x_shape, ctx_shape, options = seen["apply"][0]
    require(hasattr(base, "process_latent_in") and hasattr(base, "model_sampling") and hasattr(base, "get_dtype"),
            "the APPLY_MODEL executor's class_obj is no longer the BaseModel", "attention.py (apply_model)")
    ms = base.model_sampling
    require(hasattr(ms, "percent_to_sigma") and accepts(ms.noise_scaling, "sigma", "noise", "latent_image"),
            "model_sampling.percent_to_sigma / noise_scaling(sigma, noise, latent_image) changed",
            "attention.py (apply_model)")
    require(x_shape[0] == 2 and ctx_shape[0] == 2 and options.get("cond_or_uncond") is not None,
            "APPLY_MODEL no longer sees both CFG rows with transformer_options['cond_or_uncond']", "attention.py")
    for extra in seen["patch"] + seen["replace"]:
        missing = {"block", "block_index", "n_heads", "attn_precision", "cond_or_uncond"} - set(extra)
        require(not missing, f"attention patches' extra_options lack {sorted(missing)}", "attention.py, unet.py")
    require({tuple(e["block"]) + (e["block_index"],) for e in seen["replace"]} == {("output", 3, 0)},
            "attn1 replace patches are no longer looked up by (block, number, transformer index)",
            "attention.py (ReferenceAttention.patch)")
    require(len(seen["output"]) == len(seen["patch"]) > 0, "attn1_output_patch no longer runs for every attn1",
            "attention.py (ReferenceFuser)")


# -- sampling --------------------------------------------------------------------------------------
def test_sampling_contract(tiny):
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview
    from comfy.k_diffusion.sampling import default_noise_sampler

    require(accepts(comfy.sample.sample_custom, "model", "noise", "cfg", "sampler", "sigmas", "positive", "negative",
                    "latent_image", "noise_mask", "callback", "disable_pbar", "seed"),
            "comfy.sample.sample_custom's parameters changed", "sampling.py (sample, evaluate_once)")
    for fn, names in ((comfy.sample.prepare_noise, ("latent_image", "seed")),
                      (comfy.sample.fix_empty_latent_channels, ("model", "latent_image")),
                      (latent_preview.prepare_callback, ("model", "steps")),
                      (default_noise_sampler, ("x", "seed")),
                      (comfy.samplers.KSAMPLER.__init__, ("sampler_function", "extra_options"))):
        require(accepts(fn, *names), f"{fn.__qualname__}({', '.join(names)}) changed", "sampling.py")
    require(hasattr(comfy.utils, "PROGRESS_BAR_ENABLED"), "comfy.utils.PROGRESS_BAR_ENABLED is gone", "sampling.py")

    model = tiny[0]
    calls = []

    def sampler_function(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
        calls.append(x.shape)
        return model_fn(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)

    import nodes

    rows = []

    def count_rows(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(__import__("comfy.patcher_extension").patcher_extension.WrappersMP.APPLY_MODEL,
                                 "contract", count_rows)
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(tiny[1], "a dog")[0]
        latent = torch.zeros(1, 4, 8, 8)
        comfy.sample.sample_custom(counted, torch.randn(1, 4, 8, 8), 1.0, comfy.samplers.KSAMPLER(sampler_function),
                                   torch.tensor([1.0, 0.0]), cond, cond, latent, disable_pbar=True, seed=0)
    require(calls == [(1, 4, 8, 8)], "a KSAMPLER function is no longer called once with the noised latent",
            "sampling.py (evaluate_once)")
    require(rows == [1], f"CFG 1 no longer evaluates the conditional rows only (rows per call: {rows})",
            "sampling.py (evaluate_once)")


# -- training --------------------------------------------------------------------------------------
def test_training_contract(tiny):
    import comfy.ops
    from comfy.clip_model import CLIPLayer
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

    for cls in (comfy.ops.disable_weight_init.Linear, comfy.ops.disable_weight_init.Conv2d):
        for name in ("comfy_cast_weights", "weight_function", "bias_function"):
            require(hasattr(cls, name), f"{cls.__qualname__}.{name} is gone", "training.py (_structure)")
    layer = comfy.ops.disable_weight_init.Linear(3, 2)
    layer.weight = torch.nn.Parameter(torch.ones(2, 3))
    layer.bias = torch.nn.Parameter(torch.zeros(2))
    layer.comfy_cast_weights, layer.weight_function, layer.bias_function = False, [], []
    require(torch.equal(layer(torch.ones(1, 3)), torch.full((1, 2), 3.0)),
            "a ComfyUI Linear with casting off no longer runs as torch.nn.Linear", "training.py (_structure)")
    require(parameters(CLIPLayer.forward) == ["self", "x", "mask", "optimized_attention"],
            "CLIPLayer.forward(x, mask, optimized_attention) changed", "training.py (_out_of_place_clip_layer)")
    require(accepts(UNetModel.forward, "x", "timesteps", "context", "transformer_options"),
            "UNetModel.forward(x, timesteps, context, transformer_options) changed", "training.py (TrainingBackend._unet)")
    require(SpatialTransformer and ResBlock, "SpatialTransformer / ResBlock are gone", "training.py (checkpointing)")
    _, clip, _ = tiny
    text_model = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
    require(hasattr(text_model, "set_clip_options") and hasattr(clip, "layer_idx") and hasattr(clip, "patcher"),
            "SDClipModel.set_clip_options / CLIP.layer_idx / CLIP.patcher changed", "training.py (_text_encoder)")
    require(isinstance(text_model.transformer.text_model.encoder.layers[0], CLIPLayer),
            "the text model's layers are no longer at transformer.text_model.encoder.layers", "training.py")
    with torch.inference_mode():
        tokens = getattr(clip.tokenizer, clip.tokenizer.clip).tokenize_with_weights("a dog")
        row = [[t for t, *_ in r] for r in tokens]
        row[0][2] = torch.zeros(768)
        out = text_model(row)
    require(isinstance(out, tuple) and tuple(out[0].shape) == (1, 77, 768),
            "SDClipModel(rows of ids and embedding tensors) no longer returns (z (B, 77, D), ...)",
            "training.py (TrainingBackend.instance_context)")


# -- guiders ---------------------------------------------------------------------------------------
def test_guiders_contract(tiny):
    """The DCI guider: a CFGGuider subclass whose predict_noise sends [positive, negative, auxiliary] through
    calc_cond_batch in one UNet call with cond_or_uncond = each chunk's index in that list; its options reach
    predict_noise; cfg_function, model_sampling.timestep and KSAMPLER's first noise as guiders.py uses them;
    attn2 replaces looked up by (block, number, index), then (block, number)."""
    import comfy.patcher_extension
    import comfy.samplers
    from comfy.ldm.modules import attention as comfy_attention

    import nodes

    cfg_guider = comfy.samplers.CFGGuider
    for name in ("inner_set_conds", "set_cfg", "sample", "predict_noise"):
        require(hasattr(cfg_guider, name), f"CFGGuider.{name} is gone", "guiders.py (DCIGuider)")
    require(accepts(cfg_guider.predict_noise, "x", "timestep", "model_options", "seed"),
            "CFGGuider.predict_noise(x, timestep, model_options, seed) changed", "guiders.py (DCIGuider)")
    require(accepts(comfy.samplers.calc_cond_batch, "model", "conds", "x_in", "timestep", "model_options"),
            "calc_cond_batch(model, conds, x_in, timestep, model_options) changed", "guiders.py (predict_noise)")
    require(accepts(comfy.samplers.cfg_function, "model", "cond_pred", "uncond_pred", "cond_scale", "x", "timestep",
                    "model_options", "cond", "uncond"), "cfg_function's parameters changed", "guiders.py")

    model, clip, _ = tiny
    seen = {"chunks": [], "options": [], "replace": []}

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        seen["chunks"].append((list(transformer_options["cond_or_uncond"]), x.shape[0]))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    def replace(name):
        def attn2(q, k, v, extra_options):
            seen["replace"].append((name, tuple(extra_options["block"]), extra_options["block_index"]))
            return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return attn2

    class ThreeConds(cfg_guider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            seen["options"].append(model_options["transformer_options"].get("contract_run"))
            out = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["positive"], self.conds["negative"],
                                                                    self.conds["auxiliary"]], x, timestep,
                                                 model_options)
            seen["outputs"] = len(out)
            return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                               model_options=model_options, cond=self.conds["positive"],
                                               uncond=self.conds["negative"])

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "contract", apply_model)
    patched.set_model_attn2_replace(replace("three"), "output", 3, 0)
    patched.set_model_attn2_replace(replace("two"), "middle", 0)
    guider = ThreeConds(patched)
    guider.model_options["transformer_options"]["contract_run"] = "run"
    with torch.inference_mode():
        cond, uncond = (nodes.CLIPTextEncode().encode(clip, text)[0] for text in ("a dog", ""))
        guider.inner_set_conds({"positive": cond, "negative": uncond, "auxiliary": cond})
        guider.set_cfg(2.0)
        sampler = comfy.samplers.KSAMPLER(lambda model_fn, x, sigmas, extra_args=None, callback=None, disable=None:
                                          model_fn(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args))
        guider.sample(torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), sampler, torch.tensor([1.0, 0.0]),
                      disable_pbar=True, seed=0)
    require(seen["options"] == ["run"], "options set on CFGGuider.model_options before sample() no longer reach "
            "predict_noise's model_options['transformer_options']", "guiders.py (DCIGuider.sample)")
    require(seen.get("outputs") == 3 and len(seen["chunks"]) == 1 and sorted(seen["chunks"][0][0]) == [0, 1, 2]
            and seen["chunks"][0][1] == 3, f"calc_cond_batch no longer evaluates three whole-image conditions in "
            f"one call tagged with their list indices (calls: {seen['chunks']})", "guiders.py (_apply_model, "
            "IntegrationAttention)")
    require({(n, b) for n, b, _ in seen["replace"]} == {("three", ("output", 3)), ("two", ("middle", 0))},
            "attn2 replaces are no longer looked up by (block, number, index), then (block, number)",
            "guiders.py (dci_guider chains them)")

    ms = model.get_model_object("model_sampling")
    require(int(ms.timestep(ms.sigmas[700:701])) == 700, "model_sampling.timestep(sigma) no longer gives the "
            "DDPM timestep of a training sigma", "guiders.py (the DCI window)")
    guiders = __import__("comfy_env").pack_module("nodes.comfyui.guiders")
    noise = torch.randn(1, 4, 8, 8)
    wrap = type("Wrap", (), {"inner_model": model.model})()
    for sigma in (float(ms.sigma_max), float(ms.sigmas[500])):
        max_denoise = comfy.samplers.KSAMPLER(None).max_denoise(wrap, torch.tensor([sigma, 0.0]))
        expected = ms.noise_scaling(torch.tensor([sigma]), noise, torch.zeros_like(noise), max_denoise)
        require(torch.allclose(guiders.noise_scaling(sigma, noise, float(ms.sigma_max)), expected),
                "KSAMPLER's first noise (noise_scaling with max_denoise) changed", "guiders.py (noise_scaling)")


def test_tokens_real_tokens_contract(tiny):
    """tokens.real_tokens: CLIP.tokenize(text)[clip_name] is a list of 77-token rows starting with the start
    token and ending at the tokenizer's end_token."""
    _, clip, _ = tiny
    inner = getattr(clip.tokenizer, clip.tokenizer.clip)
    rows = clip.tokenize("a photo of a dog")[clip.tokenizer.clip_name]
    ids = [t for t, *_ in rows[0]]
    require(len(rows) == 1 and len(ids) == 77 and ids[0] == inner.start_token and ids[6] == inner.end_token,
            f"CLIP.tokenize no longer gives [start, 5 tokens, end, padding] for 'a photo of a dog' (got {ids[:8]})",
            "tokens.py (real_tokens)")


def test_every_boundary_module_has_a_contract_test():
    from comfy_env import REPO

    modules = {p.stem for p in (REPO / "nodes" / "comfyui").glob("*.py") if p.stem != "__init__"}
    tests = {name[len("test_"):-len("_contract")] for name in globals()
             if name.startswith("test_") and name.endswith("_contract")}
    assert modules <= tests, f"boundary modules without a contract test: {sorted(modules - tests)}"

"""The ComfyUI boundary: every use of ComfyUI's internals, one module per surface it touches.

    node_api     the V3 node API (comfy_api) and combo validation
    management   devices, model management (load, offload, free), progress and interruption
    folders      model folders, the input / output / temp directories
    latents      VAE encoding and the UNet's latent space
    tokens       prompt tokens and embeddings: concept tokens in a CLIP, vocabulary rows
    unet         the one walker over the UNet's attention layers
    weights      weight patches on a MODEL and the weights a MODEL computes with
    attention    attention patches and the reference pass of Residual Reference Attention
    sampling     the DDIM sampler and single model evaluations through ComfyUI's sampler
    training     the training backend: private trainable copies of the UNet and the text encoder
    guiders      the DCI guider: a CFGGuider with an auxiliary branch, its attn2 replace and wrapper

Node modules import from here and from eqdiff_core only. tests/comfy/test_contracts.py pins the
shape of each private interface used here, so a ComfyUI release that changes one fails a named test.
"""

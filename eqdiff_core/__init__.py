"""Equilibrated Diffusion (Ma, Fang, Qi; ACM MM 2024) as a plain PyTorch library.

No ComfyUI imports: every module here can be read beside the paper and tested on its own.
"""

"""DCI, "Divide, Conquer, then Integrate" (Jin et al., ECCV 2024, "Customized Generation Reimagined:
Fidelity and Editability Harmonized"): a training-free sampling method for any customized model.

In the early steps (the DCI window) two branches run in one UNet batch: the concept branch with the
prompt P ("a V* dog in Times Square") and an auxiliary branch with P_a, the same prompt with the concept
words replaced by an auxiliary noun ("a cat in Times Square"), on a latent of its own. In every
cross-attention layer DBIM (the Dual-Branch Integration Module) mixes the auxiliary branch's attention
output into the concept branch's where the auxiliary prompt's context dominates (Eq. 3-5). After the
window the auxiliary branch is dropped and plain CFG goes on.

The constants are those of the authors' code (jinjianRick/DCI_ICO @ 653b97b, ``src/model.py`` lines
171-249, ``ldm/models/diffusion/ddim.py`` lines 213-320), which the paper does not give:

- the cross-attention probabilities over the real prompt tokens (positions 1 .. L, without BOS, EOS and
  padding) are re-normalised with a softmax at temperature 10 (``TOKEN_SHARPNESS``);
- the spatial softmax of Eq. 4 is ``500 * softmax_pixels(10 * M)`` (``SPATIAL_SCALE``, ``SPATIAL_SHARPNESS``);
- the window is ``t / 1000 > 1 - fraction`` with t the DDPM timestep, fraction 0.3 in the code
  (``--agg_time``) and T_a = 0.15 T in the paper.

lambda: w_a = sigmoid(lambda * S_a - S_c) per head and pixel, so no finite lambda makes DCI an identity
(w_a > 0 mathematically; in float32 it underflows to 0 only where S_c - lambda S_a exceeds ~100).
lambda = 0 is not neutral: it gives w_a = sigmoid(-S_c), about 0.5 wherever S_c is small (the
background; the notes' numeric check), so about half of the auxiliary output is injected there. Only
lambda = -inf gives w_a = 0 exactly (``integration_weights`` accepts it); within the authors' range
-2 .. 2 the neutral setting is an empty window (fraction 0).

Shapes: BH = batch rows x heads, N = pixels of the layer, T = context tokens (77 for SD1), d = head width.
"""

from __future__ import annotations

import re

import torch

from .sampling import ddim_step

TOKEN_SHARPNESS = 10.0     # code: (10 * attn[:, :, 1:1 + L]).softmax(dim=-1)
SPATIAL_SHARPNESS = 10.0   # code: 500 * (10 * M).softmax(-1)
SPATIAL_SCALE = 500.0
TRAIN_TIMESTEPS = 1000
CODE_FRACTION = 0.3        # the code's --agg_time default
PAPER_FRACTION = 0.15      # the paper's T_a = 0.15 T
LAMBDA_RANGE = (-2.0, 2.0)  # "in practical applications lambda is typically set to -2 ~ 2"
AUXILIARY_NOUNS = ("cat", "dog", "person", "car", "chair")  # [DCI] 4.5: a preset list of common nouns


def in_window(timestep: float, fraction: float, train_timesteps: int = TRAIN_TIMESTEPS) -> bool:
    """Whether DCI acts at DDPM timestep ``timestep`` (code: ``step / 1000 > 1 - agg_time``; fraction 0:
    never)."""
    return timestep / train_timesteps > 1 - fraction


def branch_map(probs: torch.Tensor, length: int, columns: list[int], complement: bool = False) -> torch.Tensor:
    """Eq. 3 with the code's token re-softmax: (BH, N, T) post-softmax attention -> (BH, N).

    A = softmax(10 * probs[:, :, 1:1 + length]) over the real tokens; M = the sum of A over ``columns``
    (indices among the real tokens, 0 = the first word), or over every other real token (``complement``:
    the auxiliary branch's M_a, all of P_a but the auxiliary noun).
    """
    if length < 1 or length > probs.shape[-1] - 1:
        raise ValueError(f"prompt length {length} does not fit a context of {probs.shape[-1]} tokens")
    if any(not 0 <= c < length for c in columns):
        raise ValueError(f"token columns {columns} are outside the prompt's {length} real tokens")
    probs = probs.to(torch.promote_types(probs.dtype, torch.float32))  # at least float32 (fp16 maps underflow)
    tokens = (TOKEN_SHARPNESS * probs[:, :, 1:1 + length]).softmax(dim=-1)
    picked = tokens[:, :, list(columns)].sum(dim=-1)
    return tokens.sum(dim=-1) - picked if complement else picked


def integration_weights(probs_concept: torch.Tensor, probs_aux: torch.Tensor, concept_columns: list[int],
                        concept_length: int, aux_columns: list[int], aux_length: int,
                        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DBIM's weights (Eq. 3-4, the code's constants): (w_c, w_a), each (BH, N), summing to 1 per pixel.

    probs_concept, probs_aux: (BH, N, T) attention probabilities of the concept and auxiliary rows (the same
    head order). M_c sums the concept tokens of P, M_a every token of P_a but the auxiliary noun (Eq. 3);
    S = 500 softmax_pixels(10 M) (the spatial softmax S_s); (w_c, w_a) = softmax over the two branches of
    (S_c, lambda S_a) (the branch softmax S_c of Eq. 4).
    """
    if probs_concept.ndim != 3 or probs_aux.ndim != 3 or probs_concept.shape[:2] != probs_aux.shape[:2]:
        raise ValueError(f"attention probabilities must be (BH, N, T) for both branches, got "
                         f"{tuple(probs_concept.shape)} and {tuple(probs_aux.shape)}")
    m_c = branch_map(probs_concept, concept_length, concept_columns)
    m_a = branch_map(probs_aux, aux_length, aux_columns, complement=True)
    s_c = SPATIAL_SCALE * (SPATIAL_SHARPNESS * m_c).softmax(dim=-1)
    s_a = SPATIAL_SCALE * (SPATIAL_SHARPNESS * m_a).softmax(dim=-1)
    w = torch.stack([s_c, lam * s_a]).softmax(dim=0)
    return w[0], w[1]


def integrate(out_concept: torch.Tensor, out_aux: torch.Tensor, w_c: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    """Eq. 5: the concept rows' attention output per head, w_c F_c + w_a F_a; (BH, N, d) with (BH, N) weights."""
    return w_c[..., None].to(out_concept.dtype) * out_concept + w_a[..., None].to(out_aux.dtype) * out_aux


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in noise space: e = e_u + s (e_c - e_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def auxiliary_denoised(x_aux: torch.Tensor, denoised_aux: torch.Tensor, eps_uncond: torch.Tensor, sigma: float,
                       scale: float) -> torch.Tensor:
    """The auxiliary branch's guided prediction of x_0, for samplers that work with x_0 (as ComfyUI's):
    x_a - sigma e_a with e_a = e_u + s (eps_aux - e_u) and eps_aux = (x_a - x0_aux) / sigma (code
    ``p_sample_ddim``: ``e_t_ldm = e_t_uncond + scale * (e_t_ldm - e_t_uncond)``). (B, C, H, W)."""
    return x_aux - sigma * guided_noise(eps_uncond, (x_aux - denoised_aux) / sigma, scale)


def dci_step(x_concept: torch.Tensor, x_aux: torch.Tensor, eps_uncond: torch.Tensor, eps_concept: torch.Tensor,
             eps_aux: torch.Tensor, sigma: float, sigma_next: float, scale: float,
             eps_uncond_aux: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DCI window step (code ``p_sample_ddim``, eta 0) in ComfyUI's sigma space (x = x_0 + sigma eps):
    both latents take their own DDIM step, each with its guided noise.

    Shared unconditional (the code's default): e_a = e_u + s (eps_aux - e_u), with e_u the unconditional
    prediction of the concept latent; separate: e_u_a of the auxiliary latent. All tensors (B, C, H, W).
    """
    e_c = guided_noise(eps_uncond, eps_concept, scale)
    e_a = guided_noise(eps_uncond if eps_uncond_aux is None else eps_uncond_aux, eps_aux, scale)
    return (ddim_step(x_concept, x_concept - sigma * e_c, sigma, sigma_next),
            ddim_step(x_aux, x_aux - sigma * e_a, sigma, sigma_next))


def _same_token(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def span_positions(row: list, span: list) -> list[int]:
    """Start indices of every occurrence of ``span`` in ``row`` (token lists of int ids or embedding
    tensors), not overlapping, left to right."""
    found, i = [], 0
    while span and i + len(span) <= len(row):
        if all(_same_token(row[i + j], span[j]) for j in range(len(span))):
            found.append(i)
            i += len(span)
        else:
            i += 1
    return found


# -- prompts -----------------------------------------------------------------------------------------
# a concept token as prompts write it: EqDiff's <name> (Apply Concept) or a textual inversion's embedding:name
CONCEPT_TOKEN = r"(?:<[^\s<>()]+>|embedding:[^\s,()]+)"


def _phrase_pattern(words: list[str]) -> re.Pattern:
    return re.compile(r"(?<![\w<>:])" + r"\s+".join(map(re.escape, words)) + r"(?![\w<>])", re.IGNORECASE)


def concept_phrase(prompt: str, concept_words: str = "", class_word: str = "") -> str:
    """The words of ``prompt`` that name the subject, 𝒯(P) of Eq. 3: ``concept_words`` when given (e.g. "sks
    dog" for a LoRA), else the first run of concept tokens (``<name>`` or ``embedding:name``) with the
    class word after it (``class_word``, or, when empty, the word right after the tokens)."""
    if concept_words.strip():
        words = concept_words.split()
        if not _phrase_pattern(words).search(prompt):
            raise ValueError(f"concept_words: '{' '.join(words)}' is not in the prompt '{prompt}'; write the "
                             f"subject's words as they appear in it, or leave it empty to find the concept token")
        return " ".join(words)
    found = re.search(rf"(?<![\w<>:]){CONCEPT_TOKEN}(?:\s+{CONCEPT_TOKEN})*(?:\s+([A-Za-z][\w-]*))?", prompt)
    if found is None:
        raise ValueError(f"prompt: no concept token (<name> as Apply Concept writes it, or embedding:name) in "
                         f"'{prompt}'; write one, or name the subject's words in concept_words (e.g. 'sks dog')")
    phrase, after = found.group(0), found.group(1)
    if after is not None and class_word.strip() and after.lower() != class_word.strip().lower():
        phrase = phrase[:found.start(1) - found.start(0)]
    return " ".join(phrase.split())


def auxiliary_prompt(prompt: str, phrase: str, aux_noun: str) -> str:
    """P_a: ``prompt`` with every occurrence of the concept phrase replaced by the auxiliary noun."""
    if not aux_noun.strip() or len(aux_noun.split()) != 1:
        raise ValueError(f"aux_noun: '{aux_noun}' must be one common noun, e.g. 'cat'")
    return _phrase_pattern(phrase.split()).sub(aux_noun.strip(), prompt)


def default_aux_noun(phrase: str) -> str:
    """The first preset noun that is not one of the concept's words."""
    words = {w.lower() for w in phrase.split()}
    return next(n for n in AUXILIARY_NOUNS if n not in words)


def token_columns(prompt_row: list, phrase_row: list, aux_row: list, noun_row: list) -> tuple[list[int], list[int]]:
    """The columns (among the real tokens) of the concept phrase in P and of the auxiliary noun in P_a,
    from the token rows (without BOS / EOS / padding) of P, of the phrase alone, of P_a and of the noun
    alone. The noun's columns follow from the phrase's (P_a is P with each phrase replaced), and are
    checked against P_a's tokens."""
    starts = span_positions(prompt_row, phrase_row)
    if not starts:
        raise ValueError("the concept phrase's tokens are not in the prompt's tokens (is the prompt longer than "
                         "75 tokens?)")
    concept = [s + j for s in starts for j in range(len(phrase_row))]
    shift = len(noun_row) - len(phrase_row)
    aux = [s + k * shift + j for k, s in enumerate(starts) for j in range(len(noun_row))]
    if any(c >= len(aux_row) or not _same_token(aux_row[c], noun_row[c - s - k * shift])
           for k, s in enumerate(starts) for c in aux[k * len(noun_row):(k + 1) * len(noun_row)]):
        raise ValueError("the auxiliary prompt's tokens do not line up with the prompt's; put spaces around "
                         "the concept words")
    return concept, aux

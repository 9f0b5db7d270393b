"""FFT Split: low- and high-frequency bands of an image batch (FDTE's training images)."""

from __future__ import annotations

from ..eqdiff_core import frequency
from .comfyui.management import bchw_to_image, image_to_bchw
from .comfyui.node_api import io, require_choices

AUTHORS_LOW_CUTOFF = frequency.bins_to_cutoff(50, 512)
AUTHORS_HIGH_CUTOFF = frequency.bins_to_cutoff(5, 512)
_CUTOFF_TIP = (
    "Fraction of the Nyquist radius (1.0 = the highest frequency along an axis), so it scales with "
    f"the image size. The authors' code uses {AUTHORS_LOW_CUTOFF} (50 FFT bins on 512 px) for the "
    f"low band and {AUTHORS_HIGH_CUTOFF} (5 bins) for the high band."
)


class EqDiffFFTSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffFFTSplit",
            display_name="FFT Split",
            category="EqDiff",
            description=(
                "Splits images into low- and high-frequency bands with an FFT filter (EqDiff Eq. 3-4). "
                "In 'signed' output with equal cutoffs, low + high reproduces the input exactly. "
                "The authors' training images: shape box, profile ideal, grayscale on, output "
                f"magnitude, low cutoff {AUTHORS_LOW_CUTOFF}, high cutoff {AUTHORS_HIGH_CUTOFF}."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Images to split; any size, any batch."),
                io.Float.Input(
                    "low_cutoff", default=AUTHORS_LOW_CUTOFF, min=0.001, max=1.5, step=0.001, round=False,
                    tooltip="The low band keeps frequencies below this radius. " + _CUTOFF_TIP,
                ),
                io.Float.Input(
                    "high_cutoff", default=AUTHORS_LOW_CUTOFF, min=0.001, max=1.5, step=0.001, round=False,
                    tooltip="The high band removes frequencies below this radius; set it equal to "
                    "low_cutoff for complementary bands. " + _CUTOFF_TIP,
                ),
                io.Combo.Input(
                    "shape", options=list(frequency.SHAPES), default="circle",
                    tooltip="circle: the paper's radial filter (Eq. 4). square: a symmetric box around the "
                    "zero frequency (real bands). box: the authors' code exactly (bins -c ... c-1 kept, one "
                    "more on the negative side; its inverse is complex, the magnitude is what they train on; "
                    "ideal profile only).",
                ),
                io.Combo.Input(
                    "profile", options=list(frequency.PROFILES), default="ideal",
                    tooltip="ideal: a hard cut (the paper and the code). gaussian / butterworth: soft "
                    "roll-offs with less ringing.",
                ),
                io.Int.Input(
                    "butterworth_order", default=2, min=1, max=16,
                    tooltip="Steepness of the butterworth profile; ignored by the others.",
                ),
                io.Boolean.Input(
                    "grayscale", default=False,
                    tooltip="Average the colour channels before filtering, as the authors' code does. "
                    "Off: each channel is filtered on its own.",
                ),
                io.Combo.Input(
                    "output", options=list(frequency.OUTPUTS), default="signed",
                    tooltip="signed: real band images (high is centred on 0, low + high = input). "
                    "magnitude: |band| of the image taken in [-1, 1], mapped back so that VAE Encode "
                    "sees exactly what the authors' code trains on.",
                ),
            ],
            outputs=[
                io.Image.Output("low", display_name="low", tooltip="Low-frequency band."),
                io.Image.Output(
                    "high", display_name="high",
                    tooltip="High-frequency band (signed output: values around 0, not for viewing).",
                ),
                io.Image.Output(
                    "high_preview", display_name="high preview",
                    tooltip="The high band contrast-stretched to [0, 1] for viewing.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, image, low_cutoff, high_cutoff, shape, profile, butterworth_order, grayscale, output
    ) -> io.NodeOutput:
        require_choices(cls, shape=shape, profile=profile, output=output)
        x = image_to_bchw(image)
        magnitude = output == "magnitude"
        if magnitude:
            x = x * 2.0 - 1.0  # the VAE's pixel range, where the authors take |IFFT|
        low, high = frequency.frequency_split(
            x, low_cutoff, high_cutoff, shape=shape, profile=profile, order=butterworth_order,
            grayscale=grayscale, output=output,
        )
        preview = frequency.band_preview(high, signed=not magnitude)
        if magnitude:
            low, high = (low + 1.0) / 2.0, (high + 1.0) / 2.0
        return io.NodeOutput(bchw_to_image(low), bchw_to_image(high), bchw_to_image(preview))


NODES = [EqDiffFFTSplit]

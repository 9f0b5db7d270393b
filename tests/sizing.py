"""What a CPU runs in seconds: every workflow's inputs that set its size, by node type (the API tests set
them as inputs, the browser test as widget values)."""

CPU_SIZED = {
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EqDiffEquilibratedSampler": {"steps": 2},
    "BasicScheduler": {"steps": 2},
    "EqDiffLoadSubject": {"size": 64},
    "EqDiffTrainerOptions": {"resolution": 64},
    "EqDiffClassImages": {"count": 2, "size": 64, "steps": 2, "batch_size": 2},
    "EqDiffFDTETrainer": {"steps": 1, "batch_size": 1, "precision": "fp32"},
    "EqDiffPromptList": {"count": 1},
    "EqDiffGroundingLoader": {"grounding_dino": "eqdiff_tiny_swint.safetensors", "sam": "eqdiff_tiny_vit.safetensors"},
    # the built-in tiny detector has random weights: every box passes
    "EqDiffGroundedMask": {"box_threshold": 0.0, "text_threshold": 0.0, "detect_size": 256},
    "EqDiffSaveConcept": {"overwrite": True},
}

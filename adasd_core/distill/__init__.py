"""Building a draft for a pretrained target by distillation on the target's own chat and code answers
(`adasd build-draft`). prompts -> generate (the target writes, its top-k distributions are kept)
-> head (the draft's vocabulary subset) -> train (a few of the target's layers, distilled) -> export."""

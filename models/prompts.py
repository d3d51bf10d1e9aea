"""Zero-shot prompt sets in the reference's style: class phrases placed into sentence templates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTask:
    """One zero-shot task: class phrases (negative first for binary tasks) and sentence templates."""

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    labels: tuple[str, ...]

    def prompts(self) -> list[list[str]]:
        """prompts[t][c]: template t filled with class phrase c."""
        return [[template.format(phrase) for phrase in self.classes] for template in self.templates]

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2


FINDING_TEMPLATES = ("{}", "there is {} in the breast", "findings: {}", "the breast shows {}")

PROMPT_TASKS: dict[str, PromptTask] = {
    task.name: task
    for task in (
        PromptTask("mass", ("no mass", "a mass"), FINDING_TEMPLATES, ("absent", "present")),
        PromptTask("calcification", ("no suspicious calcification", "suspicious calcifications"),
                   FINDING_TEMPLATES, ("absent", "present")),
        PromptTask("malignancy", ("no malignancy", "malignancy"),
                   ("{}", "findings suspicious for {}", "there is {} in the breast"), ("benign", "malignant")),
        PromptTask("density",
                   ("almost entirely fatty", "scattered areas of fibroglandular density",
                    "heterogeneously dense", "extremely dense"),
                   ("the breast is {}", "breast density: {}", "{}"), ("A", "B", "C", "D")),
        PromptTask("birads",
                   ("birads 1 negative", "birads 2 benign", "birads 3 probably benign", "birads 4 suspicious",
                    "birads 5 highly suggestive of malignancy"),
                   ("{}", "assessment: {}"), ("1", "2", "3", "4", "5")),
    )
}

# The reference's own zero-shot prompts (its ``configs/zs_clip.yaml``): one phrase per class, no template. With
# ``ZeroShotClassifier(..., prompt_set="reference")`` they are scored as its evaluator scores them (softmax of the
# cosine similarities, no logit scale), to reproduce its published zero-shot figures with its checkpoints.
REFERENCE_PROMPT_TASKS: dict[str, PromptTask] = {
    task.name: task
    for task in (
        PromptTask("mass", ("no mass", "mass"), ("{}",), ("absent", "present")),
        PromptTask("calcification", ("no suspicious calcification", "suspicious calcification"), ("{}",),
                   ("absent", "present")),
        PromptTask("malignancy", ("no malignancy", "malignancy"), ("{}",), ("benign", "malignant")),
    )
}
PROMPT_SETS = {"node": PROMPT_TASKS, "reference": REFERENCE_PROMPT_TASKS}

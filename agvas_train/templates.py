"""Instruction and answer templates for the four inference modes (paper §3.3, appendix A.2).

The first template of each list is the canonical one used at inference; training samples
from the whole library with the target word drawn from :data:`TARGET_WORDS`.
"""

from __future__ import annotations

MODES = ("direct", "describe", "describe_plus", "explain")
MODE_ALIASES = {
    "direct": "direct", "direct-segmentation": "direct",
    "describe": "describe", "describe-then-segment": "describe",
    "describe_plus": "describe_plus", "describe-then-segment-plus": "describe_plus", "describe-plus": "describe_plus",
    "explain": "explain", "segment-then-explain": "explain",
}
ANCHOR_PHRASE = "[NOR][ANO][SEG]"

TARGET_WORDS = ("anomalies", "defects", "flaws", "abnormal regions", "irregularities", "damaged areas")

DIRECT_INSTRUCTIONS = (
    "Please segment the {target} in this image.",
    "Segment the {target} in this image.",
    "Can you segment the {target} in this image?",
    "Please output the segmentation mask of the {target} in this image.",
    "Where are the {target} in this image? Please output the segmentation mask.",
    "Find the {target} in this picture and segment them.",
)
# One direct answer on purpose: a model trained on several answers picks any of them, and the
# runtime's forced-answer fast path (DESIGN §4) only pays off when the answer is predictable.
# The instructions vary; the describe / explain answers carry the textual variety.
DIRECT_ANSWERS = ("Sure, it is " + ANCHOR_PHRASE + ".",)

DESCRIBE_INSTRUCTIONS = (
    "What {target} are present in this image? Please describe the {target} and then output the segmentation map.",
    "What are the {target} in this image? Please describe them and then output the segmentation map.",
    "Describe the {target} in this image first, then segment them.",
)
# The describe answer is the Summary field, which carries the anchors.

DESCRIBE_PLUS_INSTRUCTIONS = (
    "{normal} What {target} are present in this image? Please describe the {target} and then output the segmentation map.",
    "{normal} Describe the {target} in this image first, then segment them.",
)

EXPLAIN_INSTRUCTIONS = (
    "Please segment the {target} in this image and then explain your result.",
    "Segment the {target} in this image first, then explain why they are {target}.",
    "Output the segmentation mask of the {target} in this image and explain it.",
)
EXPLAIN_ANSWERS = (
    "Sure, it is " + ANCHOR_PHRASE + ". {explanation}",
    "The segmentation result is " + ANCHOR_PHRASE + ". {explanation}",
)

CANONICAL_DIRECT_ANSWER = DIRECT_ANSWERS[0]

# ---- Anomaly-Instruct fields (paper §3.3): filled by agvas_train/data/instruct.py -------------
# Slots: {cat} category, {defect} defect name, {count} "one"/"two"/..., {size} size word,
# {shape} shape word, {colour} appearance word, {where} location phrase ("the top left"),
# {percent} integer share of the image covered, {be} "is"/"are", {plural} "" or "s".
EXPECTATION = "A normal {cat} should have a consistent appearance without any {defect}."
OBSERVATION = ("There {be} {count} {size} {shape} {colour} {defect}{plural} located at {where} of the {cat}, "
               "covering about {percent} percent of the image.")
DIAGNOSIS = "The {defect} breaks the regular texture and structural consistency of the {cat}, so it is an anomaly."
SUMMARY = "The anomaly is a {size} {colour} {defect} located at {where} of the {cat}, as indicated by " + ANCHOR_PHRASE + "."
EXPLANATION = ("The {cat} is expected to look consistent, but a {size} {colour} {defect} appears at {where}; "
               "it deviates from the normal pattern and is therefore marked as anomalous.")
NORMAL_OBSERVATION = "The {cat} shows no visible deviation from its normal appearance."
NORMAL_DIAGNOSIS = "Nothing breaks the regular texture and structural consistency of the {cat}, so it is normal."
NORMAL_SUMMARY = "The {cat} looks normal. No anomalies are found, as indicated by " + ANCHOR_PHRASE + "."
NORMAL_EXPLANATION = "The {cat} appears normal and no defect is visible."
# General segmentation (LISA-style sources): the target phrase replaces the anomaly word.
GENERAL_INSTRUCTIONS = (
    "Please segment the {target} in this image.",
    "Can you segment the {target} in this image?",
    "What is {target} in this image? Please output the segmentation mask.",
)


def canonical_instruction(mode: str, normal_sentence: str | None = None, target: str = "anomalies") -> str:
    """The instruction used at inference for ``mode`` (canonical template, target 'anomalies')."""
    mode = normalize_mode(mode)
    if mode == "direct":
        return DIRECT_INSTRUCTIONS[0].format(target=target)
    if mode == "describe":
        return DESCRIBE_INSTRUCTIONS[0].format(target=target)
    if mode == "describe_plus":
        if not normal_sentence:
            raise ValueError("mode describe-then-segment-plus needs a sentence on the object's normal appearance")
        return DESCRIBE_PLUS_INSTRUCTIONS[0].format(normal=normal_sentence.strip(), target=target)
    return EXPLAIN_INSTRUCTIONS[0].format(target=target)


def normalize_mode(mode: str) -> str:
    try:
        return MODE_ALIASES[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODE_ALIASES)}") from None

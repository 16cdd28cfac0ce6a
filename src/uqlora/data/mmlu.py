"""The 57 MMLU subjects and the four subject groups of the MMLU paper.

The groups follow `categories.py` of github.com/hendrycks/test: each subject has a subcategory
(math, physics, health, law, ...) and each subcategory one of four categories. Test-split sizes:
STEM 3,018, humanities 4,705, social sciences 3,077, other 3,242 (14,042 in all).
"""

from __future__ import annotations

GROUPS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics",
        "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics",
        "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ),
}

# subject -> group, in alphabetical subject order (the order questions of several subjects come in)
SUBJECT_GROUP: dict[str, str] = dict(
    sorted((subject, group) for group, subjects in GROUPS.items() for subject in subjects)
)
SUBJECTS: tuple[str, ...] = tuple(SUBJECT_GROUP)

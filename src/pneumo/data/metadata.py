"""The image-level metadata a model may read beside the pixels: view position, sex and age, as
the fixed-length vector the data layer puts in each batch and predict and serve build per file."""

from __future__ import annotations

FIELDS = ("ViewPosition", "PatientSex", "PatientAge")  # the DICOM attributes it reads, in order
N_METADATA = 3  # [view is AP, sex is M, age / 100]


def metadata_vector(view_position, sex, age) -> list[float]:
    """[view is AP, sex is M, age / 100]; unknown values are neutral (0.5)."""
    try:
        age = float(age)
    except (TypeError, ValueError):
        age = float("nan")
    age = age / 100 if age == age and 0 <= age <= 120 else 0.5
    view = str(view_position).strip().upper()
    sex = str(sex).strip().upper()
    return [1.0 if view == "AP" else 0.0 if view == "PA" else 0.5,
            1.0 if sex == "M" else 0.0 if sex == "F" else 0.5, age]


def metadata_of(attributes: dict) -> list[float]:
    """The vector from a mapping of DICOM attribute names (missing ones are unknown)."""
    return metadata_vector(*(attributes.get(name) for name in FIELDS))

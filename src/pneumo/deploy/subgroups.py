"""How a model does for whom: the official mAP overall and by PatientSex, age band and ViewPosition.

One function, `subgroup_scores`, used by the model card (validation split) and by
`pneumo predict --labels` (score.json), so both report the same breakdown.
"""

from __future__ import annotations

import math

from pneumo.metrics import mean_average_precision

# Age bands in years: (label, lowest age, first age of the next band)
AGE_BANDS = (("<20", 0.0, 20.0), ("20-39", 20.0, 40.0), ("40-59", 40.0, 60.0), (">=60", 60.0, math.inf))
VIEWS = ("PA", "AP")
SEXES = ("F", "M")
# Below this many images a subgroup's mAP moves by more than its differences from other
# groups (one image is 1/N of the score): it is reported with its count and no score.
MIN_IMAGES = 30
# The same for the images with an opacity: the mAP of a group rests on its positive images' boxes,
# and two of them gave a score (PA: 0.917) that says nothing; below this, count only.
MIN_POSITIVES = 30
UNKNOWN = "unknown"


def age_band(age) -> str:
    """The band of an age in years; 'unknown' for a missing or unreadable age."""
    try:
        age = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(age) or age < 0:
        return UNKNOWN
    return next(label for label, low, high in AGE_BANDS if low <= age < high)


def _category(value, known: tuple[str, ...]) -> str:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip().upper()
    if not text:
        return UNKNOWN
    return text if text in known else "other"


def subgroups_of(attributes: dict) -> dict[str, str]:
    """{attribute: group} of one image from its DICOM metadata (PatientSex, PatientAge, ViewPosition)."""
    return {"PatientSex": _category(attributes.get("PatientSex"), SEXES),
            "age": age_band(attributes.get("PatientAge")),
            "ViewPosition": _category(attributes.get("ViewPosition"), VIEWS)}


def _group_score(ground_truth: dict, predictions: dict, ids, min_images: int, min_positives: int = 0) -> dict:
    truth = {pid: ground_truth[pid] for pid in ids}
    row = {"n_images": len(truth), "n_positive": sum(1 for boxes in truth.values() if len(boxes))}
    if len(truth) < min_images or row["n_positive"] < min_positives:
        row["map"] = None  # too few to say anything: the count alone, and why
        row["reason"] = (f"fewer than {min_images} images" if len(truth) < min_images
                         else f"fewer than {min_positives} images with opacity")
        return row
    score = mean_average_precision(truth, {pid: predictions[pid] for pid in ids if pid in predictions})
    row["map"] = round(score.map, 4) if score.n_images else None
    row["n_scored"] = score.n_images
    return row


def subgroup_scores(ground_truth: dict, predictions: dict, attributes: dict, min_images: int = MIN_IMAGES,
                    min_positives: int = MIN_POSITIVES) -> dict:
    """The breakdown of the official mAP over the images of ground_truth.

    ground_truth {id: boxes}, predictions {id: (boxes, confidences)} (a missing id: no boxes),
    attributes {id: {"PatientSex", "PatientAge", "ViewPosition"}} (a missing id: unknown groups).
    Returns {"overall": row, "min_images": n, "min_positives": n, "by": {attribute: {group: row}}},
    each row with n_images, n_positive and map (None, with a reason, for a group of fewer than
    min_images images or fewer than min_positives images with opacity; the overall row is always scored).
    """
    ids = list(ground_truth)
    groups: dict[str, dict[str, list]] = {"PatientSex": {}, "age": {}, "ViewPosition": {}}
    for pid in ids:
        for attribute, group in subgroups_of(attributes.get(pid, {})).items():
            groups[attribute].setdefault(group, []).append(pid)
    order = {"PatientSex": (*SEXES, "other", UNKNOWN), "age": (*(b[0] for b in AGE_BANDS), UNKNOWN),
             "ViewPosition": (*VIEWS, "other", UNKNOWN)}
    by = {attribute: {group: _group_score(ground_truth, predictions, members[group], min_images, min_positives)
                      for group in order[attribute] if group in members}
          for attribute, members in groups.items()}
    return {"overall": _group_score(ground_truth, predictions, ids, 1), "min_images": min_images,
            "min_positives": min_positives, "by": by}


def breakdown_markdown(breakdown: dict) -> str:
    """The breakdown as a Markdown table (the model card's and anyone's who reads score.json)."""
    lines = ["| attribute | group | images | with opacity | mAP |", "|---|---|---|---|---|"]

    def row(attribute, group, r):
        score = "—" if r["map"] is None else f"{r['map']:.3f}"
        lines.append(f"| {attribute} | {group} | {r['n_images']} | {r['n_positive']} | {score} |")

    row("all", "all", breakdown["overall"])
    for attribute, groups in breakdown["by"].items():
        for group, r in groups.items():
            row(attribute, group, r)
    lines.append("")
    positives = breakdown.get("min_positives")  # absent from cards written before it existed
    lines.append(f"mAP is the official RSNA metric; a group of fewer than {breakdown['min_images']} images"
                 + (f" or fewer than {positives} with opacity" if positives else "")
                 + " shows its count and no score (—).")
    return "\n".join(lines)

"""SNOMED CT codes and display colours of the anatomical structures medssl segments.

Segmentation cards (and so DICOM SEG segment descriptions) name each class with a property
category, a property type and a recommended display colour. The codes are those of DICOM
CID 7150 (category "Anatomical Structure") and CID 7166 / the TotalSegmentator mapping
(types); the colours follow 3D Slicer's generic anatomy colour table where it has one.
"""

from __future__ import annotations

from medssl.models.card import Code, Label

__all__ = ["ANATOMICAL_STRUCTURE", "ORGANS", "TISSUE", "organ_label"]

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
#: Fallback type for a class medssl has no code for (the name still says what it is).
TISSUE = Code("85756007", "SCT", "Tissue")

#: Class name (as in a Decathlon ``dataset.json``) → (property type, RGB display colour).
#: Left and right adrenal glands share SCT 23451007; the class name carries the side.
ORGANS: dict[str, tuple[Code, tuple[int, int, int]]] = {
    "liver": (Code("10200004", "SCT", "Liver"), (221, 130, 101)),
    "spleen": (Code("78961009", "SCT", "Spleen"), (157, 108, 162)),
    "left_kidney": (Code("18639004", "SCT", "Left kidney"), (185, 102, 83)),
    "right_kidney": (Code("9846003", "SCT", "Right kidney"), (185, 102, 83)),
    "aorta": (Code("15825003", "SCT", "Aorta"), (224, 97, 76)),
    "inferior_vena_cava": (Code("64131007", "SCT", "Inferior vena cava"), (0, 151, 206)),
    "stomach": (Code("69695003", "SCT", "Stomach"), (216, 132, 105)),
    "gallbladder": (Code("28231008", "SCT", "Gallbladder"), (139, 150, 98)),
    "pancreas": (Code("15776009", "SCT", "Pancreas"), (249, 180, 111)),
    "left_adrenal_gland": (Code("23451007", "SCT", "Adrenal gland"), (244, 217, 154)),
    "right_adrenal_gland": (Code("23451007", "SCT", "Adrenal gland"), (244, 217, 154)),
}


def organ_label(value: int, name: str) -> Label:
    """The card label of class ``value`` called ``name`` (a known organ, else "Tissue")."""
    code, colour = ORGANS.get(name.lower().replace(" ", "_"), (TISSUE, (128, 174, 128)))
    return Label(value, name, ANATOMICAL_STRUCTURE, code, None, colour)

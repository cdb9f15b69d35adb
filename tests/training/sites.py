"""Labelled studies of a site in RSNA layout, for the tools that choose an operating point on
them (training.calibrate, training.ensemble)."""
from __future__ import annotations

from ich.labels import LABELS
from training.synthetic import make_study, to_bytes


def labelled_site(folder, bleeding: int, normal: int, mislabelled: int = 0):
    """Legacy phantoms (what the hand-weighted detector sees right): intraparenchymal bleeds
    and normal studies, in RSNA layout; the first `mislabelled` normal studies are labelled as
    bleeding (a reader's error: no threshold can alert them and stay silent on the others)."""
    images = folder / "stage_2_train"
    images.mkdir(parents=True)
    rows = ["ID,Label"]
    for index in range(bleeding + normal):
        subtypes = ("intraparenchymal",) if index < bleeding else ()
        wrong = bleeding <= index < bleeding + mislabelled
        for s in make_study(41, index, slices=(8, 10), subtypes=subtypes, variant="default",
                            site="legacy"):
            (images / f"{s.image_id}.dcm").write_bytes(to_bytes(s.dataset))
            rows += [f"{s.image_id}_{label},{1 if wrong and label in ('any', 'intraparenchymal') else s.labels[label]}"
                     for label in LABELS]
    (folder / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    return folder

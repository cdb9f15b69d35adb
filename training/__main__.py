"""`python -m training`: train, evaluate, choose thresholds, export (and promote) a model.

    python -m training --synthetic-studies 120 --seed 7 --promote      # phantoms, measured recipe
    python -m training --data /data/rsna --target-recall 0.95        # study recall, on calibration
    python -m training --config run.toml --epochs 2                     # flags override the file
"""
from __future__ import annotations

import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from training.config import ConfigError, load
    from training.data import DataError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(argv)
        logging.getLogger("training").info("configuration:\n%s", config.to_json())
        from training.train import run

        folder = run(config)
    except (ConfigError, DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if folder is None:          # a non-chief worker: the chief reports the artifact
        return 0
    from ich.model import ModelCard

    card = ModelCard.read(folder)
    if card.status == "failed":
        reasons = "; ".join(card.verdict["reasons"])
        print(f"error: the model learned nothing a worker should serve ({reasons}); {folder} is kept "
              "for inspection, marked failed, and was not promoted"
              + (" (--allow-failed: promoted anyway)" if config.allow_failed and config.promote else ""),
              file=sys.stderr)
        if not config.allow_failed:
            return 3
    study = card.metrics["study"]
    print(json.dumps({"artifact": str(folder), "status": card.status, "study_rule": card.study_rule,
                      "thresholds": card.thresholds,
                      "test_studies": {k: study[k] for k in (
                          "studies", "auc", "recall", "specificity", "ppv", "tp", "fn", "tn", "fp",
                          "false_alerts_per_100_normal", "alert_delay_slices")},
                      "weighted_log_loss": card.metrics["weighted_log_loss"],
                      "prevalence_log_loss": card.metrics["prevalence_log_loss"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

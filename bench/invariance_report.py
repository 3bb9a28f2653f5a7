"""The numbers of docs/invariance.md, through a running Convoy: trains the digits CNN
(examples/digits-cnn.json) and LeNet-5 (examples/lenet5-digits.json), submits an invariance
job for each on the digits validation split, and prints each job's curves as a table.

    CONVOY_URL=... CONVOY_TOKEN=... python -m bench.invariance_report [--inputs 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from client.commands import invariance_table
from client.sdk import Convoy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = ("digits-cnn", "lenet5-digits")
TRANSFORMS = {"translate": [1, 2, 3], "rotate": [15, 30], "scale": [0.8, 1.25]}


def finished(convoy: Convoy, job_id: str) -> dict[str, Any]:
    job = convoy.wait(job_id, timeout=1800)
    if job.state != "succeeded":
        raise RuntimeError(f"job {job_id} {job.state}: {job.error}")
    return job.raw


def measure_models(convoy: Convoy, *, inputs: int = 300, device: str = "auto"
                   ) -> list[dict[str, Any]]:
    """For each model: train it, measure it; its name, validation accuracy and curves."""
    report = []
    for name in MODELS:
        train = json.loads((EXAMPLES / f"{name}.json").read_text())
        trained = finished(convoy, convoy.submit({**train, "device": device}).id)
        job = finished(convoy, convoy.submit({
            "kind": "invariance", "name": f"{name}-invariance", "device": device,
            "source": {"job_id": trained["id"]},
            "inputs": {"dataset": "digits", "split": "val", "indices": list(range(inputs))},
            "layers": None, "transforms": TRANSFORMS}).id)
        curves = convoy.invariance(job["id"])
        report.append({"name": name, "train_job": trained["id"], "job": job["id"],
                       "val_accuracy": trained["result"]["val_accuracy"],
                       "images_per_second": job["result"]["images_per_second"], **curves})
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", type=int, default=300, help="validation images measured")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    with Convoy() as convoy:
        for model in measure_models(convoy, inputs=args.inputs, device=args.device):
            original = model["original"] or {}
            print(f"\n## {model['name']}: train job {model['train_job']} (val_accuracy "
                  f"{model['val_accuracy']:.3f}), invariance job {model['job']}: "
                  f"{args.inputs} validation images, accuracy "
                  f"{original.get('accuracy', float('nan')):.3f} untransformed, "
                  f"{model['images_per_second']:.0f} images/s through the model")
            for measure in ("distance", "cosine"):
                print()
                print("\n".join(invariance_table(model, measure)))


if __name__ == "__main__":
    main()

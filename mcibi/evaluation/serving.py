"""A trained run as an MLflow model: pyfunc (RGB images in, class maps out) with a pytorch flavour beside it.

The model directory holds the checkpoint and ``segmenter.json`` (classes, flip pairs, palette) as pyfunc
artifacts, a copy of the ``mcibi`` package as its code (so ``mlflow models serve`` / ``predict`` need only torch,
timm and OpenCV), the signature (input ``uint8 (-1, -1, -1, 3)``, a batch of equally sized RGB images; output
``int32 (-1, -1, -1)``, their class maps; parameter ``protocol``, default ``ss``) and a ``pytorch`` flavour whose
``mlflow.pytorch.load_model`` gives the plain ``nn.Module`` (``forward(images).logits``). The pyfunc's
``predict`` is :meth:`mcibi.predict.Segmenter.predict_batch`, so it equals ``mcibi predict``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from mcibi.tracking.runs import MODEL_NAME, default_tracking_uri, model_uri

log = logging.getLogger(__name__)



class SegmenterModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of :class:`mcibi.predict.Segmenter`."""

    def load_context(self, context):  # noqa: ANN001 - MLflow checks the hints of these two methods
        from mcibi.evaluation.predict import Segmenter

        info = json.loads(Path(context.artifacts["info"]).read_text())
        self.segmenter = Segmenter.from_checkpoint(context.artifacts["checkpoint"], info=info, device="cpu")

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from mcibi.evaluation.predict import Segmenter

        images = np.asarray(model_input, dtype=np.uint8)
        if images.ndim == 3:
            images = images[None]
        protocol = (params or {}).get("protocol", "ss")
        seg = self.segmenter
        if protocol != seg.protocol_name:
            seg = Segmenter(seg.model, seg.params, seg.info, protocol, seg.device, seg.layout)
        return np.stack([p.classes for p in seg.predict_batch(list(images))]).astype(np.int32)


def signature() -> Any:
    """Image batch in (uint8 N×H×W×3 RGB), class maps out (int32 N×H×W); ``protocol`` as an inference param."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.int32), (-1, -1, -1))]),
                          params=ParamSchema([ParamSpec("protocol", "string", "ss")]))


def requirements() -> list[str]:
    """What the model needs installed besides its own code copy (pinned to this environment's versions)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "timm", "opencv-python-headless", "numpy", "pyyaml", "tqdm", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


class _Flavours:
    """A flavour 'module' for :meth:`mlflow.models.Model.log`: saves the pyfunc, then adds a pytorch flavour."""

    __name__ = "mcibi"

    def __init__(self, checkpoint: Path, info: dict[str, Any]) -> None:
        self.checkpoint, self.info = checkpoint, info

    def save_model(self, path: str, mlflow_model: Any, **_: Any) -> None:
        import mlflow.pytorch
        from mlflow.models import Model

        import mcibi
        from mcibi.evaluation.predict import DATASET_INFO
        from mcibi.models import build_for_weights
        from mcibi.models.build import checkpoint_params
        from mcibi.models.checkpoint import load_checkpoint, load_weights

        with tempfile.TemporaryDirectory() as tmp:
            info_file = Path(tmp) / DATASET_INFO
            info_file.write_text(json.dumps(self.info, indent=1))
            mlflow.pyfunc.save_model(path, python_model=SegmenterModel(), mlflow_model=mlflow_model,
                                     artifacts={"checkpoint": str(self.checkpoint), "info": str(info_file)},
                                     code_paths=[str(Path(mcibi.__file__).parent)], signature=signature(),
                                     pip_requirements=requirements())
        state = load_checkpoint(self.checkpoint)
        torch_model = build_for_weights(checkpoint_params(state, self.checkpoint).model)
        load_weights(torch_model, state, self.checkpoint)
        torch_model.eval()
        sub = Path(path) / "pytorch"
        mlflow.pytorch.save_model(torch_model, str(sub), serialization_format="pickle",
                                  pip_requirements=requirements())
        conf = dict(Model.load(str(sub / "MLmodel")).flavors["pytorch"])
        conf["model_data"] = f"pytorch/{conf['model_data']}"
        conf["code"] = mlflow_model.flavors["python_function"].get("code")
        mlflow_model.add_flavor("pytorch", **conf)
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_model(tracking_uri: str, run_id: str, checkpoint: str | Path, dataset: str,
              registered_model_name: str | None = None) -> str:
    """Log ``checkpoint`` as the run's MLflow model (``runs:/<run_id>/model``); returns the model URI."""
    from mlflow.models import Model

    from mcibi.evaluation.predict import dataset_info

    mlflow.set_tracking_uri(tracking_uri)
    # the logged model belongs to the active experiment: the run's, not "Default"
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    info = Model.log(None, name=MODEL_NAME, flavor=_Flavours(Path(checkpoint), dataset_info(dataset)), run_id=run_id,
                     registered_model_name=registered_model_name)
    log.info("logged the model of run %s as %s", run_id, info.model_uri)
    return info.model_uri


def register(ref: str, name: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """Register the model of a run (id or folder) or URI under ``name``; returns (name, version)."""
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    version = mlflow.register_model(model_uri(ref), name)
    return version.name, str(version.version)

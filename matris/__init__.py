"""MatRIS-MoE universal interatomic potential: model, forces/stress, loss, model files, ASE calculator."""

from matris.calculator import MatRISCalculator
from matris.config import LossConfig, ModelConfig
from matris.io import load, save
from matris.loss import multitask_loss
from matris.model import MatRIS
from matris.properties import predict

__all__ = [
    "LossConfig",
    "MatRIS",
    "MatRISCalculator",
    "ModelConfig",
    "load",
    "multitask_loss",
    "predict",
    "save",
]

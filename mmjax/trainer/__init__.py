"""Training: the state (``state``), the pure steps (``step``), the loop (``loop``), a run read
back from its workdir (``runs``), distillation, transfer from pretrained towers and runs, and
fitting a config to the data's modalities (``fit``)."""

from mmjax.trainer.loop import NonFiniteLossError, Setup, setup, train_and_evaluate
from mmjax.trainer.state import Task, TrainState, create_state, tasks_from_config
from mmjax.trainer.step import eval_step, train_step

__all__ = [
    "NonFiniteLossError", "Setup", "Task", "TrainState", "create_state", "eval_step", "setup",
    "tasks_from_config", "train_and_evaluate", "train_step",
]

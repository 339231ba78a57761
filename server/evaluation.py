"""The server's held-out evaluation: the run dataset's held-out split, encoded once, and the model each round's
adapter is loaded into. The ServerApp and ``fedtune-sim --central`` evaluate through it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.common.data.table import LabelledData, federation_split
from fedtune.common.models.adapter import load_arrays
from fedtune.common.models.device import pick_device
from fedtune.common.tasks import get_task
from fedtune.server.results import held_out_groups

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from fedtune.common.models.base import BaseModel
    from fedtune.common.settings import RunSettings
    from fedtune.common.tasks.base import Encoded, Task
    from fedtune.common.tasks.result import EvalResult
    from fedtune.common.wire.arrays import Arrays


def held_out(settings: RunSettings) -> LabelledData:
    """The server's evaluation set: the run dataset's held-out split (never in a simulated node's data)."""
    d = settings.data
    data = get_task(settings.model.task).load_data(d)
    return federation_split(data, d.test_fraction, settings.federation.seed, d.max_train_examples)[1]


@dataclass(frozen=True)
class HeldOut:
    """The held-out set, ready to score any adapter of the run."""

    task: Task
    base: BaseModel
    test: LabelledData  # the held-out split
    encoded: Encoded  # its tensors, encoded once
    groups: list[str] | None  # each example's group (report-group-column), or None
    model: PeftModel  # the run's model; each evaluation loads the adapter to score into it
    device: torch.device

    @classmethod
    def build(cls, settings: RunSettings) -> HeldOut:
        device = pick_device()
        task = get_task(settings.model.task)
        base = task.load_base(settings.model.model_path)
        test = held_out(settings)
        encoded = task.encode(base, test, settings.model.max_seq_len)
        groups = held_out_groups(test.dataset, settings.data.report_group_column)
        model = task.build_model(base, test.label_names, settings.lora, device, seed=settings.federation.seed)
        return cls(task, base, test, encoded, groups, model, device)

    def evaluate(self, arrays: Arrays) -> EvalResult:
        """Load ``arrays`` into the model and score it on the held-out set (with the report's detail)."""
        load_arrays(self.model, arrays)
        return self.task.evaluate(self.model, self.base, self.test, self.encoded, device=self.device,
                                  groups=self.groups, detail=True)

"""Source stage: prompt groups from a dataset or task, credit from Progress, leases.

``PromptSource`` (pure logic) and ``SourceConfig`` live in ``stages.source.source``;
dataset reading in ``stages.source.dataset``. See those modules for invariants.
"""

from stages.source.dataset import DatasetError, LoadedDataset, load_dataset
from stages.source.source import ISSUED_LOG_NAME, OutstandingGroup, PromptSource, SourceConfig

__all__ = ["DatasetError", "ISSUED_LOG_NAME", "LoadedDataset", "OutstandingGroup", "PromptSource",
           "SourceConfig", "load_dataset"]

"""The dataset workshop: import, clean, size, caption and tag a dataset for training.

Start with :class:`Workspace`; the modules hold the parts:

* :mod:`~lora_trainer.workshop.importer`: folders, zips and uploads into a workspace;
  :mod:`~lora_trainer.workshop.import_sources` reads them safely (zip slips, zip bombs, limits).
* :mod:`~lora_trainer.workshop.cleaning`: formats, colour modes, EXIF rotation, broken files.
* :mod:`~lora_trainer.workshop.dedupe`: exact and near duplicates.
* :mod:`~lora_trainer.workshop.sizing`: bucket report, fixed-size resize with crop modes.
* :mod:`~lora_trainer.workshop.captioning`: the :class:`Captioner` protocol and caption pipeline.
* :mod:`~lora_trainer.workshop.wd14`: the WD14 ONNX tagger (onnxruntime optional, lazy).
* :mod:`~lora_trainer.workshop.tags`: tag frequency, filters, bulk edits; undo in ``store``.
* :mod:`~lora_trainer.workshop.advisor`: steps per image, total steps, warnings, suggestions.

Like the rest of the core, this package imports neither the WebUI's ``modules`` nor gradio;
onnxruntime and huggingface_hub are imported only when the WD14 model is loaded.
"""

from lora_trainer.workshop.advisor import Advice, advise
from lora_trainer.workshop.captioning import Captioner, CaptionerUnavailable, CaptionOptions, CaptionReport
from lora_trainer.workshop.cleaning import CleanReport
from lora_trainer.workshop.dedupe import DuplicateReport
from lora_trainer.workshop.import_sources import ImportLimits
from lora_trainer.workshop.importer import ImportReport
from lora_trainer.workshop.report import Problem
from lora_trainer.workshop.sizing import BucketPlanReport, ResizeReport
from lora_trainer.workshop.store import UndoReport
from lora_trainer.workshop.tags import ImageList, TagEditReport, TagStats
from lora_trainer.workshop.wd14 import WD14Captioner
from lora_trainer.workshop.workspace import Workspace, WorkspaceSummary

__all__ = [
    "Advice",
    "BucketPlanReport",
    "CaptionOptions",
    "CaptionReport",
    "Captioner",
    "CaptionerUnavailable",
    "CleanReport",
    "DuplicateReport",
    "ImageList",
    "ImportLimits",
    "ImportReport",
    "Problem",
    "ResizeReport",
    "TagEditReport",
    "TagStats",
    "UndoReport",
    "WD14Captioner",
    "Workspace",
    "WorkspaceSummary",
    "advise",
]

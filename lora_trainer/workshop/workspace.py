"""The dataset workspace: one folder we own, laid out as kohya's training expects.

A :class:`Workspace` is only a path: everything lives on disk (images, ``.txt`` captions,
``.workshop/`` state, see :mod:`lora_trainer.workshop.layout`), so the UI can drop the object
and open the workspace again at any time, and training reads the folder directly
(``train_data_dir = workspace.path``). Every method returns a small report dataclass whose
``to_dict()`` is plain JSON; problems are listed per file.

Typical use::

    ws = Workspace.create(workspaces_root, "mychar")
    ws.import_folder("/photos/mychar", repeats=10)   # sources are only read
    ws.clean()                                       # RGB PNG/JPEG, upright; bad files set aside
    ws.find_duplicates()
    ws.bucket_report(resolution=1024)
    ws.caption(WD14Captioner(model_dir=...), {"mode": "keep", "trigger_words": ["mychar"]})
    ws.bulk_remove(["blue eyes"])                    # ws.undo() reverts it
    ws.advise(epochs=10, batch_size=2)

One operation at a time per workspace: the methods themselves take no lock, so a caller that
runs them from several threads (the WebUI's queue runs events concurrently) holds
:meth:`Workspace.busy` around each; a second ``busy`` on the same folder, from any
``Workspace`` object or thread, is refused with a ``DatasetError`` saying what runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.data.buckets import BucketSettings
from lora_trainer.data.layout import WORKSHOP_STATE_DIR, is_workshop_image, parse_subset_folder
from lora_trainer.data.split import held_out_count
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.workshop import advisor, importer, sizing
from lora_trainer.workshop import tags as tag_editor
from lora_trainer.workshop.captioning import Captioner, CaptionOptions, CaptionReport, caption_workspace
from lora_trainer.workshop.cleaning import CleanReport, clean_workspace
from lora_trainer.workshop.dedupe import DEFAULT_COLOR_TOLERANCE, DEFAULT_THRESHOLD, DuplicateReport, find_duplicates
from lora_trainer.workshop.fsutil import atomic_write_json, safe_name
from lora_trainer.workshop.import_sources import ImportLimits
from lora_trainer.workshop.importer import ImportReport
from lora_trainer.workshop.layout import (
    concept_folder_name,
    concept_folders,
    iter_images,
    state_dir,
    whole_repeats,
)
from lora_trainer.workshop.report import Report
from lora_trainer.workshop.resources import WORKSHOP_MAX_PIXELS
from lora_trainer.workshop.store import UndoReport, caption_file, move_source_records, undo_info, undo_last

__all__ = ["ConceptInfo", "Workspace", "WorkspaceSummary"]

_STATE_VERSION = 1


@dataclass
class _Operation:
    """What holds a workspace (see :meth:`Workspace.busy`) and its stop request."""

    what: str
    stop: threading.Event = field(default_factory=threading.Event)


# The operations under way, by the workspace's resolved path (so every Workspace object of one
# folder shares them); an entry exists only while its operation runs.
_OPERATIONS: dict[Path, _Operation] = {}
_OPERATIONS_LOCK = threading.Lock()


@dataclass
class ConceptInfo:
    folder: str
    concept: str
    repeats: int
    images: int
    captioned: int


@dataclass
class WorkspaceSummary(Report):
    """What the UI shows on (re)opening: folders, counts, the pending undo, the import history."""

    name: str = ""
    path: str = ""
    images: int = 0
    captioned: int = 0
    concepts: list[ConceptInfo] = field(default_factory=list)
    undo: dict | None = None
    imports: list[dict] = field(default_factory=list)
    quarantined: int = 0  # images set aside by clean()


class Workspace:
    """A dataset workspace at ``path`` (see the module doc). ``create=True`` makes a new one
    when ``path`` is missing or an empty folder; an existing folder that is not a workspace is
    refused (the workshop changes its workspace in place, so it never adopts the user's folders)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = False):
        self.path = Path(path).absolute()
        if not self._state_file.is_file():
            if not create:
                raise DatasetError(f"No workspace at {self.path}; create it first.")
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                # never adopt a user's folder: the workshop edits its workspace in place
                raise DatasetError(
                    f"{self.path} already exists and is not a workspace. Pick another name, or create a "
                    "workspace and import that folder into it (its files are then copied, not changed)."
                )
            self.path.mkdir(parents=True, exist_ok=True)
            state_dir(self.path).mkdir()
            atomic_write_json(
                self._state_file,
                {"version": _STATE_VERSION, "name": self.path.name, "created": _now(), "imports": []},
            )

    # -- creation and listing

    @classmethod
    def create(cls, workspaces_root: str | os.PathLike, name: str) -> Workspace:
        """Make (or reopen) workspace ``name`` under ``workspaces_root``. The name must be a plain
        folder name: no path separators, not hidden."""
        if not name or name != safe_name(name, "") or name.startswith(".") or name in (".", ".."):
            raise DatasetError(
                f"{name!r} cannot be a workspace name: use letters, digits, spaces, '-' or '_' "
                '(no / \\ : * ? " < > |, not starting with a dot).'
            )
        return cls(Path(workspaces_root) / name, create=True)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Workspace:
        return cls(path, create=False)

    @staticmethod
    def list_workspaces(workspaces_root: str | os.PathLike) -> list[str]:
        """Names of the workspaces under ``workspaces_root``."""
        root = Path(workspaces_root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / WORKSHOP_STATE_DIR / "state.json").is_file())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def train_data_dir(self) -> str:
        """The folder to give training (kohya's ``train_data_dir``)."""
        return str(self.path)

    # -- one operation at a time

    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[threading.Event]:
        """Hold this workspace for one operation, described by ``what`` ("captioning with WD14").

        Raises ``DatasetError`` when another operation holds it. Yields the operation's stop
        event, set by :meth:`request_stop` (pass its ``is_set`` as a long run's ``should_stop``).
        """
        key, op = self.path.resolve(), _Operation(what)
        with _OPERATIONS_LOCK:
            running = _OPERATIONS.setdefault(key, op)
        if running is not op:
            raise DatasetError(f"Workspace {self.name} is busy ({running.what}); try again when it has finished.")
        try:
            yield op.stop
        finally:
            with _OPERATIONS_LOCK:
                _OPERATIONS.pop(key, None)

    def running(self) -> str | None:
        """What holds this workspace now (the ``what`` given to :meth:`busy`), None when nothing does."""
        with _OPERATIONS_LOCK:
            op = _OPERATIONS.get(self.path.resolve())
        return op.what if op is not None else None

    def request_stop(self, what_prefix: str = "") -> bool:
        """Ask the operation holding this workspace to stop, when its ``what`` starts with
        ``what_prefix``; False when there is no such operation."""
        with _OPERATIONS_LOCK:
            op = _OPERATIONS.get(self.path.resolve())
            if op is None or not op.what.startswith(what_prefix):
                return False
            op.stop.set()
            return True

    @property
    def _state_file(self) -> Path:
        return state_dir(self.path, "state.json")

    def _state(self) -> dict:
        try:
            data = json.loads(self._state_file.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        return {"version": _STATE_VERSION, "name": self.name, "created": _now(), "imports": []}

    def _record_import(self, report: ImportReport) -> None:
        state = self._state()
        state.setdefault("imports", []).append(
            {"time": _now(), "source": report.source, "images": len(report.imported), "skipped": report.skipped}
        )
        atomic_write_json(self._state_file, state)

    def summary(self) -> WorkspaceSummary:
        s = WorkspaceSummary(name=self.name, path=str(self.path))
        by_folder: dict[str, list[Path]] = {}
        for p in iter_images(self.path):
            by_folder.setdefault(p.relative_to(self.path).parts[0], []).append(p)
        for folder, repeats, concept in concept_folders(self.path):
            imgs = by_folder.get(folder.name, [])
            captioned = sum(1 for p in imgs if caption_file(p) is not None)
            s.concepts.append(ConceptInfo(folder.name, concept, repeats, len(imgs), captioned))
            s.images += len(imgs)
            s.captioned += captioned
        s.undo = undo_info(self.path)
        s.imports = list(self._state().get("imports", []))
        q = state_dir(self.path, "quarantine")
        s.quarantined = sum(1 for _, _, files in os.walk(q) for f in files if is_workshop_image(f)) if q.is_dir() else 0
        return s

    # -- import

    def import_folder(
        self,
        src: str | os.PathLike,
        concept: str | None = None,
        repeats: int | None = None,
        *,
        limits: ImportLimits = ImportLimits(),
        follow_links: bool = False,
    ) -> ImportReport:
        """Copy the images (and ``.txt``/``.caption`` captions) under ``src``, recursively.
        ``<N>_<name>`` folders set concept and repeats; ``concept``/``repeats`` apply to the rest
        (default: the folder's name, 1 repeat). Links are skipped unless ``follow_links`` (then
        only to files inside ``src``). See :mod:`lora_trainer.workshop.importer`."""
        r = importer.import_folder(
            self.path, src, concept=concept, repeats=repeats, limits=limits, follow_links=follow_links
        )
        self._record_import(r)
        return r

    def import_zip(
        self,
        path: str | os.PathLike,
        concept: str | None = None,
        repeats: int | None = None,
        *,
        name: str | None = None,
        limits: ImportLimits = ImportLimits(),
    ) -> ImportReport:
        """Import a zip (``name``: its original name when uploaded). Hostile members are rejected,
        zip bombs refused."""
        r = importer.import_zip(self.path, path, concept=concept, repeats=repeats, limits=limits, label=name)
        self._record_import(r)
        return r

    def import_files(
        self,
        paths: Sequence[str | os.PathLike],
        names: Sequence[str] | None = None,
        concept: str = "images",
        repeats: int | None = None,
        *,
        limits: ImportLimits = ImportLimits(),
    ) -> ImportReport:
        """Import uploaded files (temporary ``paths`` with their original ``names``)."""
        r = importer.import_files(self.path, paths, names, concept=concept, repeats=repeats, limits=limits)
        self._record_import(r)
        return r

    def set_repeats(self, folder: str, repeats: int) -> str:
        """Rename concept folder ``folder`` to ``<repeats>_<concept>``; returns the new folder name."""
        parsed = parse_subset_folder(folder) if "/" not in folder and "\\" not in folder else None
        src = self.path / folder
        if parsed is None or not src.is_dir():
            raise DatasetError(f"No concept folder {folder!r} in workspace {self.name}.")
        # a "<N>_" folder has no concept (no class tokens for training): it stays without one
        new = concept_folder_name(repeats, parsed[1]) if parsed[1] else f"{whole_repeats(repeats)}_"
        if new == folder:
            return folder
        if (self.path / new).exists():
            raise DatasetError(f"Cannot rename {folder} to {new}: that folder already exists. Merge them by hand.")
        os.replace(src, self.path / new)
        move_source_records(self.path, folders={folder: new})
        return new

    # -- cleaning, duplicates, sizes

    def clean(
        self,
        background: tuple[int, int, int] = (255, 255, 255),
        *,
        max_pixels: int | None = WORKSHOP_MAX_PIXELS,
        progress: Callable[[int, int], None] | None = None,
    ) -> CleanReport:
        """Convert every image to an upright 8-bit RGB PNG/JPEG (transparency onto ``background``),
        set aside unusable files. See :mod:`lora_trainer.workshop.cleaning`."""
        report = clean_workspace(self.path, background=background, max_pixels=max_pixels, progress=progress)
        move_source_records(self.path, {f.original: f.path for f in report.files})
        return report

    def find_duplicates(
        self,
        threshold: int = DEFAULT_THRESHOLD,
        *,
        color_tolerance: float = DEFAULT_COLOR_TOLERANCE,
        remove_exact: bool = False,
    ) -> DuplicateReport:
        """Flag exact and near duplicates; ``remove_exact`` moves extra exact copies aside."""
        report = find_duplicates(
            self.path, threshold=threshold, color_tolerance=color_tolerance, remove_exact=remove_exact
        )
        move_source_records(self.path, {r["path"]: r["moved_to"] for r in report.removed})
        return report

    def bucket_report(
        self,
        resolution: int | Sequence[int] = 512,
        *,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
    ) -> sizing.BucketPlanReport:
        """The aspect-ratio buckets training will use for these settings (kohya's options)."""
        if isinstance(resolution, int):
            res = (resolution, resolution)
        elif len(resolution) == 2:
            res = (int(resolution[0]), int(resolution[1]))
        else:
            raise ConfigError("dataset.resolution", f"must be one size or width,height, got {tuple(resolution)}")
        settings = BucketSettings(
            resolution=res,
            enable_bucket=True,
            min_bucket_reso=min_bucket_reso,
            max_bucket_reso=max_bucket_reso,
            bucket_reso_steps=bucket_reso_steps,
            bucket_no_upscale=bucket_no_upscale,
        )
        return sizing.bucket_report(self.path, settings)

    def resize_fixed(
        self,
        width: int,
        height: int | None = None,
        *,
        crop: str = "center",
        points: Mapping[str, tuple[float, float]] | None = None,
        upscale: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> sizing.ResizeReport:
        """Resize every image to ``width`` x ``height`` (square if no height), cropping by ``crop``
        (center, focal, point). Full-size originals are kept in ``.workshop/originals/``."""
        report = sizing.resize_fixed(
            self.path, width, height or width, crop=crop, points=points, upscale=upscale, progress=progress
        )
        # a resized image may change its suffix (a.jpg -> a.png): its record follows it
        moves = {(Path(r.path).parent / Path(r.original).name).as_posix(): r.path for r in report.resized}
        move_source_records(self.path, moves)
        return report

    # -- captions and tags

    def caption(
        self,
        captioner: Captioner,
        options: CaptionOptions | Mapping | None = None,
        *,
        images: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CaptionReport:
        """Run ``captioner`` and write ``.txt`` captions (undoable). See :mod:`lora_trainer.workshop.captioning`."""
        return caption_workspace(
            self.path, captioner, options, images=images, progress=progress, should_stop=should_stop
        )

    def tags(self, filter_tags: Sequence[str] | str | None = None) -> tag_editor.TagStats:
        """Tag frequency across the set (or the images having every ``filter_tags``)."""
        return tag_editor.tag_stats(self.path, filter_tags)

    def images(
        self, filter_tags: Sequence[str] | str | None = None, without_tags: Sequence[str] | str | None = None
    ) -> tag_editor.ImageList:
        """The images (ids, folders, captions), optionally filtered by tags."""
        return tag_editor.list_images(self.path, filter_tags, without_tags)

    def get_caption(self, image: str) -> str:
        return tag_editor.get_caption(self.path, image)

    def set_caption(self, image: str, text: str) -> str:
        return tag_editor.set_caption(self.path, image, text)

    def bulk_remove(
        self, remove: Sequence[str] | str, *, filter_tags=None, without_tags=None
    ) -> tag_editor.TagEditReport:
        return tag_editor.bulk_remove(self.path, remove, filter_tags=filter_tags, without_tags=without_tags)

    def bulk_replace(
        self, mapping: Mapping[str, str], *, filter_tags=None, without_tags=None
    ) -> tag_editor.TagEditReport:
        return tag_editor.bulk_replace(self.path, mapping, filter_tags=filter_tags, without_tags=without_tags)

    def bulk_add(
        self, add: Sequence[str] | str, *, position: str = "start", filter_tags=None, without_tags=None
    ) -> tag_editor.TagEditReport:
        return tag_editor.bulk_add(
            self.path, add, position=position, filter_tags=filter_tags, without_tags=without_tags
        )

    def undo(self) -> UndoReport:
        """Revert the last bulk caption edit (tag editor or caption run)."""
        return undo_last(self.path)

    # -- advice

    def advise(
        self,
        epochs: int,
        batch_size: int = 1,
        *,
        validation_split: float = 0.0,
        validation_count: int | None = None,
        **rules: int,
    ) -> advisor.Advice:
        """Step counts and warnings for training this workspace (its folders' images and repeats), with the
        images a validation split holds out left out (``advisor.Advice.validation_images``)."""
        counts: dict[str, int] = {}
        for p in iter_images(self.path):
            f = p.relative_to(self.path).parts[0]
            counts[f] = counts.get(f, 0) + 1
        folders = [(counts.get(f.name, 0), r) for f, r, _ in concept_folders(self.path)]
        images = sum(n for n, _ in folders)
        held = held_out_count(images, validation_split, validation_count) if images else 0
        return advisor.advise(folders or 0, epochs, batch_size, held_out=held, **rules)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")

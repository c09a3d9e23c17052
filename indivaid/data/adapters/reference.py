"""The reference layout of the IndivAID/CLIP-ReID code, and the nine paper datasets.

``<root>/<Name>/{train,query,gallery}/<pid>_<camid>_<n>[_anything].<ext>``, pid an integer, camid
an integer (or a camera string for MPDD and Stoat). Stoat ships no separate gallery: its test set
is evaluated leave-one-out. For video datasets (PolarBear) the camid field holds the video, which
becomes the encounter, so near-duplicate frames never straddle query and gallery.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from indivaid.data.adapters.base import DATASETS, DatasetAdapter, DatasetInfo, find_images, source_name
from indivaid.data.catalogue import Catalogue, DataError, list_paths

_NAME_INT = re.compile(r"^(?P<pid>\d+)_c?(?P<cam>\d+)(?:s\d+)?_(?P<rest>.+)$")
_NAME_STR = re.compile(r"^(?P<pid>\d+)_(?P<cam>[^_]+)_(?P<rest>.+)$")


class ReferenceLayout(DatasetAdapter):
    """Adapter for ``{train,query,gallery}/<pid>_<camid>_<n>.jpg`` folders."""

    def __init__(self, info: DatasetInfo, *, camera_strings: bool = False, gallery_is_query: bool = False,
                 named_after_path: bool = False) -> None:
        self.info = info
        self.named_after_path = named_after_path  # user data without a name: named after its folder
        self.camera_strings = camera_strings  # the camid field is a camera name (MPDD, Stoat), not a number
        self.pattern = _NAME_STR if camera_strings else _NAME_INT
        self.gallery_is_query = gallery_is_query

    def load(self, path: Path) -> Catalogue:
        if self.named_after_path:
            self.info = replace(self.info, name=source_name(path))
        splits = ("train", "query") if self.gallery_is_query else ("train", "query", "gallery")
        missing = [s for s in splits if not (path / s).is_dir()]
        if missing:
            raise DataError(
                f"{self.info.name}: {path} lacks the folder(s) {missing}; expected "
                f"{path}/{{{','.join(splits)}}}/<pid>_<camid>_<n>.jpg (prepare it with `python -m indivaid.data.prepare`)"
            )
        cols: dict[str, list] = {k: [] for k in ("image_id", "path", "identity", "camera", "encounter", "given_split")}
        bad: list[str] = []
        for split in splits:
            for file in find_images(path / split):
                m = self.pattern.match(file.stem)
                if m is None:
                    bad.append(str(file))
                    continue
                cols["image_id"].append(f"{split}/{file.relative_to(path / split)}")
                cols["path"].append(str(file))
                cols["identity"].append(str(int(m["pid"])))
                cols["camera"].append(m["cam"])
                cols["encounter"].append(m["cam"] if self.info.video else None)
                cols["given_split"].append(split)
        if bad:
            raise DataError(
                f"{self.info.name}: {len(bad)} file names do not match <pid>_<camid>_<n>[_anything].<ext>"
                f"{' (camid a camera string)' if self.pattern is _NAME_STR else ' (pid and camid integers)'}:"
                f"{list_paths(bad)}\nRename them, or load the images with the `table` or `folder` dataset instead."
            )
        return self.catalogue(path, cols)


def _paper(name: str, species: str, citation: str, source: str, counts: tuple, **kw) -> None:
    """Register one paper dataset: ``counts`` are (train, query, gallery) (identities, images)."""
    protocol = kw.pop("protocol", "none")
    video = kw.pop("video", False)
    expected = dict(zip(("train", "query", "gallery"), counts))
    info = DatasetInfo(name, species, citation, source, protocol, video, expected)
    DATASETS.register(name.lower(), lambda: ReferenceLayout(info, **kw))


_paper("ATRW", "tiger", "Li et al., ATRW: a benchmark for Amur tiger re-identification in the wild, ACM MM 2020",
       "lila.science/datasets/atrw", ((149, 3730), (33, 424), (33, 521)))
_paper("FriesianCattle2017", "cattle",
       "Andrew et al., Visual localisation and individual identification of Holstein Friesian cattle via deep learning, ICCV-W 2017",
       "data.bris.ac.uk", ((66, 752), (18, 85), (18, 97)))
_paper("IPanda50", "panda", "Wang et al., Giant panda identification, IEEE TIP 2021",
       "github.com/iPandaDateset/iPanda-50", ((40, 5620), (10, 577), (10, 677)))
_paper("Lion", "lion", "Dlamini and van Zyl, Automated identification of individuals in wildlife population using Siamese neural networks, 2020",
       "github.com/tvanzyl/wildlife_reidentification", ((75, 594), (19, 61), (19, 85)))
_paper("MPDD", "dog", "Multi-pose dog dataset (MPDD), Mendeley Data v5j6m8dzhv",
       "data.mendeley.com/datasets/v5j6m8dzhv", ((95, 1032), (96, 104), (96, 521)), camera_strings=True)
_paper("Nyala", "nyala", "Dlamini and van Zyl, Automated identification of individuals in wildlife population using Siamese neural networks, 2020",
       "github.com/tvanzyl/wildlife_reidentification", ((179, 1213), (58, 354), (58, 375)))
_paper("PolarBear", "polar bear", "Zuerl et al., PolarBearVidID: a video-based re-identification benchmark dataset for polar bears, Animals 2023",
       "zenodo.org/records/7564529", ((10, 107250), (3, 4613), (3, 26500)), video=True, protocol="market1501")
_paper("SeaStar", "sea star", "Wahltinez and Wahltinez, Sea Star Re-ID 2023",
       "lila.science/sea-star-re-id-2023", ((81, 1768), (14, 189), (14, 230)))
_paper("Stoat", "stoat", "Wu et al., An individual identity-driven framework for animal re-identification (IndivAID), arXiv 2410.22927",
       "not public", ((56, 183), (5, 13)), camera_strings=True, gallery_is_query=True, protocol="leave_one_out")


def _reference(*, name: str | None = None, species: str = "animal", protocol: str = "none",
               camera_strings: bool = False, video: bool = False, leave_one_out: bool = False) -> ReferenceLayout:
    """Any dataset in the reference layout (the user names its species and protocol; its name is
    its folder's unless given)."""
    info = DatasetInfo(name or "custom", species, default_protocol="leave_one_out" if leave_one_out else protocol,
                       video=video)
    return ReferenceLayout(info, camera_strings=camera_strings, gallery_is_query=leave_one_out,
                           named_after_path=name is None)


DATASETS.register("reference", _reference)

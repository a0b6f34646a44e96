"""Opening slides: one ``Slide`` interface, an OpenSlide and a tifffile backend.

All locations are level-0 pixels (x, y); sizes are (width, height). A level's downsample is
kept as a float per axis and never rounded: pyramids go 1, 4, 16, 32 or 1, 3.9998, ...

``read_region`` returns the pixels together with the exact position of their top-left corner
in the level's own frame (``lv_origin_xy``). OpenSlide starts a read at level position
``l0_xy / downsample`` (sub-pixel), tifffile at whole level pixels; carrying the true origin
lets the resampler place every pixel exactly, whichever backend read it.

Which pages are pyramid levels (the tifffile backend's rule; ``_pyramid_pages``): level 0 is
the first image of the file (tifffile's first series); a reduced level is any tiled, chunky,
8-bit RGB(A) page that tifffile lists as a level of that series (SubIFDs, OME-TIFF, Aperio,
generic pyramids) or that is a SubIFD of level 0 or follows in the file's main chain of pages
marked "reduced resolution" (NewSubfileType bit 0; Aperio: every tiled page), whose width and height are level
0's divided by one common downsample (each rounded either way). That covers levels stored as
SubIFDs, as separate pages, and as separate tifffile series (an 8x level after level 0 is not
the power-of-two step tifffile groups, so it lists level 0 and the reduced pages apart).
Thumbnails (stripped), labels and macros (other aspect ratios) are never levels.
Where OpenSlide reads the file it finds the same pages, except SubIFDs (OpenSlide 4 sees only
level 0 of a SubIFD or OME pyramid) and tiled pages not marked reduced: there tifffile lists
more levels than OpenSlide. ``open_slide(..., "auto")`` uses tifffile when its level list holds
every OpenSlide level (same sizes) and the pixels of every shared level agree at probes; the
extra levels are the file's own pyramid and may be chosen for reading.
Philips TIFF, NDPI, MRXS, SCN and DICOM stay with OpenSlide under ``auto`` (their levels carry
offsets, padding or bounds that OpenSlide interprets); OpenSlide's opaque reads go to the
resampler as PIL images, without a numpy round trip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np

from ..errors import SlideFormatError, SlideIndexError, SlideNotFoundError, UsageError, WsiScanError
from ..geometry import tile_in_read
from .mpp import MPP_NOTE_KEY
from .tilecache import ReadStats, TileCache, TileKey

SLIDE_EXTS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".czi",
    ".qptiff",
)
MAX_TILE_PX = 1 << 26  # 8192 x 8192: scanners write 256-1024 px tiles
MAX_IMAGE_SIDE_PX = 1 << 22  # 4 million px (400 mm at 0.1 um/px)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: OpenSlide vendors whose files ``auto`` reads with tifffile when the pixels agree
TIFFFILE_VENDORS = ("generic-tiff", "aperio")

ReadRequest = tuple[tuple[int, int], tuple[int, int]]  # (l0_xy, lv_size_wh) of one read_region call


@dataclass(frozen=True)
class Level:
    size_wh: tuple[int, int]
    downsample_xy: tuple[float, float]  # level-0 px per level px


@dataclass(frozen=True)
class SlideInfo:
    path: str
    backend: str
    vendor: str
    levels: tuple[Level, ...]
    l0_bounds_xywh: tuple[int, int, int, int]  # region holding image data (OpenSlide bounds)
    size_bytes: int
    metadata: Mapping[str, str] = field(default_factory=dict)  # raw properties for mpp and info

    @property
    def level0_size_wh(self) -> tuple[int, int]:
        return self.levels[0].size_wh


@dataclass(frozen=True)
class Region:
    #: (h, w, 3) uint8 array, white where the slide has no data; or an opaque RGB PIL image
    #: (OpenSlide's reads: the resampler takes it as is, without a round trip through numpy)
    pixels: Any
    lv_origin_xy: tuple[float, float]  # top-left corner of pixel [0, 0] in the level frame

    @property
    def rgb(self) -> np.ndarray:
        """The pixels as an (h, w, 3) uint8 array (a copy when they are held as a PIL image)."""
        if isinstance(self.pixels, np.ndarray):
            return self.pixels
        return np.asarray(self.pixels)

    def pil(self) -> Any:
        """The pixels as a PIL RGB image (a copy when they are held as an array)."""
        from PIL import Image

        return self.pixels if not isinstance(self.pixels, np.ndarray) else Image.fromarray(self.pixels)


class Slide(Protocol):
    info: SlideInfo
    decoder_warnings: DecoderWarnings

    def read_region(self, l0_xy: tuple[int, int], level: int, lv_size_wh: tuple[int, int]) -> Region: ...

    def expect_reads(self, level: int, reads: Sequence[ReadRequest], max_bytes: int) -> None:
        """Announce the reads a scan will make, so that tiles shared by several are decoded once."""
        ...

    def forget_reads(self) -> None:
        """End of the announced reads: drop what was kept for them."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Slide: ...

    def __exit__(self, *exc: object) -> None: ...


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """Composite premultiplied-free RGBA on white: OpenSlide marks 'no data' as transparent."""
    if rgba.shape[-1] == 3:
        return rgba
    # the opaque case is nearly every read: test it before widening two full-size copies to
    # uint16, which cost more than the JPEG decode's own output copy (measured, docs/benchmarks.md)
    if int(rgba[..., 3].min()) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class _Lifetime:
    """``with open_slide(path) as slide:`` closes the slide's file handles on leaving."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSlideSlide(_Lifetime):
    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideFormatError(f"{path}: OpenSlide does not recognise this file as a slide") from None
        except openslide.OpenSlideError as exc:
            raise SlideFormatError(f"{path}: damaged or truncated slide ({exc})") from None
        # OpenSlide turns libjpeg's corrupt-data warnings into read errors: none are left to count
        self.decoder_warnings = DecoderWarnings()
        props = dict(self._osr.properties)
        dims = self._osr.level_dimensions
        if props.get("openslide.vendor") == "generic-tiff":
            _drop_resolution_of_another_image(path, props, (int(dims[0][0]), int(dims[0][1])))
        ds = self._osr.level_downsamples
        # OpenSlide converts level-0 locations with this one downsample per level; use it as is.
        # A level whose width and height are not level 0's divided by one downsample (3 in x, 1 in
        # y) is left out: OpenSlide gives it the mean of the two, and its pixels would be read at
        # the wrong scale in one direction, shifting every cell in silence
        l0_wh = (int(dims[0][0]), int(dims[0][1]))
        self._os_levels = [0] + [i for i in range(1, len(dims)) if _one_downsample(l0_wh, (int(dims[i][0]), int(dims[i][1])))]
        levels = tuple(Level((int(dims[i][0]), int(dims[i][1])), (float(ds[i]), float(ds[i]))) for i in self._os_levels)
        w0, h0 = levels[0].size_wh
        bx = int(props.get("openslide.bounds-x", 0))
        by = int(props.get("openslide.bounds-y", 0))
        bw = int(props.get("openslide.bounds-width", w0))
        bh = int(props.get("openslide.bounds-height", h0))
        self.info = SlideInfo(
            path=str(path),
            backend="openslide",
            vendor=props.get("openslide.vendor", "unknown"),
            levels=levels,
            l0_bounds_xywh=(bx, by, bw, bh),
            size_bytes=path.stat().st_size,
            metadata=props,
        )

    def read_region(self, l0_xy: tuple[int, int], level: int, lv_size_wh: tuple[int, int]) -> Region:
        import openslide

        try:
            img = self._osr.read_region((int(l0_xy[0]), int(l0_xy[1])), self._os_levels[level], lv_size_wh)
        except openslide.OpenSlideError as exc:
            raise SlideFormatError(f"{self.info.path}: cannot read pixels, the file is damaged or truncated ({exc})") from None
        d = self.info.levels[level].downsample_xy
        lv_origin = (l0_xy[0] / d[0], l0_xy[1] / d[1])
        alpha_range: Any = cast(Any, img.getextrema())[3]
        if alpha_range[0] == 255:
            # opaque, as nearly every read is: PIL's own RGBA -> RGB pass (PIL keeps RGB in 4
            # bytes a pixel, so it is a copy of the same layout) and the resampler takes it as
            # is; the numpy round trip (array, RGB slice, back to PIL) cost three copies
            return Region(img.convert("RGB"), lv_origin)
        rgba = np.asarray(img)
        del img  # np.asarray copied it: free the PIL copy before _flatten_alpha makes another
        return Region(_flatten_alpha(rgba), lv_origin)

    def expect_reads(self, level: int, reads: Sequence[ReadRequest], max_bytes: int) -> None:
        pass  # OpenSlide keeps its own tile cache and decodes inside read_region

    def forget_reads(self) -> None:
        pass

    def close(self) -> None:
        self._osr.close()


def _tiff_metadata(tf: Any) -> dict[str, str]:
    """Properties the mpp resolver understands, named as OpenSlide would name them."""
    page = tf.pages[0]
    meta: dict[str, str] = {}
    desc = page.description or ""
    if desc:
        meta["tiff.ImageDescription"] = desc[:4000]
    if desc.startswith("Aperio"):
        meta["openslide.vendor"] = "aperio"
        for part in desc.split("|")[1:]:
            if "=" in part:
                k, v = part.split("=", 1)
                meta[f"aperio.{k.strip()}"] = v.strip()
    for tag in ("XResolution", "YResolution", "ResolutionUnit"):
        t = page.tags.get(tag)
        if t is not None:
            v = t.value
            if isinstance(v, tuple) and len(v) == 2:
                meta[f"tiff.{tag}"] = repr(v[0] / v[1]) if v[1] else "0"
            elif tag == "ResolutionUnit":
                meta["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(int(v), str(v))
            else:
                meta[f"tiff.{tag}"] = str(v)
    if tf.is_ome and tf.ome_metadata:
        import re

        for axis in ("X", "Y"):
            m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', tf.ome_metadata)
            if m:
                meta[f"ome.PhysicalSize{axis}"] = m.group(1)
                u = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', tf.ome_metadata)
                meta[f"ome.PhysicalSize{axis}Unit"] = u.group(1) if u else "µm"
    return meta


class DecoderWarnings:
    """Corrupt-data warnings of a slide handle's decoder: how many, and the first one.

    A flipped byte inside a JPEG tile decodes to wrong pixels with only a warning from libjpeg;
    a scan records them (attrs ``slide.decoder_warnings``) so that a damaged slide does not go
    unnoticed. Thread-safe: block tasks decode concurrently."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None
        self._lock = threading.Lock()

    def add(self, message: str) -> None:
        with self._lock:
            self.count += 1
            if self.first is None:
                self.first = message

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first}


_JPEG = 7  # TIFF compression code of JPEG tiles


#: an Adobe APP14 segment with transform 0: "these three components are R, G, B, not YCbCr"
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_PHOTOMETRIC_RGB = 2


def _jpeg_stream(page: Any, data: bytes) -> bytes:
    """A tile's JPEG bytes as a complete stream: tables shared in the TIFF header spliced in and,
    for RGB-coded tiles (Aperio), the Adobe marker that tells libjpeg not to convert from YCbCr
    (the TIFF says so in its photometric tag, which a JPEG decoder does not see)."""
    tables = page.jpegtables
    stream = bytes(data)
    if tables and len(tables) > 4 and stream[:2] == b"\xff\xd8":
        stream = bytes(tables[:-2]) + stream[2:]
    if int(page.photometric) == _PHOTOMETRIC_RGB and stream[:2] == b"\xff\xd8":
        stream = stream[:2] + _ADOBE_RGB + stream[2:]
    return stream


@dataclass(frozen=True)
class JpegTiles:
    """The tiles of one read (``TiffFileSlide.jpeg_tiles``): the read's box in the level (x, y,
    w, h; it may reach past the level, where pixels are white), the level's and the tiles'
    sizes, and each tile's (column, row) with its complete, intact JPEG stream, or with its
    pixels, (h, w, 3) uint8, where it was decoded here (no data, or damaged data)."""

    lv_box: tuple[int, int, int, int]
    level_wh: tuple[int, int]
    tile_wh: tuple[int, int]
    tiles: list[tuple[tuple[int, int], bytes | np.ndarray]]


@dataclass(frozen=True)
class _TiledLevel:
    """A level stored as one tiled, chunky, 8-bit RGB(A) page: decoded tile by tile here."""

    page: Any  # tifffile.TiffPage
    tile_wh: tuple[int, int]
    tiles_across: int
    strict_jpeg: bool = False  # decoded by simplejpeg, which reports corrupt data (checked equal at open)


def _simple_tiled_page(page: Any) -> bool:
    """A tiled, chunky, 8-bit RGB(A) page: what ``TiffFileSlide`` decodes tile by tile."""
    return bool(
        page.is_tiled
        and page.planarconfig == 1
        and page.imagedepth == 1
        and page.samplesperpixel in (3, 4)
        and page.dtype == np.uint8
    )


def _tiled_page(page: Any) -> _TiledLevel:
    return _TiledLevel(page, (page.tilewidth, page.tilelength), math.ceil(page.imagewidth / page.tilewidth))


def _tiled_level(series_level: Any) -> _TiledLevel | None:
    page = series_level.keyframe
    if len(series_level.pages) == 1 and _simple_tiled_page(page) and series_level.axes == "YXS":
        return _tiled_page(page)
    return None


def _check_tile_index(path: Path, tl: _TiledLevel, wh: tuple[int, int]) -> None:
    """A header edited to a larger image than its tiles (a 20-gigapixel level 0 over 16 tiles)
    would have OpenSlide decode blank gigapixels for a thumbnail for as long as it is let."""
    want = tl.tiles_across * math.ceil(wh[1] / tl.tile_wh[1])
    have = len(tl.page.dataoffsets)
    if have < want:
        raise SlideIndexError(
            f"{path}: damaged TIFF header, a level of {wh[0]} x {wh[1]} px needs {want} tiles of "
            f"{tl.tile_wh[0]} x {tl.tile_wh[1]} px but the file indexes {have}; re-export the slide from the scanner software"
        )


def _drop_resolution_of_another_image(path: Path, props: dict[str, str], l0_wh: tuple[int, int]) -> None:
    """OpenSlide's generic-tiff reader takes the largest image as level 0 but its resolution tags
    (and so ``openslide.mpp-x/y``) from the file's first directory: where the first image is not
    level 0, that pixel size belongs to another image, and taken for level 0 it scales every
    size and distance by their ratio. It is set aside, with the reason, for --mpp to give."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            shape = tf.pages.first.shape
            first_wh = (int(shape[1]), int(shape[0]))
    except Exception:  # noqa: BLE001 - a file tifffile cannot parse: OpenSlide's reading stands
        return
    if first_wh == l0_wh:
        return
    for k in ("openslide.mpp-x", "openslide.mpp-y", "tiff.XResolution", "tiff.YResolution", "tiff.ResolutionUnit"):
        props.pop(k, None)
    props[MPP_NOTE_KEY] = (
        f"the resolution tags are those of the file's first image ({first_wh[0]} x {first_wh[1]} px), which is not "
        f"its largest, level 0 ({l0_wh[0]} x {l0_wh[1]} px): they do not give level 0's pixel size"
    )


def _one_downsample(l0_wh: tuple[int, int], lv_wh: tuple[int, int]) -> bool:
    """Whether ``lv_wh`` is ``l0_wh`` divided by one downsample d, each side rounded up or down.

    w in {floor, ceil}(w0 / d) holds for d in (w0 / (w + 1), w0 / (w - 1)); x and y must share a d.
    A label or macro image (another aspect ratio) fails; a level written by any rounding passes.
    """
    (w0, h0), (w, h) = l0_wh, lv_wh
    if not (0 < w < w0 and 0 < h < h0):
        return False
    lo = max(w0 / (w + 1), h0 / (h + 1))
    hi = min(w0 / (w - 1) if w > 1 else math.inf, h0 / (h - 1) if h > 1 else math.inf)
    return lo < hi


def _pyramid_pages(tf: Any, series: Any) -> list[tuple[int, Any]]:
    """The reduced levels of ``series`` as (index into series.levels or -1, page), largest first.

    The module docstring gives the rule. Index -1 marks a SubIFD or a page of the main chain
    that tifffile left out of the series (it groups only steps of 2, 3 or 4 of like pages).
    """
    l0 = series.levels[0].keyframe
    l0_wh = (int(l0.imagewidth), int(l0.imagelength))
    found: dict[tuple[int, int], tuple[int, Any]] = {}
    for i in range(1, len(series.levels)):
        lv = series.levels[i]
        page = lv.keyframe
        wh = (int(page.imagewidth), int(page.imagelength))
        if len(lv.pages) == 1 and _one_downsample(l0_wh, wh) and wh not in found:
            found[wh] = (i, page)
    aperio = bool(tf.is_svs)
    # SubIFDs of level 0 (tifffile groups only steps of 2, 3 or 4 of them into its series)
    sub = l0.pages if getattr(l0, "subifds", None) else None
    for page in [*(sub if sub is not None else []), *tf.pages[1:]]:
        if not hasattr(page, "imagewidth"):
            continue  # a TiffFrame: a page of a multi-page series (z, c, t planes), no level
        wh = (int(page.imagewidth), int(page.imagelength))
        reduced = bool(int(page.subfiletype) & 1) or aperio
        if reduced and _simple_tiled_page(page) and _one_downsample(l0_wh, wh) and wh not in found:
            found[wh] = (-1, page)
    return sorted(found.values(), key=lambda ip: -int(ip[1].imagewidth))


class TiffFileSlide(_Lifetime):
    """Pyramidal TIFF / OME-TIFF read with tifffile; only the tiles a read touches are decoded.

    Tiled RGB levels are decoded tile by tile into the read's buffer (no intermediate array) and
    go through a ``TileCache``, so tiles shared by announced reads are decoded once; other
    layouts are read through tifffile's zarr store.
    """

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        try:
            self._tf = tifffile.TiffFile(str(path))
            series = self._tf.series[0]
            self._axes = series.axes
            # level 0 and the reduced levels (module docstring): a level is either a tiled page
            # decoded here tile by tile or (other layouts of tifffile's series) its zarr store
            levels_arr: list[Any] = [zarr.open_array(series.aszarr(level=0), mode="r")]
            tiled: list[_TiledLevel | None] = [_tiled_level(series.levels[0])]
            for index, page in _pyramid_pages(self._tf, series) if tiled[0] is not None else []:
                levels_arr.append(None)
                tiled.append(_tiled_page(page) if _simple_tiled_page(page) else None)
                if tiled[-1] is None:  # a level of the series in a layout only its store reads
                    levels_arr[-1] = zarr.open_array(series.aszarr(level=index), mode="r")
            if tiled[0] is None:  # level 0 itself is not a simple tiled page: tifffile's levels
                for index in range(1, len(series.levels)):
                    levels_arr.append(zarr.open_array(series.aszarr(level=index), mode="r"))
                    tiled.append(_tiled_level(series.levels[index]))
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError) as exc:
            raise SlideFormatError(f"{path}: not a readable TIFF slide ({exc})") from None
        shapes = []
        for arr, tl in zip(levels_arr, tiled):
            if tl is not None:
                w, h = int(tl.page.imagewidth), int(tl.page.imagelength)
                _check_tile_index(path, tl, (w, h))
            else:
                h, w = self._hw(arr.shape)
            if w < 1 or h < 1:
                raise SlideFormatError(f"{path}: a level of {w} x {h} px; the file's image sizes are damaged")
            shapes.append((w, h))
        if "S" not in self._axes or len(levels_arr[0].shape) != 3:
            raise SlideFormatError(f"{path}: expected an RGB image (axes YXS), found axes {self._axes}")
        self._levels = levels_arr
        # pread on a descriptor of our own: threads read tiles without sharing a file position
        self._fd = os.open(str(path), os.O_RDONLY)
        self.decoder_warnings = DecoderWarnings()
        self._tiled = [self._with_strict_jpeg(tl) if tl is not None else None for tl in tiled]
        self._cache = TileCache(0)
        w0, h0 = shapes[0]
        levels = tuple(Level((w, h), (w0 / w, h0 / h)) for w, h in shapes)
        self.info = SlideInfo(
            path=str(path),
            backend="tifffile",
            vendor="ome-tiff" if self._tf.is_ome else ("aperio" if self._tf.is_svs else "generic-tiff"),
            levels=levels,
            l0_bounds_xywh=(0, 0, w0, h0),
            size_bytes=path.stat().st_size,
            metadata=_tiff_metadata(self._tf),
        )

    @property
    def read_stats(self) -> ReadStats:
        """Tiles decoded and taken from the cache by this handle so far (tiled levels only)."""
        return self._cache.stats

    def _hw(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[self._axes.index("Y")], shape[self._axes.index("X")])

    def _lv_box(self, l0_xy: tuple[int, int], level: int, lv_size_wh: tuple[int, int]) -> tuple[int, int, int, int]:
        dx, dy = self.info.levels[level].downsample_xy
        return math.floor(l0_xy[0] / dx), math.floor(l0_xy[1] / dy), lv_size_wh[0], lv_size_wh[1]

    def _tile_keys(self, level: int, lv_box: tuple[int, int, int, int]) -> list[TileKey]:
        tl = self._tiled[level]
        assert tl is not None
        lx, ly, w, h = lv_box
        W, H = self.info.levels[level].size_wh
        tw, th = tl.tile_wh
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        if x1 <= x0 or y1 <= y0:
            return []
        return [(level, tx, ty) for ty in range(y0 // th, (y1 - 1) // th + 1) for tx in range(x0 // tw, (x1 - 1) // tw + 1)]

    def expect_reads(self, level: int, reads: Sequence[ReadRequest], max_bytes: int) -> None:
        if self._tiled[level] is None:
            return
        self._cache.max_bytes = max_bytes
        for l0_xy, lv_size in reads:
            box = self._lv_box(l0_xy, level, lv_size)
            self._cache.expect(box + (level,), self._tile_keys(level, box))

    def forget_reads(self) -> None:
        self._cache.forget()

    def _with_strict_jpeg(self, tl: _TiledLevel) -> _TiledLevel:
        """Use simplejpeg (strict: it reports corrupt data, which tifffile's decoder passes over
        in silence) for a JPEG level where it decodes a tile to exactly tifffile's pixels."""
        page = tl.page
        if page.compression != _JPEG or page.samplesperpixel != 3:
            return tl
        try:
            import simplejpeg
        except ImportError:
            return tl
        counts = np.asarray(page.databytecounts)
        nonzero = np.flatnonzero(counts)
        if nonzero.size == 0:
            return tl
        index = int(nonzero[0])
        data = self._pread(int(counts[index]), int(page.dataoffsets[index]))
        try:
            ref = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0]
            mine = simplejpeg.decode_jpeg(_jpeg_stream(page, data), colorspace="RGB", strict=False)
        except Exception:  # noqa: BLE001 - either decoder failing here: keep tifffile's
            return tl
        ref = ref.reshape(ref.shape[-3:])
        if mine.shape != ref.shape[:2] + (3,) or not np.array_equal(mine, ref[..., :3]):
            return tl
        return dataclasses.replace(tl, strict_jpeg=True)

    def _decode_jpeg(self, page: Any, data: bytes, where: str) -> np.ndarray:
        import simplejpeg

        stream = _jpeg_stream(page, data)
        try:
            return simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True)
        except ValueError as exc:
            warning = str(exc)
        try:
            rgb = simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=False)
        except ValueError as exc:
            raise SlideFormatError(f"{self.info.path}: {where} cannot be decoded, the file is damaged ({exc})") from None
        self.decoder_warnings.add(f"{where}: {warning}")
        return rgb

    def _decode_tile(self, key: TileKey) -> np.ndarray:
        level, tx, ty = key
        tl = self._tiled[level]
        assert tl is not None
        page = tl.page
        index = ty * tl.tiles_across + tx
        tw, th = tl.tile_wh
        nbytes = int(page.databytecounts[index])
        if nbytes == 0:  # a tile the writer left out holds no data: white, as OpenSlide shows it
            # counted, since a damaged file may have lost its tiles' byte counts
            self.decoder_warnings.add(f"level {level} tile {index}: holds no data, read as white")
            return np.full((th, tw, 3), 255, dtype=np.uint8)
        data = self._pread(nbytes, int(page.dataoffsets[index]))
        if tl.strict_jpeg:
            rgb = self._decode_jpeg(page, data, f"level {level} tile {index}")
            if rgb.shape != (th, tw, 3):
                raise SlideFormatError(
                    f"{self.info.path}: level {level} tile {index} decodes to {rgb.shape}, expected {(th, tw, 3)}"
                )
            return rgb
        seg, pos, _ = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        if (pos[2], pos[3]) != (ty * th, tx * tw):  # tiles are stored row by row; say so if not
            raise SlideFormatError(f"{self.info.path}: tile {index} lies at {pos[2:4]}, expected {(ty * th, tx * tw)}")
        return _flatten_alpha(seg.reshape(seg.shape[-3:]))

    def jpeg_level(self, level: int) -> bool:
        """Whether ``level`` is stored as JPEG tiles that ``jpeg_tiles`` can hand to a decoder
        elsewhere (``device_regions``): three samples, checked by the strict decoder at open."""
        tl = self._tiled[level]
        return tl is not None and tl.strict_jpeg

    def jpeg_tiles(self, l0_xy: tuple[int, int], level: int, lv_size_wh: tuple[int, int]) -> JpegTiles:
        """The tiles ``read_region(l0_xy, level, lv_size_wh)`` would decode, as complete JPEG
        streams for a decoder on another device.

        A device decoder passes corrupt data over in silence (nvJPEG, and libjpeg inside
        torchvision, which only prints it), so every stream is first run through the strict
        decoder at 1/8 scale, which reads all of its entropy-coded data but skips most of the
        decoding work (about 40% of a full decode's CPU time); a damaged tile is decoded here
        instead, with the decoder warning the CPU path records, and a tile without data is white.
        """
        import simplejpeg

        if not self.jpeg_level(level):
            raise UsageError(f"{self.info.path}: level {level} is not stored as JPEG tiles this backend can hand over")
        tl = self._tiled[level]
        assert tl is not None
        box = self._lv_box(l0_xy, level, lv_size_wh)
        tiles: list[tuple[tuple[int, int], bytes | np.ndarray]] = []
        try:
            for key in self._tile_keys(level, box):
                _, tx, ty = key
                index = ty * tl.tiles_across + tx
                nbytes = int(tl.page.databytecounts[index])
                if nbytes == 0:
                    tiles.append(((tx, ty), self._decode_tile(key)))  # white, counted as on the CPU path
                    continue
                stream = _jpeg_stream(tl.page, self._pread(nbytes, int(tl.page.dataoffsets[index])))
                try:
                    simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True, min_height=1, min_width=1)
                except ValueError:
                    tiles.append(((tx, ty), self._decode_tile(key)))
                    continue
                tiles.append(((tx, ty), stream))
        except SlideFormatError:
            raise
        except Exception as exc:  # file errors of a damaged or vanished slide, as read_region says them
            raise SlideFormatError(f"{self.info.path}: cannot read tiles, the file is damaged or truncated ({exc})") from None
        return JpegTiles(box, self.info.levels[level].size_wh, tl.tile_wh, tiles)

    def probe_jpeg_streams(self, level: int, count: int) -> list[tuple[int, bytes]]:
        """Up to ``count`` coded tiles of a JPEG level, spread over the file: (tile index, stream)."""
        tl = self._tiled[level]
        assert tl is not None and self.jpeg_level(level)
        nonzero = np.flatnonzero(np.asarray(tl.page.databytecounts))
        picks = nonzero[np.linspace(0, nonzero.size - 1, min(count, nonzero.size)).astype(int)] if nonzero.size else []
        page = tl.page
        return [(int(i), _jpeg_stream(page, self._pread(int(page.databytecounts[i]), int(page.dataoffsets[i])))) for i in picks]

    def decode_tile_index(self, level: int, index: int) -> np.ndarray:
        """Tile ``index`` of ``level`` as this backend decodes it: (tile h, tile w, 3) uint8."""
        tl = self._tiled[level]
        assert tl is not None
        return self._decode_tile((level, index % tl.tiles_across, index // tl.tiles_across))

    def _pread(self, nbytes: int, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fd, nbytes, offset)
        with self._tf.filehandle.lock:  # Windows: no pread, share tifffile's handle under its lock
            self._tf.filehandle.seek(offset)
            return bytes(self._tf.filehandle.read(nbytes))

    def read_region(self, l0_xy: tuple[int, int], level: int, lv_size_wh: tuple[int, int]) -> Region:
        lx, ly, w, h = self._lv_box(l0_xy, level, lv_size_wh)
        W, H = self.info.levels[level].size_wh
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        inside = (x0, y0, x1, y1) == (lx, ly, lx + w, ly + h)
        # a read inside the level is overwritten entirely by its tiles; only the rest needs white
        out = np.empty((h, w, 3), dtype=np.uint8) if inside else np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            try:
                if self._tiled[level] is not None:
                    self._read_tiles(level, (lx, ly, w, h), out)
                else:
                    self._read_store(level, (x0, y0, x1, y1), out[y0 - ly : y1 - ly, x0 - lx : x1 - lx])
            except SlideFormatError:
                raise
            except Exception as exc:  # codec and file errors of a damaged slide
                raise SlideFormatError(
                    f"{self.info.path}: cannot decode tiles, the file is damaged or truncated ({exc})"
                ) from None
        return Region(out, (float(lx), float(ly)))

    def _read_tiles(self, level: int, lv_box: tuple[int, int, int, int], out: np.ndarray) -> None:
        tl = self._tiled[level]
        assert tl is not None
        planned = self._cache.begin_read(lv_box + (level,))
        for (_, tx, ty), tile in self._cache.tiles(self._tile_keys(level, lv_box), planned, self._decode_tile):
            dst, src = tile_in_read((tx, ty), tl.tile_wh, lv_box, self.info.levels[level].size_wh)
            out[dst] = tile[src]

    def _read_store(self, level: int, box: tuple[int, int, int, int], out: np.ndarray) -> None:
        x0, y0, x1, y1 = box
        sl: list[slice] = [slice(None)] * len(self._axes)
        sl[self._axes.index("Y")] = slice(y0, y1)
        sl[self._axes.index("X")] = slice(x0, x1)
        data = np.asarray(self._levels[level][tuple(sl)])
        if self._axes.index("S") == 0:
            data = np.moveaxis(data, 0, -1)
        out[...] = _flatten_alpha(data)[..., :3]

    def close(self) -> None:
        self._tf.close()
        os.close(self._fd)


def file_identity(path: str | os.PathLike[str]) -> str:
    """Size and modification time of a slide file: what tells a rescan that it is the same file."""
    st = os.stat(path)
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def refuse_heatmap_store(path: Path) -> None:
    """A heatmap store given where a slide (or a folder of slides) belongs: named as what it is,
    with the slide it was made from, rather than as a damaged slide or an empty folder."""
    from .outputs import is_heatmap_store

    if not is_heatmap_store(path):
        return
    try:
        made_from = json.loads((path / "zarr.json").read_text(encoding="utf-8"))["attributes"]["wsi_scan"]["slide"]
        source = f" ({str(made_from['path'])[:200]})"
    except (OSError, ValueError, KeyError, TypeError):
        source = ""
    raise SlideFormatError(f"{path} is a heatmap store that wsi-scan wrote, not a slide; give the slide it was made from{source}")


def _sniff(path: Path) -> None:
    """Refuse what is clearly not a slide before a backend produces a confusing message."""
    if not path.exists():
        raise SlideNotFoundError(f"slide {path} does not exist; check the path")
    refuse_heatmap_store(path)
    if path.is_dir() and path.suffix.lower() == ".zarr":
        # a Zarr store that wsi-scan did not write: no backend reads a folder (before, "damaged or
        # unreadable slide (IsADirectoryError)")
        raise SlideFormatError(
            f"{path} is a Zarr folder, not a slide file; expected a whole-slide image file (SVS, NDPI, MRXS, SCN, "
            "DICOM, pyramidal or OME-TIFF): convert the image to a pyramidal TIFF to scan it"
        )
    if path.is_dir():
        raise SlideNotFoundError(
            # info, tile and overlay --slide take one slide; `wsi-scan DIR --out RESULTS/` scans a folder
            f"slide {path} is a folder; expected one slide file (a folder of slides is scanned by `wsi-scan {path} --out RESULTS/`)"
        )
    if not path.is_dir() and not path.is_file():
        raise SlideFormatError(
            f"slide {path} is not a regular file (a device, pipe or socket); expected a whole-slide image file"
        )
    size = path.stat().st_size
    if size == 0:
        raise SlideFormatError(f"slide {path} is an empty file (0 bytes); expected a whole-slide image")
    if path.is_file():
        with path.open("rb") as fh:
            head = fh.read(16)
        if head[:4] in TIFF_MAGIC:
            _check_tiff_complete(path, size, head)


def _check_tiff_complete(path: Path, size: int, head: bytes) -> None:
    """Refuse a TIFF (SVS, NDPI, generic) whose pages point past its end: a truncated copy.

    Backends would otherwise open it and fail, or show white, only where a scan first touches a
    missing tile, or (OpenSlide) drop the levels whose directories were cut off. A file that
    tifffile cannot parse at all is left to the backends, whose message says more.
    """
    import tifffile

    if size < 16:
        raise SlideFormatError(f"{path}: truncated slide: {size} bytes, shorter than a TIFF header; copy the slide again")
    first = _first_directory_offset(head)
    if first is not None and first >= size:
        # the directories follow the pixels, so a cut-off copy loses them first: no reader then
        # finds an image, and OpenSlide's "not a slide" would hide what happened
        raise SlideFormatError(
            f"{path}: truncated slide: its first image directory is at byte {first:,} but the file has {size:,}; "
            "copy the slide again from its source"
        )
    try:
        tf = tifffile.TiffFile(str(path))
    except Exception:  # noqa: BLE001 - not parseable here: the backends decide
        return
    with tf:
        try:
            pages = list(tf.pages)
        except Exception as exc:  # noqa: BLE001 - a directory chain cut off mid-way
            raise SlideFormatError(
                f"{path}: damaged or truncated TIFF, its image directories cannot be read ({exc!s:.80})"
            ) from None
        after = _next_directory_offset(tf)
        if after is not None and after >= size:
            # tifffile stops the chain there with a log line only: the slide would open with the
            # images before the cut (its label, macro or reduced levels missing)
            raise SlideFormatError(
                f"{path}: truncated slide: image directory {len(pages)} is at byte {after:,} but the file has {size:,}; "
                "copy the slide again from its source"
            )
        for i, page in enumerate(pages):
            try:
                tw, tl = int(getattr(page, "tilewidth", 0) or 0), int(getattr(page, "tilelength", 0) or 0)
                iw, il = int(getattr(page, "imagewidth", 0) or 0), int(getattr(page, "imagelength", 0) or 0)
            except (TypeError, ValueError):
                raise SlideFormatError(f"{path}: image {i} has unreadable size tags; the file's header is damaged") from None
            if tw * tl > MAX_TILE_PX or max(iw, il) > MAX_IMAGE_SIDE_PX:
                # OpenSlide would try to allocate such a tile and abort the whole process
                raise SlideFormatError(
                    f"{path}: image {i} declares {iw} x {il} px in tiles of "
                    f"{tw} x {tl} px; the file's header is damaged or hostile"
                )
            offsets = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.uint64)
            counts = np.asarray(getattr(page, "databytecounts", ()), dtype=np.uint64)
            if offsets.size == 0 or offsets.size != counts.size:
                continue
            ends = offsets + counts
            end = int(ends[counts > 0].max()) if bool((counts > 0).any()) else 0
            if end > size:
                raise SlideFormatError(
                    f"{path}: truncated slide: image {i} needs {end:,} bytes but the file has {size:,}; "
                    "copy the slide again from its source"
                )


def _refuse_missing_tiles(p: Path) -> None:
    """The tile-index check of ``TiffFileSlide`` for a TIFF that OpenSlide alone will read: it
    would decode blank gigapixels of an over-declared level for as long as it is let."""
    with p.open("rb") as fh:
        if fh.read(4) not in TIFF_MAGIC:
            return
    try:
        TiffFileSlide(p).close()
    except SlideIndexError:
        raise
    except Exception:  # noqa: BLE001 - a TIFF only OpenSlide reads: its own errors say why
        return


def open_slide(path: str | os.PathLike[str], backend: str = "auto") -> Slide:
    """Open a slide with OpenSlide or tifffile.

    ``auto``: OpenSlide for the vendor formats; tifffile for plain pyramidal TIFFs (faster, same
    pixels) and for TIFFs OpenSlide refuses (OME-TIFF).
    """
    p = Path(path)
    _sniff(p)
    if backend not in ("auto", "openslide", "tifffile"):
        raise UsageError(f"backend must be auto, openslide or tifffile, found {backend!r}")
    try:
        return _open(p, backend)
    except (WsiScanError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - parsers of hostile files raise anything; the user gets one line
        raise SlideFormatError(f"{p}: damaged or unreadable slide ({type(exc).__name__}: {exc!s:.120})") from None


def _open(p: Path, backend: str) -> Slide:
    if backend == "openslide":
        _refuse_missing_tiles(p)
        return OpenSlideSlide(p)
    if backend == "tifffile":
        return TiffFileSlide(p)
    try:
        osr = OpenSlideSlide(p)
    except SlideFormatError as first:
        with p.open("rb") as fh:
            magic = fh.read(4)
        if magic not in TIFF_MAGIC:
            kind = (
                "a PNG image"
                if magic == b"\x89PNG"
                else ("a JPEG image" if magic[:3] == b"\xff\xd8\xff" else "not a slide format")
            )
            raise SlideFormatError(
                f"{p}: {kind}; expected a whole-slide image (SVS, NDPI, MRXS, SCN, DICOM, pyramidal TIFF)"
            ) from None
        try:
            return TiffFileSlide(p)
        except SlideIndexError:
            raise
        except SlideFormatError:
            raise first from None
    if osr.info.vendor not in TIFFFILE_VENDORS:
        return osr  # other vendor formats: OpenSlide knows their bounds, offsets and quirks
    # A plain pyramidal TIFF or an Aperio SVS is a TIFF pyramid that OpenSlide reads as is, with
    # no bounds or offsets to interpret; tifffile decodes its tiles to the same pixels faster
    # and lets a scan decode shared tiles once (docs/benchmarks.md). Keep OpenSlide wherever
    # the two disagree on the levels or on a probe of pixels.
    try:
        tfs = TiffFileSlide(p)
    except SlideIndexError:
        osr.close()
        raise
    except SlideFormatError:
        return osr
    if not _levels_agree(osr, tfs) or not _same_pixels(osr, tfs):
        if tfs.info.level0_size_wh == osr.info.level0_size_wh:
            # the same image read by OpenSlide: keep what tifffile read of its metadata (OME
            # PhysicalSize, which OpenSlide does not read) where OpenSlide has no key
            osr.info = dataclasses.replace(osr.info, metadata={**tfs.info.metadata, **osr.info.metadata})
        tfs.close()
        return osr
    # OpenSlide's properties (its normalised mpp among them) describe the same file; tifffile's
    # own (OME PhysicalSize, which OpenSlide does not read) stay where OpenSlide has no key
    tfs.info = dataclasses.replace(tfs.info, vendor=osr.info.vendor, metadata={**tfs.info.metadata, **osr.info.metadata})
    osr.close()
    return tfs


def _next_directory_offset(tf: Any) -> int | None:
    """Where the last directory tifffile read says the next one is (0: none), read from the file."""
    import struct

    try:
        at = tf.pages.next_page_offset
        if not at:
            return None
        tf.filehandle.seek(at)
        return int(struct.unpack(tf.tiff.offsetformat, tf.filehandle.read(tf.tiff.offsetsize))[0])
    except (AttributeError, OSError, struct.error, TypeError, ValueError):
        return None


def _first_directory_offset(head: bytes) -> int | None:
    """The byte offset of a TIFF's (or BigTIFF's) first image directory, from its first 16 bytes."""
    byteorder: Literal["little", "big"] = "little" if head[:2] == b"II" else "big"
    if head[2:4] in (b"*\x00", b"\x00*") and len(head) >= 8:
        return int.from_bytes(head[4:8], byteorder)
    if head[2:4] in (b"+\x00", b"\x00+") and len(head) >= 16:
        return int.from_bytes(head[8:16], byteorder)
    return None


def _levels_agree(osr: Slide, tfs: Slide) -> bool:
    """Whether tifffile's level list holds every OpenSlide level, level 0 first (module docstring:
    tifffile may list more, e.g. SubIFDs, which OpenSlide does not read)."""
    tf_sizes = [lv.size_wh for lv in tfs.info.levels]
    os_sizes = [lv.size_wh for lv in osr.info.levels]
    return tf_sizes[0] == os_sizes[0] and set(os_sizes) <= set(tf_sizes)


def _same_pixels(a: Slide, b: Slide, probe_px: int = 256) -> bool:
    """Whether both read the same pixels at places of every level of ``a`` (a colour-space or
    codec difference shows on any tile, glass included); ``b`` holds ``a``'s levels.

    Compared only where both reads start on the same whole level pixel: OpenSlide starts a read
    at ``l0_xy / downsample`` and interpolates when that is fractional (module docstring), so
    the corner of each level and every probe on level 0 qualify."""
    b_index = {lv.size_wh: i for i, lv in enumerate(b.info.levels)}
    w0, h0 = a.info.level0_size_wh
    for level, lv in enumerate(a.info.levels):
        lw, lh = lv.size_wh
        for fx, fy in ((0.0, 0.0), (0.5, 0.5), (0.25, 0.33), (0.75, 0.67)):
            l0_xy = (int(w0 * fx), int(h0 * fy))
            dx, dy = lv.downsample_xy
            wh = (max(1, min(probe_px, lw - int(l0_xy[0] / dx))), max(1, min(probe_px, lh - int(l0_xy[1] / dy))))
            try:
                ra, rb = a.read_region(l0_xy, level, wh), b.read_region(l0_xy, b_index[lv.size_wh], wh)
                if ra.lv_origin_xy != rb.lv_origin_xy:
                    if level == 0:
                        return False
                    continue  # a fractional start at a reduced level: no pixel-exact comparison
                if not np.array_equal(ra.rgb, rb.rgb):
                    return False
            except SlideFormatError:
                return False
    return True

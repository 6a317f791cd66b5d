"""Annotation classes and formats: --class-map patterns and ignore (in labels and masks),
ImageScope and ASAP XML read as the same polygons as GeoJSON."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from slide_fixtures import read_samples  # noqa: E402

from mlps_dist.core.errors import InputError  # noqa: E402
from mlps_dist.slides.annotations import AnnotationError, load_annotations  # noqa: E402
from mlps_dist.slides.class_map import IGNORE, parse_class_map  # noqa: E402
from mlps_dist.synthetic.slides import QUPATH_NAMES, geojson, truth_map, write_synthetic_slide  # noqa: E402

CLASSES = ["TE", "NEC", "LYM", "TAS"]
W, H = 384, 256


def test_class_map_precedence_exact_then_class_names_then_patterns_in_order():
    cmap = parse_class_map("Tumor=TE, stroma dense=NEC, Stroma*=TAS, *=ignore, Region*=LYM", CLASSES)
    assert cmap.lookup("TUMOR") == 0  # case-insensitive
    assert cmap.lookup("Stroma dense") == 1  # the exact entry before the pattern
    assert cmap.lookup("Stroma (loose)") == 3
    assert cmap.lookup("lym") == 2  # a class name before any pattern, even "*"
    assert cmap.lookup("Region*") == IGNORE  # "*" comes before "Region*": the first pattern wins
    assert parse_class_map("Region*=ignore", CLASSES).lookup("Region 12") == IGNORE
    assert parse_class_map("Tumor=TE", CLASSES).lookup("Fat") is None
    assert cmap.record()["patterns"] == [["stroma*", "TAS"], ["*", "ignore"], ["region*", "LYM"]]
    with pytest.raises(InputError, match="'tumor' is mapped twice"):
        parse_class_map("Tumor=TE,tumor=NEC", CLASSES)
    with pytest.raises(InputError, match="TARGET one of .* or 'ignore'"):
        parse_class_map("Tumor=Fat", CLASSES)
    with pytest.raises(InputError, match="may not be called 'ignore'"):
        parse_class_map("", ["TE", "Ignore"])


def test_an_unmapped_name_is_one_line_naming_it_the_file_and_the_flag(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(geojson([(0, _box(0, 0, 50, 50)), (1, _box(60, 0, 90, 50))])))
    with pytest.raises(AnnotationError) as exc:
        load_annotations(path, CLASSES, parse_class_map("Tumor=TE", CLASSES))
    message = str(exc.value)
    assert "\n" not in message and "'Necrosis'" in message and str(path) in message and "--class-map" in message


def _box(x0, y0, x1, y1):
    from shapely.geometry import box

    return box(x0, y0, x1, y1)


def test_ignore_regions_leave_labels_and_carry_the_ignore_index_in_masks(tmp_path):
    """Stroma exported as "Region*" and a box "Other" over other regions: with
    "Region*=ignore,Other=ignore" no train label holds TAS, the truth's stroma pixels and the
    box are the ignore index in val masks, and the other classes are kept."""
    root = tmp_path / "wsi"
    regions = {}
    for name, _split in (("a", "train"), ("b", "val")):
        regions[name] = write_synthetic_slide(
            root / "slides" / f"{name}.tiff", root / "ann" / f"{name}.geojson", W, H, seed=3, cell_px=100
        )
        data = json.loads((root / "ann" / f"{name}.geojson").read_text())
        for f in data["features"]:
            if f["properties"]["classification"]["name"] == "Stroma":
                f["properties"]["classification"]["name"] = "Region*"
        other = json.loads(json.dumps(geojson([(0, _box(120, 60, 210, 150))])["features"][0]))
        other["properties"]["classification"]["name"] = "Other"
        data["features"].append(other)
        (root / "ann" / f"{name}.geojson").write_text(json.dumps(data))
    (root / "splits.csv").write_text("a,train\nb,val\n")
    out = tmp_path / "out"
    class_map = "Tumor=TE,Necrosis=NEC,Immune*=LYM,Region*=ignore,Other=ignore"
    from mlps_dist.cli import tile as tile_slides

    assert (
        tile_slides.main(
            [
                "--slides",
                str(root / "slides"),
                "--out",
                str(out),
                "--mpp",
                "2",
                "--tile",
                "32",
                "--annotations",
                str(root / "ann"),
                "--class-map",
                class_map,
                "--splits",
                str(root / "splits.csv"),
            ]
        )
        == 0
    )
    info = json.loads((out / "info.json").read_text())
    assert info["class_map"]["patterns"] == [["immune*", "LYM"], ["region*", "ignore"]]
    assert info["annotations"]["a"]["classes"]["Region*"] == "ignore"
    trains = list(read_samples(out, "train"))
    assert trains and info["splits"]["train"]["class_counts"][3] == 0
    assert all(np.frombuffer(s["labels"], np.uint8)[3] == 0 for _, _, s in trains)
    for _, meta, _ in trains:  # no train tile lies wholly in the ignored box
        assert (meta["x"], meta["y"]) != (128, 64)  # the grid tile inside 120..210 x 60..150
    assert any(meta["slide"] == "a" for _, meta, _ in trains)
    stroma = stroma_ignored = kept = in_box = 0
    for _, meta, sample in read_samples(out, "val"):
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        truth = truth_map(regions["b"], meta["x"], meta["y"], meta["size0"], 32)
        assert 3 not in np.unique(mask)
        inner = ndimage.binary_erosion(truth == 3)  # a region's border pixel may go to its neighbour
        stroma += inner.sum()
        stroma_ignored += (inner & (mask == 4)).sum()
        kept += ((mask == truth) & (truth < 3)).sum()
        centres = (np.arange(32) + 0.5) * meta["size0"] / 32
        xs, ys = meta["x"] + centres[None, :], meta["y"] + centres[:, None]
        box = (xs > 122) & (xs < 208) & (ys > 62) & (ys < 148)
        in_box += box.sum()
        assert (mask[box] == 4).all()  # the ignore box wins over the tumour or necrosis beneath it
    assert stroma > 0 and stroma_ignored / stroma > 0.97 and kept > 0 and in_box > 0


def _imagescope(regions) -> str:
    root = ET.Element("Annotations", MicronsPerPixel="1.0")
    for c, name in enumerate(QUPATH_NAMES):
        layer = ET.SubElement(root, "Annotation", Id=str(c + 1), Name=name, Type="4")
        ET.SubElement(ET.SubElement(layer, "Attributes"), "Attribute", Name="Description", Value="")
        group = ET.SubElement(layer, "Regions")
        for number, (cls, poly) in enumerate(regions):
            if cls == c:
                region = ET.SubElement(group, "Region", Id=str(number), Type="0", NegativeROA="0", Text="")
                vertices = ET.SubElement(region, "Vertices")
                for x, y in list(poly.exterior.coords)[:-1]:
                    ET.SubElement(vertices, "Vertex", X=repr(x), Y=repr(y), Z="0")
    return ET.tostring(root, encoding="unicode")


def _asap(regions) -> str:
    root = ET.Element("ASAP_Annotations")
    group = ET.SubElement(root, "Annotations")
    for number, (cls, poly) in enumerate(regions):
        item = ET.SubElement(
            group,
            "Annotation",
            Name=f"Annotation {number}",
            Type="Polygon",
            PartOfGroup=QUPATH_NAMES[cls],
            Color="#F4FA58",
        )
        coords = ET.SubElement(item, "Coordinates")
        points = list(poly.exterior.coords)[:-1]
        for order in reversed(range(len(points))):  # written out of order: Order decides
            x, y = points[order]
            ET.SubElement(coords, "Coordinate", Order=str(order), X=repr(x).replace(".", ","), Y=repr(y))
    ET.SubElement(ET.SubElement(root, "AnnotationGroups"), "Group", Name="Tumor", PartOfGroup="None")
    return ET.tostring(root, encoding="unicode")


def test_imagescope_and_asap_xml_read_as_the_same_polygons_as_geojson(tmp_path):
    from mlps_dist.synthetic.slides import CLASS_MAP, slide_regions

    regions = slide_regions(W, H, seed=4, cell_px=100)
    cmap = parse_class_map(CLASS_MAP, CLASSES)
    (tmp_path / "a.geojson").write_text(json.dumps(geojson(regions)))
    (tmp_path / "a.xml").write_text(_imagescope(regions))
    (tmp_path / "b.xml").write_text('<?xml version="1.0"?>\n' + _asap(regions))
    reference = load_annotations(tmp_path / "a.geojson", CLASSES, cmap, bounds=(W, H))
    assert sum(not g.is_empty for g in reference.per_class) >= 3
    for name in ("a.xml", "b.xml"):
        ann = load_annotations(tmp_path / name, CLASSES, cmap, bounds=(W, H))
        assert ann.names == reference.names
        for ref, got in zip(reference.per_class, ann.per_class):
            assert got.symmetric_difference(ref).area <= 1e-6 * max(ref.area, 1), name


def test_imagescope_negative_regions_are_holes_and_rulers_have_no_area(tmp_path):
    xml = (
        '<Annotations><Annotation Id="1" Name=""><Attributes><Attribute Name="Description" Value="Tumor"/>'
        "</Attributes><Regions>"
        '<Region Id="1" Type="1" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="100" Y="0"/>'
        '<Vertex X="100" Y="100"/><Vertex X="0" Y="100"/></Vertices></Region>'
        '<Region Id="2" Type="0" NegativeROA="1"><Vertices><Vertex X="20" Y="20"/><Vertex X="40" Y="20"/>'
        '<Vertex X="40" Y="40"/><Vertex X="20" Y="40"/></Vertices></Region>'
        '<Region Id="3" Type="4" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="50" Y="50"/>'
        "</Vertices></Region></Regions></Annotation>"
        '<Annotation Id="2" Name="Necrosis"><Regions><Region Id="4" Type="2"><Vertices><Vertex X="200" Y="0"/>'
        '<Vertex X="300" Y="100"/></Vertices></Region></Regions></Annotation></Annotations>'
    )
    (tmp_path / "s.xml").write_text(xml)
    ann = load_annotations(tmp_path / "s.xml", CLASSES, parse_class_map("Tumor=TE,Necrosis=NEC", CLASSES))
    assert ann.per_class[0].area == pytest.approx(100 * 100 - 20 * 20)  # class from the Description value
    assert ann.per_class[1].area == pytest.approx(np.pi * 50 * 50, rel=0.01)  # an ellipse
    assert any("1 feature(s) without area" in n for n in ann.notes)
    (tmp_path / "bad.xml").write_text("<Slide><Region/></Slide>")
    with pytest.raises(InputError, match="neither ImageScope"):
        load_annotations(tmp_path / "bad.xml", CLASSES, {})

"""Records: safe serialisation, ArrayRecord round trip, importers on small fixtures."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from unifluid_jax.data import records as R


def _png(v, size=8):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_encode_decode_and_corruption():
    rec = {"id": "x", "task": "edit", "image": _png(1), "image2": b"", "instruction": "make it ✓ red",
           "extra": "kept", "none": None}
    out = R.decode_record(R.encode_record(rec))
    assert out == {k: v for k, v in rec.items() if v is not None}
    data = R.encode_record(rec)
    for bad in (b"", b"junk", data[:10], data[:-3], b"UFR1" + (10 ** 6).to_bytes(4, "little") + b"{}",
                b"UFR1\x02\x00\x00\x00[]"):
        with pytest.raises(R.RecordError):
            R.decode_record(bad)
    with pytest.raises(TypeError):
        R.encode_record({"x": 3})


def test_array_record_round_trip(tmp_path):
    recs = [{"id": str(i), "task": "caption", "image": _png(i), "caption": f"c {i}"} for i in range(10)]
    paths = R.write_records(recs, str(tmp_path / "d" / "cap"), num_shards=3)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"cap-0000{i}-of-00003.array_record" for i in range(3)]
    for spec in (str(tmp_path / "d" / "cap"), str(tmp_path / "d" / "cap-*"), str(tmp_path / "d"), paths):
        got = sorted(R.read_records(spec), key=lambda r: int(r["id"]))
        assert got == recs
    assert len(R.open_source(paths)) == 10
    with pytest.raises(FileNotFoundError):
        R.resolve_paths(str(tmp_path / "missing"))


def test_import_image_folder_jsonl_and_csv(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"cap {i}"}) + "\n"
                                                 for i in range(3)))
    (tmp_path / "caps.csv").write_text("image,caption\n" + "".join(f"{i}.png,cap {i}\n" for i in range(3)))
    for name in ("caps.jsonl", "caps.csv"):
        R.import_image_folder(str(tmp_path / "img"), str(tmp_path / name), str(tmp_path / f"o{name}"),
                              task="t2i")
        got = sorted(R.read_records(str(tmp_path / f"o{name}")), key=lambda r: r["id"])
        assert [(r["id"], r["task"], r["caption"]) for r in got] == [(str(i), "t2i", f"cap {i}") for i in range(3)]
        assert [r["image"] for r in got] == [_png(i) for i in range(3)]


def test_import_coco_and_vqa(tmp_path):
    for i in (1, 2):
        (tmp_path / f"COCO_train2014_{i:012d}.jpg").write_bytes(_png(i))
    coco = {"images": [{"id": 1, "file_name": f"COCO_train2014_{1:012d}.jpg"},
                       {"id": 2, "file_name": f"COCO_train2014_{2:012d}.jpg"}],
            "annotations": [{"image_id": 1, "id": 10, "caption": "a cat "}, {"image_id": 1, "id": 11, "caption": "b"},
                            {"image_id": 2, "id": 12, "caption": "c"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    R.import_coco_captions(str(tmp_path / "coco.json"), str(tmp_path), str(tmp_path / "coco"), num_shards=2)
    got = sorted(R.read_records(str(tmp_path / "coco")), key=lambda r: r["id"])
    assert [(r["id"], r["caption"], r["image"]) for r in got] == [
        ("1/10", "a cat", _png(1)), ("1/11", "b", _png(1)), ("2/12", "c", _png(2))]

    qs = {"questions": [{"image_id": 1, "question": "what?", "question_id": 5},
                        {"image_id": 2, "question": "who?", "question_id": 6}]}
    anns = {"annotations": [{"question_id": 5, "image_id": 1, "multiple_choice_answer": "cat",
                             "answers": [{"answer": "cat"}, {"answer": "kitten"}]},
                            {"question_id": 6, "image_id": 2, "multiple_choice_answer": "dog", "answers": []}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    R.import_vqa(str(tmp_path / "q.json"), str(tmp_path / "a.json"), str(tmp_path), str(tmp_path / "vqa"))
    got = sorted(R.read_records(str(tmp_path / "vqa")), key=lambda r: r["id"])
    assert [(r["id"], r["task"], r["question"], r["answer"], r["image"]) for r in got] == [
        ("5", "vqa", "what?", "cat", _png(1)), ("6", "vqa", "who?", "dog", _png(2))]
    assert json.loads(got[0]["answers"]) == ["cat", "kitten"]


def test_import_edit_pairs(tmp_path):
    (tmp_path / "s.png").write_bytes(_png(1))
    (tmp_path / "t.png").write_bytes(_png(2))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"source": "s.png", "target": "t.png",
                                                      "instruction": "make it brighter"}) + "\n")
    R.import_edit_pairs(str(tmp_path / "pairs.jsonl"), str(tmp_path), str(tmp_path / "edit"))
    (r,) = list(R.read_records(str(tmp_path / "edit")))
    assert (r["task"], r["image"], r["image2"], r["instruction"]) == ("edit", _png(1), _png(2), "make it brighter")

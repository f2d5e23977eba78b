"""Dataset manifests: parsing, validation reported all at once, window planning, images."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import unicodedata

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tokens.cache import StoreSpec, create_or_open
from tokens.extract.images import BadImage, load_image
import tokens.extract.manifest as manifest_module
from tokens.extract.manifest import OUTSIDE_FIX, ManifestError, read_dataset

SR = 16000



def other_notes(ds) -> list[str]:
    """The notes besides the one on missing train or test rows, which small test datasets often lack."""
    return [note for note in ds.notes if " rows: `tokens probe` trains on train" not in note]


def wav(path, seconds, sample_rate=8000):
    """A quiet noise recording of the given length (the content does not matter here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).standard_normal(round(seconds * sample_rate)) * 0.01
    sf.write(path, noise.astype("float32"), sample_rate)
    return path


def csv_file(path, text):
    path.write_text(text.lstrip())
    return path


def audio(source, window=10.0, **kw):
    return read_dataset(source, window_seconds=window, sample_rate=SR, modality="audio", **kw)


def test_csv_multilabel(tmp_path):
    for name in ("a.wav", "sub/b.wav", "c.wav"):
        wav(tmp_path / name, 2)
    manifest = csv_file(
        tmp_path / "m.csv",
        """
path,labels,split
a.wav,dog;cat,train
sub/b.wav, cat ,train
c.wav,bird,test
""",
    )
    ds = audio(manifest)
    assert ds.task == "multilabel"
    assert ds.classes == ["bird", "cat", "dog"]
    assert list(ds.splits) == ["train", "test"]
    a, b = ds.splits["train"]
    assert (a.id, a.path, a.labels, a.offset, a.duration) == ("a.wav", tmp_path / "a.wav", [1, 2], 0.0, 2.0)
    assert (b.id, b.labels, b.split) == ("sub/b.wav", [1], "train")
    assert ds.splits["test"][0].labels == [0]


def test_jsonl_multiclass_with_ids_and_spans(tmp_path):
    wav(tmp_path / "long.wav", 30)
    rows = [
        {"path": "long.wav", "label": "speech", "split": "train", "id": "clip1", "start": 5, "end": 12},
        {"path": "long.wav", "label": "music", "split": "valid", "start": "12.5"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    ds = audio(manifest, window=None)
    assert ds.task == "multiclass" and ds.classes == ["music", "speech"]
    (train,) = ds.splits["train"]
    (valid,) = ds.splits["valid"]
    assert (train.id, train.offset, train.duration, train.labels) == ("clip1", 5.0, 7.0, [1])
    assert (valid.id, valid.offset, valid.duration, valid.labels) == ("long.wav@12.5", 12.5, 17.5, [0])


def test_jsonl_labels_may_be_a_list(tmp_path):
    wav(tmp_path / "a.wav", 1)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.wav", "labels": ["x", "y"], "split": "test"}))
    assert audio(tmp_path / "m.jsonl").splits["test"][0].labels == [0, 1]


def test_class_folders(tmp_path):
    wav(tmp_path / "train/dog/1.wav", 1)
    wav(tmp_path / "train/dog/deeper/2.wav", 1)
    wav(tmp_path / "train/cat/3.wav", 1)
    wav(tmp_path / "test/cat/4.wav", 1)
    (tmp_path / "train/dog/.DS_Store").write_text("hidden")
    (tmp_path / "README.md").write_text("a file at the root is not data")
    ds = audio(tmp_path)
    assert ds.task == "multiclass" and ds.classes == ["cat", "dog"]
    assert [(it.id, it.labels) for it in ds.splits["train"]] == [
        ("train/cat/3.wav", [0]),
        ("train/dog/1.wav", [1]),
        ("train/dog/deeper/2.wav", [1]),
    ]
    assert [it.id for it in ds.splits["test"]] == ["test/cat/4.wav"]
    assert ds.notes == []


def test_class_folders_take_the_files_their_decoder_reads(tmp_path):
    """Notes, label lists and pictures kept beside the clips are left out and counted, as torchvision's
    ImageFolder leaves them, rather than made into items that fail; an audio suffix in capitals is audio."""
    wav(tmp_path / "train/dog/1.wav", 1)
    sf.write(tmp_path / "train/dog/2.FLAC", np.zeros(800, np.float32), 8000)
    sf.write(tmp_path / "train/dog/3.sph", np.zeros(800, np.float32), 8000, format="NIST", subtype="PCM_16")
    (tmp_path / "train/dog/notes.txt").write_text("recorded in the park")
    Image.new("RGB", (8, 8)).save(tmp_path / "train/dog/cover.jpg")
    (tmp_path / "train/dog/no-suffix").write_bytes(b"??")
    ds = audio(tmp_path)
    assert [it.id for it in ds.splits["train"]] == ["train/dog/1.wav", "train/dog/2.FLAC", "train/dog/3.sph"]
    assert ds.notes[0] == ("3 files in the class folders are of other kinds than those read here and are left out "
                           "(1 .jpg, 1 suffix-less, 1 .txt; e.g. train/dog/cover.jpg)")
    images = read_dataset(tmp_path, window_seconds=None, sample_rate=None, modality="image")
    assert [it.id for it in images.splits["train"]] == ["train/dog/cover.jpg"]


def test_a_recording_in_two_splits_and_a_class_no_train_item_holds_are_noted(tmp_path):
    """Both are legitimate (one file cut into spans; a class kept for later) but usually mistakes."""
    wav(tmp_path / "long.wav", 4)
    wav(tmp_path / "b.wav", 1)
    ds = audio(csv_file(tmp_path / "m.csv", """
path,labels,split,start,end
long.wav,dog,train,0,2
long.wav,dog;cat,test,2,4
b.wav,bird,valid,,
"""))
    assert ds.notes == [
        "1 recording(s) have items in more than one split (e.g. long.wav in train and test): a probe would be scored "
        "on parts of recordings it was trained on",
        "class(es) bird, cat have no train item: a probe cannot learn them",
    ]


def test_a_dataset_without_test_rows_is_noted_before_extraction(tmp_path):
    """`tokens probe` refuses a store without test items, and a store takes no rows later: say so
    before the extraction rather than after it."""
    wav(tmp_path / "a.wav", 1)
    ds = audio(csv_file(tmp_path / "m.csv", "path,labels,split\na.wav,dog,train\n"))
    assert ds.notes == ["no test rows: `tokens probe` trains on train and scores on test, and refuses a store "
                        "without them; a store takes no rows later, so add them before extracting"]
    ds = audio(csv_file(tmp_path / "m.csv", "path,labels,split\na.wav,dog,test\n"))
    assert "no train rows: `tokens probe`" in ds.notes[-1]


def test_class_names_that_differ_only_in_case_are_noted(tmp_path):
    wav(tmp_path / "a.wav", 1)
    wav(tmp_path / "b.wav", 1)
    ds = audio(csv_file(tmp_path / "m.csv", "path,labels,split\na.wav,Hi;lo,train\nb.wav,hi,test\n"))
    assert ds.classes == ["Hi", "hi", "lo"]
    assert "class names differ only in case, and are different classes: 'Hi' and 'hi'" in ds.notes


def test_an_empty_class_folder_is_noted(tmp_path):
    """A class folder with nothing read in it used to vanish from the classes without a word."""
    wav(tmp_path / "train/dog/1.wav", 1)
    wav(tmp_path / "test/dog/2.wav", 1)
    (tmp_path / "train/fish").mkdir()
    ds = audio(tmp_path)
    assert ds.classes == ["dog"]
    assert "1 class folder(s) hold no file read here, so add no item (train/fish)" in ds.notes


def test_audio_at_the_top_of_a_class_folder_dataset_is_noted(tmp_path):
    """A clip left at the top, in no split or class folder, was left out without a word."""
    wav(tmp_path / "train/dog/1.wav", 1)
    wav(tmp_path / "test/dog/2.wav", 1)
    wav(tmp_path / "stray.wav", 1)
    (tmp_path / "README.txt").write_text("notes")
    ds = audio(tmp_path)
    assert len(ds.splits["train"]) == 1 and len(ds.splits["test"]) == 1
    assert "1 file(s) at the top of the folder, in no split or class folder, are left out (stray.wav)" in ds.notes


def test_audio_rows_given_to_an_image_backbone_are_refused_before_any_decoding(tmp_path):
    wav(tmp_path / "a.wav", 1)
    manifest = csv_file(tmp_path / "m.csv", "path,label,split\na.wav,dog,train\n")
    with pytest.raises(ManifestError, match="line 2: a.wav is audio, and this backbone reads images"):
        read_dataset(manifest, window_seconds=None, sample_rate=None, modality="image")


def test_class_folders_with_no_file_read_here_say_so(tmp_path):
    for name in ("1.m4a", "2.m4a"):
        (tmp_path / "train/dog" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train/dog" / name).write_bytes(b"not read")
    with pytest.raises(ManifestError) as e:
        audio(tmp_path)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("none of the 2 files in the class folders has a suffix read here (.8svx, .aif, .aifc,")
    assert e.value.problems[0].endswith(f"and {len(manifest_module.AUDIO_SUFFIXES) - 12} more), e.g. train/dog/1.m4a")


def test_columns_that_are_not_read_are_named(tmp_path):
    """A typo ('strat') or a kept column is named in a note; one of ours in other case ('Start', 'ID')
    would change the items if read, so it is a problem. A spreadsheet's unnamed index column is not news."""
    wav(tmp_path / "a.wav", 2)
    ds = audio(csv_file(tmp_path / "m.csv", ",path,label,split,strat,notes\n0,a.wav,x,train,1,loud\n"))
    assert other_notes(ds) == ["column(s) 'strat', 'notes' not read: the columns read are path, labels, label, split, id, start, end"]
    assert ds.splits["train"][0].id == "a.wav" and ds.splits["train"][0].offset == 0.0
    assert other_notes(audio(csv_file(tmp_path / "ok.csv", "path,label,split,id,start\na.wav,x,train,c,0.5\n"))) == []
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    images = read_dataset(csv_file(tmp_path / "i.csv", "path,label,split,start\np.png,x,train,1\n"),
                          window_seconds=None, sample_rate=None, modality="image")
    assert other_notes(images) == ["column(s) start not read: spans of time are for audio, and an image is taken whole"]
    with pytest.raises(ManifestError) as e:
        audio(csv_file(tmp_path / "cased.csv", "path,label,split,ID,Start\na.wav,x,train,c,0.5\n"))
    assert e.value.problems == ["column 'ID' is not read: the column is 'id' (lower case)",
                                "column 'Start' is not read: the column is 'start' (lower case)"]


@pytest.mark.parametrize("store", ["tokens.zarr", "train/tokens.zarr", "train/dog/tokens.zarr", "train/dog/tokens.h5"])
def test_a_store_kept_inside_the_class_folders_is_not_part_of_the_dataset(tmp_path, store):
    """Resuming into it must see the dataset the first run saw, not the store's own files as items,
    a split or a class."""
    wav(tmp_path / "train/dog/1.wav", 1)
    wav(tmp_path / "test/dog/2.wav", 1)
    where = tmp_path / store
    if where.suffix == ".zarr":
        (where / "train" / "tokens").mkdir(parents=True)
        (where / "zarr.json").write_text("{}")
    else:
        where.write_bytes(b"\x89HDF\r\n\x1a\n")
    ds = audio(tmp_path, store=where)
    assert ds.classes == ["dog"] and [it.id for it in ds.splits["train"]] == ["train/dog/1.wav"] and other_notes(ds) == []
    try:  # without being told which path is the store, it is data: a bad split, a class, items or skipped files
        unaware = audio(tmp_path)
        seen = [it.id for it in unaware.splits["train"]], other_notes(unaware)
    except ManifestError:
        seen = None
    assert seen != (["train/dog/1.wav"], [])


@pytest.mark.parametrize("fmt, where", [("zarr", "tiny.zarr"), ("zarr", "train/tiny.zarr"), ("zarr", "train/dog/tiny.zarr"),
                                        ("hdf5", "train/tiny.h5"), ("hdf5", "train/dog/tiny")])
def test_other_token_stores_kept_in_the_dataset_are_not_part_of_it(tmp_path, fmt, where):
    """`--store ROOT/tiny.zarr`, then `--store ROOT/full.zarr -b crepe-full`: the second run must see
    the dataset the first saw, not the first store as a split, a class, a stray file or skipped files.
    A store tokens made is left out wherever it lies, whatever its name, without a note."""
    wav(tmp_path / "train/dog/1.wav", 1)
    wav(tmp_path / "test/dog/2.wav", 1)
    first = audio(tmp_path)
    spec = StoreSpec(backbone="b", backbone_config={}, checkpoint_sha256=None, frontend={}, layers=[0], final_norm=False,
                     dtype="float16", grid=(2, 3), dim=4, num_prefix=0, task="multiclass", classes=["dog"],
                     splits={"train": 1, "test": 1}, dataset_fingerprint=first.fingerprint(), shard_size=4)
    create_or_open(tmp_path / where, spec, fmt=fmt).close()
    for store in (tmp_path / "full.zarr", None):
        ds = audio(tmp_path, store=store)
        assert (ds.fingerprint(), other_notes(ds)) == (first.fingerprint(), [])


def test_an_hdf5_file_beside_pictures_is_not_a_picture(tmp_path):
    """Pillow recognises HDF5 with a stub that cannot decode it: an .h5 store or feature file kept
    with the pictures would be an item that can only fail."""
    (tmp_path / "train/red").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train/red/1.png")
    (tmp_path / "train/red/features.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    images = read_dataset(tmp_path, window_seconds=None, sample_rate=None, modality="image")
    assert [item.id for item in images.splits["train"]] == ["train/red/1.png"]
    assert other_notes(images) == ["1 file in the class folders is of another kind than those read here and is left out "
                            "(1 .h5; e.g. train/red/features.h5)"]


def test_a_last_window_of_exactly_the_minimum_is_kept_whatever_the_length(tmp_path):
    """The rule is the same for every length: floating point must not drop 4.1 s's last tenth but keep 2.1 s's."""
    rows = ["path,label,split"]
    for seconds in (2.1, 3.1, 4.1, 5.1, 8.1, 16.1, 4.09):
        wav(tmp_path / f"{seconds}.wav", seconds)
        rows.append(f"{seconds}.wav,x,train")
    ds = audio(csv_file(tmp_path / "m.csv", "\n".join(rows) + "\n"), window=1.0)
    counts = {}
    for item in ds.splits["train"]:
        counts[item.source] = counts.get(item.source, 0) + 1
    assert counts == {"2.1.wav": 3, "3.1.wav": 4, "4.1.wav": 5, "5.1.wav": 6, "8.1.wav": 9, "16.1.wav": 17, "4.09.wav": 4}


@pytest.mark.parametrize("name, content, problem", [
    ("latin1.csv", b"path,labels,split\na.wav,x,train\nb.wav,caf\xe9,train\n", "line 3: byte 0xe9 is not UTF-8 text"),
    ("latin1.jsonl", b'{"path": "a.wav", "labels": "x", "split": "train"}\n{"path": "caf\xe9.wav"}\n', "line 2: byte 0xe9 is not UTF-8 text"),
    ("quote.csv", b'path,labels,split\na.wav,x,train\n"b.wav,x,train\n' + b"c.wav,x,train\n" * 20000,
     "line 3: field larger than field limit"),
    ("bom.csv", b"\xef\xbb\xbfpath,labels,split\na.wav,x,train\nb.wav,caf\xe9,train\n", "line 3: byte 0xe9 is not UTF-8 text"),
    ("short-quote.csv", b'path,labels,split\na.wav,x,train\n"b.wav,x,train\nc.wav,x,train\n', "line 3: file not found: 'b.wav,x,train\\nc.wav"),
    ("capitals.csv", b"Path,Labels,Split\na.wav,x,train\n", "(the columns are 'Path', 'Labels', 'Split')"),
    ("semicolons.csv", b"path;labels;split\na.wav;x;train\n", "(the columns are 'path;labels;split')"),
])
def test_a_manifest_that_cannot_be_read_is_refused_naming_the_line_or_the_columns(tmp_path, name, content, problem):
    wav(tmp_path / "a.wav", 1)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ManifestError) as raised:
        audio(tmp_path / name)
    assert str(tmp_path / name) in str(raised.value) and problem in str(raised.value), raised.value


def test_jsonl_labels_that_are_not_text_are_row_problems(tmp_path):
    """An object, a boolean or a list inside a list would otherwise become a class named after its repr."""
    wav(tmp_path / "a.wav", 1)
    rows = [{"labels": {"a": 1}}, {"labels": True}, {"labels": ["y", ["z"]]}, {"labels": ["y", 3]}, {"labels": "x;y"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": "a.wav", "split": "train", "id": str(i), **row}) + "\n"
                                              for i, row in enumerate(rows)))
    with pytest.raises(ManifestError) as raised:
        audio(tmp_path / "m.jsonl")
    assert raised.value.problems == [
        "line 1: labels {'a': 1} is not class names (text, or a list of text)",
        "line 2: labels True is not class names (text, or a list of text)",
        "line 3: labels ['y', ['z']] is not class names (text, or a list of text)",
    ]
    (tmp_path / "c.jsonl").write_text(json.dumps({"path": "a.wav", "split": "train", "label": ["x"]}) + "\n")
    with pytest.raises(ManifestError, match=re.escape("line 1: label ['x'] is not a class name")):
        audio(tmp_path / "c.jsonl")


def test_a_flat_folder_of_files_says_how_to_lay_it_out(tmp_path):
    for name in ("a.wav", "b.wav"):
        wav(tmp_path / name, 1)
    with pytest.raises(ManifestError, match=re.escape("no split folders, but 2 file(s) at the top (e.g. a.wav): lay the folder out as ROOT/<split>/<class>/<file>")):
        audio(tmp_path)
    (tmp_path / "train").mkdir()  # a split folder, empty: the dataset is empty, not laid out wrong
    with pytest.raises(ManifestError, match="the dataset is empty"):
        audio(tmp_path)


def test_trailing_commas_are_empty_fields_but_a_column_named_twice_or_no_label_at_all_are_problems(tmp_path):
    wav(tmp_path / "a.wav", 1)
    ds = audio(csv_file(tmp_path / "m.csv", "path,labels,split,\na.wav,x,train,\n"))
    assert ds.classes == ["x"] and len(ds.splits["train"]) == 1
    with pytest.raises(ManifestError, match=re.escape("line 1: the header names 'labels' more than once")):
        audio(csv_file(tmp_path / "twice.csv", "path,labels,split,labels\na.wav,x,train,y\n"))
    with pytest.raises(ManifestError, match="no row has a label"):
        audio(csv_file(tmp_path / "none.csv", "path,labels,split\na.wav,,train\n"))


def test_the_store_is_told_apart_through_links_and_dot_dots(tmp_path):
    root = tmp_path / "real"
    wav(root / "train/dog/1.wav", 1)
    (root / "tokens.zarr" / "train").mkdir(parents=True)
    (tmp_path / "link").symlink_to(root)
    for dataset, store in ((tmp_path / "link", root / "tokens.zarr"), (root, root / "train" / ".." / "tokens.zarr"),
                           (root, tmp_path / "link" / "tokens.zarr")):
        assert [it.id for it in audio(dataset, store=store).splits["train"]] == ["train/dog/1.wav"]


def test_class_folder_problems(tmp_path):
    wav(tmp_path / "train/dog/1.wav", 1)
    wav(tmp_path / "tset/dog/2.wav", 1)
    wav(tmp_path / "train/loose.wav", 1)
    with pytest.raises(ManifestError) as e:
        audio(tmp_path)
    assert e.value.problems == [
        "train/loose.wav: file outside a class folder",
        "tset/: not a split folder (use train, valid or test)",
    ]


@pytest.fixture(params=["serial", "worker processes"])
def checking(request, monkeypatch):
    """Check rows in this process, or (as for large datasets) in worker processes, two rows a chunk."""
    if request.param == "worker processes":
        monkeypatch.setattr(manifest_module, "PARALLEL_ROWS", 1)
        monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 2)
    return request.param


def test_every_problem_is_reported_at_once_with_line_numbers(tmp_path, checking):
    data = tmp_path / "data"
    for name in ("ok.wav", "a.wav", "b.wav", "c.wav", "d.wav"):
        wav(data / name, 1)
    wav(tmp_path / "outside.wav", 1)
    (data / "sub").mkdir()
    manifest = csv_file(
        data / "m.csv",
        f"""
path,labels,split,id,start,end
ok.wav,dog,train,x,,
a.wav,dog,tain,,,
b.wav,dog,train,,,
c.wav,dog;wolf,train,,,
d.wav,dog,train,x,,
../outside.wav,dog,train,,,
{tmp_path / "outside.wav"},dog,train,,,
sub/../../outside.wav,dog,train,,,
"a.wav",dog,valid,,3,2
"a.wav",dog,valid,,-1,
gone.wav,dog,test,,,
sub,dog,test,,,
""",
    )
    with pytest.raises(ManifestError) as e:
        audio(manifest, classes=["cat", "dog"])
    outside = f"leads outside the dataset folder {data}{OUTSIDE_FIX}"
    assert e.value.problems == [
        "line 3: unknown split 'tain' (use train, valid or test)",
        "line 5: label(s) not among the store's classes: wolf",
        "line 6: duplicate id 'x' (also line 2)",  # found after every row's own check, listed in its place
        "line 7: path '../outside.wav' " + outside,
        f"line 8: path '{tmp_path / 'outside.wav'}' " + outside,
        "line 9: path 'sub/../../outside.wav' " + outside,
        "line 10: start 3 is not before end 2",
        "line 11: start -1 is not a finite, non-negative number of seconds",
        "line 12: file not found: gone.wav",
        "line 13: sub is a folder, not a file",
    ]
    assert "line 12: file not found: gone.wav" in str(e.value)


def test_linked_audio_is_taken_wherever_the_link_leads(tmp_path, checking):
    """Audio linked from shared storage is a common layout: a link inside the dataset folder may lead
    anywhere, and the stored path is the row's own. Only a path that climbs out as written ('..', an
    absolute path elsewhere) is refused, since items are recorded by their path inside the folder."""
    disk, data = tmp_path / "disk", tmp_path / "data"
    wav(disk / "clip.wav", 1)
    data.mkdir()
    (data / "audio").symlink_to(disk)
    (data / "one.wav").symlink_to(disk / "clip.wav")
    manifest = csv_file(data / "m.csv", "path,label,split\naudio/clip.wav,x,train\none.wav,x,test\n")
    items = [item for items in audio(manifest).splits.values() for item in items]
    assert [(item.source, item.path) for item in items] == [
        ("audio/clip.wav", data / "audio" / "clip.wav"), ("one.wav", data / "one.wav")]
    csv_file(manifest, "path,label,split\naudio/../../disk/clip.wav,x,train\n")
    with pytest.raises(ManifestError) as e:
        audio(manifest)
    assert e.value.problems == [f"line 2: path 'audio/../../disk/clip.wav' leads outside the dataset folder {data}{OUTSIDE_FIX}"]


def test_an_absolute_path_through_a_linked_dataset_folder_is_inside_it(tmp_path, checking, monkeypatch):
    """On clusters /scratch or /home is often a link (and /tmp on macOS): an absolute path written
    through the folder as the user knows it is inside the dataset, as the same path through its
    real location is, and is recorded relative to it; one elsewhere is still refused."""
    real, linked = tmp_path / "real", tmp_path / "linked"
    wav(real / "audio" / "a.wav", 1)
    wav(real / "audio" / "b.wav", 1)
    wav(tmp_path / "elsewhere.wav", 1)
    linked.symlink_to(real)
    rows = [linked / "audio" / "a.wav", real / "audio" / "b.wav"]
    manifest = csv_file(real / "m.csv", "path,label,split\n" + "".join(f"{p},x,{s}\n" for p, s in zip(rows, ["train", "test"])))
    items = [item for items in audio(linked / "m.csv").splits.values() for item in items]
    assert [(item.source, item.path) for item in items] == [("audio/a.wav", real / "audio" / "a.wav"),
                                                            ("audio/b.wav", real / "audio" / "b.wav")]
    monkeypatch.chdir(linked)  # the manifest named from inside the link: the working folder is the real one
    assert [item.source for items in audio(Path("m.csv")).splits.values() for item in items] == ["audio/a.wav", "audio/b.wav"]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "up").symlink_to(real / "audio")
    assert len(audio(tmp_path / "x" / "up" / ".." / "m.csv").splits) == 2  # '..' after a link: the link's parent, as the kernel goes
    csv_file(manifest, f"path,label,split\n{tmp_path / 'elsewhere.wav'},x,train\n")
    with pytest.raises(ManifestError) as e:
        audio(linked / "m.csv")
    assert e.value.problems == [f"line 2: path '{tmp_path / 'elsewhere.wav'}' leads outside the dataset folder {real}{OUTSIDE_FIX}"]


def test_class_folders_follow_linked_folders_and_files(tmp_path):
    """A class folder, a folder inside one or a single file may be a link to shared storage: each is
    taken under its name in the dataset. A link back up is not gone round, and a link that leads
    nowhere (storage not mounted) is a missing file, not an item quietly lost."""
    disk, root = tmp_path / "disk", tmp_path / "data"
    wav(disk / "dogs/1.wav", 1)
    wav(disk / "more/2.wav", 1)
    wav(disk / "3.wav", 1)
    (disk / "dogs/more").symlink_to(disk / "more")
    (disk / "dogs/loop").symlink_to(disk / "dogs")
    (root / "train").mkdir(parents=True)
    (root / "train/dog").symlink_to(disk / "dogs")
    wav(root / "train/cat/own.wav", 1)
    (root / "train/cat/3.wav").symlink_to(disk / "3.wav")
    (root / "train/cat/gone.wav").symlink_to(disk / "unmounted.wav")
    with pytest.raises(ManifestError) as e:
        audio(root)
    assert e.value.problems == ["train/cat/gone.wav: train/cat/gone.wav is a link that leads nowhere (or in a loop)"]
    (root / "train/cat/gone.wav").unlink()
    ds = audio(root)
    assert ds.classes == ["cat", "dog"] and other_notes(ds) == []
    assert [(item.id, item.path) for item in ds.splits["train"]] == [
        ("train/cat/3.wav", root / "train/cat/3.wav"), ("train/cat/own.wav", root / "train/cat/own.wav"),
        ("train/dog/1.wav", root / "train/dog/1.wav"), ("train/dog/more/2.wav", root / "train/dog/more/2.wav")]


def test_a_pipe_or_a_looping_link_in_a_manifest_is_named_as_what_it_is(tmp_path, checking):
    """Both exist, and were called 'file not found'."""
    wav(tmp_path / "a.wav", 0.5)
    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    manifest = csv_file(tmp_path / "m.csv", "path,labels,split\na.wav,dog,train\npipe.wav,dog,train\nloop.wav,dog,test\n")
    with pytest.raises(ManifestError) as e:
        audio(manifest)
    assert e.value.problems == ["line 3: pipe.wav is not a regular file (a pipe or a device)",
                                "line 4: loop.wav is a link that leads nowhere (or in a loop)"]


def test_the_root_itself_and_a_nul_character_are_row_problems(tmp_path):
    """Neither stops the check: '.' is not a file, a NUL cannot be in a file name, nor in an HDF5
    string (an id with one was stored in zarr but stopped an HDF5 extraction mid-run)."""
    wav(tmp_path / "a.wav", 0.5)
    (tmp_path / "m.jsonl").write_text(
        '{"path": ".", "label": "x", "split": "train"}\n{"path": "a\\u0000b.wav", "label": "x", "split": "train"}\n'
        '{"path": "a.wav", "label": "x", "split": "train", "id": "a\\u0000b"}\n')
    with pytest.raises(ManifestError) as e:
        audio(tmp_path / "m.jsonl")
    assert e.value.problems == ["line 1: . is a folder, not a file", "line 2: path 'a\\x00b.wav' contains a NUL character",
                                "line 3: id 'a\\x00b' contains a NUL character"]


def test_duplicate_paths_are_duplicate_ids(tmp_path):
    wav(tmp_path / "a.wav", 1)
    manifest = csv_file(tmp_path / "m.csv", "path,label,split\na.wav,x,train\na.wav,y,test\n")
    with pytest.raises(ManifestError, match="line 3: duplicate id 'a.wav' \\(also line 2\\): a file listed twice, or rows "
                                            "of one file \\(cut by start/end\\) that need an id column to tell them apart"):
        audio(manifest)


def test_absolute_path_inside_the_root_is_fine(tmp_path):
    wav(tmp_path / "a.wav", 1)
    manifest = csv_file(tmp_path / "m.csv", f"path,label,split\n{tmp_path / 'a.wav'},x,train\n")
    assert audio(manifest).splits["train"][0].id == "a.wav"


def test_a_name_in_another_unicode_normalisation_is_said_to_be_one(tmp_path, checking):
    """'café' typed in a manifest (NFC) and as macOS writes it on disk (NFD) print alike: "file not
    found" alone would send the user comparing names that look the same. Files and folders, both ways."""
    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    wav(tmp_path / f"{nfd}.wav", 1)
    wav(tmp_path / nfc / "b.wav", 1)
    manifest = csv_file(tmp_path / "m.csv", f"path,label,split\n{nfc}.wav,x,train\n{nfd}/b.wav,x,train\ngone.wav,x,train\n")
    with pytest.raises(ManifestError) as e:
        audio(manifest)
    other = ", but a file of this name in another Unicode normalisation exists (names copied from macOS are often NFD): rename it or the row"
    assert e.value.problems == [f"line 2: file not found: {nfc}.wav" + other, f"line 3: file not found: {nfd}/b.wav" + other,
                                "line 4: file not found: gone.wav"]


def test_quoted_newline_keeps_line_numbers_true(tmp_path):
    manifest = csv_file(tmp_path / "m.csv", 'path,label,split\n"a\nb.wav",x,train\nc.wav,x,train\n')
    with pytest.raises(ManifestError) as e:
        audio(manifest)
    assert e.value.problems == ["line 2: file not found: 'a\\nb.wav'... spans several lines: a quote opened on this line and never closed?",
                                "line 4: file not found: c.wav"]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("path,labels,split\n", "no rows: the dataset is empty"),
        ("", "no rows: the dataset is empty"),
        ("path,kind\na.wav,x\n", "missing required column(s): 'split', 'labels' (multi-label) or 'label' (multi-class)"),
        ("path,label,labels,split\na.wav,x,x,train\n", "both 'labels' and 'label' columns"),
        ("path,label,split\na.wav,x,train,extra\n", "line 2: 4 fields but the header has 3"),
    ],
)
def test_file_level_problems(tmp_path, text, problem):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=problem.replace("(", "\\(").replace(")", "\\)")):
        audio(manifest)


def test_a_short_row_names_its_field_count_unless_it_leaves_off_only_optional_columns(tmp_path):
    """As a long row does: "unknown split ''" would send the user looking for a split never written."""
    wav(tmp_path / "a.wav", 1)
    with pytest.raises(ManifestError) as e:
        audio(csv_file(tmp_path / "m.csv", "path,labels,split\na.wav,x\na.wav,x,train,y\n"))
    assert e.value.problems == ["line 2: 2 fields but the header has 3", "line 3: 4 fields but the header has 3"]
    ds = audio(csv_file(tmp_path / "ok.csv", "path,label,split,id,start,end\na.wav,x,train\n"))
    assert [(item.id, item.offset) for item in ds.splits["train"]] == [("a.wav", 0.0)]


def test_bad_jsonl_lines(tmp_path):
    wav(tmp_path / "a.wav", 1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.wav", "label": "x", "split": "train"}\n{oops\n[1, 2]\n')
    with pytest.raises(ManifestError) as e:
        audio(manifest)
    assert [p.split(":")[0] for p in e.value.problems] == ["line 2", "line 3"]


def test_long_recording_is_cut_into_windows(tmp_path, checking):
    wav(tmp_path / "long.wav", 25)
    wav(tmp_path / "tail.wav", 20.5)  # a 0.5 s tail is under 10 % of a window: dropped
    wav(tmp_path / "short.wav", 3)  # shorter than a window: kept whole
    manifest = csv_file(
        tmp_path / "m.csv",
        "path,label,split,id,start,end\nlong.wav,x,train,,,\ntail.wav,x,train,,,\nshort.wav,x,train,,,\n"
        "long.wav,x,test,seg,5,24\n",
    )
    ds = audio(manifest)
    assert [(it.id, it.offset, it.duration) for it in ds.splits["train"]] == [
        ("long.wav", 0.0, 10.0),
        ("long.wav@10", 10.0, 10.0),
        ("long.wav@20", 20.0, 5.0),
        ("tail.wav", 0.0, 10.0),
        ("tail.wav@10", 10.0, 10.0),
        ("short.wav", 0.0, 3.0),
    ]
    assert [(it.id, it.offset, it.duration) for it in ds.splits["test"]] == [
        ("seg", 5.0, 10.0),
        ("seg@15", 15.0, 9.0),
    ]


def test_end_past_the_file_is_clipped_to_the_file_with_a_note(tmp_path, checking):
    """Clipped, since annotations often round up, but said: ends past the files are also what a
    manifest in milliseconds, or files other than those annotated, look like. An end at the file's
    last sample is no note."""
    wav(tmp_path / "a.wav", 9.5)
    manifest = csv_file(tmp_path / "m.csv", "path,label,split,id,start,end\na.wav,x,train,c,0,10.5\n"
                        "a.wav,x,train,d,1,9.5\na.wav,x,train,e,2,12\n")
    ds = audio(manifest, window=None)
    assert [(it.offset, it.duration) for it in ds.splits["train"]] == [(0.0, 9.5), (1.0, 8.5), (2.0, 7.5)]
    assert other_notes(ds) == ["2 row(s) end past the end of their file and are cut there (e.g. line 2: end 10.5 is past the end "
                        "of a.wav (9.5 s))"]
    assert other_notes(audio(csv_file(manifest, "path,label,split,start,end\na.wav,x,train,0,9.5\n"))) == []


def test_start_past_the_end_of_the_file_is_a_manifest_problem(tmp_path, checking):
    """Found from the header with the other row problems, before any work, rather than as a failed
    item at extraction; an end past the file is still clipped, and an empty recording with no start
    is still an item (its failure is the file's, recorded then)."""
    wav(tmp_path / "a.wav", 2)
    sf.write(tmp_path / "empty.wav", np.zeros(0, "float32"), 8000)
    manifest = csv_file(
        tmp_path / "m.csv",
        """
path,label,split,id,start,end
a.wav,x,train,ok,1.5,9
a.wav,x,train,late,5,
a.wav,x,tain,typo,,
a.wav,x,train,edge,2,3
empty.wav,x,train,empty,,
""",
    )
    with pytest.raises(ManifestError) as e:
        audio(manifest)
    assert e.value.problems == [
        "line 3: start 5 is not before the end of a.wav (2 s)",
        "line 4: unknown split 'tain' (use train, valid or test)",
        "line 5: start 2 is not before the end of a.wav (2 s)",
    ]
    csv_file(manifest, "path,label,split,id,start,end\na.wav,x,train,ok,1.5,9\nempty.wav,x,train,empty,,\n")
    items = audio(manifest).splits["train"]
    assert [(it.id, it.offset, it.duration) for it in items] == [("ok", 1.5, 0.5), ("empty", 0.0, 0.0)]


def test_undecodable_audio_stays_an_item(tmp_path):
    (tmp_path / "text.wav").write_text("not audio")
    (tmp_path / "empty.wav").write_bytes(b"")
    manifest = csv_file(tmp_path / "m.csv", "path,label,split,end\ntext.wav,x,train,\nempty.wav,x,train,30\n")
    items = audio(manifest).splits["train"]
    assert [(it.id, it.offset, it.duration) for it in items] == [("text.wav", 0.0, None), ("empty.wav", 0.0, 30.0)]


def test_classes_given_keep_their_order(tmp_path):
    wav(tmp_path / "a.wav", 1)
    manifest = csv_file(tmp_path / "m.csv", "path,labels,split\na.wav,b;a,train\n")
    ds = audio(manifest, classes=["z", "b", "a"])
    assert ds.classes == ["z", "b", "a"] and ds.splits["train"][0].labels == [1, 2]


def test_fingerprint_is_stable_and_sees_what_matters(tmp_path):
    wav(tmp_path / "a.wav", 25)
    manifest = csv_file(tmp_path / "m.csv", "path,labels,split\na.wav,x,train\n")
    first = audio(manifest).fingerprint()
    assert len(first) == 64 and first == audio(manifest).fingerprint()
    assert audio(manifest, window=5.0).fingerprint() != first
    assert audio(manifest, classes=["x", "y"]).fingerprint() != first
    csv_file(manifest, "path,labels,split\na.wav,x,test\n")
    assert audio(manifest).fingerprint() != first


def test_fingerprint_does_not_depend_on_where_the_dataset_lives(tmp_path):
    prints = []
    for folder in ("one", "two"):
        wav(tmp_path / folder / "a.wav", 3)
        prints.append(audio(csv_file(tmp_path / folder / "m.csv", "path,label,split\na.wav,x,train\n")).fingerprint())
    assert prints[0] == prints[1]


def test_images_are_one_item_per_row(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    manifest = csv_file(tmp_path / "m.csv", "path,label,split\na.png,red,train\n")
    ds = read_dataset(manifest, window_seconds=None, sample_rate=None, modality="image")
    ((item,),) = ds.splits.values()
    assert (item.id, item.offset, item.duration, ds.sample_rate) == ("a.png", 0.0, None, None)
    assert load_image(item.path).getpixel((0, 0)) == (255, 0, 0)


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (4, 4), 128).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (128, 128, 128)


def test_an_image_past_pillows_bomb_threshold_is_decoded_with_a_warning_that_names_it(tmp_path, monkeypatch):
    """Pillow's own warning names no file (in a dataset of millions, which one?); ours does, in its
    place (a process of its own: pytest resets the warning filters of the modules it imports). Twice
    the threshold is Pillow's error, recorded against the item."""
    import subprocess
    import sys

    from PIL import Image

    from tokens.extract.images import BadImage

    Image.new("RGB", (20, 10), (0, 128, 255)).save(tmp_path / "large.png")
    script = ("import sys; from PIL import Image; from tokens.extract.images import load_image; "
              "Image.MAX_IMAGE_PIXELS = 150; print(load_image(sys.argv[1]).getpixel((3, 3)))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "large.png")], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "(0, 128, 255)\n", done.stderr
    assert f"{tmp_path / 'large.png'}: 20x10 = 0 Mpx, past Pillow's decompression-bomb threshold of 0 Mpx" in done.stderr
    assert "DOS attack" not in done.stderr and done.stderr.count("Warning") == 1, done.stderr
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90)
    with pytest.raises(BadImage, match="exceeds limit of 180 pixels"):
        load_image(tmp_path / "large.png")


def grey_rgb(path):
    """The loaded image as an (H, W, 3) array whose three channels must be equal."""
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8 and (rgb == rgb[..., :1]).all()
    return rgb[..., 0]


# 16-bit levels from 0 in steps of 16, and full scale in the last pixel.
LEVELS = (np.arange(64 * 64) * 16).astype(np.uint16).reshape(64, 64)
LEVELS[-1, -1] = 65535


@pytest.mark.parametrize("mode, file", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif")])
def test_16_bit_images_are_rescaled_not_clipped(tmp_path, mode, file):
    """convert("RGB") alone clips 16-bit levels to 255: 99.6 % of this gradient would be white."""
    if mode == "I":
        image = Image.fromarray(LEVELS.astype(np.int32))
    else:
        image = Image.frombytes(mode, (64, 64), LEVELS.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    image.save(tmp_path / f"deep.{file}")
    with Image.open(tmp_path / f"deep.{file}") as saved:
        assert saved.mode == mode
    want = (LEVELS.astype(np.int64) * 255 + 65535 // 2) // 65535  # nearest 8-bit level, in integers
    np.testing.assert_array_equal(grey_rgb(tmp_path / f"deep.{file}"), want)
    assert want[-1, -1] == 255 and want[0, 0] == 0


def test_float_images_in_0_to_1_are_scaled_to_255(tmp_path):
    """convert("RGB") alone maps float values in [0, 1] to 0 or 1: the image would be black."""
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as saved:
        assert saved.mode == "F"
    want = np.floor(values.astype(np.float64) * 255 + 0.5)
    np.testing.assert_array_equal(grey_rgb(tmp_path / "float.tif"), want)


@pytest.mark.parametrize(
    "pixels, reason",
    [
        (np.full((8, 8), 2.5, np.float32), r"float image with values in \[2.5, 2.5\], outside \[0, 1\]: scale it to"),
        (np.full((8, 8), -0.5, np.float32), r"outside \[0, 1\]"),
        (np.array([[0.5, np.nan]], np.float32), "float image with NaN or infinite values"),
        (np.array([[0, 70000]], np.int32), r"integer image with values in \[0, 70000\], outside the 16-bit range"),
        (np.array([[-3, 100]], np.int32), "outside the 16-bit range"),
    ],
)
def test_images_beyond_their_full_scale_are_bad_items(tmp_path, pixels, reason):
    """What such values mean is not in the file: the item is recorded as bad rather than guessed."""
    Image.fromarray(pixels).save(tmp_path / "odd.tif")
    with pytest.raises(BadImage, match=reason) as e:
        load_image(tmp_path / "odd.tif")
    assert "save it as 8- or 16-bit integers" in e.value.reason


def test_other_modes_convert_as_pillow_does(tmp_path):
    """Only 16-bit and float images are rescaled; every other mode is Pillow's own conversion."""
    noise = Image.effect_noise((32, 32), 60)
    images = {
        "grey.png": noise,
        "alpha.png": Image.merge("RGBA", [noise, noise.rotate(90), noise.rotate(180), noise]),
        "cmyk.jpg": Image.merge("CMYK", [noise, noise.rotate(90), noise.rotate(180), noise.rotate(270)]),
        "palette.png": noise.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE),
        "bits.png": noise.convert("1"),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    noise.save(tmp_path / "moving.gif", save_all=True, append_images=[noise.rotate(90)])
    for name in [*images, "moving.gif"]:
        with Image.open(tmp_path / name) as image:
            want = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / name)), want, err_msg=name)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_corrupt_images_raise_bad_image(tmp_path, damage):
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    bad = tmp_path / "bad.jpg"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(data[:200] + b"\x00" * 500)
    elif damage == "empty":
        bad.write_bytes(b"")
    with pytest.raises(BadImage) as e:
        load_image(bad)
    assert e.value.reason == "empty file (0 bytes)" if damage == "empty" else e.value.reason.startswith("cannot decode image: ")


def test_multilabel_row_without_labels_is_a_negative_clip_but_multiclass_needs_one(tmp_path):
    wav(tmp_path / "a.wav", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,labels,split,id\na.wav,,train,neg\na.wav,dog,test,pos\n")
    dataset = audio(manifest)
    assert [it.labels for it in dataset.splits["train"]] == [[]]
    manifest.write_text("path,label,split\na.wav,,train\n")
    with pytest.raises(ManifestError, match="line 2: empty label"):
        audio(manifest)


def test_a_script_without_a_main_guard_checks_in_worker_processes_once(tmp_path):
    """The check's worker processes must not re-run the caller's script, as spawn and forkserver
    children do with a script that has no `if __name__ == "__main__":` guard."""
    for i in range(4):
        wav(tmp_path / f"{i}.wav", 1)
    csv_file(tmp_path / "m.csv", "path,label,split\n" + "".join(f"{i}.wav,dog,train\n" for i in range(4)))
    script = tmp_path / "script.py"
    script.write_text(
        "import tokens.extract.manifest as m\n"
        "m.PARALLEL_ROWS, m.CHUNK_ROWS = 1, 1\n"
        f"data = m.read_dataset({str(tmp_path / 'm.csv')!r}, window_seconds=10.0, sample_rate=16000, modality='audio')\n"
        "print('checked', len(data.splits['train']))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["checked 4"], done.stdout


def test_ctrl_c_while_worker_processes_check_rows_stops_at_once_and_quietly(tmp_path):
    """Ctrl-C reaches every process of the terminal's group. The checking processes leave it to the
    parent, which drops the chunks not started. Before, a pool broken mid-task raced the parent's
    stop and hung, here in one run of three."""
    wav(tmp_path / "a.wav", 0.1)
    (tmp_path / "m.csv").write_text("path,label,split,id\n" + "".join(f"a.wav,x,train,{i}\n" for i in range(50_000)))
    script = textwrap.dedent(f"""
        import sys
        from tokens.extract import manifest
        manifest.usable_cores = lambda: 4
        print("checking", flush=True)
        while True:
            manifest.read_dataset({str(tmp_path / "m.csv")!r}, window_seconds=1.0, sample_rate=8000, modality="audio")
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    assert child.stdout.readline() == "checking\n"
    time.sleep(3)  # inside a check: each takes seconds
    os.killpg(child.pid, signal.SIGINT)
    try:
        _, stderr = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        raise AssertionError("still running a minute after Ctrl-C")
    assert stderr.count("Traceback") == 1 and stderr.rstrip().endswith("KeyboardInterrupt"), stderr


SLOW_CHECK = """
    import sys, time
    from tokens.extract import manifest
    manifest.usable_cores = lambda: 2
    check = manifest._check_records

    def slow(*args):  # in the checking processes: a chunk of rows on a slow file system
        time.sleep(8)
        return check(*args)

    manifest._check_records = slow
    print("checking", flush=True)
    manifest.read_dataset(sys.argv[1], window_seconds=1.0, sample_rate=8000, modality="audio")
"""


def _group(pid: int) -> list[str]:
    """The live processes of a process group (ps), zombies left out."""
    found = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pid)], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "Z" not in line.split()[-1]]


def test_a_second_ctrl_c_or_a_killed_parent_leaves_no_checking_process_behind(tmp_path):
    """The checking processes ignore Ctrl-C; the parent waits for the chunks in hand, and a second
    Ctrl-C during that wait left it joining them forever. A parent killed outright (the OOM killer)
    left them waiting on its queue forever."""
    wav(tmp_path / "a.wav", 0.1)
    (tmp_path / "m.csv").write_text("path,label,split,id\n" + "".join(f"a.wav,x,train,{i}\n" for i in range(20_000)))
    for how in ("two Ctrl-Cs", "SIGKILL"):
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_CHECK), str(tmp_path / "m.csv")], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert child.stdout.readline() == "checking\n"
        for _ in range(60):  # until the checking processes are in their first chunk (8 s)
            if len(_group(child.pid)) >= 3:
                break
            time.sleep(0.5)
        time.sleep(1)
        assert len(_group(child.pid)) >= 3
        if how == "SIGKILL":
            child.kill()
            child.wait()
        else:
            os.killpg(child.pid, signal.SIGINT)
            time.sleep(0.5)
            os.killpg(child.pid, signal.SIGINT)
        for _ in range(30):  # the chunks in hand end within 8 s; orphans watch their parent each second
            if not _group(child.pid):
                break
            time.sleep(1)
        left = _group(child.pid)
        if left:
            os.killpg(child.pid, signal.SIGKILL)
        assert not left, f"{how}: {left}"
        if how != "SIGKILL":
            assert child.wait() != 0 and "checking" not in child.stderr.read()


def test_a_long_list_of_problems_shows_the_first_and_counts_the_rest_by_kind(tmp_path):
    """A wrong split name on every row of a large manifest printed one line per row, its header
    scrolled away: the message lists the first 50 and counts the rest by kind, while the error still
    holds every problem; a split name other tools use says which of ours it stands for."""
    wav(tmp_path / "a.wav", 1)
    rows = ["a.wav,dog,val" for _ in range(300)] + ["missing.wav,dog,train", "a.wav,dog,Test"]
    rows += [f"gone-{i}.wav,dog,train" for i in range(3)]  # each names its own file: counted as one kind
    manifest = csv_file(tmp_path / "m.csv", "path,labels,split,id\n" + "\n".join(f"{r},{i}" for i, r in enumerate(rows)) + "\n")
    with pytest.raises(ManifestError) as refused:
        audio(manifest)
    message = str(refused.value)
    assert len(refused.value.problems) == 305 and message.startswith(f"{manifest}: 305 problem(s); fix them and run again:\n")
    assert "  line 2: unknown split 'val' (use train, valid or test; valid for this one?)\n" in message
    assert message.count("unknown split 'val'") == 50  # listed; then counted with their kind's values left out
    assert "\n  ... and 255 more, of which:\n    250 x unknown split '…' (use train, valid or test; valid for this one?)\n" \
           "    4 x file not found\n    1 x unknown split '…' (use train, valid or test; test for this one?)" in message
    assert len(message.splitlines()) == 1 + 50 + 4


def test_a_split_folder_of_another_name_says_which_of_ours_it_stands_for(tmp_path):
    wav(tmp_path / "train" / "dog" / "a.wav", 1)
    wav(tmp_path / "val" / "dog" / "b.wav", 1)
    with pytest.raises(ManifestError, match=r"val/: not a split folder \(use train, valid or test; rename it valid/\?\)"):
        audio(tmp_path)


def test_multi_class_labels_holding_semicolons_are_noted(tmp_path):
    """In a `label` column, 'dog;cat' is one class of its own: said, with the column that makes it two."""
    for name in ("a.wav", "b.wav", "c.wav"):
        wav(tmp_path / name, 1)
    ds = audio(csv_file(tmp_path / "m.csv", "path,label,split\na.wav,dog;cat,train\nb.wav,dog,train\nc.wav,cat,train\n"))
    assert ds.task == "multiclass" and ds.classes == ["cat", "dog", "dog;cat"]
    assert other_notes(ds) == ["class names hold ';' ('dog;cat'): the label column takes one class per row, so each is a class "
                               "of its own; for several classes per row, name the column labels (multi-label)"]
    assert not other_notes(audio(csv_file(tmp_path / "l.csv", "path,labels,split\na.wav,dog;cat,train\nc.wav,cat,train\n")))


def test_a_folder_holding_a_manifest_says_to_give_the_manifest(tmp_path):
    """`tokens extract data` for data/manifest.csv beside data/audio/ said only 'audio/: not a split folder'."""
    wav(tmp_path / "audio" / "a.wav", 1)
    csv_file(tmp_path / "manifest.csv", "path,label,split\naudio/a.wav,dog,train\n")
    with pytest.raises(ManifestError) as refused:
        audio(tmp_path)
    assert refused.value.problems[0] == (f"no split folders, but a manifest at the top (manifest.csv): to read it, give the file "
                                         f"({tmp_path / 'manifest.csv'}) rather than its folder")

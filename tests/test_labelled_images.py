"""runtime.labelled_images: the one "good/ is 0, every other visible sub-folder a defect type" listing,
checked against a brute-force listing written here with os.listdir (not the runtime's helpers)."""

import os
import random
from pathlib import Path

import pytest

from mrkd.runtime.images import IMAGE_EXTENSIONS
from mrkd.runtime.labelled_images import DEFECT_LABEL, GOOD_LABEL, labelled_images


def brute_force(test_dir: Path):
    """{sub-folder name: (images, other files)} for every visible sub-folder: a name not starting with
    '.', a folder (through a link too); in it, the visible regular files directly there, split by
    extension (any case), each list sorted."""
    listing = {}
    for name in os.listdir(test_dir):
        folder = test_dir / name
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        files = [folder / f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(folder / f)]
        images = sorted(p for p in files if os.path.splitext(p.name)[1].lower() in IMAGE_EXTENSIONS)
        listing[name] = (images, sorted(set(files) - set(images)))
    return listing


def assert_matches_brute_force(test_dir: Path):
    split = labelled_images(test_dir)
    expected = brute_force(test_dir)
    names = sorted(expected)
    assert [sub.name for sub in split.sub_folders] == names
    for sub in split.sub_folders:
        assert sub.folder == test_dir / sub.name
        assert (list(sub.images), list(sub.others)) == expected[sub.name], sub.name
        assert sub.label == (GOOD_LABEL if sub.name == "good" else DEFECT_LABEL)
    assert list(split.good) == (expected["good"][0] if "good" in expected else [])
    assert [sub.name for sub in split.defect_types] == [n for n in names if n != "good"]
    every_defect = [p for n in names if n != "good" for p in expected[n][0]]
    assert list(split.defects) == every_defect == sorted(every_defect)
    return split


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_hostile_test_folder_is_labelled_as_the_brute_force_listing_says(tmp_path):
    test = tmp_path / "test"
    for name in ("b.png", "a.PNG", "notes.txt", ".hidden.png", "nested/deep.png"):
        write(test / "good" / name)
    for name in ("2.png", "10.jpg", "phone.gif", "sub/x.png", ".DS_Store"):
        write(test / "crack" / name)
    write(test / "Good" / "1.png")                 # another case: a defect type, not good parts
    (test / "empty").mkdir()                       # a defect type without images: listed, adds nothing
    write(test / "only_notes" / "readme.md")
    write(test / ".thumbs" / "t.png")              # hidden: no defect type
    write(test / "stray.png")                      # a file beside the folders: no defect type
    (test / "linked").symlink_to(test / "crack", target_is_directory=True)
    split = assert_matches_brute_force(test)
    assert [p.name for p in split.good] == ["a.PNG", "b.png"]
    assert [sub.name for sub in split.defect_types] == ["Good", "crack", "empty", "linked", "only_notes"]
    assert [p.name for p in split.defect_types[1].images] == ["10.jpg", "2.png"]
    assert [p.name for p in split.defect_types[1].others] == ["phone.gif"]
    assert [sub.name for sub in split.sub_folders] == ["Good", "crack", "empty", "good", "linked", "only_notes"]


def test_a_file_named_good_is_no_good_folder(tmp_path):
    test = tmp_path / "test"
    write(test / "good", b"a file, not a folder")
    write(test / "hole" / "0.png")
    split = assert_matches_brute_force(test)
    assert split.good_folder is None and split.good == ()
    assert [p.name for p in split.defects] == ["0.png"]


def test_a_missing_test_folder_is_an_error_each_reader_words_itself(tmp_path):
    with pytest.raises(FileNotFoundError):
        labelled_images(tmp_path / "nothing")
    write(tmp_path / "afile")
    with pytest.raises(NotADirectoryError):
        labelled_images(tmp_path / "afile")


@pytest.mark.parametrize("seed", range(6))
def test_random_test_folders_match_the_brute_force_listing(tmp_path, seed):
    rng = random.Random(seed)
    test = tmp_path / "test"
    test.mkdir()
    folders = rng.sample(["good", "Good", "crack", ".thumbs", "hole", "zz", "a b", "émail"], k=rng.randint(1, 6))
    for folder in folders:
        if folder == "good" and rng.random() < 0.2:
            write(test / folder)                   # now and then a file named good
            continue
        (test / folder).mkdir()
        for _ in range(rng.randint(0, 5)):
            stem = rng.choice(["0", "1", "10", ".h", "x y", "Z"])
            ext = rng.choice([".png", ".JPG", ".tiff", ".webp", ".gif", ".txt", ""])
            nested = rng.choice(["", "", "sub/", ".git/"])
            write(test / folder / f"{nested}{stem}{ext}")
    assert_matches_brute_force(test)

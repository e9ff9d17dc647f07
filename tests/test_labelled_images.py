"""runtime.labelled_images: the one "good/ is 0, every other visible sub-folder a defect type" listing,
checked against a brute-force listing written here with os.listdir (not the runtime's helpers)."""

import os
import random
from pathlib import Path

import pytest

from mrkd.runtime.images import IMAGE_EXTENSIONS
from mrkd.runtime.labelled_images import DEFECT_LABEL, GOOD_LABEL, labelled_images, misnamed_good_text


def brute_force(test_dir: Path):
    """{sub-folder name: (images, other files, nested images)} for every visible sub-folder: a name not
    starting with '.', a folder (through a link too); in it, the visible regular files directly there,
    split by extension (any case), and the visible images in its visible folders below (links to folders
    followed, a folder already seen under another path, e.g. a link back up, not entered again), each
    list sorted."""
    listing = {}
    for name in os.listdir(test_dir):
        folder = test_dir / name
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        files = [folder / f for f in os.listdir(folder) if not f.startswith(".") and os.path.isfile(folder / f)]
        images = sorted(p for p in files if is_image(p.name))
        nested, seen = [], set()
        for below, dirs, names in os.walk(folder, followlinks=True):
            if os.stat(below).st_ino in seen:      # (one file system here: the inode names the folder)
                dirs[:] = []
                continue
            seen.add(os.stat(below).st_ino)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if Path(below) != folder:
                nested += [Path(below) / f for f in names if not f.startswith(".") and is_image(f)
                           and os.path.isfile(Path(below) / f)]
        listing[name] = (images, sorted(set(files) - set(images)), sorted(nested))
    return listing


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def assert_matches_brute_force(test_dir: Path):
    split = labelled_images(test_dir)
    expected = brute_force(test_dir)
    names = sorted(expected)
    assert [sub.name for sub in split.sub_folders] == names
    for sub in split.sub_folders:
        assert sub.folder == test_dir / sub.name
        assert (list(sub.images), list(sub.others), list(sub.nested_images)) == expected[sub.name], sub.name
        assert sub.label == (GOOD_LABEL if sub.name == "good" else DEFECT_LABEL)
    assert list(split.good) == (expected["good"][0] if "good" in expected else [])
    assert [sub.name for sub in split.misnamed_good] == [n for n in names if n.lower() == "good" and n != "good"]
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
    write(tmp_path / "batch2" / "y.png")
    (test / "crack" / "batch2").symlink_to(tmp_path / "batch2", target_is_directory=True)  # linked in: nested too
    (test / "crack" / "loop").symlink_to(test / "crack", target_is_directory=True)         # back up: no endless walk
    split = assert_matches_brute_force(test)
    assert [p.name for p in split.good] == ["a.PNG", "b.png"]
    assert [sub.name for sub in split.defect_types] == ["Good", "crack", "empty", "linked", "only_notes"]
    assert [p.name for p in split.defect_types[1].images] == ["10.jpg", "2.png"]
    assert [p.name for p in split.defect_types[1].others] == ["phone.gif"]
    assert [sub.name for sub in split.sub_folders] == ["Good", "crack", "empty", "good", "linked", "only_notes"]
    assert [sub.name for sub in split.misnamed_good] == ["Good"]
    # images one folder down are no image of their folder, but counted: nested/deep.png, sub/x.png
    assert [p.relative_to(test) for p in split.good_folder.nested_images] == [Path("good/nested/deep.png")]
    assert [p.relative_to(test) for p in split.defect_types[1].nested_images] == [Path("crack/batch2/y.png"),
                                                                                  Path("crack/sub/x.png")]


def test_good_in_another_case_is_named_and_good_alone_is_not(tmp_path):
    # Good/ and GOOD/ (a Windows or macOS tool's spelling) hold good parts that the rule reads as defects
    test = tmp_path / "test"
    for name in ("GOOD/0.png", "Good/1.png", "good/2.png", "goods/3.png", "good_old/4.png", "crack/5.png"):
        write(test / name)
    split = assert_matches_brute_force(test)
    assert [sub.name for sub in split.misnamed_good] == ["GOOD", "Good"]
    assert all(sub.label == DEFECT_LABEL for sub in split.misnamed_good)   # the rule itself is unchanged
    text = misnamed_good_text(split)
    assert text.count("\n") == 0
    assert f"{test / 'GOOD'}/" in text and f"{test / 'Good'}/" in text and "named exactly good/" in text
    write(tmp_path / "fine" / "good" / "0.png")
    write(tmp_path / "fine" / "goods" / "0.png")
    fine = labelled_images(tmp_path / "fine")
    assert fine.misnamed_good == () and misnamed_good_text(fine) is None


def test_nested_images_are_counted_below_any_depth_not_in_hidden_folders(tmp_path):
    test = tmp_path / "test"
    for name in ("crack/0.png", "crack/batch2/1.png", "crack/batch2/deeper/2.JPG", "crack/batch2/notes.txt",
                 "crack/.cache/3.png", "crack/batch3/.4.png", "good/day1/5.png"):
        write(test / name)
    split = assert_matches_brute_force(test)
    crack = split.defect_types[0]
    assert [p.name for p in crack.images] == ["0.png"]
    assert [p.relative_to(crack.folder).as_posix() for p in crack.nested_images] == ["batch2/1.png",
                                                                                     "batch2/deeper/2.JPG"]
    assert split.good == () and [p.name for p in split.good_folder.nested_images] == ["5.png"]


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
            nested = rng.choice(["", "", "sub/", ".git/", "sub/deep/", "sub/.h/"])
            write(test / folder / f"{nested}{stem}{ext}")
    assert_matches_brute_force(test)

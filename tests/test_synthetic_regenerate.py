"""`mrkd generate` into a folder it generated before: its own files are replaced, anything else in a
category's folder makes it refuse before it removes anything."""

from pathlib import Path

import pytest

from mrkd.train.synthetic import generate_dataset

SMALL = dict(image_size=48, n_train=3, n_test_good=2, n_test_defect=1, progress=False)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra", ["notes.txt", "train/good/my_cell.png", "test/good/000.png.bak",
                                   "ground_truth/mine/000_mask.png"])
def test_regenerating_refuses_a_category_folder_holding_a_users_file_and_keeps_everything(tmp_path, extra):
    generate_dataset(tmp_path, categories=["grain", "washer"], **SMALL)
    user_file = tmp_path / "washer" / extra
    user_file.parent.mkdir(parents=True, exist_ok=True)
    user_file.write_bytes(b"the user's own")
    before = _files(tmp_path)
    with pytest.raises(FileExistsError, match="not written by the synthetic generator") as caught:
        generate_dataset(tmp_path, categories=["grain", "washer"], **{**SMALL, "seed": 1})
    named = Path(str(caught.value).split(":")[0])         # the file, or the folder of the user's own it is in
    assert (named == user_file or named in user_file.parents) and tmp_path / "washer" in named.parents
    assert "\n" not in str(caught.value)
    assert _files(tmp_path) == before                   # nothing removed, grain's folder included


def test_regenerating_its_own_output_with_other_settings_replaces_it(tmp_path):
    generate_dataset(tmp_path, categories=["gray_tiles"], **{**SMALL, "n_train": 5})
    generate_dataset(tmp_path, categories=["gray_tiles"], **SMALL)
    assert sorted(p.name for p in (tmp_path / "gray_tiles" / "train" / "good").iterdir()) == \
        ["000.jpg", "001.jpg", "002.jpg"]

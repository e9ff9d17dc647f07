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


# `mrkd generate` (replace=False): it never writes over a file. Before, it removed the category it had
# written earlier and drew it again with the new settings (an edited mask or image was lost silently).

def _generate(root, *options):
    from click.testing import CliRunner
    from mrkd.cli import main
    return CliRunner().invoke(main, ["generate", str(root), "-c", "grain", "-c", "washer", "--image-size", "48",
                                     "--n-train", "3", "--n-test-good", "2", "--n-test-defect", "1", *options])


@pytest.mark.parametrize("change", ["other settings", "edited file", "added file"])
def test_generate_refuses_an_existing_category_it_would_change_and_keeps_every_file(tmp_path, change):
    assert _generate(tmp_path).exit_code == 0
    options = []
    if change == "other settings":
        options = ["--seed", "1"]
    elif change == "edited file":
        (tmp_path / "washer" / "ground_truth" / "crack" / "000_mask.png").write_bytes(b"relabelled")
    else:
        (tmp_path / "washer" / "notes.txt").write_text("mine")
    before = _files(tmp_path)
    done = _generate(tmp_path, *options)
    assert done.exit_code == 1, done.output
    errors = [line for line in done.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "refusing to write over it" in errors[0] and "another folder" in errors[0], done.output
    assert str(tmp_path / ("grain" if change == "other settings" else "washer")) in errors[0]
    assert _files(tmp_path) == before


def test_generate_again_with_the_same_settings_leaves_the_files_and_says_so(tmp_path):
    assert _generate(tmp_path).exit_code == 0
    before = _files(tmp_path)
    (tmp_path / "grain").rename(tmp_path / "moved")       # one category gone: it is written again
    done = _generate(tmp_path)
    assert done.exit_code == 0, done.output
    assert "wrote grain" in done.output and "washer already there" in done.output
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith("moved")} == before


def test_generate_writes_into_an_empty_category_folder(tmp_path):
    (tmp_path / "grain").mkdir()
    assert _generate(tmp_path).exit_code == 0
    assert len(list((tmp_path / "grain" / "train" / "good").iterdir())) == 3

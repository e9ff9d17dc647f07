"""The unread-format warning looks at the files list_images looks at, recursive or not: a file in a hidden
folder (.git/, .ipynb_checkpoints/) is neither read nor warned about."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mrkd.runtime.image_folders import UNREAD_IMAGE_EXTENSIONS, unread_images
from mrkd.runtime.images import IMAGE_EXTENSIONS, list_images

MRKD = [sys.executable, "-c", "from mrkd.cli import main; main()"]     # the mrkd command, this interpreter


def _folder_with_hidden_parts(root: Path) -> Path:
    """A folder of good images with GIFs beside them, in a visible sub-folder and in hidden places."""
    images = root / "images"
    for sub in ("sub", ".git/objects", ".cache"):
        (images / sub).mkdir(parents=True)
    for name in ("a.png", "sub/b.png", ".git/objects/c.png"):
        assert cv2.imwrite(str(images / name), np.full((16, 16, 3), 128, np.uint8))
    for name in ("top.gif", "sub/phone.gif", ".git/objects/logo.gif", ".cache/thumb.GIF", "sub/.hidden.gif"):
        (images / name).write_bytes(b"GIF89a")
    return images


def _walked(folder: Path, recursive: bool):
    """The visible regular files below ``folder`` by os.walk, an independent listing: hidden folders pruned."""
    found = []
    for where, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")] if recursive else []
        found += [Path(where) / name for name in files
                  if not name.startswith(".") and os.path.isfile(os.path.join(where, name))]
    return found


@pytest.mark.parametrize("recursive", [False, True])
def test_unread_images_skips_what_list_images_skips(tmp_path, recursive):
    images = _folder_with_hidden_parts(tmp_path)
    walked = _walked(images, recursive)
    assert list_images(images, recursive) == sorted(p for p in walked if p.suffix.lower() in IMAGE_EXTENSIONS)
    expected = sorted(p for p in walked if p.suffix.lower() in UNREAD_IMAGE_EXTENSIONS)
    assert unread_images(images, recursive) == expected
    assert expected == ([images / "sub/phone.gif", images / "top.gif"] if recursive else [images / "top.gif"])


def test_mrkd_export_warns_about_the_gifs_it_would_read_not_those_in_git(tmp_path):
    """`mrkd export --int8 --int8-images DIR` lists DIR recursively and skipped .git/ for its images, yet
    warned "skipped 3 image(s) ... (e.g. '.git/objects/logo.gif')", counting GIFs in hidden folders."""
    pytest.importorskip("torch")
    from export_fixtures import small_model
    from mrkd.train.checkpoint import save_checkpoint
    images = _folder_with_hidden_parts(tmp_path)
    # an image that does not decode ends the export once the folder is listed and warned about, before
    # model.onnx: the warning is what is checked, not the export
    (images / "sub" / "z_broken.png").write_bytes(b"not a png")
    save_checkpoint(small_model(), tmp_path / "ck.pt")
    done = subprocess.run(MRKD + ["export", str(tmp_path / "ck.pt"), "-o", str(tmp_path / "out"), "--no-engine",
                                  "--int8", "--int8-images", str(images)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "z_broken.png" in done.stderr.splitlines()[-1], done.stderr
    warned = [line for line in done.stderr.splitlines() if "in a format mrkd does not read" in line]
    assert len(warned) == 1, done.stderr
    assert f"{images}: skipped 2 image(s) in a format mrkd does not read (e.g. 'sub/phone.gif')" in warned[0]
    assert ".git" not in done.stderr and ".cache" not in done.stderr
    assert not (tmp_path / "out").exists()

"""scripts/apt_need.sh, the one place where scripts/setup_env.sh installs Debian packages (python3-venv, g++,
python3-dev, the gige extra's headers and typelib): run against stand-ins for dpkg-query, id and apt-get on
PATH, so nothing is installed and any machine can run it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APT_NEED = ROOT / "scripts" / "apt_need.sh"


def stand_ins(folder: Path, statuses: dict, uid: int) -> dict:
    """A PATH whose dpkg-query answers ``statuses`` ({package: dpkg status}), whose id -u says ``uid`` and whose
    apt-get writes its arguments to folder/apt-get.log; returns the environment."""
    folder.mkdir()
    cases = "".join(f'  {name}) printf "%s" "{status}";;\n' for name, status in statuses.items())
    scripts = {
        "dpkg-query": f'#!/bin/sh\nfor last; do :; done\ncase "$last" in\n{cases}  *) exit 1;;\nesac\n',
        "id": f"#!/bin/sh\necho {uid}\n",
        "apt-get": f'#!/bin/sh\necho "$@" >> "{folder}/apt-get.log"\n',
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return dict(os.environ, PATH=f"{folder}:/usr/bin:/bin", MRKD_APT_UPDATED=str(folder / "apt.updated"))


def apt_calls(folder: Path) -> list:
    log = folder / "apt-get.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_package_removed_with_its_configuration_left_is_installed_again(tmp_path):
    """dpkg -s answers 0 for a removed package whose configuration files remain: the old check took it for
    installed and PyGObject's build failed later for want of its headers."""
    bin_dir = tmp_path / "bin"
    env = stand_ins(bin_dir, {"pkg-config": "install ok installed", "libcairo2-dev": "deinstall ok config-files"}, 0)
    done = subprocess.run(["bash", str(APT_NEED), "the gige extra", "pkg-config", "libcairo2-dev", "gir1.2-aravis-0.8"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert apt_calls(bin_dir) == ["update -qq",
                                  "install -y -qq --no-install-recommends libcairo2-dev gir1.2-aravis-0.8"]


def test_the_package_lists_are_updated_once_for_all_installs(tmp_path):
    """A fresh `setup_env.sh dev` calls apt_need.sh up to four times (python3-venv, g++, python3-dev, the gige
    extra), and each ran apt-get update again; the tests' own installs (tests/peers.py) ran it once more.
    Once per boot now, through the marker both share."""
    bin_dir = tmp_path / "bin"
    env = stand_ins(bin_dir, {}, 0)
    for what, package in (("creating .venv", "python3-venv"), ("compiling cpp_ext", "g++")):
        done = subprocess.run(["bash", str(APT_NEED), what, package], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
    assert apt_calls(bin_dir) == ["update -qq", "install -y -qq --no-install-recommends python3-venv",
                                  "install -y -qq --no-install-recommends g++"]
    assert (bin_dir / "apt.updated").exists()
    import re
    import peers
    default = re.search(r'MRKD_APT_UPDATED:-([^}"]+)}', APT_NEED.read_text()).group(1)
    assert f'"MRKD_APT_UPDATED", "{default}"' in Path(peers.__file__).read_text()      # one marker for both


def test_stale_package_lists_are_updated_when_the_install_fails(tmp_path):
    """The lists were updated earlier this boot (the marker is there) and a package has moved on since: the
    install fails, so the lists are updated and the install tried once more."""
    bin_dir = tmp_path / "bin"
    env = stand_ins(bin_dir, {}, 0)
    (bin_dir / "apt.updated").touch()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> "{bin_dir}/apt-get.log"\n'
                                     f'[ "$1" = update ] && touch "{bin_dir}/fresh"\n'
                                     f'[ "$1" = update ] || [ -e "{bin_dir}/fresh" ]\n')
    done = subprocess.run(["bash", str(APT_NEED), "compiling cpp_ext", "g++"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert apt_calls(bin_dir) == ["install -y -qq --no-install-recommends g++", "update -qq",
                                  "install -y -qq --no-install-recommends g++"]


def test_nothing_missing_runs_no_apt(tmp_path):
    bin_dir = tmp_path / "bin"
    env = stand_ins(bin_dir, {"g++": "install ok installed"}, 1000)
    done = subprocess.run(["bash", str(APT_NEED), "compiling cpp_ext", "g++"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "" and apt_calls(bin_dir) == []


def test_not_root_names_the_missing_packages_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    env = stand_ins(bin_dir, {"pkg-config": "install ok installed"}, 1000)
    done = subprocess.run(["bash", str(APT_NEED), "the gige extra", "pkg-config", "gir1.2-aravis-0.8"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and apt_calls(bin_dir) == []
    assert done.stderr == ("Error: the gige extra needs Debian's gir1.2-aravis-0.8 (apt-get install gir1.2-aravis-0.8); "
                           "run this as root or install them.\n")


def test_setup_env_installs_through_apt_need_only():
    """Every Debian package setup_env.sh needs goes through apt_need.sh (its check and its one-line refusal)."""
    text = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert "apt-get" not in text and "dpkg -s" not in text
    for package in ("python3-venv", "g++", "python3-dev", "libgirepository1.0-dev", "gir1.2-aravis-0.8"):
        assert any("scripts/apt_need.sh" in line and package in line.split()
                   for line in text.splitlines()), package

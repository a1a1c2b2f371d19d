"""How links are written: relative inside the tree that holds the links directory, so the tree
resolves wherever it is mounted; absolute to anything outside it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ramstage import links


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "run-ramstage"
    (root / "store" / "m" / "g1").mkdir(parents=True)
    (root / "store" / "m" / "g1" / "m.ckpt").write_text("ram")
    (root / "models").mkdir()
    return root


def test_a_generation_is_linked_relatively_and_read_back_as_an_absolute_path(tree):
    link, target = tree / "models" / "m", tree / "store" / "m" / "g1" / "m.ckpt"
    links.point(link, target, relative=True, step=lambda what: None)
    assert os.readlink(link) == "../store/m/g1/m.ckpt"
    assert links.read(link) == str(target)
    assert link.read_text() == "ram"


def test_the_tree_moved_elsewhere_still_resolves(tree, tmp_path):
    links.point(
        tree / "models" / "m",
        tree / "store" / "m" / "g1" / "m.ckpt",
        relative=True,
        step=lambda what: None,
    )
    moved = tmp_path / "elsewhere" / "ramstage"
    moved.parent.mkdir()
    shutil.move(tree, moved)
    assert (moved / "models" / "m").read_text() == "ram"


def test_a_source_is_linked_absolutely_even_inside_the_tree(tree):
    source = tree / "ssd" / "m.ckpt"
    source.parent.mkdir()
    source.write_text("ssd")
    links.point(tree / "models" / "m", source, step=lambda what: None)
    assert os.readlink(tree / "models" / "m") == str(source)
    assert links.read(tree / "models" / "m") == str(source)


def test_a_links_directory_reached_through_a_symlink_gets_absolute_links(tree, tmp_path):
    # `..` from the real directory would not lead back to the tree the path names.
    elsewhere = tmp_path / "real-models"
    elsewhere.mkdir()
    (tree / "models").rmdir()
    (tree / "models").symlink_to(elsewhere)
    target = tree / "store" / "m" / "g1" / "m.ckpt"
    links.point(tree / "models" / "m", target, relative=True, step=lambda what: None)
    assert os.readlink(tree / "models" / "m") == str(target)
    assert (tree / "models" / "m").read_text() == "ram"


def test_a_link_that_points_where_asked_is_left_alone(tree):
    link, target = tree / "models" / "m", tree / "store" / "m" / "g1" / "m.ckpt"
    links.point(link, target, relative=True, step=lambda what: None)
    inode = os.lstat(link).st_ino
    links.point(link, target, relative=True, step=lambda what: None)
    assert os.lstat(link).st_ino == inode


def test_links_directly_under_the_root_are_absolute():
    assert links.text_for(Path("/models/m"), Path("/store/m/g/f"), relative=True) == "/store/m/g/f"

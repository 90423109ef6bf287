"""src/fusedlinear/report.py: files written whole or not at all, through links, FIFOs and
/dev/null, following the umask and keeping an existing file's mode."""

import os
import stat

import pytest


# Fixed: report.py atomic_write os.replace()d the path itself: a symlink (or /dev/stdout, a FIFO, a
# device: 'train --json /dev/full' replaced the device node as root and said 'wrote') became a
# regular file and its target was never written.
def test_save_json_through_a_symlink_writes_the_target(tmp_path):
    from fusedlinear.train import save_json

    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    save_json({"a": 1}, str(link))
    assert link.is_symlink(), "the symlink was replaced by a regular file"
    assert '"a": 1' in target.read_text()


def test_save_json_into_a_fifo_writes_through_it(tmp_path):
    import threading

    from fusedlinear.train import save_json

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    save_json({"a": 1}, str(fifo))
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert got and b'"a": 1' in got[0]


def test_save_json_to_dev_null_and_through_a_link_to_it(tmp_path):
    from fusedlinear.train import save_json

    before = os.stat("/dev/null")
    save_json({"a": 1}, "/dev/null")
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    save_json({"a": 1}, str(link))
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino and link.is_symlink()
    assert not list(tmp_path.glob(".tmp-*"))


def test_atomic_write_refuses_a_directory(tmp_path):
    from fusedlinear.report import atomic_write

    with pytest.raises(IsADirectoryError, match="name a file inside it"):
        atomic_write(str(tmp_path), lambda f: f.write(b"x"))


# Fixed: atomic_write used mkstemp's mode 0600: --save/--json/--plot files were unreadable to
# group/others, unlike torch.save/open() under the umask.
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    from fusedlinear.train import save_json

    old = os.umask(umask)
    try:
        save_json({"a": 1}, str(tmp_path / "s.json"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.json").st_mode) == mode


def test_saving_over_a_file_keeps_its_mode(tmp_path):
    from fusedlinear.train import save_json

    path = tmp_path / "s.json"
    path.write_text("old")
    path.chmod(0o640)
    save_json({"a": 1}, str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and '"a": 1' in path.read_text()
